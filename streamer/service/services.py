"""The daemon's parts, built in start-up order and closed in reverse: what `Daemon.__init__` starts.

    recover            the locked checkpoint directory, the vault, CURRENT and the engine around it
    topics, producer   the four topics ensured; the producer (owed receipts go out first)
    consumer           created, subscribed only when the loop starts
    Commit.repair      what a crash interrupted, finished or undone; CURRENT announced again
    counters           the request counters continue from the ledger
    VaultKeeper.tick   windows that closed while the daemon was stopped
    Mirror             the publish targets' upload thread (versions a crash left un-uploaded first)
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from ..config import DaemonConfig
from ..engine import ALONE, Shard
from ..kafka import ensure_topics, make_consumer, make_producer, topic_configs_by_name
from ..pipeline import Commit, Outbox, Repaired, UtilityBudget, VaultKeeper, run_rebase
from ..publish import Mirror, make_targets
from ..state import (KINDS, Manifest, OperationRefused, Window, answer_request, load_retained, run_rollback,
                     staged_file, take_request)
from ..telemetry import Metrics
from .recovery import Recovered, recover, resume_gauges

__all__ = ["Services"]


@dataclass
class Services:
    """Everything the poll loop uses besides its own state; `close()` releases it all."""

    cfg: DaemonConfig
    state: Recovered
    producer: KafkaProducer
    consumer: KafkaConsumer
    outbox: Outbox
    commit: Commit
    keeper: VaultKeeper
    budget: UtilityBudget
    metrics: Metrics
    mirror: Mirror
    _closers: ExitStack

    @staticmethod
    def start(cfg: DaemonConfig, metrics: Metrics, log: Any, clock: Callable[[], float] = time.time,
              monotonic: Callable[[], float] = time.monotonic, shard: Shard = ALONE) -> Services:
        """Build every part in order; on any error, close what was built and re-raise. `shard`:
        rank 0 of a torchrun group, whose other ranks follow its fragments (engine/distributed.py)."""
        kafka = cfg.kafka
        with ExitStack() as stack:
            state = recover(cfg, metrics, log, clock, shard)
            stack.callback(state.close)
            _ensure_topics(cfg, log)
            producer = make_producer(kafka.bootstrap_servers, kafka.settings("producer"))
            stack.callback(_close_client, producer, "producer", log)
            outbox = Outbox(producer, kafka.topics, state.ledger, metrics, log, clock, kafka.dead_letter_payload,
                            int(kafka.settings("producer").get("max_request_size", 1_048_576)))
            consumer = make_consumer(kafka.bootstrap_servers, kafka.group_id, kafka.settings("consumer"),
                                     max_poll_interval_ms=kafka.max_poll_interval_ms)
            stack.callback(_close_client, consumer, "consumer", log)
            commit = Commit(state.worker, state.store, state.vault, state.shreds, outbox, consumer, metrics,
                            Window.of(cfg.privacy), log, clock)
            _log_repaired(log, state, commit.repair(state.checkpoint))
            metrics.resume_counts(state.ledger.counts())
            keeper = VaultKeeper(state.vault, state.shreds, commit, cfg.privacy, metrics, monotonic)
            keeper.tick(state.checkpoint.manifest, force=True)  # windows that closed while stopped
            budget = UtilityBudget.of(cfg, metrics, log, state.baseline)
            budget.start(state.store.lineage(state.checkpoint.manifest.version))
            mirror = _start_mirror(cfg, state, metrics, log, clock)
            stack.callback(mirror.stop)
            return Services(cfg, state, producer, consumer, outbox, commit, keeper, budget, metrics, mirror,
                            stack.pop_all())
        raise AssertionError("unreachable")  # ExitStack does not swallow exceptions

    # --- what the loop asks of them -------------------------------------------------------------

    @property
    def worker(self) -> Any:
        return self.state.worker

    @property
    def ctx(self) -> Any:
        return self.state.ctx

    @property
    def checkpoint(self) -> Any:
        return self.state.checkpoint

    def probe_consumer(self) -> KafkaConsumer:
        """A group-less consumer for probing undecodable batches (kafka.find_undecodable)."""
        kafka = self.cfg.kafka
        return KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                             **kafka.settings("consumer"))

    def operation_if_requested(self, log: Any, clock: Callable[[], float] = time.time) -> Manifest | None:
        """Carry out a pending `streamer rollback` or `streamer rebase` (state/operations.py): publish
        the new version and load its weights and retained set (a rebase's also as the teacher and
        the audit baseline). The new CURRENT's manifest, or None when there was no request or it was
        refused (answered either way)."""
        store, vault = self.state.store, self.state.vault
        for kind in KINDS:
            request = take_request(store.root, kind)
            if request is None:
                continue
            if kind == "ROLLBACK":
                answer = run_rollback(store, self.state.ledger, str(request.get("to")), bool(request.get("force")),
                                      vault.__contains__)
            else:
                answer = self._rebase(request, clock)
            manifest = self._load(answer["version"]) if answer["ok"] else None
            answer_request(store.root, kind, request, answer)
            log.bind(version=store.current_version()).info(kind.lower(), ok=answer["ok"], message=answer["message"])
            if manifest is not None:
                return manifest
        return None

    def _rebase(self, request: dict, clock: Callable[[], float]) -> dict:
        """A rebase request: its weights and exclusion list are the copies the command staged in
        the checkpoint directory, never a path the request names (state/operations.py)."""
        store = self.state.store
        try:
            weights, excluded = (staged_file(store.root, "REBASE", request, key) for key in ("weights", "excluded"))
        except OperationRefused as err:
            return {"ok": False, "version": None, "message": f"rebase refused: {err}"}
        given = request.get("weights_given")
        return run_rebase(self.cfg, store, self.state.ledger, self.state.vault, str(weights), str(excluded), clock,
                          shown=given if isinstance(given, str) else None)

    def _load(self, version: str) -> Manifest:
        """Make `version` (just published by a rollback or rebase) the worker's, and announce it."""
        checkpoint = self.state.store.load(version)
        manifest = checkpoint.manifest
        forgotten, _ = load_retained(self.state.vault, manifest, self.cfg.model.input_shape)
        if manifest.base is not None:
            baseline = manifest.base.get("audit_accuracy")
            self.worker.rebase(checkpoint.state_dict, forgotten, baseline)
            if baseline is not None:
                self.metrics.set_audit_baseline(float(baseline))
        else:
            self.worker.reset(checkpoint.state_dict, forgotten, manifest.retained_misses)
        self.outbox.send_checkpoint_record(manifest, checkpoint.path)
        resume_gauges(self.metrics, checkpoint, len(forgotten))
        return manifest

    def close(self, log: Any) -> None:
        """Close the clients, the ledger, then release the directory (idempotent)."""
        self._closers.close()


def _start_mirror(cfg: DaemonConfig, state: Recovered, metrics: Metrics, log: Any, clock: Callable[[], float]) -> Mirror:
    targets = make_targets(list(cfg.checkpoints.publish))
    metrics.publish.targets([t.name for t in targets])
    mirror = Mirror(state.store, targets, metrics, log, clock)
    mirror.start()
    if targets:
        log.info("publish_targets", targets=[t.name for t in targets])
    return mirror


def _ensure_topics(cfg: DaemonConfig, log: Any) -> None:
    kafka = cfg.kafka
    configs = topic_configs_by_name(kafka.topics, kafka.topic_configs)
    try:
        created = ensure_topics(kafka.bootstrap_servers, kafka.settings("admin"), list(configs), configs=configs)
        log.info("topics_ensured", created={name: configs[name] for name in created})
    except KafkaError as err:  # e.g. no create permission: the topics may well exist
        log.warning("topics_not_ensured", error=repr(err))


def _log_repaired(log: Any, state: Recovered, repaired: Repaired) -> None:
    manifest = state.checkpoint.manifest
    log.info("checkpoint_loaded", version=manifest.version, forgotten=len(state.worker.forgotten),
             offsets=manifest.offsets, audit_baseline=state.baseline, ledger_rows_added=repaired.ledger_added,
             ledger_rows_rolled_back=repaired.ledger_rolled_back)
    if repaired.vault_orphans:
        log.info("vault_orphans_removed", request_ids=repaired.vault_orphans,
                 reason="written for a fragment that was never published; Kafka replays their records")
    if repaired.shreds_recorded:
        log.warning("shreds_recorded_on_start", request_ids=repaired.shreds_recorded)


def _close_client(client: Any, name: str, log: Any) -> None:
    try:
        client.close(autocommit=False) if isinstance(client, KafkaConsumer) else client.close(timeout=10)
    except KafkaError as err:
        log.warning(f"{name}_close_failed", error=repr(err))
