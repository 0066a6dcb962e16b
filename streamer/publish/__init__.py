"""Publish targets: every version mirrored, after it is durable locally, to where serving stacks
read models (an S3-compatible object store, an MLflow model registry), with an alias kept on CURRENT.

Public API: `Mirror` (the upload thread), `S3Target`, `MlflowTarget`, `PublishTarget`, `TargetDown`, `UploadLog`,
`make_targets` (the configured targets).
"""
from ..errors import ConfigError
from .mirror import Mirror
from .registry import MlflowTarget
from .targets import PublishTarget, S3Target, TargetDown
from .uploads import UploadLog


def make_targets(settings: list) -> list[PublishTarget]:
    """The targets of `checkpoints.publish` (each a mapping with `kind`)."""
    kinds = {"s3": (S3Target.of, "aws"), "mlflow": (MlflowTarget.of, "mlflow")}
    targets = []
    for s in settings:
        make, extra = kinds[s["kind"]]
        try:
            targets.append(make(s))
        except ImportError as err:
            raise ConfigError(f"checkpoints.publish kind {s['kind']} needs pip install 'streamer[{extra}]' ({err})") from err
    return targets


__all__ = ["MlflowTarget", "Mirror", "PublishTarget", "S3Target", "TargetDown", "UploadLog", "make_targets"]
