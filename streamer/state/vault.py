"""The forget vault: the retained forgotten instances, encrypted one by one, each erasable on its own.

Each instance is encrypted with AES-256-GCM (NIST SP 800-38D) under a fresh random data key (DEK)
stored only wrapped by the key-encryption key (`kek.py`, RFC 3394). Destroying the wrapped DEK
leaves the ciphertext in this directory undecryptable, KEK or not: cryptographic erase (NIST SP
800-88 Rev. 1, 2.6), how one request is erased (GDPR Art. 17) without touching the others. It does
not reach copies: a copy or backup of the directory taken before the shred still holds the wrapped
DEK and stays decryptable for as long as the KEK that wrapped it exists (README "Data protection";
`rotation.py` re-wraps every live DEK under a new KEK, after which destroying the old one ends that).

    <root>/kek-check.json   key_id + a known plaintext under a DEK wrapped by the KEK
    <root>/index.json       metadata, never pixels: request_id, created_at, digest, shape;
                            shredded_at and verified_version (digest erased) once shredded
    <root>/keys/<id>.dek    the wrapped DEK (40 bytes; a KMS blob)    <id> = sha256(request_id)
    <root>/data/<id>.bin    nonce (12) || AES-GCM(y, target, x) || tag (16); AAD = request_id + shape

An entry's digest is HMAC-SHA256 of its plaintext under a key derived from its own DEK (HKDF,
RFC 5869): it binds checkpoint manifests to the exact content, and once the DEK is destroyed it
no longer identifies the image to anyone, even someone holding it.

The index is the truth: `put` writes files then the index; `shred` and `remove_orphans` write the
index then erase files; a writer's `open` erases temp files and every file no live entry owns, so
a crash leaves the old state or the new one; a KEK rotation that passed its commit point
(ROTATION.json, `rotation.py`) is rolled forward by a writer's `open` and refused by a reader's.
One writer per root (the daemon, under the checkpoint LOCK); other processes open with
`writer=False`; `read_index` needs no KEK. Every directory is 0700 and every file 0600 (a
writer's `open` tightens older ones), and no file is read or erased through a symlink.
"""
from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .durable import PRIVATE_DIR, PRIVATE_FILE, TEMP_PREFIX, erase_file, fsync_dir, make_dir, read_file, restrict, write_atomic
from .kek import KeyEncryptionKey, VaultError, VaultKeyError
from .sealed import SCHEMA, Sealed, VaultIntegrityError, VaultItem, digest_under, json_bytes, seal, unseal, validate
from .vault_layout import (_FIELDS, CHECK_FILE, DATA_DIR, INDEX_FILE, KEYS_DIR, NEXT_SUFFIX, ROTATION_FILE, ShredRecord,
                           VaultEntry, VaultEntryMissing, _create, _entries, _file_id, _has_entry_files, _load_index,
                           _pending_rotation, _roll_forward, _vault_key_id, _verify_key_check)


__all__ = ["ForgetVault", "ShredRecord", "VaultEntry", "VaultEntryMissing", "VaultError", "VaultIntegrityError",
           "VaultItem", "VaultKeyError", "read_index"]


def read_index(root: str | Path) -> list[VaultEntry]:
    """Every entry of the vault at `root`, oldest first, without the KEK (for reports and gauges).
    A missing vault has no entries; raises VaultError for an unreadable index."""
    return _entries(_load_index(Path(root)) if Path(root).is_dir() else {})


class ForgetVault:
    """Encrypted per-request storage of forgotten instances; build it with `ForgetVault.open`."""

    def __init__(self, root: Path, kek: KeyEncryptionKey, index: dict[str, dict[str, Any]], writer: bool,
                 clock: Callable[[], float]):
        self.root, self.kek, self._index, self._writer, self._clock = root, kek, index, writer, clock
        self.recovered: tuple[str, ...] = ()  # what a crash left, erased by a writer's open (log it)
        self.finished_rotation: Any = None  # a KEK rotation a crash interrupted, finished by open_vault (log it)

    @classmethod
    def open(cls, root: str | Path, kek: KeyEncryptionKey, *, clock: Callable[[], float] = time.time,
             writer: bool = True) -> ForgetVault:
        """Open the vault at `root` (a writer creates it) and prove `kek` is its KEK by decrypting the key
        check; a writer then erases what a crash left. Raises VaultKeyError ("the KEK does not match the
        vault's (key id X) ...") or VaultError (not a vault, index missing). Never open two writers."""
        root = Path(root)
        pending = _pending_rotation(root)
        if pending is not None:  # a KEK rotation passed its commit point: the staged files are the truth
            if not writer:
                raise VaultError(f"{root}: the KEK rotation to key id {pending['new_key_id']} is committed but not "
                                 "finished; run `streamer kek rotate` again or start the daemon: either finishes it")
            _roll_forward(root)  # the record stays until rotation.finish_rotation has written its ledger row
        if not (root / CHECK_FILE).is_file():
            if not writer or (root / INDEX_FILE).exists() or _has_entry_files(root):
                raise VaultError(f"{root} is not a forget vault: it has no {CHECK_FILE}")
            _create(root, kek)
        _verify_key_check(root / CHECK_FILE, kek)
        vault = cls(root, kek, _load_index(root), writer, clock)
        if writer:
            vault.recovered = vault._erase_unowned()
        return vault

    def __contains__(self, request_id: object) -> bool:
        """True when `request_id` is stored and not shredded."""
        meta = self._index.get(request_id) if isinstance(request_id, str) else None
        return meta is not None and meta["shredded_at"] is None

    def entries(self) -> list[VaultEntry]:
        """Every entry, shredded ones included, oldest first; nothing is decrypted."""
        return _entries(self._index)

    def _entry(self, request_id: str) -> VaultEntry:
        return _entries({request_id: self._index[request_id]})[0]

    def oldest_age_seconds(self, now: float | None = None) -> float:
        """Seconds since the oldest unshredded entry was stored (0.0 when there is none)."""
        live = [m["created_at"] for m in self._index.values() if m["shredded_at"] is None]
        return max(0.0, (self._clock() if now is None else now) - min(live)) if live else 0.0

    def get(self, request_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decrypt entries in the given order: x (N, C, H, W) float32 in [0, 1], y (N,) and target (N,)
        int64, bitwise as stored. Raises VaultEntryMissing naming every shredded or absent id,
        VaultIntegrityError when an entry fails authentication or its digest, ValueError when
        `request_ids` is empty (use ForgottenSet.empty) or the entries' shapes differ."""
        ids = list(request_ids)
        if not ids:
            raise ValueError("get() needs at least one request id (use ForgottenSet.empty(input_shape) for none)")
        missing = {rid: "shredded" if rid in self._index else "absent" for rid in ids if rid not in self}
        if missing:
            raise VaultEntryMissing(missing)
        if len({tuple(self._index[rid]["shape"]) for rid in ids}) > 1:
            raise ValueError("the requested entries have different shapes: they cannot be stacked")
        xs, ys, targets = zip(*(self._decrypt(rid) for rid in ids), strict=True)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), torch.tensor(targets, dtype=torch.int64)

    def put(self, items: Iterable[VaultItem]) -> list[VaultEntry]:
        """Store a whole fragment before its version is published; all or nothing. An id already stored
        with the same content is skipped (a replayed fragment) and keeps its created_at. Returns the
        items' entries in order. Raises ValueError for a bad item (x not a finite float32 (C, H, W)
        tensor in [0, 1], y or target not an int, an id twice), VaultError for an id stored with other
        content or already shredded, or for a failed write."""
        self._require_writer("put")
        items, now, new = list(items), float(self._clock()), {}
        if len({item.request_id for item in items}) != len(items):
            raise ValueError("a request id appears twice in one put()")
        for item in items:
            validate(item)
        for item in items:
            old, fid = self._index.get(item.request_id), _file_id(item.request_id)
            if old is not None and old["shredded_at"] is not None:
                raise VaultError(f"request {item.request_id!r} was shredded; a request id is never stored twice")
            if old is not None:
                if not hmac.compare_digest(digest_under(item, self._read(KEYS_DIR, f"{fid}.dek", item.request_id),
                                                        self.kek), old["digest"]):
                    raise VaultError(f"request {item.request_id!r} is already stored with other content")
                continue
            sealed = seal(item, self.kek)
            self._write(DATA_DIR, f"{fid}.bin", sealed.blob)
            self._write(KEYS_DIR, f"{fid}.dek", sealed.wrapped_dek)
            values = (item.request_id, now, sealed.digest, list(item.x.shape), None, None)
            new[item.request_id] = dict(zip(_FIELDS, values, strict=True))
        if new:
            fsync_dir(self.root / DATA_DIR)
            fsync_dir(self.root / KEYS_DIR)
            self._save_index({**self._index, **new})
        return [self._entry(item.request_id) for item in items]

    def shred(self, request_id: str, verified_version: str | None) -> ShredRecord:
        """Crypto-shred one request (NIST SP 800-88 cryptographic erase): mark it in the index with the
        last version that verified it, then overwrite, unlink and fsync away its wrapped DEK and its
        ciphertext. Idempotent: a repeat returns the first record. Raises VaultEntryMissing for an id
        never stored, VaultError when the files cannot be erased."""
        return self.shred_many([(request_id, verified_version)])[0]

    def shred_many(self, requests: Sequence[tuple[str, str | None]]) -> list[ShredRecord]:
        """`shred` for several (request_id, verified_version) with one index write, all or none marked."""
        self._require_writer("shred")
        missing = {rid: "absent" for rid, _ in requests if rid not in self._index}
        if missing:
            raise VaultEntryMissing(missing)
        index, now = dict(self._index), float(self._clock())
        for rid, verified_version in requests:
            if index[rid]["shredded_at"] is None:
                index[rid] = {**index[rid], "digest": "", "shredded_at": now, "verified_version": verified_version}
        if index != self._index:
            self._save_index(index)
        self._erase_files([_file_id(rid) for rid, _ in requests])
        return [ShredRecord(rid, index[rid]["verified_version"], index[rid]["shredded_at"], self.kek.key_id)
                for rid, _ in requests]

    def __len__(self) -> int:
        """Live (not shredded) entries."""
        return sum(1 for m in self._index.values() if m["shredded_at"] is None)

    def remove_orphans(self, keep: set[str]) -> list[str]:
        """Delete (index entry and files) every unshredded entry whose id is not in `keep`, the ids
        CURRENT's manifest references (retained or waiting for replay): it was written for a fragment
        whose version was never published (a crash), which Kafka will replay. Returns the ids, sorted."""
        self._require_writer("remove_orphans")
        orphans = sorted(rid for rid in self._index if rid not in keep and rid in self)
        if orphans:
            gone = set(orphans)
            self._save_index({rid: m for rid, m in self._index.items() if rid not in gone})
            self._erase_files([_file_id(rid) for rid in orphans])
        return orphans

    def _decrypt(self, rid: str) -> tuple[torch.Tensor, int, int]:
        meta, fid = self._index[rid], _file_id(rid)
        sealed = Sealed(self._read(DATA_DIR, f"{fid}.bin", rid), self._read(KEYS_DIR, f"{fid}.dek", rid),
                        meta["digest"])
        try:
            return unseal(rid, meta["shape"], sealed, self.kek)
        except VaultIntegrityError as err:  # a reader that opened the vault just before a KEK rotation committed
            if (self.root / ROTATION_FILE).exists() or _vault_key_id(self.root) != self.kek.key_id:
                raise VaultKeyError(f"the vault's KEK was rotated while it was open (key id {self.kek.key_id} -> "
                                    f"{_vault_key_id(self.root)}): run the command again with the new KEK") from err
            raise

    def _read(self, directory: str, name: str, rid: str) -> bytes:
        try:
            return read_file(self.root / directory / name)
        except OSError as err:
            raise VaultIntegrityError(f"entry {rid!r} is indexed but {err.filename} cannot be read: {err}") from err

    def _require_writer(self, operation: str) -> None:
        if not self._writer:
            raise VaultError(f"{operation}() needs the vault opened with writer=True ({self.root})")

    def _write(self, directory: str, name: str, data: bytes) -> None:
        try:
            write_atomic(self.root / directory / name, data)
        except OSError as err:
            raise VaultError(f"cannot write {self.root / directory / name}: {err}") from err

    def _save_index(self, index: dict[str, dict[str, Any]]) -> None:
        ordered = sorted(index.values(), key=lambda m: (m["created_at"], m["request_id"]))
        self._write(".", INDEX_FILE, json_bytes({"schema": SCHEMA, "entries": ordered}))
        fsync_dir(self.root)
        self._index = index

    def _erase_files(self, file_ids: Iterable[str]) -> None:
        try:
            for fid in file_ids:  # the key first: once the wrapped DEK is gone the ciphertext is noise
                erase_file(self.root / KEYS_DIR / f"{fid}.dek")
                erase_file(self.root / DATA_DIR / f"{fid}.bin")
            fsync_dir(self.root / KEYS_DIR)
            fsync_dir(self.root / DATA_DIR)
        except OSError as err:
            raise VaultError(f"cannot erase vault files in {self.root}: {err}") from err

    def _erase_unowned(self) -> tuple[str, ...]:
        live = {_file_id(rid) for rid in self._index if rid in self}
        # no rotation record here (open rolled a committed one forward): staged files are an uncommitted try's
        stale = [*self.root.glob(f"{TEMP_PREFIX}*"), *self.root.glob(f"*{NEXT_SUFFIX}")]
        for directory in (self.root, self.root / KEYS_DIR, self.root / DATA_DIR):  # owner-only, also if made before
            make_dir(directory, PRIVATE_DIR)
            for path in directory.iterdir():
                restrict(path, PRIVATE_DIR if path.is_dir() else PRIVATE_FILE)
            if directory != self.root:
                stale += [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX) or p.stem not in live]
        try:
            for path in stale:
                erase_file(path)
            for directory in (self.root, self.root / KEYS_DIR, self.root / DATA_DIR):
                fsync_dir(directory)
        except OSError as err:
            raise VaultError(f"cannot erase what a crash left in {self.root}: {err}") from err
        return tuple(sorted(str(p.relative_to(self.root)) for p in stale))
