"""Migrate schema-1 checkpoint directories: every `forgotten.pt` (plaintext pixels) into the vault.

Before the forget vault, each version kept the whole retained forgotten set in plaintext in
`forgotten.pt`. The daemon, as the directory's one writer, migrates at start, version by version:

    1. put the version's instances into the vault (a replayed put of the same content is a no-op)
    2. replace its manifest (temp file, fsync, rename) by a schema-2 one that references them
    3. erase forgotten.pt (overwrite with zeros, fsync, unlink: durable.erase_file)

A crash after 1 redoes the version; after 2, the next start only erases the file. The instances'
verification windows start when they were first applied (the applying manifest's created_at), so
instances older than the window are shredded right after the migration. Goals per version were
not recorded before: the references carry `met: null` until the next fragment checks them.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoints import CheckpointStore
from .durable import erase_file, fsync_dir, pretty_json, read_file, write_atomic
from .manifest import FORGOTTEN_FILE, MANIFEST_FILE, MANIFEST_SCHEMA, CheckpointError, ForgottenSet, Manifest, RetainedRef
from .vault import ForgetVault, VaultItem

__all__ = ["migrate_legacy"]


def migrate_legacy(store: CheckpointStore, vault: ForgetVault) -> list[str]:
    """Migrate every version that still has forgotten.pt; returns the versions migrated (or cleaned).
    Raises CheckpointError when a forgotten.pt fails its manifest's sha256 or cannot be read."""
    done = []
    for version in store.versions():
        directory = store.path(version)
        manifest = store.manifest(version)
        legacy = directory / FORGOTTEN_FILE
        if manifest.legacy_forgotten_sha256 is None:
            if legacy.exists():  # a crash between the manifest's replacement and the erase
                erase_file(legacy)
                fsync_dir(directory)
                done.append(version)
            continue
        forgotten = _read_legacy(legacy, manifest.legacy_forgotten_sha256)
        applied = _applying_versions(store, version)
        items = [VaultItem(rid, forgotten.x[i].float().contiguous(), int(forgotten.y[i]), int(forgotten.target[i]))
                 for i, rid in enumerate(forgotten.request_ids)]
        entries = {e.request_id: e for e in vault.put(items)} if items else {}
        refs = tuple(RetainedRef(rid, entries[rid].digest, *applied.get(rid, (version, manifest.created_at)), None)
                     for rid in forgotten.request_ids)
        migrated = replace(manifest, retained=refs, legacy_forgotten_sha256=None, schema=MANIFEST_SCHEMA)
        fields = migrated.to_json()
        if not manifest.format_recorded:  # written before model formats: rollback must still see that
            fields.pop("model_format", None)
            fields.pop("model_file", None)
        data = pretty_json(fields)
        try:
            write_atomic(directory / MANIFEST_FILE, data, store.file_mode)
            fsync_dir(directory)
            erase_file(legacy)
            fsync_dir(directory)
        except OSError as err:
            raise CheckpointError(f"cannot migrate {directory} into the vault: {err}") from err
        done.append(version)
    return done


def _read_legacy(path: Path, sha256: str) -> ForgottenSet:
    try:
        data = read_file(path)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match its manifest's sha256: the file is corrupt")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure of a file that passed its checksum
        raise CheckpointError(f"cannot load {path}: {err}") from err
    return ForgottenSet.from_state(state, str(path))


def _applying_versions(store: CheckpointStore, version: str) -> dict[str, tuple[str, str]]:
    """request_id -> (the version that last applied it, when it was first applied), from `version`'s
    lineage on disk (after a rollback a request is applied again; its window still starts at the first)."""
    applied: dict[str, tuple[str, str]] = {}
    lineage: list[Manifest] = store.lineage(version)
    for manifest in reversed(lineage):  # oldest first
        for entry in manifest.requests:
            rid = str(entry["request_id"])
            applied[rid] = (manifest.version, applied[rid][1] if rid in applied else manifest.created_at)
    return applied
