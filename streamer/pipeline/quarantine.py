"""The fragment-level failure policy (failures.py): bisect a failing fragment until every
healthy request is applied and each request that fails on its own is isolated."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..state import RequestOutcome
from .collector import Accepted
from .failures import FragmentFailure
from .worker import FragmentResult, FragmentWorker

__all__ = ["FragmentRun", "run_quarantined"]


@dataclass
class FragmentRun:
    """One collected fragment after the failure policy: every request's outcome, not yet settled."""

    outcomes: list[RequestOutcome] = field(default_factory=list)  # applied ones, and failed ones never applied
    result: FragmentResult | None = None  # of the last group applied (metrics, retained set)
    trips: list[str] = field(default_factory=list)  # FragmentFailure.kind of every failed attempt
    abandoned: dict[str, str] = field(default_factory=dict)  # request_id -> reason, over all groups
    stage_seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, Accepted] = field(default_factory=dict)  # request_id -> the applied request (for the vault)

    @property
    def applied(self) -> list[RequestOutcome]:
        """The outcomes of requests in the model (a version follows)."""
        return [o for o in self.outcomes if o.request_id in self.items]

    @property
    def failed(self) -> list[RequestOutcome]:
        """The outcomes of requests the policy never applied."""
        return [o for o in self.outcomes if o.request_id not in self.items]


def run_quarantined(worker: FragmentWorker, accepted: Sequence[Accepted], cancel: threading.Event,
                    progress: Callable[[int, float, int], None] | None, log: Any) -> FragmentRun | None:
    """Apply `accepted` as one fragment; when it fails, restore the last good model and retry
    halves (bisection) until every healthy request is applied and every request that fails on
    its own is isolated: at most 2k - 1 attempts for k requests. None if cancelled."""
    run = FragmentRun()
    groups = [list(accepted)]
    while groups:
        group = groups.pop(0)
        snap = worker.snapshot()
        try:
            result = worker.run(group, cancel=cancel, progress=progress)
        except FragmentFailure as err:
            worker.restore(snap)
            run.trips.append(err.kind)
            split = err.bisect and len(group) > 1
            log.warning("fragment_group_failed", kind=err.kind, requests=len(group), reason=err.reason,
                        next="bisect" if split else "failed", request_ids=[a.request.request_id for a in group])
            if split:
                half = len(group) // 2
                groups[:0] = [group[:half], group[half:]]
            else:
                run.outcomes += [a.outcome("failed", err.reason) for a in group]
            continue
        if result is None:  # cancelled: nothing of this fragment is published
            worker.restore(snap)
            return None
        run.outcomes += result.outcomes
        run.items.update((a.request.request_id, a) for a in group)
        run.result = result
        run.abandoned.update(result.abandoned)
        for stage, seconds in {**result.outcome.stage_seconds, "evaluate": result.evaluate_seconds}.items():
            run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + seconds
    return run
