"""Forgetting that survives an attacker (issue 11): canaries, a retrained reference, three goals.

  python benchmarks/forgetting_attacks.py --quick                    # MNIST-5k, seed 0 (< 30 min, 2 cores)
  python benchmarks/forgetting_attacks.py                            # Fashion-MNIST ResNet, seeds 0-2
  python benchmarks/forgetting_attacks.py --methods head block all --settings single --seeds 0   # which params move

Per dataset: the reference model is trained WITH the benchmark's canaries planted
(`streamer.engine.canaries.BENCHMARK_CANARIES`: interclass confusion + random labels, repeated
4x per epoch); per seed, the forget set is every canary plus typical training instances drawn by
the seed (single-shot k=64: the canaries and 64 - C typical; continual 16x8: those 64 in the
first 8 fragments, then 64 more typical), and a retrained reference is trained identically
without all 128 (cached in --weights-dir). Every goal (misclassify, relabel to a random other
class, unseen) x method (which parameters move: auto, the daemon's default; head; the last
block + head; all; or the features with the head frozen; distillation always on) x setting is
unlearned from the same original, then measured per instance kind
(canary, typical, all): forget accuracy on the training labels, the canaries' true-class rate,
retain (2,000 of D_r) and test accuracy, and every attack of `streamer.engine.verification`
next to the retrained reference (held-out = 2,000 audit images; retained = 1,000 of D_r).
The time cap is off (max_seconds 1e9): only the step cap or the goal ends a fragment.
Writes one JSON record per (dataset, goal, method, setting, seed, kind), a table, and a PNG per
dataset (--out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from paper_tables import parse_set  # noqa: E402
from streamer.engine.canaries import BENCHMARK_CANARIES, Canaries, CanarySpec  # noqa: E402
from streamer.engine.data import load_splits  # noqa: E402
from streamer.engine.evaluate import accuracy, goal_ratio  # noqa: E402
from streamer.engine.train import reference_model, train_reference  # noqa: E402
from streamer.engine.unlearn import Fragment, Unlearner, method_config  # noqa: E402
from streamer.engine.unseen import UNSEEN  # noqa: E402
from streamer.engine.verification import attack_report  # noqa: E402

GOALS = ("misclassify", "relabel", "unseen")
METHODS = ("auto", "head", "block", "all", "features")  # auto: the daemon's default (fashion: block; mnist5k: head)
SETTINGS = ("single", "continual")  # single-shot k=64; continual 16 fragments of 8
K, K_CL, TOTAL = 64, 8, 128
FEATURES = {"fashion": ("stem.*", "layer*"), "mnist5k": ("0.*", "3.*")}  # every layer but the head


def trainable(method: str, dataset: str):
    """The `trainable` setting of a benchmark method: the engine's presets (block: the last
    block and the head, see `trainable.last_block_parameter_names`), or the features alone."""
    return FEATURES[dataset] if method == "features" else method


def forget_order(splits, canaries: Canaries, seed: int) -> torch.Tensor:
    """(128,) train indices in request order: the canaries and 64 - C typical instances shuffled
    together, then 64 more typical instances."""
    g = torch.Generator().manual_seed(1000 + seed)
    is_canary = torch.zeros(len(splits.train), dtype=torch.bool)
    is_canary[canaries.index] = True
    typical = torch.nonzero(~is_canary).flatten()
    typical = typical[torch.randperm(len(typical), generator=g)[: TOTAL - len(canaries)]]
    first = torch.cat([canaries.index, typical[: K - len(canaries)]])
    return torch.cat([first[torch.randperm(K, generator=g)], typical[K - len(canaries):]])


def load(dataset: str, path: Path):
    model = reference_model(dataset)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def run_unlearning(model, dataset, method, goal, setting, x, y, relabel, seed, overrides, buffer=None):
    """Unlearn in place (with the opt-in retain `buffer`, a Dataset, when given); (seconds per
    fragment, steps, every fragment reached its goal, stops, targets)."""
    cfg = method_config("default", seed=seed, trainable=trainable(method, dataset), max_seconds=1e9, **overrides)
    target = {"misclassify": torch.full_like(y, -1), "relabel": relabel, "unseen": torch.full_like(y, UNSEEN)}[goal]
    n, size = (K, K) if setting == "single" else (TOTAL, K_CL)
    unlearner = Unlearner(model, cfg, 10, buffer=buffer)
    seconds, steps, reached, stops, targets = [], 0, True, [], []
    for i in range(0, n, size):
        start = time.perf_counter()
        out = unlearner.unlearn(Fragment(x[i:i + size], y[i:i + size], target[i:i + size]))
        seconds.append(time.perf_counter() - start)
        steps += out.steps
        reached &= out.goal_reached
        stops.append(out.stopped_by)
        targets += out.targets
        print(f"    fragment {i // size + 1}/{n // size}: {out.stopped_by} after {out.steps} steps, "
              f"{seconds[-1]:.0f} s", flush=True)
    return seconds, steps, reached, stops, torch.tensor(targets)


def measure(model, ref, splits, x, y, true_y, kind_mask, targets, retained, held_out, seed, before) -> list[dict]:
    """One dict per kind: accuracies and attacks, model next to the retrained reference."""
    out = []
    test = accuracy(model, splits.audit.x, splits.audit.y)
    for kind, mask in kind_mask.items():
        if not bool(mask.any()):
            continue
        fx, fy, ft = x[mask], y[mask], true_y[mask]
        rec = dict(kind=kind, n=int(mask.sum()), forget_acc=accuracy(model, fx, fy),
                   forget_acc_ref=accuracy(ref, fx, fy), true_acc=accuracy(model, fx, ft),
                   true_acc_ref=accuracy(ref, fx, ft), goal_rate=goal_ratio(model, fx, fy, targets[mask]),
                   test_acc=test, test_before=before, test_drop=before - test,
                   retain_acc=accuracy(model, *retained))
        if kind != "all":
            report = attack_report(model, ref, fx, fy, *held_out, *retained, seed=seed)
            rec["attacks"] = report.to_json()
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MNIST-5k, seed 0")
    parser.add_argument("--datasets", nargs="+", default=["fashion"], choices=sorted(BENCHMARK_CANARIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--goals", nargs="+", default=list(GOALS), choices=GOALS)
    parser.add_argument("--methods", nargs="+", default=["auto"], choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--weights-dir", type=Path, default=Path("bench-out/weights"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/attacks"))
    parser.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                        help="print the table and the targets from result files of earlier runs (no run), "
                        "records of --methods only")
    parser.add_argument("--buffer", type=int, default=0, metavar="N",
                        help="the opt-in retain buffer: the first N images of the dataset's buffer split (held out "
                        "of training and of the audit set); recorded as method METHOD+bufferN")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="unlearning settings over the default's (numbers or words), e.g. margin=4")
    args = parser.parse_args(argv)
    args.set = parse_set(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        records = [r for path in args.render for r in json.loads(path.read_text()) if r["method"].split("+")[0] in args.methods]
        for dataset in sorted({r["dataset"] for r in records}):
            plot(records, dataset, args.out / f"attacks-{dataset}.png")
        print_table(records)
        print_means(records)
        print_targets(records)
        return 0
    if args.quick:
        args.datasets, args.seeds = ["mnist5k"], [0]
    records: list[dict] = []
    for dataset in args.datasets:
        records += run_dataset(dataset, args)
        name = f"attacks-{'quick' if args.quick else dataset}"
        (args.out / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n")
        plot(records, dataset, args.out / f"{name}.png")
    print_table(records)
    print_targets(records)
    return 0


def run_dataset(dataset: str, args) -> list[dict]:
    spec: CanarySpec = BENCHMARK_CANARIES[dataset]
    splits = load_splits(dataset)
    original_path = args.weights_dir / f"{dataset}-canaries.pt"
    report = train_reference(dataset, original_path, canaries=spec, cached=True)
    c = report["canaries"]
    canaries = Canaries(spec, torch.tensor(c["index"]), torch.tensor(c["true_y"]), torch.tensor(c["canary_y"]),
                        tuple(c["kind"]))
    train_y = splits.train.y.clone()
    train_y[canaries.index] = canaries.canary_y  # the labels the model was trained on
    print(f"{dataset}: original {original_path} (audit acc {report['audit_acc']:.4f}, canaries memorised "
          f"{report['canary_label_acc']:.3f})", flush=True)
    records = []
    for seed in args.seeds:
        index = forget_order(splits, canaries, seed)
        ref_path = args.weights_dir / f"{dataset}-canaries-without-seed{seed}.pt"
        ref_report = train_reference(dataset, ref_path, canaries=spec, exclude=index, cached=True)
        ref = load(dataset, ref_path)
        print(f"  seed {seed}: retrained reference {ref_path} (audit acc {ref_report['audit_acc']:.4f})", flush=True)
        g = torch.Generator().manual_seed(2000 + seed)
        x, y = splits.train.x[index], train_y[index]
        true_y = splits.train.y[index]
        relabel = (y + torch.randint(1, 10, (len(y),), generator=g)) % 10
        keep = torch.ones(len(splits.train), dtype=torch.bool)
        keep[index] = False
        d_r = torch.nonzero(keep).flatten()
        d_r = d_r[torch.randperm(len(d_r), generator=g)[:1000]]
        retained = (splits.train.x[d_r], train_y[d_r])
        audit = torch.randperm(len(splits.audit), generator=g)[:2000]
        held_out = (splits.audit.x[audit], splits.audit.y[audit])
        is_canary = torch.isin(index, canaries.index)
        before = accuracy(load(dataset, original_path), splits.audit.x, splits.audit.y)
        buffer = splits.buffer.subset(torch.arange(min(args.buffer, len(splits.buffer)))) if args.buffer else None
        for setting in args.settings:
            n = K if setting == "single" else TOTAL
            kinds = {"canary": is_canary[:n], "typical": ~is_canary[:n], "all": torch.ones(n, dtype=torch.bool)}
            for goal in args.goals:
                for method in args.methods:
                    print(f"  {dataset} seed {seed} {setting} {goal} {method}", flush=True)
                    model = load(dataset, original_path)
                    seconds, steps, reached, stops, targets = run_unlearning(
                        model, dataset, method, goal, setting, x[:n], y[:n], relabel[:n], seed, args.set, buffer)
                    label = f"{method}+buffer{args.buffer}" if buffer is not None else method
                    common = dict(dataset=dataset, goal=goal, method=label, setting=setting, k=n, seed=seed,
                                  overrides=args.set,
                                  seconds=round(sum(seconds), 1), seconds_per_fragment=round(sum(seconds) / len(seconds), 1),
                                  steps=steps, goal_reached_every_fragment=reached, stopped_by=stops)
                    for rec in measure(model, ref, splits, x[:n], y[:n], true_y[:n], kinds, targets, retained,
                                       held_out, seed, before):
                        records.append({**common, **rec})
                        print_row(records[-1])
    return records


_COLUMNS = ("forget", "true", "test drop", "probe", "probe pre-head", "relearn50", "MIA-eff", "loss AUC", "Streisand",
            "s/frag")


def _cells(rec: dict) -> list[str]:
    pair = lambda p: f"{p['model']:.2f} ({p['reference']:.2f})" if p["model"] is not None else "-"  # noqa: E731
    a = rec.get("attacks")
    cells = [f"{rec['forget_acc']:.2f} ({rec['forget_acc_ref']:.2f})", f"{rec['true_acc']:.2f} ({rec['true_acc_ref']:.2f})",
             f"{100 * rec['test_drop']:+.1f}"]
    if a:
        cells += [pair(a[k]) for k in ("probe_recovery", "probe_recovery_prehead")]
        cells += [pair(a["relearn"]["50"])] + [pair(a[k]) for k in ("mia_efficacy", "loss_auc", "streisand_auc")]
    else:
        cells += ["-"] * 6
    return cells + [str(rec["seconds_per_fragment"])]


def print_row(rec: dict) -> None:
    print("    " + " | ".join(f"{c}={v}" for c, v in zip(("kind",) + _COLUMNS, [rec["kind"], *_cells(rec)])), flush=True)


def print_table(records: list[dict]) -> None:
    print("\nmodel (retrained reference); test drop in points vs the original")
    print("| dataset | setting | goal | method | seed | kind | " + " | ".join(_COLUMNS) + " |")
    print("|" + "---|" * (6 + len(_COLUMNS)))
    for r in records:
        print(f"| {r['dataset']} | {r['setting']} | {r['goal']} | {r['method']} | {r['seed']} | {r['kind']} | "
              + " | ".join(_cells(r)) + " |")


def print_means(records: list[dict]) -> None:
    """One row per (dataset, setting, goal, method, kind): the mean over seeds of each column."""
    print("\nmean over seeds: model (retrained reference); test drop in points")
    print("| dataset | setting | goal | method | kind | seeds | " + " | ".join(_COLUMNS) + " |")
    print("|" + "---|" * (6 + len(_COLUMNS)))
    keys = sorted({(r["dataset"], r["setting"], r["goal"], r["method"], r["kind"]) for r in records if r["kind"] != "all"})
    for key in keys:
        group = [r for r in records if (r["dataset"], r["setting"], r["goal"], r["method"], r["kind"]) == key]
        mean = {k: _mean([g[k] for g in group]) for k in ("forget_acc", "forget_acc_ref", "true_acc", "true_acc_ref",
                                                           "test_drop", "seconds_per_fragment")}
        attacks = {}
        for name in ("probe_recovery", "probe_recovery_prehead", "mia_efficacy", "loss_auc", "streisand_auc"):
            attacks[name] = {side: _mean([g["attacks"][name][side] for g in group]) for side in ("model", "reference")}
        attacks["relearn"] = {"50": {side: _mean([g["attacks"]["relearn"]["50"][side] for g in group])
                                     for side in ("model", "reference")}}
        cells = _cells({**mean, "attacks": attacks, "seconds_per_fragment": round(mean["seconds_per_fragment"], 1)})
        print(f"| {' | '.join(key)} | {len(group)} | " + " | ".join(cells) + " |")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def print_targets(records: list[dict]) -> None:
    """Issue 11's targets, each as the mean over seeds (and the worst seed where it is a bound)."""
    print("\n| dataset | target | measured (mean over seeds; worst) | met |\n|---|---|---|---|")
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]

        def pick(goal=None, setting=None, kind="all"):
            return [r for r in rows if (goal is None or r["goal"] == goal) and (setting is None or r["setting"] == setting)
                    and r["kind"] == kind]

        def line(name, values, ok):
            if values:
                mean = sum(values) / len(values)
                print(f"| {dataset} | {name} | {mean:.3f}; {max(values):.3f} (n={len(values)}) | {'yes' if ok else 'NO'} |")

        for goal in ("misclassify", "relabel"):
            for setting, bound in (("single", 0.02), ("continual", 0.04)):
                got = pick(goal, setting)
                if got:
                    reached = all(r["goal_reached_every_fragment"] for r in got)
                    print(f"| {dataset} | {goal} {setting}: goal reached on every fragment | "
                          f"{sum(r['goal_reached_every_fragment'] for r in got)} of {len(got)} runs | {'yes' if reached else 'NO'} |")
                    drops = [r["test_drop"] for r in got]
                    line(f"{goal} {setting}: test drop <= {bound:.2f}", drops, max(drops) <= bound)
        canary = pick(kind="canary")
        for name, key, slack in (("relearn 50", ("relearn", "50"), 0.10), ("probe", ("probe_recovery",), 0.05),
                                 ("probe pre-head", ("probe_recovery_prehead",), 0.05)):
            for goal in GOALS:
                gaps = [_pair(r, *key)[0] - _pair(r, *key)[1] for r in canary if r["goal"] == goal and "attacks" in r]
                line(f"canaries, {goal}: {name} - reference <= {slack:.2f}", gaps, bool(gaps) and max(gaps) <= slack)
        for kind in ("canary", "typical"):
            got = pick("unseen", kind=kind)
            gaps = [abs(_pair(r, "mia_efficacy")[0] - _pair(r, "mia_efficacy")[1]) for r in got if "attacks" in r]
            line(f"unseen, {kind}: abs(MIA-efficacy - reference) <= 0.05", gaps, bool(gaps) and max(gaps) <= 0.05)
            auc = [_pair(r, "streisand_auc")[0] for r in got if "attacks" in r]
            line(f"unseen, {kind}: Streisand AUC <= 0.6 (reference: "
                 f"{sum(_pair(r, 'streisand_auc')[1] for r in got) / max(1, len(got)):.2f})", auc, bool(auc) and max(auc) <= 0.6)
        drops = [r["test_drop"] for r in pick("unseen")]
        line("unseen: test drop <= 0.01", drops, bool(drops) and max(drops) <= 0.01)
        gaps = [r["true_acc_ref"] - r["true_acc"] for r in pick("unseen", kind="canary")]
        line("unseen: canaries' true-class rate >= the reference's (reference - model)", gaps, bool(gaps) and max(gaps) <= 0)


def plot(records: list[dict], dataset: str, path: Path) -> None:
    """Canaries and typical instances, mean over seeds: each metric per goal x method x setting,
    the retrained reference as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("forget acc", lambda r: (r["forget_acc"], r["forget_acc_ref"])),
               ("true-class acc", lambda r: (r["true_acc"], r["true_acc_ref"])),
               ("probe", lambda r: _pair(r, "probe_recovery")),
               ("probe pre-head", lambda r: _pair(r, "probe_recovery_prehead")),
               ("relearn 50", lambda r: _pair(r, "relearn", "50")),
               ("MIA-efficacy", lambda r: _pair(r, "mia_efficacy")), ("Streisand AUC", lambda r: _pair(r, "streisand_auc"))]
    rows = [r for r in records if r["dataset"] == dataset and r["kind"] != "all"]
    configs = sorted({(r["setting"], r["goal"], r["method"]) for r in rows})
    fig, axes = plt.subplots(2, len(metrics), figsize=(3 * len(metrics), 6), squeeze=False)
    for row, kind in enumerate(("canary", "typical")):
        for col, (name, get) in enumerate(metrics):
            ax = axes[row][col]
            for i, conf in enumerate(configs):
                vals = [get(r) for r in rows if (r["setting"], r["goal"], r["method"]) == conf and r["kind"] == kind]
                vals = [v for v in vals if v[0] is not None]
                if not vals:
                    continue
                model_v = sum(v[0] for v in vals) / len(vals)
                ref_v = sum(v[1] for v in vals) / len(vals)
                ax.bar(i, model_v, color=f"C{GOALS.index(conf[1])}")
                ax.plot([i - 0.4, i + 0.4], [ref_v, ref_v], color="black")
            ax.set_title(f"{kind}: {name}", fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.set_xticks(range(len(configs)), ["/".join(c) for c in configs], rotation=90, fontsize=6)
    fig.suptitle(f"{dataset}: unlearned model (bars, colour = goal) vs retrained reference (black)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pair(rec: dict, *keys: str) -> tuple:
    value = rec.get("attacks")
    if value is None:
        return (None, None)
    for key in keys:
        value = value[key]
    return (value["model"], value["reference"])


if __name__ == "__main__":
    sys.exit(main())
