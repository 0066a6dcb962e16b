"""The daemon's configuration: `config.yaml` parsed once into typed, frozen dataclasses.

Every problem is a `ConfigError` that names the key (`kafka.topics.receipts: ...`). Unknown
keys are errors, so a typo never silently falls back to a default. Relative paths
(model.weights, a torchscript model, data.uri_roots, dataset `path`s, checkpoints.dir) are
resolved against the directory of the config file, so the daemon reads the same files from
whatever working directory it is started in.

Public API: the section dataclasses, `load_config`, `parse_config`.
"""
from .parse import load_config, parse_config
from .schema import (DEFAULT_MODES, REQUEST_MODES, CheckpointsConfig, DaemonConfig, DataConfig, DatasetRef, KafkaConfig, KafkaTopics, KmsKeyConfig, LoggingConfig,
                     MetricsConfig, PrivacyConfig, UnlearningConfig)

__all__ = ["DEFAULT_MODES", "REQUEST_MODES", "CheckpointsConfig", "DaemonConfig", "DataConfig", "DatasetRef", "KafkaConfig", "KafkaTopics", "KmsKeyConfig",
           "LoggingConfig", "MetricsConfig", "PrivacyConfig", "UnlearningConfig", "load_config", "parse_config"]
