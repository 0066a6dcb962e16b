"""Models of real size (issue 24): what `auto` moves, how a step runs, what a fragment costs.

  python benchmarks/model_zoo.py --k 8            # the CPU plan below, fragments of 8: 34 min on 2 cores
  python benchmarks/model_zoo.py                  # ... and of 64 at 32 x 32 (not yet timed)
  python benchmarks/model_zoo.py --quick          # 3x32x32, fragments of 8 (~5 min)
  python benchmarks/model_zoo.py --device cuda    # every case runs a full fragment (GPU)
  python benchmarks/model_zoo.py --models svhn resnet18 --sizes 32 --k 8 --compare   # + the whole-model path

Models: ccexam's pretrained SVHN CNN (quality: real weights, its 4 SVHN sample PNGs), torchvision
resnet18, resnet50, mobilenet_v3_large, efficientnet_b0 and vit_b_16 (random weights: the cost of a
step does not depend on their values; num_classes 10; a ViT at 32 x 32 has image_size 32). Inputs
are real images: the 4 SVHN samples, foolbox's 20 CIFAR-10 and 20 CIFAR-100 test PNGs and their
mirror images, resized to the input size; each is labelled as the model predicts it, so the
default goal (misclassify) starts unmet. Each case is a fresh subprocess: one fragment of k with
the product's default method (max_seconds off: the goal or the step cap ends it), then its peak
resident memory (ru_maxrss) and, on CUDA, torch's peak allocated memory. A `timed` case (on CPU,
resnet50 and vit_b_16 at 224 x 224, where a full fragment is hours of 2 cores) runs 1 PGD
iteration and 5 optimizer steps: its seconds per step are a step's, its goal is not judged.
`--compare` also runs each case with the frozen prefix limited to nn.Sequential networks (the
path before torch.fx splitting), in the same process order, for a ratio measured in one run.

Reported: parameters moved by `auto` (and which top-level modules), the path a step takes
(`prefix.plan_split`), steps, seconds per fragment and per step (the unlearn stage / steps),
the goal (forget accuracy 0 = every instance misclassified); a step's seconds are the unlearn
stage's less the step inputs made once per fragment (prefix features, distillation pool), shown apart, the cached features and pool in
MiB, peak memory. Prints a table, writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("svhn", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16")
SMALL = ("svhn", "resnet18", "mobilenet_v3_large", "efficientnet_b0")  # a full fragment at 224 on 2 CPU cores


def plan(models: list[str], sizes: list[int], ks: list[int], device: str) -> list[tuple[str, int, int, bool]]:
    """(model, size, k, timed) cases: on CPU, 224 x 224 runs a fragment of 8 for the small models and
    a few timed steps for the others; the SVHN CNN takes 32 x 32 only."""
    cases = []
    for size in sizes:
        for model in models:
            if model == "svhn" and size != 32:
                continue
            for k in ks:
                timed = device == "cpu" and size >= 224 and model not in SMALL
                if size >= 224 and device == "cpu" and k > 8:
                    continue
                cases.append((model, size, k, timed))
    return cases


def _images(size: int, k: int):
    """(k, 3, size, size) real RGB images in [0, 1]: the SVHN samples, CIFAR-10/100 PNGs, mirrored."""
    import importlib.util

    import numpy as np
    import torch
    from PIL import Image
    roots = [Path(importlib.util.find_spec(p).submodule_search_locations[0]) for p in ("ccexam", "foolbox")]
    files = sorted((roots[0] / "samples").glob("svhn_*.png")) + sorted((roots[1] / "data").glob("cifar*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((32, 32)), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for f in files])
    x = torch.cat([x, x.flip(3)])[:k]
    assert len(x) == k, f"{len(x)} images for k={k}"
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False) if size != 32 else x


def _model(name: str, size: int):
    import torch
    import torchvision

    from streamer.engine.models import Normalized
    if name == "svhn":
        import importlib.util

        from ccexam.models import SVHNNet
        net = SVHNNet(32)
        root = Path(importlib.util.find_spec("ccexam").submodule_search_locations[0])
        net.load_state_dict(torch.load(root / "weights" / "svhn.pth", map_location="cpu"))
        return Normalized(net, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    return Normalized(getattr(torchvision.models, name)(num_classes=10, **kwargs), (0.5,) * 3, (0.25,) * 3)


def measure(name: str, size: int, k: int, timed: bool, device: str, sequential_only: bool) -> dict:
    """In this (fresh) process: one fragment of `k` for one model."""
    import torch

    import streamer.engine.steps as steps
    from streamer.engine import Fragment, Unlearner, method_config
    from streamer.engine.prefix import plan_split

    torch.manual_seed(0)
    build = steps.StepInputs.build
    cached: dict[str, float] = {}

    def recorded(*args, **kwargs):  # measurement only: the seconds and bytes of the fragment's step inputs
        t0 = time.perf_counter()
        inputs = build(*args, **kwargs)
        cached["build_s"] = time.perf_counter() - t0
        held = [inputs.objective, inputs.adv, inputs.buffer, inputs.pool] if inputs.split is not None else [inputs.pool]
        cached["MiB"] = sum(t.nbytes for t in held if t is not None) / 2**20
        return inputs
    steps.StepInputs.build = staticmethod(recorded)
    if sequential_only:  # the path before torch.fx splitting: no input rows, so only nn.Sequential splits
        split = steps.split_frozen_prefix
        steps.split_frozen_prefix = lambda model, trainable, example=None: split(model, trainable)
    model = _model(name, size).to(device).eval()
    x = _images(size, k).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    overrides = dict(pgd_steps=1, max_steps=5) if timed else {}
    unlearner = Unlearner(model, method_config("default", max_seconds=1e9, **overrides), 10)
    info = unlearner.describe_trainable()
    path = "whole model: the Sequential-only path" if sequential_only else plan_split(model, unlearner.trainable, x[:2])[1]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outcome = unlearner.unlearn(Fragment(x, y, torch.full_like(y, -1)))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        forget_acc = (model(x).argmax(1) == y).float().mean().item()
    unlearn = outcome.stage_seconds.get("unlearn", seconds) - cached.get("build_s", 0.0)
    return {"model": name, "input": [3, size, size], "k": k, "device": device, "timed": timed,
            "path": path, "sequential_only": sequential_only, "parameters": info["total_parameters"],
            "moved": info["trainable_parameters"], "moved_modules": sorted(info["by_module"]),
            "steps": outcome.steps, "stopped_by": outcome.stopped_by, "goal_met": outcome.goal_reached and not timed,
            "forget_acc": round(forget_acc, 3), "seconds": round(seconds, 2),
            "seconds_per_step": round(unlearn / max(1, outcome.steps), 4),
            "stages": {s: round(v, 2) for s, v in outcome.stage_seconds.items()},
            "step_inputs_s": round(cached.get("build_s", 0.0), 2), "cached_mib": round(cached.get("MiB", 0), 1),
            "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument("--k", nargs="+", type=int, default=[8, 64])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="3x32x32, fragments of 8")
    p.add_argument("--compare", action="store_true", help="also run each case on the Sequential-only path")
    p.add_argument("--out", type=Path, default=Path("bench-out/model_zoo.json"))
    p.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # the child: model size k timed device sequential_only
    args = p.parse_args()
    if args.one:
        name, size, k, timed, device, seq = args.one
        print(json.dumps(measure(name, int(size), int(k), timed == "1", device, seq == "1")))
        return
    sizes, ks = ([32], [8]) if args.quick else (args.sizes, args.k)
    rows = []
    for name, size, k, timed in plan(args.models, sizes, ks, args.device):
        for seq in ([True, False] if args.compare else [False]):
            print(f"  {name} {size}x{size} k={k}{' timed' if timed else ''}{' sequential-only' if seq else ''} ...",
                  file=sys.stderr, flush=True)
            child = subprocess.run([sys.executable, __file__, "--one", name, str(size), str(k), str(int(timed)),
                                    args.device, str(int(seq))], capture_output=True, text=True)
            if child.returncode or not child.stdout.strip():
                rows.append({"model": name, "input": [3, size, size], "k": k, "error": child.stderr.strip()[-300:]})
            else:
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"    {rows[-1]}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print("| model | input | k | parameters | moved by auto | step runs | steps | s / fragment | step inputs s | s / step "
          "| goal | cached MiB | peak RSS MiB | CUDA peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['input'][1]} | {r['k']} | error: {r['error']} |" + " |" * 10)
            continue
        goal = "timed steps" if r["timed"] else ("met" if r["goal_met"] else f"missed ({r['stopped_by']})")
        cuda = "-" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f}"
        print(f"| {r['model']} | {r['input'][1]} | {r['k']} | {r['parameters'] / 1e6:.1f} M | "
              f"{r['moved'] / 1e6:.2f} M ({', '.join(r['moved_modules'])}) | {r['path']} | {r['steps']} | "
              f"{r['seconds']:.1f} | {r['step_inputs_s']:.1f} | {r['seconds_per_step']:.3f} | {goal} | {r['cached_mib']:.0f} | "
              f"{r['rss_peak_mib']:.0f} | {cuda} |")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
