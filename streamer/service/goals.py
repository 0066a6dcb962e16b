"""Conflicting goals for one instance, found at intake.

Each request asks for a set of classes its instance may be predicted as: every class but the
label (misclassify) or exactly the target (relabel). Two requests for the same instance (the
same pixels, by sha256 of the float32 bytes) conflict when those sets do not intersect: e.g. a
relabel to 5 and a relabel to 7, or a relabel to 5 and a misclassify of an instance labelled 5.
Such a request could never be met without breaking the other, and as a retained instance it
would tax every later fragment; it is rejected naming the request it conflicts with.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from ..intake.events import ForgetRequest
from ..state.checkpoints import ForgottenSet

__all__ = ["GoalIndex", "instance_sha256"]

Entry = tuple[str, int, int, torch.Tensor]  # (request_id, label, target (-1: misclassify), x (C, H, W))


def instance_sha256(x: torch.Tensor) -> str:
    """sha256 of an instance's pixels as little-endian float32 bytes (C, H, W), hex."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def _allowed(label: int, target: int, num_classes: int) -> set[int]:
    return {target} if target >= 0 else set(range(num_classes)) - {label}


class GoalIndex:
    """The goals already asked of each instance: the retained (applied) set, read through
    `retained()` so it follows rollbacks and abandoned instances, plus the pending fragment."""

    def __init__(self, retained: Callable[[], ForgottenSet], num_classes: int):
        self._retained, self._num_classes = retained, num_classes
        self._seen: ForgottenSet | None = None
        self._index: dict[str, list[tuple[str, int, int]]] = {}

    def conflict(self, request: ForgetRequest, pending: Sequence[Entry] = ()) -> str | None:
        """A reason naming the conflicting request, or None."""
        digest = instance_sha256(request.x)
        others = list(self._applied().get(digest, ()))
        others += [(rid, label, target) for rid, label, target, x in pending if instance_sha256(x) == digest]
        allowed = _allowed(request.label, request.target, self._num_classes)
        for rid, label, target in others:
            if rid != request.request_id and not allowed & _allowed(label, target, self._num_classes):
                return (f"conflicts with request {rid} for the same instance ({_goal(label, target)}): no prediction "
                        f"can meet both that and {_goal(request.label, request.target)}")
        return None

    def _applied(self) -> dict[str, list[tuple[str, int, int]]]:
        retained = self._retained()
        if retained is not self._seen:  # rebuilt only when the retained set object changes
            self._index = {}
            for x, y, t, rid in zip(retained.x, retained.y.tolist(), retained.target.tolist(), retained.request_ids):
                self._index.setdefault(instance_sha256(x), []).append((rid, int(y), int(t)))
            self._seen = retained
        return self._index


def _goal(label: int, target: int) -> str:
    return f"relabel {label} -> {target}" if target >= 0 else f"misclassify, label {label}"
