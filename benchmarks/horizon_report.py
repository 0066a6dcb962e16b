"""Tables, targets and plots of benchmarks/horizon.py's runs (from a run, or --render of its JSON).

Every number here is computed from the run records; the bounds are the issue's targets."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# test drop bounds in points at the end of the run, misclassify and relabel (unseen: UNSEEN_BOUND)
DROP_BOUNDS = {"mnist5k": {"data-free": 10.0, "buffer": 4.0}, "fashion": {"data-free": 10.0, "buffer": 3.0}}
UNSEEN_BOUND = 1.0
SLOWDOWN_BOUND = 1.5  # median s/fragment, last 10 fragments / first 10
WINDOW = 10
_COLOURS = ("data-free", "buffer")  # C0, C1 in the plots


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.fmean(values) if values else None


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by (dataset, goal, variant), in a stable order."""
    out: dict[tuple, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["dataset"], r["goal"], r["variant"], r["seed"])):
        out.setdefault((r["dataset"], r["goal"], r["variant"]), []).append(r)
    return out


def drop_points(run: dict) -> float:
    """Test accuracy lost by the end of the run, in points, against the original."""
    return 100 * (run["before"] - run["end"]["test_acc"])


def slowdown(run: dict) -> tuple[float, float, float]:
    """(median seconds per fragment over the first WINDOW fragments, over the last WINDOW, last / first);
    shorter runs compare their first and last halves."""
    seconds = [f["seconds"] for f in run["fragments"]]
    w = min(WINDOW, max(1, len(seconds) // 2))
    first, last = statistics.median(seconds[:w]), statistics.median(seconds[-w:])
    return first, last, last / first if first > 0 else float("inf")


def print_progress_row(run: dict) -> None:
    """One line per finished run, on stderr."""
    first, last, ratio = slowdown(run)
    end = run["end"]
    print(f"  done {run['dataset']} seed {run['seed']} {run['goal']} {run['variant']}: test {end['test_acc']:.4f} "
          f"(drop {drop_points(run):+.1f}), retrained {end['retrained_test_acc']:.4f}, constrained "
          f"{end['constrained_test_acc']:.4f}, s/frag {first:.1f} -> {last:.1f}", file=sys.stderr, flush=True)


def print_checkpoints(runs: list[dict]) -> None:
    """Every report point, mean over seeds (goal rate: the lowest seed)."""
    print("\nper report point, mean over seeds; test drop in points vs the original; goal rate over every request "
          "so far (lowest seed); retrained = trained without the requests so far")
    cols = ("requests", "test", "drop", "retrained test", "goal rate", "retrained goal rate", "steps/frag", "s/frag",
            "retained", "RSS MiB")
    print("| dataset | goal | variant | seeds | " + " | ".join(cols) + " |\n|" + "---|" * (4 + len(cols)))
    for (dataset, goal, variant), group in _groups(runs).items():
        for i, point in enumerate(group[0]["checkpoints"]):
            rows = [r["checkpoints"][i] for r in group if len(r["checkpoints"]) > i]
            get = lambda key: _mean(c.get(key) for c in rows)  # noqa: E731
            rates = [c["goal_rate"] for c in rows if c.get("goal_rate") is not None]
            drop = _mean(100 * (r["before"] - c["test_acc"]) for r, c in zip(group, rows))
            cells = [str(point["requests"]), _fmt(get("test_acc"), ".4f"), _fmt(drop, "+.1f"),
                     _fmt(get("retrained_test_acc"), ".4f"), _fmt(min(rates) if rates else None),
                     _fmt(get("retrained_goal_rate")), _fmt(get("steps_per_fragment"), ".0f"),
                     _fmt(get("seconds_per_fragment"), ".2f"), _fmt(get("retained"), ".0f"), _fmt(get("rss_mb"), ".0f")]
            print(f"| {dataset} | {goal} | {variant} | {len(rows)} | " + " | ".join(cells) + " |")


def print_end(runs: list[dict]) -> None:
    """The end of each run next to the retrained and the constrained references, mean over seeds."""
    print("\nat the end, mean over seeds: goal cost = retrained - constrained, method cost = constrained - unlearned "
          "(points of test accuracy); constrained = every instance, the forgotten ones labelled with the class the "
          "unlearner sent them to")
    cols = ("requests", "before", "unlearned", "retrained", "constrained", "drop", "goal cost", "method cost",
            "constrained goal rate", "sent to own label", "s/frag first 10", "s/frag last 10")
    print("| dataset | goal | variant | seeds | " + " | ".join(cols) + " |\n|" + "---|" * (4 + len(cols)))
    for (dataset, goal, variant), group in _groups(runs).items():
        end = lambda key: _mean(r["end"][key] for r in group)  # noqa: E731
        speed = [slowdown(r) for r in group]
        cells = [str(group[0]["requests"]), _fmt(_mean(r["before"] for r in group), ".4f"),
                 _fmt(end("test_acc"), ".4f"),
                 _fmt(end("retrained_test_acc"), ".4f"), _fmt(end("constrained_test_acc"), ".4f"),
                 _fmt(_mean(drop_points(r) for r in group), "+.1f"),
                 _fmt(100 * (end("retrained_test_acc") - end("constrained_test_acc")), "+.1f"),
                 _fmt(100 * (end("constrained_test_acc") - end("test_acc")), "+.1f"),
                 _fmt(end("constrained_goal_rate")), _fmt(end("sent_to_own_label")),
                 _fmt(_mean(s[0] for s in speed), ".2f"), _fmt(_mean(s[1] for s in speed), ".2f")]
        print(f"| {dataset} | {goal} | {variant} | {len(group)} | " + " | ".join(cells) + " |")


def _worst(values: list[float]) -> str:
    return f"mean {statistics.fmean(values):.2f}; worst {max(values):.2f} (n={len(values)})"


def dataset_targets(dataset: str, runs: list[dict]) -> list[tuple[str, str, str, bool]]:
    """(dataset, target, measured, met) for one dataset's runs."""
    out = []
    short = [sum(not f["goal_reached"] for f in r["fragments"]) for r in runs]
    out.append((dataset, "every fragment reaches its goal",
                f"{short.count(0)} of {len(runs)} runs; {sum(short)} fragments short", not any(short)))
    rates = [c["goal_rate"] for r in runs for c in r["checkpoints"] if c.get("goal_rate") is not None]
    out.append((dataset, "forgotten-set goal rate 1.000 at every report",
                f"lowest {min(rates):.3f} over {len(rates)} reports" if rates else "no report",
                bool(rates) and min(rates) == 1.0))
    for (_, goal, variant), group in _groups(runs).items():
        bound = UNSEEN_BOUND if goal == "unseen" else DROP_BOUNDS[dataset][variant]
        drops = [drop_points(r) for r in group]
        ends = sorted({r["requests"] for r in group})
        out.append((dataset, f"{goal} {variant}: test drop at {'/'.join(map(str, ends))} requests <= {bound:g} points",
                    _worst(drops), max(drops) <= bound))
    for variant in sorted({r["variant"] for r in runs}):
        group = [r for r in runs if r["variant"] == variant]
        w = min(WINDOW, max(1, min(len(r["fragments"]) for r in group) // 2))  # as `slowdown` compares them
        ratios = [slowdown(r)[2] for r in group]
        out.append((dataset, f"{variant}: median s/fragment, last {w} / first {w} <= {SLOWDOWN_BOUND:g}",
                    _worst(ratios), max(ratios) <= SLOWDOWN_BOUND))
    out.append(memory_target(dataset, runs))
    return out


MEMORY_BOUND = 1.2  # resident memory at the end / after the fragment that reached 100 requests


def memory_target(dataset: str, runs: list[dict]) -> tuple[str, str, str, bool]:
    """Resident memory flat: per run, VmRSS after its last fragment over VmRSS after the fragment that
    reached 100 requests (the first one in a shorter run), <= MEMORY_BOUND; measured at engine level
    here (the daemon's own run: benchmarks/RESULTS.md)."""
    ratios = []
    for run in runs:
        rss = [(f["requests"], f["rss_mb"]) for f in run["fragments"] if f.get("rss_mb")]
        if not rss:
            return dataset, "resident memory (VmRSS) flat", "missing", False
        start = next((v for n, v in rss if n >= 100), rss[0][1])
        ratios.append(rss[-1][1] / start)
    return (dataset, f"resident memory, end / after 100 requests <= {MEMORY_BOUND:g}", _worst(ratios),
            max(ratios) <= MEMORY_BOUND)


def targets(runs: list[dict]) -> list[tuple[str, str, str, bool]]:
    """(dataset, target, measured, met) for every dataset of the runs."""
    return [t for dataset in sorted({r["dataset"] for r in runs})
            for t in dataset_targets(dataset, [r for r in runs if r["dataset"] == dataset])]


def print_targets(runs: list[dict]) -> None:
    """The targets table: each measured from the runs, met or not."""
    print("\n| dataset | target | measured | met |\n|---|---|---|---|")
    for dataset, name, measured, ok in targets(runs):
        print(f"| {dataset} | {name} | {measured} | {'yes' if ok else 'NO'} |")


def print_all(runs: list[dict]) -> None:
    """The report-point table, the end table and the targets."""
    print_checkpoints(runs)
    print_end(runs)
    print_targets(runs)


def _series(group: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(requests, mean over seeds of checkpoint `key`) where every seed has it."""
    points = [c["requests"] for c in group[0]["checkpoints"]]
    xs, ys = [], []
    for i, n in enumerate(points):
        value = _mean(r["checkpoints"][i].get(key) for r in group if len(r["checkpoints"]) > i)
        if value is not None:
            xs.append(n)
            ys.append(value)
    return xs, ys


def plot(runs: list[dict], path: Path) -> None:
    """Per goal (columns): test accuracy, seconds per fragment and RSS against requests (rows),
    a line per variant (mean over seeds); retrained references as black triangles, the
    constrained retrain as a cross in the variant's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = sorted({r["goal"] for r in runs})
    rows = (("test_acc", "test accuracy"), ("seconds_per_fragment", "s / fragment"), ("rss_mb", "RSS MiB"))
    fig, axes = plt.subplots(len(rows), len(goals), figsize=(4.5 * len(goals), 9), squeeze=False)
    for col, goal in enumerate(goals):
        for first, variant in enumerate(sorted({r["variant"] for r in runs if r["goal"] == goal}, key=_COLOURS.index)):
            group, v = [r for r in runs if r["goal"] == goal and r["variant"] == variant], _COLOURS.index(variant)
            for row, (key, name) in enumerate(rows):
                axes[row][col].plot(*_series(group, key), marker=".", color=f"C{v}", label=variant)
                axes[row][col].set(xlabel="requests", ylabel=name)
            axes[0][col].plot(*_series(group, "retrained_test_acc"), "k^", label="retrained" if first == 0 else None)
            axes[0][col].plot([group[0]["requests"]], [_mean(r["end"]["constrained_test_acc"] for r in group)], "x",
                              color=f"C{v}", markersize=10, label=f"constrained ({variant})")
        axes[0][col].set_title(goal)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(f"{', '.join(sorted({r['dataset'] for r in runs}))}: continual unlearning, fragments of "
                 f"{runs[0]['k']}" if runs else "no runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_runs(paths: list[Path]) -> list[dict]:
    """The runs of result files; a later file's run replaces one with the same (dataset, seed, goal, variant)."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(path.read_text())["runs"]:
            merged[(r["dataset"], r["seed"], r["goal"], r["variant"])] = r
    return list(merged.values())


def render(paths: list[Path], out: Path) -> int:
    """Print every table and the targets of result files; a PNG per dataset in `out`."""
    runs = load_runs(paths)
    for dataset in sorted({r["dataset"] for r in runs}):
        plot([r for r in runs if r["dataset"] == dataset], out / f"horizon-{dataset}.png")
    print_all(runs)
    return 0
