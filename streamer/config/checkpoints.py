"""The `checkpoints` section: the version directory, how many versions to keep, the publish targets."""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from ._section import _Section
from .schema import CheckpointsConfig

_CHECKPOINTS = CheckpointsConfig()

# An S3 target's keys and defaults (publish/targets.py reads them); None: required or unset
S3_KEYS: dict[str, Any] = {"kind": None, "name": None, "bucket": None, "prefix": "", "model_name": None,
                           "alias": "current", "endpoint_url": None, "region": None}
_NAMES = ("name", "bucket", "model_name", "alias")  # non-empty; all but the bucket without '/'
_OPTIONAL_TEXT = ("prefix", "endpoint_url", "region")

__all__ = ["S3_KEYS", "checkpoints_section"]


def checkpoints_section(s: _Section) -> CheckpointsConfig:
    cfg = CheckpointsConfig(dir=s.resolve(s.string("dir", str(_CHECKPOINTS.dir))),
                            keep=s.integer("keep", _CHECKPOINTS.keep, minimum=0), publish=_publish(s))
    s.done()
    return cfg


def _publish(s: _Section) -> tuple[MappingProxyType, ...]:
    """checkpoints.publish: a list of targets. Credentials come from boto3's chain, never from here,
    and no error message repeats a value that could be one (only key names and kinds)."""
    raw = s.take("publish", list(_CHECKPOINTS.publish))
    if not isinstance(raw, list):
        s.fail("publish", f"must be a list of targets, got a {type(raw).__name__}")
    targets = [_target(s, f"publish[{i}]", item, i) for i, item in enumerate(raw)]
    names = [t["name"] for t in targets]
    if len(set(names)) != len(names):
        s.fail("publish", f"target names must differ, got {names}")
    return tuple(targets)


def _target(s: _Section, where: str, item: Any, i: int) -> MappingProxyType:
    kind = item.get("kind") if isinstance(item, dict) else None
    if kind != "s3":
        s.fail(where, f"must be a mapping with kind: s3, got kind {kind!r}"[:200])
    unknown = sorted(str(k) for k in set(item) - set(S3_KEYS))
    if unknown:
        s.fail(where, f"unknown key(s) {', '.join(unknown)} (credentials come from the environment)"[:300])
    target = {**S3_KEYS, "name": f"s3-{i}", **{k: v for k, v in item.items() if v is not None}}
    for key in _NAMES:
        value = target[key]
        if not isinstance(value, str) or not value or ("/" in value and key != "bucket"):
            s.fail(f"{where}.{key}", f"must be a non-empty name without '/', got {value!r}"[:200])
    for key in _OPTIONAL_TEXT:
        if target[key] is not None and not isinstance(target[key], str):
            s.fail(f"{where}.{key}", f"must be text, got a {type(target[key]).__name__}")
    return MappingProxyType(target)
