"""Conflicting goals for one instance, found at intake.

Each request asks for a set of classes its instance may be predicted as: every class but the
label (misclassify) or exactly the target (relabel). Two requests for the same instance (the
same pixels, by sha256 of the float32 bytes) conflict when those sets do not intersect: e.g. a
relabel to 5 and a relabel to 7, or a relabel to 5 and a misclassify of an instance labelled 5.
An unseen request's class is known only once the engine resolves it, so an unseen request
conflicts with any misclassify or relabel of the same instance (pending or applied), and not
with another unseen one (the same goal). Such a request could never be met without breaking the
other, and as a retained instance it would tax every later fragment; it is rejected.

The reasons go back to the producer (dead letter and receipt), so they name this request's own
goal only: never the other request's id, goal or label (that someone else asked to forget the
image is not this producer's to learn beyond the refusal itself). `InvalidEvent.detail`, for the
operator's log, names the other request.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..intake import ForgetRequest, Goal, InvalidEvent
from ..state import ForgottenSet

__all__ = ["GoalIndex", "instance_sha256"]

Entry = tuple[str, Goal, torch.Tensor]  # (request_id, goal, x (C, H, W)) of a pending request


class _Asked(NamedTuple):
    request_id: str
    goal: Goal


def instance_sha256(x: torch.Tensor) -> str:
    """sha256 of an instance's pixels as little-endian float32 bytes (C, H, W), hex."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def _compatible(a: Goal, b: Goal, num_classes: int) -> bool:
    if a.unseen or b.unseen:
        return a.unseen and b.unseen
    return bool(a.allowed(num_classes) & b.allowed(num_classes))


def _same(a: Goal, b: Goal) -> bool:
    """The same goal for the same label (an unseen goal is the same whatever it resolved to)."""
    return a.mode == b.mode and (a.unseen or a.target_class == b.target_class)


class GoalIndex:
    """The goals already asked of each instance: the retained (applied) set, read through
    `retained()` so it follows rollbacks and abandoned instances, plus the pending fragment."""

    def __init__(self, retained: Callable[[], ForgottenSet], num_classes: int):
        self._retained, self._num_classes = retained, num_classes
        self._seen: ForgottenSet | None = None
        self._index: dict[str, list[_Asked]] = {}

    def conflict(self, request: ForgetRequest, pending: Sequence[Entry] = ()) -> InvalidEvent | None:
        """The rejection of `request` when its goal conflicts with another's for the same instance
        (its detail names the other request), or None. `pending`: the requests collected so far."""
        digest = instance_sha256(request.x)
        others = list(self._applied().get(digest, ()))
        others += [_Asked(rid, goal) for rid, goal, x in pending if instance_sha256(x) == digest]
        goal = request.goal
        for other in others:
            if other.request_id != request.request_id and not _compatible(goal, other.goal, self._num_classes):
                why = (f"no prediction can meet both that goal and {goal.describe()}"
                       if not (goal.unseen or other.goal.unseen) else
                       f"this request is {goal.describe()}, and an unseen goal takes the class the model decides, "
                       "so it cannot be combined with a misclassify or relabel of the same instance")
                return InvalidEvent(f"conflicts with a goal already asked for the same instance: {why}",
                                    request.request_id, detail=f"conflicts with request {other.request_id} for the "
                                                               f"same instance ({other.goal.describe()}): {why}")
        return None

    def reused(self, request: ForgetRequest, pending: Sequence[Entry] = ()) -> InvalidEvent | None:
        """The rejection of `request` when it reuses the request_id of an applied (still retained) or
        pending request with other content -- another instance, label or goal (the reason says
        which, its detail also what the first request had) -- or None (new, or the same request
        again: a duplicate). An idempotency key names one request; a repeat with other content is
        not that request, and answering it `duplicate` would leave its instance unforgotten.
        Shredded requests' content is gone, so their ids can only be recognised as duplicates."""
        digest, goal = instance_sha256(request.x), request.goal
        earlier = [(d, a) for d, asked in self._applied().items() for a in asked if a.request_id == request.request_id]
        earlier += [(instance_sha256(x), _Asked(rid, g)) for rid, g, x in pending if rid == request.request_id]
        for other_digest, other in earlier:
            if other_digest != digest:
                what, was = "another instance (other pixels)", ""
            elif other.goal.label != goal.label:
                what, was = "another label", f" ({goal.label}, was {other.goal.label})"
            elif not _same(goal, other.goal):
                what, was = "another goal", f" ({goal.describe()}, was {other.goal.describe()})"
            else:
                continue
            text = (f"request_id {request.request_id} is already used by a request for {what}{{}}: a request_id names "
                    "one request; send this one under a new request_id")
            return InvalidEvent(text.format(""), request.request_id, detail=text.format(was))
        return None

    def _applied(self) -> dict[str, list[_Asked]]:
        retained = self._retained()
        if retained is not self._seen:  # rebuilt only when the retained set object changes
            self._index = {}
            for x, y, t, rid in zip(retained.x, retained.y.tolist(), retained.target.tolist(), retained.request_ids):
                goal = Goal.from_engine(int(y), int(t), rid in retained.unseen)
                self._index.setdefault(instance_sha256(x), []).append(_Asked(rid, goal))
            self._seen = retained
        return self._index
