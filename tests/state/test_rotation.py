"""Tests for streamer.state.rotation and rotation_log: the states a KEK rotation passes through, as readers
and writers of the vault see them, and the ledger's append-only record. In process, local KEKs; a crash
is simulated by a crash hook that raises (the kill -9 tests are in tests/cli/test_kek_rotate.py)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from streamer.config import PrivacyConfig
from streamer.state.kek import LocalKEK, VaultError, VaultKeyError
from streamer.state.kek_source import dispose_kek
from streamer.state.rotation import finish_rotation, rotate_vault, vault_key_id
from streamer.state.rotation_log import DisposalRow, RotationLog, RotationRow
from streamer.state.vault import ForgetVault, VaultItem

OLD, NEW = LocalKEK(bytes(range(32))), LocalKEK(bytes(range(1, 33)))


class Crash(Exception):
    pass


def _crash_at(where: str):
    def hook(point: str) -> None:
        if point == where:
            raise Crash(point)
    return hook


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    vault = ForgetVault.open(tmp_path / "vault", OLD)
    vault.put([VaultItem(f"r{i}", torch.full((1, 8, 8), i / 10), i, -1) for i in range(4)])
    return tmp_path / "vault"


class TestStates:
    def test_an_uncommitted_try_is_erased_by_the_next_writer(self, root: Path, tmp_path: Path) -> None:
        """Stopped before the commit point: the vault is the old KEK's (the new one is refused), and a
        writer's open erases every staged file."""
        with pytest.raises(Crash):
            rotate_vault(root, OLD, NEW, tmp_path / "ledger", crash_at=_crash_at("rotate_after_stage"))
        staged = sorted(p.name for p in root.rglob("*.next"))
        assert len(staged) == 5 and vault_key_id(root) == OLD.key_id
        with pytest.raises(VaultKeyError):
            ForgetVault.open(root, NEW)
        reopened = ForgetVault.open(root, OLD)
        assert len(reopened.recovered) == 5 and not list(root.rglob("*.next"))

    def test_a_reader_refuses_a_committed_unfinished_rotation(self, root: Path, tmp_path: Path) -> None:
        """Past the commit point a reader (verify) does not guess: it names the rotation and how to finish it;
        the vault's key id is already the new one, and finish_rotation completes it without any KEK."""
        with pytest.raises(Crash):
            rotate_vault(root, OLD, NEW, tmp_path / "ledger", crash_at=_crash_at("rotate_mid_switch"))
        assert vault_key_id(root) == NEW.key_id
        with pytest.raises(VaultError, match=f"rotation to key id {NEW.key_id} is committed but not finished"):
            ForgetVault.open(root, NEW, writer=False)
        done = finish_rotation(root, tmp_path / "ledger")
        assert done is not None and done.entries == 4
        assert len(ForgetVault.open(root, NEW, writer=False).get(["r0", "r3"])[0]) == 2

    def test_a_reader_open_across_the_rotation_gets_a_clear_error(self, root: Path, tmp_path: Path) -> None:
        """A reader that opened the vault before the rotation and decrypts after it is told the KEK moved,
        not that the entry was tampered with."""
        reader = ForgetVault.open(root, OLD, writer=False)
        rotate_vault(root, OLD, NEW, tmp_path / "ledger")
        with pytest.raises(VaultKeyError, match="rotated while it was open"):
            reader.get(["r1"])

    def test_the_same_key_or_a_foreign_old_key_is_refused(self, root: Path, tmp_path: Path) -> None:
        with pytest.raises(VaultKeyError, match="already"):
            rotate_vault(root, OLD, OLD, tmp_path / "ledger")
        with pytest.raises(VaultKeyError, match="does not match"):
            rotate_vault(root, NEW, LocalKEK(bytes(range(2, 34))), tmp_path / "ledger")
        assert vault_key_id(root) == OLD.key_id and not list(root.rglob("*.next"))

    def test_a_variable_kek_cannot_be_destroyed_by_streamer(self) -> None:
        with pytest.raises(VaultKeyError, match="cannot destroy it"):
            dispose_kek(PrivacyConfig(kek_env="STREAMER_KEK"), OLD, 7)


class TestRotationLog:
    def test_rows_are_keyed_and_append_only(self, tmp_path: Path) -> None:
        """A rotation recorded twice (a crash between the row and the record's removal) is one row; a
        disposal likewise; rows can be neither updated nor deleted."""
        rotation = RotationRow("id1", OLD.key_id, NEW.key_id, 4, "2026-01-01T00:00:00.000Z",
                               "2026-01-01T00:00:01.000Z", "streamer kek rotate")
        disposal = DisposalRow(OLD.key_id, "erased", "2026-01-01T00:00:02.000Z", "2026-01-01T00:00:02.000Z", "gone")
        with RotationLog(tmp_path / "ledger") as log:
            for _ in range(2):
                log.record_rotation(rotation)
                log.record_disposal(disposal)
            assert log.rotations() == [rotation] and log.disposals() == [disposal]
        db = sqlite3.connect(tmp_path / "ledger")
        for statement in ("UPDATE rotations SET entries = 0", "DELETE FROM rotations",
                          "UPDATE kek_disposals SET how = 'x'", "DELETE FROM kek_disposals"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)
        db.close()
