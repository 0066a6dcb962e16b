"""The paper's Tables 2, 3 and 5, reproduced on real offline data (digits, MNIST-5k).

  python benchmarks/paper_tables.py --json bench-out/full.json            # full: 3 seeds, both datasets
  python benchmarks/paper_tables.py --quick --json bench-out/quick.json   # 1 seed, mnist5k, k=64 + continual

Prints markdown tables (mean +- std over seeds), writes one JSON record per
(table, dataset, method, k, seed) and a PNG per dataset of forget vs test accuracy.
Accuracies are fractions in [0, 1]. Forget sets are drawn at random from the train split.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from streamer.engine.data import Dataset, Splits, load_splits
from streamer.engine.evaluate import accuracy, goal_ratio
from streamer.engine.models import Normalized
from streamer.engine.train import _EPOCHS, fit, reference_model, train_reference
from streamer.engine.unlearn import Fragment, Unlearner, method_config

KS = (8, 32, 64, 128)
CONTINUAL_KS = (8, 16, 64, 128)
K_CL = 8
SINGLE_METHODS = ("before", "neggrad", "adv", "adv+imp", "default", "default+buffer", "oracle", "flip-retrain")
RELABEL_METHODS = ("before", "correct", "adv", "adv+imp", "default", "default+buffer", "oracle", "flip-retrain")
CONTINUAL_METHODS = ("before", "neggrad", "adv", "adv+imp", "default", "default+buffer")
QUICK_METHODS = ("before", "neggrad", "default", "default+buffer")


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: a (table, dataset, seed, method) at one k, or a whole
    continual run (k = 128, records at every CONTINUAL_KS)."""

    table: str
    dataset: str
    seed: int
    method: str
    k: int


def parse_set(items: list[str]) -> dict:
    """`--set KEY=VALUE ...` UnlearnConfig overrides: each value read as JSON (numbers, true/false),
    else kept as the word it is (e.g. distill_warp=shift)."""
    def value(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return {k: value(v) for k, v in (item.split("=", 1) for item in items)}


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


_CACHE: dict = {}


def _setup(dataset: str, weights_dir: Path, device: torch.device) -> tuple[Splits, dict]:
    if dataset not in _CACHE:
        path = weights_dir / f"{dataset}.pt"
        if not path.exists():
            train_reference(dataset, path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        _CACHE[dataset] = (load_splits(dataset), state)
    return _CACHE[dataset]


def _model(dataset: str, state: dict, device) -> Normalized:
    model = reference_model(dataset)
    model.load_state_dict(state)
    return model.to(device).eval()


def _forget_order(splits: Splits, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(128 train indices to forget, in request order; relabel targets != label)."""
    g = torch.Generator().manual_seed(1000 + seed)
    index = torch.randperm(len(splits.train), generator=g)[: max(KS)]
    y = splits.train.y[index]
    targets = (y + torch.randint(1, 10, (len(y),), generator=g)) % 10
    return index, targets


def _method(method: str, seed: int, d_r: Dataset, buffer: Dataset, overrides: dict):
    """(UnlearnConfig, buffer to pass) for a benchmark method name; `overrides` go to the
    default's settings (benchmarks/ablation.py switches its parts back one at a time)."""
    if method == "default+buffer":
        return method_config("default", seed=seed, **overrides), buffer
    if method == "oracle":  # fine-tunes with the retained training data D_r (settings: best of 3 tried on digits)
        return method_config("default", seed=seed, n_adv=0, distill_weight=0.0, lr=1e-4, buffer_batch=256,
                             buffer_weight=3.0, update="all"), d_r
    return method_config(method, seed=seed, **(overrides if method == "default" else {})), None


def _record(unit: Unit, k: int, model, splits: Splits, index, fragment: Fragment, steps, seconds, goal) -> dict:
    keep = torch.ones(len(splits.train), dtype=torch.bool)
    keep[index[:k]] = False
    forget_x, forget_y = splits.train.x[index[:k]], splits.train.y[index[:k]]
    rec = dict(table=unit.table, dataset=unit.dataset, method=unit.method, k=k, seed=unit.seed,
               forget_acc=accuracy(model, forget_x, forget_y),
               retain_acc=accuracy(model, splits.train.x[keep], splits.train.y[keep]),
               test_acc=accuracy(model, splits.audit.x, splits.audit.y),
               steps=steps, seconds=round(seconds, 2), goal_reached=bool(goal))
    if unit.table == "relabel":
        rec["relabel_acc"] = goal_ratio(model, fragment.x, fragment.y, fragment.target)
    return rec


def run_unit(unit: Unit, weights_dir: Path, device_name: str, overrides: dict | None = None) -> list[dict]:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    device = _device(device_name)
    splits, state = _setup(unit.dataset, weights_dir, device)
    index, targets = _forget_order(splits, unit.seed)
    model = _model(unit.dataset, state, device)
    keep = torch.ones(len(splits.train), dtype=torch.bool)
    keep[index[: unit.k]] = False
    d_r = Dataset(splits.train.x[keep], splits.train.y[keep])
    target = targets if unit.table == "relabel" else torch.full_like(targets, -1)
    x, y = splits.train.x[index], splits.train.y[index]
    start = time.perf_counter()

    if unit.method == "before":
        ks = CONTINUAL_KS if unit.table == "continual" else (unit.k,)
        return [_record(unit, k, model, splits, index, Fragment(x[:k], y[:k], target[:k]), 0, 0.0,
                        goal_ratio(model, x[:k], y[:k], target[:k]) == 1.0) for k in ks]
    if unit.method == "flip-retrain":  # retrain from scratch, forget labels flipped (needs all data)
        flipped = splits.train.y.clone()
        if unit.table == "relabel":
            flipped[index[: unit.k]] = targets[: unit.k]
        else:
            with torch.no_grad():
                logits = model(x[: unit.k].to(device)).cpu()
            flipped[index[: unit.k]] = logits.scatter(1, y[: unit.k, None], float("-inf")).argmax(1)
        torch.manual_seed(unit.seed)
        model = reference_model(unit.dataset).to(device)
        fit(model, Dataset(splits.train.x, flipped), _EPOCHS[unit.dataset], seed=unit.seed)
        frag = Fragment(x[: unit.k], y[: unit.k], target[: unit.k])
        steps = _EPOCHS[unit.dataset] * -(-len(flipped) // 64)
        return [_record(unit, unit.k, model, splits, index, frag, steps, time.perf_counter() - start,
                        goal_ratio(model, frag.x, frag.y, frag.target) == 1.0)]

    cfg, buffer = _method(unit.method, unit.seed, d_r, splits.buffer, overrides or {})
    unlearner = Unlearner(model, cfg, 10, buffer=buffer)
    if unit.table != "continual":
        frag = Fragment(x[: unit.k], y[: unit.k], target[: unit.k])
        outcome = unlearner.unlearn(frag)
        return [_record(unit, unit.k, model, splits, index, frag, outcome.steps, time.perf_counter() - start,
                        outcome.goal_reached)]
    records, steps = [], 0
    for end in range(K_CL, max(CONTINUAL_KS) + 1, K_CL):
        frag = Fragment(x[end - K_CL : end], y[end - K_CL : end], target[end - K_CL : end])
        outcome = unlearner.unlearn(frag)
        steps += outcome.steps
        if end in CONTINUAL_KS:
            # the goal over the whole forgotten set, not only the last fragment
            whole = Fragment(x[:end], y[:end], target[:end])
            records.append(_record(unit, end, model, splits, index, whole, steps, time.perf_counter() - start,
                                   goal_ratio(model, whole.x, whole.y, whole.target) == 1.0))
        print(f"  {unit.dataset} seed {unit.seed} {unit.method} continual k={end}: {outcome.stopped_by} "
              f"after {outcome.steps} steps", file=sys.stderr, flush=True)
    return records


def plan(quick: bool, datasets: list[str], seeds: list[int]) -> list[Unit]:
    if quick:
        units = [Unit("continual", "mnist5k", seeds[0], m, 128) for m in QUICK_METHODS]  # long units first
        return units + [Unit("single", "mnist5k", seeds[0], m, 64) for m in QUICK_METHODS]
    units = []
    for ds in datasets:
        for seed in seeds:
            units += [Unit("continual", ds, seed, m, 128) for m in CONTINUAL_METHODS]
            units += [Unit("single", ds, seed, m, k) for m in SINGLE_METHODS for k in KS]
            units += [Unit("relabel", ds, seed, m, k) for m in RELABEL_METHODS for k in KS]
    # the methods that matter most first (a time-boxed run keeps them), long units first within them
    first = ("default", "before", "neggrad", "correct", "default+buffer")
    return sorted(units, key=lambda u: (u.dataset != "mnist5k", u.method not in first, u.table != "continual", -u.k))


def _mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{statistics.stdev(values):.{digits}f}"


def markdown(records: list[dict]) -> str:
    lines = []
    order = {"single": 0, "relabel": 1, "continual": 2}
    titles = {"single": "Table 2 analogue: misclassify, single-shot", "relabel": "Table 3 analogue: relabel, single-shot",
              "continual": f"Table 5 analogue: continual, k_CL={K_CL} (forget = whole forgotten set)"}
    groups = sorted({(r["table"], r["dataset"]) for r in records}, key=lambda g: (order[g[0]], g[1]))
    for table, ds in groups:
        rows = [r for r in records if r["table"] == table and r["dataset"] == ds]
        extra = " | relabel" if table == "relabel" else ""
        lines += [f"### {titles[table]} — {ds}", "",
                  f"| method | k | forget | retain (D_r) | test{extra} | steps | seconds | goal reached |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
        methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: _method_rank(r["method"]))))
        for m in methods:
            for k in sorted({r["k"] for r in rows if r["method"] == m}):
                cell = [r for r in rows if r["method"] == m and r["k"] == k]
                col = lambda f, digits=3: _mean_std([c[f] for c in cell], digits)
                rel = f" | {col('relabel_acc')}" if extra else ""
                goals = sum(c["goal_reached"] for c in cell)
                lines.append(f"| {m} | {k} | {col('forget_acc')} | {col('retain_acc')} | {col('test_acc')}{rel} | "
                             f"{col('steps', 0)} | {col('seconds', 1)} | {goals}/{len(cell)} |")
        lines.append("")
    return "\n".join(lines)


def _method_rank(method: str) -> int:
    names = ("before", "neggrad", "correct", "adv", "adv+imp", "default", "default+buffer", "oracle", "flip-retrain")
    return names.index(method)


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[demo]')", file=sys.stderr)
        return []
    paths = []
    for ds in sorted({r["dataset"] for r in records}):
        tables = [t for t in ("single", "relabel", "continual") if any(r["table"] == t and r["dataset"] == ds for r in records)]
        fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
        for ax, table in zip(axes[0], tables):
            rows = [r for r in records if r["table"] == table and r["dataset"] == ds]
            for m in sorted({r["method"] for r in rows}, key=_method_rank):
                pts = {}
                for r in rows:
                    if r["method"] == m:
                        pts.setdefault(r["k"], []).append((r["forget_acc"], r["test_acc"]))
                ks = sorted(pts)
                fx = [statistics.fmean(p[0] for p in pts[k]) for k in ks]
                ty = [statistics.fmean(p[1] for p in pts[k]) for k in ks]
                ax.plot(fx, ty, marker="o", label=m)
                for k, a, b in zip(ks, fx, ty):
                    ax.annotate(str(k), (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set(title=f"{ds}: {table}", xlabel="forget accuracy (lower is better)", ylabel="test accuracy",
                   xlim=(-0.05, 1.05), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"tradeoff_{ds}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def render(paths: list[Path], plot_dir: Path) -> int:
    merged: dict[tuple, dict] = {}
    for path in paths:
        data = json.loads(path.read_text()) if path.suffix == ".json" else None
        rows = data["records"] if data else [json.loads(line) for line in path.read_text().splitlines() if line]
        for r in rows:
            merged[(r["table"], r["dataset"], r["method"], r["k"], r["seed"])] = r
    print(markdown(list(merged.values())))
    plot_dir.mkdir(parents=True, exist_ok=True)
    for path in plot(list(merged.values()), plot_dir):
        print(f"plot: {path}")
    return 0


def _worker(args):
    unit, weights_dir, device = args
    return unit, run_unit(unit, weights_dir, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, mnist5k, single k=64 + continual, 4 methods")
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=Path("bench-out/paper_tables.json"))
    p.add_argument("--plot-dir", type=Path, help="where the PNGs go (default: beside --json)")
    p.add_argument("--weights-dir", type=Path, default=Path("artifacts"), help="reference models (trained if missing)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (each takes BENCH_THREADS threads)")
    p.add_argument("--only", nargs="+", metavar="TABLE:METHOD:K", help="run only these units, e.g. single:default:8")
    p.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                   help="run nothing: print the tables and plots of these result files; a record in a later "
                        "file replaces one with the same (table, dataset, method, k, seed) in an earlier file")
    args = p.parse_args(argv)
    if args.render:
        return render(args.render, args.plot_dir or args.json.parent)
    units = plan(args.quick, args.datasets, args.seeds)
    if args.only:
        units = [u for u in units if f"{u.table}:{u.method}:{u.k}" in args.only]
    for ds in {u.dataset for u in units}:  # train missing reference models once, before forking
        _setup(ds, args.weights_dir, _device(args.device))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_suffix(".partial.jsonl")
    records: list[dict] = []
    start = time.perf_counter()
    jobs = [(u, args.weights_dir, args.device) for u in units]
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    results = pool.imap_unordered(_worker, jobs) if pool else map(_worker, jobs)
    with open(partial, "w") as fh:
        for done, (unit, recs) in enumerate(results, 1):
            records += recs
            for r in recs:
                fh.write(json.dumps(r) + "\n")
            fh.flush()
            last = recs[-1]
            print(f"[{done}/{len(units)} {time.perf_counter() - start:6.0f}s] {unit.table} {unit.dataset} seed {unit.seed} "
                  f"{unit.method} k={last['k']}: forget {last['forget_acc']:.3f} test {last['test_acc']:.3f} "
                  f"steps {last['steps']} {last['seconds']}s", flush=True)
    if pool:
        pool.close()
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                machine=f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, device "
                        f"{torch.cuda.get_device_name(0) if _device(args.device).type == 'cuda' else 'cpu'}",
                wall_seconds=round(time.perf_counter() - start, 1))
    args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    partial.unlink()
    print(f"\n<!-- {meta['command']} | {meta['machine']} | {meta['wall_seconds']} s -->\n")
    print(markdown(records))
    for path in plot(records, args.plot_dir or args.json.parent):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
