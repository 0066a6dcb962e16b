"""Data-parallel fragments (issue 24, item 5): one process against torchrun's N, same fragment.

  python benchmarks/distributed.py                      # CPU: 1 process x 2 threads vs 2 gloo processes x 1 thread
  python benchmarks/distributed.py --device cuda --ranks 2    # 1 GPU vs 2 GPUs (NCCL)

Cases (model, input size, k): the SVHN CNN at 32 x 32 with fragments of 8 and 64, torchvision
resnet18 at 32 x 32 with 64 (model_zoo.py's models and real images, the default goal). On CPU both
runs use the same 2 cores, so the question is whether ranks use them better than threads do; on
GPUs each rank has its own. A run is a fresh process (or group): one fragment of k with the
product's default method, max_seconds off, then seconds per fragment and per step (the unlearn
stage / steps) and the stages. Prints a table, writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = (("svhn", 32, 8), ("svhn", 32, 64), ("resnet18", 32, 64))


def fragment(name: str, size: int, k: int, device: str) -> dict | None:
    """In this process (rank 0, or the only one): one fragment; other ranks follow it (None)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from model_zoo import _images, _model

    from streamer.engine import Fragment, Unlearner, follow, join_group, leave_group, method_config

    torch.manual_seed(0)
    shard, dev = join_group(torch.device(device))
    model = _model(name, size).to(dev).eval()
    x = _images(size, k).to(dev)
    with torch.no_grad():
        y = model(x).argmax(1)
    unlearner = Unlearner(model, method_config("default", max_seconds=1e9), 10, shard=shard)
    if shard.rank > 0:
        follow(unlearner)
        leave_group(shard)
        return None
    start = time.perf_counter()
    outcome = unlearner.unlearn(Fragment(x, y, torch.full_like(y, -1)))
    seconds = time.perf_counter() - start
    leave_group(shard)
    return {"model": name, "input": size, "k": k, "ranks": shard.world, "threads": torch.get_num_threads(),
            "device": str(dev), "steps": outcome.steps, "stopped_by": outcome.stopped_by,
            "seconds": round(seconds, 2), "seconds_per_step": round(outcome.stage_seconds["unlearn"] / max(1, outcome.steps), 4),
            "stages": {s: round(v, 2) for s, v in outcome.stage_seconds.items()}}


def run(case: tuple[str, int, int], ranks: int, device: str, threads: int, out: Path) -> dict:
    name, size, k = case
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parents[1])}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    child = subprocess.run([*launcher, __file__, "--one", name, str(size), str(k), device, str(out)], env=env,
                           capture_output=True, text=True)
    if child.returncode or not out.exists():
        return {"model": name, "input": size, "k": k, "ranks": ranks, "error": child.stderr.strip()[-400:]}
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/distributed.json"))
    p.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # the child: model size k device result-file
    args = p.parse_args()
    if args.one:
        name, size, k, device, result = args.one
        row = fragment(name, int(size), int(k), device)
        if row is not None:
            Path(result).write_text(json.dumps(row))
        return
    cores = os.cpu_count() or 1
    rows = []
    work = Path(args.out).with_suffix(".runs")
    work.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        for ranks in (1, args.ranks):
            threads = max(1, cores // ranks) if args.device == "cpu" else 1
            print(f"  {case} ranks={ranks} threads={threads} ...", file=sys.stderr, flush=True)
            result = work / f"{case[0]}-{case[1]}-{case[2]}-{ranks}.json"
            result.unlink(missing_ok=True)
            rows.append(run(case, ranks, args.device, threads, result))
            print(f"    {rows[-1]}", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "cpu_count": cores, "rows": rows}, indent=2) + "\n")
    print("| model | input | k | ranks x threads | steps | s / fragment | s / step | adversarial s | speed-up (s / step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    alone: dict = {}
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['input']} | {r['k']} | {r['ranks']} | error: {r['error']} |" + " |" * 4)
            continue
        key = (r["model"], r["input"], r["k"])
        alone.setdefault(key, r["seconds_per_step"])
        print(f"| {r['model']} | {r['input']} | {r['k']} | {r['ranks']} x {r['threads']} | {r['steps']} | "
              f"{r['seconds']:.1f} | {r['seconds_per_step']:.4f} | {r['stages'].get('adversarial', 0):.1f} | "
              f"{alone[key] / r['seconds_per_step']:.2f}x |")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
