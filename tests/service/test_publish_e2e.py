"""Versions land where serving reads them (checkpoints.publish), end to end: a daemon subprocess,
the real broker, moto's S3 server and an MLflow registry server, each its own process over HTTP.
A store that is down delays uploads, never a deletion; a kill -9 between the local publish and
its upload is caught up on start; the registry's alias waits for `streamer verify`
(alias_after_verify); after a rollback both aliases name CURRENT; every model object equals the
local file byte for byte."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aws_server import AwsServer
from daemon_harness import DaemonProcess, new_topics, produce, read_topic, run_until_crash, train_digits, values, write_config
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.publish.mirror import serving_manifest
from streamer.state import CheckpointStore, version_number

pytestmark = pytest.mark.kafka

SPLITS = load_splits("digits")
BUCKET, PREFIX, MODEL = "serving", "prod", "digits"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=180)


def _events(indices: range) -> list[tuple[bytes, bytes]]:
    return [(f"p{i}".encode(), encode_event(f"p{i}", "misclassify", int(SPLITS.train.y[i]), SPLITS.train.x[i]))
            for i in indices]


def _metric(daemon: DaemonProcess, name: str, target: str) -> float:
    line = next(x for x in daemon.get("/metrics")[1].splitlines() if x.startswith(f'{name}{{target="{target}"}}'))
    return float(line.split()[-1])


def _until(check, what: str, timeout_s: float = 90.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.5)


def _mirrored(server: AwsServer, store: CheckpointStore) -> dict[str, bytes] | None:
    """The bucket's objects once they hold CURRENT's lineage and the alias names CURRENT, else None."""
    current = store.current_version()
    objects = server.objects(BUCKET)
    numbered = {f"{PREFIX}/{MODEL}/{version_number(m.version)}/streamer.json" for m in store.lineage(current)}
    alias = objects.get(f"{PREFIX}/{MODEL}/current/VERSION") == f"{version_number(current)}\n".encode()
    return objects if numbered <= set(objects) and alias else None


def _same_as_local(objects: dict[str, bytes], store: CheckpointStore) -> None:
    current = store.current_version()
    for manifest in store.lineage(current):
        for directory in {str(version_number(manifest.version))} | ({"current"} if manifest.version == current else set()):
            local = store.path(manifest.version) / manifest.model_file
            assert objects[f"{PREFIX}/{MODEL}/{directory}/{manifest.model_file}"] == local.read_bytes()
            assert objects[f"{PREFIX}/{MODEL}/{directory}/streamer.json"] == serving_manifest(manifest)
    assert not any(b"p20" in data for key, data in objects.items() if key.endswith(".json"))  # no request id


def _registry(uri: str) -> tuple[dict[str, dict[str, str]], str | None]:
    """streamer version -> the tags of its registered model version; the version the alias names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(f"name = '{MODEL}-e2e'")
    by_number = {mv.version: mv.tags for mv in found}
    try:
        alias = by_number[client.get_model_version_by_alias(f"{MODEL}-e2e", "current").version]["streamer_version"]
    except MlflowException:
        alias = None
    assert len(by_number) == len({t["streamer_version"] for t in by_number.values()})  # one per version
    return {t["streamer_version"]: t for t in by_number.values()}, alias


def test_versions_reach_the_store_and_the_registry_through_an_outage_a_kill_9_and_a_rollback(
        kafka_bootstrap: str, weights: Path, tmp_path: Path, aws_server: AwsServer, mlflow_uri: str) -> None:
    server = AwsServer(tmp_path / "moto.log")  # its own store: down first, started below on its port
    topics = new_topics(kafka_bootstrap, "publish")
    s3 = {"kind": "s3", "name": "models", "bucket": BUCKET, "prefix": PREFIX, "model_name": MODEL,
          "endpoint_url": server.endpoint_url, "region": "us-east-1"}
    registry = {"kind": "mlflow", "name": "registry", "tracking_uri": mlflow_uri, "model_name": f"{MODEL}-e2e",
                "alias_after_verify": True}
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, checkpoints={"publish": [s3, registry]})
    store = CheckpointStore(tmp_path / "checkpoints")

    daemon = DaemonProcess(config, tmp_path / "down.log")  # 1. the store is down: deletions go on
    try:
        produce(kafka_bootstrap, topics["requests"], _events(range(200, 204)))
        receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 4, timeout_s=120))
        assert {r["status"] for r in receipts} == {"forgotten"}
        daemon.wait_for("publish_target_down", where=lambda e: e.get("target") == "models" and e.get("behind") == 3)
        assert _metric(daemon, "streamer_publish_versions_behind", "models") == 3  # v000000, v000001, alias
        assert _metric(daemon, "streamer_publish_failures_total", "models") >= 1
        versions, alias = _until(lambda: (lambda r: r if len(r[0]) == 2 else None)(_registry(mlflow_uri)), "registry")
        assert set(versions) == {"v000000", "v000001"} and alias is None  # nothing verified yet
        assert versions["v000001"]["sha256"] == store.manifest("v000001").model_sha256
        assert _metric(daemon, "streamer_publish_versions_behind", "registry") == 1  # the alias waits

        verified = _cli("verify", "--config", str(config))  # 2. verify: the registry's alias moves
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads((store.path("v000001") / "verified.json").read_text())["ok"] is True
        _until(lambda: _registry(mlflow_uri)[1] == "v000001", "the registry alias on v000001")

        server.start()  # 3. the store comes up: the next version brings everything
        server.client("s3").create_bucket(Bucket=BUCKET)
        produce(kafka_bootstrap, topics["requests"], _events(range(204, 208)))
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000002", timeout_s=120)
        _same_as_local(_until(lambda: _mirrored(server, store), "mirrored v000002"), store)
        assert _metric(daemon, "streamer_publish_versions_behind", "models") == 0
        assert daemon.stop() == 0

        # 4. kill -9 right after the local publish, before any upload: the restart uploads it, once
        produce(kafka_bootstrap, topics["requests"], _events(range(208, 212)))
        run_until_crash(config, tmp_path / "crash.log", "after_checkpoint")
        assert store.current_version() == "v000003"
        daemon = DaemonProcess(config, tmp_path / "restart.log")
        _same_as_local(_until(lambda: _mirrored(server, store), "mirrored v000003"), store)
        _until(lambda: "v000003" in _registry(mlflow_uri)[0], "v000003 in the registry")
        uploaded = [(e["target"], e["version"]) for e in daemon.events() if e["event"] == "version_uploaded"]
        assert sorted(uploaded) == [("models", "v000003"), ("registry", "v000003")]  # nothing twice

        # 5. a rollback publishes v000001's weights as v000004, then re-applies; verify, and both aliases follow
        daemon.wait_for("partitions_assigned", timeout_s=90)
        done = _cli("rollback", "--to", "v000001", "--config", str(config))
        assert done.returncode == 0, done.stdout + done.stderr
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000006", timeout_s=300)
        _same_as_local(_until(lambda: _mirrored(server, store), "mirrored v000006"), store)
        assert _cli("verify", "--config", str(config)).returncode == 0
        _until(lambda: _registry(mlflow_uri)[1] == "v000006", "the registry alias on v000006")
        versions, _ = _registry(mlflow_uri)
        assert {m.version for m in store.lineage("v000006")} <= set(versions)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        server.stop()
