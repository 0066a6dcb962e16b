"""What the engine works on and what it reports: a fragment of instances to forget, and the
outcome of unlearning it (how it stopped, and why a cap was hit)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = ["Fragment", "FragmentOutcome", "StopTest", "Trend", "cap_cause"]


@dataclass(frozen=True)
class Fragment:
    """k instances to forget. target[i] = -1: misclassify; c >= 0: relabel to class c; -2: unseen
    (resolved to a class by `Unlearner.resolve_unseen` when the fragment starts)."""

    x: torch.Tensor  # (k, C, H, W) pixels in [0, 1]
    y: torch.Tensor  # (k,) original labels
    target: torch.Tensor  # (k,)
    unseen: torch.Tensor | None = None  # (k,) bool: the goal is unseen (kept once target is resolved); None: none

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Fragment":
        return Fragment(self.x.to(device), self.y.to(device), self.target.to(device),
                        None if self.unseen is None else self.unseen.to(device))

    def unseen_mask(self) -> torch.Tensor:
        """(k,) bool: rows whose goal is unseen (pending, target -2, or resolved)."""
        return (self.unseen if self.unseen is not None else torch.zeros_like(self.y, dtype=torch.bool)) | (
            self.target == -2)

    @staticmethod
    def cat(parts: list["Fragment"]) -> "Fragment":
        x, y, target = (torch.cat([getattr(p, n) for p in parts]) for n in ("x", "y", "target"))
        unseen = torch.cat([p.unseen_mask() for p in parts]) if any(p.unseen is not None for p in parts) else None
        return Fragment(x, y, target, unseen)


@dataclass(frozen=True)
class FragmentOutcome:
    goal_reached: bool  # every instance of the fragment (and every retained one) meets its goal
    stopped_by: str  # goal | step_cap | time_cap | cancelled | non_finite (the loss became NaN/Inf)
    steps: int
    seconds: float
    fragment_met: list[bool]  # per instance of the fragment
    missed: int  # instances (fragment + retained) still missing their goal
    resurrected_at_start: int  # retained instances that had come back before this fragment
    attack_success_ratio: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    missed_trend: tuple[tuple[int, int], ...] = ()  # (step, instances missing their goal), every 25 steps and the last
    cap_cause: str | None = None  # step_cap/time_cap only: "time" | "steps" (still progressing at that cap) | "difficulty" (stalled)
    targets: list[int] = field(default_factory=list)  # per instance of the fragment, unseen (-2) resolved to its class
    # unseen + buffer, memorised instances (unseen.FeatureGoal): per instance of the fragment, its
    # features' relative L2 distance to its class's prototype at the stop (None: no feature goal)
    feature_gaps: list[float | None] = field(default_factory=list)
    feature_tol: float | None = None  # unseen_feature_tol when a feature goal ran
    # ... and its label confidence above its cap (nats, <= 0: met; None: no confidence part)
    confidence_excess: list[float | None] = field(default_factory=list)
    feature_unmet_retained: int = 0  # retained instances whose feature goal (either part) is off at the stop

    @property
    def feature_goal_met(self) -> bool | None:
        """None without a feature goal; False when a cap stopped the fragment with every class goal
        met but some instance still off its prototype or above its confidence cap (stopped_by is
        then "goal": best effort)."""
        if self.feature_tol is None:
            return None
        return (all(g is None or g <= self.feature_tol for g in self.feature_gaps)
                and all(e is None or e <= 0 for e in self.confidence_excess) and self.feature_unmet_retained == 0)


_TREND_EVERY = 25


def cap_cause(stopped_by: str, trend: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> str | None:
    """Why a step or time cap was hit: "time" (time cap) or "steps" (step cap) when the count of
    instances missing their goal still fell over the last half of the steps taken (more time or
    more steps would most likely have reached the goal: the cap, not the fragment, decided),
    "difficulty" when it did not (stalled). None for any other stop."""
    if stopped_by not in ("step_cap", "time_cap") or not trend:
        return None
    last_step, last_missed = trend[-1]
    earlier = [missed for step, missed in trend if step <= last_step / 2]
    if not (earlier and last_missed < earlier[-1]):
        return "difficulty"
    return "time" if stopped_by == "time_cap" else "steps"


class Cancelled(Protocol):
    def is_set(self) -> bool: ...  # e.g. threading.Event


@dataclass
class StopTest:
    """Why a fragment's step loop stops before step `steps`, or None to take it: `goal` (every
    instance meets its goal, and every feature target when there are some), `step_cap` /
    `time_cap` (at a cap the feature goal is best effort: with every class goal met, the goal),
    `cancelled`."""

    max_steps: int
    max_seconds: float
    cancel: Cancelled | None = None
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, steps: int, met: bool, features_met: bool = True) -> str | None:
        if met and features_met:
            return "goal"
        capped = ("step_cap" if steps >= self.max_steps
                  else "time_cap" if time.perf_counter() - self.started >= self.max_seconds else None)
        if capped is not None:
            return "goal" if met else capped
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        return None


@dataclass
class Trend:
    """(step, instances missing their goal) every _TREND_EVERY steps and at the last: why a cap
    was hit (`cap_cause`), and the reason a `failed` receipt quotes."""

    points: list[tuple[int, int]] = field(default_factory=list)

    def observe(self, step: int, missing: int) -> None:
        if step % _TREND_EVERY == 0:
            self.points.append((step, missing))

    def close(self, step: int, missing: int) -> tuple[tuple[int, int], ...]:
        if not self.points or self.points[-1][0] != step:
            self.points.append((step, missing))
        return tuple(self.points)
