"""`streamer kek rotate` as a subprocess on a real vault: every live entry re-wrapped under the new KEK
exactly once, kill -9 at every step then a rerun, the ledger's record, the old KEK destroyed and a
backup of the vault taken before the rotation unreadable; file and KMS KEKs (a real KMS server,
conftest `aws_server`)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aws_server import AwsServer
from streamer.config import KmsKeyConfig, load_config
from streamer.pipeline.faults import ROTATION_CRASH_POINTS
from streamer.state import DirectoryLock, open_vault
from streamer.state.kek import VaultKeyError, generate_kek_file, kek_from_file
from streamer.state.kms import KmsKEK
from streamer.state.ledger import LEDGER_FILE
from streamer.state.rotation import finish_rotation
from streamer.state.rotation_log import RotationLog
from streamer.state.vault import CHECK_FILE, DATA_DIR, KEYS_DIR, ForgetVault, VaultItem, read_index

SHAPE = (1, 8, 8)
COMMITTED = set(ROTATION_CRASH_POINTS) - {"rotate_mid_stage", "rotate_after_stage"}  # at or after ROTATION.json


def _items(n: int) -> list[VaultItem]:
    g = torch.Generator().manual_seed(7)
    return [VaultItem(f"req-{i}", torch.rand(SHAPE, generator=g), i % 10, -1) for i in range(n)]


def _setup(tmp_path: Path, entries: int = 6, shredded: int = 1) -> Path:
    """A config whose privacy section names keys/old.key, a vault under it with `entries` entries of which
    the first `shredded` are shredded, and keys/new.key beside it."""
    keys = tmp_path / "keys"
    old, _ = generate_kek_file(keys / "old.key"), generate_kek_file(keys / "new.key")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": "reference:digits", "weights": str(tmp_path / "unused.pt")},
        "checkpoints": {"dir": "checkpoints"}, "privacy": {"kek_file": "keys/old.key"}}))
    vault = ForgetVault.open(_vault(tmp_path), old)
    vault.put(_items(entries))
    vault.shred_many([(f"req-{i}", None) for i in range(shredded)])
    return config


def _rotate(config: Path, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STREAMER_CRASH_AT"}
    if crash:
        env["STREAMER_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "streamer", "kek", "rotate", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def _vault(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints" / "vault"


def _live(vault: Path) -> list[str]:
    return [e.request_id for e in read_index(vault) if not e.shredded]


def _under(vault: Path, keks: dict) -> dict[str, list[str]]:
    """For each live entry: the names of the KEKs its keys/<id>.dek unwraps under."""
    out = {}
    for rid in _live(vault):
        wrapped = (vault / KEYS_DIR / f"{hashlib.sha256(rid.encode()).hexdigest()}.dek").read_bytes()
        out[rid] = []
        for name, kek in keks.items():
            try:
                kek.unwrap(wrapped)
                out[rid].append(name)
            except VaultKeyError:
                pass
    return out


def _content(vault: Path, kek) -> dict[str, tuple]:
    v = ForgetVault.open(vault, kek, writer=False)
    x, y, target = v.get(_live(vault))
    return {rid: (x[i], int(y[i]), int(target[i])) for i, rid in enumerate(_live(vault))}


def _rotations(tmp_path: Path) -> list:
    with RotationLog(tmp_path / "checkpoints" / LEDGER_FILE) as log:
        return log.rotations()


def _opens_as_writer(tmp_path: Path, kek, copy: Path) -> bool:
    """Whether a writer (the daemon's start) opens a copy of the checkpoint directory with `kek`."""
    shutil.copytree(tmp_path / "checkpoints", copy)
    finish_rotation(copy / "vault", copy / LEDGER_FILE)
    try:
        ForgetVault.open(copy / "vault", kek)
        return True
    except VaultKeyError:
        return False


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("streamer: error: "), out.stderr
    return lines[0]


class TestRotateFiles:
    def test_every_live_entry_is_rewrapped_once_and_nothing_else_changes(self, tmp_path: Path) -> None:
        """File -> file: each live entry's wrapped DEK opens under the new KEK only, the ciphertexts and the
        index are byte for byte as they were, the content decrypts bitwise, one ledger row; the daemon's
        start refuses the old KEK naming the rotation; a rerun changes nothing."""
        config = _setup(tmp_path)
        vault, keys = _vault(tmp_path), tmp_path / "keys"
        old, new = kek_from_file(keys / "old.key"), kek_from_file(keys / "new.key")
        before = {p: p.read_bytes() for p in [*(vault / DATA_DIR).iterdir(), vault / "index.json"]}
        content = _content(vault, old)

        out = _rotate(config, "--to-file", str(keys / "new.key"))
        assert out.returncode == 0, out.stderr
        assert f"from KEK {old.key_id} to {new.key_id}: 5 live entries re-wrapped" in out.stdout
        assert f"now set in the config, in place of the old KEK: privacy.kek_file: {keys / 'new.key'}" in out.stdout
        assert "the old KEK still exists" in out.stdout
        assert _under(vault, {"old": old, "new": new}) == {rid: ["new"] for rid in content}
        assert {p: p.read_bytes() for p in before} == before
        assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(_content(vault, new).values(),
                                                                             content.values()))
        assert sorted(p.name for p in vault.iterdir()) == sorted([CHECK_FILE, DATA_DIR, "index.json", KEYS_DIR])
        [row] = _rotations(tmp_path)
        assert (row.old_key_id, row.new_key_id, row.entries, row.finished_by) == (
            old.key_id, new.key_id, 5, "streamer kek rotate")
        with pytest.raises(VaultKeyError, match=f"rotated away from key id {old.key_id}"):
            open_vault(load_config(config), writer=True)

        again = _rotate(config, "--to-file", str(keys / "new.key"))
        assert again.returncode == 0 and "nothing to re-wrap" in again.stdout, again.stderr
        assert len(_rotations(tmp_path)) == 1

    @pytest.mark.parametrize("point", ROTATION_CRASH_POINTS)
    def test_kill_9_at_each_step_then_a_rerun(self, tmp_path: Path, point: str) -> None:
        """SIGKILL at `point`: the daemon's start would open the vault with exactly one of the two KEKs
        (the old before the commit point, the new from it on); rerunning the command finishes the job:
        every live entry under the new KEK only (none under both or neither), no staged file or record
        left, one ledger row, the content bitwise as before."""
        config = _setup(tmp_path)
        vault, keys = _vault(tmp_path), tmp_path / "keys"
        old, new = kek_from_file(keys / "old.key"), kek_from_file(keys / "new.key")
        content = _content(vault, old)
        crashed = _rotate(config, "--to-file", str(keys / "new.key"), crash=point)
        assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
        assert f'"point": "{point}"' in crashed.stdout

        opens = {name: _opens_as_writer(tmp_path, kek, tmp_path / f"copy-{name}") for name, kek in
                 (("old", old), ("new", new))}
        assert opens == {"old": point not in COMMITTED, "new": point in COMMITTED}
        if point not in COMMITTED:  # the live files are untouched: every entry is still the old KEK's alone
            assert _under(vault, {"old": old, "new": new}) == {rid: ["old"] for rid in content}

        rerun = _rotate(config, "--to-file", str(keys / "new.key"))
        assert rerun.returncode == 0, rerun.stderr
        assert ("finished an interrupted rotation" in rerun.stdout) == (point in COMMITTED - {"rotate_after_finish"})
        assert _under(vault, {"old": old, "new": new}) == {rid: ["new"] for rid in content}
        assert not [p for p in vault.rglob("*") if p.name.endswith(".next") or p.name == "ROTATION.json"]
        assert [(r.old_key_id, r.new_key_id, r.entries) for r in _rotations(tmp_path)] == [(old.key_id, new.key_id, 5)]
        assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(_content(vault, new).values(),
                                                                             content.values()))

    def test_the_daemons_start_finishes_a_committed_rotation(self, tmp_path: Path) -> None:
        """Killed right after the commit point, then the daemon starts with the new KEK in its config: its
        vault open renames what is left and writes the ledger row itself."""
        config = _setup(tmp_path)
        keys, vault = tmp_path / "keys", _vault(tmp_path)
        assert _rotate(config, "--to-file", str(keys / "new.key"), crash="rotate_after_record").returncode == -9
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "privacy": {"kek_file": "keys/new.key"}}))
        opened = open_vault(load_config(config), writer=True)
        assert len(opened) == 5 and not (vault / "ROTATION.json").exists()
        assert opened.finished_rotation is not None and opened.finished_rotation.entries == 5  # logged by the daemon
        assert [r.finished_by for r in _rotations(tmp_path)] == ["the daemon's start"]
        new = kek_from_file(keys / "new.key")
        assert set(map(tuple, _under(vault, {"new": new, "old": kek_from_file(keys / "old.key")}).values())) == {("new",)}

    def test_destroying_the_old_kek_makes_a_backup_taken_before_unreadable(self, tmp_path: Path) -> None:
        """A copy of vault/ taken before the rotation opens with the old KEK; after `--destroy-old` the old
        key file is gone (zeroed, unlinked) and the copy's wrapped DEKs open under nothing that exists: the
        new KEK refuses its key check and every one of its wrapped keys. The ledger records the disposal."""
        config = _setup(tmp_path)
        keys, vault = tmp_path / "keys", _vault(tmp_path)
        backup = shutil.copytree(vault, tmp_path / "backup-of-vault")
        assert len(_content(backup, kek_from_file(keys / "old.key"))) == 5  # a real, readable backup
        old_id, new = kek_from_file(keys / "old.key").key_id, kek_from_file(keys / "new.key")

        out = _rotate(config, "--to-file", str(keys / "new.key"), "--destroy-old")
        assert out.returncode == 0, out.stderr
        assert "overwritten with zeros, fsynced and unlinked" in out.stdout and "cannot be read any more" in out.stdout
        assert not (keys / "old.key").exists()
        with pytest.raises(VaultKeyError, match="cannot read the KEK file"):
            kek_from_file(keys / "old.key")
        with pytest.raises(VaultKeyError, match=f"key id {old_id}; given key id {new.key_id}"):
            ForgetVault.open(backup, new, writer=False)
        assert _under(backup, {"new": new}) == {rid: [] for rid in _live(backup)}
        assert len(_content(vault, new)) == 5
        with RotationLog(tmp_path / "checkpoints" / LEDGER_FILE) as log:
            [disposal] = log.disposals()
        assert (disposal.key_id, disposal.how) == (old_id, "erased")


class TestRefusals:
    def test_refused_while_the_daemon_holds_the_directory(self, tmp_path: Path) -> None:
        config = _setup(tmp_path)
        lock = DirectoryLock(tmp_path / "checkpoints")
        assert lock.acquire()
        try:
            line = _one_error_line(_rotate(config, "--to-file", str(tmp_path / "keys" / "new.key")))
        finally:
            lock.release()
        assert "stop it first" in line
        assert not _rotations(tmp_path) and (tmp_path / "keys" / "old.key").exists()

    def test_a_wrong_old_kek_or_a_damaged_entry_changes_nothing(self, tmp_path: Path) -> None:
        """The config names a KEK that is not the vault's: refused at the key check. A live entry whose
        wrapped key is damaged: refused before the commit point, staged files erased, the vault as it was."""
        config = _setup(tmp_path)
        keys, vault = tmp_path / "keys", _vault(tmp_path)
        generate_kek_file(keys / "stranger.key")
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "privacy": {"kek_file": "keys/stranger.key"}}))
        assert "does not match the vault's" in _one_error_line(_rotate(config, "--to-file", str(keys / "new.key")))
        config.write_text(yaml.safe_dump(raw))
        damaged = vault / KEYS_DIR / f"{hashlib.sha256(b'req-3').hexdigest()}.dek"
        damaged.write_bytes(bytes(40))
        before = {p: p.read_bytes() for p in vault.rglob("*") if p.is_file()}
        line = _one_error_line(_rotate(config, "--to-file", str(keys / "new.key")))
        assert "'req-3'" in line and "Nothing was rotated" in line
        assert {p: p.read_bytes() for p in vault.rglob("*") if p.is_file()} == before
        assert not _rotations(tmp_path)

    def test_usage_and_a_key_file_inside_the_checkpoint_directory(self, tmp_path: Path) -> None:
        config = _setup(tmp_path)
        assert "go with --to-kms" in _one_error_line(_rotate(config, "--to-file", "x", "--kms-region", "eu-west-1"))
        inside = tmp_path / "checkpoints" / "new.key"
        generate_kek_file(inside)
        assert "is inside checkpoints.dir" in _one_error_line(_rotate(config, "--to-file", str(inside)))


class TestRotateKms:
    def test_file_to_kms_then_kms_to_kms_with_the_old_key_scheduled_for_deletion(
            self, tmp_path: Path, aws_server: AwsServer) -> None:
        """file -> KMS key A (old file erased), then A -> KMS key B with A scheduled for deletion: every live
        entry under exactly the current KEK after each; a backup taken under A is refused by A (deletion
        pending) and its wrapped keys do not open under B; a disabled target key is refused first."""
        config = _setup(tmp_path)
        keys, vault, url = tmp_path / "keys", _vault(tmp_path), aws_server.endpoint_url
        old = kek_from_file(keys / "old.key")
        a, b, disabled = aws_server.create_kms_key("A"), aws_server.create_kms_key("B"), aws_server.create_kms_key()
        aws_server.client("kms").disable_key(KeyId=disabled.rsplit("/", 1)[1])
        line = _one_error_line(_rotate(config, "--to-kms", disabled, "--kms-endpoint-url", url))
        assert "is Disabled, not Enabled" in line and not _rotations(tmp_path)

        out = _rotate(config, "--to-kms", a, "--kms-endpoint-url", url, "--destroy-old")
        assert out.returncode == 0, out.stderr
        assert f"privacy.kek_kms: {{key_id: {a}, endpoint_url: {url}}}" in out.stdout
        kms_a = KmsKEK(KmsKeyConfig(a, None, url))
        assert not (keys / "old.key").exists()
        assert _under(vault, {"old": old, "a": kms_a}) == {rid: ["a"] for rid in _live(vault)}

        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "privacy": {"kek_kms": {"key_id": a, "endpoint_url": url}}}))
        assert len(open_vault(load_config(config), writer=True)) == 5  # the daemon's start, on key A
        backup = shutil.copytree(vault, tmp_path / "backup-under-a")
        out = _rotate(config, "--to-kms", b, "--kms-endpoint-url", url, "--destroy-old", "--pending-window-days", "7")
        assert out.returncode == 0, out.stderr
        assert "KMS refuses the key from now on and deletes it on" in out.stdout
        kms_b = KmsKEK(KmsKeyConfig(b, None, url))
        assert _under(vault, {"a": kms_a, "b": kms_b}) == {rid: ["b"] for rid in _live(vault)}
        state = aws_server.client("kms").describe_key(KeyId=a)["KeyMetadata"]["KeyState"]
        assert state == "PendingDeletion"
        with pytest.raises(VaultKeyError, match="PendingDeletion"):
            KmsKEK(KmsKeyConfig(a, None, url))
        assert _under(backup, {"b": kms_b}) == {rid: [] for rid in _live(backup)}
        assert [(r.old_key_id, r.new_key_id) for r in _rotations(tmp_path)] == [
            (old.key_id, kms_a.key_id), (kms_a.key_id, kms_b.key_id)]
        with RotationLog(tmp_path / "checkpoints" / LEDGER_FILE) as log:
            assert [d.how for d in log.disposals()] == ["erased", "deletion_scheduled"]
