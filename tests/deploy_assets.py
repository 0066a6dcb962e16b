"""The deploy/ assets read as data: shared by tests/deploy/test_deploy.py and the daemon's e2e
test (every metric the dashboard and alerts reference is in a real scrape)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

DATA_FILES = sorted(
    p for pattern in ("*.yml", "*.yaml", "*.json") for p in DEPLOY.rglob(pattern) if p.is_file()
)
_METRIC_REF = re.compile(r"(?<![\w:])streamer_\w+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _alert_rules() -> list[dict[str, Any]]:
    groups = _yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "streamer.json").read_text())


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", []) if "expr" in t]


def _referenced_metric_names(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        for name in _METRIC_REF.findall(expr):
            for suffix in _HISTOGRAM_SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            names.add(name)
    return names
