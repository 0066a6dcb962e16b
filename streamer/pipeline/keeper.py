"""The daemon's side of the forget vault between fragments: shreds on time, gauges, replay.

    tick(manifest)              vault gauges; every privacy.check_every_s (and when forced, at
                                start): `Commit.shred`, the instances whose verification window
                                closed and those CURRENT no longer needs (shredding.py decides)
    replay_batch(vault, m, k)   the next rolled-back requests to apply again, rebuilt from the vault
"""
from __future__ import annotations

import time
from collections.abc import Callable

from ..config import PrivacyConfig
from ..intake import ForgetRequest
from ..state import ForgetVault, Manifest, RequestOutcome, ShredLog, ShredRow, VaultIntegrityError, parse_rfc3339
from ..telemetry import Metrics
from .collector import Accepted
from .commit import Commit

GAUGES_EVERY_S = 1.0

__all__ = ["VaultKeeper", "replay_batch"]


class VaultKeeper:
    """Owns the vault for the daemon's main thread (never while a fragment runs)."""

    def __init__(self, vault: ForgetVault, shreds: ShredLog, commit: Commit, privacy: PrivacyConfig,
                 metrics: Metrics, monotonic: Callable[[], float] = time.monotonic):
        self.vault, self._commit, self._metrics = vault, commit, metrics
        self._check_every_s, self._monotonic = privacy.check_every_s, monotonic
        self._last_check = self._last_gauges = float("-inf")
        metrics.set_verify_window(privacy.window_seconds)
        for row in shreds.rows().values():  # the counter continues from the ledger, so it never resets
            metrics.count_shreds(row.verified_at_shred)

    def tick(self, manifest: Manifest, force: bool = False) -> list[ShredRow]:
        """Update the gauges; shred what is due when forced or every check_every_s."""
        now = self._monotonic()
        rows = []
        if force or now - self._last_check >= self._check_every_s:
            self._last_check = now
            rows = self._commit.shred(manifest)
        if rows or force or now - self._last_gauges >= GAUGES_EVERY_S:
            self.gauges()
        return rows

    def gauges(self) -> None:
        self._last_gauges = self._monotonic()
        self._metrics.set_vault(len(self.vault), self.vault.oldest_age_seconds())


def replay_batch(vault: ForgetVault, manifest: Manifest, size: int,
                 monotonic: Callable[[], float] = time.monotonic) -> list[Accepted]:
    """The first `size` requests of CURRENT's replay list, instances decrypted from the vault.
    An unseen request keeps the class it resolved to when first applied (its manifest entry's
    target_class, which the vault holds too): a replay does not vote again.
    Raises VaultEntryMissing when one was shredded (a rollback refuses that), VaultIntegrityError
    when the vault's label or target differs from the request's."""
    entries = [RequestOutcome.from_manifest(e) for e in manifest.replay[:size]]
    x, y, target = vault.get([str(e.request_id) for e in entries])
    accepted = []
    for i, e in enumerate(entries):
        goal = e.goal
        if goal is None or goal.label is None or e.request_id is None:
            raise VaultIntegrityError(f"replay entry at offset {e.offset} of {e.topic}/{e.partition} has no goal")
        request = ForgetRequest(e.request_id, goal.mode, goal.label, _target_label(e), x[i], e.subject,
                                e.requested_at, goal.target_class if goal.unseen else None, e.sample_ref)
        if (int(y[i]), int(target[i])) != (request.label, request.goal.engine_target):
            raise VaultIntegrityError(f"vault entry {request.request_id!r} has label/target {int(y[i])}/"
                                      f"{int(target[i])}, its request {request.label}/{request.goal.engine_target}")
        received = e.received_at
        accepted.append(Accepted(request, e.topic, e.partition, e.offset, monotonic(),
                                 None if not received else round(parse_rfc3339(received) * 1000)))
    return accepted


def _target_label(outcome: RequestOutcome) -> int | None:
    goal = outcome.goal
    return goal.target_class if goal is not None and goal.mode == "relabel" else None
