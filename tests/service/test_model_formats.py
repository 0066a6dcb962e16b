"""Every input format through the daemon's own start-up (`recover`) and fragment pipeline, without a
broker: the published file loads with the user's one-liner and predicts exactly what the daemon's
model predicts, a restart resumes from it, and older checkpoint directories still load."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import structlog
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon_harness import write_config
from streamer.config import load_config
from streamer.engine.data import load_splits
from streamer.engine.models import Normalized, published_model
from streamer.errors import ConfigError, ModelLoadError
from streamer.intake.events import ForgetRequest
from streamer.pipeline.collector import Accepted
from streamer.telemetry.metrics import Metrics
from streamer.pipeline.commit import Commit
from streamer.pipeline.quarantine import run_quarantined
from streamer.state.retained import Window
from streamer.service.recovery import recover
from streamer.state.checkpoints import CheckpointStore
from user_models import INPUTS, MEAN, STD, UserDigitsNet, predict_logits, trained_net, user_load, write_source

TESTS = Path(__file__).resolve().parents[1]
TRAIN, AUDIT = load_splits("digits").train, load_splits("digits").audit
TOPICS = {"requests": "r", "receipts": "c", "dead_letter": "d", "checkpoints": "k"}  # never contacted here
UNLEARNING = {"fragment_size": 4, "max_steps": 300, "lr": 0.003, "pgd_steps": 5, "n_adv": 4, "distill_batch": 32,
              "distill_weight": 1.0}


@pytest.fixture(scope="module")
def net() -> UserDigitsNet:
    """The user's BatchNorm CNN, trained briefly on digits."""
    return trained_net()


@pytest.fixture(scope="module")
def fragment(net: UserDigitsNet) -> tuple[torch.Tensor, torch.Tensor]:
    """Four training images the user's net classifies correctly: (4, 1, 8, 8) and their labels."""
    correct = (predict_logits(net, TRAIN.x[:64]).argmax(1) == TRAIN.y[:64]).nonzero().flatten()[:4]
    return TRAIN.x[correct], TRAIN.y[correct]


def _config(tmp_path: Path, model: dict, **unlearning):
    path = write_config(tmp_path, "127.0.0.1:9", TOPICS, Path("unused"), model=model,
                        unlearning={**UNLEARNING, **unlearning})
    return load_config(path)


def _recover(cfg):
    return recover(cfg, Metrics(CollectorRegistry()), structlog.get_logger())


def _one_fragment(cfg, x: torch.Tensor, y: torch.Tensor):
    """Start as the daemon does, unlearn one fragment through the real pipeline, publish it.
    Returns (the published manifest, the daemon's model after the fragment)."""
    state = _recover(cfg)
    try:
        # steps 2 and 3 of the commit only (vault, version): no outbox or consumer here
        commit = Commit(state.worker, state.store, state.vault, state.shreds, None, None,  # type: ignore[arg-type]
                        Metrics(CollectorRegistry()), Window.of(cfg.privacy), structlog.get_logger())
        accepted = [Accepted(ForgetRequest(f"r{i}", "misclassify", int(label), None, xi), "r", 0, i, 0.0)
                    for i, (xi, label) in enumerate(zip(x, y))]
        run = run_quarantined(state.worker, accepted, threading.Event(), None, structlog.get_logger())
        assert run is not None and not run.failed
        manifest, _ = commit.publish(run, [], {"r": {0: len(accepted)}}, state.checkpoint.manifest.version, ())
        assert all(o.status == "forgotten" for o in run.applied)
        return manifest, state.worker.model
    finally:
        state.lock.release()


class TestRoundTrip:
    @pytest.mark.parametrize("kind", list(INPUTS))
    def test_published_file_predicts_what_the_daemon_predicts(self, tmp_path, net, fragment, kind):
        """Input as a user saves it -> one fragment -> the user's one-liner on the version's file gives
        the daemon's logits exactly, misclassifies the fragment, and a restart resumes the same model."""
        cfg = _config(tmp_path, write_source(net, kind, tmp_path / "user"))
        x, y = fragment
        manifest, model = _one_fragment(cfg, x, y)
        fmt = INPUTS[kind]
        assert manifest.model_format == fmt and manifest.model_file == ("model.pt2" if fmt == "export" else "model.pt")
        loaded = user_load(cfg.checkpoints.dir / manifest.version / manifest.model_file, fmt)
        probe = torch.cat([x, AUDIT.x[:32]])
        with torch.no_grad():
            daemon_logits = model(probe)
        assert torch.equal(predict_logits(loaded, probe), daemon_logits)
        assert (daemon_logits[:4].argmax(1) != y).all()
        base = CheckpointStore(cfg.checkpoints.dir).manifest("v000000")
        assert base.model_format == fmt  # the configured model is published in the user's format too
        original = user_load(cfg.checkpoints.dir / "v000000" / base.model_file, fmt)
        assert torch.equal(predict_logits(original, probe), predict_logits(net, probe))
        restarted = _recover(cfg)
        try:
            with torch.no_grad():
                assert torch.equal(restarted.worker.model(probe), daemon_logits)
        finally:
            restarted.lock.release()

    @pytest.mark.parametrize("fmt", ["torchscript", "export"])
    def test_format_key_publishes_an_eager_model_as_an_archive(self, tmp_path, net, fragment, fmt):
        """model.format torchscript / export writes a factory model's versions as that archive."""
        cfg = _config(tmp_path, {**write_source(net, "state_dict", tmp_path / "user"), "format": fmt})
        manifest, model = _one_fragment(cfg, *fragment)
        loaded = user_load(cfg.checkpoints.dir / manifest.version / manifest.model_file, fmt)
        assert manifest.model_format == fmt
        assert torch.equal(predict_logits(loaded, AUDIT.x[:32]), model(AUDIT.x[:32]).detach())


class TestStartUp:
    def test_trainable_parameters_are_logged_with_counts(self, tmp_path, net):
        """The start-up log names the parameters that move and counts them per top-level module."""
        cfg = _config(tmp_path, write_source(net, "torchscript", tmp_path / "user"), trainable=["classifier.3.*"])
        with capture_logs() as logs:
            _recover(cfg).lock.release()
        (line,) = [e for e in logs if e["event"] == "trainable_parameters"]
        assert line["parameters"] == ["classifier.3.weight", "classifier.3.bias"]
        assert line["by_module"] == {"classifier": 330} and line["trainable_parameters"] == 330
        assert line["total_parameters"] == sum(p.numel() for p in net.parameters())

    def test_glob_matching_nothing_fails_before_anything_is_published(self, tmp_path, net):
        """A trainable glob that matches no parameter is a ConfigError at start, with no version written."""
        cfg = _config(tmp_path, write_source(net, "torchscript", tmp_path / "user"), trainable=["fc.*"])
        with pytest.raises(ConfigError, match=r"'fc\.\*' matches no trainable parameter.*'features\.0\.weight'"):
            _recover(cfg)
        assert CheckpointStore(cfg.checkpoints.dir).versions() == []

    def test_pickled_module_as_weights_is_one_error_line(self, tmp_path, net):
        """`streamer run` with torch.save(model) as model.weights exits 2 with one `streamer: error:` line."""
        model = write_source(net, "state_dict", tmp_path / "user")
        torch.save(net, tmp_path / "pickled.pt")
        config = write_config(tmp_path, "127.0.0.1:9", TOPICS, tmp_path / "pickled.pt",
                              model={**model, "weights": str(tmp_path / "pickled.pt")})
        env = {"PYTHONPATH": f"{TESTS.parent}:{TESTS}", "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 2, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("streamer: error: "), run.stderr
        assert "a pickled nn.Module (user_models.UserDigitsNet)" in errors[0]
        assert "save model.state_dict()" in errors[0]


class TestOlderCheckpoints:
    @staticmethod
    def _legacy_dir(cfg, net: UserDigitsNet, mean=MEAN, std=STD) -> CheckpointStore:
        """A checkpoint directory as streamer wrote it before formats: Normalized keys, no format in the manifest."""
        store = CheckpointStore(cfg.checkpoints.dir)
        store.recover()
        manifest = store.publish(None, Normalized(net, mean, std).state_dict())
        path = store.path(manifest.version) / "manifest.json"
        data = json.loads(path.read_text())
        del data["model_format"], data["model_file"]
        path.write_text(json.dumps(data))
        return store

    def test_wrapper_keyed_versions_load_and_new_ones_are_the_users(self, tmp_path, net, fragment):
        """A v000000 with net.*/mean/std keys resumes; the next version holds the user's own keys; verify's
        loader reads both."""
        cfg = _config(tmp_path, write_source(net, "state_dict", tmp_path / "user"))
        store = self._legacy_dir(cfg, net)
        assert set(store.load("v000000").state_dict) >= {"mean", "std", "net.features.0.weight"}
        manifest, model = _one_fragment(cfg, *fragment)
        assert manifest.version == "v000001"
        user_load(store.path("v000001") / "model.pt", "state_dict")  # strict: the user's keys only
        old = published_model(cfg.model, store.load("v000000").model.data, "state_dict")
        assert torch.equal(old(AUDIT.x[:16]), Normalized(net, MEAN, STD)(AUDIT.x[:16]))

    def test_wrapper_saved_with_other_normalisation_is_refused(self, tmp_path, net):
        """An old version whose mean/std differ from model.mean/std fails at start naming both."""
        cfg = _config(tmp_path, write_source(net, "state_dict", tmp_path / "user"))
        self._legacy_dir(cfg, net, mean=(0.5,), std=(0.5,))
        with pytest.raises(ModelLoadError, match=r"saved with mean \[0\.5\] / std \[0\.5\], but model\.mean"):
            _recover(cfg)
