"""Ablation of the default method's second-round changes on MNIST-5k, with the forget sets of
`paper_tables.py` (same seeds, same order): each change switched back on its own.

    python benchmarks/ablation.py --json bench-out/ablation.json --workers 2
    python benchmarks/ablation.py --variants default shift_warp --tables single --seeds 0

Single-shot k=64 and continual (k_CL=8) up to k=128. Prints a markdown table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import paper_tables as pt  # noqa: E402
from streamer.evaluate import accuracy  # noqa: E402
from streamer.unlearn import Fragment, Unlearner, method_config  # noqa: E402

VARIANTS = {
    "default": {},
    "shift_warp": dict(distill_warp="shift"),  # distillation on +-2 px shifted noisy copies
    "update_all": dict(update="all"),  # every weight moves, convolutions included
    "first_round": dict(distill_warp="shift", update="all"),  # the default before this ablation
    "default+buffer": dict(_buffer=True),
    "buffer_not_distilled": dict(_buffer=True, distill_buffer=False),  # buffer only in the CE term
    "buffer_weight_1": dict(_buffer=True, buffer_weight=1.0),
    "first_round+buffer": dict(distill_warp="shift", update="all", distill_buffer=False, buffer_weight=1.0,
                               _buffer=True),
}


def run(job: tuple[str, str, int]) -> list[dict]:
    variant, table, seed = job
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    over = dict(VARIANTS[variant])
    use_buffer = over.pop("_buffer", False)
    splits, state = pt._setup("mnist5k", Path("artifacts"), torch.device("cpu"))
    index, _ = pt._forget_order(splits, seed)
    model = pt._model("mnist5k", state, "cpu")
    x, y = splits.train.x[index], splits.train.y[index]
    unlearner = Unlearner(model, method_config("default", seed=seed, **over), 10,
                          buffer=splits.buffer if use_buffer else None)
    start, steps, records = time.perf_counter(), 0, []
    size, ends = (64, [64]) if table == "single" else (pt.K_CL, list(range(pt.K_CL, 129, pt.K_CL)))
    for end in ends:
        outcome = unlearner.unlearn(Fragment(x[end - size:end], y[end - size:end], torch.full((size,), -1)))
        steps += outcome.steps
        if end in (64, 128):
            records.append(dict(variant=variant, table=table, seed=seed, k=end, goal_reached=outcome.goal_reached,
                                forget_acc=accuracy(model, x[:end], y[:end]),
                                test_acc=accuracy(model, splits.audit.x, splits.audit.y),
                                steps=steps, seconds=round(time.perf_counter() - start, 1)))
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tables", nargs="+", default=["single", "continual"], choices=["single", "continual"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench-out/ablation.json"))
    args = p.parse_args(argv)
    pt._setup("mnist5k", Path("artifacts"), torch.device("cpu"))  # trains the reference once if missing
    jobs = [(v, t, s) for t in sorted(args.tables) for v in args.variants for s in args.seeds]
    records, start = [], time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for done, recs in enumerate(pool.imap_unordered(run, jobs), 1):
            records += recs
            last = recs[-1]
            print(f"[{done}/{len(jobs)} {time.perf_counter() - start:5.0f}s] {last['variant']} {last['table']} "
                  f"seed {last['seed']} k={last['k']}: forget {last['forget_acc']:.3f} test {last['test_acc']:.3f}",
                  flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1))
    print("\n| variant | table | k | forget | test | steps | seconds | goal reached |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["table"], list(VARIANTS).index(r["variant"]), r["k"], r["seed"])):
        print(f"| {r['variant']} | {r['table']} | {r['k']} | {r['forget_acc']:.3f} | {r['test_acc']:.3f} | "
              f"{r['steps']} | {r['seconds']} | {r['goal_reached']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
