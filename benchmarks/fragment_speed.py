"""Fragment speed, old path vs fast path, side by side in one process (issue 13).

    python benchmarks/fragment_speed.py --runs fragment8 --seeds 0 1 2 --json benchmarks/results/fragment_speed_cpu.json
    python benchmarks/fragment_speed.py --runs single64 continual --paths new --seeds 0

The forget sets are paper_tables.py's (MNIST-5k, same seeds, same request order): `fragment8`
is the first 8 instances as one fragment, `single64` the first 64, `continual` 16 fragments of 8.
For each (run, seed) the old path (the default the issue measured: `fast_path: false`, the
paper's 50 PGD iterations) and the fast path (the product default now) run one after the other
on fresh copies of the cached reference model, so machine load hits both alike. max_seconds is
effectively unlimited: the step cap and the goal, never the clock, end a fragment here. One
short untimed fragment per path first warms the process up, as a running daemon is. With
`--repeat N` each path runs N times per seed (fresh model each time, old and new alternating) and
the median run is reported, with every run's seconds in `repeat_seconds`.

Per path: seconds per stage (adversarial, importance, unlearn; evaluate = the daemon's
per-fragment evaluation: the forgotten set and the 1000-image audit set; checkpoint = the
version write through CheckpointStore.publish into a temporary directory), steps, forget / test accuracy, and the fraction of the FLOP floor reached:
FLOPs counted with torch.utils.flop_counter on the same fragment (setup = the attack and the
distillation pool, plus one optimizer step, x steps) divided by this process's measured dense
matmul rate, over the measured seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import paper_tables as pt  # noqa: E402

from streamer.engine.evaluate import accuracy, logits  # noqa: E402
from streamer.engine.unlearn import Fragment, Unlearner, method_config  # noqa: E402
from streamer.state.checkpoints import CheckpointStore  # noqa: E402

RUNS = {"fragment8": (8, 8), "single64": (64, 64), "continual": (128, 8)}  # (instances, fragment size)
# old: the "today's default" (the whole network every step, the paper's 50 PGD iterations)
PATHS = {"old": dict(fast_path=False, pgd_steps=50), "new": dict(fast_path=True)}
UNLIMITED_SECONDS = 1e9


def _matmul_flops_per_second(n: int = 1024, repeat: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - start)


def _counted_flops(model_factory, cfg, fragment: Fragment, max_steps: int) -> int:
    """FlopCounterMode's dispatch-level counter without its module tracker, whose backward hooks
    refuse the attack's torch.autograd.grad on a leaf input (torch 2.14)."""
    counter = FlopCounterMode(display=False)
    with _FlopCounterMode(counter):
        Unlearner(model_factory(), method_config("default", **{**cfg, "max_steps": max_steps}), 10).unlearn(fragment)
    return counter.get_total_flops()


def warm_up(splits, state) -> None:
    """One short fragment per path before anything is timed: the first optimizer and the first
    convolutions load code and allocate once per process (measured ~1 s), which a long-running
    daemon pays once, not per fragment."""
    x, y = splits.train.x[:8], splits.train.y[:8]
    for path in PATHS:
        cfg = method_config("default", seed=0, max_steps=3, max_seconds=UNLIMITED_SECONDS, **PATHS[path])
        Unlearner(pt._model("mnist5k", state, "cpu"), cfg, 10).unlearn(Fragment(x, y, torch.full_like(y, -1)))


def run_path(run: str, seed: int, path: str, splits, state, load: str, overrides: dict | None = None) -> dict:
    total, size = RUNS[run]
    index, _ = pt._forget_order(splits, seed)
    x, y = splits.train.x[index[:total]], splits.train.y[index[:total]]
    target = torch.full_like(y, -1)
    model = pt._model("mnist5k", state, "cpu")
    cfg = dict(seed=seed, max_seconds=UNLIMITED_SECONDS, **PATHS[path], **(overrides or {}))
    unlearner = Unlearner(model, method_config("default", **cfg), 10)
    cpu0 = time.process_time()
    stages = {"adversarial": 0.0, "importance": 0.0, "unlearn": 0.0, "evaluate": 0.0, "checkpoint": 0.0}
    steps, goals, outcomes = 0, 0, []
    store_dir = tempfile.TemporaryDirectory(prefix="fragment-speed-")
    store = CheckpointStore(store_dir.name)
    for start in range(0, total, size):
        outcome = unlearner.unlearn(Fragment(x[start : start + size], y[start : start + size],
                                             target[start : start + size]))
        for name, seconds in outcome.stage_seconds.items():
            stages[name] += seconds
        t0 = time.perf_counter()  # what FragmentWorker evaluates once per fragment
        logits(model, x[: start + size])
        logits(model, splits.audit.x)
        stages["evaluate"] += time.perf_counter() - t0
        t0 = time.perf_counter()  # the daemon's version write: model file and manifest, fsynced, CURRENT switched
        store.publish(store.current_version(), model.net.state_dict())
        stages["checkpoint"] += time.perf_counter() - t0
        steps += outcome.steps
        goals += outcome.goal_reached
        outcomes.append(dict(stopped_by=outcome.stopped_by, steps=outcome.steps, missed=outcome.missed,
                             attack_success_ratio=round(outcome.attack_success_ratio, 4)))
    store_dir.cleanup()
    cpu_seconds = time.process_time() - cpu0  # this process's CPU time: less sensitive to other load
    rec = dict(run=run, seed=seed, path=path, k=total, fragment_size=size, load=load, overrides=overrides or {},
               cpu_seconds=round(cpu_seconds, 3),
               stage_seconds={k: round(v, 3) for k, v in stages.items()}, seconds=round(sum(stages.values()), 3),
               steps=steps, fragments=len(outcomes), goal_reached=goals,
               forget_acc=accuracy(model, x, y), test_acc=accuracy(model, splits.audit.x, splits.audit.y),
               fragments_detail=outcomes)
    return rec


def flop_floor(seed: int, path: str, splits, state, steps: int, seconds: float, rate: float) -> dict:
    """FLOPs of the fragment8 unit: setup (attack + pool, counted with 0 steps... one step) and per step."""
    index, _ = pt._forget_order(splits, seed)
    x, y = splits.train.x[index[:8]], splits.train.y[index[:8]]
    frag = Fragment(x, y, torch.full_like(y, -1))
    cfg = dict(seed=seed, max_seconds=UNLIMITED_SECONDS, **PATHS[path])
    factory = lambda: pt._model("mnist5k", state, "cpu")  # noqa: E731
    one, two = _counted_flops(factory, cfg, frag, 1), _counted_flops(factory, cfg, frag, 2)
    per_step = two - one
    setup = one - per_step
    total = setup + per_step * steps
    return dict(setup_flops=setup, step_flops=per_step, total_flops=total, matmul_flops_per_second=rate,
                floor_seconds=round(total / rate, 3), floor_fraction=round(total / rate / seconds, 4))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per (run, seed, path), old and new alternating; the median run is reported")
    p.add_argument("--flops", action="store_true", help="count FLOPs for fragment8 (adds a few runs)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="UnlearnConfig overrides for the new path (numbers as JSON), e.g. distill_pool=8192")
    p.add_argument("--load", default="", help="say what else ran on the machine meanwhile (recorded)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/fragment_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits, state = pt._setup("mnist5k", Path("artifacts"), torch.device("cpu"))
    load = args.load or f"loadavg {os.getloadavg()[0]:.2f} at start"
    new_overrides = pt.parse_set(args.set)
    print("warming up (not timed)", flush=True)
    warm_up(splits, state)
    records = []
    for run in args.runs:
        for seed in args.seeds:
            runs: dict[str, list[dict]] = {path: [] for path in args.paths}
            for _ in range(args.repeat):  # old and new alternate, so load drifts hit both alike
                for path in args.paths:
                    runs[path].append(run_path(run, seed, path, splits, state, load,
                                               new_overrides if path == "new" else None))
            for path in args.paths:
                rec = sorted(runs[path], key=lambda r: r["seconds"])[len(runs[path]) // 2]  # the median run
                rec["repeat_seconds"] = [r["seconds"] for r in runs[path]]
                rec["loadavg_after"] = round(os.getloadavg()[0], 2)
                if args.flops and run == "fragment8":
                    rec.update(flop_floor(seed, path, splits, state, rec["steps"],
                                          rec["stage_seconds"]["adversarial"] + rec["stage_seconds"]["importance"]
                                          + rec["stage_seconds"]["unlearn"], _matmul_flops_per_second()))
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "fragments_detail"}), flush=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(dict(machine=platform.processor() or platform.machine(),
                                                     threads=args.threads, torch=torch.__version__,
                                                     repeat=args.repeat, records=records), indent=1))
    print("\n| run | seed | path | adversarial s | unlearn s | evaluate s | checkpoint s | total s | steps | goal "
          "| forget | test | new/old | floor |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        old = next((r for r in records if (r["run"], r["seed"], r["path"]) == (rec["run"], rec["seed"], "old")), None)
        ratio = f"{rec['seconds'] / old['seconds']:.3f}" if old and rec["path"] == "new" else "-"
        s = rec["stage_seconds"]
        print(f"| {rec['run']} | {rec['seed']} | {rec['path']} | {s['adversarial']:.2f} | {s['unlearn']:.2f} | "
              f"{s['evaluate']:.2f} | {s['checkpoint']:.2f} | {rec['seconds']:.2f} | {rec['steps']} | {rec['goal_reached']}/{rec['fragments']} "
              f"| {rec['forget_acc']:.3f} | {rec['test_acc']:.3f} | {ratio} | {rec.get('floor_fraction', '-')} |")
    pairs = [(n, o) for n in records for o in records
             if n["path"] == "new" and o["path"] == "old" and (n["run"], n["seed"]) == (o["run"], o["seed"])]
    if pairs:
        print(f"\nmedian new/old seconds: {statistics.median(n['seconds'] / o['seconds'] for n, o in pairs):.3f}; "
              f"max test drop: {max(o['test_acc'] - n['test_acc'] for n, o in pairs):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
