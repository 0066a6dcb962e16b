"""A version's retained forgotten set: references in the manifest, instances in the forget vault.

    open_vault      the configured vault, its KEK checked (the daemon opens it as the one writer)
    load_retained   decrypt the instances a manifest references, skipping shredded ones
    next_refs       the references a new version carries (with each instance's goal on its weights)
    Window          when an instance's verification window closes (privacy.verify_window)

Exactly once between vault and manifests: entries are put before the version that references them
is published; on start the writer removes every live entry CURRENT does not reference (a crash
between put and publish; Kafka replays those records), so every live entry is referenced by
CURRENT, and every entry CURRENT references is live or shredded.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..config import DaemonConfig, PrivacyConfig
from .kek_source import configured_kek
from .ledger import LEDGER_FILE
from .manifest import CheckpointError, ForgottenSet, Manifest, RetainedRef, parse_rfc3339, rfc3339, version_number
from .rotation import finish_rotation
from .sealed import VaultIntegrityError
from .vault import ForgetVault, VaultEntry

__all__ = ["Window", "last_verified", "load_retained", "needed_ids", "next_refs", "open_vault", "referenced_ids"]


def open_vault(cfg: DaemonConfig, writer: bool, clock: Callable[[], float] = time.time) -> ForgetVault:
    """The vault of `cfg` (privacy.vault_dir, default <checkpoints.dir>/vault) opened with the configured
    KEK (a file, a variable or a KMS key). A writer (under the checkpoint lock) first finishes a KEK
    rotation that a crash interrupted after its commit point, ledger row included. Raises
    VaultKeyError when the KEK is missing, unreadable or not the vault's (a clean refusal at start),
    VaultError when the directory is not a vault (a reader never creates one)."""
    root = cfg.privacy.vault_path(cfg.checkpoints.dir)
    finished = finish_rotation(root, cfg.checkpoints.dir / LEDGER_FILE, clock=clock) if writer else None
    vault = ForgetVault.open(root, configured_kek(cfg.privacy), clock=clock, writer=writer)
    vault.finished_rotation = finished
    return vault


def referenced_ids(manifest: Manifest) -> set[str]:
    """The vault ids a version needs: its retained set, the rolled-back requests it will replay, the
    requests it owes (deferred), and the requests it abandoned (kept until the daemon shreds them
    with a ledger row)."""
    return (needed_ids(manifest) | {str(a["request_id"]) for a in manifest.abandoned})


def needed_ids(manifest: Manifest) -> set[str]:
    """The vault ids a version still uses: retained, to replay, or owed (deferred)."""
    return ({r.request_id for r in manifest.retained} | {str(e["request_id"]) for e in manifest.replay}
            | {str(d["request_id"]) for d in manifest.deferred})


def load_retained(vault: ForgetVault, manifest: Manifest,
                  input_shape: Sequence[int]) -> tuple[ForgottenSet, tuple[str, ...]]:
    """The manifest's retained set decrypted from the vault, in its order, and the ids left out because
    they were shredded since. Raises CheckpointError for a schema-1 version not migrated yet, and
    VaultIntegrityError when an entry is absent or holds other content than the version references."""
    if manifest.legacy_forgotten_sha256 is not None:
        raise CheckpointError(f"{manifest.version} keeps its forgotten set in plaintext (forgotten.pt, before the "
                              "vault): start the daemon once, it migrates every version into the vault")
    by_id = {e.request_id: e for e in vault.entries()}
    live, shredded = [], []
    for ref in manifest.retained:
        entry = by_id.get(ref.request_id)
        if entry is not None and entry.shredded:
            shredded.append(ref.request_id)
        elif entry is None or entry.digest != ref.digest:
            raise VaultIntegrityError(f"{manifest.version} references vault entry {ref.request_id!r}, but the vault "
                                      f"{'has no such entry' if entry is None else 'holds other content for it'}")
        else:
            live.append(ref.request_id)
    if not live:
        return ForgottenSet.empty(input_shape), tuple(shredded)
    x, y, target = vault.get(live)
    unseen = frozenset(r.request_id for r in manifest.retained if r.unseen) & frozenset(live)
    return ForgottenSet(x, y, target, tuple(live), unseen), tuple(shredded)


def next_refs(forgotten: ForgottenSet, met: Sequence[bool], parent: Sequence[RetainedRef],
              entries: Mapping[str, VaultEntry], version: str) -> tuple[RetainedRef, ...]:
    """References for the version `version` that retains `forgotten` (met: its goal per instance on
    the new weights). Ids in `entries` (this fragment's, just put) are applied in `version` (unseen:
    as `forgotten.unseen` says); the others keep the parent's reference."""
    carried = {r.request_id: r for r in parent}
    refs = []
    for rid, ok in zip(forgotten.request_ids, met, strict=True):
        if rid in entries:
            entry = entries[rid]
            refs.append(RetainedRef(rid, entry.digest, version, rfc3339(entry.created_at), bool(ok), rid in forgotten.unseen))
        elif rid in carried:
            old = carried[rid]
            refs.append(RetainedRef(rid, old.digest, old.applied_in, old.applied_at, bool(ok), old.unseen))
        else:
            raise CheckpointError(f"retained instance {rid!r} is neither in this fragment nor in the parent version")
    return tuple(refs)


@dataclass(frozen=True)
class Window:
    """privacy.verify_window: an instance is shredded `days` after it was first applied, or once
    `fragments` later versions verified it, whichever comes first."""

    days: float
    fragments: int | None = None

    @staticmethod
    def of(privacy: PrivacyConfig) -> Window:
        return Window(privacy.verify_window_days, privacy.verify_window_fragments)

    def closes_at(self, ref: RetainedRef) -> float:
        """Unix seconds at which the time limit closes the window."""
        return parse_rfc3339(ref.applied_at) + self.days * 86_400.0

    def closed(self, ref: RetainedRef, current_number: int, now: float) -> bool:
        if now >= self.closes_at(ref):
            return True
        return self.fragments is not None and current_number - version_number(ref.applied_in) >= self.fragments


def last_verified(lineage: Sequence[Manifest], request_id: str) -> str | None:
    """The newest version of `lineage` (newest first) whose retained set records `request_id` meeting
    its goal, or None."""
    for manifest in lineage:
        for ref in manifest.retained:
            if ref.request_id == request_id and ref.met:
                return manifest.version
    return None
