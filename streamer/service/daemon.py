"""The daemon: deletion events in from Kafka; versions, receipts and metrics out; nothing lost.

Per fragment, each step durable before the next one starts:

    unlearn -> evaluate -> write the version dir -> switch CURRENT      (worker thread)
    -> append ledger rows -> produce receipts + checkpoint record, flush -> commit offsets

While the worker thread unlearns (minutes on CPU), the main thread pauses the assigned
partitions and keeps calling poll(): the group sees a live member and max.poll.interval never
expires. On start the daemon loads CURRENT (sha256 verified), reconciles the ledger from
CURRENT's lineage, re-sends the receipts the ledger still owes, and on every partition
assignment seeks to the offsets in CURRENT's manifest: the checkpoint, not the group's
committed offset, decides where consumption resumes.

Delivery guarantees:
  * model: each accepted request is applied in exactly one version of CURRENT's lineage (its
    offsets are in the same atomic manifest as the model, and a re-read request that the
    ledger knows is answered `duplicate`, never unlearned again);
  * ledger: exactly one row per record and outcome (rows are keyed by topic/partition/offset);
  * receipts, dead letters and checkpoint records: at least once (a crash between the flush
    and the ledger noting it repeats them; consumers dedupe on request_id / version).

Rejected events and repeats of applied requests get their outcome as soon as they are read
(dead letter first, then ledger, then receipt); their offsets are committed with the next
fragment, and a re-read after a crash finds them in the ledger and skips them.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from . import outputs
from ..state.checkpoints import BASE_VERSION, Checkpoint, CheckpointStore, ForgottenSet, Manifest, rfc3339
from ..config import DaemonConfig
from ..errors import ConfigError, StreamerError
from ..engine.evaluate import accuracy
from ..intake.events import ForgetRequest, InvalidEvent, SampleContext, parse_event, request_id_of
from .fragments import FragmentResult, FragmentWorker
from .kafka_io import consumer_lag, ensure_topics, make_consumer, make_producer
from ..state.ledger import LEDGER_FILE, Ledger, Outcome, reconcile
from .metrics import REQUEST_OUTCOMES, Metrics, MetricsServer, serve
from ..engine.models import load_model
from ..state.rollback import CheckpointDirLocked, DirectoryLock, answer_request, kafka_earliest, run_rollback, take_request
from ..intake.resources import load_dataset_ref, resolve_device, sample_context

CRASH_ENV = "STREAMER_CRASH_AT"
CRASH_POINTS = ("during_unlearn", "after_checkpoint", "after_ledger", "after_receipts")
POLL_TIMEOUT_MS = 200  # the longest the loop waits for records, a signal or a due fragment
HEALTH_STALL_S = 60.0  # /healthz fails when the main loop has not ticked for this long
LAG_EVERY_S = 1.0
DELIVERY_TIMEOUT_S = 120.0

__all__ = ["CRASH_POINTS", "CrashHook", "Daemon", "DeliveryError", "FragmentError", "run_daemon"]


class DeliveryError(StreamerError):
    """Kafka did not take a receipt, dead letter or checkpoint record: stop; they are re-sent on start."""


class FragmentError(StreamerError):
    """The engine failed on a fragment: stop without committing; its requests are re-read on start."""


@dataclass(frozen=True)
class CrashHook:
    """Test hook: SIGKILL this process at a named point (env STREAMER_CRASH_AT)."""

    point: str | None = None

    @staticmethod
    def from_env(environ: Mapping[str, str] = os.environ) -> CrashHook:
        point = environ.get(CRASH_ENV) or None
        if point is not None and point not in CRASH_POINTS:
            raise ConfigError(f"{CRASH_ENV}={point!r}: expected one of {', '.join(CRASH_POINTS)}")
        return CrashHook(point)

    def at(self, point: str) -> None:
        if point == self.point:
            structlog.get_logger("streamer.daemon").warning("crash_hook", point=point)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class _Accepted:
    request: ForgetRequest
    topic: str
    partition: int
    offset: int
    received_at: float  # monotonic seconds


@dataclass(frozen=True)
class _Repeat:
    """A request_id repeated while its first record waits in the fragment being collected."""

    request: ForgetRequest
    topic: str
    partition: int
    offset: int
    first: _Accepted


@dataclass(frozen=True)
class _Published:
    result: FragmentResult
    manifest: Manifest
    stage_seconds: dict[str, float]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, daemon: Daemon):
        self._daemon = daemon

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._daemon._on_revoked(revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._daemon._on_assigned(assigned)


class Daemon:
    """One daemon per checkpoint directory and consumer group (the model is one sequential state)."""

    def __init__(self, cfg: DaemonConfig, registry: CollectorRegistry, log: Any = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 crash: CrashHook | None = None):
        self.cfg, self._clock, self._monotonic = cfg, clock, monotonic
        self._registry = registry
        self.metrics = Metrics(registry)
        self._log = log if log is not None else structlog.get_logger("streamer.daemon")
        self._crash = crash if crash is not None else CrashHook()
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._last_tick: float | None = None  # None until the loop runs (start-up counts as healthy)
        self._model_loaded = False
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._fragment_running = False
        self._reseek = False
        self.assignments = 0  # partition assignments seen by this process
        self._pending: list[_Accepted] = []
        self._repeats: list[_Repeat] = []
        self._positions: dict[tuple[str, int], int] = {}  # next offset after the last handled record
        self._offsets: dict[str, dict[int, int]] = {}  # CURRENT's consumed offsets
        self._version = ""
        self._last_lag = 0.0
        # Set by _start(); _close() closes whichever of them exist.
        self._server: MetricsServer | None = None
        self._consumer: KafkaConsumer
        self._producer: KafkaProducer
        self._ledger: Ledger
        self._store: CheckpointStore
        self._worker: FragmentWorker
        self._ctx: SampleContext

    # --- public ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop soon (signal-handler safe): a running fragment is cancelled unless already published."""
        self._stop.set()
        self._cancel.set()

    @property
    def metrics_port(self) -> int | None:
        return None if self._server is None else self._server.port

    def run(self) -> int:
        """Serve until `request_stop()`; 0 on a clean stop. Errors propagate after closing clients."""
        try:
            self._start()
            while not self._stop.is_set():
                self._step()
            if self._pending:
                self._log.info("fragment_abandoned", requests=len(self._pending),
                               reason="shutdown before the fragment started; its records are re-read on start")
            return 0
        finally:
            self._close()

    # --- start-up ----------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        self._server = serve(self._registry, cfg.metrics.host, cfg.metrics.port, self._healthy, self._ready)
        self._log.info("metrics_serving", host=self._server.host, port=self._server.port)
        checkpoint, baseline = self._load_state()
        self._ledger = Ledger(self._store.root / LEDGER_FILE)
        reconciled = reconcile(self._ledger, self._store.lineage(checkpoint.manifest.version))
        counts = self._ledger.counts()
        for outcome in REQUEST_OUTCOMES:  # counters continue from the ledger, so they never reset
            if counts[outcome]:
                self.metrics.requests.labels(outcome=outcome).inc(counts[outcome])
        if baseline is not None:
            self.metrics.set_audit_baseline(baseline)
        self._resume_gauges(checkpoint)
        self._model_loaded = True
        self._log.info("checkpoint_loaded", version=self._version, forgotten=len(checkpoint.forgotten),
                       offsets=checkpoint.manifest.offsets, audit_baseline=baseline,
                       ledger_rows_added=reconciled.added, ledger_rows_rolled_back=reconciled.rolled_back)
        self._connect(checkpoint)

    def _load_state(self) -> tuple[Checkpoint, float | None]:
        """CURRENT (publishing the configured weights as v000000 on the very first start), the
        engine around it and the sample context. Returns CURRENT and the base's audit accuracy."""
        cfg = self.cfg
        device = resolve_device(cfg.device)
        store = CheckpointStore(cfg.checkpoints.dir, cfg.checkpoints.keep, self._clock)
        stale = store.recover()
        if stale:
            self._log.info("stale_temp_files_removed", files=stale)
        self._store = store
        self._lock = DirectoryLock(store.root)
        if not self._lock.acquire():
            raise CheckpointDirLocked(f"{store.root} is locked by another process ({store.root / 'LOCK'}): "
                                "one daemon per checkpoint directory")
        base = load_model(cfg.model, device)
        audit = load_dataset_ref(cfg.data.audit, cfg.model.input_shape) if cfg.data.audit else None
        buffer = load_dataset_ref(cfg.data.buffer, cfg.model.input_shape) if cfg.data.buffer else None
        if store.current_version() is None:
            metrics = {"audit_accuracy": accuracy(base, audit.x, audit.y)} if audit is not None else {}
            store.publish(None, base.state_dict(), ForgottenSet.empty(cfg.model.input_shape), metrics=metrics)
            self._log.info("base_version_published", version=BASE_VERSION, weights=cfg.model.weights)
        current = store.current_version() or BASE_VERSION
        checkpoint = store.load(current)  # sha256 verified
        if current != BASE_VERSION and store.path(BASE_VERSION).is_dir():
            base.load_state_dict(store.load(BASE_VERSION).state_dict)  # the lineage's own base is the teacher
        model = deepcopy(base)
        model.load_state_dict(checkpoint.state_dict)
        model.eval()
        baseline = accuracy(base, audit.x, audit.y) if audit is not None else None
        self._worker = FragmentWorker(model, cfg.unlearning.engine, cfg.model.num_classes, checkpoint.forgotten,
                                      teacher=base, audit=audit, buffer=buffer, audit_baseline=baseline)
        self._ctx = sample_context(cfg)
        self._version = checkpoint.manifest.version
        self._offsets = {t: dict(p) for t, p in checkpoint.manifest.offsets.items()}
        self._log.info("model_loaded", version=current, device=str(device), source=cfg.model.source)
        return checkpoint, baseline

    def _connect(self, checkpoint: Checkpoint) -> None:
        """Producer first (owed receipts, CURRENT's checkpoint record), then the consumer."""
        kafka = self.cfg.kafka
        topics = kafka.topics
        try:
            ensure_topics(kafka.bootstrap_servers, kafka.client,
                          [topics.requests, topics.receipts, topics.dead_letter, topics.checkpoints])
        except KafkaError as err:  # e.g. no create permission: the topics may well exist
            self._log.warning("topics_not_ensured", error=repr(err))
        self._producer = make_producer(kafka.bootstrap_servers, kafka.client)
        self._send_owed_receipts()
        key, value = outputs.checkpoint_record(checkpoint.manifest, checkpoint.path)
        self._deliver([self._producer.send(topics.checkpoints, key=key, value=value)])  # at least once
        self._consumer = make_consumer(kafka.bootstrap_servers, kafka.group_id, kafka.client,
                                       max_poll_interval_ms=kafka.max_poll_interval_ms)
        self._consumer.subscribe([topics.requests], listener=_Rebalance(self))
        self._log.info("daemon_started", version=self._version, group_id=kafka.group_id, topic=topics.requests,
                       fragment_size=self.cfg.unlearning.fragment_size, max_wait_s=self.cfg.unlearning.max_wait_s)

    def _send_owed_receipts(self) -> None:
        owed = self._ledger.unsent_receipts()
        if not owed:
            return
        futures = []
        for row in owed:
            key, value = outputs.receipt(row.outcome)
            futures.append(self._producer.send(self.cfg.kafka.topics.receipts, key=key, value=value))
        self._deliver(futures)
        self._ledger.mark_receipts_sent([row.seq for row in owed], rfc3339(self._clock()))
        self._log.info("owed_receipts_sent", receipts=len(owed))

    # --- the loop ----------------------------------------------------------------------------

    def _step(self) -> None:
        consumer = self._consumer
        self._tick()
        if not self._pending:
            self._maybe_rollback()
        wait_ms = POLL_TIMEOUT_MS
        if self._pending:
            due_in = self._pending[0].received_at + self.cfg.unlearning.max_wait_s - self._monotonic()
            wait_ms = max(0, min(wait_ms, int(due_in * 1000)))
        batch = consumer.poll(timeout_ms=wait_ms, max_records=self.cfg.unlearning.fragment_size - len(self._pending))
        if batch:
            self._handle(batch)
        self._update_lag()
        if self._fragment_due() and not self._stop.is_set():
            self._run_fragment()

    def _resume_gauges(self, checkpoint: Checkpoint) -> None:
        """Gauges as CURRENT's manifest recorded them, so a restart shows no gap until the next fragment."""
        m = checkpoint.manifest
        self.metrics.set_checkpoint(m.number, _timestamp(m.created_at))
        self.metrics.set_forgotten(len(checkpoint.forgotten))
        recorded = {name: m.metrics.get(f"{name}_accuracy") for name in ("fragment", "forgotten", "audit")}
        self.metrics.set_accuracies({k: float(v) for k, v in recorded.items() if v is not None})

    def _maybe_rollback(self) -> None:
        """Carry out an operator's `streamer rollback` between fragments (see rollback.py):
        publish the new version, then resume consuming from its offsets so the rolled-back
        requests are applied again."""
        request = take_request(self._store.root)
        if request is None:
            return
        kafka = self.cfg.kafka
        answer = run_rollback(self._store, self._ledger, str(request.get("to")), bool(request.get("force")),
                              kafka_earliest(kafka.bootstrap_servers, dict(kafka.client)))
        if answer["ok"]:
            checkpoint = self._store.load(answer["version"])
            self._worker.reset(checkpoint.state_dict, checkpoint.forgotten)
            self._version = checkpoint.manifest.version
            self._offsets = {t: dict(p) for t, p in checkpoint.manifest.offsets.items()}
            self._positions = {}
            self._seek_to_current()
            key, value = outputs.checkpoint_record(checkpoint.manifest, checkpoint.path)
            self._deliver([self._producer.send(kafka.topics.checkpoints, key=key, value=value)])
            self._resume_gauges(checkpoint)
        answer_request(self._store.root, request, answer)
        self._log.bind(version=self._version).info("rollback", to=request.get("to"), ok=answer["ok"],
                                                   message=answer["message"])

    def _fragment_due(self) -> bool:
        if not self._pending:
            return False
        return (len(self._pending) >= self.cfg.unlearning.fragment_size
                or self._monotonic() - self._pending[0].received_at >= self.cfg.unlearning.max_wait_s)

    def _handle(self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord]]) -> None:
        """Sort each record into the fragment being collected, or answer it now (rejected,
        duplicate): dead letters flushed, then ledger rows, then receipts flushed."""
        answered: list[Outcome] = []
        dead_letters = []
        for records in batch.values():
            for record in records:
                self._positions[(record.topic, record.partition)] = record.offset + 1
                if self._ledger.handled(record.topic, record.partition, record.offset):
                    self._log.info("record_already_handled", topic=record.topic, partition=record.partition,
                                   offset=record.offset)
                    continue
                outcome = self._sort(record, dead_letters)
                if outcome is not None:
                    answered.append(outcome)
        if dead_letters:
            self._deliver(dead_letters)
        if answered:
            self._record(answered)

    def _sort(self, record: ConsumerRecord, dead_letters: list[Any]) -> Outcome | None:
        start = time.perf_counter()
        try:
            if record.value is None:
                raise InvalidEvent("the record has no value (a tombstone)")
            request = parse_event(record.value, self._ctx)
        except InvalidEvent as err:
            request_id = err.request_id or request_id_of(record.value or b"", record.key)
            now = rfc3339(self._clock())
            key, value, headers = outputs.dead_letter(err.reason, request_id, record.topic, record.partition,
                                                      record.offset, record.key, record.value, now)
            dead_letters.append(self._producer.send(self.cfg.kafka.topics.dead_letter, key=key, value=value,
                                                    headers=headers))
            return self._outcome("rejected", request_id, None, err.reason, record, None, now)
        finally:
            self.metrics.observe_stage("resolve", time.perf_counter() - start)
        applied_in = self._ledger.applied(request.request_id)
        if applied_in is not None:
            return self._outcome("duplicate", request.request_id, applied_in,
                                 f"request_id {request.request_id} was already applied in {applied_in}",
                                 record, request.subject, rfc3339(self._clock()))
        first = next((p for p in self._pending if p.request.request_id == request.request_id), None)
        if first is not None:  # answered with the version that applies the first one
            self._repeats.append(_Repeat(request, record.topic, record.partition, record.offset, first))
            return None
        self._pending.append(_Accepted(request, record.topic, record.partition, record.offset, self._monotonic()))
        return None

    @staticmethod
    def _outcome(status: str, request_id: str | None, version: str | None, reason: str | None,
                 record: ConsumerRecord, subject: str | None, completed_at: str) -> Outcome:
        return Outcome(status=status, request_id=request_id, version=version, reason=reason, topic=record.topic,
                       partition=record.partition, offset=record.offset, subject=subject, completed_at=completed_at)

    def _record(self, outcomes: Sequence[Outcome], extra: Sequence[tuple[str, bytes, bytes]] = (),
                crash_point: str | None = None) -> None:
        """Ledger rows, then receipts and the `extra` (topic, key, value) records delivered, then the
        receipts noted as sent."""
        seqs = self._ledger.append(outcomes)
        if crash_point is not None:
            self._crash.at(crash_point)
        futures = [self._producer.send(topic, key=key, value=value) for topic, key, value in extra]
        sent = []
        for seq, outcome in zip(seqs, outcomes):
            if outcome.request_id is not None:
                key, value = outputs.receipt(outcome)
                futures.append(self._producer.send(self.cfg.kafka.topics.receipts, key=key, value=value))
                sent.append(seq)
        self._deliver(futures)
        self._ledger.mark_receipts_sent(sent, rfc3339(self._clock()))
        for outcome in outcomes:
            self.metrics.count_request(outcome.status)
            self._log.bind(request_id=outcome.request_id, partition=outcome.partition, offset=outcome.offset,
                           version=outcome.version).info(
                "request_outcome", status=outcome.status, topic=outcome.topic, reason=outcome.reason)

    # --- fragments ---------------------------------------------------------------------------

    def _run_fragment(self) -> None:
        consumer = self._consumer
        accepted, repeats = self._pending, self._repeats
        self._pending, self._repeats = [], []
        offsets = {t: dict(p) for t, p in self._offsets.items()}
        for (topic, partition), offset in self._positions.items():
            offsets.setdefault(topic, {})[partition] = offset
        parent = self._version
        log = self._log.bind(parent=parent, requests=len(accepted))
        log.info("fragment_started", request_ids=[a.request.request_id for a in accepted])

        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["published"] = self._unlearn_and_publish(accepted, repeats, offsets, parent)
            except BaseException as err:  # re-raised in the main thread
                box["error"] = err

        self._fragment_running, self._reseek = True, False
        consumer.pause(*consumer.assignment())
        thread = threading.Thread(target=work, name="fragment", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                # Paused partitions return nothing; poll() keeps the member alive in its group.
                for tp, records in consumer.poll(timeout_ms=POLL_TIMEOUT_MS).items():
                    consumer.seek(tp, records[0].offset)  # an unpaused (newly assigned) partition: read later
                    consumer.pause(tp)
                self._tick()
                self._update_lag()
                if self._stop.is_set():
                    self._cancel.set()
                thread.join(timeout=0.01)
        finally:
            self._fragment_running = False
        if "error" in box:
            self.metrics.fragments.labels(outcome="failed").inc()
            log.error("fragment_failed", error=repr(box["error"]))
            raise FragmentError(f"unlearning a fragment failed: {box['error']!r}") from box["error"]
        published: _Published | None = box.get("published")
        if published is None:
            log.info("fragment_abandoned", reason="cancelled by shutdown; nothing published or committed")
            return
        self._crash.at("after_checkpoint")
        self._finish(accepted, repeats, published, log)
        if self._reseek:  # assigned while the fragment ran: positions came from the old manifest
            self._seek_to_current()
        consumer.resume(*consumer.paused())

    def _unlearn_and_publish(self, accepted: Sequence[_Accepted], repeats: Sequence[_Repeat],
                             offsets: Mapping[str, Mapping[int, int]], parent: str) -> _Published | None:
        """Worker thread: unlearn, evaluate, write the version, switch CURRENT. None if cancelled."""

        def progress(step: int, loss: float, missing: int) -> None:
            self._crash.at("during_unlearn")

        result = self._worker.run([a.request for a in accepted], cancel=self._cancel, progress=progress)
        if result is None or self._cancel.is_set():  # stopping: an unpublished fragment is abandoned
            return None
        self._crash.at("during_unlearn")  # also when the goal needed no step at all
        start = time.perf_counter()
        requests = [_entry(a, s.status, s.reason) for a, s in zip(accepted, result.statuses)]
        duplicates = [_repeat_entry(r) for r in repeats]
        manifest = self._store.publish(parent, self._worker.model.state_dict(), result.forgotten, requests=requests,
                                       offsets=offsets, metrics=result.metrics, duplicates=duplicates)
        stages = {**result.outcome.stage_seconds, "evaluate": result.evaluate_seconds,
                  "checkpoint": time.perf_counter() - start}
        return _Published(result, manifest, stages)

    def _finish(self, accepted: Sequence[_Accepted], repeats: Sequence[_Repeat], published: _Published,
                log: Any) -> None:
        """Main thread, after CURRENT switched: ledger, receipts + checkpoint record, commit, metrics."""
        manifest, result = published.manifest, published.result
        self._version = manifest.version
        self._offsets = {t: dict(p) for t, p in manifest.offsets.items()}
        outcomes = [Outcome.from_json({**entry, "version": manifest.version, "completed_at": manifest.created_at})
                    for entry in (*manifest.requests, *manifest.duplicates)]
        key, value = outputs.checkpoint_record(manifest, self._store.path(manifest.version))
        self._record(outcomes, extra=[(self.cfg.kafka.topics.checkpoints, key, value)], crash_point="after_ledger")
        self._crash.at("after_receipts")
        self._commit(manifest.offsets)
        stopped_by = result.outcome.stopped_by
        self.metrics.observe_fragment(
            outcome=stopped_by if stopped_by in ("goal", "step_cap", "time_cap") else "failed",
            steps=result.outcome.steps, stage_seconds=published.stage_seconds, accuracies=result.accuracies,
            version=manifest.number, timestamp=self._clock())
        self.metrics.set_forgotten(len(result.forgotten))
        statuses = [s.status for s in result.statuses]
        log.bind(version=manifest.version).info(
            "fragment_published", stopped_by=stopped_by, steps=result.outcome.steps,
            seconds=round(sum(published.stage_seconds.values()), 3),
            forgotten=statuses.count("forgotten"), relabelled=statuses.count("relabelled"),
            failed=statuses.count("failed"), duplicates=len(repeats), missed=result.outcome.missed,
            accuracies={k: round(v, 4) for k, v in result.accuracies.items()}, offsets=manifest.offsets)

    def _commit(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        consumer = self._consumer
        # kafka-python commits what it is given: the next offset to read (last + 1).
        commit = {tp: OffsetAndMetadata(offsets[tp.topic][tp.partition], "", -1)
                  for tp in consumer.assignment() if tp.partition in offsets.get(tp.topic, {})}
        if not commit:
            return
        try:
            consumer.commit(commit)
        except KafkaError as err:  # e.g. a rebalance: harmless, the manifest holds the offsets
            self._log.warning("offset_commit_failed", error=repr(err))

    # --- rebalances (called inside poll, on the main thread) ---------------------------------

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        dropped = len(self._pending)
        # Eager rebalancing revokes everything; the records of an unstarted fragment are re-read
        # from CURRENT's offsets once partitions come back.
        self._pending, self._repeats, self._positions = [], [], {}
        self._assigned = frozenset()
        if not revoked:  # kafka-python's first join revokes the empty set
            return
        self._log.info("partitions_revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked),
                       pending_dropped=dropped)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        self.assignments += 1
        self._assigned = frozenset(consumer.assignment())
        sources = self._seek_to_current()
        if self._fragment_running:
            consumer.pause(*self._assigned)
            self._reseek = True
        self._log.info("partitions_assigned", assignment=self.assignments, positions=sources,
                       during_fragment=self._fragment_running)

    # --- small helpers -----------------------------------------------------------------------

    def _seek_to_current(self) -> dict[str, int | str]:
        """Seek every assigned partition to CURRENT's offset; where the manifest has none, the
        consumer keeps the group offset (else earliest). Returns where each partition reads from."""
        sources: dict[str, int | str] = {}
        for tp in self._consumer.assignment():
            offset = self._offsets.get(tp.topic, {}).get(tp.partition)
            if offset is not None:
                self._consumer.seek(tp, offset)
            sources[f"{tp.topic}/{tp.partition}"] = offset if offset is not None else "group offset, else earliest"
        return sources

    def _deliver(self, futures: Sequence[Any]) -> None:
        """Block until Kafka acknowledged every send (flush alone does not surface failures)."""
        self._producer.flush(timeout=DELIVERY_TIMEOUT_S)
        for future in futures:
            try:
                future.get(timeout=DELIVERY_TIMEOUT_S)
            except KafkaError as err:
                raise DeliveryError(f"Kafka did not acknowledge a record: {err!r}") from err

    def _update_lag(self) -> None:
        if not hasattr(self, "_consumer") or self._monotonic() - self._last_lag < LAG_EVERY_S:
            return
        self._last_lag = self._monotonic()
        try:
            self.metrics.set_lag(consumer_lag(self._consumer))
        except KafkaError as err:
            self._log.debug("lag_unavailable", error=repr(err))

    def _tick(self) -> None:
        self._last_tick = self._monotonic()

    def _healthy(self) -> bool:
        return self._last_tick is None or self._monotonic() - self._last_tick < HEALTH_STALL_S

    def _ready(self) -> bool:
        return self._model_loaded and bool(self._assigned) and not self._stop.is_set()

    def _close(self) -> None:
        if hasattr(self, "_lock"):
            self._lock.release()
        if hasattr(self, "_consumer"):
            try:
                self._consumer.close(autocommit=False)
            except KafkaError as err:
                self._log.warning("consumer_close_failed", error=repr(err))
        if hasattr(self, "_producer"):
            try:
                self._producer.close(timeout=10)
            except KafkaError as err:
                self._log.warning("producer_close_failed", error=repr(err))
        if hasattr(self, "_ledger"):
            self._ledger.close()
        if self._server is not None:
            self._server.close()
        self._log.info("daemon_stopped", version=self._version)


def _entry(a: _Accepted, status: str, reason: str | None) -> dict[str, Any]:
    r = a.request
    return {"request_id": r.request_id, "status": status, "reason": reason, "topic": a.topic,
            "partition": a.partition, "offset": a.offset, "subject": r.subject, "mode": r.mode,
            "label": r.label, "target_label": r.target_label, "requested_at": r.requested_at}


def _repeat_entry(r: _Repeat) -> dict[str, Any]:
    return {"request_id": r.request.request_id, "status": "duplicate",
            "reason": f"request_id {r.request.request_id} repeats offset {r.first.offset} of partition "
                      f"{r.first.partition}, applied once in this version",
            "topic": r.topic, "partition": r.partition, "offset": r.offset, "subject": r.request.subject}


def _timestamp(rfc: str) -> float:
    return datetime.fromisoformat(rfc.replace("Z", "+00:00")).timestamp()


def run_daemon(cfg: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 on a clean stop."""
    daemon = Daemon(cfg, CollectorRegistry(), crash=CrashHook.from_env())

    def stop(signum: int, frame: object) -> None:
        daemon.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return daemon.run()
