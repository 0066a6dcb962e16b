"""The dashboard and the alerts against a real Prometheus (Debian's `prometheus` binary) scraping a
real daemon while it unlearns: every Grafana panel's query, and every operand of every alert's
expression, evaluated through Prometheus' HTTP API, returns series (promtool only checks syntax).
The daemon has an audit set, model.training_set_size, an S3 publish target and its KEK in a KMS
(moto), so every series the panels and rules read exists."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from aws_server import AwsServer, free_port
from daemon_harness import DaemonProcess, new_topics, produce, train_digits, write_config
from deploy_assets import PROMETHEUS, _alert_rules, _dashboard_exprs
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event

pytestmark = pytest.mark.kafka

SPLITS = load_splits("digits")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
COMPARISON = re.compile(r"\s(?:>|<|==|!=|>=|<=|and|or|unless)\s")


def _operands(expr: str) -> list[str]:
    """The sub-expressions an alert compares or joins, without the bare numbers (`a > 0 and b`
    -> [a, b]); the top-level parentheses of each removed."""
    parts = [p.strip() for p in COMPARISON.split(expr)]
    parts = [p[1:] if p.startswith("(") and p.count("(") > p.count(")") else p for p in parts]
    parts = [p[:-1] if p.endswith(")") and p.count(")") > p.count("(") else p for p in parts]
    return [p for p in parts if not re.fullmatch(r"[\d\s.*+/-]+", p)]


def test_operands_split_as_intended() -> None:
    assert _operands("(time() - a > 1800) and b > 0") == ["time() - a", "b"]
    assert _operands("up{job=\"s\"} == 0 or absent(up{job=\"s\"})") == ["up{job=\"s\"}", "absent(up{job=\"s\"})"]
    assert _operands("d - time() < 7 * 86400") == ["d - time()"]


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def test_every_panel_and_alert_operand_returns_series(kafka_bootstrap: str, weights: Path, tmp_path: Path,
                                                      aws_server: AwsServer) -> None:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: apt-get install prometheus (./run installs it)"
    aws_server.client("s3").create_bucket(Bucket="scraped")
    topics = new_topics(kafka_bootstrap, "prom")
    target = {"kind": "s3", "name": "models", "bucket": "scraped", "model_name": "digits",
              "endpoint_url": aws_server.endpoint_url, "region": "us-east-1"}
    kms = {"key_id": aws_server.create_kms_key(), "endpoint_url": aws_server.endpoint_url}  # KMS errors' counter
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, checkpoints={"publish": [target]},
                          model={"training_set_size": len(SPLITS.train)},  # the forgotten fraction's gauge
                          privacy={"kek_file": None, "kek_kms": kms})
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    prometheus = None
    try:
        port = daemon.metrics_port()
        rules = tmp_path / "alerts.yml"
        shutil.copy(PROMETHEUS / "alerts.yml", rules)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "streamer", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
        web = free_port()
        prometheus = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"], stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "wb"))  # noqa: SIM115
        produce(kafka_bootstrap, topics["requests"], [
            (f"m{i}".encode(), encode_event(f"m{i}", "misclassify", int(SPLITS.train.y[i]), SPLITS.train.x[i]))
            for i in range(300, 308)])
        daemon.wait_for("fragment_published", count=2, timeout_s=240)  # while Prometheus scrapes
        daemon.wait_for("alias_moved", where=lambda e: e.get("version") == "v000002", timeout_s=60)
        deadline = time.monotonic() + 60
        while True:  # two scrapes after the last fragment, so rate() and deriv() have their points
            try:
                up = _query(web, 'count_over_time(up{job="streamer"}[1m])')
            except OSError:
                up = []
            if up and float(up[0]["value"][1]) >= 5:
                break
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(1)
        time.sleep(3)
        empty = []
        for expr in _dashboard_exprs():
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            if not _query(web, expr):
                empty.append(f"panel: {expr}")
        for rule in _alert_rules():
            for operand in _operands(rule["expr"]):
                result = _query(web, operand)
                if operand.startswith("absent("):
                    assert result == [], f"{rule['alert']}: {operand} is not empty while the daemon is up"
                elif not result:
                    empty.append(f"{rule['alert']}: {operand}")
        assert not empty, "queries without a series:\n" + "\n".join(empty)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
