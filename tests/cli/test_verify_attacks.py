"""`streamer verify --attacks` on a checkpoint directory built with the real store.

The model is the digits CNN with random weights; v000001 retains 24 digits it misclassifies, so
plain verify passes (exit 0) and the attacks run against the base version v000000 (or a
--reference file).
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


def test_attacks_print_a_table_and_record_a_summary(directory: Path) -> None:
    """Exit 0 as plain verify; the output names the held-out data, the forgotten set, the MIA's
    shadow and the reference; attacks.json holds every metric beside the reference's; the manifest
    gains a summary (every other field unchanged) that `checkpoints show` displays."""
    config = str(directory / "config.yaml")
    manifest = directory / "ckpt" / "v000001" / "manifest.json"
    before = json.loads(manifest.read_text())
    result = _cli("verify", "--attacks", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OK: every request" in out
    assert "reference: original model v000000 (no retrained reference given: --reference FILE)" in out
    assert "held-out data: data.audit (digits:audit, 360 instances)" in out and "relearning fine-tunes on 256" in out
    assert "forgotten: 24 instances of the retained forgotten set" in out and "shadow model: original model" in out
    assert "| Streisand AUC |" in out and "relearning, 50 Adam steps" in out and "| probe recovery (pre-head" in out
    assert "note: probe: pre-head = input of net.6 (1024 features), penultimate = input of net.8 (32 features)" in out
    data = json.loads((directory / "ckpt" / "v000001" / "attacks.json").read_text())
    assert data["version"] == "v000001" and data["reference"] == "v000000" and data["reference_kind"] == "original"
    assert data["forget_accuracy"] == {"model": 0.0, "reference": 0.0}  # same weights: same numbers
    assert data["streisand_auc"]["model"] == data["streisand_auc"]["reference"]
    assert set(data["relearn"]) == {"5", "20", "50"} and data["notes"]
    after = json.loads(manifest.read_text())
    (entry,) = after.pop("attacks")
    assert after == before
    assert entry["reference"]["kind"] == "original" and entry["reference"]["name"] == "v000000"
    assert entry["held_out"] == "data.audit (digits:audit, 360 instances)" and entry["forgotten"] == 24
    assert set(entry["metrics"]) == {"forget_accuracy", "probe_recovery", "probe_recovery_prehead", "relearn_50",
                                     "mia_efficacy", "loss_auc", "streisand_auc"}
    assert entry["metrics"]["probe_recovery_prehead"] == data["probe_recovery_prehead"]
    shown = _cli("checkpoints", "show", "v000001", "--config", config)
    assert json.loads(shown.stdout)["attacks"] == [entry]
    assert _cli("verify", "--config", config).returncode == 0  # attacks.json and the summary are not damage


def test_a_retrained_reference_is_loaded_and_recorded(directory: Path) -> None:
    """--reference FILE: a state_dict of the configured network; the output and the manifest name it.
    (Held-out data: 80 audit digits in a file, to keep the run short.)"""
    torch.manual_seed(1)
    torch.save(digits_cnn().state_dict(), directory / "retrained.pt")
    audit = load_splits("digits").audit
    torch.save({"x": audit.x[:80], "y": audit.y[:80]}, directory / "audit80.pt")
    settings = yaml.safe_load((directory / "config.yaml").read_text())
    settings["data"]["audit"] = {"path": "audit80.pt"}
    (directory / "config.yaml").write_text(yaml.safe_dump(settings))
    config = str(directory / "config.yaml")
    result = _cli("verify", "--attacks", "--reference", str(directory / "retrained.pt"), "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reference: retrained model {directory / 'retrained.pt'} (state_dict, sha256 " in result.stdout
    assert "| attack | v000001 | reference (retrained) | reading |" in result.stdout
    (entry,) = json.loads(_cli("checkpoints", "show", "v000001", "--config", config).stdout)["attacks"]
    assert entry["reference"]["kind"] == "retrained" and entry["reference"]["name"] == str(directory / "retrained.pt")
    assert entry["metrics"]["forget_accuracy"]["model"] == 0.0


def test_a_bad_reference_is_one_error_line(directory: Path) -> None:
    """A file that is no weights file, one of another network, a missing one, or --reference without
    --attacks: exit 2 with one error line, before anything runs; the manifest is untouched."""
    config = str(directory / "config.yaml")
    manifest = directory / "ckpt" / "v000001" / "manifest.json"
    before = manifest.read_bytes()
    (directory / "junk.pt").write_bytes(b"not a model")
    torch.save(torch.nn.Linear(3, 2).state_dict(), directory / "other.pt")
    for name, says in (("junk.pt", "not a state_dict"), ("other.pt", "do not fit the model"),
                       ("missing.pt", "cannot read it")):
        result = _cli("verify", "--attacks", "--reference", str(directory / name), "--config", config)
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("streamer: error: --reference") and says in line and name in line
    result = _cli("verify", "--reference", str(directory / "junk.pt"), "--config", config)
    assert result.returncode == 2 and "--reference goes with --attacks" in result.stderr
    assert manifest.read_bytes() == before


def test_attacks_without_audit_data_is_one_error_line(directory: Path) -> None:
    """No data.audit: exit 2 with one line saying what is missing."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["data"]["audit"] = None
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    result = _cli("verify", "--attacks", "--config", str(directory / "config.yaml"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("streamer: error: ")
    assert "data.audit" in result.stderr and "Traceback" not in result.stderr


def test_a_torchscript_reference_is_loaded_as_the_configured_format(directory: Path) -> None:
    """model.format torchscript: --reference must be a TorchScript file, loaded as its user loads it;
    a state_dict there is one ModelLoadError naming the format and the file."""
    from streamer.cli.attacks import retrained_reference
    from streamer.config import parse_config
    from streamer.errors import ModelLoadError

    torch.manual_seed(2)
    net = digits_cnn().eval()
    torch.jit.save(torch.jit.script(net), directory / "ref.ts")
    settings = yaml.safe_load((directory / "config.yaml").read_text())
    settings["model"] = {"source": "torchscript:ref.ts", "input_shape": [1, 8, 8]}
    cfg = parse_config(settings, directory)
    reference = retrained_reference(cfg, directory / "ref.ts")
    x = torch.rand(3, 1, 8, 8)
    assert (reference.kind, reference.format) == ("retrained", "torchscript")
    assert torch.allclose(reference.model(x), net(x), atol=1e-6)
    with pytest.raises(ModelLoadError, match=r"--reference \(read as torchscript.*w\.pt"):
        retrained_reference(cfg, directory / "w.pt")
