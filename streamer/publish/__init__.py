"""Publish targets: every version mirrored, after it is durable locally, to where serving stacks
read models (an S3-compatible object store), with an alias kept on CURRENT.

Public API: `Mirror` (the upload thread), `S3Target`, `PublishTarget`, `TargetDown`, `UploadLog`,
`make_targets` (the configured targets).
"""
from ..errors import ConfigError
from .mirror import Mirror
from .targets import PublishTarget, S3Target, TargetDown
from .uploads import UploadLog


def make_targets(settings: list) -> list[PublishTarget]:
    """The targets of `checkpoints.publish` (each a mapping with `kind`)."""
    kinds = {"s3": S3Target.of}
    try:
        return [kinds[s["kind"]](s) for s in settings]
    except ImportError as err:
        raise ConfigError(f"checkpoints.publish needs boto3: pip install 'streamer[aws]' ({err})") from err


__all__ = ["Mirror", "PublishTarget", "S3Target", "TargetDown", "UploadLog", "make_targets"]
