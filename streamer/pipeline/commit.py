"""The commit: the one place where a fragment's outcome becomes durable, in one documented order.

`Commit.fragment` takes a fragment that ran through the failure policy and makes it durable:

    1 settle     requests never applied: ledger rows, then their `failed` receipts (before any
                 version's offsets pass them, so a re-read record finds them handled)
    2 vault      the applied instances sealed into the forget vault, before the version that
                 references them                                               crash point after_vault
    3 publish    the version directory (temp dir, fsync, rename) holding the model, the outcomes
                 and the consumed offsets; then CURRENT switched               crash point after_checkpoint
    4 ledger     the version's outcomes appended                               crash point after_ledger
    5 receipts   receipts and the checkpoint record delivered, noted as sent   crash point after_receipts
    6 offsets    the consumed offsets committed to the consumer group (for lag and tools: the
                 daemon resumes from CURRENT's manifest, not from the group)
    7 shreds     instances whose verification window closed (`shred`, also run when idle):
                 vault keys destroyed, then the ledger's shred rows             crash point after_shred

Each step is durable before the next starts. `repair()`, at start, reads what a crash left of
that record and finishes or undoes it: vault entries CURRENT does not reference are removed (2
without 3: Kafka replays their records), ledger rows are rebuilt from CURRENT's lineage (3
without 4), shreds missing from the ledger are recorded (7), owed receipts are re-sent (4
without 5). Only infrastructure errors (disk, ledger, broker) escape this module.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer

from ..kafka import commit_offsets, records
from ..state import (Checkpoint, CheckpointStore, ForgetVault, Manifest, RequestOutcome, ShredLog, ShredRow,
                     VaultItem, Window, next_refs, reconcile, referenced_ids, rfc3339)
from ..telemetry import FRAGMENT_OUTCOMES, Metrics
from . import faults
from .collector import Repeat
from .outbox import Outbox
from .quarantine import FragmentRun
from .shredding import plan_shreds
from .worker import FragmentWorker

__all__ = ["Commit", "Repaired"]

Offsets = Mapping[str, Mapping[int, int]]


@dataclass(frozen=True)
class Repaired:
    """What `Commit.repair` found a crash had left."""

    vault_orphans: list[str]
    ledger_added: int
    ledger_rolled_back: int
    shreds_recorded: list[str]
    receipts_resent: int


class Commit:
    """Owns the order of every durable step of the daemon's fragments and shreds (main thread)."""

    def __init__(self, worker: FragmentWorker, store: CheckpointStore, vault: ForgetVault, shreds: ShredLog,
                 outbox: Outbox, consumer: KafkaConsumer, metrics: Metrics, window: Window, log: Any,
                 clock: Callable[[], float] = time.time):
        self.worker, self.store, self.vault, self.shreds = worker, store, vault, shreds
        self._outbox, self._consumer, self._metrics, self._window = outbox, consumer, metrics, window
        self._log, self._clock = log, clock

    def fragment(self, run: FragmentRun, repeats: Sequence[Repeat], offsets: Offsets, parent: str,
                 replay: Sequence[Mapping[str, Any]] = (), log: Any = None) -> Manifest | None:
        """Steps 1-7 for one fragment; the new CURRENT's manifest, or None when nothing was applied
        or deferred (CURRENT stays; the offsets move with the next version). `replay`: the
        rolled-back requests still to re-apply after this one. Raises VaultError / CheckpointError /
        LedgerError / DeliveryError (infrastructure: stop; `repair` resumes)."""
        log = log if log is not None else self._log
        failed = {o.request_id for o in run.failed}
        self._settle(run, [r for r in repeats if r.first.request.request_id in failed])  # 1
        if not run.applied and not run.deferred:
            self._metrics.observe_fragment(  # counted and timed like any other: CURRENT stays
                outcome="failed", steps=run.failed_steps, stage_seconds=run.stage_seconds, accuracies={},
                version=self.store.manifest(parent).number, timestamp=self._clock(), published=False)
            log.warning("fragment_not_published", failed=len(run.failed), steps=run.failed_steps,
                        seconds=round(run.seconds, 3), trips=run.trips,
                        reason="no request of the fragment could be applied; CURRENT stays")
            return None
        start = time.perf_counter()
        manifest, outcomes = self.publish(run, [r for r in repeats if r.first.request.request_id not in failed],
                                           offsets, parent, replay)  # 2, 3
        stages = {**run.stage_seconds, "checkpoint": time.perf_counter() - start}
        faults.crash_at("after_checkpoint")
        settled = [o.settled(None if o.status == "deferred" else manifest.version, manifest.created_at)
                   for o in outcomes]  # a deferred request is in no version
        key, value = records.checkpoint_record(manifest, self.store.path(manifest.version))
        seqs = self._outbox.append(settled)  # 4
        faults.crash_at("after_ledger")
        self._outbox.send(seqs, settled, extra=[(self._outbox.topics.checkpoints, key, value)])  # 5
        faults.crash_at("after_receipts")
        commit_offsets(self._consumer, manifest.offsets, log)  # 6
        self._observe(run, manifest, stages, log)
        self.shred(manifest)  # 7
        return manifest

    def replay_failed(self, parent: str, offsets: Offsets, rest: Sequence[Mapping[str, Any]]) -> Manifest:
        """After a replay fragment of which nothing could be applied (each request has its `failed`
        receipt): a version with the parent's weights and retained set whose replay list is `rest`,
        so the daemon moves on. Raises CheckpointError when the write fails."""
        before = self.store.manifest(parent)
        manifest = self.store.publish(parent, self.worker.model_file(), before.retained, offsets=offsets,
                                      metrics={**before.metrics, "replay_failed": True}, replay=rest,
                                      retained_misses=self.worker.misses, deferred=before.deferred)
        self._outbox.send_checkpoint_record(manifest, self.store.path(manifest.version))
        return manifest

    def shred(self, manifest: Manifest) -> list[ShredRow]:
        """Step 7, CURRENT being `manifest`: shred what is due (`shredding.plan_shreds`): the vault
        destroys the keys and ciphertexts, then the ledger records the rows; the instances leave
        the retained set. The ledger rows, [] when nothing was due."""
        plan = plan_shreds(self.vault, self._window, self.worker, self.store, manifest, self._clock())
        if not plan.request_ids:
            return []
        shredded = self.vault.shred_many(list(zip(plan.request_ids, plan.verified, strict=True)))
        faults.crash_at("after_shred")  # keys destroyed, ledger rows not written yet
        rows = [ShredRow(rid, record.verified_version, manifest.version, rfc3339(record.shredded_at), record.key_id,
                         reason) for rid, record, reason in zip(plan.request_ids, shredded, plan.reasons, strict=True)]
        self.shreds.append(rows)
        self.worker.drop({r.request_id for r in rows})
        for row in rows:
            self._metrics.count_shreds(row.verified_at_shred)
            self._log.bind(request_id=row.request_id, version=manifest.version).info(
                "request_shredded", verified_version=row.verified_version, verified=row.verified_at_shred,
                key_id=row.key_id, reason=row.reason)
        self._metrics.set_forgotten(len(self.worker.forgotten))
        return rows

    def repair(self, current: Checkpoint) -> Repaired:
        """At start, before any fragment: finish or undo what a crash interrupted (see the module's
        docstring), CURRENT being `current`; then announce CURRENT again (at least once)."""
        manifest = current.manifest
        orphans = self.vault.remove_orphans(referenced_ids(manifest))
        reconciled = reconcile(self._outbox.ledger, self.store.lineage(manifest.version))
        recorded = self.shreds.record_missing(self.vault.entries(), self.vault.kek.key_id)
        resent = self._outbox.send_owed()
        self._outbox.send_checkpoint_record(manifest, current.path)
        return Repaired(orphans, reconciled.added, reconciled.rolled_back, [r.request_id for r in recorded], resent)

    # --- the steps -------------------------------------------------------------------------------

    def _settle(self, run: FragmentRun, repeats: Sequence[Repeat]) -> None:
        """Step 1: each request that failed on its own (and each repeat of one) gets its ledger row
        and a `failed` receipt; they were never applied."""
        for kind in run.trips:
            self._metrics.count_failure(kind)
        if not run.failed:
            return
        now = rfc3339(self._clock())
        reasons = {o.request_id: o.reason for o in run.failed}
        outcomes = [o.settled(None, now) for o in run.failed]
        outcomes += [r.outcome(f"repeats offset {r.first.offset} of partition {r.first.partition}, which failed: "
                               f"{reasons[r.first.request.request_id]}").settled(None, now) for r in repeats]
        self._outbox.record(outcomes)

    def publish(self, run: FragmentRun, repeats: Sequence[Repeat], offsets: Offsets, parent: str,
                replay: Sequence[Mapping[str, Any]]) -> tuple[Manifest, list[RequestOutcome]]:
        """Steps 2 and 3: the applied and the deferred instances into the vault, then the version of
        the applied requests (its retained set as vault references; its deferred list the parent's
        and this fragment's) and CURRENT switched. The manifest, and the outcomes it records
        (applied, repeats, abandoned, deferred), in its order."""
        result, before, version = run.result, self.store.manifest(parent), self.store.next_version()
        owed = [*run.applied, *run.deferred]
        items = [VaultItem(o.request_id, run.items[o.request_id].request.x.float().cpu(), o.goal.label,
                           o.goal.engine_target) for o in owed]  # the goal as applied (unseen: resolved) or owed
        entries = {e.request_id: e for e in self.vault.put(items)}
        faults.crash_at("after_vault")
        refs = (before.retained if result is None else
                next_refs(result.forgotten, result.retained_met, before.retained, entries, version))
        deferred_by = {o.request_id for o in run.deferred}
        duplicates = [r.outcome(f"request_id {r.request.request_id} repeats offset {r.first.offset} of partition "
                                f"{r.first.partition}, " + ("deferred with it" if r.first.request.request_id in deferred_by
                                                            else "applied once in this version")) for r in repeats]
        abandoned = [a for a in (self._abandoned(rid, reason) for rid, reason in run.abandoned.items()) if a]
        metrics = result.metrics if result is not None else {**before.metrics, "stopped_by": "deferred", "steps": 0}
        manifest = self.store.publish(
            parent, self.worker.model_file(), refs, requests=[o.to_manifest() for o in run.applied], offsets=offsets,
            metrics={**metrics, **({"deferred_requests": len(run.deferred)} if run.deferred else {})},
            duplicates=[o.to_manifest() for o in duplicates], abandoned=[a.to_manifest() for a in abandoned],
            retained_misses=self.worker.misses, replay=replay,
            deferred=[*before.deferred, *({**o.to_manifest(), "deferred_in": version, "deferred_at": rfc3339(self._clock())}
                                          for o in run.deferred)])
        return manifest, [*run.applied, *duplicates, *abandoned, *run.deferred]

    def _abandoned(self, request_id: str, reason: str) -> RequestOutcome | None:
        """The `abandoned` outcome of an instance that left the retained set, on its applying record."""
        applied = self._outbox.ledger.last_applied(request_id)
        if applied is None:  # applied in this very fragment and abandoned at once: its status says failed
            return None
        return RequestOutcome(status="abandoned", request_id=request_id, version=None, reason=reason,
                              topic=applied.topic, partition=applied.partition, offset=applied.offset,
                              subject=applied.subject)

    def _observe(self, run: FragmentRun, manifest: Manifest, stages: dict[str, float], log: Any) -> None:
        """Metrics and the fragment's log line (a fragment deferred whole counts as `deferred`, with
        the refused attempt's steps and audit accuracy)."""
        result, refused = run.result, run.refused
        stopped_by = result.outcome.stopped_by if result is not None else "deferred"
        steps = result.outcome.steps if result is not None else int(refused.get("steps") or 0)
        accuracies = ({k: v for k, v in result.accuracies.items() if math.isfinite(v)}  # NaN: an empty set
                      if result is not None else {})
        if stopped_by == "goal" and result.outcome.feature_goal_met is False:
            stopped_by = "goal_features_unmet"  # every class goal met; a cap cut the unseen feature goal short
        self._metrics.observe_fragment(
            outcome=stopped_by if stopped_by in FRAGMENT_OUTCOMES else "failed",
            steps=steps, stage_seconds=stages, accuracies=accuracies, version=manifest.number, timestamp=self._clock())
        self._metrics.set_forgotten(len(self.worker.forgotten))
        statuses = [o.status for o in run.applied]
        log.bind(version=manifest.version).info(
            "fragment_published", stopped_by=stopped_by, steps=steps, seconds=round(sum(stages.values()), 3),
            forgotten=statuses.count("forgotten"), relabelled=statuses.count("relabelled"),
            failed=statuses.count("failed"), quarantined=len(run.failed), deferred=len(run.deferred),
            refused=refused or None, abandoned=len(run.abandoned), duplicates=len(manifest.duplicates),
            missed=result.outcome.missed if result is not None else None,
            accuracies={k: round(v, 4) for k, v in accuracies.items()}, offsets=manifest.offsets)
