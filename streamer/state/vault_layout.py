"""The forget vault's files and index records (`vault.py` owns the reads and writes).

    <root>/kek-check.json   key_id + a known plaintext under a DEK wrapped by the KEK
    <root>/index.json       metadata, never pixels (the `_FIELDS` of each entry)
    <root>/keys/<id>.dek    the wrapped DEK                      <id> = sha256(request_id)
    <root>/data/<id>.bin    nonce || AES-GCM ciphertext || tag
    <root>/ROTATION.json    only during a KEK rotation, from its commit point until it is finished:
                            every keys/<id>.dek.next and kek-check.json.next is then the truth
                            (`rotation.py`)

Directories are 0700 and files 0600, the owner's alone, whatever the umask (README "Security").
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .durable import PRIVATE_DIR, TEMP_PREFIX, fsync_dir, make_dir, read_file, write_atomic
from .kek import KeyEncryptionKey, VaultError
from .sealed import SCHEMA, json_bytes, key_check, verify_key_check

INDEX_FILE, CHECK_FILE, KEYS_DIR, DATA_DIR = "index.json", "kek-check.json", "keys", "data"
ROTATION_FILE, NEXT_SUFFIX = "ROTATION.json", ".next"  # a committed KEK rotation; its staged files
_FIELDS = ("request_id", "created_at", "digest", "shape", "shredded_at", "verified_version")

__all__ = ["CHECK_FILE", "DATA_DIR", "INDEX_FILE", "KEYS_DIR", "NEXT_SUFFIX", "ROTATION_FILE", "ShredRecord", "VaultEntry",
           "VaultEntryMissing"]


class VaultEntryMissing(VaultError):
    """Requested entries were shredded or never stored: the caller drops or reports those ids."""

    def __init__(self, missing: Mapping[str, str]):
        self.missing = dict(missing)  # request_id -> "shredded" | "absent"
        shown = ", ".join(f"{rid!r} ({why})" for rid, why in list(self.missing.items())[:10])
        more = f" and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
        super().__init__(f"{len(self.missing)} request id(s) not in the vault: {shown}{more}")


@dataclass(frozen=True)
class VaultEntry:
    """What the index says about one request, read without the KEK."""

    request_id: str
    digest: str  # HMAC-SHA256 hex of the plaintext under a DEK-derived key; "" once shredded
    created_at: float  # unix s, the vault's clock at the first put(): the verification window starts here
    shredded: bool
    shape: tuple[int, ...] = ()  # (C, H, W)
    shredded_at: float | None = None  # unix s
    verified_version: str | None = None  # the last version that proved the request forgotten


@dataclass(frozen=True)
class ShredRecord:
    """Evidence of one cryptographic erase, for the ledger."""

    request_id: str
    verified_version: str | None  # None: no version ever verified it (it never met its goal)
    shredded_at: float  # unix s
    key_id: str  # the KEK that had wrapped the destroyed DEK


def _entries(index: Mapping[str, Mapping[str, Any]]) -> list[VaultEntry]:
    return [VaultEntry(rid, m["digest"], m["created_at"], m["shredded_at"] is not None, tuple(m["shape"]),
                       m["shredded_at"], m["verified_version"])
            for rid, m in sorted(index.items(), key=lambda kv: (kv[1]["created_at"], kv[0]))]


def _create(root: Path, kek: KeyEncryptionKey) -> None:
    for directory in (root, root / KEYS_DIR, root / DATA_DIR):
        make_dir(directory, PRIVATE_DIR)
    try:
        write_atomic(root / CHECK_FILE, json_bytes(key_check(kek)))
        write_atomic(root / INDEX_FILE, json_bytes({"schema": SCHEMA, "entries": []}))
    except OSError as err:
        raise VaultError(f"cannot create the forget vault in {root}: {err}") from err
    fsync_dir(root)


def _verify_key_check(path: Path, kek: KeyEncryptionKey) -> None:
    try:
        record = json.loads(read_file(path).decode("utf-8"))
    except (OSError, ValueError) as err:
        raise VaultError(f"{path} is not a key check record: {err!r}") from err
    verify_key_check(record, kek, str(path))


def _load_index(root: Path) -> dict[str, dict[str, Any]]:
    if not (root / INDEX_FILE).exists():
        if _has_entry_files(root):
            raise VaultError(f"{root} holds encrypted entries but no {INDEX_FILE}: restore it from backup")
        return {}  # a crash between writing the key check and the index of a new vault
    try:
        entries = json.loads(read_file(root / INDEX_FILE).decode("utf-8"))["entries"]
        if not all(isinstance(m, dict) and set(_FIELDS) <= m.keys() for m in entries):
            raise ValueError(f"an entry lacks one of {_FIELDS}")
        return {m["request_id"]: m for m in entries}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VaultError(f"{root / INDEX_FILE} is not a vault index: {err!r}") from err


def _has_entry_files(root: Path) -> bool:
    dirs = [d for d in (root / KEYS_DIR, root / DATA_DIR) if d.is_dir()]
    return any(not p.name.startswith(TEMP_PREFIX) for d in dirs for p in d.iterdir())


def _file_id(request_id: str) -> str:
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def _pending_rotation(root: Path) -> dict[str, Any] | None:
    """The record of a committed, unfinished KEK rotation, or None. Raises VaultError when unreadable."""
    try:
        record = json.loads((root / ROTATION_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise VaultError(f"{root / ROTATION_FILE} is not a rotation record: {err!r}") from err
    if not isinstance(record, dict) or not {"rotation_id", "old_key_id", "new_key_id", "entries"} <= record.keys():
        raise VaultError(f"{root / ROTATION_FILE} is not a rotation record: {record!r}")
    return record


def _roll_forward(root: Path, halfway: Callable[[], None] = lambda: None) -> int:
    """Move every staged file of a committed rotation over its live one (keys first, the key check
    last), then fsync; renames only, no KEK needed, idempotent. Returns how many were moved."""
    staged = sorted((root / KEYS_DIR).glob(f"*{NEXT_SUFFIX}")) if (root / KEYS_DIR).is_dir() else []
    try:
        for i, path in enumerate(staged):
            if i == len(staged) // 2:
                halfway()
            os.replace(path, path.with_name(path.name[: -len(NEXT_SUFFIX)]))
        if staged:
            fsync_dir(root / KEYS_DIR)
        check = root / f"{CHECK_FILE}{NEXT_SUFFIX}"
        if check.exists():
            os.replace(check, root / CHECK_FILE)
            staged.append(check)
        fsync_dir(root)
    except OSError as err:
        raise VaultError(f"cannot finish the KEK rotation in {root}: {err}") from err
    return len(staged)


def _vault_key_id(root: Path) -> str:
    """The key id the vault's key check names (no KEK needed). Raises VaultError."""
    try:
        return str(json.loads((root / CHECK_FILE).read_text(encoding="utf-8"))["key_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VaultError(f"{root / CHECK_FILE} is not a key check record: {err!r}") from err
