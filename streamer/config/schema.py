"""The daemon's configuration: `config.yaml` parsed once into typed, frozen dataclasses.

Every problem is a `ConfigError` that names the key (`kafka.topics.receipts: ...`). Unknown
keys are errors, so a typo never silently falls back to a default. Relative paths
(model.weights, a torchscript model, data.uri_roots, dataset `path`s, checkpoints.dir) are
resolved against the directory of the config file, so the daemon reads the same files from
whatever working directory it is started in.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any


from ..engine import ModelConfig, UnlearnConfig

DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("train", "buffer", "audit")
LOG_LEVELS = ("debug", "info", "warning", "error")
# A request's goal (its event's `mode`): misclassify = any class but its label (the paper's);
# relabel = a requested class; unseen = where a model that never saw it puts it (README "Goals").
REQUEST_MODES = ("misclassify", "relabel", "unseen")
DEFAULT_MODES = ("misclassify", "unseen")  # for an event without `mode` (relabel needs a target_label)

__all__ = [
    "CheckpointsConfig",
    "DaemonConfig",
    "DataConfig",
    "DatasetRef",
    "KafkaConfig",
    "KafkaTopics",
    "KmsKeyConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PrivacyConfig",
    "UnlearningConfig",
]

DAY_S = 86_400.0
# Topic settings the daemon creates its topics with (kafka.topic_configs). Kafka deletes a whole
# log segment once its newest record is older than retention.ms, and the active segment only
# after it rolls (segment.ms), so a record can live up to retention.ms + segment.ms (+ the
# broker's retention check interval, 5 min by default): 3 + 1 days for requests and dead letters.
SHORT_RETENTION = {"retention.ms": str(3 * 86_400_000), "segment.ms": str(86_400_000), "cleanup.policy": "delete"}
DEFAULT_TOPIC_CONFIGS = {"requests": SHORT_RETENTION, "dead_letter": SHORT_RETENTION, "receipts": {},
                         "checkpoints": {}}


@dataclass(frozen=True)
class DatasetRef:
    """A labelled image set: a split of a built-in dataset, or a torch file holding
    {"x": (N, C, H, W) float in [0, 1], "y": (N,) int}."""

    builtin: str | None = None  # digits | mnist5k | fashion
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
    """The daemon's side of unlearning: fragments, guard rails, the default goal. The engine's
    own settings are `DaemonConfig.engine` (the `engine:` section)."""

    fragment_size: int = 8  # k_CL
    max_wait_s: float = 5.0
    # Guard rail: a fragment that would drop audit accuracy more than this below the base model's
    # is not published (its requests fail). None: no floor. Needs data.audit.
    max_audit_drop: float | None = 0.5
    # An instance still missing its goal after this many fragments leaves the objective (`abandoned`).
    max_missed_fragments: int = 3
    default_mode: str = "misclassify"  # the goal of an event without `mode`: one of DEFAULT_MODES
    # "Retrain advised" (a gauge and an alert) before the budget is reached: at this audit drift
    # (None: half of max_audit_drop), or once this fraction of model.training_set_size is forgotten.
    retrain_advised_drift: float | None = None
    retrain_advised_fraction: float = 0.01


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
    client: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # kafka-python kwargs, all clients
    consumer: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # KafkaConsumer only
    producer: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # KafkaProducer only
    admin: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # KafkaAdminClient only
    # The consumer keeps polling (partitions paused) while a fragment runs, so this only has
    # to cover one poll loop iteration, not a whole fragment.
    max_poll_interval_ms: int = 300_000
    dead_letter_payload: bool = False  # copy the raw record into its dead letter (it may hold personal data)
    # {requests|receipts|dead_letter|checkpoints: {kafka topic config: value}}, used when the
    # daemon creates a topic; existing topics keep theirs.
    topic_configs: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({k: MappingProxyType(v) for k, v in DEFAULT_TOPIC_CONFIGS.items()}))

    def settings(self, client: str) -> dict[str, Any]:
        """kafka-python keyword arguments for `client` ("consumer", "producer" or "admin"):
        the common `client` settings, then that client's own overrides."""
        own = {"consumer": self.consumer, "producer": self.producer, "admin": self.admin}[client]
        return {**self.client, **own}


@dataclass(frozen=True)
class CheckpointsConfig:
    dir: Path = Path("runs/checkpoints")
    keep: int = 0  # 0 keeps every version
    # Publish targets every version is mirrored to once durable locally: each a mapping
    # {kind: s3, name, bucket, prefix, model_name, alias, endpoint_url, region} (publish/targets.py)
    publish: tuple[Mapping[str, Any], ...] = ()

    # Published versions (model files, manifests, CURRENT) readable by the group (0640, directories
    # 0750), for a serving process of another user in that group; the rest stays the owner's alone
    group_readable: bool = False


@dataclass(frozen=True)
class KmsKeyConfig:
    """A KEK held by a KMS that speaks the AWS KMS API (privacy.kek_kms). Credentials come from
    boto3's usual chain (environment, shared files, instance role), never from the config."""

    key_id: str  # key id, key ARN, alias name (alias/...) or alias ARN
    region: str | None = None  # None: boto3's (AWS_REGION / AWS_DEFAULT_REGION / ~/.aws/config)
    endpoint_url: str | None = None  # None: the region's AWS endpoint; else e.g. a VPC endpoint or a test server
    outage_s: float = 300.0  # seconds a KMS that is unreachable or throttles is retried before a call fails

    def describe(self) -> str:
        return f"KMS key {self.key_id}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")


@dataclass(frozen=True)
class PrivacyConfig:
    """The forget vault and its verification window (README "Data protection")."""

    kek_file: Path | None = None  # the KEK: a file (base64, 64 hex digits or 32 raw bytes) ...
    kek_env: str | None = None  # ... or an environment variable (base64 or hex) ...
    kek_kms: KmsKeyConfig | None = None  # ... or a KMS key (AWS KMS API); exactly one of the three
    vault_dir: Path | None = None  # None: <checkpoints.dir>/vault
    # GDPR Art. 12(3)/17: erasure within one month. Shred 14 days after a request was first
    # applied, or after it was verified in this many later versions, whichever comes first.
    verify_window_days: float = 14.0
    verify_window_fragments: int | None = None
    check_every_s: float = 60.0  # how often an idle daemon looks for closed windows
    # A deferred request's erasure deadline: received + this (GDPR Art. 12(3): one month)
    erasure_deadline_days: float = 30.0

    def vault_path(self, checkpoints_dir: Path) -> Path:
        return self.vault_dir if self.vault_dir is not None else checkpoints_dir / "vault"

    @property
    def window_seconds(self) -> float:
        return self.verify_window_days * DAY_S


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9108  # 0 picks a free port


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True)
class DaemonConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    engine: UnlearnConfig = field(default_factory=UnlearnConfig)  # the `engine:` section, via method_config
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deprecations: tuple[str, ...] = ()  # one line per deprecated use found in the file (logged at start)
