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

from ..state.checkpoints import ForgottenSet, ModelFile
from ..engine.data import Dataset
from ..engine.evaluate import accuracy
from ..engine.formats import save_user_model
from ..engine.models import load_net_state
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
    accuracies: dict[str, float]  # fragment | forgotten | audit -> ratio (absent: no such set)
    evaluate_seconds: float
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)  # for the manifest


class FragmentWorker:
    """The daemon's engine side. `run` may be called from a worker thread; nothing else touches
    the model meanwhile. `model` is the user's network inside `Normalized`; versions publish the
    network alone in `model_format` (`export` needs `input_shape`, C, H, W)."""

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, num_classes: int, forgotten: ForgottenSet,
                 teacher: nn.Module | None = None, audit: Dataset | None = None, buffer: Dataset | None = None,
                 audit_baseline: float | None = None, model_format: str = "state_dict",
                 input_shape: tuple[int, int, int] | None = None):
        self.model, self.cfg, self.audit, self.audit_baseline = model, cfg, audit, audit_baseline
        self.forgotten, self.model_format, self.input_shape = forgotten, model_format, input_shape
        self._unlearner = Unlearner(model, cfg, num_classes, buffer=buffer,
                                    forgotten=_as_fragment(forgotten) if len(forgotten) else None, teacher=teacher)

    def model_file(self) -> ModelFile:
        """The user's network with the current weights, as the file a version publishes. Raises
        ModelLoadError when the network cannot be written in the format (checked at start-up)."""
        return ModelFile(self.model_format, save_user_model(self._unlearner.net, self.model_format, self.input_shape))

    def describe_trainable(self) -> dict:
        """The parameters unlearning moves, by name, with counts (for the start-up log)."""
        return self._unlearner.describe_trainable()

    def reset(self, state_dict: dict[str, torch.Tensor], forgotten: ForgottenSet) -> None:
        """Make the model and the retained set those of a checkpoint (after a rollback); the
        state_dict is the user's network's (or, from an older version, the wrapper's)."""
        load_net_state(self.model, state_dict, where="the checkpoint")
        self.forgotten = forgotten
        device = next(self.model.parameters()).device
        self._unlearner.forgotten = _as_fragment(forgotten).to(device) if len(forgotten) else None

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
        return FragmentResult(outcome, statuses, forgotten, accuracies, seconds, metrics)


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
