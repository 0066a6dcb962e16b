"""The forget vault's encryption format for one instance (pure functions, no files).

    plaintext   y (int64 LE) || target (int64 LE) || x (float32 LE, C-order)
    blob        nonce (12 bytes) || AES-256-GCM(plaintext) || tag (16 bytes)     NIST SP 800-38D
    wrapped     the entry's data key (DEK) wrapped by the KEK: 40 bytes (RFC 3394), a KMS blob for KMS
    AAD         {"schema", "request_id", "shape"}: a blob only opens as its own request and shape
    digest      HMAC-SHA256 (RFC 2104) of the plaintext under HKDF-SHA256(DEK) (RFC 5869)

The digest binds manifests to the exact content; it is keyed by the entry's own DEK, so once the
DEK is destroyed the digest no longer identifies the image, even to someone who holds it.
"""
from __future__ import annotations

import base64
import hmac
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .kek import KeyEncryptionKey, VaultError, VaultKeyError

SCHEMA = 1
_NONCE_BYTES = 12  # random 96-bit IV (SP 800-38D 8.2.2); each DEK encrypts one message, so never reused
_CHECK_PLAINTEXT, _CHECK_AAD = b"streamer forget vault: the KEK matches", b"streamer-vault/kek-check"
_DIGEST_INFO = b"streamer-vault/content-digest/v1"

__all__ = ["Sealed", "VaultIntegrityError", "VaultItem", "digest_under", "key_check", "seal", "unseal",
           "validate", "verify_key_check"]


class VaultIntegrityError(VaultError):
    """A stored entry fails authentication (tampered or corrupt): stop; restore the vault from backup."""


@dataclass(frozen=True)
class VaultItem:
    """One applied deletion request to keep."""

    request_id: str
    x: torch.Tensor  # (C, H, W) float32 pixels in [0, 1]
    y: int  # original label
    target: int  # -1: misclassify, c: relabel to c


@dataclass(frozen=True)
class Sealed:
    blob: bytes  # nonce || ciphertext || tag
    wrapped_dek: bytes
    digest: str  # hex


def validate(item: VaultItem) -> None:
    """Raise ValueError unless x is a finite float32 (C, H, W) tensor in [0, 1] and y, target ints."""
    rid, x = item.request_id, item.x
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"request_id must be a non-empty str, got {rid!r}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 3:
        raise ValueError(f"request {rid!r}: x must be a float32 (C, H, W) tensor, got {getattr(x, 'dtype', type(x))} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or bool((x > 1).any()):
        raise ValueError(f"request {rid!r}: x must be finite pixels in [0, 1]")
    for name, lowest in (("y", 0), ("target", -1)):
        value = getattr(item, name)
        if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value < 2**63:
            raise ValueError(f"request {rid!r}: {name} must be an int >= {lowest}, got {value!r}")


def seal(item: VaultItem, kek: KeyEncryptionKey) -> Sealed:
    """Encrypt a validated item under a fresh DEK; the DEK leaves only wrapped by `kek`."""
    dek, nonce, plain = AESGCM.generate_key(256), os.urandom(_NONCE_BYTES), _plaintext(item)
    blob = nonce + AESGCM(dek).encrypt(nonce, plain, _aad(item.request_id, item.x.shape))
    return Sealed(blob, kek.wrap(dek), _digest(dek, plain))


def digest_under(item: VaultItem, wrapped_dek: bytes, kek: KeyEncryptionKey) -> str:
    """The digest `item` has under an existing entry's DEK (is a replayed item the same content?)."""
    return _digest(_unwrap(item.request_id, wrapped_dek, kek), _plaintext(item))


def unseal(request_id: str, shape: Sequence[int], sealed: Sealed, kek: KeyEncryptionKey
           ) -> tuple[torch.Tensor, int, int]:
    """x (C, H, W) float32, y, target, bitwise as sealed. Raises VaultIntegrityError when the wrapped
    key, the AES-GCM tag or the digest does not check out."""
    dek = _unwrap(request_id, sealed.wrapped_dek, kek)
    try:
        plain = AESGCM(dek).decrypt(sealed.blob[:_NONCE_BYTES], sealed.blob[_NONCE_BYTES:], _aad(request_id, shape))
    except (InvalidTag, ValueError) as err:
        raise VaultIntegrityError(f"entry {request_id!r} fails AES-GCM authentication (NIST SP 800-38D): its "
                                  "ciphertext, key or index record was altered") from err
    if not hmac.compare_digest(_digest(dek, plain), sealed.digest):
        raise VaultIntegrityError(f"entry {request_id!r} decrypts but its digest differs from the index's")
    x = torch.from_numpy(np.frombuffer(plain[16:], dtype="<f4").astype(np.float32).reshape(tuple(shape)))
    y, target = struct.unpack_from("<qq", plain)
    return x, y, target


def key_check(kek: KeyEncryptionKey, previous_key_ids: Sequence[str] = ()) -> dict[str, Any]:
    """A record that proves, later, that a KEK is this vault's: a known plaintext under a wrapped DEK.
    `previous_key_ids`: the KEKs the vault was rotated away from, oldest first (named when one is given)."""
    dek, nonce = AESGCM.generate_key(256), os.urandom(_NONCE_BYTES)
    return {"schema": SCHEMA, "key_id": kek.key_id, "wrapped_dek": _b64(kek.wrap(dek)), "nonce": _b64(nonce),
            "ciphertext": _b64(AESGCM(dek).encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AAD)),
            "previous_key_ids": list(previous_key_ids)}


def verify_key_check(record: Any, kek: KeyEncryptionKey, where: str) -> None:
    """Raise VaultKeyError unless `kek` opens the key check (VaultError when it is malformed)."""
    try:
        stored_id = record["key_id"]
        wrapped, nonce, ciphertext = (base64.b64decode(record[k]) for k in ("wrapped_dek", "nonce", "ciphertext"))
    except (ValueError, KeyError, TypeError) as err:
        raise VaultError(f"{where} is not a key check record: {err!r}") from err
    if stored_id != kek.key_id:
        rotated = kek.key_id in (record.get("previous_key_ids") or [])
        hint = (f": the vault was rotated away from key id {kek.key_id} (`streamer kek rotate`); point the config "
                "at the new KEK") if rotated else ""
        raise VaultKeyError(f"the KEK does not match the vault's (key id {stored_id}; given key id {kek.key_id}){hint}")
    mismatch = f"the KEK does not match the vault's (key id {stored_id}): its key check does not decrypt"
    try:
        plain = AESGCM(kek.unwrap(wrapped)).decrypt(nonce, ciphertext, _CHECK_AAD)
    except VaultKeyError as err:
        raise VaultKeyError(f"{mismatch} ({err})") from err
    except (InvalidTag, ValueError) as err:
        raise VaultKeyError(mismatch) from err
    if plain != _CHECK_PLAINTEXT:
        raise VaultKeyError(mismatch)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _unwrap(request_id: str, wrapped: bytes, kek: KeyEncryptionKey) -> bytes:
    try:
        return kek.unwrap(wrapped)
    except VaultKeyError as err:  # the vault proved the KEK at open, so this wrapped key was altered
        raise VaultIntegrityError(f"the wrapped key of {request_id!r} fails its RFC 3394 integrity check") from err


def _plaintext(item: VaultItem) -> bytes:
    pixels = item.x.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes()
    return struct.pack("<qq", item.y, item.target) + pixels


def _digest(dek: bytes, plaintext: bytes) -> str:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DIGEST_INFO).derive(dek)
    return hmac.new(key, plaintext, "sha256").hexdigest()


def _aad(request_id: str, shape: Sequence[int]) -> bytes:
    return json_bytes({"schema": SCHEMA, "request_id": request_id, "shape": [int(s) for s in shape]})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
