"""`streamer verify --attacks` on a checkpoint directory built with the real store.

The model is the digits CNN with random weights; v000001 retains 24 digits it misclassifies, so
plain verify passes (exit 0) and the attacks run against the base version v000000.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from streamer.engine.data import load_splits
from streamer.engine.models import digits_cnn
from streamer.state.checkpoints import CheckpointStore, ForgottenSet
from streamer.state.kek import generate_kek_file
from streamer.state.retained import next_refs
from streamer.state.vault import ForgetVault, VaultItem


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def directory(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = digits_cnn().eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    config = {"device": "cpu", "model": {"source": "reference:digits", "weights": "w.pt", "input_shape": [1, 8, 8]},
              "data": {"audit": {"builtin": "digits", "split": "audit"}}, "checkpoints": {"dir": "ckpt"},
              "privacy": {"kek_file": "kek.key"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train = load_splits("digits").train
    with torch.no_grad():
        wrong = (net(train.x).argmax(1) != train.y).nonzero().flatten()[:24]
    ids = [f"r{i}" for i in range(len(wrong))]
    forgotten = ForgottenSet(train.x[wrong], train.y[wrong], torch.full((len(wrong),), -1), tuple(ids))
    entries = [{"request_id": rid, "status": "forgotten", "reason": None, "topic": "t", "partition": 0, "offset": i,
                "subject": None} for i, rid in enumerate(ids)]
    store = CheckpointStore(tmp_path / "ckpt")
    store.publish(None, net.state_dict())
    vault = ForgetVault.open(tmp_path / "ckpt" / "vault", generate_kek_file(tmp_path / "kek.key"))
    stored = vault.put([VaultItem(rid, forgotten.x[i], int(forgotten.y[i]), -1) for i, rid in enumerate(ids)])
    refs = next_refs(forgotten, [True] * len(ids), (), {e.request_id: e for e in stored}, store.next_version())
    store.publish("v000000", net.state_dict(), refs, requests=entries)
    return tmp_path


def test_attacks_print_a_table_and_write_attacks_json(directory: Path) -> None:
    """Exit 0 as plain verify; the output names the reference and the held-out data; attacks.json
    holds every metric beside the reference's; the manifest is left as it was."""
    manifest = directory / "ckpt" / "v000001" / "manifest.json"
    before = manifest.read_bytes()
    result = _cli("verify", "--attacks", "--config", str(directory / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OK: every request" in out
    assert "reference: original model v000000 (no retrained reference available)" in out
    assert "data.audit (digits:audit, 360 instances)" in out and "24 retained instances" in out
    assert "| Streisand AUC |" in out and "relearning, 50 Adam steps" in out and "manifest is not rewritten" in out
    data = json.loads((directory / "ckpt" / "v000001" / "attacks.json").read_text())
    assert data["version"] == "v000001" and data["reference"] == "v000000"
    assert data["forget_accuracy"] == {"model": 0.0, "reference": 0.0}  # same weights: same numbers
    assert data["streisand_auc"]["model"] == data["streisand_auc"]["reference"]
    assert set(data["relearn"]) == {"5", "20", "50"} and data["notes"]
    assert manifest.read_bytes() == before
    assert _cli("verify", "--config", str(directory / "config.yaml")).returncode == 0  # attacks.json is not damage


def test_attacks_without_audit_data_is_one_error_line(directory: Path) -> None:
    """No data.audit: exit 2 with one line saying what is missing."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["data"]["audit"] = None
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    result = _cli("verify", "--attacks", "--config", str(directory / "config.yaml"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("streamer: error: ")
    assert "data.audit" in result.stderr and "Traceback" not in result.stderr
