"""Continual fragments of real digits through `Unlearner`, alone or under torchrun (tests/engine/test_distributed.py).

    python ddp_job.py WEIGHTS OUT [float64]                                     one process
    torchrun --standalone --nproc_per_node 2 ddp_job.py WEIGHTS OUT [float64]   rank 0 unlearns, rank 1 follows
    torchrun ... ddp_job.py - OUT train_mode|edges [float64]          small BatchNorm CNNs (batchnorm_case, edge_case)
    torchrun ... ddp_job.py - OUT train_mode follower_dies            rank 1 exits in the 2nd fragment
    torchrun ... ddp_job.py - OUT train_mode hostile dtype|size       rank 0 sends a header that is not streamer's

Each rank writes OUT/rank<r>.pt: its final weights (and rank 0 every fragment's outcome). The
digits fragments: 8 misclassify, 4 relabel + 4 misclassify, 8 unseen whose given label is not the
model's class (a feature goal with the retain buffer), each joining the retained set.
"""
import os
import sys
from pathlib import Path

import torch

from streamer.engine import (Dataset, Fragment, GroupLost, Normalized, Unlearner, follow, join_group, leave_group,
                             load_splits, method_config)
from streamer.engine.models import digits_cnn, load_weights


def fragments(splits) -> list[Fragment]:
    x, y = splits.train.x[:24], splits.train.y[:24]
    relabel = torch.cat([(y[8:12] + 3) % 10, torch.full((4,), -1)])
    return [Fragment(x[:8], y[:8], torch.full((8,), -1)),
            Fragment(x[8:16], y[8:16], relabel),
            Fragment(x[16:], (y[16:] + 1) % 10, torch.full((8,), -2))]


def batchnorm_case() -> tuple[Normalized, Dataset, list[Fragment]]:
    """Train mode: a tiny CNN with BatchNorm2d and BatchNorm1d on random 1x8x8 inputs, fragments of
    3 and 5 (a rank's share of 3 rows would be 1: BatchNorm1d refuses one row in train mode)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(256, 16), torch.nn.BatchNorm1d(16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = _random_rows(28)
    return (Normalized(net, (0.5,), (0.25,)), Dataset(x[8:], y[8:]),
            [Fragment(x[:3], y[:3], torch.full((3,), -1)), Fragment(x[3:8], y[3:8], torch.full((5,), -1))])


def edge_case() -> tuple[Normalized, Dataset, list[Fragment]]:
    """Eval mode, rows split over ranks: a retain buffer of one row and a fragment of one (a rank
    with no row of a term), a fragment that raises on every rank (the wrong input size), then a
    fragment of 3."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(256, 3))
    model = Normalized(net, (0.5,), (0.25,)).eval()
    x, _ = _random_rows(12)
    with torch.no_grad():
        y = model(x).argmax(1)  # every goal starts unmet
    bad = torch.rand(2, 1, 9, 9)
    return (model, Dataset(x[11:], y[11:]),
            [Fragment(x[:1], y[:1], torch.full((1,), -1)), Fragment(bad, y[1:3], torch.full((2,), -1)),
             Fragment(x[3:6], y[3:6], torch.full((3,), -1))])


def _random_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def main(weights: str, out: str, *flags: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shard, device = join_group(torch.device("cpu"))
    if "train_mode" in flags or "edges" in flags:
        model, buffer, work = batchnorm_case() if "train_mode" in flags else edge_case()
        cfg = method_config("default", max_steps=40, distill_pool=64, train_mode="train_mode" in flags)
    else:
        model = Normalized(digits_cnn(), (0.0,), (1.0,))
        load_weights(model, weights)
        splits = load_splits("digits")
        buffer, work = Dataset(splits.buffer.x[:200], splits.buffer.y[:200]), fragments(splits)
        cfg = method_config("default", max_steps=400, lr=0.003, distill_pool=256)
    if "float64" in flags:  # no float32 rounding for Adam to amplify: 1 and 2 processes comparable to 1e-12
        torch.set_default_dtype(torch.float64)
        model, buffer = model.double(), Dataset(buffer.x.double(), buffer.y)
        work = [Fragment(f.x.double(), f.y, f.target) for f in work]
    unlearner = Unlearner(model.eval(), cfg, len(model(buffer.x[:1])[0]), buffer=buffer, shard=shard)
    record: dict = {}
    if "hostile" in flags and shard.rank == 0:  # not streamer: a header naming code, or a huge one
        import torch.distributed as dist
        raw = b'{"op": "unlearn", "tensors": [["x", "__import__", [1]]]}'
        size = torch.tensor([len(raw) if "dtype" in flags else 1 << 40])
        dist.broadcast(size, 0, group=shard.jobs)
        if "dtype" in flags:
            dist.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8), 0, group=shard.jobs)
        return
    if "follower_dies" in flags and shard.rank > 0:  # gone as the second fragment starts
        first = unlearner.unlearn
        unlearner.unlearn = lambda f: first(f) if not unlearner.fragments_done else os._exit(3)
    if "follower_dies" in flags and shard.rank == 0:
        try:
            [unlearner.unlearn(f) for f in work]
        except GroupLost as err:
            torch.save({"lost": str(err)}, Path(out) / "rank0.pt")
            return
    if shard.rank == 0:
        record["outcomes"] = [_outcome(unlearner, f) for f in work]
    else:
        record["followed"] = follow(unlearner)
    leave_group(shard)
    record["state"] = model.state_dict()
    torch.save(record, Path(out) / f"rank{shard.rank}.pt")


def _outcome(unlearner: Unlearner, fragment: Fragment) -> dict:
    try:
        o = unlearner.unlearn(fragment)
    except RuntimeError as err:  # the daemon's worker makes it an EngineFailure
        return {"raised": type(err).__name__}
    return {"stopped_by": o.stopped_by, "steps": o.steps, "fragment_met": o.fragment_met, "targets": o.targets,
            "feature_gaps": o.feature_gaps}


if __name__ == "__main__":
    main(*sys.argv[1:])
