"""Conflicting goals for one instance, found at intake.

Each request asks for a set of classes its instance may be predicted as: every class but the
label (misclassify) or exactly the target (relabel). Two requests for the same instance (the
same pixels, by sha256 of the float32 bytes) conflict when those sets do not intersect: e.g. a
relabel to 5 and a relabel to 7, or a relabel to 5 and a misclassify of an instance labelled 5.
An unseen request's class is known only once the engine resolves it, so an unseen request
conflicts with any misclassify or relabel of the same instance (pending or applied), and not
with another unseen one (the same goal). Such a request could never be met without breaking the
other, and as a retained instance it would tax every later fragment; it is rejected naming the
request it conflicts with.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..engine.unseen import UNSEEN
from ..intake.events import ForgetRequest
from ..state.checkpoints import ForgottenSet

__all__ = ["GoalIndex", "instance_sha256"]

Entry = tuple[str, int, int, torch.Tensor]  # (request_id, label, target (-1: misclassify, -2: unseen), x (C, H, W))


class _Goal(NamedTuple):
    request_id: str
    label: int
    target: int  # -1: misclassify; c: relabel to c, or unseen resolved to c; -2: unseen, not resolved yet
    unseen: bool


def instance_sha256(x: torch.Tensor) -> str:
    """sha256 of an instance's pixels as little-endian float32 bytes (C, H, W), hex."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def _compatible(a: _Goal, b: _Goal, num_classes: int) -> bool:
    if a.unseen or b.unseen:
        return a.unseen and b.unseen
    return bool(_allowed(a, num_classes) & _allowed(b, num_classes))


def _allowed(goal: _Goal, num_classes: int) -> set[int]:
    return {goal.target} if goal.target >= 0 else set(range(num_classes)) - {goal.label}


class GoalIndex:
    """The goals already asked of each instance: the retained (applied) set, read through
    `retained()` so it follows rollbacks and abandoned instances, plus the pending fragment."""

    def __init__(self, retained: Callable[[], ForgottenSet], num_classes: int):
        self._retained, self._num_classes = retained, num_classes
        self._seen: ForgottenSet | None = None
        self._index: dict[str, list[_Goal]] = {}

    def conflict(self, request: ForgetRequest, pending: Sequence[Entry] = ()) -> str | None:
        """A reason naming the conflicting request, or None. `pending`: the requests collected so
        far (an unseen one with target -2)."""
        digest = instance_sha256(request.x)
        others = list(self._applied().get(digest, ()))
        others += [_Goal(rid, label, target, target == UNSEEN) for rid, label, target, x in pending
                   if instance_sha256(x) == digest]
        goal = _Goal(request.request_id, request.label, request.target, request.mode == "unseen")
        for other in others:
            if other.request_id != request.request_id and not _compatible(goal, other, self._num_classes):
                why = (f"no prediction can meet both that and {_describe(goal)}" if not (goal.unseen or other.unseen)
                       else f"this request is {_describe(goal)}, and an unseen goal takes the class the model decides, "
                            "so it cannot be combined with a misclassify or relabel of the same instance")
                return f"conflicts with request {other.request_id} for the same instance ({_describe(other)}): {why}"
        return None

    def reused(self, request: ForgetRequest, pending: Sequence[Entry] = ()) -> str | None:
        """Why `request` reuses the request_id of an applied (still retained) or pending request with
        other content -- another instance, label or goal -- or None (new, or the same request
        again: a duplicate). An idempotency key names one request; a repeat with other content is
        not that request, and answering it `duplicate` would leave its instance unforgotten.
        Shredded requests' content is gone, so their ids can only be recognised as duplicates."""
        digest, unseen = instance_sha256(request.x), request.mode == "unseen"
        earlier = [(d, g) for d, goals in self._applied().items() for g in goals if g.request_id == request.request_id]
        earlier += [(instance_sha256(x), _Goal(rid, label, target, target == UNSEEN)) for rid, label, target, x in pending
                    if rid == request.request_id]
        for other_digest, other in earlier:
            if other_digest != digest:
                what = "another instance (other pixels)"
            elif other.label != request.label:
                what = f"another label ({request.label}, was {other.label})"
            elif other.unseen != unseen or (not unseen and other.target != request.target):
                what = f"another goal ({_describe(_Goal(request.request_id, request.label, request.target, unseen))}, " \
                       f"was {_describe(other)})"
            else:
                continue
            return (f"request_id {request.request_id} is already used by a request for {what}: a request_id names one "
                    "request; send this one under a new request_id")
        return None

    def _applied(self) -> dict[str, list[_Goal]]:
        retained = self._retained()
        if retained is not self._seen:  # rebuilt only when the retained set object changes
            self._index = {}
            for x, y, t, rid in zip(retained.x, retained.y.tolist(), retained.target.tolist(), retained.request_ids):
                self._index.setdefault(instance_sha256(x), []).append(_Goal(rid, int(y), int(t), rid in retained.unseen))
            self._seen = retained
        return self._index


def _describe(goal: _Goal) -> str:
    if goal.unseen:
        resolved = f", resolved to class {goal.target}" if goal.target >= 0 else ""
        return f"unseen, label {goal.label}{resolved}"
    return f"relabel {goal.label} -> {goal.target}" if goal.target >= 0 else f"misclassify, label {goal.label}"
