"""The daemon's configuration: `config.yaml` parsed once into typed, frozen dataclasses.

Every problem is a `ConfigError` that names the key (`kafka.topics.receipts: ...`). Unknown
keys are errors, so a typo never silently falls back to a default. Relative paths
(model.weights, a torchscript model, data.uri_roots, dataset `path`s, checkpoints.dir) are
resolved against the directory of the config file, so the daemon reads the same files from
whatever working directory it is started in.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .engine.data import DATASETS
from .errors import ConfigError
from .engine.models import ModelConfig
from .engine.unlearn import UnlearnConfig, method_config

DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("train", "buffer", "audit")
LOG_LEVELS = ("debug", "info", "warning", "error")

__all__ = [
    "CheckpointsConfig",
    "DaemonConfig",
    "DataConfig",
    "DatasetRef",
    "KafkaConfig",
    "KafkaTopics",
    "LoggingConfig",
    "MetricsConfig",
    "UnlearningConfig",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class DatasetRef:
    """A labelled image set: a split of a built-in dataset, or a torch file holding
    {"x": (N, C, H, W) float in [0, 1], "y": (N,) int}."""

    builtin: str | None = None  # digits | mnist5k
    split: str = "train"  # train | buffer | audit (built-in only)
    path: Path | None = None

    def describe(self) -> str:
        return f"{self.builtin}:{self.split}" if self.builtin else str(self.path)


@dataclass(frozen=True)
class DataConfig:
    uri_roots: tuple[Path, ...] = ()
    max_payload_bytes: int = 8 * 1024 * 1024
    datasets: Mapping[str, DatasetRef] = field(default_factory=lambda: MappingProxyType({}))
    audit: DatasetRef | None = None  # None: no audit gauges
    buffer: DatasetRef | None = None  # None: no retain buffer


@dataclass(frozen=True)
class UnlearningConfig:
    method: str = "default"
    fragment_size: int = 8  # k_CL
    max_wait_s: float = 5.0
    engine: UnlearnConfig = field(default_factory=UnlearnConfig)  # every other key, via method_config


@dataclass(frozen=True)
class KafkaTopics:
    requests: str = "streamer.requests"
    receipts: str = "streamer.receipts"
    dead_letter: str = "streamer.dead-letter"
    checkpoints: str = "streamer.checkpoints"


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "streamer"
    topics: KafkaTopics = field(default_factory=KafkaTopics)
    client: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # kafka-python kwargs
    # The consumer keeps polling (partitions paused) while a fragment runs, so this only has
    # to cover one poll loop iteration, not a whole fragment.
    max_poll_interval_ms: int = 300_000


@dataclass(frozen=True)
class CheckpointsConfig:
    dir: Path = Path("runs/checkpoints")
    keep: int = 0  # 0 keeps every version


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9108  # 0 picks a free port


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True)
class DaemonConfig:
    model: ModelConfig
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | Path) -> DaemonConfig:
    """Read and validate a YAML config file; relative paths resolve against its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from err
    return parse_config(raw, base_dir=path.resolve().parent)


def parse_config(raw: Any, base_dir: Path) -> DaemonConfig:
    """Validate an already-loaded config mapping; relative paths resolve against `base_dir`."""
    root = _Section(raw if raw is not None else {}, "", base_dir)
    cfg = DaemonConfig(
        device=root.choice("device", DEVICES, "auto"),
        model=_model(root.section("model", required=True)),
        data=_data(root.section("data")),
        unlearning=_unlearning(root.section("unlearning")),
        kafka=_kafka(root.section("kafka")),
        checkpoints=_checkpoints(root.section("checkpoints")),
        metrics=_metrics(root.section("metrics")),
        logging=LoggingConfig(level=root.section("logging").choice("level", LOG_LEVELS, "info")),
    )
    root.done()
    return cfg


# --- sections --------------------------------------------------------------------------------


def _model(s: _Section) -> ModelConfig:
    source = s.string("source", "reference:digits")
    if source.startswith("torchscript:"):
        source = "torchscript:" + str(s.resolve(source.split(":", 1)[1]))
    weights = s.optional_path("weights")
    input_shape = s.int_list("input_shape", [1, 8, 8])
    if len(input_shape) != 3 or min(input_shape) < 1:
        s.fail("input_shape", f"must be [C, H, W] of positive integers, got {input_shape}")
    num_classes = s.integer("num_classes", 10, minimum=2)
    mean = s.float_list("mean", [0.0])
    std = s.float_list("std", [1.0])
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, input_shape[0]):
            s.fail(key, f"needs 1 or C={input_shape[0]} values, got {len(values)}")
    if any(v <= 0 for v in std):
        s.fail("std", "values must be > 0")
    if weights is None and not source.startswith("torchscript:"):
        s.fail("weights", "is required (a state_dict file) unless model.source is torchscript:PATH")
    s.done()
    return ModelConfig(source=source, weights=None if weights is None else str(weights), num_classes=num_classes,
                       input_shape=(input_shape[0], input_shape[1], input_shape[2]),
                       mean=tuple(mean), std=tuple(std))


def _data(s: _Section) -> DataConfig:
    roots = tuple(s.resolve(r) for r in s.string_list("uri_roots", []))
    max_payload = s.integer("max_payload_bytes", 8 * 1024 * 1024, minimum=1)
    named = s.section("datasets")
    datasets = {name: _dataset_ref(named.section(name, required=True)) for name in named.keys()}
    for name in datasets:
        if not isinstance(name, str) or not name:
            named.fail(str(name), "dataset names must be non-empty strings")
    named.done()
    cfg = DataConfig(
        uri_roots=roots, max_payload_bytes=max_payload, datasets=MappingProxyType(datasets),
        audit=_dataset_ref(s.section("audit")) if s.get("audit") is not None else s.skip("audit"),
        buffer=_dataset_ref(s.section("buffer")) if s.get("buffer") is not None else s.skip("buffer"),
    )
    s.done()
    return cfg


def _dataset_ref(s: _Section) -> DatasetRef:
    builtin = s.get("builtin")
    path = s.get("path")
    if (builtin is None) == (path is None):
        s.fail("", "needs exactly one of {builtin: NAME, split: SPLIT} or {path: FILE.pt}")
    if builtin is not None:
        ref = DatasetRef(builtin=s.choice("builtin", DATASETS, None), split=s.choice("split", SPLITS, "train"))
    else:
        ref = DatasetRef(path=s.optional_path("path"))
    s.done()
    return ref


def _unlearning(s: _Section) -> UnlearningConfig:
    method = s.string("method", "default")
    fragment_size = s.integer("fragment_size", 8, minimum=1)
    max_wait_s = s.number("max_wait_s", 5.0, minimum=0.0)
    overrides = {key: s.take(key) for key in s.keys()}
    defaults = {f.name: f.default for f in fields(UnlearnConfig) if f.name != "method"}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(s.key(k) for k in unknown)}")
    for key, value in overrides.items():
        if key in defaults and not _same_kind(value, defaults[key]):
            s.fail(key, f"must be a {type(defaults[key]).__name__}, got {value!r}")
    try:
        engine = method_config(method, **overrides)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"unlearning: {err}") from err
    s.done()
    return UnlearningConfig(method=method, fragment_size=fragment_size, max_wait_s=max_wait_s, engine=engine)


def _kafka(s: _Section) -> KafkaConfig:
    bootstrap = s.get("bootstrap_servers", "127.0.0.1:9092")
    if isinstance(bootstrap, list) and bootstrap and all(isinstance(b, str) and b for b in bootstrap):
        s.take("bootstrap_servers")
        bootstrap = ",".join(bootstrap)
    else:
        bootstrap = s.string("bootstrap_servers", "127.0.0.1:9092")
    group_id = s.string("group_id", "streamer")
    t = s.section("topics")
    topics = KafkaTopics(*(t.string(name, default) for name, default in (
        ("requests", "streamer.requests"), ("receipts", "streamer.receipts"),
        ("dead_letter", "streamer.dead-letter"), ("checkpoints", "streamer.checkpoints"))))
    t.done()
    names = [topics.requests, topics.receipts, topics.dead_letter, topics.checkpoints]
    if len(set(names)) != len(names):
        s.fail("topics", f"requests, receipts, dead_letter and checkpoints must be four different topics, got {names}")
    client = s.section("client")
    client_settings = {key: client.take(key) for key in client.keys()}
    client.done()
    cfg = KafkaConfig(bootstrap_servers=bootstrap, group_id=group_id, topics=topics,
                      client=MappingProxyType(client_settings),
                      max_poll_interval_ms=s.integer("max_poll_interval_ms", 300_000, minimum=1000))
    s.done()
    return cfg


def _checkpoints(s: _Section) -> CheckpointsConfig:
    cfg = CheckpointsConfig(dir=s.resolve(s.string("dir", "runs/checkpoints")), keep=s.integer("keep", 0, minimum=0))
    s.done()
    return cfg


def _metrics(s: _Section) -> MetricsConfig:
    cfg = MetricsConfig(host=s.string("host", "127.0.0.1"), port=s.integer("port", 9108, minimum=0, maximum=65535))
    s.done()
    return cfg


def _same_kind(value: Any, default: Any) -> bool:
    """YAML's value fits the engine field's type (an int is fine where a float is expected)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# --- typed access with the key path in every message -----------------------------------------

_MISSING = object()


class _Section:
    """One mapping of the config, read key by key; `done()` rejects the keys nobody read."""

    def __init__(self, raw: Any, path: str, base_dir: Path):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: must be a mapping, got {type(raw).__name__}")
        self._raw, self._path, self._base_dir = raw, path, base_dir
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path and name else (self._path or name)

    def fail(self, name: str, message: str) -> None:
        raise ConfigError(f"{self.key(name)}: {message}")

    def keys(self) -> list[str]:
        return [str(k) for k in self._raw if str(k) not in self._read]

    def get(self, name: str, default: Any = None) -> Any:
        return self._raw.get(name, default)

    def take(self, name: str, default: Any = _MISSING) -> Any:
        self._read.add(name)
        if name in self._raw:
            return self._raw[name]
        if default is _MISSING:
            self.fail(name, "is required")
        return default

    def skip(self, name: str) -> None:
        self._read.add(name)
        return None

    def done(self) -> None:
        unknown = sorted(str(k) for k in self._raw if str(k) not in self._read)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(self.key(k) for k in unknown)}")

    def section(self, name: str, required: bool = False) -> _Section:
        value = self.take(name) if required else self.take(name, None)
        return _Section({} if value is None else value, self.key(name), self._base_dir)

    def string(self, name: str, default: str | None) -> str:
        value = self.take(name, _MISSING if default is None else default)
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None) -> str:
        value = self.take(name, _MISSING if default is None else default)
        if value not in allowed:
            self.fail(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum}, got {value}")
        return value

    def number(self, name: str, default: float, minimum: float | None = None) -> float:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        return float(value)

    def int_list(self, name: str, default: list[int]) -> list[int]:
        value = self.take(name, default)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            self.fail(name, f"must be a list of integers, got {value!r}")
        return list(value)

    def float_list(self, name: str, default: list[float]) -> list[float]:
        value = self.take(name, default)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            self.fail(name, f"must be a non-empty list of numbers, got {value!r}")
        return [float(v) for v in value]

    def string_list(self, name: str, default: list[str]) -> list[str]:
        value = self.take(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(name, f"must be a list of non-empty strings, got {value!r}")
        return list(value)

    def optional_path(self, name: str) -> Path | None:
        value = self.take(name, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a path string, got {value!r}")
        return self.resolve(value)

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base_dir / path).resolve()
