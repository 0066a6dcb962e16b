"""The `checkpoints` section: the version directory, how many versions to keep, the publish targets."""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

from ._section import _Section
from .schema import CheckpointsConfig

_CHECKPOINTS = CheckpointsConfig()

# Each target kind's keys and defaults (publish/targets.py, publish/registry.py read them); None: required or unset
_COMMON: dict[str, Any] = {"kind": None, "name": None, "model_name": None, "alias": "current",
                           "alias_after_verify": False}
TARGET_KEYS: dict[str, dict[str, Any]] = {
    "s3": {**_COMMON, "bucket": None, "prefix": "", "endpoint_url": None, "region": None},
    "mlflow": {**_COMMON, "tracking_uri": None, "experiment": "streamer"},
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # names that go into keys, filters and labels
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules
_NAMED = "a name of letters, digits, '.', '_', '-' (at most 128)"
_PREFIX = re.compile(r"([A-Za-z0-9._-]+/)*[A-Za-z0-9._-]+")

__all__ = ["TARGET_KEYS", "checkpoints_section"]


def checkpoints_section(s: _Section) -> CheckpointsConfig:
    cfg = CheckpointsConfig(dir=s.resolve(s.string("dir", str(_CHECKPOINTS.dir))),
                            keep=s.integer("keep", _CHECKPOINTS.keep, minimum=0), publish=_publish(s),
                            group_readable=s.boolean("group_readable", _CHECKPOINTS.group_readable))
    s.done()
    return cfg


def _publish(s: _Section) -> tuple[MappingProxyType, ...]:
    """checkpoints.publish: a list of targets. Credentials come from the client libraries' own
    chains (boto3, MLflow), never from here, and no message repeats a value that could be one."""
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
    if kind not in TARGET_KEYS:
        s.fail(where, f"must be a mapping with kind: {' or '.join(TARGET_KEYS)}, got kind {kind!r}"[:200])
    keys = TARGET_KEYS[kind]
    unknown = sorted(str(k) for k in set(item) - set(keys))
    if unknown:
        s.fail(where, f"unknown key(s) {', '.join(unknown)} for kind {kind} (credentials come from the environment)"[:300])
    target = {**keys, "name": f"{kind}-{i}", **{k: v for k, v in item.items() if v is not None}}
    for key in ("name", "model_name", "alias", "experiment", "bucket"):
        if key in keys:
            _check(s, f"{where}.{key}", target[key], _BUCKET if key == "bucket" else _NAME,
                   "an S3 bucket name" if key == "bucket" else _NAMED)
    if kind == "s3" and target["prefix"]:
        _check(s, f"{where}.prefix", str(target["prefix"]).strip("/"), _PREFIX, "path segments of letters, digits, "
               "'.', '_', '-' (no '..', no '//')")
    for key in ("endpoint_url", "region", "tracking_uri"):
        if key in keys and target[key] is not None and not isinstance(target[key], str):
            s.fail(f"{where}.{key}", f"must be text, got a {type(target[key]).__name__}")
    if kind == "mlflow" and target["tracking_uri"] is None:
        s.fail(f"{where}.tracking_uri", "is required")
    if not isinstance(target["alias_after_verify"], bool):
        s.fail(f"{where}.alias_after_verify", "must be true or false")
    return MappingProxyType(target)


def _check(s: _Section, key: str, value: Any, pattern: re.Pattern, what: str) -> None:
    if value is None:
        s.fail(key, "is required")
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        s.fail(key, f"must be {what}, got {str(value)[:80]!r}")
