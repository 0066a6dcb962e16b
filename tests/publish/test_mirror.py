"""The mirror (streamer/publish/mirror.py) over a real checkpoint store and upload log: a fake target
for the pure logic (order, idempotence, orphans, backoff), moto's S3 server for S3Target's layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
import torch
from prometheus_client import CollectorRegistry

from aws_server import AwsServer
from streamer.publish import Mirror, S3Target, TargetDown, UploadLog
from streamer.publish.mirror import FIRST_BACKOFF_S, IDLE_PASS_S, MAX_BACKOFF_S, serving_manifest
from streamer.state import LEDGER_FILE, CheckpointStore, record_verification
from streamer.telemetry import Metrics


class FakeTarget:
    """Records every put; `down` makes each put raise TargetDown."""

    def __init__(self, name: str = "t") -> None:
        self.name, self.down, self.puts = name, False, []

    alias_after_verify = False

    def put_version(self, version: str, files: dict) -> None:
        self._put(("version", int(version[1:]), sorted(files)))

    def put_alias(self, version: str, files: dict) -> None:
        self._put(("alias", int(version[1:]), sorted(files)))

    def _put(self, what: tuple) -> None:
        if self.down:
            raise TargetDown("unreachable")
        self.puts.append(what)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), float(seed))}


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "ckpt")
    parent = None
    for seed in range(3):  # v000000..v000002
        parent = store.publish(parent, _weights(seed)).version
    return store


def _mirror(store: CheckpointStore, target: FakeTarget) -> tuple[Mirror, UploadLog, Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.publish.targets([target.name])
    return Mirror(store, [target], metrics, structlog.get_logger()), UploadLog(store.root / LEDGER_FILE), metrics, registry


def _behind(registry: CollectorRegistry, target: str = "t") -> float | None:
    return registry.get_sample_value("streamer_publish_versions_behind", {"target": target})


def test_uploads_the_lineage_oldest_first_then_the_alias_and_each_once(store: CheckpointStore) -> None:
    target = FakeTarget()
    mirror, log, _, registry = _mirror(store, target)
    assert mirror.sync(target, log) == IDLE_PASS_S
    files = ["model.pt", "streamer.json"]
    assert target.puts == [("version", 0, files), ("version", 1, files), ("version", 2, files), ("alias", 2, files)]
    assert _behind(registry) == 0
    mirror.sync(target, log)
    assert len(target.puts) == 4  # recorded: nothing is uploaded twice
    assert log.uploaded("t") == {"v000000", "v000001", "v000002"} and log.alias("t") == "v000002"


def test_an_orphan_is_never_uploaded_and_the_alias_follows_a_rollback(store: CheckpointStore) -> None:
    target = FakeTarget()
    mirror, log, _, _ = _mirror(store, target)
    mirror.sync(target, log)
    orphan = store.publish("v000002", _weights(9))  # v000003, then CURRENT switched back past it:
    store.switch("v000001")  # an orphan, as a crash before the switch leaves one; and a rollback of CURRENT
    assert store.orphans() == ["v000002", orphan.version]
    target.puts.clear()
    mirror.sync(target, log)
    assert target.puts == [("alias", 1, ["model.pt", "streamer.json"])]
    child = store.publish("v000001", _weights(10))  # v000004, parent v000001: uploaded, the orphan still not
    target.puts.clear()
    mirror.sync(target, log)
    assert [p[:2] for p in target.puts] == [("version", 4), ("alias", 4)] and child.version == "v000004"


def test_with_alias_after_verify_the_alias_waits_for_a_passing_verify(store: CheckpointStore) -> None:
    target = FakeTarget()
    target.alias_after_verify = True
    mirror, log, _, registry = _mirror(store, target)
    mirror.sync(target, log)
    assert [p[0] for p in target.puts] == ["version"] * 3 and _behind(registry) == 1  # the alias is owed
    record_verification(store.path("v000002"), {"version": "v000002", "ok": False})
    mirror.sync(target, log)
    assert len(target.puts) == 3
    record_verification(store.path("v000002"), {"version": "v000002", "ok": True})
    mirror.sync(target, log)
    assert target.puts[-1][:2] == ("alias", 2) and _behind(registry) == 0


def test_the_serving_manifest_names_no_request(store: CheckpointStore) -> None:
    """Request ids, subjects, offsets and vault references stay local; the counts and numbers go."""
    manifest = store.publish("v000002", _weights(5), requests=[{"request_id": "alice-42", "subject": "alice"}],
                             offsets={"req": {0: 9}}, metrics={"audit_accuracy": 0.9})
    data = json.loads(serving_manifest(manifest))
    assert "alice" not in json.dumps(data) and not {"requests", "offsets", "retained", "replay"} & set(data)
    assert data["version"] == "v000003" and data["requests_applied"] == 1 and data["metrics"]["audit_accuracy"] == 0.9
    assert data["model_sha256"] == manifest.model_sha256


def test_a_target_down_backs_off_counts_and_catches_up(store: CheckpointStore) -> None:
    target = FakeTarget()
    target.down = True
    mirror, log, _, registry = _mirror(store, target)
    waits = [mirror.sync(target, log) for _ in range(12)]
    assert waits[:3] == [FIRST_BACKOFF_S, 2 * FIRST_BACKOFF_S, 4 * FIRST_BACKOFF_S] and waits[-1] == MAX_BACKOFF_S
    assert _behind(registry) == 4  # three versions and the alias
    assert registry.get_sample_value("streamer_publish_failures_total", {"target": "t"}) == 12
    target.down = False
    assert mirror.sync(target, log) == IDLE_PASS_S and _behind(registry) == 0 and len(target.puts) == 4


def test_the_thread_uploads_on_a_nudge_and_stops(store: CheckpointStore) -> None:
    target = FakeTarget()
    mirror, log, _, registry = _mirror(store, target)
    mirror.start()
    try:
        for _ in range(200):
            if len(target.puts) == 4:
                break
            mirror._wake.wait(0.05)
        store.publish("v000002", _weights(3))
        mirror.nudge()
        for _ in range(200):
            if len(target.puts) == 6:
                break
            mirror._stopping.wait(0.05)
    finally:
        mirror.stop()
    assert [p[:2] for p in target.puts][-2:] == [("version", 3), ("alias", 3)]
    assert mirror._thread is not None and not mirror._thread.is_alive()


class TestS3Target:
    def test_layout_is_numbered_versions_and_an_alias_with_version(self, aws_server: AwsServer) -> None:
        aws_server.client("s3").create_bucket(Bucket="layout")
        target = S3Target("s3", "layout", "prod", "digits", "current", aws_server.client("s3"))
        target.put_version("v000007", {"model.pt": b"weights", "streamer.json": b"{}"})
        target.put_alias("v000007", {"model.pt": b"weights", "streamer.json": b"{}"})
        assert aws_server.objects("layout") == {
            "prod/digits/7/model.pt": b"weights", "prod/digits/7/streamer.json": b"{}",
            "prod/digits/current/model.pt": b"weights", "prod/digits/current/streamer.json": b"{}",
            "prod/digits/current/VERSION": b"7\n"}
        missing = S3Target("s3", "no-such-bucket", "", "digits", "current", aws_server.client("s3"))
        with pytest.raises(TargetDown, match="no-such-bucket"):
            missing.put_version("v000001", {"model.pt": b"x"})
