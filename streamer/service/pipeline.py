"""The fragment pipeline: unlearn -> evaluate -> publish -> ledger -> receipts -> commit.

    unlearn_and_publish   (worker thread)  engine, then the version dir written and CURRENT switched
    finish                (main thread)    ledger rows, receipts + checkpoint record, offsets committed

Each step is durable before the next starts, so a crash anywhere resumes exactly once: the
offsets are in the same atomic manifest as the model, and the ledger is rebuilt from manifests.
An exception from the engine surfaces from `unlearn_and_publish` as FragmentError (nothing was
published); this is the one place where a fragment-level failure policy decides what happens
to the fragment's requests.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import StreamerError
from ..state.checkpoints import CheckpointStore, Manifest
from ..state.ledger import Outcome
from . import outputs
from .collector import Accepted, Repeat
from .crash import CrashHook
from .fragments import FragmentResult, FragmentWorker
from .metrics import Metrics
from .outbox import Outbox

__all__ = ["FragmentError", "FragmentPipeline", "Published"]


class FragmentError(StreamerError):
    """The engine failed on a fragment: nothing was published or committed."""


@dataclass(frozen=True)
class Published:
    """A fragment whose version is CURRENT, not yet in the ledger."""

    result: FragmentResult
    manifest: Manifest
    stage_seconds: dict[str, float]


class FragmentPipeline:
    """Runs fragments through the engine and the durable outputs, in order."""

    def __init__(self, worker: FragmentWorker, store: CheckpointStore, outbox: Outbox, metrics: Metrics,
                 clock: Callable[[], float] = time.time, crash: CrashHook | None = None):
        self.worker, self.store, self._outbox, self._metrics, self._clock = worker, store, outbox, metrics, clock
        self._crash = crash if crash is not None else CrashHook()

    def unlearn_and_publish(self, accepted: Sequence[Accepted], repeats: Sequence[Repeat],
                            offsets: Mapping[str, Mapping[int, int]], parent: str,
                            cancel: threading.Event) -> Published | None:
        """Worker thread: unlearn, evaluate, write the version, switch CURRENT. None if cancelled.

        Raises FragmentError when the engine raised; the model is then in an unknown state."""

        def progress(step: int, loss: float, missing: int) -> None:
            self._crash.at("during_unlearn")

        try:
            result = self.worker.run([a.request for a in accepted], cancel=cancel, progress=progress)
        except Exception as err:
            raise FragmentError(f"unlearning a fragment failed: {err!r}") from err
        if result is None or cancel.is_set():  # stopping: an unpublished fragment is abandoned
            return None
        self._crash.at("during_unlearn")  # also when the goal needed no step at all
        start = time.perf_counter()
        requests = [_entry(a, s.status, s.reason) for a, s in zip(accepted, result.statuses)]
        duplicates = [_repeat_entry(r) for r in repeats]
        manifest = self.store.publish(parent, self.worker.model_file(), result.forgotten, requests=requests,
                                      offsets=offsets, metrics=result.metrics, duplicates=duplicates)
        stages = {**result.outcome.stage_seconds, "evaluate": result.evaluate_seconds,
                  "checkpoint": time.perf_counter() - start}
        return Published(result, manifest, stages)

    def finish(self, repeats: Sequence[Repeat], published: Published,
               commit: Callable[[Mapping[str, Mapping[int, int]]], None], log: Any) -> None:
        """Main thread, after CURRENT switched: ledger, receipts + checkpoint record, commit, metrics."""
        manifest, result = published.manifest, published.result
        self._crash.at("after_checkpoint")
        outcomes = [Outcome.from_json({**entry, "version": manifest.version, "completed_at": manifest.created_at})
                    for entry in (*manifest.requests, *manifest.duplicates)]
        key, value = outputs.checkpoint_record(manifest, self.store.path(manifest.version))
        self._outbox.record(outcomes, extra=[(self._outbox.topics.checkpoints, key, value)],
                            crash_point="after_ledger")
        self._crash.at("after_receipts")
        commit(manifest.offsets)
        stopped_by = result.outcome.stopped_by
        self._metrics.observe_fragment(
            outcome=stopped_by if stopped_by in ("goal", "step_cap", "time_cap") else "failed",
            steps=result.outcome.steps, stage_seconds=published.stage_seconds, accuracies=result.accuracies,
            version=manifest.number, timestamp=self._clock())
        self._metrics.set_forgotten(len(result.forgotten))
        statuses = [s.status for s in result.statuses]
        log.bind(version=manifest.version).info(
            "fragment_published", stopped_by=stopped_by, steps=result.outcome.steps,
            seconds=round(sum(published.stage_seconds.values()), 3),
            forgotten=statuses.count("forgotten"), relabelled=statuses.count("relabelled"),
            failed=statuses.count("failed"), duplicates=len(repeats), missed=result.outcome.missed,
            accuracies={k: round(v, 4) for k, v in result.accuracies.items()}, offsets=manifest.offsets)


def _entry(a: Accepted, status: str, reason: str | None) -> dict[str, Any]:
    r = a.request
    return {"request_id": r.request_id, "status": status, "reason": reason, "topic": a.topic,
            "partition": a.partition, "offset": a.offset, "subject": r.subject, "mode": r.mode,
            "label": r.label, "target_label": r.target_label, "requested_at": r.requested_at}


def _repeat_entry(r: Repeat) -> dict[str, Any]:
    return {"request_id": r.request.request_id, "status": "duplicate",
            "reason": f"request_id {r.request.request_id} repeats offset {r.first.offset} of partition "
                      f"{r.first.partition}, applied once in this version",
            "topic": r.topic, "partition": r.partition, "offset": r.offset, "subject": r.request.subject}
