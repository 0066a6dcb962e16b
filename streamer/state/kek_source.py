"""Which KEK the config's `privacy` section names (a file, an environment variable or a KMS key),
and how an old KEK is disposed of once a rotation moved every live entry away from it.

Disposal is what makes backups of `vault/` taken before the rotation unreadable: their wrapped
DEKs open only under the old KEK. A file is overwritten with zeros, fsynced and unlinked (copies
in a secret store are the operator's to delete); a KMS key is scheduled for deletion (the KMS
refuses it from that moment and destroys its material after the pending window); a variable's
value lives wherever it is defined, out of streamer's reach.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import PrivacyConfig
from .durable import erase_file, fsync_dir
from .kek import KeyEncryptionKey, VaultKeyError, load_kek
from .kms import KmsKEK

__all__ = ["Disposal", "configured_kek", "describe_source", "dispose_kek"]


def configured_kek(privacy: PrivacyConfig, environ: Mapping[str, str] | None = None) -> KeyEncryptionKey:
    """The KEK `privacy` names (exactly one of kek_file, kek_env, kek_kms). Raises VaultKeyError when
    none is configured or the key cannot be read or used (boto3 is imported only for kek_kms)."""
    if privacy.kek_kms is not None:
        return KmsKEK(privacy.kek_kms)
    return load_kek(privacy.kek_file, privacy.kek_env, environ=environ)


def describe_source(privacy: PrivacyConfig) -> str:
    """The config lines that name this KEK, as an operator would write them (never key material)."""
    if privacy.kek_kms is not None:
        kms = privacy.kek_kms
        extra = "".join(f", {k}: {v}" for k, v in (("region", kms.region), ("endpoint_url", kms.endpoint_url)) if v)
        return f"privacy.kek_kms: {{key_id: {kms.key_id}{extra}}}"
    if privacy.kek_file is not None:
        return f"privacy.kek_file: {privacy.kek_file}"
    return f"privacy.kek_env: {privacy.kek_env}"


@dataclass(frozen=True)
class Disposal:
    """What happened to an old KEK (a row of the ledger's `kek_disposals` table)."""

    key_id: str
    how: str  # erased | deletion_scheduled
    disposed_at: float  # unix s
    unreadable_from: float  # unix s: the file is gone at once; KMS refuses the key at once, destroys it at the date
    detail: str


def dispose_kek(privacy: PrivacyConfig, kek: KeyEncryptionKey, pending_days: int,
                clock: Callable[[], float] = time.time) -> Disposal:
    """Destroy the KEK `privacy` names: erase its file, or schedule its KMS key's deletion after
    `pending_days`. Raises VaultKeyError for a variable (streamer cannot reach where it is
    defined) or when the KMS refuses."""
    now = float(clock())
    if privacy.kek_kms is not None:
        if not isinstance(kek, KmsKEK):
            raise VaultKeyError("the KEK to dispose of is not the configured KMS key")
        date = kek.schedule_deletion(pending_days)
        return Disposal(kek.key_id, "deletion_scheduled", now, now,
                        f"KMS refuses the key from now on and deletes it on {date.isoformat()} "
                        f"({pending_days} days; CancelKeyDeletion until then)")
    if privacy.kek_file is not None:
        path = Path(privacy.kek_file)
        try:
            existed = erase_file(path)
            fsync_dir(path.parent)
        except OSError as err:
            raise VaultKeyError(f"cannot erase the old KEK file {path}: {err}") from err
        detail = "overwritten with zeros, fsynced and unlinked" if existed else "already gone"
        return Disposal(kek.key_id, "erased", now, now, f"{path}: {detail}; delete any other copy (secret store, "
                                                        "backups of the key) too")
    raise VaultKeyError(f"the old KEK is environment variable {privacy.kek_env}: streamer cannot destroy it; remove "
                        "it from wherever it is defined (secret store, deployment) and from every copy")
