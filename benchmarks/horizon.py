"""Long-horizon continual unlearning: hundreds of requests in fragments of 8, next to retrained models.

  python benchmarks/horizon.py                  # full: MNIST-5k 400 requests x seeds 0-2, Fashion ResNet 1,000 x seed 0
  python benchmarks/horizon.py --quick          # MNIST-5k, seed 0, 400 requests: misclassify x 2 variants,
                                                #   unseen data-free
  python benchmarks/horizon.py --render bench-out/horizon/horizon-mnist5k.json bench-out/horizon/horizon-fashion.json
  python benchmarks/horizon.py --datasets mnist5k --seeds 0 --goals misclassify --variants data-free \\
      --requests 16 --every 8 --epochs 1        # smoke run (30 s on one core)

Per dataset and seed, the requests are `--requests` distinct training instances drawn by the seed
(MNIST-5k: 400 = 50 fragments of 8; Fashion: 1,000 = 125 fragments), unlearned one fragment at a
time by the product's default method (`method_config("default")`, its default goal settings, the
time cap off: only the goal or the step cap ends a fragment), for every goal (misclassify; relabel
to a random other class per instance, seeded; unseen) and variant (data-free; buffer: the
dataset's retain-buffer split as the Unlearner's `buffer`), each run from the same original.
Every `--every` requests (50; at the end of the fragment that reaches it: 56, 104, ...), at half
and at the end: test accuracy (the audit split), the goal rate over every instance forgotten so
far, mean steps and median seconds per fragment since the last report, the engine's retained
forgotten set and the process's resident memory (VmRSS).

References, each trained from scratch with the original's recipe (`streamer.engine.train`: the
dataset's epochs, batch, rate, training seed 0) and cached in --weights-dir by a hash of that
recipe (dataset, model, seed, epochs, the excluded indices, the relabelled (index, class) pairs):
(a) retrained without the requests so far, at 0 (the original itself), half and the end; (b) at the
end, the constrained retrain: every training instance, the forgotten ones labelled with the class
the unlearner sent them to (misclassify: the final model's prediction; relabel: the target;
unseen: the resolved class) -- the best any method can do for that goal. retrained - constrained
is what the goal costs, constrained - unlearned what the method costs.

Timing, measured in pieces on this project's 2-core machine (one thread, niced, another job beside
it; --quick and the full run were not run as a whole): a MNIST-5k reference trains in 56 s (96.7%
test); its first fragments of 8 take 3.7-7.4 s data-free (misclassify), 1.4-6.2 s for unseen (1.5 s
when the vote leaves every label as it is: no step), 3-5 s with the buffer at first (ENVIRONMENT.md,
a whole run: 50 fragments ~2 min data-free, ~10 min with the buffer, i.e. ~12 s a fragment);
a Fashion test pass (10,000 images) 6 s. Estimates: --quick ~20-25 min (6 references, 3 runs);
the full run ~4 h: MNIST-5k ~2 h (19 references of ~1 min, 18 runs), Fashion ~2 h (7 ResNet
references of ~6 min, 6 runs of 125 fragments, 10-20 min each). The relabel and unseen constrained
retrains are the same for both variants (same classes), so the cache trains them once. Add
relabel to a quick run with `--datasets mnist5k --seeds 0 --goals relabel --variants data-free`.
Writes horizon-{dataset|quick}.json (after every run) and a PNG beside it in --out; prints the
checkpoint table, the end table and the targets (computed from the runs) on stdout, progress on
stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import horizon_report as report  # noqa: E402
from streamer.engine.data import Dataset, Splits, load_splits  # noqa: E402
from streamer.engine.evaluate import accuracy, goal_ratio, predict  # noqa: E402
from streamer.engine.models import REFERENCE  # noqa: E402
from streamer.engine.train import _EPOCHS, _RECIPE, fit, reference_model  # noqa: E402
from streamer.engine.unlearn import Fragment, Unlearner, method_config  # noqa: E402
from streamer.engine.unseen import UNSEEN  # noqa: E402

REQUESTS = {"mnist5k": 400, "fashion": 1000}
SEEDS = {"mnist5k": [0, 1, 2], "fashion": [0]}
GOALS = ("misclassify", "relabel", "unseen")
VARIANTS = ("data-free", "buffer")
QUICK_RUNS = [("misclassify", "data-free"), ("misclassify", "buffer"), ("unseen", "data-free")]
K_CL, EVERY, TRAIN_SEED, NUM_CLASSES = 8, 50, 0, 10


def rss_mb() -> float | None:
    """The process's resident memory in MiB (VmRSS of /proc/self/status); None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def request_order(train_y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n distinct train indices in request order, a relabel target per request != its label), by the seed."""
    g = torch.Generator().manual_seed(3000 + seed)
    index = torch.randperm(len(train_y), generator=g)[:n]
    relabel = (train_y[index] + torch.randint(1, NUM_CLASSES, (n,), generator=g)) % NUM_CLASSES
    return index, relabel


def _digest(value) -> str:
    """16 hex digits of the SHA-256 of a JSON value."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def recipe(dataset: str, n_train: int, epochs: int, exclude: torch.Tensor, relabel: dict[int, int]) -> dict:
    """What a reference model is a function of: the original's training recipe, the size of the
    train split, the train indices left out and the (index, class) pairs trained on another label."""
    batch_size, lr, cosine = _RECIPE[dataset]
    return {"dataset": dataset, "n_train": n_train, "model": REFERENCE[dataset].__name__, "seed": TRAIN_SEED,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "cosine": cosine,
            "exclude": _digest(sorted(exclude.tolist())), "n_exclude": len(exclude),
            "relabel": _digest(sorted(relabel.items())), "n_relabel": len(relabel)}


def reference_data(train: Dataset, exclude: torch.Tensor, relabel: dict[int, int]) -> Dataset:
    """The train split without `exclude`, with `relabel`'s labels, in the split's order."""
    y = train.y.clone()
    for i, c in relabel.items():
        y[i] = c
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[exclude] = False
    return Dataset(train.x[keep], y[keep])


def reference(dataset: str, splits: Splits, args, exclude: torch.Tensor | None = None,
              relabel: dict[int, int] | None = None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, its report) trained from scratch by the original's recipe, or loaded
    from --weights-dir when a model of the same recipe is there. `relabel` pairs that keep the
    label change nothing and are dropped (an unseen run that left every label is the original)."""
    exclude = exclude if exclude is not None else torch.zeros(0, dtype=torch.int64)
    relabel = {i: c for i, c in (relabel or {}).items() if c != int(splits.train.y[i])}
    rec = recipe(dataset, len(splits.train), args.epochs or _EPOCHS[dataset], exclude, relabel)
    path = args.weights_dir / f"{dataset}-{_digest(rec)}.pt"
    sidecar = path.with_suffix(".json")
    model = reference_model(dataset)
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("recipe") == rec:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(args.device).eval(), json.loads(sidecar.read_text())
    _progress(f"  training {path.name} (excluded {len(exclude)}, relabelled {len(relabel)})")
    torch.manual_seed(TRAIN_SEED)
    model = reference_model(dataset).to(args.device)
    start = time.perf_counter()
    fit(model, reference_data(splits.train, exclude, relabel), rec["epochs"], seed=TRAIN_SEED, lr=rec["lr"],
        batch_size=rec["batch_size"], cosine=rec["cosine"])
    info = {"recipe": rec, "test_acc": accuracy(model, splits.audit.x, splits.audit.y),
            "seconds": round(time.perf_counter() - start, 1)}
    args.weights_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, partial)
    partial.replace(path)
    sidecar.write_text(json.dumps(info) + "\n")
    _progress(f"  trained {path.name}: test {info['test_acc']:.4f} in {info['seconds']} s")
    return model.eval(), info


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report_points(n: int, every: int) -> tuple[int, list[int]]:
    """(the half-way request count on a fragment boundary, the request counts reported: the first
    fragment boundary at or after each multiple of `every` (50 with fragments of 8: 56, 104, 152,
    200, ...), half and n)."""
    half = K_CL * (n // 2 // K_CL)  # Fashion's 1,000: 496
    due = {min(n, K_CL * -(-m // K_CL)) for m in range(every, n + 1, every)}
    return half, sorted(due | {half, n})


def goal_targets(goal: str, y: torch.Tensor, relabel: torch.Tensor) -> torch.Tensor:
    """Fragment.target per request: -1 misclassify, the relabel class, or UNSEEN."""
    return {"misclassify": torch.full_like(y, -1), "relabel": relabel, "unseen": torch.full_like(y, UNSEEN)}[goal]


def fragment_record(requests: int, outcome, seconds: float, unlearner: Unlearner) -> dict:
    """What one fragment cost: steps, wall seconds, how it stopped, the retained set and RSS after it."""
    return {"requests": requests, "steps": outcome.steps, "seconds": round(seconds, 3),
            "stopped_by": outcome.stopped_by, "goal_reached": outcome.goal_reached,
            "retained": 0 if unlearner.forgotten is None else len(unlearner.forgotten), "rss_mb": rss_mb()}


def checkpoint(model, splits: Splits, x, y, targets, fragments: list[dict], since: int) -> dict:
    """The unlearned model after `len(targets)` requests: test accuracy, goal rate over every
    request so far (`targets` resolved), and the fragments since request `since`."""
    window = [f for f in fragments if f["requests"] > since]
    n = len(targets)
    return {"requests": n, "test_acc": accuracy(model, splits.audit.x, splits.audit.y),
            "goal_rate": goal_ratio(model, x[:n], y[:n], targets),
            "steps_per_fragment": statistics.fmean(f["steps"] for f in window),
            "seconds_per_fragment": statistics.median(f["seconds"] for f in window),
            "retained": window[-1]["retained"], "rss_mb": window[-1]["rss_mb"]}


def unlearn_run(model, splits: Splits, x, y, target, seed: int, buffer, points: list[int], label: str):
    """Unlearn x in fragments of K_CL, in place. Returns (fragment records, checkpoint records,
    the resolved target per request)."""
    unlearner = Unlearner(model, method_config("default", seed=seed, max_seconds=1e9), NUM_CLASSES, buffer=buffer)
    fragments, checks, resolved = [], [], []
    for end in range(K_CL, len(y) + 1, K_CL):
        start = time.perf_counter()
        out = unlearner.unlearn(Fragment(x[end - K_CL:end], y[end - K_CL:end], target[end - K_CL:end]))
        resolved += out.targets
        fragments.append(fragment_record(end, out, time.perf_counter() - start, unlearner))
        _progress(f"    {label} {end}/{len(y)}: {out.stopped_by} after {out.steps} steps, "
                  f"{fragments[-1]['seconds']:.1f} s, RSS {fragments[-1]['rss_mb']} MiB")
        if end in points:
            since = checks[-1]["requests"] if checks else 0
            checks.append(checkpoint(model, splits, x, y, torch.tensor(resolved), fragments, since))
            _progress(f"    {label} {end}: test {checks[-1]['test_acc']:.4f}, goal rate {checks[-1]['goal_rate']:.3f}")
    return fragments, checks, torch.tensor(resolved)


def sent_to(goal: str, model, x: torch.Tensor, resolved: torch.Tensor) -> torch.Tensor:
    """The class the unlearner sent each request to: misclassify, the final model's prediction;
    relabel and unseen, the (resolved) target."""
    return predict(model, x) if goal == "misclassify" else resolved


def run_one(dataset: str, splits: Splits, seed: int, goal: str, variant: str, ctx: dict, args) -> dict:
    """One continual run from the original, its checkpoints next to the retrained references and,
    at the end, the constrained retrain."""
    index, relabel, half, points = ctx["index"], ctx["relabel"], ctx["half"], ctx["points"]
    x, y = splits.train.x[index], splits.train.y[index]
    model, _ = reference(dataset, splits, args)
    buffer = splits.buffer if variant == "buffer" else None
    first = {"requests": 0, "test_acc": ctx["before"], "goal_rate": None, "retained": 0, "rss_mb": rss_mb()}
    start = time.perf_counter()
    fragments, checks, resolved = unlearn_run(model, splits, x, y, goal_targets(goal, y, relabel), seed, buffer,
                                              points, f"{dataset} seed {seed} {goal} {variant}")
    seconds = time.perf_counter() - start
    checks = [first] + checks
    for c in checks:
        ref = ctx["retrained"].get(c["requests"])
        if ref is not None:
            n = c["requests"]
            c["retrained_test_acc"] = ctx["retrained_acc"][n]
            c["retrained_goal_rate"] = goal_ratio(ref, x[:n], y[:n], resolved[:n]) if n else None
    classes = sent_to(goal, model, x, resolved)
    constrained, info = reference(dataset, splits, args,
                                  relabel={int(i): int(c) for i, c in zip(index.tolist(), classes.tolist())})
    end = {"test_acc": checks[-1]["test_acc"], "retrained_test_acc": ctx["retrained_acc"][len(y)],
           "constrained_test_acc": info["test_acc"],
           "constrained_goal_rate": goal_ratio(constrained, x, y, resolved),
           "sent_to_own_label": float((classes == y).float().mean())}
    return {"dataset": dataset, "seed": seed, "goal": goal, "variant": variant, "requests": len(y), "k": K_CL,
            "epochs": args.epochs or _EPOCHS[dataset], "before": ctx["before"], "half": half,
            "unlearn_seconds": round(seconds, 1), "fragments": fragments, "checkpoints": checks, "end": end}


def seed_context(dataset: str, splits: Splits, seed: int, n: int, args) -> dict:
    """The seed's requests, report points, and the references retrained without the requests so
    far at 0 (the original), half and the end (trained here if not cached)."""
    index, relabel = request_order(splits.train.y, n, seed)
    half, points = report_points(n, args.every)
    retrained, acc = {}, {}
    for p in sorted({0, half, n}):
        retrained[p], info = reference(dataset, splits, args, exclude=index[:p])
        acc[p] = info["test_acc"]
    return {"index": index, "relabel": relabel, "half": half, "points": points, "retrained": retrained,
            "retrained_acc": acc, "before": acc[0]}


def run_dataset(dataset: str, args, runs: list[dict], out: Path) -> list[dict]:
    """Every seed x (goal, variant) of one dataset, appended to `runs`, which is written to `out`
    (JSON) after each run. Returns `runs`."""
    n = args.requests or REQUESTS[dataset]
    if n % K_CL:
        raise SystemExit(f"--requests must be a multiple of {K_CL}")
    splits = load_splits(dataset)
    for seed in args.seeds or SEEDS[dataset]:
        ctx = seed_context(dataset, splits, seed, n, args)
        for goal, variant in args.runs:
            _progress(f"{dataset} seed {seed}: {goal} {variant}, {n} requests")
            runs.append(run_one(dataset, splits, seed, goal, variant, ctx, args))
            report.print_progress_row(runs[-1])
            out.write_text(json.dumps({"meta": meta(args), "runs": runs}, indent=1) + "\n")
    return runs


def meta(args) -> dict:
    """What ran it: the command line, torch, the device and its threads."""
    return {"command": " ".join([Path(sys.argv[0]).name] + args.argv), "torch": torch.__version__,
            "device": args.device, "threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None):
    """The options; `args.runs`: the (goal, variant) pairs to run (--quick: QUICK_RUNS)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="MNIST-5k, seed 0: " + ", ".join(" ".join(r) for r in QUICK_RUNS))
    p.add_argument("--datasets", nargs="+", default=list(REQUESTS), choices=list(REQUESTS))
    p.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 on mnist5k, 0 on fashion")
    p.add_argument("--goals", nargs="+", default=list(GOALS), choices=GOALS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--requests", type=int, help=f"requests per run (a multiple of {K_CL}); default {REQUESTS}")
    p.add_argument("--every", type=int, default=EVERY, help="report every N requests (and at half and the end)")
    p.add_argument("--epochs", type=int, help="reference training epochs (default: the dataset's recipe; smoke runs)")
    p.add_argument("--weights-dir", type=Path, default=Path("artifacts/horizon"))
    p.add_argument("--out", type=Path, default=Path("bench-out/horizon"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                   help="run nothing: print the tables and targets of these result files and plot them into --out "
                        "(a later file's run replaces an earlier one with the same dataset, seed, goal, variant)")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.runs = [(g, v) for g in args.goals for v in args.variants]
    if args.quick:
        args.datasets, args.seeds, args.runs = ["mnist5k"], [0], QUICK_RUNS
    return args


def main(argv: list[str] | None = None) -> int:
    """Run (or --render) and print the tables and targets; 0 on success."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        return report.render(args.render, args.out)
    runs: list[dict] = []
    for dataset in args.datasets:
        out = args.out / f"horizon-{'quick' if args.quick else dataset}.json"
        dataset_runs = run_dataset(dataset, args, [], out)
        report.plot(dataset_runs, out.with_suffix(".png"))
        runs += dataset_runs
    report.print_all(runs)
    return 0


if __name__ == "__main__":
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # training logs with the progress
    sys.exit(main())
