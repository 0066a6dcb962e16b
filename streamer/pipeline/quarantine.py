"""The fragment-level failure policy (failures.py): bisect a failing fragment until every
healthy request is applied and each request that fails on its own is isolated; a group past the
utility budget is deferred whole."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..state import RequestOutcome
from .collector import Accepted
from .failures import FragmentFailure, UtilityFloorBreached
from .worker import FragmentResult, FragmentWorker

__all__ = ["DEFERRED_REASON", "FragmentRun", "run_quarantined"]

# What a producer is told (the measured numbers stay in the log and the ledger's `numbers`)
DEFERRED_REASON = ("deferred: applying it now would take the served model past its utility budget "
                   "(unlearning.max_audit_drop); it is owed, kept encrypted in the forget vault, and applied when a "
                   "model retrained without the deleted data takes over (streamer rebase)")


@dataclass
class FragmentRun:
    """One collected fragment after the failure policy: every request's outcome, not yet settled."""

    outcomes: list[RequestOutcome] = field(default_factory=list)  # applied ones, and failed ones never applied
    result: FragmentResult | None = None  # of the last group applied (metrics, retained set)
    trips: list[str] = field(default_factory=list)  # FragmentFailure.kind of every failed attempt
    abandoned: dict[str, str] = field(default_factory=dict)  # request_id -> reason, over all groups
    stage_seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, Accepted] = field(default_factory=dict)  # request_id -> the request (for the vault)
    applied_ids: set[str] = field(default_factory=set)
    refused: dict[str, float | int | None] = field(default_factory=dict)  # the numbers of the last deferral
    failed_steps: int = 0  # optimizer steps of the attempts that failed (where the failure counted them)
    seconds: float = 0.0  # wall time of every attempt

    @property
    def applied(self) -> list[RequestOutcome]:
        """The outcomes of requests in the model (a version follows)."""
        return [o for o in self.outcomes if o.request_id in self.applied_ids]

    @property
    def deferred(self) -> list[RequestOutcome]:
        """The outcomes of requests deferred by the utility budget (owed; a version holds them)."""
        return [o for o in self.outcomes if o.status == "deferred"]

    @property
    def failed(self) -> list[RequestOutcome]:
        """The outcomes of requests the policy never applied and does not owe (`failed`, no version)."""
        return [o for o in self.outcomes if o.request_id not in self.applied_ids and o.status == "failed"]


def run_quarantined(worker: FragmentWorker, accepted: Sequence[Accepted], cancel: threading.Event,
                    progress: Callable[[int, float, int], None] | None, log: Any) -> FragmentRun | None:
    """Apply `accepted` as one fragment; when it fails, restore the last good model and retry
    halves (bisection) until every healthy request is applied and every request that fails on
    its own is isolated: at most 2k - 1 attempts for k requests. None if cancelled."""
    run = FragmentRun(items={a.request.request_id: a for a in accepted})
    groups, start = [list(accepted)], time.perf_counter()
    while groups:
        group = groups.pop(0)
        snap = worker.snapshot()
        try:
            result = worker.run(group, cancel=cancel, progress=progress)
        except FragmentFailure as err:
            worker.restore(snap)
            run.trips.append(err.kind)
            run.failed_steps += int(err.numbers.get("steps") or 0)
            split = err.bisect and len(group) > 1
            log.warning("fragment_group_failed", kind=err.kind, requests=len(group), reason=err.reason,
                        next="bisect" if split else "failed", request_ids=[a.request.request_id for a in group])
            if split:
                half = len(group) // 2
                groups[:0] = [group[:half], group[half:]]
            elif isinstance(err, UtilityFloorBreached):
                run.outcomes += [a.outcome("deferred", DEFERRED_REASON, numbers=err.numbers) for a in group]
                run.refused = err.numbers
            else:
                run.outcomes += [a.outcome("failed", err.reason) for a in group]
            continue
        if result is None:  # cancelled: nothing of this fragment is published
            worker.restore(snap)
            return None
        run.outcomes += result.outcomes
        run.applied_ids.update(a.request.request_id for a in group)
        run.result = result
        run.abandoned.update(result.abandoned)
        for stage, seconds in {**result.outcome.stage_seconds, "evaluate": result.evaluate_seconds}.items():
            run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + seconds
    run.seconds = time.perf_counter() - start
    return run
