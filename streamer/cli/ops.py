"""Operator commands over a checkpoint directory: list, show, verify, rollback, forgotten, rebase.

They read the version directories and the ledger, so they work whether the daemon runs or not;
rollback and rebase hand the work to a running daemon (state/operations.py), else do it here.
"""
from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pipeline import exclusion_list, run_rebase
from ..state import (LEDGER_FILE, CheckpointError, CheckpointStore, DirectoryLock, Ledger, LedgerError, ShredLog,
                     ShredRow, load_retained, open_vault, read_index, record_verification, request_via_daemon, rfc3339,
                     run_rollback)
from ..config import DaemonConfig
from ..engine import goal_met, published_model
from ..engine import logits as predict_logits
from ..intake import load_dataset_ref, resolve_device



def list_versions(store: CheckpointStore) -> str:
    """A table of every version on disk. The last column marks CURRENT, the rest of CURRENT's
    lineage, versions outside it (rolled back), and orphans (written, never CURRENT)."""
    current = store.current_version()
    lineage = {m.version for m in store.lineage(current)} if current else set()
    orphans = set(store.orphans())
    lines = ["| version | parent | created_at | requests | outcomes | forgotten acc | audit acc | |",
             "|---|---|---|---|---|---|---|---|"]
    for version in store.versions():
        m = store.manifest(version)
        counts = Counter(r.get("status") for r in m.requests)
        counts.update("duplicate" for _ in m.duplicates)
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"
        lines.append(f"| {version} | {m.parent or '-'} | {m.created_at} | {len(m.requests)} | {outcomes} | "
                     f"{_fmt(m.metrics.get('forgotten_accuracy'))} | {_fmt(m.metrics.get('audit_accuracy'))} | "
                     f"{_role(version, current, lineage, orphans)} |")
    return "\n".join(lines)


def show_version(store: CheckpointStore, version: str | None = None) -> str:
    """The manifest of `version` (default CURRENT) as JSON, with where it lives and whether it is CURRENT."""
    version = version or store.current_version()
    if version is None:
        raise CheckpointError(f"no version in {store.root}")
    m = store.manifest(version)
    data = m.to_json()
    data["current"] = version == store.current_version()
    data["path"] = str(store.path(version))
    return json.dumps(data, indent=2, sort_keys=True)


def _role(version: str, current: str | None, lineage: set[str], orphans: set[str]) -> str:
    if version == current:
        return "CURRENT"
    if version in orphans:
        return "orphan (never CURRENT; not in any lineage)"
    return "lineage" if version in lineage else "outside CURRENT's lineage (rolled back)"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass(frozen=True)
class Verification:
    version: str
    checked: int  # retained instances evaluated
    came_back: list[str]  # request ids whose instance no longer meets its goal
    unverifiable: list[str]  # applied in the lineage, but neither in the retained forgotten set nor shredded
    audit_accuracy: float | None
    shredded: list[ShredRow] = field(default_factory=list)  # "verified until vN, shredded at T": neither pass nor fail
    abandoned: list[str] = field(default_factory=list)  # left the retained set, goal unreachable (own category)
    non_finite: int = 0  # retained or audit instances with NaN/Inf logits (they count as came back)
    model_format: str = "state_dict"  # the version's model file, loaded as its user loads it
    deferred: list[str] = field(default_factory=list)  # owed: not applied yet (the utility budget), the next rebase
    @property
    def ok(self) -> bool:
        return not self.came_back and not self.unverifiable

    @property
    def exit_code(self) -> int:
        """0: everything checks out; 1: instances came back; 2: cannot verify (unverifiable requests)."""
        return 1 if self.came_back else 2 if self.unverifiable else 0


def verify(cfg: DaemonConfig, version: str | None = None) -> Verification:
    """Re-evaluate a version: every request applied in its lineage must still meet its goal on its
    model file, loaded in the format its manifest records as a serving stack loads it, with the
    instances decrypted from the forget vault (needs the KEK: raises VaultKeyError without it). A
    request shredded since is reported with the last version that verified it, neither pass nor fail.

    Raises CheckpointError / LedgerError naming the first missing or damaged file: every file of
    every version in the lineage, the base included, is checked against its sha256 first."""
    store = CheckpointStore(cfg.checkpoints.dir)
    version = version or store.current_version()
    if version is None:
        raise CheckpointError(f"no version in {cfg.checkpoints.dir}: nothing to verify")
    lineage = store.lineage(version)
    for manifest in lineage:
        store.verify_files(manifest.version)
    checkpoint = store.load(version)
    vault = open_vault(cfg, writer=False)
    forgotten, _ = load_retained(vault, checkpoint.manifest, cfg.model.input_shape)
    device = resolve_device(cfg.device)
    model = published_model(cfg.model, checkpoint.model.data, checkpoint.model.format, device)
    came_back: list[str] = []
    non_finite = 0
    if len(forgotten):
        logits = predict_logits(model, forgotten.x)
        met = goal_met(logits, forgotten.y, forgotten.target)  # NaN/Inf rows never meet a goal
        came_back = [rid for rid, ok in zip(forgotten.request_ids, met.tolist()) if not ok]
        non_finite = int((~torch.isfinite(logits)).any(1).sum())
    retained = set(forgotten.request_ids)
    abandoned = {a["request_id"] for m in lineage for a in m.abandoned}
    applied = _applied_in_lineage(store, lineage)
    shreds: dict[str, ShredRow] = {}
    if (store.root / LEDGER_FILE).exists():
        with ShredLog(store.root / LEDGER_FILE) as log:
            shreds = log.rows()
    shredded = [shreds[rid] for rid in sorted(applied) if rid in shreds and rid not in retained]
    unverifiable = sorted(rid for rid in applied if rid not in retained and rid not in abandoned and rid not in shreds)
    audit = None
    if cfg.data.audit is not None:
        data = load_dataset_ref(cfg.data.audit, cfg.model.input_shape)
        logits = predict_logits(model, data.x)
        bad = int((~torch.isfinite(logits)).any(1).sum())
        non_finite += bad
        audit = float((logits.argmax(1) == data.y).float().mean()) if not bad else float("nan")
    result = Verification(version, len(forgotten), sorted(came_back), unverifiable, audit, shredded,
                          sorted(abandoned & applied), non_finite, checkpoint.model.format,
                          sorted(str(d["request_id"]) for d in checkpoint.manifest.deferred))
    _record(store, result)
    return result


def _record(store: CheckpointStore, result: Verification) -> None:
    """`<version>/verified.json`, which publish targets with alias_after_verify wait for."""
    entry = {"version": result.version, "ok": result.ok and not result.non_finite, "at": rfc3339(time.time()),
             "checked": result.checked, "came_back": len(result.came_back), "unverifiable": len(result.unverifiable),
             "audit_accuracy": None if result.audit_accuracy is None or result.audit_accuracy != result.audit_accuracy
             else round(result.audit_accuracy, 6)}
    try:
        record_verification(store.path(result.version), entry)
    except OSError as err:  # a read-only copy of the directory still verifies; only the record is missing
        print(f"warning: the verification of {result.version} was not recorded: {err.strerror}", file=sys.stderr)


def _applied_in_lineage(store: CheckpointStore, manifests: list) -> set[str]:
    """Request ids applied (forgotten / relabelled / failed) by a version and its ancestors
    (`manifests`, its lineage): from the manifests, cross-checked with the ledger when it is there."""
    lineage = {m.version for m in manifests}
    applied = {r["request_id"] for m in manifests for r in m.requests}
    ledger_path = store.root / LEDGER_FILE
    if ledger_path.exists():
        with Ledger(ledger_path) as ledger:
            try:
                rows = ledger.rows()
                applied |= {row.outcome.request_id for row in rows
                            if row.outcome.status in ("forgotten", "relabelled", "failed")
                            and row.outcome.version in lineage and ledger.applied(row.outcome.request_id) is not None}
            except sqlite3.DatabaseError as err:
                raise LedgerError(f"the ledger {ledger_path} is damaged: {err}") from err
    return applied


def rollback(cfg, to_version: str, force: bool, timeout_s: float = 900.0) -> dict:
    """`streamer rollback`: done by the running daemon if there is one, else here.
    Returns {"ok": bool, "message": str, "version": new version or None}."""
    root = Path(cfg.checkpoints.dir)
    lock = DirectoryLock(root)
    if not lock.acquire():
        return request_via_daemon(root, "ROLLBACK", {"to": to_version, "force": force}, timeout_s)
    try:
        store = CheckpointStore(root, cfg.checkpoints.keep, group_readable=cfg.checkpoints.group_readable)
        live = {e.request_id for e in read_index(cfg.privacy.vault_path(root)) if not e.shredded}
        with Ledger(root / LEDGER_FILE) as ledger:
            return run_rollback(store, ledger, to_version, force, live.__contains__)
    finally:
        lock.release()


def forgotten(cfg: DaemonConfig) -> dict:
    """`streamer forgotten`: the exclusion list (pipeline/forgotten.py), read while the daemon runs or not."""
    root = Path(cfg.checkpoints.dir)
    store = CheckpointStore(root)
    current = store.current_version()
    if current is None or not (root / LEDGER_FILE).exists():
        raise CheckpointError(f"no version and ledger in {root}: nothing has been forgotten yet")
    with Ledger(root / LEDGER_FILE) as ledger, ShredLog(root / LEDGER_FILE) as shreds:
        return exclusion_list(ledger, store.manifest(current), shreds.rows())


def rebase(cfg: DaemonConfig, weights: str, excluded: str, timeout_s: float = 900.0) -> dict:
    """`streamer rebase`: done by the running daemon if there is one, else here (the daemon applies
    the replay list when it next runs). Returns {"ok": bool, "message": str, "version": ...}."""
    root = Path(cfg.checkpoints.dir)
    weights, excluded = str(Path(weights).resolve()), str(Path(excluded).resolve())
    lock = DirectoryLock(root)
    if not lock.acquire():
        return request_via_daemon(root, "REBASE", {"weights_given": weights}, timeout_s,  # copied in, not named
                                  files={"weights": Path(weights), "excluded": Path(excluded)})
    try:
        store = CheckpointStore(root, cfg.checkpoints.keep, group_readable=cfg.checkpoints.group_readable)
        vault = open_vault(cfg, writer=False)
        with Ledger(root / LEDGER_FILE) as ledger:
            return run_rebase(cfg, store, ledger, vault, weights, excluded, time.time)
    finally:
        lock.release()
