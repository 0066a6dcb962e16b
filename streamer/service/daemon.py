"""The daemon's poll loop: deletion events in from Kafka; versions, receipts and metrics out.

    recovery.recover    lock the directory, open the vault, load CURRENT (start-up)
    Commit.repair       finish or undo what a crash interrupted; re-send owed receipts
    Collector.handle    records -> the pending fragment, or answered now (rejected, duplicate)
    run_quarantined     the engine under the failure policy, in a worker thread
    Commit.fragment     settle -> vault -> publish -> ledger -> receipts -> offsets -> shreds
    VaultKeeper         shred on time while idle; replay after a rollback

Partition ownership: one model sees every request. The daemon assigns itself every partition of
the requests topic (and any added later: checked every PARTITIONS_EVERY_S) and uses its consumer
group only for committed offsets and lag, so a second daemon in the same group (a replicated
Deployment) never splits the requests: each model applies all of them. Fan-out is one group and
one checkpoint directory per model; a model cannot be scaled out by adding consumers, since its
fragments are one sequential state. Positions come from CURRENT's manifest, not the group.

While the worker thread unlearns (minutes on CPU), the main thread keeps polling: records that
fail validation are answered at once, valid ones are held for the next fragment (up to
fragment_size; then the partitions pause until the fragment is committed).

Delivery guarantees (where each is enforced: README "Architecture"):
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
from collections.abc import Callable
from typing import Any

import structlog
from kafka import TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from ..config import DaemonConfig
from ..engine import ALONE, Shard, join_group, leave_group, release_freed_memory
from ..intake import resolve_device
from ..kafka import consumer_lag, own_all_partitions, poll_while, seek_to_offsets
from ..pipeline import Accepted, Collector, GoalIndex, faults, replay_batch, run_quarantined
from ..state import Manifest
from ..telemetry import Metrics, serve
from .group import follow_daemon
from .services import Services

POLL_TIMEOUT_MS = 200  # the longest the loop waits for records, a signal or a due fragment
HEALTH_STALL_S = 60.0  # /healthz fails when the main loop has not ticked for this long
LAG_EVERY_S = 1.0
PARTITIONS_EVERY_S = 30.0  # how often the requests topic is checked for partitions added to it

__all__ = ["Daemon", "run_daemon"]


class Daemon:
    """One daemon per checkpoint directory and consumer group (the model is one sequential state).

    Built whole by `__init__`: the metrics server, start-up recovery (the directory lock is held
    from then on), the Kafka clients, and the repair of what a crash left. Raises what start-up
    raises (ConfigError, CheckpointDirLocked, VaultKeyError, ...) after releasing what it opened."""

    def __init__(self, cfg: DaemonConfig, registry: CollectorRegistry, log: Any = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 shard: Shard = ALONE):
        self.cfg, self._clock, self._monotonic = cfg, clock, monotonic
        self.metrics = Metrics(registry)
        self._log = log if log is not None else structlog.get_logger("streamer.daemon")
        self._stop, self._cancel = threading.Event(), threading.Event()
        self._last_tick: float | None = None  # None until the loop runs (start-up counts as healthy)
        self._last_lag = 0.0
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._last_partitions = float("-inf")
        self._ready_flag = False
        self.assignments = 0  # partition assignments made by this process
        self._server = serve(registry, cfg.metrics.host, cfg.metrics.port, self._healthy, self._ready)
        self._log.info("metrics_serving", host=self._server.host, port=self._server.port)
        try:
            self.services = Services.start(cfg, self.metrics, self._log, clock, monotonic, shard)
        except BaseException:
            self._server.close()
            raise
        s = self.services
        self._manifest: Manifest = s.checkpoint.manifest
        goals = GoalIndex(lambda: s.worker.forgotten, cfg.model.num_classes)
        self._collector = Collector(s.ctx, s.outbox, self.metrics, self._log, goals, clock, monotonic)
        self._ready_flag = True

    # --- public ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop soon (signal-handler safe): a running fragment is cancelled unless already published."""
        self._stop.set()
        self._cancel.set()

    @property
    def metrics_port(self) -> int:
        return self._server.port

    def run(self) -> int:
        """Serve until `request_stop()`; 0 on a clean stop. Errors propagate after closing clients."""
        try:
            topic = self.cfg.kafka.topics.requests
            self._log.info("daemon_started", version=self._manifest.version, group_id=self.cfg.kafka.group_id,
                           topic=topic, fragment_size=self.cfg.unlearning.fragment_size,
                           max_wait_s=self.cfg.unlearning.max_wait_s)
            while not self._stop.is_set():
                self._step()
            if self._collector.pending:
                self._log.info("fragment_abandoned", requests=len(self._collector.pending),
                               reason="shutdown before the fragment started; its records are re-read on start")
            return 0
        finally:
            self.close()

    def close(self) -> None:
        """Close the clients and the server, release the directory (idempotent)."""
        self.services.close(self._log)
        self._server.close()
        self._log.info("daemon_stopped", version=self._manifest.version)

    # --- the loop ----------------------------------------------------------------------------

    def _step(self) -> None:
        s, unlearning = self.services, self.cfg.unlearning
        self._tick()
        self._own_partitions()
        if not self._assigned:
            self._stop.wait(POLL_TIMEOUT_MS / 1000)  # the topic has no partition yet
            return
        if not self._collector.pending:
            self._maybe_rollback()
            if self._manifest.replay and not self._stop.is_set():  # rolled back: re-apply before reading on
                self._run_fragment(replay=True)
                return
            s.keeper.tick(self._manifest)
        wait_ms = self._collector.wait_ms(POLL_TIMEOUT_MS, unlearning.max_wait_s)
        try:
            batch = s.consumer.poll(timeout_ms=wait_ms,
                                    max_records=max(1, unlearning.fragment_size - len(self._collector.pending)))
        except Exception as err:  # noqa: BLE001 - a batch the client cannot decode, or infrastructure
            if not self._collector.skip_undecodable(s.consumer, s.probe_consumer, err):
                raise
            return
        if batch:
            self._collector.handle(batch)
        self._update_lag()
        if self._collector.due(unlearning.fragment_size, unlearning.max_wait_s) and not self._stop.is_set():
            self._run_fragment()

    def _maybe_rollback(self) -> None:
        """Carry out an operator's `streamer rollback` or `streamer rebase` between fragments; the
        next steps apply the requests on its replay list from the vault."""
        manifest = self.services.operation_if_requested(self._log, self._clock)
        if manifest is not None:
            self._manifest = manifest
            self.services.mirror.nudge()
            self.services.budget.start(self.services.state.store.lineage(manifest.version))
            self._collector.clear()
            self._seek_to_current()

    def _run_fragment(self, replay: bool = False) -> None:
        """Run the engine in a worker thread while this thread keeps the group membership alive,
        then commit here. `replay`: the next rolled-back requests of CURRENT's replay list, from
        the vault, instead of the collected ones."""
        s = self.services
        accepted, repeats, offsets = self._collector.take(self._manifest.offsets, self.cfg.unlearning.fragment_size)
        rest: tuple = ()
        if replay:
            accepted = replay_batch(s.state.vault, self._manifest, self.cfg.unlearning.fragment_size, self._monotonic)
            rest = tuple(self._manifest.replay[len(accepted):])
        parent = self._manifest.version
        log = self._log.bind(parent=parent, requests=len(accepted))
        log.info("fragment_started", request_ids=[a.request.request_id for a in accepted], replay=replay)
        room = self.cfg.unlearning.fragment_size
        run = poll_while(s.consumer, lambda: self._unlearn(accepted, log), POLL_TIMEOUT_MS, self._while_unlearning,
                         take=lambda batch: self._collector.screen(batch, room))
        if run is None:
            log.info("fragment_abandoned", reason="cancelled by shutdown; nothing published or committed")
            self._collector.release()
            return
        manifest = s.commit.fragment(run, repeats, offsets, parent, replay=rest, log=log)
        if manifest is not None:
            self._manifest = manifest
            s.mirror.nudge()  # upload it now (in the mirror's thread)
            s.keeper.gauges()
            s.budget.observe(manifest)
        else:
            if replay:  # they failed when re-applied (receipted): off the replay list, or it would loop
                self._manifest = s.commit.replay_failed(parent, offsets, rest)
        self._collector.release()  # the valid records read while it ran, against the committed state
        release_freed_memory()  # evaluation and commit too: resident memory stays flat over months

    def _unlearn(self, accepted: list[Accepted], log: Any) -> Any:
        """Worker thread: the engine under the failure policy; None if cancelled (nothing changed)."""
        faults.hold_at("during_unlearn", self._cancel)
        if self._cancel.is_set():
            return None

        def progress(step: int, loss: float, missing: int) -> None:
            faults.crash_at("during_unlearn")

        run = run_quarantined(self.services.worker, accepted, self._cancel, progress, log)
        if run is None or self._cancel.is_set():
            return None
        faults.crash_at("during_unlearn")  # also when the goal needed no step at all
        return run

    def _while_unlearning(self) -> None:
        """While the fragment unlearns: alive and lagging as usual; a stop cancels it."""
        self._tick()
        self._update_lag()
        if self._stop.is_set():
            self._cancel.set()

    # --- partition ownership ------------------------------------------------------------------

    def _own_partitions(self) -> None:
        """Own every partition of the requests topic: at start and whenever partitions were added
        (checked every PARTITIONS_EVERY_S; kafka.own_all_partitions)."""
        now = self._monotonic()
        if now - self._last_partitions < PARTITIONS_EVERY_S:
            return
        self._last_partitions = now
        try:
            owned = own_all_partitions(self.services.consumer, self.cfg.kafka.topics.requests, self._assigned,
                                       self._manifest.offsets)
        except KafkaError as err:
            self._log.warning("partitions_unknown", error=repr(err))
            return
        if owned is None:
            return
        partitions, sources = owned
        added = sorted(f"{tp.topic}/{tp.partition}" for tp in partitions - self._assigned)
        self._assigned, self.assignments = partitions, self.assignments + 1
        self._log.info("partitions_assigned", assignment=self.assignments, positions=sources, added=added)

    # --- small helpers -----------------------------------------------------------------------

    def _seek_to_current(self) -> dict[str, int | str]:
        return seek_to_offsets(self.services.consumer, self._manifest.offsets)

    def _update_lag(self) -> None:
        if self._monotonic() - self._last_lag < LAG_EVERY_S:
            return
        self._last_lag = self._monotonic()
        try:
            self.metrics.set_lag(consumer_lag(self.services.consumer))
        except KafkaError as err:
            self._log.debug("lag_unavailable", error=repr(err))

    def _tick(self) -> None:
        self._last_tick = self._monotonic()

    def _healthy(self) -> bool:
        return self._last_tick is None or self._monotonic() - self._last_tick < HEALTH_STALL_S

    def _ready(self) -> bool:
        return self._ready_flag and bool(self._assigned) and not self._stop.is_set()


def run_daemon(cfg: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 on a clean stop. The fault-injection points of the
    crash tests are armed from the environment (pipeline/faults.py). Under torchrun (WORLD_SIZE >
    1) rank 0 is the daemon and the other ranks follow its fragments (service/group.py)."""
    shard, device = join_group(resolve_device(cfg.device))
    log = structlog.get_logger("streamer.daemon")
    if shard.rank > 0:
        return follow_daemon(cfg, shard, device, log)
    try:
        return _serve(cfg, shard, log)
    finally:
        leave_group(shard)


def _serve(cfg: DaemonConfig, shard: Shard, log: Any) -> int:
    daemon: Daemon | None = None
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        if daemon is not None:
            daemon.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    faults.arm()
    for line in cfg.deprecations:
        log.warning("config_deprecated", detail=line)
    daemon = Daemon(cfg, CollectorRegistry(), shard=shard)
    if stopping.is_set():
        daemon.request_stop()
    return daemon.run()
