"""One group of requests through the engine: unlearn, check the guard rails, evaluate, decide each
request's status, and age the retained set (instances that keep missing their goal leave it).

No Kafka and no disk here: `FragmentWorker.run` takes validated requests and returns each one's outcome
and what the daemon publishes, or raises a `FragmentFailure` (see failures.py) and leaves the model to be
restored from `snapshot()`. It owns the model being unlearned, the retained forgotten set and the evaluation sets.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import (ALONE, Dataset, Fragment, FragmentOutcome, GroupLost, Shard, UnlearnConfig, Unlearner, goal_gap,
                      goal_mask, goal_met, load_net_state, save_user_model)
from ..engine import logits as logits_of
from ..state import ForgottenSet, ModelFile, RequestOutcome
from .collector import Accepted
from .failures import EngineFailure, NonFiniteOutputs, UtilityFloorBreached

__all__ = ["FragmentResult", "FragmentWorker"]


@dataclass(frozen=True)
class FragmentResult:
    outcome: FragmentOutcome
    outcomes: list[RequestOutcome]  # one per request, in order: forgotten | relabelled | failed (not settled)
    forgotten: ForgottenSet  # the retained set after this fragment (this fragment first)
    accuracies: dict[str, float]  # fragment | forgotten | audit -> ratio (absent: no such set)
    evaluate_seconds: float
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)  # for the manifest
    abandoned: dict[str, str] = field(default_factory=dict)  # request_id -> why it left the retained set
    retained_met: tuple[bool, ...] = ()  # per instance of `forgotten`: its goal holds on the new weights


@dataclass(frozen=True)
class _Snapshot:
    state: dict[str, torch.Tensor]
    forgotten: ForgottenSet
    misses: dict[str, int]


class FragmentWorker:
    """The daemon's engine side. `run` may be called from a worker thread; nothing else touches
    the model meanwhile. `model` is the user's network inside `Normalized`; versions publish the
    network alone in `model_format` (`export` needs `input_shape`, C, H, W)."""

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, num_classes: int, forgotten: ForgottenSet,
                 teacher: nn.Module | None = None, audit: Dataset | None = None, buffer: Dataset | None = None,
                 audit_baseline: float | None = None, max_audit_drop: float | None = None,
                 max_missed_fragments: int = 3, misses: Mapping[str, int] | None = None,
                 model_format: str = "state_dict", input_shape: tuple[int, int, int] | None = None,
                 shard: Shard = ALONE):
        self.model, self.cfg, self.audit, self.audit_baseline = model, cfg, audit, audit_baseline
        self.max_audit_drop, self.max_missed_fragments = max_audit_drop, max_missed_fragments
        self.forgotten, self.model_format, self.input_shape = forgotten, model_format, input_shape
        self.misses: dict[str, int] = dict(misses or {})  # request_id -> fragments missed in a row
        self._unlearner = Unlearner(model, cfg, num_classes, buffer=buffer,
                                    forgotten=_as_fragment(forgotten) if len(forgotten) else None, teacher=teacher,
                                    shard=shard)

    def model_file(self) -> ModelFile:
        """The user's network with the current weights, as the file a version publishes. Raises
        ModelLoadError when the network cannot be written in the format (checked at start-up)."""
        return ModelFile(self.model_format, save_user_model(self._unlearner.net, self.model_format, self.input_shape))

    def describe_trainable(self) -> dict:
        """The parameters unlearning moves, by name, with counts, and whether a step runs a
        trainable suffix on cached features or the whole model (for the start-up log)."""
        example = torch.rand(2, *self.input_shape) if self.input_shape is not None else None
        return self._unlearner.describe_trainable(example)

    def reset(self, state_dict: dict[str, torch.Tensor], forgotten: ForgottenSet,
              misses: Mapping[str, int] | None = None) -> None:
        """Make the model and the retained set those of a checkpoint (after a rollback); the
        state_dict is the user's network's (or, from an older version, the wrapper's)."""
        load_net_state(self.model, state_dict, where="the checkpoint")
        self.reset_forgotten(forgotten)
        self.misses = dict(misses or {})

    def rebase(self, state_dict: dict[str, torch.Tensor], forgotten: ForgottenSet, audit_baseline: float | None) -> None:
        """Switch to a retrained model (`streamer rebase`): its weights become the model's and the
        distillation teacher's, its audit accuracy the baseline of the guard rail."""
        self.reset(state_dict, forgotten)
        load_net_state(self._unlearner.teacher, state_dict, where="the rebase version")
        self.audit_baseline = audit_baseline

    def drop(self, request_ids: set[str]) -> None:
        """Take shredded instances out of the retained set and the anti-resurrection objective."""
        self.reset_forgotten(self.forgotten.without(request_ids))
        self.misses = {rid: n for rid, n in self.misses.items() if rid not in request_ids}

    def reset_forgotten(self, forgotten: ForgottenSet) -> None:
        self.forgotten = forgotten
        device = next(self.model.parameters()).device
        self._unlearner.forgotten = _as_fragment(forgotten).to(device) if len(forgotten) else None

    def check(self, request_ids: Sequence[str]) -> list[bool]:
        """Whether each retained instance meets its goal on the current weights (the final check
        before a shred). Raises KeyError for an id not in the retained set."""
        where = {rid: i for i, rid in enumerate(self.forgotten.request_ids)}
        index = torch.tensor([where[rid] for rid in request_ids], dtype=torch.int64)
        f = self.forgotten
        return goal_mask(self.model, f.x[index], f.y[index], f.target[index]).tolist() if len(index) else []

    def snapshot(self) -> _Snapshot:
        """The model and retained set as they are: `restore()` undoes a failed `run`."""
        return _Snapshot({k: v.detach().clone() for k, v in self.model.state_dict().items()}, self.forgotten,
                         dict(self.misses))

    def restore(self, snap: _Snapshot) -> None:
        self.reset(snap.state, snap.forgotten, snap.misses)

    def run(self, accepted: Sequence[Accepted], cancel: threading.Event | None = None,
            progress: Callable[[int, float, int], None] | None = None) -> FragmentResult | None:
        """Unlearn `accepted` as one fragment; None when cancelled (restore the snapshot then).

        Raises EngineFailure (the engine or model raised), GroupLost (a rank of a torchrun group is
        gone: the daemon stops), NonFiniteOutputs (NaN/Inf logits on the
        fragment, the retained set or the audit set) or UtilityFloorBreached (audit accuracy more
        than max_audit_drop below the base model's); the model is then left as it was, to restore."""
        requests = [a.request for a in accepted]
        x = torch.stack([r.x for r in requests])  # (k, C, H, W)
        y = torch.tensor([r.label for r in requests], dtype=torch.int64)
        target = torch.tensor([r.goal.engine_target for r in requests], dtype=torch.int64)  # the engine resolves unseen
        try:
            outcome = self._unlearner.unlearn(Fragment(x, y, target), progress=progress, cancel=cancel)
            if outcome.stopped_by == "cancelled":
                return None
            if outcome.stopped_by == "non_finite":
                raise NonFiniteOutputs(f"the unlearning loss became NaN/Inf at step {outcome.steps}; not published",
                                       {"steps": outcome.steps})
            start = time.perf_counter()
            target = _resolved(outcome, target)
            forgotten = self.forgotten.prepend(x, y, target, [r.request_id for r in requests],
                                               [r.request_id for r in requests if r.goal.unseen])
            on_forgotten = logits_of(self.model, forgotten.x)  # the fragment comes first in it: one pass for both
            logits = {"fragment": on_forgotten[: len(requests)], "forgotten": on_forgotten}
            if self.audit is not None:
                logits["audit"] = logits_of(self.model, self.audit.x)
        except (NonFiniteOutputs, GroupLost):  # GroupLost: infrastructure (another rank is gone), no outcome
            raise
        except Exception as err:  # any error here depends on the model or the inputs: no I/O runs
            raise EngineFailure(f"the engine raised {type(err).__name__}: {err}") from err
        _check_finite(logits, outcome.steps)
        # Accuracy on the label, "want 0", is meaningful for misclassify and relabel only: an unseen
        # instance's goal may be its own label (a typical one), so it is left out of both.
        leaving = torch.tensor([rid not in forgotten.unseen for rid in forgotten.request_ids], dtype=torch.bool)
        k = len(requests)
        accuracies = {"fragment": _acc(logits["fragment"][leaving[:k]], y[leaving[:k]]),
                      "forgotten": _acc(logits["forgotten"][leaving], forgotten.y[leaving])}
        if self.audit is not None:
            accuracies["audit"] = _acc(logits["audit"], self.audit.y)
            self._check_floor(accuracies["audit"], outcome.steps)
        outcomes = _outcomes(logits["fragment"], accepted, y, target, outcome, self.cfg)
        met = dict(zip(forgotten.request_ids, goal_met(logits["forgotten"], forgotten.y, forgotten.target).tolist()))
        forgotten, abandoned = self._age(forgotten, logits["forgotten"])
        self.forgotten = forgotten
        if abandoned:
            self._unlearner.forgotten = _as_fragment(forgotten).to(self._unlearner.device) if len(forgotten) else None
        return FragmentResult(outcome, outcomes, forgotten, accuracies, time.perf_counter() - start,
                              _manifest_metrics(outcome, accuracies, self.audit_baseline, len(forgotten)), abandoned,
                              tuple(bool(met[rid]) for rid in forgotten.request_ids))

    def _check_floor(self, audit_accuracy: float, steps: int) -> None:
        if self.max_audit_drop is None or self.audit_baseline is None:
            return
        drop = self.audit_baseline - audit_accuracy
        if drop > self.max_audit_drop:
            raise UtilityFloorBreached(
                f"audit accuracy would fall to {audit_accuracy:.4f}, {drop:.4f} below the base model's "
                f"{self.audit_baseline:.4f} (unlearning.max_audit_drop {self.max_audit_drop:g}); not published",
                {"audit_accuracy": round(audit_accuracy, 6), "audit_baseline": round(self.audit_baseline, 6),
                 "audit_drop": round(drop, 6), "max_audit_drop": self.max_audit_drop, "steps": steps})

    def _age(self, forgotten: ForgottenSet, logits: torch.Tensor) -> tuple[ForgottenSet, dict[str, str]]:
        """Count, per retained instance, the fragments in a row it missed its goal; those at
        max_missed_fragments leave the retained set, so they stop taxing every later fragment."""
        met = goal_met(logits, forgotten.y, forgotten.target)
        misses = {rid: self.misses.get(rid, 0) + 1 for rid, ok in zip(forgotten.request_ids, met.tolist()) if not ok}
        out = {rid for rid, n in misses.items() if n >= self.max_missed_fragments}
        self.misses = {rid: n for rid, n in misses.items() if rid not in out}
        if not out or not self.cfg.retain_forgotten:
            return forgotten, {}
        reason = (f"goal still missed after {self.max_missed_fragments} fragments: left the retained set "
                  "(unlearning.max_missed_fragments); anti-resurrection no longer covers it")
        return forgotten.without(out), {rid: reason for rid in forgotten.request_ids if rid in out}


def _check_finite(logits: Mapping[str, torch.Tensor], steps: int) -> None:
    """Raises NonFiniteOutputs when a set's logits hold NaN/Inf: the version would be broken."""
    for name, values in logits.items():
        bad = int((~torch.isfinite(values)).any(1).sum())
        if bad:
            raise NonFiniteOutputs(f"non-finite logits on {bad} of {len(values)} {name} instances after "
                                   f"{steps} steps; not published", {"steps": steps})


def _manifest_metrics(outcome: FragmentOutcome, accuracies: Mapping[str, float], baseline: float | None,
                      retained: int) -> dict[str, float | int | str | None]:
    """The numbers a version's manifest records about its fragment."""
    return {
        "stopped_by": outcome.stopped_by, "steps": outcome.steps, "unlearn_seconds": round(outcome.seconds, 3),
        "missed": outcome.missed, "cap_cause": outcome.cap_cause, "resurrected_at_start": outcome.resurrected_at_start,
        "attack_success_ratio": _finite(outcome.attack_success_ratio),
        "fragment_accuracy": _finite(accuracies["fragment"]), "forgotten_accuracy": _finite(accuracies["forgotten"]),
        "audit_accuracy": _finite(accuracies.get("audit")), "audit_baseline_accuracy": _finite(baseline),
        "forgotten_instances": retained, "feature_goal_met": outcome.feature_goal_met,
    }


def _resolved(outcome: FragmentOutcome, target: torch.Tensor) -> torch.Tensor:
    """(k,) the fragment's targets as the engine applied them (unseen -2 resolved to a class).
    Raises RuntimeError when the engine reported none, or left one unresolved."""
    resolved = torch.tensor(outcome.targets, dtype=torch.int64)
    if resolved.shape != target.shape or bool((resolved < -1).any()):
        raise RuntimeError(f"the engine returned targets {outcome.targets} for {len(target)} requests")
    return resolved


def _as_fragment(forgotten: ForgottenSet) -> Fragment:
    unseen = torch.tensor([rid in forgotten.unseen for rid in forgotten.request_ids], dtype=torch.bool)
    return Fragment(forgotten.x, forgotten.y, forgotten.target, unseen if len(unseen) == len(forgotten) else None)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")  # checked finite first


def _outcomes(logits: torch.Tensor, accepted: Sequence[Accepted], y: torch.Tensor, target: torch.Tensor,
              outcome: FragmentOutcome, cfg: UnlearnConfig) -> list[RequestOutcome]:
    """forgotten / relabelled when the instance meets its goal (`target`: (k,) resolved, no -2);
    failed (with by how much, `goal_gap` in logits) when not. An unseen request that meets its
    goal is `forgotten`."""
    met = goal_met(logits, y, target)
    gaps = goal_gap(logits, y, target)  # > 0: goal missed by this logit margin
    predicted = logits.argmax(1)
    cap = {"step_cap": f"step cap {cfg.max_steps} hit", "time_cap": f"time cap {cfg.max_seconds:g} s hit",
           "goal": "goal reached for the fragment"}.get(outcome.stopped_by, outcome.stopped_by)
    why = _cap_explanation(outcome)
    outcomes = []
    for i, a in enumerate(accepted):
        goal = a.request.goal.with_engine_target(int(target[i]))
        if bool(met[i]):
            unmet = _feature_unmet(outcome, i, goal, cfg)
            if unmet is not None:
                outcomes.append(a.outcome("forgotten", unmet[0], goal, unmet[1]))
                continue
            outcomes.append(a.outcome("relabelled" if goal.mode == "relabel" else "forgotten", None, goal))
            continue
        if goal.mode == "misclassify":
            missed = (f"instance still predicted as its label {goal.label} "
                      f"(logit margin {float(gaps[i]):.3f} above the next class)")
        else:
            aim = f"its target {goal.target_class}" if goal.mode == "relabel" else \
                f"class {goal.target_class}, its unseen goal"
            missed = (f"instance predicted as {int(predicted[i])}, not {aim} "
                      f"(target logit {float(gaps[i]):.3f} below the top class)")
        outcomes.append(a.outcome("failed", f"{cap}: {missed}; kept in the retained set{why}", goal,
                                  {"goal_gap": round(float(gaps[i]), 6)}))
    return outcomes


def _feature_unmet(outcome: FragmentOutcome, i: int, goal, cfg: UnlearnConfig) -> tuple[str, dict] | None:
    """(reason, numbers) for a `forgotten` unseen request i whose class goal is met but whose
    feature goal (engine.unseen.FeatureGoal: prototype distance, label confidence) a cap cut short:
    said, not hidden. None when met or not run."""
    gap, excess = (values[i] if i < len(values) else None for values in (outcome.feature_gaps, outcome.confidence_excess))
    off, numbers, c = [], {}, goal.target_class
    if gap is not None and outcome.feature_tol is not None and gap > outcome.feature_tol:
        off.append(f"its penultimate features are {gap:.3f} (relative L2) from class {c}'s prototype, over "
                   f"engine.unseen_feature_tol {outcome.feature_tol:g}")
        numbers["feature_gap"] = round(gap, 6)
    if excess is not None and excess > 0:
        off.append(f"its confidence in its trained label is {excess:.3f} nats above the original model's median "
                   f"on held-out images of class {c}")
        numbers["confidence_excess"] = round(excess, 6)
    cap = f"step cap {cfg.max_steps} hit" if outcome.steps >= cfg.max_steps else f"time cap {cfg.max_seconds:g} s hit"
    return None if not off else (f"class goal met (now predicted as {c}); feature goal not met: {'; '.join(off)}, when "
                                 f"the fragment stopped ({cap}); a membership attacker may still tell this memorised "
                                 "instance apart", numbers)


def _cap_explanation(outcome: FragmentOutcome) -> str:
    """Why a cap was hit, from the trend of instances missing their goal ("" when no cap)."""
    if outcome.cap_cause is None or not outcome.missed_trend:  # time/steps: still progressing; difficulty: stalled
        return ""
    trend = ", ".join(f"{missed} at step {step}" for step, missed in outcome.missed_trend[-4:])
    more = {"time": "more time", "steps": "more steps"}.get(outcome.cap_cause)
    return (f"; cap hit while still progressing, {more} would likely have reached the goal (missing: {trend})"
            if more else f"; cap hit after progress stalled (missing: {trend})")
