"""Rebase: hand the daemon over to a model retrained without the deleted data.

`streamer rebase --weights NEW --excluded LIST` (daemon running or stopped, like rollback)
publishes one version whose weights are NEW and which starts a lineage of its own (its manifest's
`base`: NEW's sha256 and audit accuracy; NEW is from then on the distillation teacher and the
audit baseline). It refuses unless LIST (`streamer forgotten`) names every request the daemon
owes or owed an erasure. Then every request still in the forget vault is checked on NEW:

    misclassify / relabel, goal met on NEW   carried: stays retained (anti-resurrection, its window runs on)
    misclassify / relabel, goal not met      re-applied from the vault in fragments (the version's `replay`):
                                             a model that never saw a typical instance classifies it
                                             correctly, so most misclassify requests come back here
    unseen                                   covered: a model that never saw it is the goal itself
    deferred (owed)                          applied now, from the vault, first (the version's `replay`)

Every request applied in the old lineage, and not re-applied, gets a `rebased` row (covered by the
retraining; the shredded ones too), in the version's `requests` and in the ledger. Exactly once
across kill -9: the version (atomic) comes before the ledger rows, which `reconcile` rebuilds
from it; the replay list is carried out by the daemon like a rollback's.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DaemonConfig
from ..engine import goal_mask, load_model, save_user_model
from ..engine import accuracy as accuracy_of
from ..errors import StreamerError
from ..intake import load_dataset_ref, resolve_device
from ..state import (CheckpointStore, ForgetVault, Ledger, Manifest, ModelFile, RequestOutcome, RetainedRef,
                     load_retained, rfc3339)
from . import faults
from .forgotten import LISTED, listed_ids

__all__ = ["RebasePlan", "RebaseRefused", "apply_rebase", "plan_rebase", "run_rebase"]

COVERED = "covered by the rebase onto a model retrained without it ({how})"


class RebaseRefused(StreamerError):
    """The rebase cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RebasePlan:
    current: Manifest
    model: ModelFile  # NEW, in the configured format
    base: dict[str, Any]  # the version's `base` record
    carried: tuple[RetainedRef, ...]
    replay: tuple[Mapping[str, Any], ...]
    covered: tuple[RequestOutcome, ...]  # `rebased` outcomes, not settled


def plan_rebase(cfg: DaemonConfig, store: CheckpointStore, ledger: Ledger, vault: ForgetVault, weights: Path,
                excluded: Path, shown: str | None = None) -> RebasePlan:
    """What the rebase will publish (`shown`: the weights' name to record, default `weights`).
    Raises RebaseRefused (no version, a list that misses a request, weights that do not load)
    before anything is written."""
    current_version = store.current_version()
    if current_version is None:
        raise RebaseRefused(f"no version in {store.root}: start the daemon once before rebasing")
    current = store.manifest(current_version)
    _check_covered(ledger, excluded)
    net, model_file, base = _load_new(cfg, weights, shown or str(weights))
    lineage = store.lineage(current.version)
    rows = {}  # request_id -> its newest row in the lineage
    for manifest in reversed(lineage):
        rows.update({str(r["request_id"]): r for r in manifest.requests})
    forgotten, _ = load_retained(vault, current, cfg.model.input_shape)
    met = goal_mask(net, forgotten.x, forgotten.y, forgotten.target).tolist() if len(forgotten) else []
    refs = {r.request_id: r for r in current.retained}
    carried, replay = [], []
    for rid, ok in zip(forgotten.request_ids, met):
        if rid in forgotten.unseen:
            continue  # covered: the retrained model never saw it, which is the unseen goal
        if ok:
            carried.append(replace(refs[rid], met=True))
        else:
            replay.append(rows[rid])
    replay = [*current.deferred, *current.replay, *replay]  # owed first: they waited for this retraining
    again = {str(r["request_id"]) for r in replay}
    covered = tuple(_covered(RequestOutcome.from_manifest(row), rid, carried, forgotten.unseen)
                    for rid, row in rows.items() if rid not in again and row["status"] in LISTED)
    return RebasePlan(current, model_file, base, tuple(carried), tuple(replay), covered)


def apply_rebase(store: CheckpointStore, ledger: Ledger, plan: RebasePlan,
                 clock: Callable[[], float]) -> Manifest:
    """Publish the rebase version, then the ledger's `rebased` rows (`reconcile` rebuilds them
    from the version after a crash in between). Raises CheckpointError / LedgerError."""
    base = {**plan.base, "rebased_at": rfc3339(clock()), "rebased_from": plan.current.version}
    metrics = {"audit_accuracy": base.get("audit_accuracy"), "audit_baseline_accuracy": base.get("audit_accuracy"),
               "carried_requests": len(plan.carried), "replayed_requests": len(plan.replay),
               "covered_requests": len(plan.covered)}
    manifest = store.publish(plan.current.version, plan.model, plan.carried,
                             requests=[o.to_manifest() for o in plan.covered], offsets=plan.current.offsets,
                             metrics=metrics, replay=plan.replay, base=base)
    faults.crash_at("rebase_after_publish")
    ledger.append([o.settled(manifest.version, manifest.created_at) for o in plan.covered])
    faults.crash_at("rebase_after_ledger")
    return manifest


def run_rebase(cfg: DaemonConfig, store: CheckpointStore, ledger: Ledger, vault: ForgetVault, weights: str,
               excluded: str, clock: Callable[[], float], shown: str | None = None) -> dict:
    """Plan and apply; the answer the command prints (and the daemon writes to the result file).
    `shown`: how to name the weights (the command's path, when the daemon reads a staged copy)."""
    shown = shown or weights
    try:
        plan = plan_rebase(cfg, store, ledger, vault, Path(weights), Path(excluded), shown)
        manifest = apply_rebase(store, ledger, plan, clock)
    except RebaseRefused as err:
        return {"ok": False, "version": None, "message": f"rebase refused: {err}"}
    return {"ok": True, "version": manifest.version, "message": (
        f"published {manifest.version} = the retrained model {shown} (audit accuracy "
        f"{plan.base.get('audit_accuracy')}); CURRENT = {manifest.version}; {len(plan.carried)} retained requests "
        f"meet their goal on it (carried), {len(plan.replay)} will be applied from the forget vault by the daemon "
        f"(re-applied or owed), {len(plan.covered)} are covered by the retraining")}


def _check_covered(ledger: Ledger, excluded: Path) -> None:
    try:
        listed = listed_ids(json.loads(excluded.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise RebaseRefused(f"cannot read the exclusion list {excluded}: {err}") from err
    owed = {row.outcome.request_id for row in ledger.rows() if row.outcome.request_id is not None
            and row.outcome.status in LISTED and not (row.outcome.status == "failed" and row.outcome.version is None)}
    missing = sorted(owed - listed)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise RebaseRefused(f"the exclusion list {excluded} does not name {len(missing)} requests the daemon "
                            f"applied or owes: {shown}; a model trained on them has not forgotten them "
                            "(`streamer forgotten` writes the full list)")


def _load_new(cfg: DaemonConfig, weights: Path, shown: str) -> tuple[nn.Module, ModelFile, dict[str, Any]]:
    """NEW as the configured model (its file in the configured format) and the `base` record."""
    try:
        data = weights.read_bytes()
    except OSError as err:
        raise RebaseRefused(f"cannot read the retrained weights {weights}: {err}") from err
    device = resolve_device(cfg.device)
    net = load_model(replace(cfg.model, weights=str(weights)), device).eval()  # ModelLoadError: one line
    fmt, shape = cfg.model.model_format, cfg.model.input_shape
    audit = None
    if cfg.data.audit is not None:
        data_ref = load_dataset_ref(cfg.data.audit, shape)
        audit = round(accuracy_of(net, data_ref.x.to(device), data_ref.y.to(device)), 6)
    base = {"sha256": hashlib.sha256(data).hexdigest(), "weights": shown, "audit_accuracy": audit}
    with torch.no_grad():
        return net, ModelFile(fmt, save_user_model(net.net, fmt, shape)), base


def _covered(o: RequestOutcome, rid: str, carried: list[RetainedRef], unseen: frozenset[str]) -> RequestOutcome:
    how = ("its goal holds on it; still held and checked until its window closes" if any(
        r.request_id == rid for r in carried) else "unseen: a model that never saw it is the goal itself"
        if rid in unseen else "applied before, and not in the vault any more")
    return replace(o, status="rebased", version=None, completed_at=None, reason=COVERED.format(how=how),
                   numbers={})
