"""The fragment pipeline: unlearn -> evaluate -> publish -> ledger -> receipts -> commit.

    unlearn   (worker thread)  the engine under the failure policy (failures.run_quarantined)
    settle    (main thread)    requests that failed on their own: ledger rows + receipts, first
    publish   (main thread)    the applied instances into the forget vault, then the version dir
                               written and CURRENT switched (if anything applied)
    finish    (main thread)    ledger rows, receipts + checkpoint record, offsets committed

Each step is durable before the next starts, so a crash anywhere resumes exactly once: the
offsets are in the same atomic manifest as the model; vault entries a crash left unreferenced
are removed on start (Kafka replays their records); failed requests are in the ledger before
any version's offsets pass them (a re-read finds them handled); the ledger is rebuilt from
manifests on start. Only infrastructure errors (disk, ledger, broker) escape this module.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..state.checkpoints import CheckpointStore, Manifest, rfc3339
from ..state.ledger import Outcome
from ..state.retained import next_refs
from ..state.vault import ForgetVault, VaultItem
from . import outputs
from .collector import Accepted, Repeat
from .crash import CrashHook
from .failures import QuarantineRun, run_quarantined
from .fragments import FragmentWorker, RequestStatus
from .metrics import Metrics
from .outbox import Outbox

__all__ = ["FragmentPipeline", "Published"]


@dataclass(frozen=True)
class Published:
    """A fragment whose version is CURRENT, not yet in the ledger."""

    run: QuarantineRun
    manifest: Manifest
    stage_seconds: dict[str, float]


class FragmentPipeline:
    """Runs fragments through the engine and the durable outputs, in order."""

    def __init__(self, worker: FragmentWorker, store: CheckpointStore, outbox: Outbox, metrics: Metrics,
                 vault: ForgetVault, clock: Callable[[], float] = time.time, crash: CrashHook | None = None):
        self.worker, self.store, self._outbox, self._metrics, self._clock = worker, store, outbox, metrics, clock
        self.vault = vault
        self._crash = crash if crash is not None else CrashHook()

    def unlearn(self, accepted: Sequence[Accepted], cancel: threading.Event, log: Any) -> QuarantineRun | None:
        """Worker thread: the engine under the failure policy. None if cancelled (nothing changed)."""

        def progress(step: int, loss: float, missing: int) -> None:
            self._crash.at("during_unlearn")

        run = run_quarantined(self.worker, accepted, cancel, progress, log)
        if run is None or cancel.is_set():
            return None
        self._crash.at("during_unlearn")  # also when the goal needed no step at all
        return run

    def settle_failures(self, run: QuarantineRun, repeats: Sequence[Repeat]) -> None:
        """Main thread, before any publish: each request that failed on its own (and each repeat of
        one) gets its ledger row and a `failed` receipt; they were never applied."""
        for kind in run.trips:
            self._metrics.count_failure(kind)
        failed = {id(a): reason for a, reason in run.failed}
        if not failed:
            return
        now = rfc3339(self._clock())
        outcomes = [_outcome("failed", a.request.request_id, reason, a.topic, a.partition, a.offset,
                             a.request.subject, now, a.request.mode) for a, reason in run.failed]
        outcomes += [_outcome("duplicate", r.request.request_id,
                              f"repeats offset {r.first.offset} of partition {r.first.partition}, which failed: "
                              f"{failed[id(r.first)]}", r.topic, r.partition, r.offset, r.request.subject, now)
                     for r in repeats if id(r.first) in failed]
        self._outbox.record(outcomes)

    def publish(self, run: QuarantineRun, repeats: Sequence[Repeat], offsets: Mapping[str, Mapping[int, int]],
                parent: str, replay: Sequence[Mapping[str, Any]] = ()) -> Published | None:
        """Main thread: put the applied instances into the vault, write the version of the applied
        requests (its retained set as vault references; `replay`: rolled-back requests still to
        re-apply) and switch CURRENT (None when nothing was applied: CURRENT stays, and the offsets
        move with the next version). Raises VaultError / CheckpointError when a write fails."""
        if not run.applied or run.result is None:
            return None
        start = time.perf_counter()
        failed = {id(a) for a, _ in run.failed}
        requests = [_entry(a, s) for a, s in run.applied]
        duplicates = [_repeat_entry(r) for r in repeats if id(r.first) not in failed]
        abandoned = [self._abandoned_entry(rid, reason) for rid, reason in run.abandoned.items()]
        items = [VaultItem(a.request.request_id, a.request.x.float().cpu(), a.request.label, s.target)
                 for a, s in run.applied]  # the goal as applied: an unseen request's resolved class
        entries = {e.request_id: e for e in self.vault.put(items)}  # before the version that references them
        self._crash.at("after_vault")
        refs = next_refs(run.result.forgotten, run.result.retained_met, self.store.manifest(parent).retained, entries,
                         self.store.next_version())
        manifest = self.store.publish(parent, self.worker.model_file(), refs, requests=requests,
                                      offsets=offsets, metrics=run.result.metrics, duplicates=duplicates,
                                      abandoned=[a for a in abandoned if a is not None],
                                      retained_misses=self.worker.misses, replay=replay)
        stages = {**run.stage_seconds, "checkpoint": time.perf_counter() - start}
        return Published(run, manifest, stages)

    def drop_replayed(self, parent: str, offsets: Mapping[str, Mapping[int, int]],
                      rest: Sequence[Mapping[str, Any]]) -> Manifest:
        """Main thread, after a replay fragment of which nothing could be applied (each request has its
        `failed` receipt): a version with the parent's weights and retained set whose replay list is
        `rest`, so the daemon moves on. Raises CheckpointError when the write fails."""
        before = self.store.manifest(parent)
        manifest = self.store.publish(parent, self.worker.model_file(), before.retained, offsets=offsets,
                                      metrics={**before.metrics, "replay_failed": True}, replay=rest,
                                      retained_misses=self.worker.misses)
        self._outbox.send_checkpoint_record(manifest, self.store.path(manifest.version))
        return manifest

    def finish(self, published: Published, commit: Callable[[Mapping[str, Mapping[int, int]]], None],
               log: Any) -> None:
        """Main thread, after CURRENT switched: ledger, receipts + checkpoint record, commit, metrics."""
        manifest, run = published.manifest, published.run
        result = run.result
        assert result is not None
        self._crash.at("after_checkpoint")
        outcomes = [Outcome.from_json({**entry, "version": manifest.version, "completed_at": manifest.created_at})
                    for entry in (*manifest.requests, *manifest.duplicates, *manifest.abandoned)]
        key, value = outputs.checkpoint_record(manifest, self.store.path(manifest.version))
        self._outbox.record(outcomes, extra=[(self._outbox.topics.checkpoints, key, value)],
                            crash_point="after_ledger")
        self._crash.at("after_receipts")
        commit(manifest.offsets)
        stopped_by = result.outcome.stopped_by
        accuracies = {k: v for k, v in result.accuracies.items() if math.isfinite(v)}  # NaN: an empty set (all unseen)
        self._metrics.observe_fragment(
            outcome=stopped_by if stopped_by in ("goal", "step_cap", "time_cap") else "failed",
            steps=result.outcome.steps, stage_seconds=published.stage_seconds,
            accuracies=accuracies,
            version=manifest.number, timestamp=self._clock())
        self._metrics.set_forgotten(len(result.forgotten))
        statuses = [s.status for _, s in run.applied]
        log.bind(version=manifest.version).info(
            "fragment_published", stopped_by=stopped_by, steps=result.outcome.steps,
            seconds=round(sum(published.stage_seconds.values()), 3),
            forgotten=statuses.count("forgotten"), relabelled=statuses.count("relabelled"),
            failed=statuses.count("failed"), quarantined=len(run.failed), abandoned=len(run.abandoned),
            duplicates=len(manifest.duplicates), missed=result.outcome.missed,
            accuracies={k: round(v, 4) for k, v in accuracies.items()}, offsets=manifest.offsets)

    def _abandoned_entry(self, request_id: str, reason: str) -> dict[str, Any] | None:
        applied = self._outbox.ledger.last_applied(request_id)
        if applied is None:  # applied in this very fragment and abandoned at once: its status says failed
            return None
        return {"request_id": request_id, "status": "abandoned", "reason": reason, "topic": applied.topic,
                "partition": applied.partition, "offset": applied.offset, "subject": applied.subject}


def _outcome(status: str, request_id: str, reason: str, topic: str, partition: int, offset: int,
             subject: str | None, now: str, mode: str | None = None) -> Outcome:
    return Outcome(status=status, request_id=request_id, version=None, reason=reason, topic=topic,
                   partition=partition, offset=offset, subject=subject, completed_at=now, mode=mode)


def _entry(a: Accepted, s: RequestStatus) -> dict[str, Any]:
    """The manifest's row for an applied request; `target_class`: the class its goal sends it to
    (relabel: target_label; unseen: the class it resolved to; misclassify: null)."""
    r = a.request
    return {"request_id": r.request_id, "status": s.status, "reason": s.reason, "topic": a.topic,
            "partition": a.partition, "offset": a.offset, "subject": r.subject, "mode": r.mode,
            "label": r.label, "target_label": r.target_label, "target_class": s.target if s.target >= 0 else None,
            "requested_at": r.requested_at,
            "received_at": None if a.record_time_ms is None else rfc3339(a.record_time_ms / 1000)}


def _repeat_entry(r: Repeat) -> dict[str, Any]:
    return {"request_id": r.request.request_id, "status": "duplicate",
            "reason": f"request_id {r.request.request_id} repeats offset {r.first.offset} of partition "
                      f"{r.first.partition}, applied once in this version",
            "topic": r.topic, "partition": r.partition, "offset": r.offset, "subject": r.request.subject}
