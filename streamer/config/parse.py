"""Parse `config.yaml` into the dataclasses of `schema`; every problem is a ConfigError naming the key."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ..engine import DATASETS, FORMATS, ModelConfig, UnlearnConfig, method_config, source_format
from ..errors import ConfigError
from ._section import _same_kind, _Section
from .checkpoints import checkpoints_section
from .schema import (DEFAULT_MODES, DEFAULT_TOPIC_CONFIGS, DEVICES, LOG_LEVELS, SPLITS, DaemonConfig,
                     DataConfig, DatasetRef, KafkaConfig, KafkaTopics, KmsKeyConfig, LoggingConfig, MetricsConfig,
                     PrivacyConfig,
                     UnlearningConfig)

# The defaults, each written once: in the schema's dataclasses (README "Configuration" is checked against them)
_MODEL, _DATA, _UNLEARNING, _KAFKA = ModelConfig(), DataConfig(), UnlearningConfig(), KafkaConfig()
_TOPICS, _PRIVACY, _METRICS = KafkaTopics(), PrivacyConfig(), MetricsConfig()
_DAEMON, _LOGGING = DaemonConfig(), LoggingConfig()
ENGINE_KEYS = tuple(f.name for f in fields(UnlearnConfig))  # `method` and every engine setting

MAX_WINDOW_DAYS = 30.0  # GDPR Art. 12(3): one month to act on an erasure request

__all__ = ["load_config", "parse_config"]


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
    checkpoints = checkpoints_section(root.section("checkpoints"))
    unlearning = root.section("unlearning")
    legacy = {key: unlearning.take(key) for key in unlearning.keys() if key in ENGINE_KEYS}
    deprecations = (f"{', '.join('unlearning.' + k for k in legacy)}: engine settings under `unlearning:` are "
                    "deprecated; move them to the `engine:` section",) if legacy else ()
    cfg = DaemonConfig(
        device=root.choice("device", DEVICES, _DAEMON.device),
        model=_model(root.section("model", required=True)),
        data=_data(root.section("data")),
        unlearning=_unlearning(unlearning),
        engine=_engine(root.section("engine"), legacy),
        kafka=_kafka(root.section("kafka")),
        checkpoints=checkpoints,
        privacy=_privacy(root.section("privacy"), checkpoints.dir),
        metrics=_metrics(root.section("metrics")),
        logging=LoggingConfig(level=root.section("logging").choice("level", LOG_LEVELS, _LOGGING.level)),
        deprecations=deprecations,
    )
    root.done()
    if cfg.engine.train_mode and source_format(cfg.model.source) == "export":
        raise ConfigError("engine.train_mode: must be false for an export: model "
                          "(an exported program runs in the mode it was exported in)")
    return cfg


# --- sections --------------------------------------------------------------------------------


def _model(s: _Section) -> ModelConfig:
    source = s.string("source", _MODEL.source)
    kind, _, rest = source.partition(":")
    if kind in ("torchscript", "export"):
        source = f"{kind}:{s.resolve(rest)}"
    weights = s.optional_path("weights")
    input_shape = s.int_list("input_shape", list(_MODEL.input_shape))
    if len(input_shape) != 3 or min(input_shape) < 1:
        s.fail("input_shape", f"must be [C, H, W] of positive integers, got {input_shape}")
    num_classes = s.integer("num_classes", _MODEL.num_classes, minimum=2)
    mean = s.float_list("mean", list(_MODEL.mean))
    std = s.float_list("std", list(_MODEL.std))
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, input_shape[0]):
            s.fail(key, f"needs 1 or C={input_shape[0]} values, got {len(values)}")
    if any(v <= 0 for v in std):
        s.fail("std", "values must be > 0")
    if weights is None and source_format(source) == "state_dict":
        s.fail("weights", "is required (a state_dict file) unless model.source is torchscript:PATH or export:PATH")
    fmt = s.choice("format", ("auto", *FORMATS), _MODEL.format)
    if {source_format(source), fmt} == {"torchscript", "export"}:
        s.fail("format", f"{source_format(source)} models cannot be published as {fmt} "
                         "(torch.export refuses TorchScript; TorchScript cannot compile an exported program)")
    kwargs = s.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        s.fail("kwargs", f"must be a mapping of keyword arguments, got {kwargs!r}")
    if kwargs and kind not in ("factory", "torchvision"):
        s.fail("kwargs", "only factory: and torchvision: sources take keyword arguments")
    s.take("kwargs", None)
    size = s.take("training_set_size", _MODEL.training_set_size)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        s.fail("training_set_size", f"must be a positive integer or null, got {size!r}")
    s.done()
    return ModelConfig(source=source, weights=None if weights is None else str(weights), num_classes=num_classes,
                       input_shape=(input_shape[0], input_shape[1], input_shape[2]),
                       mean=tuple(mean), std=tuple(std), format=fmt, kwargs=MappingProxyType(dict(kwargs)),
                       training_set_size=size)


def _data(s: _Section) -> DataConfig:
    roots = tuple(s.resolve(r) for r in s.string_list("uri_roots", [str(r) for r in _DATA.uri_roots]))
    max_payload = s.integer("max_payload_bytes", _DATA.max_payload_bytes, minimum=1)
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
        ref = DatasetRef(builtin=s.choice("builtin", DATASETS, None), split=s.choice("split", SPLITS, DatasetRef.split))
    else:
        ref = DatasetRef(path=s.optional_path("path"))
    s.done()
    return ref


def _unlearning(s: _Section) -> UnlearningConfig:
    """The daemon's keys (engine keys were taken out before, as the deprecated layout)."""
    fragment_size = s.integer("fragment_size", _UNLEARNING.fragment_size, minimum=1)
    max_wait_s = s.number("max_wait_s", _UNLEARNING.max_wait_s, minimum=0.0)
    max_audit_drop = s.take("max_audit_drop", _UNLEARNING.max_audit_drop)
    if max_audit_drop is not None and (isinstance(max_audit_drop, bool) or not isinstance(max_audit_drop, (int, float))
                                       or not 0.0 <= max_audit_drop <= 1.0):
        s.fail("max_audit_drop", f"must be a number in [0, 1] or null, got {max_audit_drop!r}")
    max_missed = s.integer("max_missed_fragments", _UNLEARNING.max_missed_fragments, minimum=1)
    if s.get("default_mode") == "relabel":
        s.fail("default_mode", "cannot be relabel: a relabel names its class per request (target_label); "
                               f"use one of {', '.join(DEFAULT_MODES)}")
    default_mode = s.choice("default_mode", DEFAULT_MODES, _UNLEARNING.default_mode)
    drift = s.take("retrain_advised_drift", _UNLEARNING.retrain_advised_drift)
    if drift is not None and (isinstance(drift, bool) or not isinstance(drift, (int, float)) or not 0.0 <= drift <= 1.0):
        s.fail("retrain_advised_drift", f"must be a number in [0, 1] or null, got {drift!r}")
    fraction = s.number("retrain_advised_fraction", _UNLEARNING.retrain_advised_fraction, minimum=0.0)
    s.done()
    return UnlearningConfig(fragment_size=fragment_size, max_wait_s=max_wait_s,
                            max_audit_drop=None if max_audit_drop is None else float(max_audit_drop),
                            max_missed_fragments=max_missed, default_mode=default_mode,
                            retrain_advised_drift=None if drift is None else float(drift),
                            retrain_advised_fraction=fraction)


def _engine(s: _Section, legacy: dict[str, Any]) -> UnlearnConfig:
    """`engine:`: a method preset (`method`) and overrides of any UnlearnConfig field; `legacy`:
    the same keys found under `unlearning:` (the layout before the engine had its own section)."""
    both = sorted(set(legacy) & set(s.keys()))
    if both:
        s.fail(both[0], "is set under both unlearning: and engine:; keep it under engine: only")
    overrides = {**legacy, **{key: s.take(key) for key in s.keys()}}
    unknown = sorted(set(overrides) - set(ENGINE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(s.key(k) for k in unknown)}")
    method = overrides.pop("method", UnlearnConfig.method)
    if not isinstance(method, str) or not method:
        s.fail("method", f"must be a non-empty string, got {method!r}")
    defaults = UnlearnConfig()
    for key, value in overrides.items():
        if key != "trainable" and not _same_kind(value, getattr(defaults, key)):
            where = f"unlearning.{key}" if key in legacy else s.key(key)  # named where the user wrote it
            raise ConfigError(f"{where}: must be a {type(getattr(defaults, key)).__name__}, got {value!r}")
    try:
        engine = method_config(method, **overrides)
    except (ConfigError, TypeError) as err:
        if str(err).startswith("method "):  # named where the user wrote it
            raise ConfigError(f"{'unlearning' if 'method' in legacy else 'engine'}.{err}") from err
        raise ConfigError(f"{'unlearning' if legacy else 'engine'}: {err}") from err
    s.done()
    return engine


def _kafka(s: _Section) -> KafkaConfig:
    bootstrap = s.get("bootstrap_servers", _KAFKA.bootstrap_servers)
    if isinstance(bootstrap, list) and bootstrap and all(isinstance(b, str) and b for b in bootstrap):
        s.take("bootstrap_servers")
        bootstrap = ",".join(bootstrap)
    else:
        bootstrap = s.string("bootstrap_servers", _KAFKA.bootstrap_servers)
    group_id = s.string("group_id", _KAFKA.group_id)
    t = s.section("topics")
    topics = KafkaTopics(*(t.string(f.name, getattr(_TOPICS, f.name)) for f in fields(KafkaTopics)))
    t.done()
    names = [topics.requests, topics.receipts, topics.dead_letter, topics.checkpoints]
    if len(set(names)) != len(names):
        s.fail("topics", f"requests, receipts, dead_letter and checkpoints must be four different topics, got {names}")
    clients = {}
    for name in ("client", "consumer", "producer", "admin"):
        section = s.section(name)
        clients[name] = MappingProxyType({key: section.take(key) for key in section.keys()})
        section.done()
    cfg = KafkaConfig(bootstrap_servers=bootstrap, group_id=group_id, topics=topics, **clients,
                      max_poll_interval_ms=s.integer("max_poll_interval_ms", _KAFKA.max_poll_interval_ms, minimum=1000),
                      dead_letter_payload=s.boolean("dead_letter_payload", _KAFKA.dead_letter_payload),
                      topic_configs=_topic_configs(s.section("topic_configs")))
    s.done()
    return cfg


def _metrics(s: _Section) -> MetricsConfig:
    cfg = MetricsConfig(host=s.string("host", _METRICS.host),
                        port=s.integer("port", _METRICS.port, minimum=0, maximum=65535))
    s.done()
    return cfg


def _topic_configs(s: _Section) -> MappingProxyType:
    """{role: {kafka topic config: str}}: a role left out keeps its default, `{}` means the broker's."""
    out = {}
    for role, defaults in DEFAULT_TOPIC_CONFIGS.items():
        raw = s.take(role, defaults)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict) or not all(isinstance(k, str) and k and isinstance(v, (str, int))
                                                and not isinstance(v, bool) for k, v in raw.items()):
            s.fail(role, f"must map Kafka topic config names to strings or integers, got {raw!r}")
        out[role] = MappingProxyType({k: str(v) for k, v in raw.items()})
    s.done()
    return MappingProxyType(out)


def _privacy(s: _Section, checkpoints_dir: Path) -> PrivacyConfig:
    kek_file = s.optional_path("kek_file")
    kek_env = s.take("kek_env", None)
    if kek_env is not None and (not isinstance(kek_env, str) or not kek_env):
        s.fail("kek_env", f"must be an environment variable name, got {kek_env!r}")
    kek_kms = _kms(s.section("kek_kms")) if s.get("kek_kms") is not None else s.skip("kek_kms")
    given = [name for name, value in (("kek_file", kek_file), ("kek_env", kek_env), ("kek_kms", kek_kms)) if value]
    if len(given) > 1:
        s.fail("", f"set one of kek_file, kek_env and kek_kms, not {' and '.join(given)}")
    vault_dir = s.optional_path("vault_dir") or checkpoints_dir / "vault"
    for name, directory in (("checkpoints.dir", checkpoints_dir), ("privacy.vault_dir", vault_dir)):
        # resolved, symlinks followed: a link to the directory (or from it) is the directory
        if kek_file is not None and kek_file.resolve().is_relative_to(directory.resolve()):
            s.fail("kek_file", f"{kek_file} is inside {name}: a copy of that directory would hold the key "
                               "with the data it protects; keep the KEK elsewhere")
    window = s.section("verify_window")
    days = window.number("days", _PRIVACY.verify_window_days, minimum=0.0)
    if days > MAX_WINDOW_DAYS:
        window.fail("days", f"must be <= {MAX_WINDOW_DAYS:g} (GDPR Art. 12(3): erasure within one month), got {days:g}")
    fragments = window.take("fragments", _PRIVACY.verify_window_fragments)
    if fragments is not None and (isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 0):
        window.fail("fragments", f"must be null or an integer >= 0, got {fragments!r}")
    window.done()
    check_every_s = s.number("check_every_s", _PRIVACY.check_every_s, minimum=0.001)
    deadline = s.number("erasure_deadline_days", _PRIVACY.erasure_deadline_days, minimum=0.0)
    if deadline > MAX_WINDOW_DAYS:
        s.fail("erasure_deadline_days", f"must be <= {MAX_WINDOW_DAYS:g} (GDPR Art. 12(3): one month), got {deadline:g}")
    s.done()
    return PrivacyConfig(kek_file=kek_file, kek_env=kek_env, kek_kms=kek_kms, vault_dir=vault_dir, verify_window_days=days,
                         verify_window_fragments=fragments, check_every_s=check_every_s,
                         erasure_deadline_days=deadline)


def _kms(s: _Section) -> KmsKeyConfig:
    """privacy.kek_kms: {key_id, region, endpoint_url, outage_s}; no credentials (boto3 finds those itself)."""
    optional = {}
    for name in ("region", "endpoint_url"):
        value = s.take(name, None)
        if value is not None and (not isinstance(value, str) or not value):
            s.fail(name, f"must be a non-empty string or null, got {value!r}")
        optional[name] = value
    outage_s = s.number("outage_s", KmsKeyConfig.outage_s, minimum=0.0)
    cfg = KmsKeyConfig(key_id=s.string("key_id", None), **optional, outage_s=outage_s)
    s.done()
    return cfg
