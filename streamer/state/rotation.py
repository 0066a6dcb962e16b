"""KEK rotation: every live vault entry's DEK re-wrapped under a new KEK, exactly once across kill -9.

Only wrapped DEKs change: ciphertexts, digests and manifests stay as they are (the DEKs do not
change). The steps, and the crash point after each (STREAMER_CRASH_AT, `pipeline/faults.py`):

    1. open the vault with the old KEK (proves it; erases what an uncommitted try left)
    2. per live entry: unwrap keys/<id>.dek with the old KEK, wrap with the new, write
       keys/<id>.dek.next                                                [rotate_mid_stage: half]
    3. kek-check.json.next: a key check under the new KEK; fsync keys/ and the root
                                                                         [rotate_after_stage]
    4. ROTATION.json {rotation_id, old and new key id, entries, time}, atomic and fsynced:
       THE COMMIT POINT                                                  [rotate_after_record]
    5. rename every .next over its file, the key check last; fsync       [rotate_mid_switch: half,
                                                                          rotate_after_switch]
    6. the ledger's `rotations` row, keyed by rotation_id                [rotate_after_ledger]
    7. remove ROTATION.json, fsync                                       [rotate_after_finish:
                                                                          before the old KEK goes]

Before 4 the vault is the old KEK's: it opens only with the old one, and a writer's open erases
the staged files. From 4 on it is the new KEK's: a writer's open (the daemon's start, the command
run again) renames what is left (no KEK needed), and `finish_rotation` writes the ledger row (a
second write of it is a no-op) and removes the record. So at every point each live entry's
`.dek` opens under exactly one KEK, and after a rerun under the new one only.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .durable import erase_file, fsync_dir, write_atomic
from .kek import KeyEncryptionKey, VaultError, VaultKeyError
from .manifest import rfc3339
from .rotation_log import RotationLog, RotationRow
from .sealed import SCHEMA, VaultIntegrityError, json_bytes, key_check
from .vault import ForgetVault
from .vault_layout import (CHECK_FILE, KEYS_DIR, NEXT_SUFFIX, ROTATION_FILE, _file_id, _pending_rotation, _roll_forward,
                           _vault_key_id)

ROTATION_CRASH_POINTS = ("rotate_mid_stage", "rotate_after_stage", "rotate_after_record", "rotate_mid_switch",
                         "rotate_after_switch", "rotate_after_ledger", "rotate_after_finish")
CrashHook = Callable[[str], None]

__all__ = ["ROTATION_CRASH_POINTS", "Rotation", "finish_rotation", "rotate_vault", "vault_key_id"]


@dataclass(frozen=True)
class Rotation:
    """One rotation as its record (ROTATION.json) and its ledger row hold it."""

    rotation_id: str
    old_key_id: str
    new_key_id: str
    entries: int  # live entries re-wrapped
    committed_at: float  # unix s


def vault_key_id(root: str | Path) -> str:
    """The key id of the KEK the vault at `root` is under, read without any KEK (a committed rotation
    counts as done: its new key id). Raises VaultError when `root` holds no vault."""
    root = Path(root)
    pending = _pending_rotation(root)
    if pending is not None:
        return str(pending["new_key_id"])
    if not (root / CHECK_FILE).is_file():
        raise VaultError(f"{root} holds no forget vault (no {CHECK_FILE})")
    return _vault_key_id(root)


def rotate_vault(root: str | Path, old: KeyEncryptionKey, new: KeyEncryptionKey, ledger_path: str | Path, *,
                 finished_by: str = "streamer kek rotate", crash_at: CrashHook = lambda point: None,
                 clock: Callable[[], float] = time.time) -> Rotation:
    """Re-wrap every live entry of the vault at `root` from `old` to `new` (steps 1-7 above) and
    record it in the ledger at `ledger_path`. The caller holds the checkpoint directory's lock.
    Raises VaultKeyError when `old` is not the vault's KEK or `new` is the same key,
    VaultIntegrityError when an entry's wrapped key does not open (nothing is changed then)."""
    root = Path(root)
    if new.key_id == old.key_id:
        raise VaultKeyError(f"the new KEK is the vault's KEK already (key id {old.key_id})")
    vault = ForgetVault.open(root, old, writer=True, clock=clock)
    live = [e.request_id for e in vault.entries() if not e.shredded]
    previous = json.loads((root / CHECK_FILE).read_text(encoding="utf-8")).get("previous_key_ids") or []
    _stage(root, live, old, new, crash_at)
    try:
        write_atomic(root / f"{CHECK_FILE}{NEXT_SUFFIX}", json_bytes(key_check(new, [*previous, old.key_id])))
        fsync_dir(root / KEYS_DIR)
        fsync_dir(root)
    except OSError as err:
        raise VaultError(f"cannot stage the KEK rotation in {root}: {err}") from err
    crash_at("rotate_after_stage")
    rotation = Rotation(uuid.uuid4().hex, old.key_id, new.key_id, len(live), float(clock()))
    record = {"schema": SCHEMA, "rotation_id": rotation.rotation_id, "old_key_id": old.key_id,
              "new_key_id": new.key_id, "entries": len(live), "committed_at": rotation.committed_at}
    try:
        write_atomic(root / ROTATION_FILE, json_bytes(record))
        fsync_dir(root)  # committed: from here on the vault is the new KEK's
    except OSError as err:
        raise VaultError(f"cannot commit the KEK rotation in {root}: {err}") from err
    crash_at("rotate_after_record")
    finished = finish_rotation(root, ledger_path, finished_by=finished_by, crash_at=crash_at, clock=clock)
    return finished or rotation


def finish_rotation(root: str | Path, ledger_path: str | Path, *, finished_by: str = "the daemon's start",
                    crash_at: CrashHook = lambda point: None, clock: Callable[[], float] = time.time) -> Rotation | None:
    """Finish a committed rotation at `root` (steps 5-7: renames, ledger row, record removed); no KEK
    needed. Returns it, or None when none is pending. Call it under the checkpoint directory's lock."""
    root = Path(root)
    pending = _pending_rotation(root)
    if pending is None:
        return None
    _roll_forward(root, halfway=lambda: crash_at("rotate_mid_switch"))
    crash_at("rotate_after_switch")
    rotation = Rotation(str(pending["rotation_id"]), str(pending["old_key_id"]), str(pending["new_key_id"]),
                        int(pending["entries"]), float(pending.get("committed_at", clock())))
    with RotationLog(ledger_path) as log:
        log.record_rotation(RotationRow(rotation.rotation_id, rotation.old_key_id, rotation.new_key_id,
                                        rotation.entries, rfc3339(rotation.committed_at), rfc3339(float(clock())),
                                        finished_by))
    crash_at("rotate_after_ledger")
    try:
        (root / ROTATION_FILE).unlink(missing_ok=True)
        fsync_dir(root)
    except OSError as err:
        raise VaultError(f"cannot remove {root / ROTATION_FILE}: {err}") from err
    crash_at("rotate_after_finish")
    return rotation


def _stage(root: Path, live: list[str], old: KeyEncryptionKey, new: KeyEncryptionKey, crash_at: CrashHook) -> None:
    """keys/<id>.dek.next for every live entry: its DEK unwrapped by `old`, wrapped by `new`. All or
    nothing: on a failure the staged files are erased and the vault is as it was."""
    staged: list[Path] = []
    try:
        for i, rid in enumerate(live):
            if i == len(live) // 2:
                crash_at("rotate_mid_stage")
            path = root / KEYS_DIR / f"{_file_id(rid)}.dek"
            try:
                dek = old.unwrap(path.read_bytes())
            except (OSError, VaultKeyError) as err:
                raise VaultIntegrityError(f"entry {rid!r}: its wrapped key cannot be read or opened by the vault's "
                                          f"KEK ({err}); restore it from backup. Nothing was rotated") from err
            staged.append(path.with_name(path.name + NEXT_SUFFIX))
            write_atomic(staged[-1], new.wrap(dek))
    except OSError as err:
        _erase(staged)
        raise VaultError(f"cannot stage the KEK rotation in {root}: {err}") from err
    except BaseException:
        _erase(staged)
        raise


def _erase(paths: list[Path]) -> None:
    for path in paths:
        try:
            erase_file(path)
        except OSError:
            pass  # a writer's next open erases staged files of an uncommitted rotation anyway
