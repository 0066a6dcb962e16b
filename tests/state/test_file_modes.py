"""File modes: what holds secrets or personal data is the owner's alone, whatever the umask.

The attack is another local user (or a serving process in the files' group) reading the checkpoint
directory: vault ciphertexts and wrapped DEKs, the vault index, the ledger with its -wal and -shm
(subjects, request ids), manifests, operator request files. Each test runs under umask 022, as a
careless environment would, and checks every path the code created."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from streamer.state import LEDGER_FILE, CheckpointStore, DirectoryLock, ForgetVault, Ledger, RequestOutcome, VaultItem
from streamer.state.kek import LocalKEK
from streamer.state.operations import answer_request, take_request
from streamer.state.durable import write_atomic

KEK = LocalKEK(bytes(range(32)))


@pytest.fixture(autouse=True)
def careless_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Every path under root (root included) -> its permission bits."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.lstat().st_mode) for p in paths}


def _fill(root: Path, group_readable: bool = False) -> None:
    """A checkpoint directory as the daemon leaves it: versions, CURRENT, a vault entry, ledger rows
    (with -wal and -shm while open), the lock, a request answered."""
    store = CheckpointStore(root, group_readable=group_readable)
    store.recover()
    lock = DirectoryLock(root)
    assert lock.acquire()
    store.publish(None, {"w": torch.zeros(2)})
    store.publish("v000000", {"w": torch.ones(2)}, requests=[{"request_id": "r1", "status": "forgotten",
                                                               "subject": "alice", "topic": "t", "partition": 0,
                                                               "offset": 0}])
    vault = ForgetVault.open(root / "vault", KEK)
    vault.put([VaultItem("r1", torch.rand(1, 4, 4), 3, -1)])
    ledger = Ledger(root / LEDGER_FILE)
    ledger.append([RequestOutcome(status="forgotten", request_id="r1", version="v000001", reason=None, topic="t",
                                  partition=0, offset=0, subject="alice", completed_at="2026-01-01T00:00:00.000Z")])
    assert (root / f"{LEDGER_FILE}-wal").exists()
    answer_request(root, "ROLLBACK", {"id": "0" * 32}, {"ok": True})
    return ledger, lock


class TestOwnerOnly:
    def test_everything_a_writer_creates_is_owner_only(self, tmp_path: Path) -> None:
        """Under umask 022, no file the store, vault, ledger, lock or operations create has a group or
        other bit: files 0600, directories 0700."""
        root = tmp_path / "ckpt"
        ledger, lock = _fill(root)
        try:
            modes = _modes(root)
        finally:
            ledger.close()
            lock.release()
        wide = {p: oct(m) for p, m in modes.items() if m & 0o077}
        assert wide == {}
        assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o700}
        assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o600}
        assert any("vault/keys/" in p for p in modes) and any(p.endswith("-shm") for p in modes)

    def test_group_readable_shares_published_versions_only(self, tmp_path: Path) -> None:
        """checkpoints.group_readable: versions and CURRENT are 0640 (directories 0750) for a serving
        process in the group; the vault, the ledger, the lock and request files stay owner-only."""
        root = tmp_path / "ckpt"
        ledger, lock = _fill(root, group_readable=True)
        try:
            modes = _modes(root)
        finally:
            ledger.close()
            lock.release()
        published = {p: m for p, m in modes.items() if p.startswith(("ckpt/v0", "ckpt/CURRENT")) or p == "ckpt"}
        assert published and all(m in (0o640, 0o750) and m & 0o007 == 0 for m in published.values()), published
        private = {p: oct(m) for p, m in modes.items() if p not in published and m & 0o077}
        assert private == {}

    def test_files_from_before_modes_are_tightened_at_start(self, tmp_path: Path) -> None:
        """A directory written world-readable (by an earlier release) is tightened when the writer
        starts: the store's recover, the vault writer's open and the ledger's open."""
        root = tmp_path / "ckpt"
        ledger, lock = _fill(root)
        ledger.close()
        lock.release()
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        CheckpointStore(root).recover()
        ForgetVault.open(root / "vault", KEK)
        Ledger(root / LEDGER_FILE).close()
        left = {p: oct(m) for p, m in _modes(root).items() if m & 0o077}
        assert left == {}

    def test_atomic_writes_never_go_through_a_planted_symlink(self, tmp_path: Path) -> None:
        """A symlink planted where a request or answer goes is replaced, not written through, and a
        request file that is a symlink is not read."""
        victim = tmp_path / "victim"
        victim.write_text("keep me")
        root = tmp_path / "ckpt"
        root.mkdir()
        os.symlink(victim, root / "ROLLBACK.result.json")
        answer_request(root, "ROLLBACK", {"id": "1" * 32}, {"ok": True})
        assert victim.read_text() == "keep me" and not (root / "ROLLBACK.result.json").is_symlink()
        os.symlink(victim, root / "ROLLBACK.request.json")
        assert take_request(root, "ROLLBACK") == {"id": None} and victim.read_text() == "keep me"
        write_atomic(root / "x.json", b"{}")
        assert stat.S_IMODE((root / "x.json").stat().st_mode) == 0o600
