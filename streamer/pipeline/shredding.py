"""Which retained instances are due for a crypto-shred, and why (the decision; commit.py does it).

Due: every retained instance of CURRENT whose verification window closed (privacy.verify_window,
`state/retained.Window`), after a final check of its goal on the weights CURRENT serves; and every
live vault entry CURRENT no longer needs (abandoned, or failed when replayed after a rollback).
The erasure deadline wins over a failed final check: the instance is shredded anyway, and the
reason says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..state import CheckpointStore, ForgetVault, Manifest, Window, last_verified, needed_ids, version_number
from ..text import plural
from .worker import FragmentWorker

__all__ = ["ShredPlan", "plan_shreds"]


@dataclass(frozen=True)
class ShredPlan:
    """Request ids to shred, with the last version that verified each and the ledger's reason."""

    request_ids: tuple[str, ...]
    verified: tuple[str | None, ...]
    reasons: tuple[str, ...]


def plan_shreds(vault: ForgetVault, window: Window, worker: FragmentWorker, store: CheckpointStore,
                manifest: Manifest, now: float) -> ShredPlan:
    """What to shred now, CURRENT being `manifest` (empty when nothing is due)."""
    retained = set(worker.forgotten.request_ids)
    due = [r for r in manifest.retained if r.request_id in vault and r.request_id in retained
           and window.closed(r, manifest.number, now)]
    needed = needed_ids(manifest)
    stray = sorted(e.request_id for e in vault.entries() if not e.shredded and e.request_id not in needed)
    if not due and not stray:
        return ShredPlan((), (), ())
    met = worker.check([r.request_id for r in due])  # the final check, on the weights CURRENT serves
    lineage = store.lineage(manifest.version)
    verified = [manifest.version if ok else last_verified(lineage, r.request_id) for r, ok in zip(due, met)]
    reasons = [_window_reason(window, ref, ok, v, manifest, now) for ref, ok, v in zip(due, met, verified)]
    abandoned = {str(a["request_id"]) for a in manifest.abandoned}
    rebased = {str(r["request_id"]) for r in lineage[-1].requests if r.get("status") == "rebased"}
    reasons += [("abandoned: its goal stayed out of reach (unlearning.max_missed_fragments), so it left the "
                 "retained set; nothing needs its data any more") if rid in abandoned else
                (f"covered by the rebase {lineage[-1].version} onto a model retrained without it; nothing needs its "
                 "data any more") if rid in rebased else
                "no version needs it any more (it failed when re-applied after a rollback)" for rid in stray]
    verified += [last_verified(lineage, rid) for rid in stray]
    return ShredPlan(tuple(r.request_id for r in due) + tuple(stray), tuple(verified), tuple(reasons))


def _window_reason(window: Window, ref: Any, ok: bool, verified: str | None, manifest: Manifest, now: float) -> str:
    closed_by = (f"{window.days:g} days since it was first applied at {ref.applied_at}"
                 if now >= window.closes_at(ref) else
                 f"verified in {plural(manifest.number - version_number(ref.applied_in), 'later version')}")
    check = (f"its goal held on {manifest.version} at the final check" if ok else
             f"its goal did NOT hold on {manifest.version} at the final check (last held in "
             f"{verified or 'no version'}); shredded anyway: the erasure deadline comes first")
    return f"verification window closed ({closed_by}); {check}"
