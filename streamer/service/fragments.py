"""One fragment through the engine: unlearn, then evaluate, then decide each request's status.

No Kafka and no disk here: `FragmentWorker.run` takes validated requests and returns what the
daemon publishes. It owns the model being unlearned (updated in place), the retained
forgotten set and the evaluation sets.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..state.checkpoints import ForgottenSet
from ..engine.data import Dataset
from ..engine.evaluate import accuracy, goal_mask
from ..intake.events import ForgetRequest
from ..engine.objectives import goal_gap, goal_met
from ..engine.unlearn import Fragment, FragmentOutcome, UnlearnConfig, Unlearner

__all__ = ["FragmentResult", "FragmentWorker", "RequestStatus"]


@dataclass(frozen=True)
class RequestStatus:
    status: str  # forgotten | relabelled | failed
    reason: str | None


@dataclass(frozen=True)
class FragmentResult:
    outcome: FragmentOutcome
    statuses: list[RequestStatus]  # one per request, in order
    forgotten: ForgottenSet  # the retained set after this fragment (this fragment first)
    retained_met: tuple[bool, ...]  # per instance of `forgotten`: its goal holds on the new weights
    accuracies: dict[str, float]  # fragment | forgotten | audit -> ratio (absent: no such set)
    evaluate_seconds: float
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)  # for the manifest


class FragmentWorker:
    """The daemon's engine side. `run` may be called from a worker thread; nothing else touches
    the model meanwhile."""

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, num_classes: int, forgotten: ForgottenSet,
                 teacher: nn.Module | None = None, audit: Dataset | None = None, buffer: Dataset | None = None,
                 audit_baseline: float | None = None):
        self.model, self.cfg, self.audit, self.audit_baseline = model, cfg, audit, audit_baseline
        self.forgotten = forgotten
        self._unlearner = Unlearner(model, cfg, num_classes, buffer=buffer,
                                    forgotten=_as_fragment(forgotten) if len(forgotten) else None, teacher=teacher)

    def reset(self, state_dict: dict[str, torch.Tensor], forgotten: ForgottenSet) -> None:
        """Make the model and the retained set those of a checkpoint (after a rollback)."""
        self.model.load_state_dict(state_dict)
        self.reset_forgotten(forgotten)

    def drop(self, request_ids: set[str]) -> None:
        """Take shredded instances out of the retained set and the anti-resurrection objective."""
        self.reset_forgotten(self.forgotten.without(request_ids))

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

    def run(self, requests: Sequence[ForgetRequest], cancel: threading.Event | None = None,
            progress: Callable[[int, float, int], None] | None = None) -> FragmentResult | None:
        """Unlearn `requests` as one fragment; None when cancelled (the model must then be discarded)."""
        x = torch.stack([r.x for r in requests])  # (k, C, H, W)
        y = torch.tensor([r.label for r in requests], dtype=torch.int64)
        target = torch.tensor([r.target for r in requests], dtype=torch.int64)
        outcome = self._unlearner.unlearn(Fragment(x, y, target), progress=progress, cancel=cancel)
        if outcome.stopped_by == "cancelled":
            return None
        start = time.perf_counter()
        forgotten = self.forgotten.prepend(x, y, target, [r.request_id for r in requests])
        self.forgotten = forgotten
        statuses = _statuses(self.model, requests, x, y, target, outcome, self.cfg)
        retained_met = tuple(goal_mask(self.model, forgotten.x, forgotten.y, forgotten.target).tolist())
        accuracies = {"fragment": accuracy(self.model, x, y), "forgotten": accuracy(self.model, forgotten.x, forgotten.y)}
        if self.audit is not None:
            accuracies["audit"] = accuracy(self.model, self.audit.x, self.audit.y)
        seconds = time.perf_counter() - start
        metrics: dict[str, float | int | str | None] = {
            "stopped_by": outcome.stopped_by, "steps": outcome.steps, "unlearn_seconds": round(outcome.seconds, 3),
            "missed": outcome.missed, "resurrected_at_start": outcome.resurrected_at_start,
            "attack_success_ratio": _finite(outcome.attack_success_ratio),
            "fragment_accuracy": _finite(accuracies["fragment"]), "forgotten_accuracy": _finite(accuracies["forgotten"]),
            "audit_accuracy": _finite(accuracies.get("audit")), "audit_baseline_accuracy": _finite(self.audit_baseline),
            "forgotten_instances": len(forgotten),
        }
        return FragmentResult(outcome, statuses, forgotten, retained_met, accuracies, seconds, metrics)


def _as_fragment(forgotten: ForgottenSet) -> Fragment:
    return Fragment(forgotten.x, forgotten.y, forgotten.target)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@torch.no_grad()
def _statuses(model: nn.Module, requests: Sequence[ForgetRequest], x: torch.Tensor, y: torch.Tensor,
              target: torch.Tensor, outcome: FragmentOutcome, cfg: UnlearnConfig) -> list[RequestStatus]:
    """forgotten / relabelled when the instance meets its goal; failed (with by how much) when not."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(x.to(device)).cpu()  # (k, num_classes)
    finally:
        model.train(was_training)
    # Judged in eval mode, as the published model serves (the engine may step in train mode).
    met = goal_met(logits, y, target)
    gaps = goal_gap(logits, y, target)  # > 0: goal missed by this logit margin
    predicted = logits.argmax(1)
    cap = {"step_cap": f"step cap {cfg.max_steps} hit", "time_cap": f"time cap {cfg.max_seconds:g} s hit",
           "goal": "goal reached for the fragment"}.get(outcome.stopped_by, outcome.stopped_by)
    statuses = []
    for i, request in enumerate(requests):
        if bool(met[i]):
            statuses.append(RequestStatus("relabelled" if request.mode == "relabel" else "forgotten", None))
        elif request.mode == "relabel":
            statuses.append(RequestStatus("failed", (
                f"{cap}: instance predicted as {int(predicted[i])}, not its target {request.target_label} "
                f"(target logit {float(gaps[i]):.3f} below the top class); kept in the retained set")))
        else:
            statuses.append(RequestStatus("failed", (
                f"{cap}: instance still predicted as its label {request.label} "
                f"(logit margin {float(gaps[i]):.3f} above the next class); kept in the retained set")))
    return statuses
