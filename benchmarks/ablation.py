"""Ablation of the default method's second-round changes on MNIST-5k, with the forget sets of
`paper_tables.py` (same seeds, same order): each change switched back on its own.

    python benchmarks/ablation.py --json bench-out/ablation.json --workers 2
    python benchmarks/ablation.py --variants default shift_warp --tables single --seeds 0

Single-shot k=64 and continual (k_CL=8) up to k=128 (records at k=8, 16, 64, 128), each a
`paper_tables.run_unit` with the variant's settings. Prints a markdown table, writes JSON.
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
    """paper_tables' own unit (same forget set, loop and records) with the variant's settings."""
    variant, table, seed = job
    overrides = dict(VARIANTS[variant])
    method = "default+buffer" if overrides.pop("_buffer", False) else "default"
    unit = pt.Unit(table, "mnist5k", seed, method, 64 if table == "single" else 128)
    return [dict(r, variant=variant) for r in pt.run_unit(unit, Path("artifacts"), "cpu", overrides)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tables", nargs="+", default=["single", "continual"], choices=["single", "continual"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench-out/ablation.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("BENCH_THREADS", "1")  # one thread per worker process
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
