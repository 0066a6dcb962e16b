"""Rollback with replay from the forget vault: history stays append-only and nobody is silently un-forgotten.

`streamer rollback --to V` publishes a NEW version whose weights and retained forgotten set are V's
(parent V, so CURRENT's lineage no longer holds the versions after V) and whose consumed offsets
stay CURRENT's; it lists every request those versions applied as `replay`, and marks them
`rolled_back` in the ledger. The daemon then applies them again, before it reads any new record,
from their instances in the vault (not from Kafka: the requests topic can keep a short retention),
and each gets a new receipt naming the version that re-applied it. A request whose instance was
crypto-shredded since (its verification window closed) cannot be applied again: the rollback is
refused and names those requests, unless forced; then they are recorded `rolled_back` and stay
un-applied (the model rolled back to V no longer forgets them).

While the daemon runs it owns the checkpoint directory (an flock on LOCK): the command then
leaves a request that the daemon carries out between fragments and answers (`operations.py`).
When the daemon is stopped the command does the same work itself.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import split_normalized_state
from .checkpoints import CheckpointStore, Manifest, rfc3339
from ..errors import StreamerError
from .ledger import Ledger
from .outcome import RequestOutcome

InVault = Callable[[str], bool]  # request_id -> its instance is still in the vault (not shredded)


class RollbackRefused(StreamerError):
    """The rollback cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RollbackPlan:
    to: Manifest
    current: Manifest
    replay: tuple[Mapping[str, Any], ...]  # request entries applied after `to`, in the vault: applied again
    lost: tuple[Mapping[str, Any], ...]  # applied after `to`, shredded since: cannot be applied again
    undone: tuple[RequestOutcome, ...]  # the applied outcomes being rolled back (ledger rows)


def plan_rollback(store: CheckpointStore, to_version: str, in_vault: InVault) -> RollbackPlan:
    """What rolling CURRENT back to `to_version` would replay, from the manifests (the source of truth)."""
    current_version = store.current_version()
    if current_version is None:
        raise RollbackRefused(f"no version in {store.root}: nothing to roll back")
    lineage = store.lineage(current_version)
    names = [m.version for m in lineage]
    if to_version == current_version:
        raise RollbackRefused(f"{to_version} is CURRENT already")
    if to_version not in names:
        raise RollbackRefused(f"{to_version} is not an ancestor of CURRENT {current_version} "
                              f"(lineage: {' <- '.join(names)}); rolling to it would skip requests")
    to = lineage[names.index(to_version)]
    if any(m.legacy_forgotten_sha256 is not None for m in lineage[: names.index(to_version) + 1]):
        raise RollbackRefused("these versions keep their forgotten set in plaintext (forgotten.pt): start the "
                              "daemon once, it migrates them into the vault, then roll back")
    after = lineage[: names.index(to_version)]  # newest first, the versions being undone
    undone = tuple(RequestOutcome.from_manifest(r, m.version, m.created_at) for m in reversed(after) for r in m.requests)
    entries = [*(r for m in reversed(after) for r in m.requests), *lineage[0].replay]  # + a replay not done yet
    lost = tuple(e for e in entries if not in_vault(str(e["request_id"])))
    replay = tuple(e for e in entries if in_vault(str(e["request_id"])))
    return RollbackPlan(to=to, current=lineage[0], replay=replay, lost=lost, undone=undone)


def apply_rollback(store: CheckpointStore, ledger: Ledger, plan: RollbackPlan, force: bool, in_vault: InVault,
                   clock: Callable[[], float] = time.time) -> Manifest:
    """Publish the new version (V's weights and live retained set, CURRENT's offsets, parent V, the
    requests to replay) and record the rolled-back requests. Raises RollbackRefused for shredded
    requests unless `force`."""
    if plan.lost and not force:
        raise RollbackRefused(
            f"{len(plan.lost)} requests applied after {plan.to.version} were crypto-shredded since (their "
            "verification window closed), so they cannot be applied again: "
            f"{', '.join(sorted(str(e['request_id']) for e in plan.lost))}. Roll back to a later version, or use "
            "--force to record them as rolled_back: the model would then no longer forget them")
    checkpoint = store.load(plan.to.version)
    metrics = {**plan.to.metrics, "rollback_to": plan.to.version, "rolled_back_from": plan.current.version,
               "replayed_requests": len(plan.replay), "lost_requests": len(plan.lost)}
    retained = [r for r in plan.to.retained if in_vault(r.request_id)]  # shredded ones left the objective
    # V's model file byte for byte (same format, same sha256); a V from before formats holds the
    # Normalized wrapper's keys, so its weights are republished with the user's keys instead.
    legacy = None if plan.to.format_recorded else split_normalized_state(checkpoint.state_dict)
    model = legacy[0] if legacy is not None else checkpoint.model or checkpoint.state_dict
    manifest = store.publish(plan.to.version, model, retained, offsets=plan.current.offsets,
                             metrics=metrics, replay=plan.replay, deferred=plan.current.deferred)  # still owed
    now = rfc3339(clock())
    lost = {str(e["request_id"]) for e in plan.lost}
    how = {True: "NOT applied again: its instance was shredded (--force)", False: "applied again from the forget vault"}
    ledger.append([o.rolled_back(f"rollback {manifest.version} undid {o.version}; {how[o.request_id in lost]}", now)
                   for o in plan.undone])
    return manifest


def run_rollback(store: CheckpointStore, ledger: Ledger, to_version: str, force: bool, in_vault: InVault) -> dict:
    """Plan and apply; the answer the command prints (and the daemon writes to the result file)."""
    try:
        plan = plan_rollback(store, to_version, in_vault)
        manifest = apply_rollback(store, ledger, plan, force, in_vault)
    except RollbackRefused as err:
        return {"ok": False, "version": None, "message": f"rollback refused: {err}"}
    replayed = ", ".join(str(e["request_id"]) for e in plan.replay) or "none"
    message = (f"published {manifest.version} = weights of {plan.to.version} (was {plan.current.version}); "
               f"CURRENT = {manifest.version}; {len(plan.replay)} requests will be applied again from the forget "
               f"vault by the daemon: {replayed}")
    if plan.lost:
        message += f"; {len(plan.lost)} shredded requests recorded rolled_back, not applied again (--force): " + \
                   ", ".join(str(e["request_id"]) for e in plan.lost)
    return {"ok": True, "version": manifest.version, "message": message}
