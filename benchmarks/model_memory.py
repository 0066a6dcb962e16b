"""What unlearning one fragment needs in memory, by model size and input size (README "Your model in").

  python benchmarks/model_memory.py                    # every model below, CPU (and CUDA when present)
  python benchmarks/model_memory.py --models resnet18-32 --device cuda

Each model runs in a fresh subprocess: build it (random weights: memory does not depend on their
values), unlearn one fragment of k_CL = 8 random images with the product's default method, and
report the peak resident memory of the process (getrusage ru_maxrss, MiB) after loading and over
the fragment, and on CUDA the peak allocated by torch (torch.cuda.max_memory_allocated). Only the
numbers of steps are cut (pgd_steps 1, max_steps 2): a step's tensors have the same shapes however
many steps run, so the peaks are those of a full fragment (n_adv = 10 adversarial examples per
instance, the default batches), and a ViT-B at 224 x 224 finishes in minutes on 2 CPU cores.
A child whose resident memory passes --rss-cap-gib (default 16: this machine has 23 GiB) is killed
and recorded as over the cap. Prints a table, writes JSON (--out; rows of models not run this time
are kept from an earlier --out).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name: (builder, input shape)
    "reference-mnist5k": ("reference:mnist5k", (1, 28, 28)),
    "resnet18-32": ("torchvision:resnet18", (3, 32, 32)),
    "resnet18-224": ("torchvision:resnet18", (3, 224, 224)),
    "resnet50-224": ("torchvision:resnet50", (3, 224, 224)),
    "vit_b_16-224": ("torchvision:vit_b_16", (3, 224, 224)),
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(name: str, device: str) -> dict:
    """In this (fresh) process: the peaks for one model."""
    import torch
    import torchvision

    from streamer.engine import Fragment, Unlearner, method_config
    from streamer.engine.train import reference_model

    torch.manual_seed(0)
    imports = _peak_mib()  # python, torch (and its CUDA libraries), torchvision, streamer
    source, shape = MODELS[name]
    kind, arch = source.split(":")
    model = reference_model(arch) if kind == "reference" else getattr(torchvision.models, arch)(num_classes=10)
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    loaded = _peak_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = torch.rand(8, *shape, device=device)
    with torch.no_grad():  # labelled as the model predicts them: the misclassify goal is unmet at the start
        labels = model(x).argmax(1)
    fragment = Fragment(x, labels, torch.full((8,), -1, device=device))
    cfg = method_config("default", pgd_steps=1, max_steps=2, max_seconds=1e9)
    start = time.perf_counter()
    outcome = Unlearner(model, cfg, 10).unlearn(fragment)
    return {"model": name, "parameters": params, "input": list(shape), "device": device,
            "rss_imports_mib": round(imports, 1), "rss_loaded_mib": round(loaded, 1), "rss_peak_mib": round(_peak_mib(), 1),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
            "steps": outcome.steps, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}


def _child(command: list[str], cap_gib: float) -> tuple[str, str, bool]:
    """Run `command`, killing it once its VmRSS passes cap_gib; (stdout, stderr, killed for memory)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child, over = subprocess.Popen(command, stdout=out, stderr=err, text=True), False
        while child.poll() is None:
            try:
                rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                               if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                rss_kib = 0
            if rss_kib > cap_gib * 2**20:
                child.kill()
                over = True
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", nargs="+", default=None, help="default: cpu, and cuda when available")
    p.add_argument("--out", type=Path, default=Path("bench-out/model_memory.json"))
    p.add_argument("--rss-cap-gib", type=float, default=16.0, help="kill a child whose resident memory passes this")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "DEVICE"), help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    import torch

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        for name in args.models:
            print(f"  {name} on {device} ...", file=sys.stderr, flush=True)
            out, err, over = _child([sys.executable, __file__, "--one", name, device], args.rss_cap_gib)
            if over or not out.strip():
                print(err[-2000:], file=sys.stderr)
                why = f"resident memory over {args.rss_cap_gib:g} GiB: killed" if over else err.strip().splitlines()[-1:]
                rows.append({"model": name, "device": device, "error": why})
                continue
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"    {rows[-1]}", file=sys.stderr, flush=True)
    if args.out.exists():  # earlier rows of the models and devices not run now
        ran = {(r["model"], r["device"]) for r in rows}
        rows = [r for r in json.loads(args.out.read_text())["rows"] if (r["model"], r["device"]) not in ran] + rows
        rows.sort(key=lambda r: (r["device"], list(MODELS).index(r["model"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print("| model | parameters | input | device | resident: libraries, MiB | + the model | peak over a fragment of 8 "
          "| the fragment adds | CUDA peak allocated, MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | | | {r['device']} | error: {r['error']} | | | | |")
            continue
        cuda = "-" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f}"
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {'x'.join(map(str, r['input']))} | {r['device']} | "
              f"{r['rss_imports_mib']:.0f} | {r['rss_loaded_mib']:.0f} | {r['rss_peak_mib']:.0f} | "
              f"{r['rss_peak_mib'] - r['rss_loaded_mib']:.0f} | {cuda} |")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
