"""The daemon's side of the forget vault: verification windows, crypto-shreds, replay, gauges.

    tick(worker, manifest)      vault gauges; after every fragment and every privacy.check_every_s:
                                shred the instances whose verification window closed, and those
                                CURRENT no longer needs (abandoned, or failed when replayed)
    replay_batch(manifest, k)   the next rolled-back requests to apply again, rebuilt from the vault

A shred, for each instance whose window closed (privacy.verify_window, `state/retained.Window`):
a final check of its goal on CURRENT's weights (the model the daemon serves), the vault destroys
its data key and ciphertext (NIST SP 800-88 cryptographic erase), then the ledger's shred log
records the last version that verified it, and it leaves the retained set, so the
anti-resurrection objective no longer holds it. The erasure deadline wins over a failed final
check: the instance is shredded anyway and the row says so (`streamer_vault_shreds_total{verified="false"}`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ..text import plural
from ..config import PrivacyConfig
from ..intake.events import ForgetRequest
from ..state.checkpoints import CheckpointStore, Manifest, rfc3339, version_number
from ..state.manifest import parse_rfc3339
from ..state.retained import Window, last_verified
from ..state.sealed import VaultIntegrityError
from ..state.shreds import ShredLog, ShredRow
from ..state.vault import ForgetVault
from .collector import Accepted
from .crash import CrashHook
from .fragments import FragmentWorker
from .metrics import Metrics

GAUGES_EVERY_S = 1.0

__all__ = ["VaultKeeper"]


class VaultKeeper:
    """Owns the vault for the daemon's main thread (never while a fragment runs)."""

    def __init__(self, vault: ForgetVault, shreds: ShredLog, store: CheckpointStore, privacy: PrivacyConfig,
                 metrics: Metrics, log: Any, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, crash: CrashHook | None = None):
        self.vault, self.shreds, self._store, self._metrics, self._log = vault, shreds, store, metrics, log
        self.window, self._check_every_s = Window.of(privacy), privacy.check_every_s
        self._clock, self._monotonic = clock, monotonic
        self._crash = crash if crash is not None else CrashHook()
        self._last_check = self._last_gauges = float("-inf")
        metrics.set_verify_window(privacy.window_seconds)
        for row in shreds.rows().values():  # the counter continues from the ledger, so it never resets
            metrics.count_shreds(row.verified_at_shred)

    def tick(self, worker: FragmentWorker, manifest: Manifest, force: bool = False) -> list[ShredRow]:
        """Update the gauges; shred what is due when forced (after a fragment) or every check_every_s."""
        now = self._monotonic()
        rows = []
        if force or now - self._last_check >= self._check_every_s:
            self._last_check = now
            rows = self.shred_due(worker, manifest)
        if rows or force or now - self._last_gauges >= GAUGES_EVERY_S:
            self._last_gauges = now
            self._metrics.set_vault(len(self.vault), self.vault.oldest_age_seconds())
        return rows

    def shred_due(self, worker: FragmentWorker, manifest: Manifest) -> list[ShredRow]:
        """Shred every retained instance of CURRENT (`manifest`) whose window closed; the ledger rows."""
        now, retained = self._clock(), set(worker.forgotten.request_ids)
        due = [r for r in manifest.retained if r.request_id in self.vault and r.request_id in retained
               and self.window.closed(r, manifest.number, now)]
        needed = {r.request_id for r in manifest.retained} | {str(e["request_id"]) for e in manifest.replay}
        stray = sorted(e.request_id for e in self.vault.entries() if not e.shredded and e.request_id not in needed)
        if not due and not stray:
            return []
        met = worker.check([r.request_id for r in due])  # the final check, on the weights CURRENT serves
        lineage = self._store.lineage(manifest.version)
        verified = [manifest.version if ok else last_verified(lineage, r.request_id) for r, ok in zip(due, met)]
        verified += [last_verified(lineage, rid) for rid in stray]
        ids = [r.request_id for r in due] + stray
        records = self.vault.shred_many(list(zip(ids, verified, strict=True)))
        self._crash.at("after_shred")  # keys destroyed, ledger rows not written yet
        reasons = [self._window_reason(ref, ok, record.verified_version, manifest, now)
                   for ref, ok, record in zip(due, met, records)]
        abandoned = {str(a["request_id"]) for a in manifest.abandoned}
        reasons += [("abandoned: its goal stayed out of reach (unlearning.max_missed_fragments), so it left the "
                     "retained set; nothing needs its data any more") if rid in abandoned else
                    "no version needs it any more (it failed when re-applied after a rollback)" for rid in stray]
        rows = [ShredRow(rid, record.verified_version, manifest.version, rfc3339(record.shredded_at), record.key_id,
                         reason) for rid, record, reason in zip(ids, records, reasons, strict=True)]
        self.shreds.append(rows)
        worker.drop({r.request_id for r in rows})
        for row in rows:
            self._metrics.count_shreds(row.verified_at_shred)
            self._log.bind(request_id=row.request_id, version=manifest.version).info(
                "request_shredded", verified_version=row.verified_version, verified=row.verified_at_shred,
                key_id=row.key_id, reason=row.reason)
        self._metrics.set_forgotten(len(worker.forgotten))
        return rows

    def _window_reason(self, ref: Any, ok: bool, verified: str | None, manifest: Manifest, now: float) -> str:
        closed_by = (f"{self.window.days:g} days since it was first applied at {ref.applied_at}"
                     if now >= self.window.closes_at(ref) else
                     f"verified in {plural(manifest.number - version_number(ref.applied_in), 'later version')}")
        check = (f"its goal held on {manifest.version} at the final check" if ok else
                 f"its goal did NOT hold on {manifest.version} at the final check (last held in "
                 f"{verified or 'no version'}); shredded anyway: the erasure deadline comes first")
        return f"verification window closed ({closed_by}); {check}"

    def replay_batch(self, manifest: Manifest, size: int) -> list[Accepted]:
        """The first `size` requests of CURRENT's replay list, instances decrypted from the vault.
        An unseen request keeps the class it resolved to when first applied (its manifest entry's
        target_class, which the vault holds too): a replay does not vote again.
        Raises VaultEntryMissing when one was shredded (a rollback refuses that), VaultIntegrityError
        when the vault's label or target differs from the request's."""
        entries: list[Mapping[str, Any]] = list(manifest.replay[:size])
        x, y, target = self.vault.get([str(e["request_id"]) for e in entries])
        accepted = []
        for i, e in enumerate(entries):
            unseen = e["mode"] == "unseen"
            request = ForgetRequest(str(e["request_id"]), str(e["mode"]), int(e["label"]), e.get("target_label"),
                                    x[i], e.get("subject"), e.get("requested_at"),
                                    _int_or_none(e.get("target_class")) if unseen else None)
            if (int(y[i]), int(target[i])) != (request.label, request.target):
                raise VaultIntegrityError(f"vault entry {request.request_id!r} has label/target {int(y[i])}/"
                                          f"{int(target[i])}, its request {request.label}/{request.target}")
            received = e.get("received_at")
            accepted.append(Accepted(request, str(e["topic"]), int(e["partition"]), int(e["offset"]),
                                     self._monotonic(), None if not received else round(parse_rfc3339(received) * 1000)))
        return accepted


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
