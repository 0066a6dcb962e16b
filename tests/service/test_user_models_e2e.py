"""Users' own models through `streamer run` against the real test broker: a TorchScript model
(with kill -9 and a rollback), DataParallel / Lightning / torch.export files, and a real pretrained
RGB classifier with BatchNorm (ccexam's SVHN CNN, fed the PNGs it ships). Each published version
is loaded with the user's own one-liner."""
from __future__ import annotations

import base64
import hashlib
import importlib.resources
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon_harness import DaemonProcess, new_topics, run_until_crash, produce, read_topic, values, with_tests_on_path, write_config
from streamer.config import load_config
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.state.checkpoints import CheckpointStore
from user_models import UserDigitsNet, predict_logits, trained_net, user_load, write_source

pytestmark = pytest.mark.kafka

TRAIN, AUDIT = load_splits("digits").train, load_splits("digits").audit
ENV = with_tests_on_path()  # the daemon imports factory:user_models:build
CCEXAM = importlib.resources.files("ccexam")
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)  # ccexam/constants.py DATASET_STATS["svhn"]
SVHN_SAMPLES = {"svhn_digit_0.png": 0, "svhn_digit_1.png": 1, "svhn_digit_2.png": 2, "svhn_digit_5.png": 5}


@pytest.fixture(scope="module")
def net() -> UserDigitsNet:
    """The user's BatchNorm CNN, trained briefly on digits."""
    return trained_net()


@pytest.fixture(scope="module")
def correct(net: UserDigitsNet) -> list[int]:
    """Indices of 8 training images the user's net classifies correctly."""
    hits = predict_logits(net, TRAIN.x[:64]).argmax(1) == TRAIN.y[:64]
    return hits.nonzero().flatten()[:8].tolist()


def _event(rid: str, index: int) -> tuple[bytes, bytes]:
    return rid.encode(), encode_event(rid, "misclassify", int(TRAIN.y[index]), TRAIN.x[index])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV})


def _current(store: CheckpointStore):
    manifest = store.manifest(store.current_version() or "")
    return manifest, store.path(manifest.version) / manifest.model_file


def _audit_accuracy(net: torch.nn.Module) -> float:
    return round(float((predict_logits(net, AUDIT.x).argmax(1) == AUDIT.y).float().mean()), 6)


def test_torchscript_model_survives_kill9_and_rollback(kafka_bootstrap, net, correct, tmp_path) -> None:
    """A TorchScript model is killed -9 mid-fragment and after a checkpoint, resumes, is rolled back and
    replays: every request is applied once in CURRENT's lineage, every version is a TorchScript archive
    that torch.jit.load runs, the rollback republishes its target's file byte for byte, and CURRENT's
    archive gives the daemon's recorded audit accuracy and misclassifies every request."""
    topics = new_topics(kafka_bootstrap, "ts")
    config = write_config(tmp_path, kafka_bootstrap, topics, Path("unused"),
                          model=write_source(net, "torchscript", tmp_path / "user"))
    ids = [f"ts{i}" for i in range(8)]
    produce(kafka_bootstrap, topics["requests"], [_event(rid, i) for rid, i in zip(ids, correct)])
    for run, point in enumerate(("during_unlearn", "after_checkpoint")):
        run_until_crash(config, tmp_path / f"crash{run}.log", point)
    store = CheckpointStore(load_config(config).checkpoints.dir)
    assert store.current_version() == "v000001"  # published, then killed before the ledger and the commit

    daemon = DaemonProcess(config, tmp_path / "run.log")
    try:
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000002", timeout_s=180)
        (moving,) = [e for e in daemon.events() if e["event"] == "trainable_parameters"]
        assert moving["parameters"] == ["classifier.1.weight", "classifier.1.bias", "classifier.3.weight",
                                        "classifier.3.bias"]
        out = _cli("rollback", "--to", "v000001", "--config", str(config))
        assert out.returncode == 0 and "published v000003 = weights of v000001" in out.stdout, out.stdout + out.stderr
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000004", timeout_s=180)
    finally:
        assert daemon.stop() == 0

    lineage = store.lineage("v000004")
    assert [m.version for m in lineage] == ["v000004", "v000003", "v000001", "v000000"]
    assert Counter(r["request_id"] for m in lineage for r in m.requests) == Counter(ids)
    for version in store.versions():
        manifest = store.manifest(version)
        assert (manifest.model_format, manifest.model_file) == ("torchscript", "model.pt")
        assert isinstance(torch.jit.load(store.path(version) / "model.pt"), torch.jit.ScriptModule)
    assert store.manifest("v000003").model_sha256 == store.manifest("v000001").model_sha256
    manifest, path = _current(store)
    archive = torch.jit.load(path)  # the user's one-liner
    assert _audit_accuracy(archive) == manifest.metrics["audit_accuracy"]
    assert (predict_logits(archive, TRAIN.x[correct]).argmax(1) != TRAIN.y[correct]).all()
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 12))
    assert Counter(r["request_id"] for r in receipts if r["version"] == "v000004") == Counter(ids[4:])
    verified = _cli("verify", "--config", str(config))
    assert verified.returncode == 0 and "v000004 (torchscript)" in verified.stdout, verified.stdout + verified.stderr


@pytest.mark.parametrize("kind", ["dataparallel", "lightning", "export"])
def test_ecosystem_files_come_back_in_the_users_format(kafka_bootstrap, net, correct, tmp_path, kind) -> None:
    """DataParallel and Lightning checkpoints and a .pt2 program go through the daemon; the version loads
    with the user's one-liner (a strict state_dict into the user's class, or torch.export.load), gives the
    daemon's recorded audit accuracy and misclassifies the requests."""
    topics = new_topics(kafka_bootstrap, kind)
    config = write_config(tmp_path, kafka_bootstrap, topics, Path("unused"),
                          model=write_source(net, kind, tmp_path / "user"))
    produce(kafka_bootstrap, topics["requests"], [_event(f"{kind}{i}", index) for i, index in enumerate(correct[:4])])
    daemon = DaemonProcess(config, tmp_path / "run.log", env=ENV)
    try:
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000001", timeout_s=180)
    finally:
        assert daemon.stop() == 0
    manifest, path = _current(CheckpointStore(load_config(config).checkpoints.dir))
    fmt = "export" if kind == "export" else "state_dict"
    assert manifest.model_format == fmt and path.name == ("model.pt2" if kind == "export" else "model.pt")
    loaded = user_load(path, fmt)
    assert _audit_accuracy(loaded) == manifest.metrics["audit_accuracy"]
    assert (predict_logits(loaded, TRAIN.x[correct[:4]]).argmax(1) != TRAIN.y[correct[:4]]).all()
    assert [r["status"] for r in values(read_topic(kafka_bootstrap, topics["receipts"], 4))] == ["forgotten"] * 4


def _svhn_pixels(png: bytes) -> torch.Tensor:
    """(3, 32, 32) in [0, 1] from PNG bytes, as the daemon decodes an image_b64 sample."""
    image = np.array(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(image).permute(2, 0, 1)


def test_pretrained_svhn_batchnorm_model_forgets_its_own_samples(kafka_bootstrap, tmp_path) -> None:
    """ccexam's pretrained SVHN CNN (Conv-BN-ReLU, 3x32x32) forgets its 4 shipped sample PNGs sent as
    image_b64 events: the published model.pt loads strictly into ccexam's SVHNNet, misclassifies them,
    and only the Linear head moved -- convolutions, BatchNorm weights and running statistics untouched."""
    from ccexam.models import SVHNNet

    weights = CCEXAM / "weights" / "svhn.pth"
    topics = new_topics(kafka_bootstrap, "svhn")
    model = {"source": "factory:ccexam.models:SVHNNet", "kwargs": {"input_size": 32}, "weights": str(weights),
             "num_classes": 10, "input_shape": [3, 32, 32], "mean": list(SVHN_MEAN), "std": list(SVHN_STD)}
    config = write_config(tmp_path, kafka_bootstrap, topics, Path(str(weights)), model=model,
                          data={"audit": None, "datasets": {}})
    pngs = {name: (CCEXAM / "samples" / name).read_bytes() for name in SVHN_SAMPLES}
    events = [(name.encode(), json.dumps({"schema": 1, "request_id": name.removesuffix(".png"), "mode": "misclassify",
                                          "label": label, "sample": {"image_b64": base64.b64encode(pngs[name]).decode()}
                                          }).encode()) for name, label in SVHN_SAMPLES.items()]
    produce(kafka_bootstrap, topics["requests"], events)
    daemon = DaemonProcess(config, tmp_path / "run.log")
    try:
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000001", timeout_s=240)
        (moving,) = [e for e in daemon.events() if e["event"] == "trainable_parameters"]
    finally:
        assert daemon.stop() == 0
    assert moving["by_module"] == {"classifier": 128 * 4 * 4 * 256 + 256 + 256 * 10 + 10}
    assert [r["status"] for r in values(read_topic(kafka_bootstrap, topics["receipts"], 4))] == ["forgotten"] * 4

    manifest, path = _current(CheckpointStore(load_config(config).checkpoints.dir))
    assert manifest.model_format == "state_dict" and hashlib.sha256(path.read_bytes()).hexdigest() == manifest.model_sha256
    published = torch.load(path, weights_only=True)
    svhn = SVHNNet(32)
    svhn.load_state_dict(published)  # strict: ccexam's own keys, nothing of streamer's wrapper
    x = torch.stack([_svhn_pixels(pngs[name]) for name in SVHN_SAMPLES])
    labels = torch.tensor(list(SVHN_SAMPLES.values()))
    normalise = lambda t: (t - torch.tensor(SVHN_MEAN).view(1, 3, 1, 1)) / torch.tensor(SVHN_STD).view(1, 3, 1, 1)  # noqa: E731
    with torch.no_grad():
        assert (svhn.eval()(normalise(x)).argmax(1) != labels).all()
        original = SVHNNet(32)
        original.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        assert (original.eval()(normalise(x)).argmax(1) == labels).all()  # it knew them before
    before = original.state_dict()
    assert [k for k in before if not torch.equal(published[k], before[k])] == [
        "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias"]
    assert any(k.endswith("running_mean") for k in before)  # BatchNorm statistics were compared too
