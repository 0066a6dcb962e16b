"""Per-example membership inference against unlearning: U-LiRA on MNIST-5k (issue 21, item 2).

  python benchmarks/per_example_mia.py --quick        # 4 shadows per side, 16 canaries + 16 typical
  python benchmarks/per_example_mia.py                # headline: 16 per side, 24 canaries + 40 typical
  python benchmarks/per_example_mia.py --render benchmarks/results/per_example_mia_quick.json

Time, 2-core CPU machine, --threads 1 (the default) with the other core busy: --quick took 9.5
min (573 s: 8 shadows trained at 27 s each; unseen+buffer 20-41 s per fragment of 11-21
targets, 5 of 8 at the 1,000-step cap; misclassify 4-10 s). The headline run (16 per side, 64
targets, both goals) measured 54 min (3,249 s) on one thread with the other core busy: 32 shadows
at ~33 s, unseen+buffer ~50 s per fragment of ~32 targets (28 of 32 at the step cap),
misclassify ~16 s. Shadows are cached in
--weights-dir by recipe (a hash of dataset, seed, shadow index, epochs, targets and training
indices), so a rerun (another goal, --bootstrap) pays only the unlearning.

The attack (Hayes et al., "Inexact unlearning needs more careful evaluations to avoid a false
sense of privacy", SaTML 2025, U-LiRA): 2S shadow models of the reference CNN recipe
(`streamer.engine.train.fit` with the dataset's epochs, batch size and rate) are trained on
random halves of the training split's non-target pool, with the benchmark's canaries planted
(`BENCHMARK_CANARIES`: memorised under a wrong label, seen 4x per epoch). T target instances
(canaries and typical training images) are each IN exactly S shadows (a balanced design: a
random permutation of the shadows per target, its first S). Per goal, every shadow unlearns all
of its IN targets with the product's engine in one fragment (`method_config("default")`, the
daemon's defaults, `update: auto` = head on this CNN; the time cap off, max_seconds 1e9; goal
`unseen+buffer`: the 500-image buffer split as retain buffer), so for a target t the S shadows
that held it give S "unlearned" models, and the S that never saw it (as trained, not unlearned)
are the "retrained without" models.

Statistic per (model, instance): LiRA's logit-scaled confidence phi = log(p_y / (1 - p_y)) on
the label the instance was trained with (the canary label for canaries), from logits by
logsumexp. Per target, a Gaussian is fitted to phi over its unlearned models and one over its
retrained-without models, leaving out the model being scored (and one of the other side, so
that both fits have as many models: `ulira_scores`); the score is the log-likelihood ratio.
Reported per goal and kind of target (canary, typical, all): the AUC over all (model, target)
pairs, unlearned vs retrained-without, with a 95% bootstrap interval over targets; the same AUC
with one variance per side pooled over targets (LiRA's fixed variance, steadier with few
shadows); TPR at 1% and 0.1% FPR (with T x S negatives per row, 0.1% may be below the
resolution: then it is the TPR at FPR 0); the competition-style epsilon per target (NeurIPS
2023 unlearning challenge, Triantafillou et al. 2024: `epsilon`) from threshold attacks on phi,
its forgetting-quality score F, and both as identical distributions read them with as many
models (`epsilon_null`: with 4 per side 0.90 of at most log 4 = 1.39, so --quick barely
resolves epsilon; with 16, 1.29 of at most log 16 = 2.77); the training-label rate; test accuracy before
and after; steps; fragments that reported their goal, and how many of them ran to the step cap.
The row "trained with" runs the same attack on the shadows before unlearning: how much there
was to hide.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

try:
    from scipy.stats import norm
except ImportError:  # the formula in _log_normal
    norm = None

from streamer.engine.canaries import BENCHMARK_CANARIES, plant_canaries, training_set
from streamer.engine.data import load_splits
from streamer.engine.evaluate import accuracy
from streamer.engine.evaluate import logits as predict_logits
from streamer.engine.train import _EPOCHS, _RECIPE, fit, reference_model
from streamer.engine.unlearn import Fragment, Unlearner, method_config
from streamer.engine.unseen import UNSEEN, label_confidence

DATASET = "mnist5k"
GOALS = ("unseen+buffer", "misclassify", "unseen", "misclassify+buffer")  # goal[+buffer: the 500-image buffer split]
KINDS = ("canary", "typical", "all")
SD_FLOOR = 1e-2  # smallest standard deviation of a fitted Gaussian (phi is in nats)
FPR_POINTS = (0.01, 0.001)


# ---- pure statistics (tests/benchmarks/test_per_example_mia.py) -----------------------------

def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(N,) phi = log(p_y / (1 - p_y)) = z_y - logsumexp(z_j, j != y), exact and finite for any
    finite logits (N, C)."""
    return label_confidence(logits.double(), y.view(-1)).numpy()  # the statistic the unseen goal caps


def _log_normal(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    if norm is not None:
        return norm.logpdf(x, mu, sd)
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def _fit(samples: np.ndarray, pooled_sd: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of samples (T, m): the mean and the sd (ddof 1; the pooled one when given or when
    m < 2), floored at SD_FLOOR."""
    mu = samples.mean(axis=1)
    if pooled_sd is None and samples.shape[1] >= 2:
        return mu, np.maximum(samples.std(axis=1, ddof=1), SD_FLOOR)
    return mu, np.full_like(mu, max(pooled_sd if pooled_sd is not None else SD_FLOOR, SD_FLOOR))


def ulira_scores(phi_in: np.ndarray, phi_out: np.ndarray, variance: str = "target") -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood ratios log N(phi; in fit) - log N(phi; out fit), per target (rows) and model
    (columns): phi_in (T, S) under the models of the positive side (unlearned, or trained with),
    phi_out (T, S) under the retrained-without models. The scored model is left out of its own
    side's fit, and the model in the same column of the other side out of that one, so both
    Gaussians are fitted on S - 1 models: with the other side fitted on all S, its better fit
    alone tilts the ratio (4 vs 4 models per side read AUC 0.44 between identical
    distributions; 0.50 this way). variance: "target" (per target and side; pooled when S < 3)
    or "global" (one sd per side, pooled over targets: LiRA's fixed variance, steadier with few
    models). Returns (scores_in, scores_out), both (T, S); higher reads as the positive side."""
    if phi_in.shape != phi_out.shape or phi_in.shape[1] < 2:
        raise ValueError(f"phi_in {phi_in.shape} and phi_out {phi_out.shape}: same shape, >= 2 models per side")
    if variance not in ("target", "global"):
        raise ValueError(f"variance {variance!r}: target or global")
    pooled = {side: float(np.sqrt(np.mean(phi.var(axis=1, ddof=1)))) for side, phi in (("in", phi_in), ("out", phi_out))}
    if variance == "target":
        pooled = {side: (sd if phi_in.shape[1] < 3 else None) for side, sd in pooled.items()}
    scores_in, scores_out = np.empty(phi_in.shape), np.empty(phi_out.shape)
    for i in range(phi_in.shape[1]):
        mu_in, sd_in = _fit(np.delete(phi_in, i, axis=1), pooled["in"])
        mu_out, sd_out = _fit(np.delete(phi_out, i, axis=1), pooled["out"])
        for x, out in ((phi_in[:, i], scores_in), (phi_out[:, i], scores_out)):
            out[:, i] = _log_normal(x, mu_in, sd_in) - _log_normal(x, mu_out, sd_out)
    return scores_in, scores_out


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr_max: float) -> float:
    """The highest TPR of a threshold whose FPR is at most fpr_max (positives: pos)."""
    fpr, tpr, _ = roc_curve(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos.ravel(), neg.ravel()])
    return float(tpr[fpr <= fpr_max + 1e-12].max())


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos.ravel(), neg.ravel()]))


def bootstrap_auc(pos: np.ndarray, neg: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC with targets (rows of pos (T, A) and neg (T, B))
    resampled with replacement."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        rows = rng.integers(0, pos.shape[0], pos.shape[0])
        stats.append(auc(pos[rows], neg[rows]))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


EPSILON_QUANTILES = np.linspace(0.05, 0.95, 19)  # thresholds: these quantiles of a target's pooled statistic


def epsilon(pos: np.ndarray, neg: np.ndarray, delta: float = 1e-5, quantiles: np.ndarray = EPSILON_QUANTILES) -> float:
    """Competition-style privacy degree of one target from its statistic under the positive-side
    (pos) and retrained-without (neg) models: the max over threshold attacks (phi > thr and
    phi <= thr, thr at `quantiles` of the pooled values) of
    max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)), and 0 at least. As in the
    challenge's scorer, an attack with FPR = 0 or FNR = 0 (but not both) is discarded (its ratio is
    undefined), one with both 0 (perfect separation) gives inf. Quantile thresholds rather than
    every sample: with every sample the tails decide (1 vs 3 models out of thousands reads as
    epsilon log 3 between identical distributions); with few models per side the quantiles are
    the samples themselves."""
    best = 0.0
    for thr in np.quantile(np.r_[pos, neg], quantiles):
        for above in (True, False):
            hit_pos = pos > thr if above else pos <= thr
            hit_neg = neg > thr if above else neg <= thr
            fpr, fnr = float(hit_neg.mean()), float(1.0 - hit_pos.mean())
            if fpr == 0.0 and fnr == 0.0:
                return math.inf
            if fpr == 0.0 or fnr == 0.0:
                continue
            for num, den in ((1.0 - delta - fpr, fnr), (1.0 - delta - fnr, fpr)):
                if num > 0:
                    best = max(best, math.log(num / den))
    return best


def forgetting_quality(eps: np.ndarray, bin_width: float = 0.5, bins: int = 13) -> float:
    """The challenge's score: each epsilon falls in bin n = 1, 2, ... of width `bin_width` (the
    last open-ended, inf included) and scores 2 / 2^n; the mean over targets (1: every target
    in the first bin; 0 as every epsilon grows)."""
    n = np.digitize(np.asarray(eps, dtype=np.float64), np.arange(bins) * bin_width)
    return float(np.mean(2.0 / 2.0 ** n))


def epsilon_null(a: int, b: int, delta: float = 1e-5, draws: int = 500, seed: int = 0) -> tuple[float, float]:
    """(mean capped epsilon, F) between identical distributions with a and b models per side: the
    floor that chance alone reads with so few models (threshold attacks depend on ranks only, so
    any continuous distribution gives the same)."""
    rng = np.random.default_rng(seed)
    eps = np.array([epsilon(rng.normal(size=a), rng.normal(size=b), delta) for _ in range(draws)])
    return float(np.minimum(eps, math.log(min(a, b))).mean()), forgetting_quality(eps)


def attack_summary(phi_in: np.ndarray, phi_out: np.ndarray, n_boot: int = 1000, seed: int = 0,
                   delta: float = 1e-5) -> dict:
    """Every number of one row: U-LiRA AUC (per-target variance) with its bootstrap interval, the
    AUC with the pooled variance, TPR at FPR_POINTS, epsilons (inf capped at log(models per
    side), the most a perfect separation can show), F, and both between identical
    distributions (`epsilon_null`). phi_in (T, A), phi_out (T, B)."""
    s_in, s_out = ulira_scores(phi_in, phi_out, "target")
    g_in, g_out = ulira_scores(phi_in, phi_out, "global")
    eps = np.array([epsilon(phi_in[t], phi_out[t], delta) for t in range(phi_in.shape[0])])
    cap = math.log(min(phi_in.shape[1], phi_out.shape[1]))
    lo, hi = bootstrap_auc(s_in, s_out, n_boot, seed)
    null_eps, null_f = epsilon_null(phi_in.shape[1], phi_out.shape[1], delta, seed=seed)
    return {"targets": int(phi_in.shape[0]), "models_per_side": [int(phi_in.shape[1]), int(phi_out.shape[1])],
            "auc": auc(s_in, s_out), "auc_ci95": [lo, hi], "auc_global_variance": auc(g_in, g_out),
            **{f"tpr_at_fpr_{f:g}": tpr_at_fpr(s_in, s_out, f) for f in FPR_POINTS},
            "epsilon_mean": float(np.minimum(eps, cap).mean()), "epsilon_cap": cap,
            "separated": float(np.isinf(eps).mean()), "forgetting_quality": forgetting_quality(eps),
            "epsilon_null_mean": null_eps, "forgetting_quality_null": null_f,
            "epsilons": [None if math.isinf(e) else round(float(e), 4) for e in eps]}


def balanced_membership(targets: int, shadows_per_side: int, seed: int) -> np.ndarray:
    """(2S, T) bool: each target IN exactly S of the 2S shadows (a random permutation per target)."""
    rng = np.random.default_rng(seed)
    member = np.zeros((2 * shadows_per_side, targets), dtype=bool)
    for t in range(targets):
        member[rng.permutation(2 * shadows_per_side)[:shadows_per_side], t] = True
    return member


def split_sides(phi: np.ndarray, member: np.ndarray, positive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """phi (2S, T) of the models as trained, member (2S, T); positive (2S, T): the statistic of
    the positive side (unlearned models; default phi itself). Returns (phi_in (T, S) from
    `positive` where member, phi_out (T, S) from phi where not)."""
    positive = phi if positive is None else positive
    rows_in = [positive[member[:, t], t] for t in range(member.shape[1])]
    rows_out = [phi[~member[:, t], t] for t in range(member.shape[1])]
    return np.array(rows_in), np.array(rows_out)


# ---- the run ----------------------------------------------------------------------------------

def choose_targets(splits, planted, canaries: int, typical: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) train indices (canaries first) and (T,) bool is_canary, drawn by `seed`."""
    g = torch.Generator().manual_seed(3000 + seed)
    if canaries > len(planted):
        raise SystemExit(f"--canaries {canaries}: only {len(planted)} are planted")
    chosen = planted.index[torch.randperm(len(planted), generator=g)[:canaries]]
    rest = torch.ones(len(splits.train), dtype=torch.bool)
    rest[planted.index] = False
    others = torch.nonzero(rest).flatten()
    picked = others[torch.randperm(len(others), generator=g)[:typical]]
    return torch.cat([chosen, picked]), torch.arange(canaries + typical) < canaries


def shadow_training(n_train: int, targets: torch.Tensor, member: np.ndarray, seed: int) -> list[torch.Tensor]:
    """Per shadow, the train indices it is fitted on: a random half of the non-target pool and
    its IN targets."""
    g = torch.Generator().manual_seed(4000 + seed)
    pool = torch.ones(n_train, dtype=torch.bool)
    pool[targets] = False
    pool = torch.nonzero(pool).flatten()
    return [torch.cat([pool[torch.randperm(len(pool), generator=g)[: len(pool) // 2]],
                       targets[torch.from_numpy(member[s])]]).sort().values for s in range(member.shape[0])]


def load_or_train_shadow(s: int, included: torch.Tensor, splits, planted, args, targets) -> tuple[torch.nn.Module, dict]:
    """Shadow s, from --weights-dir when a file of the same recipe is there, else trained with the
    engine's recipe (`train.fit`) on `included` and saved. Returns (model in eval mode, sidecar)."""
    batch_size, lr, cosine = _RECIPE[DATASET]
    recipe = {"benchmark": "per_example_mia", "dataset": DATASET, "seed": args.seed, "shadow": s, "epochs": args.epochs,
              "batch_size": batch_size, "lr": lr, "cosine": cosine, "canaries": planted.spec.to_json(),
              "targets": targets.tolist(),
              "included_sha256": hashlib.sha256(json.dumps(included.tolist()).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = args.weights_dir / f"mia-{DATASET}-shadow{s}-{digest}.pt"
    sidecar = path.with_suffix(".json")
    model = reference_model(DATASET)
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("recipe") == recipe:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), {**json.loads(sidecar.read_text()), "cached": True}
    exclude = torch.ones(len(splits.train), dtype=torch.bool)
    exclude[included] = False
    train_seed = 1000 * args.seed + s
    torch.manual_seed(train_seed)
    model = reference_model(DATASET)
    start = time.perf_counter()
    fit(model, training_set(splits.train, planted, torch.nonzero(exclude).flatten()), args.epochs, seed=train_seed,
        lr=lr, batch_size=batch_size, cosine=cosine)
    report = {"recipe": recipe, "seconds": round(time.perf_counter() - start, 1), "train_images": len(included)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    sidecar.write_text(json.dumps(report) + "\n")
    return model.eval(), {**report, "cached": False}


def observe(model, x: torch.Tensor, y: torch.Tensor, splits) -> dict:
    """phi and the predicted class of every target, and the test (audit) accuracy."""
    z = predict_logits(model, x)
    return {"phi": logit_confidence(z, y), "pred": z.argmax(1).numpy(), "test_acc": accuracy(model, splits.audit.x, splits.audit.y)}


def unlearn(model, goal: str, x: torch.Tensor, y: torch.Tensor, buffer, seed: int,
            overrides: dict | None = None) -> dict:
    """Unlearn the fragment (x, y) in place with the product's default method (and `overrides`,
    UnlearnConfig fields from --set); the outcome."""
    base, _, with_buffer = goal.partition("+")
    cfg = method_config("default", seed=seed, max_seconds=1e9, **(overrides or {}))
    target = torch.full_like(y, UNSEEN if base == "unseen" else -1)
    start = time.perf_counter()
    out = Unlearner(model, cfg, 10, buffer=buffer if with_buffer else None).unlearn(Fragment(x, y, target))
    return {"k": len(y), "steps": out.steps, "stopped_by": out.stopped_by, "goal_reached": out.goal_reached,
            "at_step_cap": out.steps >= cfg.max_steps,
            "seconds": round(time.perf_counter() - start, 1), "resolved": out.targets}


def run(args) -> dict:
    t0 = time.perf_counter()
    splits = load_splits(DATASET)
    planted = plant_canaries(splits.train, BENCHMARK_CANARIES[DATASET])
    train_y = splits.train.y.clone()
    train_y[planted.index] = planted.canary_y  # the labels the shadows are trained with
    targets, is_canary = choose_targets(splits, planted, args.canaries, args.typical, args.seed)
    member = balanced_membership(len(targets), args.shadows, args.seed)
    x, y = splits.train.x[targets], train_y[targets]
    print(f"{DATASET}: {len(targets)} targets ({int(is_canary.sum())} canaries), {2 * args.shadows} shadows, "
          f"{args.epochs} epochs, goals {', '.join(args.goals)}", flush=True)
    models, trained = [], []
    for s, included in enumerate(shadow_training(len(splits.train), targets, member, args.seed)):
        model, report = load_or_train_shadow(s, included, splits, planted, args, targets)
        models.append({k: v.clone() for k, v in model.state_dict().items()})
        trained.append({**observe(model, x, y, splits), "cached": report["cached"], "train_seconds": report["seconds"]})
        print(f"  shadow {s + 1}/{2 * args.shadows}: {'cached' if report['cached'] else 'trained'} "
              f"({report['seconds']:.0f} s), test {trained[-1]['test_acc']:.4f}, "
              f"IN canaries memorised {_rate(trained[-1]['pred'], y, member[s] & is_canary.numpy())}  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    result = {"meta": _meta(args, targets, is_canary, y, member), "shadows": [_jsonable(t) for t in trained], "goals": {}}
    phi_raw = np.stack([t["phi"] for t in trained])
    result["trained_with"] = _rows(phi_raw, None, member, is_canary, y.numpy(), args, trained, None)
    for goal in args.goals:
        fragments, after = [], []
        for s in range(2 * args.shadows):
            model = reference_model(DATASET)
            model.load_state_dict(models[s])
            model.eval()
            rows = torch.from_numpy(member[s])
            fragments.append(unlearn(model, goal, x[rows], y[rows], splits.buffer, args.seed, args.set))
            after.append(observe(model, x, y, splits))
            f = fragments[-1]
            cap = " (the step cap)" if f["at_step_cap"] else ""
            print(f"  {goal} shadow {s + 1}/{2 * args.shadows}: k={f['k']} {f['stopped_by']} after {f['steps']} steps{cap}, "
                  f"{f['seconds']:.0f} s, test {trained[s]['test_acc']:.4f} -> {after[-1]['test_acc']:.4f}  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        phi_unl = np.stack([a["phi"] for a in after])
        result["goals"][goal] = {"fragments": fragments, "models": [_jsonable(a) for a in after],
                                 "rows": _rows(phi_raw, phi_unl, member, is_canary, y.numpy(), args, trained, after, fragments)}
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _rows(phi_raw, phi_unl, member, is_canary, y, args, trained, after, fragments=None) -> dict:
    """One summary per kind of target: the attack on (unlearned or trained-with) vs retrained-without,
    rates of the training label, test accuracies, steps."""
    phi_in, phi_out = split_sides(phi_raw, member, phi_unl)
    pred_raw = np.stack([t["pred"] for t in trained])
    pred_in = pred_raw if after is None else np.stack([a["pred"] for a in after])
    out = {}
    for kind in KINDS:
        mask = {"canary": is_canary.numpy(), "typical": ~is_canary.numpy(), "all": np.ones(len(is_canary), bool)}[kind]
        if not mask.any():
            continue
        summary = attack_summary(phi_in[mask], phi_out[mask], args.bootstrap, args.seed, args.delta)
        label_in = np.mean([pred_in[s, t] == y[t] for t in np.nonzero(mask)[0] for s in np.nonzero(member[:, t])[0]])
        label_out = np.mean([pred_raw[s, t] == y[t] for t in np.nonzero(mask)[0] for s in np.nonzero(~member[:, t])[0]])
        summary.update(label_rate=float(label_in), label_rate_retrained=float(label_out),
                       test_before=float(np.mean([t["test_acc"] for t in trained])),
                       test_after=float(np.mean([a["test_acc"] for a in (after or trained)])))
        if fragments:
            summary.update(steps_mean=float(np.mean([f["steps"] for f in fragments])),
                           goal_reached=sum(f["goal_reached"] for f in fragments), fragments=len(fragments))
        out[kind] = summary
    return out


def _rate(pred: np.ndarray, y: torch.Tensor, mask: np.ndarray) -> str:
    return f"{int((pred[mask] == y.numpy()[mask]).sum())}/{int(mask.sum())}"


def _jsonable(obs: dict) -> dict:
    return {k: (np.round(v, 4).tolist() if isinstance(v, np.ndarray) and v.dtype.kind == "f" else
                v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obs.items()}


def _meta(args, targets, is_canary, y, member) -> dict:
    return {"dataset": DATASET, "seed": args.seed, "shadows_per_side": args.shadows, "epochs": args.epochs,
            "threads": args.threads, "goals": args.goals, "bootstrap": args.bootstrap, "delta": args.delta,
            "targets": targets.tolist(), "is_canary": is_canary.tolist(), "labels": y.tolist(), "overrides": args.set,
            "member": member.astype(int).tolist(), "torch": torch.__version__, "method": "default",
            "max_seconds": 1e9, "max_steps": method_config("default").max_steps, "sd_floor": SD_FLOOR,
            "streamer": _source()}


def _source() -> dict:
    """Where the engine that ran came from: its path, and the commit and whether streamer/ had
    uncommitted changes when it is a git work tree."""
    import subprocess

    import streamer

    root = Path(streamer.__file__).resolve().parents[1]
    out = {"path": str(root)}
    try:
        git = ["git", "-C", str(root)]
        out["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        out["dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "streamer"], capture_output=True, text=True,
                                           check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# ---- the table ---------------------------------------------------------------------------------

_HEADER = ("goal", "kind", "targets", "AUC [95% CI]", "AUC pooled var", "TPR@1%FPR", "TPR@0.1%FPR",
           "eps mean (null; cap)", "separated", "F (null)", "label rate (retrained)", "test before -> after", "steps",
           "goal reported (at step cap)")


def _line(goal: str, kind: str, r: dict, at_cap: int | None = None) -> str:
    lo, hi = r["auc_ci95"]
    cells = [goal, kind, str(r["targets"]), f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['auc_global_variance']:.3f}",
             f"{r['tpr_at_fpr_0.01']:.3f}", f"{r['tpr_at_fpr_0.001']:.3f}",
             f"{r['epsilon_mean']:.2f} ({r['epsilon_null_mean']:.2f}; {r['epsilon_cap']:.2f})", f"{r['separated']:.2f}",
             f"{r['forgetting_quality']:.3f} ({r['forgetting_quality_null']:.3f})",
             f"{r['label_rate']:.2f} ({r['label_rate_retrained']:.2f})",
             f"{r['test_before']:.4f} -> {r['test_after']:.4f}",
             f"{r['steps_mean']:.0f}" if "steps_mean" in r else "-",
             f"{r['goal_reached']}/{r['fragments']} ({at_cap})" if "goal_reached" in r else "-"]
    return "| " + " | ".join(cells) + " |"


def print_table(result: dict) -> None:
    m = result["meta"]
    n_out = {kind: r["targets"] * r["models_per_side"][1] for kind, r in result["trained_with"].items()}
    print(f"\nU-LiRA, {m['dataset']}: {len(m['targets'])} targets, {m['shadows_per_side']} unlearned (or trained-with) vs "
          f"{m['shadows_per_side']} retrained-without models per target (seed {m['seed']}, {m['epochs']} epochs). "
          f"'trained with': the shadows before unlearning. TPR at FPR <= 1% and 0.1% of the (model, target) "
          f"negatives ({', '.join(f'{k} {v}' for k, v in n_out.items())}: below 1/negatives it is the TPR at FPR 0). "
          "eps: competition-style, mean over targets, capped at log(models per side); null: what identical "
          "distributions read with as many models; separated: share of targets whose sides do not overlap. "
          "label rate: IN models predicting the training label (retrained-without models). goal reported: "
          "fragments whose outcome says goal (of them, those that ran to the step cap)")
    print("| " + " | ".join(_HEADER) + " |\n|" + "---|" * len(_HEADER))
    for kind, r in result["trained_with"].items():
        print(_line("trained with", kind, r))
    max_steps = m.get("max_steps", method_config("default").max_steps)
    for goal, g in result["goals"].items():
        at_cap = sum(f["steps"] >= max_steps for f in g["fragments"])
        for kind, r in g["rows"].items():
            print(_line(goal, kind, r, at_cap))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 shadows per side, 16 canaries + 16 typical targets")
    parser.add_argument("--shadows", type=int, default=16, help="shadows per side (2x in all)")
    parser.add_argument("--canaries", type=int, default=24, help="canary targets (of the 24 planted)")
    parser.add_argument("--typical", type=int, default=40, help="typical targets")
    parser.add_argument("--goals", nargs="+", default=["unseen+buffer", "misclassify"], choices=GOALS)
    parser.add_argument("--epochs", type=int, default=_EPOCHS[DATASET], help="shadow training epochs (the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the targets")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--weights-dir", type=Path, default=Path("bench-out/weights"))
    parser.add_argument("--tag", help="names the output (default: quick or headline)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/per_example_mia_TAG.json)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="engine overrides (UnlearnConfig fields), e.g. update=all: not the product default")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print the table of an earlier run (no run)")
    args = parser.parse_args(argv)
    if args.render:
        print_table(json.loads(args.render.read_text()))
        return 0
    if args.quick:
        args.shadows, args.canaries, args.typical = 4, 16, 16
    from paper_tables import parse_set
    args.set = parse_set(args.set)
    if args.shadows < 2:
        parser.error("--shadows must be >= 2 (a leave-one-out fit needs 2 per side)")
    torch.set_num_threads(args.threads)
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tag = args.tag or ("quick" if args.quick else "headline")
    out = args.out or Path(__file__).parent / "results" / f"per_example_mia_{tag}.json"
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    print_table(result)
    print(f"\n{out} ({result['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
