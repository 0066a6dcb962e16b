"""The key-encryption key (KEK) of the forget vault: where it comes from and how it wraps data keys.

The vault encrypts every instance under its own data key (DEK) and stores the DEK only wrapped by
the KEK with AES key wrap (RFC 3394, AES-256). The KEK lives outside the data it protects: a file
(owner-only, e.g. a mounted Kubernetes Secret: one that others may read is refused, as ssh
refuses such a private key; one its group may read is a warning), an environment variable, or a
KMS key (`kms.py`, the AWS KMS API). `KeyEncryptionKey` is the whole interface, two methods (and
a key id), which `LocalKEK` and `KmsKEK` implement; another KMS (GCP KMS, Vault transit) would be
a third class.

Key material is accepted as 32 raw bytes, 64 hex digits or base64 of 32 bytes; it is never logged
or echoed. A key's id is a key check value, never the key.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ..errors import StreamerError
from .durable import fsync_dir

KEY_BYTES = 32  # AES-256 for the KEK and every DEK
MAX_KEY_FILE_BYTES = 4096  # 32 raw bytes, 64 hex digits or 44 base64 characters, and whitespace

log = structlog.get_logger()

__all__ = ["KEY_BYTES", "KeyEncryptionKey", "LocalKEK", "VaultError", "VaultKeyError", "generate_kek_file",
           "kek_from_env", "kek_from_file", "load_kek"]


class VaultError(StreamerError):
    """The forget vault is malformed or cannot be written: stop without publishing or committing offsets."""


class VaultKeyError(VaultError):
    """The KEK is missing, malformed or not the vault's: refuse to start, with the message (exit 2)."""


class KeyEncryptionKey(Protocol):
    """Wraps 32-byte DEKs; a KMS can implement it. `unwrap` raises VaultKeyError for a key it did not wrap."""

    key_id: str

    def wrap(self, dek: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes) -> bytes: ...


class LocalKEK:
    """A 256-bit KEK held in memory; AES key wrap (RFC 3394). The default key_id is a key check value,
    `local:` + 16 hex digits of HMAC-SHA256(key, "streamer-kek-id"), never the key itself.
    Raises VaultKeyError when `key` is not 32 bytes."""

    def __init__(self, key: bytes, key_id: str | None = None):
        if len(key) != KEY_BYTES:
            raise VaultKeyError(f"a KEK must be {KEY_BYTES} bytes (AES-256), got {len(key)}")
        self._key = bytes(key)
        self.key_id = key_id or "local:" + hmac.new(self._key, b"streamer-kek-id", "sha256").hexdigest()[:16]

    def __repr__(self) -> str:
        return f"LocalKEK(key_id={self.key_id!r})"

    def wrap(self, dek: bytes) -> bytes:
        """RFC 3394 wrap of a 32-byte DEK: 40 bytes."""
        return aes_key_wrap(self._key, dek)

    def unwrap(self, wrapped: bytes) -> bytes:
        """The DEK inside `wrapped`; VaultKeyError when the RFC 3394 2.2.3 integrity check fails."""
        try:
            return aes_key_unwrap(self._key, wrapped)
        except (InvalidUnwrap, ValueError) as err:
            raise VaultKeyError(f"KEK {self.key_id} did not wrap this key (another KEK did, or it is corrupt)") from err


def kek_from_file(path: str | Path, key_id: str | None = None) -> LocalKEK:
    """The KEK in `path`: 32 raw bytes, 64 hex digits or base64 of 32 bytes (whitespace ignored).
    Symlinks are followed (a mounted Kubernetes Secret is one); the mode is checked on the file
    opened. Raises VaultKeyError when the file is missing, unreadable, readable or writable by
    others (chmod 600 it), or holds no 256-bit key; logs `kek_file_group_accessible` when its
    group may read or write it."""
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as err:
        raise VaultKeyError(f"cannot read the KEK file {path}: {err.strerror or err}") from err
    if mode & 0o007:
        raise VaultKeyError(f"the KEK file {path} is accessible by others (mode {mode:04o}); it must be the owner's "
                            f"alone: chmod 600 {path}")
    if mode & 0o070:
        log.warning("kek_file_group_accessible", path=str(path), mode=f"{mode:04o}",
                    hint="anyone in the file's group can decrypt the vault; make it owner-only (chmod 600)")
    return LocalKEK(data if len(data) == KEY_BYTES else _decode_key(data, f"the KEK file {path}"), key_id)


def kek_from_env(name: str, key_id: str | None = None, environ: Mapping[str, str] | None = None) -> LocalKEK:
    """The KEK in environment variable `name`: base64 (or 64 hex digits) of 32 bytes. Raises
    VaultKeyError when it is unset, empty or not a 256-bit key; the value is never echoed."""
    value = (os.environ if environ is None else environ).get(name, "")
    if not value.strip():
        raise VaultKeyError(f"environment variable {name} is not set (it must hold the base64 of a 32-byte KEK)")
    return LocalKEK(_decode_key(value.encode("ascii", "replace"), f"environment variable {name}"), key_id)


def load_kek(kek_file: Path | None, kek_env: str | None, environ: Mapping[str, str] | None = None) -> LocalKEK:
    """The KEK the config's `privacy` section names (exactly one of a file or a variable).
    Raises VaultKeyError when neither is configured or the key cannot be read."""
    if kek_file is not None:
        return kek_from_file(kek_file)
    if kek_env is not None:
        return kek_from_env(kek_env, environ=environ)
    raise VaultKeyError("no KEK configured: set privacy.kek_file (make one with `streamer keygen PATH`), "
                        "privacy.kek_env or privacy.kek_kms")


def generate_kek_file(path: str | Path) -> LocalKEK:
    """Write a new random KEK to `path` as base64 text, mode 0600, fsynced. Never overwrites (a lost
    KEK makes every entry unreadable): raises VaultKeyError when `path` exists."""
    path, key = Path(path), os.urandom(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise VaultKeyError(f"{path} exists; refusing to overwrite a KEK") from err
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64encode(key) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
    return LocalKEK(key)


def _decode_key(text: bytes, where: str) -> bytes:
    text = b"".join(text.split())
    for decode in (binascii.unhexlify, lambda t: base64.b64decode(t, validate=True)):
        try:
            if len(key := decode(text)) == KEY_BYTES:
                return key
        except (binascii.Error, ValueError):
            pass
    raise VaultKeyError(f"{where} does not hold a 256-bit key (32 raw bytes, 64 hex digits or base64 of 32 bytes)")
