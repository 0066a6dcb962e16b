"""Continual fragments of real digits through `Unlearner`, alone or under torchrun (tests/engine/test_distributed.py).

    python ddp_job.py WEIGHTS OUT [float64]                                     one process
    torchrun --standalone --nproc_per_node 2 ddp_job.py WEIGHTS OUT [float64]   rank 0 unlearns, rank 1 follows
    torchrun ... ddp_job.py - OUT train_mode                          a small BatchNorm CNN in train mode
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
    """A tiny BatchNorm CNN on random 1x8x8 inputs: two fragments of 4, for train mode."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(256, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(28, 1, 8, 8, generator=g), torch.randint(0, 3, (28,), generator=g)
    minus = torch.full((4,), -1)
    return (Normalized(net, (0.5,), (0.25,)), Dataset(x[8:], y[8:]),
            [Fragment(x[:4], y[:4], minus), Fragment(x[4:8], y[4:8], minus)])


def main(weights: str, out: str, *flags: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shard, device = join_group(torch.device("cpu"))
    if "train_mode" in flags:
        model, buffer, work = batchnorm_case()
        cfg = method_config("default", max_steps=40, distill_pool=64, train_mode=True)
    else:
        model = Normalized(digits_cnn(), (0.0,), (1.0,))
        load_weights(model, weights)
        splits = load_splits("digits")
        buffer, work = Dataset(splits.buffer.x[:200], splits.buffer.y[:200]), fragments(splits)
        if "float64" in flags:  # no float32 rounding for Adam to amplify: 1 and 2 processes comparable to 1e-12
            torch.set_default_dtype(torch.float64)
            model, buffer = model.double(), Dataset(buffer.x.double(), buffer.y)
            work = [Fragment(f.x.double(), f.y, f.target) for f in work]
        cfg = method_config("default", max_steps=400, lr=0.003, distill_pool=256)
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
        outcomes = [unlearner.unlearn(f) for f in work]
        record["outcomes"] = [{"stopped_by": o.stopped_by, "steps": o.steps, "fragment_met": o.fragment_met,
                               "targets": o.targets, "feature_gaps": o.feature_gaps} for o in outcomes]
    else:
        record["followed"] = follow(unlearner)
    leave_group(shard)
    record["state"] = model.state_dict()
    torch.save(record, Path(out) / f"rank{shard.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
