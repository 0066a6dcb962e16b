"""Start-up recovery: load CURRENT and everything around it; resume gauges; seek to CURRENT's offsets.

On start the daemon opens the forget vault with the configured KEK first (a missing or wrong KEK
refuses the start, before any model is loaded), migrates schema-1 versions' plaintext
forgotten.pt into the vault, loads CURRENT (sha256 verified, in the format its manifest records;
the configured model is published as v000000, in the configured format, on the very first start)
and its retained set from the vault, checks that the configured trainable parameters exist and
logs them. What a crash interrupted is then finished or undone by `pipeline.Commit.repair`, which
owns the order of the durable steps. On every partition assignment the consumer seeks to the
offsets in CURRENT's manifest: the checkpoint, not the group's committed offset, decides where
consumption resumes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any


from ..config import DaemonConfig
from ..engine import ALONE, Shard, accuracy, clone_module, load_model, load_net_state, save_user_model, select_trainable
from ..intake import SampleContext, load_dataset_ref, resolve_device, sample_context
from ..state import (BASE_VERSION, LEDGER_FILE, Checkpoint, CheckpointDirLocked, CheckpointStore, DirectoryLock,
                     ForgetVault, KmsKEK, Ledger, ModelFile, ShredLog, load_retained, migrate_legacy, open_vault,
                     remove_stale_staged)
from ..pipeline import FragmentWorker
from ..telemetry import Metrics

__all__ = ["Recovered", "recover", "resume_gauges"]


@dataclass
class Recovered:
    """What the daemon resumes from: the locked store, the ledger, the engine around CURRENT."""

    store: CheckpointStore
    lock: DirectoryLock
    ledger: Ledger
    worker: FragmentWorker
    ctx: SampleContext
    checkpoint: Checkpoint
    baseline: float | None  # the base model's audit accuracy (None without an audit set)
    vault: ForgetVault
    shreds: ShredLog

    def close(self) -> None:
        self.ledger.close()
        self.shreds.close()
        self.lock.release()


def recover(cfg: DaemonConfig, metrics: Metrics, log: Any, clock: Callable[[], float] = time.time,
            shard: Shard = ALONE) -> Recovered:
    """Load CURRENT and everything around it (what a crash left is repaired by `Commit.repair`
    next); the gauges continue from CURRENT's manifest. Raises CheckpointDirLocked if another
    process holds the directory, VaultKeyError when the KEK is missing, unreadable or not the vault's."""
    store = CheckpointStore(cfg.checkpoints.dir, cfg.checkpoints.keep, clock, cfg.checkpoints.group_readable)
    lock = DirectoryLock(store.root)  # single writer first: nothing is cleaned or written before it
    if not lock.acquire():
        raise CheckpointDirLocked(f"{store.root} is locked by another process ({store.root / 'LOCK'}): "
                                  "one daemon per checkpoint directory")
    try:
        _clean(store, log)
        vault = open_vault(cfg, writer=True, clock=clock)  # fail fast: before any model is loaded
        if isinstance(vault.kek, KmsKEK):  # its failed calls counted: streamer_kms_errors_total
            metrics.kms.configured()
            vault.kek.on_error = metrics.kms.failed
        if vault.recovered:
            log.info("vault_crash_leftovers_erased", files=len(vault.recovered))
        if vault.finished_rotation is not None:  # `streamer kek rotate` was killed after its commit point
            r = vault.finished_rotation
            log.warning("kek_rotation_finished_on_start", rotation_id=r.rotation_id, old_key_id=r.old_key_id,
                        new_key_id=r.new_key_id, entries=r.entries)
        migrated = migrate_legacy(store, vault)
        if migrated:
            log.warning("plaintext_forgotten_sets_migrated", versions=migrated,
                        detail="forgotten.pt moved into the vault and erased")
        worker, checkpoint, baseline = _load_worker(cfg, store, vault, log, shard)
        if baseline is not None:
            metrics.set_audit_baseline(baseline)
        resume_gauges(metrics, checkpoint, len(worker.forgotten))
        ledger = Ledger(store.root / LEDGER_FILE)
        shreds = ShredLog(store.root / LEDGER_FILE)
        return Recovered(store, lock, ledger, worker, sample_context(cfg), checkpoint, baseline, vault, shreds)
    except BaseException:
        lock.release()  # a start that failed leaves the directory to the next one
        raise


def _clean(store: CheckpointStore, log: Any) -> None:
    """Temp files of an interrupted publish, and files staged for operator requests no longer
    pending, removed; versions written but never CURRENT logged."""
    stale = store.recover() + remove_stale_staged(store.root)
    if stale:
        log.info("stale_temp_files_removed", files=stale)
    orphans = store.orphans()
    if orphans:  # written, never CURRENT (a crash or a failed switch): kept, never part of a lineage
        log.warning("orphan_versions", versions=orphans, current=store.current_version())


def _load_worker(cfg: DaemonConfig, store: CheckpointStore, vault: ForgetVault,
                 log: Any, shard: Shard = ALONE) -> tuple[FragmentWorker, Checkpoint, float | None]:
    """The engine around CURRENT (the configured model published as v000000 on the very first
    start), its retained set from the vault, and the base model's audit accuracy."""
    device = resolve_device(cfg.device)
    base = load_model(cfg.model, device)
    select_trainable(base.net, cfg.engine.trainable_spec)  # a bad glob fails before any publish
    fmt, shape = cfg.model.model_format, cfg.model.input_shape
    audit = load_dataset_ref(cfg.data.audit, shape) if cfg.data.audit else None
    buffer = load_dataset_ref(cfg.data.buffer, shape) if cfg.data.buffer else None
    if store.current_version() is None:
        first = {"audit_accuracy": accuracy(base, audit.x, audit.y)} if audit is not None else {}
        store.publish(None, ModelFile(fmt, save_user_model(base.net, fmt, shape)), metrics=first)
        log.info("base_version_published", version=BASE_VERSION, weights=cfg.model.weights, model_format=fmt)
    current = store.current_version() or BASE_VERSION
    checkpoint = store.load(current)  # sha256 verified, read in the format its manifest records
    forgotten, shredded = load_retained(vault, checkpoint.manifest, shape)
    teacher = store.base_of(current)  # the lineage's own base: v000000, or the last rebase (a retrained model)
    if teacher != BASE_VERSION or current != BASE_VERSION:  # (v000000 is the configured model itself)
        load_net_state(base, store.load(teacher).state_dict, where=store.path(teacher))
    model = clone_module(base)  # not deepcopy: a deep-copied TorchScript module cannot be trained
    load_net_state(model, checkpoint.state_dict, where=checkpoint.path)
    model.eval()
    baseline = accuracy(base, audit.x, audit.y) if audit is not None else None
    u = cfg.unlearning
    worker = FragmentWorker(model, cfg.engine, cfg.model.num_classes, forgotten, teacher=base, audit=audit,
                            buffer=buffer, audit_baseline=baseline, max_audit_drop=u.max_audit_drop,
                            max_missed_fragments=u.max_missed_fragments, misses=checkpoint.manifest.retained_misses,
                            model_format=fmt, input_shape=shape, shard=shard)
    if checkpoint.manifest.model_format != fmt:
        worker.model_file()  # the configured format changed: a net that cannot be written in it fails now
    log.info("model_loaded", version=current, device=str(device), source=cfg.model.source, ranks=shard.world,
             model_format=checkpoint.manifest.model_format, publishes=fmt)
    log.info("trainable_parameters", **worker.describe_trainable())
    log.info("vault_opened", key_id=vault.kek.key_id, live=len(forgotten), shredded_since=len(shredded))
    return worker, checkpoint, baseline


def resume_gauges(metrics: Metrics, checkpoint: Checkpoint, forgotten: int) -> None:
    """Gauges as CURRENT's manifest recorded them, so a restart shows no gap until the next fragment."""
    m = checkpoint.manifest
    metrics.set_checkpoint(m.number, _timestamp(m.created_at))
    metrics.set_forgotten(forgotten)
    recorded = {name: m.metrics.get(f"{name}_accuracy") for name in ("fragment", "forgotten", "audit")}
    metrics.set_accuracies({k: float(v) for k, v in recorded.items() if v is not None})


def _timestamp(rfc: str) -> float:
    return datetime.fromisoformat(rfc.replace("Z", "+00:00")).timestamp()
