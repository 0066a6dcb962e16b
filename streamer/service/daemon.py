"""The daemon's poll loop: deletion events in from Kafka; versions, receipts and metrics out.

    recovery.recover    open the vault, load CURRENT, reconcile the ledger and the vault (start-up)
    Outbox.send_owed    re-send receipts a crash left owed
    Collector.handle    records -> the pending fragment, or answered now (rejected, duplicate)
    FragmentPipeline    unlearn -> evaluate -> vault -> publish -> ledger -> receipts -> commit
    VaultKeeper         shred instances whose verification window closed; replay after a rollback

While the worker thread unlearns (minutes on CPU), the main thread pauses the assigned
partitions and keeps calling poll(): the group sees a live member and max.poll.interval never
expires. On every partition assignment the consumer seeks to the offsets in CURRENT's manifest.

Delivery guarantees:
  * model: each accepted request is applied in exactly one version of CURRENT's lineage (its
    offsets are in the same atomic manifest as the model, and a re-read request that the
    ledger knows is answered `duplicate`, never unlearned again);
  * ledger: exactly one row per record and outcome (rows are keyed by topic/partition/offset);
  * receipts, dead letters and checkpoint records: at least once (a crash between the flush
    and the ledger noting it repeats them; consumers dedupe on request_id / version).
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from ..config import DaemonConfig
from ..state.retained import load_retained
from ..state.rollback import answer_request, run_rollback, take_request
from .collector import Collector
from .goals import GoalIndex
from .undecodable import skip_undecodable
from .crash import CRASH_POINTS, CrashHook
from .kafka_io import (commit_offsets, consumer_lag, ensure_topics, make_consumer, make_producer, poll_while,
                       topic_configs_by_name)
from .http import MetricsServer, serve
from .metrics import Metrics
from .outbox import DeliveryError, Outbox
from .pipeline import FragmentPipeline
from .privacy import VaultKeeper
from .recovery import Recovered, recover, resume_gauges, seek_to_offsets

POLL_TIMEOUT_MS = 200  # the longest the loop waits for records, a signal or a due fragment
HEALTH_STALL_S = 60.0  # /healthz fails when the main loop has not ticked for this long
LAG_EVERY_S = 1.0

__all__ = ["CRASH_POINTS", "CrashHook", "Daemon", "DeliveryError", "run_daemon"]


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
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._fragment_running = False
        self._reseek = False
        self.assignments = 0  # partition assignments seen by this process
        self._offsets: dict[str, dict[int, int]] = {}  # CURRENT's consumed offsets
        self._version = ""
        self._manifest: Any = None  # CURRENT's manifest
        self._last_lag = 0.0
        # Set by _start(); _close() closes whichever of them exist.
        self._server: MetricsServer | None = None
        self._state: Recovered | None = None
        self._consumer: KafkaConsumer | None = None
        self._outbox: Outbox | None = None
        self._collector: Collector
        self._pipeline: FragmentPipeline
        self._keeper: VaultKeeper

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
            if self._collector.pending:
                self._log.info("fragment_abandoned", requests=len(self._collector.pending),
                               reason="shutdown before the fragment started; its records are re-read on start")
            return 0
        finally:
            self._close()

    # --- start-up ----------------------------------------------------------------------------

    def _start(self) -> None:
        cfg, kafka = self.cfg, self.cfg.kafka
        self._server = serve(self._registry, cfg.metrics.host, cfg.metrics.port, self._healthy, self._ready)
        self._log.info("metrics_serving", host=self._server.host, port=self._server.port)
        state = self._state = recover(cfg, self.metrics, self._log, self._clock)
        checkpoint = state.checkpoint
        self._set_current(checkpoint.manifest)
        self._log.info("checkpoint_loaded", version=self._version, forgotten=len(state.worker.forgotten),
                       offsets=checkpoint.manifest.offsets, audit_baseline=state.baseline,
                       ledger_rows_added=state.reconciled.added, ledger_rows_rolled_back=state.reconciled.rolled_back)
        topics = kafka.topics
        configs = topic_configs_by_name(topics, kafka.topic_configs)
        try:
            created = ensure_topics(kafka.bootstrap_servers, kafka.settings("admin"), list(configs), configs=configs)
            self._log.info("topics_ensured", created={name: configs[name] for name in created})
        except KafkaError as err:  # e.g. no create permission: the topics may well exist
            self._log.warning("topics_not_ensured", error=repr(err))
        # Producer first (owed receipts, CURRENT's checkpoint record), then the consumer.
        producer = make_producer(kafka.bootstrap_servers, kafka.settings("producer"))
        self._outbox = Outbox(producer, topics, state.ledger, self.metrics, self._log, self._clock, self._crash,
                              kafka.dead_letter_payload,
                              int(kafka.settings("producer").get("max_request_size", 1_048_576)))
        self._outbox.send_owed()
        self._outbox.send_checkpoint_record(checkpoint.manifest, checkpoint.path)  # at least once
        goals = GoalIndex(lambda: state.worker.forgotten, cfg.model.num_classes)
        self._collector = Collector(state.ctx, self._outbox, self.metrics, self._log, goals, self._clock,
                                    self._monotonic)
        self._pipeline = FragmentPipeline(state.worker, state.store, self._outbox, self.metrics, state.vault,
                                          self._clock, self._crash)
        self._keeper = VaultKeeper(state.vault, state.shreds, state.store, cfg.privacy, self.metrics, self._log,
                                   self._clock, self._monotonic, self._crash)
        self._keeper.tick(state.worker, checkpoint.manifest, force=True)  # windows that closed while stopped
        self._consumer = make_consumer(kafka.bootstrap_servers, kafka.group_id, kafka.settings("consumer"),
                                       max_poll_interval_ms=kafka.max_poll_interval_ms)
        self._consumer.subscribe([topics.requests], listener=_Rebalance(self))
        self._log.info("daemon_started", version=self._version, group_id=kafka.group_id, topic=topics.requests,
                       fragment_size=cfg.unlearning.fragment_size, max_wait_s=cfg.unlearning.max_wait_s)

    def _set_current(self, manifest: Any) -> None:
        self._manifest = manifest
        self._version = manifest.version
        self._offsets = {t: dict(p) for t, p in manifest.offsets.items()}

    # --- the loop ----------------------------------------------------------------------------

    def _step(self) -> None:
        assert self._consumer is not None
        unlearning = self.cfg.unlearning
        self._tick()
        if not self._collector.pending:
            self._maybe_rollback()
            if self._manifest.replay and not self._stop.is_set():  # rolled back: re-apply before reading on
                self._run_fragment(replay=True)
                return
            self._keeper.tick(self._pipeline.worker, self._manifest)
        wait_ms = self._collector.wait_ms(POLL_TIMEOUT_MS, unlearning.max_wait_s)
        try:
            batch = self._consumer.poll(timeout_ms=wait_ms,
                                        max_records=unlearning.fragment_size - len(self._collector.pending))
        except Exception as err:  # noqa: BLE001 - a batch the client cannot decode, or infrastructure
            assert self._outbox is not None
            kafka = self.cfg.kafka
            probe = lambda: KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None,  # noqa: E731
                                          enable_auto_commit=False, **kafka.settings("consumer"))
            if not skip_undecodable(self._consumer, probe, err, self._outbox, self._collector.positions,
                                    self.metrics, self._log, self._clock):
                raise
            return
        if batch:
            self._collector.handle(batch)
        self._update_lag()
        if self._collector.due(unlearning.fragment_size, unlearning.max_wait_s) and not self._stop.is_set():
            self._run_fragment()

    def _maybe_rollback(self) -> None:
        """Carry out an operator's `streamer rollback` between fragments (see state/rollback.py):
        publish the new version; the next steps re-apply the rolled-back requests from the vault."""
        assert self._state is not None and self._outbox is not None
        store = self._state.store
        request = take_request(store.root)
        if request is None:
            return
        vault = self._state.vault
        answer = run_rollback(store, self._state.ledger, str(request.get("to")), bool(request.get("force")),
                              vault.__contains__)
        if answer["ok"]:
            checkpoint = store.load(answer["version"])
            forgotten, _ = load_retained(vault, checkpoint.manifest, self.cfg.model.input_shape)
            self._pipeline.worker.reset(checkpoint.state_dict, forgotten, checkpoint.manifest.retained_misses)
            self._set_current(checkpoint.manifest)
            self._collector.clear()
            self._seek_to_current()
            self._outbox.send_checkpoint_record(checkpoint.manifest, checkpoint.path)
            resume_gauges(self.metrics, checkpoint, len(forgotten))
        answer_request(store.root, request, answer)
        self._log.bind(version=self._version).info("rollback", to=request.get("to"), ok=answer["ok"],
                                                   message=answer["message"])

    def _run_fragment(self, replay: bool = False) -> None:
        """Run the engine in a worker thread while this thread keeps the group membership alive,
        then settle failures, publish and finish the fragment here (see pipeline.py). `replay`: the
        next rolled-back requests of CURRENT's replay list, from the vault, instead of the collected ones."""
        consumer = self._consumer
        assert consumer is not None
        accepted, repeats, offsets = self._collector.take(self._offsets)
        rest: tuple = ()
        if replay:
            accepted = self._keeper.replay_batch(self._manifest, self.cfg.unlearning.fragment_size)
            rest = tuple(self._manifest.replay[len(accepted):])
        parent = self._version
        log = self._log.bind(parent=parent, requests=len(accepted))
        log.info("fragment_started", request_ids=[a.request.request_id for a in accepted], replay=replay)
        self._fragment_running, self._reseek = True, False
        try:
            run = poll_while(self._consumer, lambda: self._pipeline.unlearn(accepted, self._cancel, log),
                             POLL_TIMEOUT_MS, self._while_unlearning)
        finally:
            self._fragment_running = False
        if run is None:
            log.info("fragment_abandoned", reason="cancelled by shutdown; nothing published or committed")
            return
        self._pipeline.settle_failures(run, repeats)
        published = self._pipeline.publish(run, repeats, offsets, parent, replay=rest)
        if published is not None:
            self._set_current(published.manifest)
            self._pipeline.finish(published, self._commit, log)
            self._keeper.tick(self._pipeline.worker, self._manifest, force=True)
        else:
            log.warning("fragment_not_published", failed=len(run.failed),
                        reason="no request of the fragment could be applied; CURRENT stays")
            if replay:  # they failed when re-applied (receipted): off the replay list, or it would loop
                self._set_current(self._pipeline.drop_replayed(parent, offsets, rest))
        if self._reseek:  # assigned while the fragment ran: positions came from the old manifest
            self._seek_to_current()
        consumer.resume(*consumer.paused())

    def _while_unlearning(self) -> None:
        self._tick()
        self._update_lag()
        if self._stop.is_set():
            self._cancel.set()

    def _commit(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        assert self._consumer is not None
        commit_offsets(self._consumer, offsets, self._log)

    # --- rebalances (called inside poll, on the main thread) ---------------------------------

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Eager rebalancing revokes everything; the records of an unstarted fragment are re-read
        # from CURRENT's offsets once partitions come back.
        dropped = self._collector.clear()
        self._assigned = frozenset()
        if not revoked:  # kafka-python's first join revokes the empty set
            return
        self._log.info("partitions_revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked),
                       pending_dropped=dropped)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
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
        assert self._consumer is not None
        return seek_to_offsets(self._consumer, self._offsets)

    def _update_lag(self) -> None:
        if self._consumer is None or self._monotonic() - self._last_lag < LAG_EVERY_S:
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
        return self._state is not None and bool(self._assigned) and not self._stop.is_set()

    def _close(self) -> None:
        state = self._state
        if state is not None:
            state.lock.release()
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except KafkaError as err:
                self._log.warning("consumer_close_failed", error=repr(err))
        if self._outbox is not None:
            try:
                self._outbox.producer.close(timeout=10)
            except KafkaError as err:
                self._log.warning("producer_close_failed", error=repr(err))
        if state is not None:
            state.ledger.close()
            state.shreds.close()
        if self._server is not None:
            self._server.close()
        self._log.info("daemon_stopped", version=self._version)


def run_daemon(cfg: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 on a clean stop."""
    daemon = Daemon(cfg, CollectorRegistry(), crash=CrashHook.from_env())

    def stop(signum: int, frame: object) -> None:
        daemon.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return daemon.run()
