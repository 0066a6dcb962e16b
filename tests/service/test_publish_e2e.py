"""Versions land where serving reads them (checkpoints.publish), end to end: a daemon subprocess,
the real broker and moto's S3 server over HTTP. A store that is down delays uploads, never a
deletion; a kill -9 between the local publish and its upload is caught up on start; after a
rollback the alias names CURRENT; every object equals the local file byte for byte."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, new_topics, produce, read_topic, run_until_crash, train_digits, values, write_config
from object_store import CREDENTIALS, ObjectStore, free_port
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.state import CheckpointStore, version_number

pytestmark = pytest.mark.kafka

SPLITS = load_splits("digits")
BUCKET, PREFIX, MODEL = "serving", "prod", "digits"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _events(indices: range) -> list[tuple[bytes, bytes]]:
    return [(f"p{i}".encode(), encode_event(f"p{i}", "misclassify", int(SPLITS.train.y[i]), SPLITS.train.x[i]))
            for i in indices]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=120)


def _metric(daemon: DaemonProcess, name: str) -> float:
    line = next(x for x in daemon.get("/metrics")[1].splitlines() if x.startswith(f'{name}{{target="models"}}'))
    return float(line.split()[-1])


def _wait_for_store(server: ObjectStore, store: CheckpointStore, timeout_s: float = 90.0) -> dict[str, bytes]:
    """Until the bucket holds CURRENT's lineage and the alias names CURRENT; the objects."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = store.current_version()
        lineage = {m.version for m in store.lineage(current)}
        objects = server.objects(BUCKET)
        numbered = {f"{PREFIX}/{MODEL}/{version_number(v)}/manifest.json" for v in lineage}
        if numbered <= set(objects) and objects.get(f"{PREFIX}/{MODEL}/current/VERSION") == \
                f"{version_number(current)}\n".encode():
            return objects
        assert time.monotonic() < deadline, f"not mirrored: CURRENT {current}, objects {sorted(objects)}"
        time.sleep(0.5)


def _same_as_local(objects: dict[str, bytes], store: CheckpointStore) -> None:
    current = store.current_version()
    for manifest in store.lineage(current):
        local = store.path(manifest.version)
        for directory in {str(version_number(manifest.version))} | ({"current"} if manifest.version == current else set()):
            for name in ("manifest.json", manifest.model_file):
                assert objects[f"{PREFIX}/{MODEL}/{directory}/{name}"] == (local / name).read_bytes()


def test_versions_reach_the_store_through_an_outage_a_kill_9_and_a_rollback(
        kafka_bootstrap: str, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)  # boto3's usual chain, as in production (never in the config)
    port = free_port()
    topics = new_topics(kafka_bootstrap, "publish")
    target = {"kind": "s3", "name": "models", "bucket": BUCKET, "prefix": PREFIX, "model_name": MODEL,
              "endpoint_url": f"http://127.0.0.1:{port}", "region": "us-east-1"}
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, checkpoints={"publish": [target]})
    store = CheckpointStore(tmp_path / "checkpoints")

    server = ObjectStore(port)
    daemon = DaemonProcess(config, tmp_path / "down.log")  # 1. the store is down: deletions go on
    try:
        produce(kafka_bootstrap, topics["requests"], _events(range(200, 204)))
        receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 4, timeout_s=120))
        assert {r["status"] for r in receipts} == {"forgotten"}
        daemon.wait_for("publish_target_down", where=lambda e: e.get("behind") == 3)  # v000000, v000001, alias
        assert _metric(daemon, "streamer_publish_versions_behind") == 3
        assert _metric(daemon, "streamer_publish_failures_total") >= 1
        from deploy_assets import _alert_rules, _referenced_metric_names

        alerted = _referenced_metric_names([r["expr"] for r in _alert_rules() if "publish" in r["expr"]])
        assert alerted == {"streamer_publish_versions_behind"} and all(
            f"{name}{{" in daemon.get("/metrics")[1] for name in alerted)
        server.start()  # 2. it comes up: the next version brings everything
        server.client().create_bucket(Bucket=BUCKET)
        produce(kafka_bootstrap, topics["requests"], _events(range(204, 208)))
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000002", timeout_s=120)
        _same_as_local(_wait_for_store(server, store), store)
        daemon.wait_for("alias_moved", where=lambda e: e.get("version") == "v000002")
        assert _metric(daemon, "streamer_publish_versions_behind") == 0
        assert daemon.stop() == 0

        # 3. kill -9 right after the local publish, before any upload: the restart uploads it
        produce(kafka_bootstrap, topics["requests"], _events(range(208, 212)))
        run_until_crash(config, tmp_path / "crash.log", "after_checkpoint")
        assert store.current_version() == "v000003"
        daemon = DaemonProcess(config, tmp_path / "restart.log")
        _same_as_local(_wait_for_store(server, store), store)
        uploaded = [e["version"] for e in daemon.events() if e["event"] == "version_uploaded"]
        assert uploaded == ["v000003"]  # the earlier ones were recorded: none twice

        # 4. a rollback publishes v000001's weights as v000004, then re-applies: the alias follows CURRENT
        daemon.wait_for("partitions_assigned", timeout_s=90)
        done = _cli("rollback", "--to", "v000001", "--config", str(config))
        assert done.returncode == 0, done.stdout + done.stderr
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000006", timeout_s=300)
        objects = _wait_for_store(server, store)
        _same_as_local(objects, store)
        assert store.current_version() == "v000006" and objects[f"{PREFIX}/{MODEL}/current/VERSION"] == b"6\n"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        server.stop()
