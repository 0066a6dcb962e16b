"""A damaged checkpoint directory: every command answers with one line and the documented exit code.

verify: 0 = everything checks out, 1 = instances came back, 2 = cannot verify (the damaged or
missing file named in one line). The directory is built with the real store and ledger; the
model is the digits CNN with random weights (verify's mechanics do not need a trained one).
"""
from __future__ import annotations

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
from streamer.state.ledger import LEDGER_FILE, Ledger
from streamer.state.outcome import RequestOutcome


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def directory(tmp_path: Path) -> Path:
    """config.yaml, weights, and a checkpoint dir with v000000 and v000001 and a ledger row."""
    torch.manual_seed(0)
    net = digits_cnn()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    config = {"device": "cpu", "model": {"source": "reference:digits", "weights": "w.pt", "input_shape": [1, 8, 8]},
              "data": {"audit": None}, "checkpoints": {"dir": "ckpt"}, "privacy": {"kek_file": "kek.key"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    ForgetVault.open(tmp_path / "ckpt" / "vault", generate_kek_file(tmp_path / "kek.key"))  # an empty vault
    store = CheckpointStore(tmp_path / "ckpt")
    store.publish(None, net.state_dict())
    store.publish("v000000", net.state_dict(), requests=[])
    with Ledger(tmp_path / "ckpt" / LEDGER_FILE) as ledger:
        ledger.append([RequestOutcome(status="rejected", request_id="x", version=None, reason="r", topic="t", partition=0,
                               offset=0, subject=None, completed_at="2026-01-01T00:00:00.000Z")])
    return tmp_path


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("streamer: error: "), result.stderr
    return lines[-1]


def test_an_intact_directory_verifies(directory: Path) -> None:
    """The control: the same directory undamaged verifies with exit 0."""
    result = _cli("verify", "--config", str(directory / "config.yaml"))
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_a_corrupt_base_model_is_named(directory: Path) -> None:
    """A flipped byte in v000000's model file (the distillation teacher) fails verify with exit 2 naming it."""
    path = directory / "ckpt" / "v000000" / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "v000000/model.pt" in _one_error_line(_cli("verify", "--config", str(directory / "config.yaml")))


def test_corrupt_ledger_pages_are_one_line_and_exit_2(directory: Path) -> None:
    """A ledger overwritten with garbage is 'cannot verify' (2), not 'instances came back' (1)."""
    ledger = directory / "ckpt" / LEDGER_FILE
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    ledger.write_bytes(b"SQLite format 3\x00" + b"\x07" * 8192)
    assert "ledger" in _one_error_line(_cli("verify", "--config", str(directory / "config.yaml")))


def test_a_missing_current_is_called_damage(directory: Path) -> None:
    """Without CURRENT but with versions, verify and list say the directory is damaged and how to repair it."""
    (directory / "ckpt" / "CURRENT").unlink()
    for args in (("verify",), ("checkpoints", "list")):
        line = _one_error_line(_cli(*args, "--config", str(directory / "config.yaml")))
        assert "CURRENT" in line and "damaged" in line and "v000001" in line


def test_an_orphan_version_is_never_shown_as_lineage(directory: Path) -> None:
    """A version written but never made CURRENT (a failed switch) is listed as an orphan."""
    store = CheckpointStore(directory / "ckpt")
    store.publish("v000001", torch.load(directory / "w.pt"))
    store.switch("v000001")  # as if the switch to v000002 never happened
    listing = _cli("checkpoints", "list", "--config", str(directory / "config.yaml"))
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("| v000002"))
    assert "orphan" in row and "lineage |" not in row
    assert store.orphans() == ["v000002"]


def test_an_abandoned_request_is_its_own_category(directory: Path) -> None:
    """A request that left the retained set (goal out of reach) is listed ABANDONED, not CAME BACK, and verify passes."""
    store = CheckpointStore(directory / "ckpt")
    entry = {"request_id": "a", "status": "failed", "reason": "step cap", "topic": "t", "partition": 0, "offset": 1,
             "subject": None}
    weights = torch.load(directory / "w.pt")
    store.publish("v000001", weights, requests=[entry])
    store.publish("v000002", weights,
                  abandoned=[{**entry, "status": "abandoned", "reason": "goal still missed"}])
    result = _cli("verify", "--config", str(directory / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ABANDONED: 1 requests" in result.stdout and "CAME BACK" not in result.stdout


def test_a_version_that_does_not_exist_is_named(directory: Path) -> None:
    """verify and checkpoints show on a version never written: one line naming it and what exists, exit 2."""
    for args in (("verify", "v000042"), ("checkpoints", "show", "v000042")):
        line = _one_error_line(_cli(*args, "--config", str(directory / "config.yaml")))
        assert "no version v000042" in line and "v000000..v000001" in line
