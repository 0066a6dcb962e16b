"""Paths taken from files an attacker may edit: no path from a request file or a manifest leaves
the checkpoint directory, and nothing is read, written or erased through a planted symlink."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from streamer.state import CheckpointError, CheckpointStore, ForgetVault, VaultItem
from streamer.state.kek import LocalKEK
from streamer.state.operations import (OperationRefused, answer_request, request_via_daemon, staged_file,
                                       take_request)
from streamer.state.vault_layout import DATA_DIR, KEYS_DIR, _file_id

KEK = LocalKEK(bytes(range(32)))


class TestOperatorRequests:
    def test_a_rebase_request_names_copies_inside_the_directory(self, tmp_path: Path) -> None:
        """The command copies its files in; the daemon's side reads those copies only, and they are
        gone once answered."""
        root, weights, excluded = tmp_path / "ckpt", tmp_path / "new.pt", tmp_path / "excluded.json"
        root.mkdir()
        weights.write_bytes(b"weights")
        excluded.write_text("{}")
        seen: dict[str, bytes] = {}

        def daemon() -> None:
            while (request := take_request(root, "REBASE")) is None:
                threading.Event().wait(0.05)
            for key in ("weights", "excluded"):
                seen[key] = staged_file(root, "REBASE", request, key).read_bytes()
            answer_request(root, "REBASE", request, {"ok": True})

        thread = threading.Thread(target=daemon)
        thread.start()
        answer = request_via_daemon(root, "REBASE", {"weights_given": str(weights)}, 10,
                                    files={"weights": weights, "excluded": excluded})
        thread.join()
        assert answer["ok"] and seen == {"weights": b"weights", "excluded": b"{}"}
        assert sorted(p.name for p in root.iterdir()) == ["REBASE.result.json"]

    def test_staged_files_no_pending_request_names_are_removed_at_start(self, tmp_path: Path) -> None:
        """A daemon killed while carrying out a rebase leaves the staged copies: the next start removes
        them, but not those of a request still pending."""
        from streamer.state import remove_stale_staged
        root = tmp_path / "ckpt"
        root.mkdir()
        for request_id in ("a" * 32, "b" * 32):
            (root / f"REBASE.{request_id}.weights").write_bytes(b"w")
        (root / "REBASE.request.json").write_text(json.dumps({"id": "b" * 32}))
        assert remove_stale_staged(root) == [f"REBASE.{'a' * 32}.weights"]
        assert (root / f"REBASE.{'b' * 32}.weights").exists()

    @pytest.mark.parametrize("name", ["/etc/passwd", "../kek.key", "REBASE.{other}.weights", "REBASE.{id}.weights"],
                             ids=["absolute", "dotdot", "another request's", "a symlink"])
    def test_a_request_naming_anything_else_is_refused(self, tmp_path: Path, name: str) -> None:
        """A request file written by hand (or by an attacker with the directory) that names a path, a
        relative escape, another request's file or a symlink is refused, nothing read."""
        root = tmp_path / "ckpt"
        root.mkdir()
        request = {"id": "a" * 32, "weights": name.format(id="a" * 32, other="b" * 32)}
        (root / f"REBASE.{'b' * 32}.weights").write_bytes(b"other")
        os.symlink(tmp_path / "kek.key", root / f"REBASE.{'a' * 32}.weights")
        (tmp_path / "kek.key").write_bytes(b"secret")
        with pytest.raises(OperationRefused):
            staged_file(root, "REBASE", request, "weights")


class TestStoreAndVault:
    def test_a_version_directory_that_is_a_symlink_is_not_a_version(self, tmp_path: Path) -> None:
        """v000002 -> a directory elsewhere is neither listed nor loaded."""
        store = CheckpointStore(tmp_path / "ckpt")
        store.publish(None, {"w": torch.zeros(1)})
        elsewhere = tmp_path / "elsewhere"
        os.rename(store.path("v000000"), elsewhere)
        os.symlink(elsewhere, store.path("v000000"))
        assert store.versions() == []
        with pytest.raises(CheckpointError, match="no version v000000"):
            store.load("v000000")

    def test_a_manifest_naming_a_version_outside_is_refused(self, tmp_path: Path) -> None:
        """A manifest's version or parent that is not a version name never becomes a path."""
        store = CheckpointStore(tmp_path / "ckpt")
        store.publish(None, {"w": torch.zeros(1)})
        path = store.path("v000000") / "manifest.json"
        data = json.loads(path.read_text())
        for key, value in (("parent", "../../elsewhere"), ("version", "../v000000")):
            path.write_text(json.dumps({**data, key: value}))
            with pytest.raises(CheckpointError, match="is not a version name"):
                store.lineage("v000000")

    def test_a_shred_never_erases_through_a_planted_symlink(self, tmp_path: Path) -> None:
        """An entry's files replaced by links to another file: the shred removes the links and leaves
        the other file as it was (a crypto-shred must never be a way to zero someone's file)."""
        vault = ForgetVault.open(tmp_path / "vault", KEK)
        vault.put([VaultItem("r", torch.rand(1, 4, 4), 1, -1)])
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        for directory, suffix in ((KEYS_DIR, ".dek"), (DATA_DIR, ".bin")):
            path = tmp_path / "vault" / directory / f"{_file_id('r')}{suffix}"
            path.unlink()
            os.symlink(victim, path)
        vault.shred("r", None)
        assert victim.read_bytes() == b"precious"
        assert [p for d in (KEYS_DIR, DATA_DIR) for p in (tmp_path / "vault" / d).iterdir()] == []
