"""The ledger made to agree with CURRENT's lineage (the checkpoint manifests are the source of truth
for applied requests): copy into the ledger whatever the lineage holds that the ledger lacks (a
crash between checkpoint and ledger), and mark `rolled_back` what the ledger holds in versions
outside the lineage (an operator rolled back; those requests are applied again)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .ledger import Ledger
from .manifest import Manifest
from .outcome import RequestOutcome

__all__ = ["Reconciled", "reconcile"]


@dataclass(frozen=True)
class Reconciled:
    added: int  # rows copied from manifests (their receipts are owed)
    rolled_back: int  # applied rows whose version is outside CURRENT's lineage



def reconcile(ledger: Ledger, lineage: Sequence[Manifest]) -> Reconciled:
    """Make the ledger agree with CURRENT's lineage (`lineage[0]` is CURRENT, newest first).

    Walks back from CURRENT copying manifest outcomes the ledger lacks, and stops at the first
    version whose outcomes are all present (the ledger is written in version order, so the older
    ones are too). Then marks `rolled_back` the applied rows of versions outside CURRENT's lineage."""
    if not lineage:
        return Reconciled(0, 0)
    missing: list[RequestOutcome] = []
    for manifest in lineage:
        entries = list(manifest.outcomes())
        absent = [o for o in entries if not ledger.contains(o)]
        if not absent and entries:
            break
        missing[:0] = absent  # oldest version first
    added = len(missing)
    if missing:
        ledger.append(missing)

    # Rolled back: applied in a version outside CURRENT's lineage but newer than its oldest
    # member (older ones are pruned ancestors). Covers a rollback that switched CURRENT to an
    # older version, and a crash between a rollback's publish and its ledger rows.
    current = lineage[0]
    inside = {m.version for m in lineage}
    oldest = min(m.number for m in lineage)
    why = (f"not in CURRENT {current.version}'s lineage: rolled back, the request is applied again when its record "
           "is re-read")
    rolled_back = [o.rolled_back(f"version {o.version} is {why}", current.created_at) for o in ledger.applied_after(oldest)
                   if o.version not in inside and ledger.applied(o.request_id) == o.version]
    rolled_back = [o for o in rolled_back if not ledger.contains(o)]
    if rolled_back:
        ledger.append(rolled_back)
    return Reconciled(added, len(rolled_back))
