"""The exclusion list a retraining job needs: every request the daemon owes or owed an erasure.

`streamer forgotten` writes it; `streamer rebase` refuses a retrained model unless its list covers
every request in it. A request is listed once, with its id, subject, the sample reference a
training pipeline can match on (`{"dataset", "index"}` or `{"uri"}`; null for inline pixels,
and for requests recorded before the ledger kept references: match those on id and subject)
and where it stands now:

    retained   applied, its instance held in the forget vault (verification window open)
    shredded   applied, its window closed: the vault's key destroyed
    deferred   not applied yet: owed, waiting for this retraining (the utility budget was reached)
    rolled_back  applied, then rolled back without being applied again (`rollback --force`)
    applied    applied and none of these (left the retained set: abandoned, or retain_forgotten off)

Nothing here re-identifies beyond what the ledger already holds (no pixels, no digests).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..state import Ledger, Manifest, RequestOutcome, ShredRow, rfc3339

LISTED = ("forgotten", "relabelled", "failed", "deferred", "rebased", "abandoned", "rolled_back")
SCHEMA = 1

__all__ = ["SCHEMA", "exclusion_list", "listed_ids"]


def exclusion_list(ledger: Ledger, current: Manifest, shreds: dict[str, ShredRow],
                   clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """{"schema", "generated_at", "current", "requests": [{request_id, subject, sample, status}]},
    requests in the order the ledger first recorded them."""
    retained = {r.request_id for r in current.retained}
    owed = {str(d["request_id"]) for d in current.deferred}
    first: dict[str, RequestOutcome] = {}
    last: dict[str, str] = {}
    refs: dict[str, Any] = {}
    for row in ledger.rows():
        o = row.outcome
        if o.request_id is None or o.status not in LISTED or (o.status == "failed" and o.version is None):
            continue
        first.setdefault(o.request_id, o)
        last[o.request_id] = o.status
        if o.sample_ref is not None:
            refs[o.request_id] = dict(o.sample_ref)
    requests = []
    for rid, o in first.items():
        status = ("deferred" if rid in owed else "retained" if rid in retained else
                  "shredded" if rid in shreds else "rolled_back" if last[rid] == "rolled_back" else "applied")
        requests.append({"request_id": rid, "subject": o.subject, "sample": refs.get(rid), "status": status})
    return {"schema": SCHEMA, "generated_at": rfc3339(clock()), "current": current.version, "requests": requests}


def listed_ids(document: Any) -> set[str]:
    """The request ids of an exclusion list: `exclusion_list`'s document, or a plain JSON list of ids
    or of {"request_id"} objects. Raises ValueError for anything else."""
    entries = document.get("requests") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ValueError("an exclusion list is {\"requests\": [...]} or a JSON list of request ids")
    ids = set()
    for entry in entries:
        rid = entry.get("request_id") if isinstance(entry, dict) else entry
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"an exclusion list entry has no request_id: {entry!r}")
        ids.add(rid)
    return ids
