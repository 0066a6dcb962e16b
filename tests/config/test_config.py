"""Tests for streamer.config: config.yaml parsed into frozen dataclasses, every error names its key."""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.config import DaemonConfig, DatasetRef, load_config, parse_config
from streamer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def raw() -> dict[str, Any]:
    """The repository's config.yaml as a plain mapping."""
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _parse(raw: dict[str, Any], base: Path = Path("/base")) -> DaemonConfig:
    return parse_config(raw, base_dir=base)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


class TestRepositoryConfig:
    def test_config_yaml_loads(self) -> None:
        """The documented config.yaml parses into typed sections with its values."""
        cfg = load_config(ROOT / "config.yaml")
        assert cfg.device == "auto"
        assert cfg.model.input_shape == (1, 8, 8) and cfg.model.num_classes == 10
        assert cfg.unlearning.fragment_size == 8 and cfg.unlearning.max_wait_s == 5.0
        raw = yaml.safe_load((ROOT / "config.yaml").read_text())
        assert cfg.engine.max_steps == raw["engine"]["max_steps"]
        assert cfg.engine.retain_forgotten is True and cfg.deprecations == ()
        assert cfg.kafka.topics.dead_letter == "streamer.dead-letter"
        assert cfg.kafka.max_poll_interval_ms == 300_000
        assert cfg.data.datasets["digits"] == DatasetRef(builtin="digits", split="train")
        assert cfg.data.audit == DatasetRef(builtin="digits", split="audit") and cfg.data.buffer is None
        assert cfg.checkpoints.keep == 0 and cfg.metrics.port == 9108 and cfg.logging.level == "info"

    @pytest.mark.parametrize("path", ["deploy/config.compose.yaml", "deploy/k8s/configmap.yaml"])
    def test_deployed_configs_load(self, path: str, tmp_path: Path) -> None:
        """The configs shipped in deploy/ pass the same validation as config.yaml."""
        text = (ROOT / path).read_text()
        if path.endswith("configmap.yaml"):
            text = yaml.safe_load(text)["data"]["config.yaml"]
        (tmp_path / "config.yaml").write_text(text)
        cfg = load_config(tmp_path / "config.yaml")
        assert cfg.checkpoints.dir.is_absolute() and Path(cfg.model.weights or "").is_absolute()

    def test_relative_paths_resolve_against_the_config_directory(self, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """Weights, uri roots, dataset files and the checkpoint dir do not depend on the working directory."""
        conf = tmp_path / "conf"
        conf.mkdir()
        text = (ROOT / "config.yaml").read_text().replace("audit: {builtin: digits, split: audit}",
                                                          "audit: {path: sets/audit.pt}")
        (conf / "config.yaml").write_text(text)
        monkeypatch.chdir(tmp_path)
        cfg = load_config(Path("conf") / "config.yaml")
        assert cfg.model.weights == str(conf.resolve() / "artifacts" / "digits.pt")
        assert cfg.data.uri_roots == (conf.resolve() / "data",)
        assert cfg.data.audit == DatasetRef(path=conf.resolve() / "sets" / "audit.pt")
        assert cfg.checkpoints.dir == conf.resolve() / "runs" / "checkpoints"
        assert os.getcwd() == str(tmp_path)

    def test_config_is_frozen(self) -> None:
        """Sections cannot be modified after parsing."""
        cfg = load_config(ROOT / "config.yaml")
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.unlearning.fragment_size = 1  # type: ignore[misc]
        with pytest.raises(TypeError):
            cfg.kafka.client["security_protocol"] = "SSL"  # type: ignore[index]


class TestErrors:
    @pytest.mark.parametrize("dotted", ["surprise", "kafka.topics.extra", "unlearning.bogus_rate", "engine.bogus_rate",
                                        "data.audit.nonsense", "metrics.path", "model.colour"])
    def test_unknown_keys_are_named(self, raw: dict[str, Any], dotted: str) -> None:
        """A key nobody reads is an error that names it with its full path."""
        with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
            _parse(_set(raw, dotted, 1))

    @pytest.mark.parametrize(("dotted", "value", "message"), [
        ("metrics.port", "ninety", r"metrics\.port: must be an integer"),
        ("metrics.port", 70000, r"metrics\.port: must be <= 65535"),
        ("unlearning.fragment_size", 0, r"unlearning\.fragment_size: must be >= 1"),
        ("unlearning.max_wait_s", -1, r"unlearning\.max_wait_s: must be >= 0"),
        ("engine.max_steps", 1.5, r"engine\.max_steps: must be a int"),
        ("engine.retain_forgotten", "yes", r"engine\.retain_forgotten: must be a bool"),
        ("engine.method", "magic", r"engine\.method 'magic'"),
        ("engine.lr", 0, r"lr must be > 0"),
        ("device", "tpu", r"device: must be one of auto, cpu, cuda"),
        ("model.input_shape", [8, 8], r"model\.input_shape: must be \[C, H, W\]"),
        ("model.std", [0.0], r"model\.std: values must be > 0"),
        ("model.weights", None, r"model\.weights: is required"),
        ("checkpoints.keep", -1, r"checkpoints\.keep: must be >= 0"),
        ("kafka.max_poll_interval_ms", 10, r"kafka\.max_poll_interval_ms: must be >= 1000"),
        ("kafka.topics.receipts", "streamer.requests", r"kafka\.topics: .* four different topics"),
        ("kafka.client", ["x"], r"kafka\.client: must be a mapping"),
        ("data.audit", {"builtin": "digits", "path": "x.pt"}, r"data\.audit: needs exactly one of"),
        ("data.audit", {"builtin": "cifar"}, r"data\.audit\.builtin: must be one of digits, mnist5k"),
        ("data.datasets.digits", {"builtin": "digits", "split": "test"}, r"data\.datasets\.digits\.split"),
        ("logging.level", "loud", r"logging\.level: must be one of"),
        ("model.format", "onnx", r"model\.format: must be one of auto, state_dict, torchscript, export"),
        ("model.kwargs", ["x"], r"model\.kwargs: must be a mapping"),
        ("model.kwargs", {"input_size": 8}, r"model\.kwargs: only factory: and torchvision: sources"),
        ("engine.trainable", "heads", r"trainable must be 'auto', 'head', 'block', 'all' or a list"),
        ("checkpoints.publish", {"kind": "s3"}, r"checkpoints\.publish: must be a list of targets"),
        ("checkpoints.publish", [{"kind": "gcs", "bucket": "b", "model_name": "m"}],
         r"checkpoints\.publish\[0\]: must be a mapping with kind: s3"),
        ("checkpoints.publish", [{"kind": "s3", "bucket": "b", "model_name": "m", "aws_secret_access_key": "k"}],
         r"publish\[0\]: unknown key\(s\) aws_secret_access_key for kind s3 \(credentials come from the environment\)"),
        ("checkpoints.publish", [{"kind": "s3", "bucket": "bkt", "model_name": "m' or name != '"}],
         r"publish\[0\]\.model_name: must be a name of letters"),
        ("checkpoints.publish", [{"kind": "s3", "bucket": "Models_1", "model_name": "m"}], r"publish\[0\]\.bucket"),
        ("checkpoints.publish", [{"kind": "s3", "bucket": "models", "model_name": "m", "prefix": "a/../b"}],
         r"publish\[0\]\.prefix"),
        ("checkpoints.publish", [{"kind": "mlflow", "model_name": "m"}], r"publish\[0\]\.tracking_uri: is required"),
        ("checkpoints.publish", [{"kind": "mlflow", "model_name": "m", "tracking_uri": "http://x", "bucket": "b"}],
         r"unknown key\(s\) bucket for kind mlflow"),
        ("checkpoints.publish", [{"kind": "s3", "bucket": "models", "model_name": "m", "alias_after_verify": "yes"}],
         r"publish\[0\]\.alias_after_verify: must be true or false"),
        ("checkpoints.publish", [{"kind": "s3", "bucket": "bkt", "model_name": "a/b"}], r"publish\[0\]\.model_name"),
        ("checkpoints.publish", [{"kind": "s3", "model_name": "m"}], r"publish\[0\]\.bucket"),
        ("checkpoints.publish", [{"kind": "s3", "name": "x", "bucket": "bkt", "model_name": "m"}] * 2,
         r"target names must differ"),
    ])
    def test_bad_values_are_named(self, raw: dict[str, Any], dotted: str, value: Any, message: str) -> None:
        """A value of the wrong type or range raises ConfigError naming the key and the problem."""
        with pytest.raises(ConfigError, match=message):
            _parse(_set(raw, dotted, value))

    def test_publish_targets_get_their_defaults(self, raw: dict[str, Any]) -> None:
        """A publish target names its bucket and model; name, prefix, alias, endpoint and region default."""
        cfg = _parse(_set(raw, "checkpoints.publish", [{"kind": "s3", "bucket": "models", "model_name": "digits"},
                                                       {"kind": "mlflow", "tracking_uri": "http://mlflow:5000",
                                                        "model_name": "digits", "alias": "prod"}]))
        assert [dict(t) for t in cfg.checkpoints.publish] == [
            {"kind": "s3", "name": "s3-0", "bucket": "models", "prefix": "", "model_name": "digits", "alias": "current",
             "alias_after_verify": False, "endpoint_url": None, "region": None},
            {"kind": "mlflow", "name": "mlflow-1", "model_name": "digits", "alias": "prod", "alias_after_verify": False,
             "tracking_uri": "http://mlflow:5000", "experiment": "streamer"}]
        assert _parse(raw).checkpoints.publish == ()

    def test_model_section_is_required(self, raw: dict[str, Any]) -> None:
        """Without a model section the daemon has nothing to unlearn."""
        del raw["model"]
        with pytest.raises(ConfigError, match=r"^model: is required"):
            _parse(raw)

    def test_unreadable_and_invalid_files(self, tmp_path: Path) -> None:
        """A missing file and broken YAML are ConfigErrors naming the file."""
        with pytest.raises(ConfigError, match="cannot read config"):
            load_config(tmp_path / "missing.yaml")
        (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(tmp_path / "bad.yaml")


class TestSections:
    def test_engine_keys_reach_the_engine(self, raw: dict[str, Any]) -> None:
        """Every engine key configures the engine's method, over the method's preset."""
        raw["engine"].update({"method": "neggrad", "max_steps": 7, "lr": 0.01})
        cfg = _parse(raw)
        assert (cfg.engine.method, cfg.engine.max_steps, cfg.engine.lr) == ("neggrad", 7, 0.01)
        assert cfg.engine.n_adv == 0  # the neggrad preset still applies

    def test_the_old_layout_is_read_with_one_deprecation_line(self, raw: dict[str, Any]) -> None:
        """Engine keys under `unlearning:` (the layout before `engine:`) give the same engine, one
        deprecation line naming them, and errors that name the key where it was written."""
        old = copy.deepcopy(raw)
        old["unlearning"].update({**old.pop("engine"), "lr": 0.01})
        new = _set(raw, "engine.lr", 0.01)
        assert _parse(old).engine == _parse(new).engine and _parse(new).deprecations == ()
        (line,) = _parse(old).deprecations
        assert line.startswith("unlearning.method, unlearning.max_steps") and "move them to the `engine:`" in line
        with pytest.raises(ConfigError, match=r"unlearning\.max_steps: must be a int"):
            _parse(_set(old, "unlearning.max_steps", 1.5))
        with pytest.raises(ConfigError, match=r"unlearning\.method 'magic'"):
            _parse(_set(old, "unlearning.method", "magic"))
        with pytest.raises(ConfigError, match=r"engine\.lr: is set under both unlearning: and engine:"):
            _parse(_set(new, "unlearning.lr", 0.02))

    def test_kafka_client_settings_and_bootstrap_list(self, raw: dict[str, Any]) -> None:
        """kafka.client passes through as is and a bootstrap list is joined for kafka-python."""
        raw["kafka"]["client"] = {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}
        raw["kafka"]["bootstrap_servers"] = ["a:9092", "b:9092"]
        cfg = _parse(raw)
        assert dict(cfg.kafka.client) == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}
        assert cfg.kafka.bootstrap_servers == "a:9092,b:9092"

    def test_torchscript_source_path_is_resolved(self, raw: dict[str, Any]) -> None:
        """A torchscript model needs no weights file and its path resolves like the others."""
        raw["model"].update({"source": "torchscript:models/net.pt", "weights": None})
        cfg = _parse(raw, base=Path("/srv/conf"))
        assert cfg.model.source == "torchscript:/srv/conf/models/net.pt" and cfg.model.weights is None

    def test_export_source_and_publish_formats(self, raw: dict[str, Any]) -> None:
        """export:PATH resolves, needs no weights and publishes .pt2; format overrides the source's,
        except across TorchScript and export; train_mode cannot be on for an exported program."""
        raw["model"].update({"source": "export:net.pt2", "weights": None})
        cfg = _parse(raw, base=Path("/srv/conf"))
        assert cfg.model.source == "export:/srv/conf/net.pt2" and cfg.model.model_format == "export"
        assert _parse(_set(raw, "model.format", "state_dict")).model.model_format == "state_dict"
        with pytest.raises(ConfigError, match=r"model\.format: export models cannot be published as torchscript"):
            _parse(_set(raw, "model.format", "torchscript"))
        with pytest.raises(ConfigError, match=r"engine\.train_mode: must be false for an export: model"):
            _parse(_set(raw, "engine.train_mode", True))
        assert _parse(_set(raw, "model.source", "torchscript:m.ts")).model.model_format == "torchscript"

    def test_factory_kwargs_and_trainable_globs(self, raw: dict[str, Any]) -> None:
        """model.kwargs reach the factory config; engine.trainable becomes the engine's globs."""
        raw["model"].update({"source": "factory:ccexam.models:SVHNNet", "kwargs": {"input_size": 32}})
        raw["engine"]["trainable"] = ["classifier.*"]
        cfg = _parse(raw)
        assert dict(cfg.model.kwargs) == {"input_size": 32} and cfg.model.model_format == "state_dict"
        assert cfg.engine.trainable == ("classifier.*",)

    def test_audit_and_buffer_may_be_null(self, raw: dict[str, Any]) -> None:
        """data.audit: null turns the audit gauges off; data.buffer: null turns the retain buffer off."""
        raw["data"]["audit"] = None
        raw["data"]["buffer"] = {"builtin": "digits", "split": "buffer"}
        cfg = _parse(raw)
        assert cfg.data.audit is None and cfg.data.buffer == DatasetRef(builtin="digits", split="buffer")
