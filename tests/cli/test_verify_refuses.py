"""Attacks on the checkpoint directory and the KEK through `streamer verify`, a real process.

The KEK file's mode is checked as ssh checks a private key's (others may not read it: refused,
one line, exit 2; its group may: a warning); the KEK must not be inside the checkpoint directory,
compared on resolved paths (a symlink does not hide it); and a manifest or a link planted in a
version directory cannot make streamer read a file outside it (which would print that file's
sha256, e.g. the KEK's, in the error)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from streamer.engine.models import digits_cnn
from streamer.state.checkpoints import CheckpointStore
from streamer.state.kek import generate_kek_file
from streamer.state.vault import ForgetVault


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("streamer: error: "), result.stderr
    return lines[0]


@pytest.fixture()
def directory(tmp_path: Path) -> Path:
    """config.yaml, weights, a KEK (0600) beside a checkpoint dir with v000000 and v000001."""
    net = digits_cnn()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    config = {"device": "cpu", "model": {"source": "reference:digits", "weights": "w.pt", "input_shape": [1, 8, 8]},
              "data": {"audit": None}, "checkpoints": {"dir": "ckpt"}, "privacy": {"kek_file": "kek.key"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    ForgetVault.open(tmp_path / "ckpt" / "vault", generate_kek_file(tmp_path / "kek.key"))
    store = CheckpointStore(tmp_path / "ckpt")
    store.publish(None, net.state_dict())
    store.publish("v000000", net.state_dict())
    return tmp_path


def _verify(directory: Path) -> subprocess.CompletedProcess:
    return _cli("verify", "--config", str(directory / "config.yaml"))


class TestKek:
    def test_a_kek_others_can_read_is_refused(self, directory: Path) -> None:
        """0644 (what a plain `cp` or umask 022 gives): one line naming the file and the fix, exit 2."""
        (directory / "kek.key").chmod(0o644)
        line = _one_error_line(_verify(directory))
        assert "kek.key is accessible by others (mode 0644)" in line and "chmod 600" in line

    def test_a_kek_its_group_can_read_is_a_warning(self, directory: Path) -> None:
        """0640 (a Kubernetes Secret with fsGroup): verify runs, and says so."""
        (directory / "kek.key").chmod(0o640)
        result = _verify(directory)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "kek_file_group_accessible" in result.stdout + result.stderr

    def test_a_kek_inside_the_checkpoint_dir_is_refused_through_a_symlink(self, directory: Path) -> None:
        """privacy.kek_file under a link to checkpoints.dir is inside it: a configuration error."""
        os.replace(directory / "kek.key", directory / "ckpt" / "kek.key")
        os.symlink(directory / "ckpt", directory / "elsewhere")
        config = yaml.safe_load((directory / "config.yaml").read_text())
        config["privacy"]["kek_file"] = "elsewhere/kek.key"
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        assert "is inside checkpoints.dir" in _one_error_line(_verify(directory))


class TestVersionDirectory:
    def test_a_manifest_cannot_point_the_model_file_outside_its_version(self, directory: Path) -> None:
        """model_file ../../kek.key (sha256 left as it was): refused by name, and the KEK's sha256
        is never printed."""
        kek_sha256 = hashlib.sha256((directory / "kek.key").read_bytes()).hexdigest()
        path = directory / "ckpt" / "v000001" / "manifest.json"
        manifest = json.loads(path.read_text())
        for model_format, model_file in (("state_dict", "../../kek.key"), ("export", "../../kek.key"),
                                         ("state_dict", "model.pt2")):
            path.write_text(json.dumps({**manifest, "model_format": model_format, "model_file": model_file}))
            result = _verify(directory)
            line = _one_error_line(result)
            assert f"model_file {model_file!r} is not" in line and kek_sha256 not in result.stdout + result.stderr

    def test_a_parent_that_is_not_a_version_name_is_refused(self, directory: Path) -> None:
        """parent ../../somewhere: refused by name, never followed."""
        path = directory / "ckpt" / "v000001" / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "parent": "../../somewhere"}))
        assert "parent '../../somewhere' is not a version name" in _one_error_line(_verify(directory))

    def test_a_model_file_replaced_by_a_symlink_is_not_read(self, directory: Path) -> None:
        """v000001/model.pt -> the KEK: refused (not read through a link), the KEK's sha256 never printed."""
        kek_sha256 = hashlib.sha256((directory / "kek.key").read_bytes()).hexdigest()
        model = directory / "ckpt" / "v000001" / "model.pt"
        model.unlink()
        os.symlink(directory / "kek.key", model)
        result = _verify(directory)
        assert "model.pt" in _one_error_line(result) and kek_sha256 not in result.stdout + result.stderr
