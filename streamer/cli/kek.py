"""`streamer kek rotate`: move the forget vault to a new KEK, then (optionally) destroy the old one.

The daemon must be stopped: it reads its KEK from its config once, at start, so the command
refuses while the daemon holds the checkpoint directory's LOCK, rather than leave a running daemon
on a KEK the vault no longer uses. The command takes the lock itself, finishes a rotation a crash
interrupted, re-wraps every live entry (`state/rotation.py`, exactly once across kill -9), proves
that every live entry decrypts under the new KEK, and only then destroys the old one if asked. It
never edits the config: it prints the line that names the new KEK.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import DaemonConfig, KmsKeyConfig, PrivacyConfig
from ..errors import ConfigError
from ..state import (LEDGER_FILE, CheckpointDirLocked, DirectoryLock, Disposal, DisposalRow, ForgetVault, Rotation,
                     RotationLog, VaultKeyError, configured_kek, describe_source, dispose_kek, finish_rotation,
                     rfc3339, rotate_vault, vault_key_id)

_CHUNK = 256  # entries decrypted at a time by the final check (bounded memory)

__all__ = ["RotateResult", "format_rotation", "rotate_kek", "target_privacy"]


@dataclass(frozen=True)
class RotateResult:
    vault: Path
    new_source: str  # the config line naming the new KEK
    new_key_id: str
    rotation: Rotation | None  # None: the vault was under the new KEK already
    resumed: Rotation | None  # a rotation a crash had interrupted, finished first
    checked: int  # live entries decrypted under the new KEK
    seconds: float
    disposal: Disposal | None = None


def target_privacy(cfg: DaemonConfig, to_file: str | None, to_env: str | None, to_kms: str | None,
                   kms_region: str | None = None, kms_endpoint_url: str | None = None) -> PrivacyConfig:
    """The config's privacy section with the new KEK source in place of the old. Raises ConfigError for
    a key file inside the checkpoint directory or the vault (a copy of them would hold the key)."""
    kms = KmsKeyConfig(to_kms, kms_region, kms_endpoint_url) if to_kms else None
    path = Path(to_file).expanduser().resolve() if to_file else None
    for name, directory in (("checkpoints.dir", cfg.checkpoints.dir),
                            ("privacy.vault_dir", cfg.privacy.vault_path(cfg.checkpoints.dir))):
        if path is not None and path.is_relative_to(Path(directory).resolve()):
            raise ConfigError(f"--to-file {path} is inside {name}: a copy of that directory would hold the key with "
                              "the data it protects; keep the KEK elsewhere")
    return dataclasses.replace(cfg.privacy, kek_file=path, kek_env=to_env or None, kek_kms=kms)


def rotate_kek(cfg: DaemonConfig, target: PrivacyConfig, destroy_old: bool = False, pending_days: int = 7,
               crash_at: Callable[[str], None] = lambda point: None) -> RotateResult:
    """Rotate the configured vault from the config's KEK to `target`'s; rerun after a crash to finish.
    Raises CheckpointDirLocked while the daemon runs, VaultKeyError / VaultError when a KEK or the
    vault does not check out (nothing destroyed then)."""
    root, start = Path(cfg.checkpoints.dir), time.monotonic()
    vault_root, ledger = cfg.privacy.vault_path(root), root / LEDGER_FILE
    lock = DirectoryLock(root)
    if not lock.acquire():
        raise CheckpointDirLocked(f"{root} is locked by a running daemon ({root / 'LOCK'}): stop it first, then run "
                                  "`streamer kek rotate` again (the daemon reads its KEK from its config at start)")
    try:
        resumed = finish_rotation(vault_root, ledger, finished_by="streamer kek rotate (resumed)", crash_at=crash_at)
        current = vault_key_id(vault_root)
        new = configured_kek(target)
        old, rotation = None, None
        if current != new.key_id:
            old = configured_kek(cfg.privacy)
            rotation = rotate_vault(vault_root, old, new, ledger, crash_at=crash_at)
        checked = _decrypt_all(vault_root, new)
        result = RotateResult(vault_root, describe_source(target), new.key_id, rotation, resumed, checked,
                              time.monotonic() - start)
        if destroy_old:
            disposal = _dispose_old(cfg.privacy, target, old, new.key_id, vault_root, pending_days)
            with RotationLog(ledger) as log:
                log.record_disposal(DisposalRow(disposal.key_id, disposal.how, rfc3339(disposal.disposed_at),
                                                rfc3339(disposal.unreadable_from), disposal.detail))
            result = dataclasses.replace(result, disposal=disposal)
        return result
    finally:
        lock.release()


def _decrypt_all(root: Path, kek) -> int:
    """Every live entry decrypted (AES-GCM tag and digest checked) under `kek`, in bounded chunks."""
    vault = ForgetVault.open(root, kek, writer=False)
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for entry in vault.entries():
        if not entry.shredded:
            by_shape.setdefault(entry.shape, []).append(entry.request_id)
    for ids in by_shape.values():
        for i in range(0, len(ids), _CHUNK):
            vault.get(ids[i:i + _CHUNK])
    return sum(len(ids) for ids in by_shape.values())


def _dispose_old(privacy: PrivacyConfig, target: PrivacyConfig, old, new_key_id: str, vault_root: Path,
                 pending_days: int) -> Disposal:
    """Destroy the config's (old) KEK, never the one the vault is under. Raises VaultKeyError."""
    if describe_source(privacy) == describe_source(target):
        raise VaultKeyError("--destroy-old: the config already names the new KEK; there is no old one to destroy here")
    if old is None:  # rotated by an earlier run: the config still names the old KEK
        if privacy.kek_file is not None and not Path(privacy.kek_file).exists():
            raise VaultKeyError(f"--destroy-old: the old KEK file {privacy.kek_file} is gone already")
        old = configured_kek(privacy)
    if old.key_id in (new_key_id, vault_key_id(vault_root)):
        raise VaultKeyError(f"--destroy-old: key id {old.key_id} is the vault's KEK; refusing to destroy it")
    return dispose_kek(privacy, old, pending_days)


def format_rotation(result: RotateResult) -> str:
    """What the command prints: what was rotated, the check, the config line to set, the old KEK's fate."""
    lines = []
    if result.resumed is not None:
        lines.append(f"finished an interrupted rotation {result.resumed.old_key_id} -> {result.resumed.new_key_id} "
                     f"({result.resumed.entries} entries; rotation {result.resumed.rotation_id})")
    r = result.rotation
    if r is not None:
        lines.append(f"rotated the forget vault {result.vault} from KEK {r.old_key_id} to {r.new_key_id}: "
                     f"{r.entries} live entries re-wrapped, recorded in the ledger (rotation {r.rotation_id})")
    elif result.resumed is None:
        lines.append(f"the forget vault {result.vault} is under KEK {result.new_key_id} already: nothing to re-wrap")
    lines.append(f"every live entry decrypts under the new KEK ({result.checked} checked, {result.seconds:.1f} s)")
    lines.append(f"now set in the config, in place of the old KEK: {result.new_source} (the daemon refuses the old one)")
    if result.disposal is not None:
        lines.append(f"old KEK {result.disposal.key_id}: {result.disposal.detail}; backups of the vault taken before "
                     "the rotation cannot be read any more (recorded in the ledger)")
    else:
        lines.append("the old KEK still exists: backups of the vault taken before the rotation stay readable with it "
                     "until it is destroyed (--destroy-old, or delete it yourself)")
    return "\n".join(lines)
