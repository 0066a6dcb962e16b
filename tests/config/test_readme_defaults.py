"""Each config default has one home (the schema's dataclasses); README and config.yaml agree with it.

README's "Configuration" table documents every key with its default; config.yaml sets only
CONFIG_YAML_DIFFERS differently, on purpose (so the checkout runs as it is).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from streamer.config import DaemonConfig
from streamer.engine import UnlearnConfig

ROOT = Path(__file__).resolve().parents[2]
# config.yaml's deliberate differences from the defaults (README says why, above its table)
CONFIG_YAML_DIFFERS = {"model.weights", "data.uri_roots", "data.datasets", "data.audit", "privacy.kek_file"}
NOT_KEYS = {"deprecations"}  # DaemonConfig fields that no YAML key sets
RENAMED = {"privacy.verify_window_days": "privacy.verify_window.days",
           "privacy.verify_window_fragments": "privacy.verify_window.fragments"}
EXPANDED = ("kafka.topics", "kafka.topic_configs")  # documented one row per member


def _plain(value: Any) -> Any:
    """A default as YAML would spell it: tuples as lists, paths as strings, mappings as dicts."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def schema_defaults() -> dict[str, Any]:
    """Every config key -> its default, from the dataclasses (the engine's from UnlearnConfig)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if key in NOT_KEYS:
                continue
            if dataclasses.is_dataclass(value):
                walk(f"{key}.", value)
            elif key in EXPANDED:
                out.update({f"{key}.{k}": _plain(v) for k, v in value.items()})
            else:
                out[RENAMED.get(key, key)] = _plain(value)

    defaults = DaemonConfig()
    walk("", dataclasses.replace(defaults, engine=UnlearnConfig()))
    out.update({f"kafka.topics.{f.name}": getattr(defaults.kafka.topics, f.name)
                for f in dataclasses.fields(defaults.kafka.topics)})
    out.pop("kafka.topics", None)
    return out


def readme_defaults() -> dict[str, Any]:
    """The README Configuration table: key -> its default cell, read as YAML."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", table, re.M)
    return {key: yaml.safe_load(cell) for key, cell in rows}


def _get(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return KeyError
        node = node[part]
    return node


class TestReadmeDefaults:
    def test_every_key_has_a_row_with_the_schemas_default(self) -> None:
        """Same keys, same defaults (numbers compared as numbers: 600 is 600.0)."""
        schema, readme = schema_defaults(), readme_defaults()
        assert sorted(readme) == sorted(schema)
        wrong = {k: (readme[k], schema[k]) for k in schema if readme[k] != schema[k]}
        assert wrong == {}

    def test_config_yaml_differs_only_where_it_says(self) -> None:
        """config.yaml's values are the defaults, except the listed keys, which it does set otherwise."""
        raw = yaml.safe_load((ROOT / "config.yaml").read_text())
        schema = schema_defaults()
        same = {k for k, v in schema.items() if _get(raw, k) is KeyError or _get(raw, k) == v}
        assert set(schema) - same == CONFIG_YAML_DIFFERS
