"""What the engine works on and what it reports: a fragment of instances to forget, and the
outcome of unlearning it (how it stopped, and why a cap was hit)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Fragment", "FragmentOutcome", "cap_cause"]


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
