"""Append-only, atomically published model versions: `<dir>/<version>/` plus `<dir>/CURRENT`.

A version directory holds everything needed to resume:

    model.pt        the user's network in the configured format (manifest `model_format`):
                    a state_dict with the user's own keys, or a TorchScript archive;
    model.pt2       instead, for the export format: a torch.export program
                    (versions written before formats: a state_dict of the Normalized wrapper)
    manifest.json   version, parent, created_at, the requests it applied with their outcomes,
                    the consumed offsets {topic: {partition: next_offset}}, metrics, the model
                    file's name, format and sha256, and the retained forgotten set as references
                    into the forget vault (ids and keyed content digests; no instance data:
                    `state/vault.py`)

Publishing writes a temporary directory, fsyncs every file and the directory, renames it to
its version name (never over an existing one) and fsyncs the parent; only then is CURRENT
replaced (temp file + fsync + rename + fsync). A crash at any point leaves CURRENT naming a
complete, verified version: the checkpoint, not the Kafka group offset, is the source of truth.
v000000 is the configured initial model, kept forever so a rollback to the base is possible.
Files are read by the names streamer writes, never through a symlink; versions are the owner's
alone, or readable by the group with `group_readable` (README "Security").
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine import read_state_dict
from ..errors import ModelLoadError
from .durable import (PRIVATE_DIR, PRIVATE_FILE, SHARED_DIR, SHARED_FILE, fsync_dir as _fsync_dir, make_dir,
                      pretty_json, read_file, restrict, write_atomic, write_new as _write_synced)
from .manifest import (BASE_VERSION, CURRENT_FILE, FORGOTTEN_FILE, MANIFEST_FILE, MANIFEST_SCHEMA,  # noqa: F401
                       MODEL_FILE, Checkpoint, CheckpointError, ForgottenSet, Manifest, ModelFile, Offsets, RetainedRef,
                       _TEMP_PREFIX, _VERSION, _attack_entries, format_version, rfc3339, version_number)

__all__ = ["BASE_VERSION", "Checkpoint", "CheckpointError", "CheckpointStore", "ForgottenSet", "Manifest", "ModelFile",
           "RetainedRef", "format_version", "rfc3339", "version_number"]


class CheckpointStore:
    """The version directories under `root`. One writer (the daemon) per directory; readers
    (`streamer checkpoints`, `streamer verify`, serving systems) may look at any time."""

    def __init__(self, root: str | Path, keep: int = 0, clock: Callable[[], float] = time.time,
                 group_readable: bool = False):
        if keep < 0:
            raise ValueError(f"keep must be >= 0 (0 keeps all), got {keep}")
        self.root, self.keep, self._clock = Path(root), keep, clock
        # published versions: the owner's alone, or also readable by the group (checkpoints.group_readable)
        self.file_mode, self.dir_mode = (SHARED_FILE, SHARED_DIR) if group_readable else (PRIVATE_FILE, PRIVATE_DIR)

    def recover(self) -> list[str]:
        """Writer start-up: create the directory, give it and every version the configured modes
        (files written before modes were set are tightened), and delete temp files a crash
        mid-publish left (they were never visible as versions). Never call it while another
        process publishes."""
        make_dir(self.root, self.dir_mode)
        removed = []
        for stale in self.root.glob(f"{_TEMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() \
                else stale.unlink(missing_ok=True)
            removed.append(stale.name)
        for path in (p for p in self.root.iterdir() if p.is_file()):  # ledger, LOCK, requests: the owner's
            restrict(path, self.file_mode if path.name == CURRENT_FILE else PRIVATE_FILE)
        for path in (p for v in self.versions() for p in (self.root / v, *(self.root / v).iterdir())):
            restrict(path, self.dir_mode if path.is_dir() else self.file_mode)
        return removed

    # --- reading -----------------------------------------------------------------------------

    def current_version(self) -> str | None:
        path = self.root / CURRENT_FILE
        if not path.exists():
            existing = self.versions()
            if existing:
                raise CheckpointError(
                    f"{path} is missing but {self.root} holds versions {existing[0]}..{existing[-1]}: the directory "
                    f"is damaged; check one with `streamer verify VERSION`, then write its name to {path}")
            return None
        try:
            version = read_file(path, limit=64).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
        version_number(version)
        if not (self.root / version / MANIFEST_FILE).is_file():
            raise CheckpointError(f"CURRENT names {version}, which has no {MANIFEST_FILE} in {self.root}")
        return version

    def versions(self) -> list[str]:
        """Version directories on disk, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=version_number)

    def path(self, version: str) -> Path:
        version_number(version)
        return self.root / version

    def manifest(self, version: str) -> Manifest:
        return self._read_manifest(version)[1]

    def _read_manifest(self, version: str) -> tuple[dict[str, Any], Manifest]:
        """The manifest file's JSON object as written, and the manifest it holds."""
        path = self.path(version) / MANIFEST_FILE
        if not self.path(version).is_dir() or self.path(version).is_symlink():
            existing = self.versions()
            held = f"{existing[0]}..{existing[-1]}" if existing else "none"
            raise CheckpointError(f"no version {version} in {self.root} (versions on disk: {held})")
        try:
            data = json.loads(read_file(path).decode("utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
        manifest = Manifest.from_json(data)
        if manifest.version != version:
            raise CheckpointError(f"{path} says version {manifest.version}, expected {version}")
        return data, manifest

    def lineage(self, version: str) -> list[Manifest]:
        """`version` and its ancestors, newest first, up to the base (v000000, or the last rebase
        version: a model retrained without the deleted data starts a lineage of its own) or the
        first pruned one."""
        chain: list[Manifest] = []
        current: str | None = version
        while current is not None and (self.root / current / MANIFEST_FILE).is_file():
            manifest = self.manifest(current)
            chain.append(manifest)
            current = manifest.parent if manifest.base is None else None
        return chain

    def base_of(self, version: str) -> str:
        """The base of `version`'s lineage: its last rebase version, else v000000 (the teacher)."""
        return next((m.version for m in self.lineage(version) if m.base is not None), BASE_VERSION)

    def load(self, version: str) -> Checkpoint:
        """The version's model file (and the weights in it) and manifest, after checking the model
        file's sha256 (the retained set is in the vault: `state/retained.py`)."""
        manifest = self.manifest(version)
        directory = self.path(version)
        model_bytes = _read_verified(directory / manifest.model_file, manifest.model_sha256)
        try:
            state = read_state_dict(model_bytes, manifest.model_format)
        except ModelLoadError as err:
            raise CheckpointError(f"cannot load {directory / manifest.model_file} ({manifest.model_format}): {err}") from err
        return Checkpoint(manifest, state, directory, ModelFile(manifest.model_format, model_bytes))

    def next_version(self) -> str:
        """The name the next `publish` will give its version."""
        existing = self.versions()
        return format_version(version_number(existing[-1]) + 1) if existing else BASE_VERSION

    def verify_files(self, version: str) -> None:
        """Check the sha256 of every file `version`'s manifest names; raises CheckpointError naming
        the first missing or damaged one."""
        manifest = self.manifest(version)
        directory = self.path(version)
        _read_verified(directory / manifest.model_file, manifest.model_sha256)
        if manifest.legacy_forgotten_sha256 is not None:  # schema 1, until the daemon migrates it
            _read_verified(directory / FORGOTTEN_FILE, manifest.legacy_forgotten_sha256)

    def orphans(self) -> list[str]:
        """Versions newer than CURRENT: written, but CURRENT never switched to them (a crash or a
        failed switch). Not in any lineage; the next publish takes a higher number."""
        current = self.current_version()
        if current is None:
            return []
        return [v for v in self.versions() if version_number(v) > version_number(current)]

    # --- writing -----------------------------------------------------------------------------

    def record_attacks(self, version: str, entry: Mapping[str, Any]) -> Manifest:
        """Add an attack-report summary (a JSON object with a "reference" key, see cli/attacks.py) to
        `version`'s manifest, replacing an earlier one with the same "reference"; return the manifest.

        The manifest file is replaced atomically (temp file, fsync, rename, fsync of the directory)
        with its JSON object as written plus `attacks`, so every other field keeps its value and an
        older manifest its layout. Not a new version: the model file and its sha256 are untouched.
        The daemon never rewrites a published schema-2 manifest; of two recorders at once, the last
        rename wins. Raises CheckpointError for a missing or malformed version, a schema-1 one (the
        daemon migrates it at start), or a failed write."""
        data, manifest = self._read_manifest(version)
        if manifest.legacy_forgotten_sha256 is not None:
            raise CheckpointError(f"{version} has a schema-1 manifest (plaintext forgotten.pt): start the daemon "
                                  "once to migrate it into the vault before recording attacks")
        earlier = [a for a in _attack_entries(data.get("attacks", [])) if a.get("reference") != entry.get("reference")]
        data["attacks"] = [*earlier, dict(entry)]
        updated = Manifest.from_json(data)
        path = self.path(version) / MANIFEST_FILE
        try:  # the mode it had (published versions keep theirs), never more than group-readable
            write_atomic(path, pretty_json(data), stat.S_IMODE(os.lstat(path).st_mode) & SHARED_FILE)
            _fsync_dir(path.parent)
        except OSError as err:
            raise CheckpointError(f"cannot rewrite {path}: {err}") from err
        return updated

    def publish(self, parent: str | None, model: ModelFile | Mapping[str, torch.Tensor],
                retained: Sequence[RetainedRef] = (), requests: Sequence[Mapping[str, Any]] = (),
                offsets: Offsets | None = None, metrics: Mapping[str, Any] | None = None,
                duplicates: Sequence[Mapping[str, Any]] = (), replay: Sequence[Mapping[str, Any]] = (),
                created_at: float | None = None, abandoned: Sequence[Mapping[str, Any]] = (),
                retained_misses: Mapping[str, int] | None = None, deferred: Sequence[Mapping[str, Any]] = (),
                base: Mapping[str, Any] | None = None) -> Manifest:
        """Write the next version atomically, switch CURRENT to it, prune; return its manifest.

        `model` is the model file (see engine/formats.py), or a state_dict to write as one;
        `retained` references the forget vault's entries (written before, see pipeline/commit.py);
        `replay` lists rolled-back requests still to re-apply; `deferred` the requests owed until a
        rebase (each row's `deferred_in` names the version that deferred it); `base` marks a rebase. The first version ever published is v000000
        (the base model, no parent). Raises CheckpointError when the write fails."""
        existing = self.versions()
        if parent is None and existing:
            raise CheckpointError(f"only the first version may have no parent; {self.root} has {existing[-1]}")
        version = self.next_version()
        if not isinstance(model, ModelFile):
            model = ModelFile("state_dict", _torch_bytes({k: v.detach().cpu() for k, v in model.items()}))
        model_bytes = model.data
        manifest = Manifest(
            version=version, parent=parent, created_at=rfc3339(self._clock() if created_at is None else created_at),
            requests=tuple(dict(r) for r in requests), duplicates=tuple(dict(d) for d in duplicates),
            offsets={t: dict(p) for t, p in (offsets or {}).items()}, metrics=dict(metrics or {}),
            model_sha256=hashlib.sha256(model_bytes).hexdigest(), retained=tuple(retained),
            replay=tuple(dict(r) for r in replay),
            abandoned=tuple(dict(a) for a in abandoned), retained_misses=dict(retained_misses or {}),
            model_format=model.format, model_file=model.name, deferred=tuple(dict(d) for d in deferred),
            base=None if base is None else dict(base),
        )
        manifest_bytes = pretty_json(manifest.to_json())
        temp = self.root / f"{_TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        make_dir(self.root, self.dir_mode)
        temp.mkdir(mode=self.dir_mode)
        try:
            restrict(temp, self.dir_mode)
            _write_synced(temp / model.name, model_bytes, self.file_mode)
            _write_synced(temp / MANIFEST_FILE, manifest_bytes, self.file_mode)
            _fsync_dir(temp)
            # rename(2) of a directory fails when the target exists and is not empty: never overwrites.
            os.rename(temp, self.root / version)
        except OSError as err:
            shutil.rmtree(temp, ignore_errors=True)
            raise CheckpointError(f"cannot write version {version} in {self.root}: {err}") from err
        _fsync_dir(self.root)
        self.switch(version)
        self.prune()
        return manifest

    def switch(self, version: str) -> None:
        """Point CURRENT at an existing version, atomically (also how an operator rolls back)."""
        if not (self.path(version) / MANIFEST_FILE).is_file():
            raise CheckpointError(f"cannot switch CURRENT to {version}: no such version in {self.root}")
        temp = self.root / f"{_TEMP_PREFIX}{CURRENT_FILE}-{uuid.uuid4().hex[:8]}"
        try:
            _write_synced(temp, f"{version}\n".encode("ascii"), self.file_mode)
            os.replace(temp, self.root / CURRENT_FILE)
        except OSError as err:
            temp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot switch CURRENT to {version}: {err}") from err
        _fsync_dir(self.root)

    def prune(self) -> list[str]:
        """Delete all but the newest `keep` versions, never CURRENT nor v000000 nor CURRENT's base (its
        last rebase); 0 keeps all."""
        if self.keep == 0:
            return []
        versions, current = self.versions(), self.current_version()
        protected = {BASE_VERSION, current, *versions[-self.keep:], *([self.base_of(current)] if current else [])}
        removed = [v for v in versions if v not in protected]
        for version in removed:
            shutil.rmtree(self.root / version)
        if removed:
            _fsync_dir(self.root)
        return removed


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _read_verified(path: Path, sha256: str) -> bytes:
    """The file's bytes (a regular file, not read through a symlink) once its sha256 matches."""
    try:
        data = read_file(path)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CheckpointError(f"{path} has sha256 {actual}, its manifest says {sha256}: the file is corrupt")
    return data
