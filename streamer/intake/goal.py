"""A request's goal as a typed value (README "Goals: which `mode` to use").

    misclassify   the instance is predicted as any class but its label (the paper's goal)
    relabel       it is predicted as `target_class` (the event's target_label)
    unseen        it goes where a model that never saw it puts it: `target_class` is the class the
                  engine resolved it to when it was first applied (None before)

The engine encodes a goal as one integer per row of `engine.Fragment.target` (-1 misclassify, a
class, -2 unseen not resolved yet); that encoding stays at the engine's boundary:
`Goal.engine_target` and `Goal.from_engine` convert.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import REQUEST_MODES
from ..engine import UNSEEN

MISCLASSIFY = -1  # engine.Fragment.target of a misclassify row

__all__ = ["Goal"]


@dataclass(frozen=True)
class Goal:
    """What one request asks of its instance's prediction.

    `label` is the instance's trained class (None where it was not recorded: the ledger keeps
    only the mode and target class). Raises ValueError for an unknown mode."""

    mode: str  # misclassify | relabel | unseen
    label: int | None = None
    target_class: int | None = None  # relabel: the requested class; unseen: the resolved class, once applied

    def __post_init__(self) -> None:
        if self.mode not in REQUEST_MODES:
            raise ValueError(f"unknown goal mode {self.mode!r}; expected one of {', '.join(REQUEST_MODES)}")

    @staticmethod
    def from_engine(label: int, target: int, unseen: bool) -> Goal:
        """A goal from `engine.Fragment`'s encoding (e.g. a retained set's row; `unseen` tells an
        unseen goal's resolved class from a relabel's)."""
        if unseen:
            return Goal("unseen", label, None if target == UNSEEN else target)
        return Goal("misclassify", label) if target == MISCLASSIFY else Goal("relabel", label, target)

    @property
    def unseen(self) -> bool:
        return self.mode == "unseen"

    @property
    def resolved(self) -> bool:
        """False only for an unseen goal whose class the engine has not decided yet."""
        return not self.unseen or self.target_class is not None

    @property
    def engine_target(self) -> int:
        """This goal in `engine.Fragment.target`'s encoding: -1, a class, or -2 (unseen, unresolved)."""
        if self.mode == "misclassify":
            return MISCLASSIFY
        if self.target_class is None:
            return UNSEEN if self.unseen else MISCLASSIFY
        return self.target_class

    def with_engine_target(self, target: int) -> Goal:
        """The goal as the engine applied it (`target`: its row of the resolved targets): an unseen
        goal takes the class it resolved to. Raises ValueError for an unresolved (-2) target."""
        if target < MISCLASSIFY:
            raise ValueError(f"the engine left goal {self.describe()} unresolved (target {target})")
        return Goal(self.mode, self.label, target) if self.unseen else self

    def allowed(self, num_classes: int) -> frozenset[int] | None:
        """The classes that meet this goal (None: an unseen goal not resolved yet)."""
        if not self.resolved:
            return None
        if self.mode == "misclassify":
            return frozenset(range(num_classes)) - {self.label}
        return frozenset({self.target_class}) if self.target_class is not None else frozenset()

    def describe(self) -> str:
        if self.unseen:
            resolved = f", resolved to class {self.target_class}" if self.target_class is not None else ""
            return f"unseen, label {self.label}{resolved}"
        if self.mode == "relabel":
            return f"relabel {self.label} -> {self.target_class}"
        return f"misclassify, label {self.label}"
