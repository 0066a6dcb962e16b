"""The failure policy: what happens to requests when something goes wrong, in one place.

| class          | examples                                              | outcome for the requests                    | the daemon            |
|----------------|-------------------------------------------------------|---------------------------------------------|-----------------------|
| record         | undecodable batch (codec, CRC), not UTF-8/JSON,       | dead letter + ledger row + `rejected`       | keeps going           |
|                | duplicate keys, bad text, failed validation, conflict | receipt (when a request_id can be read)     |                       |
| fragment       | the engine or model raises (incl. CUDA OOM) or gives  | bisection from the last good model: healthy | keeps going; counted  |
|                | NaN/Inf logits on some input                          | requests applied, each culprit `failed`     | and alerted           |
| guard rail     | audit accuracy below the utility floor                | the group's requests `failed` with the      | keeps going; alerted  |
|                |                                                       | measured drop; CURRENT stays                |                       |
| unreachable    | an instance misses its goal max_missed_fragments      | `abandoned` in the ledger; leaves the       | keeps going; alerted  |
|                | fragments in a row                                    | retained set                                |                       |
| infrastructure | broker gone past its deadline, disk full, damaged     | none yet: nothing committed past them       | stops with one line;  |
|                | state, ledger unwritable                              |                                             | resumes exactly once  |

Record-level handling lives in collector.py and undecodable.py; this module holds the fragment
level: `FragmentFailure` and `run_quarantined`, which the pipeline calls in its worker thread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import StreamerError
from ..intake.samples import storable_text

if TYPE_CHECKING:
    from .collector import Accepted
    from .fragments import FragmentResult, FragmentWorker, RequestStatus

__all__ = ["EngineFailure", "FragmentFailure", "NonFiniteOutputs", "QuarantineRun", "UtilityFloorBreached",
           "run_quarantined"]


class FragmentFailure(StreamerError):
    """A group of requests could not be applied; `bisect`: retrying smaller groups may isolate a culprit."""

    kind = "fragment"
    bisect = True

    def __init__(self, reason: str):
        reason = storable_text(reason if len(reason) <= 1000 else f"{reason[:1000]}... ({len(reason)} characters)")
        super().__init__(reason)
        self.reason = reason


class EngineFailure(FragmentFailure):
    """The engine or the model raised on this group's inputs."""

    kind = "engine_error"


class NonFiniteOutputs(FragmentFailure):
    """After unlearning, the model gives NaN/Inf logits: the version would be broken."""

    kind = "non_finite"


class UtilityFloorBreached(FragmentFailure):
    """After unlearning, audit accuracy is below the floor: refused whole (the method, not one input)."""

    kind = "utility_floor"
    bisect = False


@dataclass
class QuarantineRun:
    """The outcome of one collected fragment under the failure policy."""

    applied: list[tuple[Accepted, RequestStatus]] = field(default_factory=list)  # in the model
    failed: list[tuple[Accepted, str]] = field(default_factory=list)  # never applied, with the reason
    result: FragmentResult | None = None  # of the last group applied (metrics, retained set)
    trips: list[str] = field(default_factory=list)  # FragmentFailure.kind of every failed attempt
    abandoned: dict[str, str] = field(default_factory=dict)  # request_id -> reason, over all groups
    stage_seconds: dict[str, float] = field(default_factory=dict)


def run_quarantined(worker: FragmentWorker, accepted: Sequence[Accepted], cancel: threading.Event,
                    progress: Callable[[int, float, int], None] | None, log: Any) -> QuarantineRun | None:
    """Apply `accepted` as one fragment; when it fails, restore the last good model and retry
    halves (bisection) until every healthy request is applied and every request that fails on
    its own is isolated: at most 2k - 1 attempts for k requests. None if cancelled."""
    run = QuarantineRun()
    groups = [list(accepted)]
    while groups:
        group = groups.pop(0)
        snap = worker.snapshot()
        try:
            result = worker.run([a.request for a in group], cancel=cancel, progress=progress)
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
                run.failed += [(a, err.reason) for a in group]
            continue
        if result is None:  # cancelled: nothing of this fragment is published
            worker.restore(snap)
            return None
        run.applied += list(zip(group, result.statuses))
        run.result = result
        run.abandoned.update(result.abandoned)
        for stage, seconds in {**result.outcome.stage_seconds, "evaluate": result.evaluate_seconds}.items():
            run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + seconds
    return run
