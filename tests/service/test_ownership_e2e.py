"""One model sees every request, and intake goes on while a fragment runs (real daemons, real broker).

Two daemons in the same consumer group, each with its own checkpoint directory (a replicated
Deployment): Kafka's group protocol would split the partitions between them; the daemon owns every
partition itself, so each model applies all the requests. And records that fail validation are
answered while a fragment is still unlearning (held there by a hold point), not after it.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, new_topics, produce, read_topic, train_digits, values, write_config
from kafka_broker import create_topics
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.state.checkpoints import CheckpointStore

pytestmark = pytest.mark.kafka

TRAIN = load_splits("digits").train


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _event(rid: str, index: int) -> tuple[bytes, bytes]:
    return rid.encode(), encode_event(rid, "misclassify", int(TRAIN.y[index]), TRAIN.x[index])


def _applied(checkpoints: Path) -> Counter:
    store = CheckpointStore(checkpoints)
    return Counter(r["request_id"] for m in store.lineage(store.current_version()) for r in m.requests)


def test_two_daemons_in_one_group_each_apply_every_request(kafka_bootstrap: str, weights: Path,
                                                           tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap, "owned", request_partitions=3)
    group = f"streamer.shared.{uuid.uuid4().hex[:8]}"
    outputs = {}
    daemons = []
    for name in ("a", "b"):
        own = {k: f"{v}.{name}" for k, v in topics.items() if k != "requests"}
        create_topics(kafka_bootstrap, own.values(), 1)
        outputs[name] = {**own, "requests": topics["requests"]}
        config = write_config(tmp_path / name, kafka_bootstrap, outputs[name], weights, kafka={"group_id": group})
        daemons.append(DaemonProcess(config, tmp_path / f"{name}.log"))
    ids = [f"o{i}" for i in range(24)]
    try:
        for daemon in daemons:
            (assigned,) = daemon.wait_for("partitions_assigned", timeout_s=90)
            assert len(assigned["positions"]) == 3  # every partition, whoever else is in the group
        produce(kafka_bootstrap, topics["requests"], [_event(rid, 200 + i) for i, rid in enumerate(ids)])
        for daemon in daemons:
            daemon.wait_for("request_outcome", count=24, timeout_s=300)
    finally:
        for daemon in daemons:
            daemon.stop()
    for name in ("a", "b"):
        assert _applied(tmp_path / name / "checkpoints") == Counter({rid: 1 for rid in ids})
        receipts = values(read_topic(kafka_bootstrap, outputs[name]["receipts"], 24))
        assert sorted(r["request_id"] for r in receipts) == sorted(ids)
        assert {r["status"] for r in receipts} == {"forgotten"}


def test_invalid_records_are_answered_while_a_fragment_runs(kafka_bootstrap: str, weights: Path,
                                                            tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap, "intake")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights)
    release = tmp_path / "release"
    daemon = DaemonProcess(config, tmp_path / "daemon.log", hold_at=("during_unlearn", release))
    bad = [(b"bad-json", b"{not json"),
           (b"bad-label", json.dumps({"schema": 1, "request_id": "bad-label", "label": 99,
                                      "sample": {"dataset": "digits", "index": 0}}).encode())]
    try:
        daemon.wait_for("partitions_assigned", timeout_s=90)
        produce(kafka_bootstrap, topics["requests"], [_event(f"v{i}", 300 + i) for i in range(4)])
        daemon.wait_for("hold_hook", timeout_s=60)  # the fragment of 4 is unlearning, held
        produce(kafka_bootstrap, topics["requests"], [*bad, _event("v4", 304)])
        rejected = daemon.wait_for("request_outcome", count=2, timeout_s=60, where=lambda e: e["status"] == "rejected")
        assert [e for e in daemon.events() if e["event"] == "fragment_published"] == []  # still held
        release.touch()
        daemon.wait_for("hold_hook", count=2, timeout_s=120)  # v4, held while the first ran, is the next fragment
        release.touch()
        daemon.wait_for("request_outcome", count=7, timeout_s=120)
    finally:
        daemon.stop()
    assert sorted(e["request_id"] for e in rejected) == ["bad-json", "bad-label"]  # (the key names the first)
    store = CheckpointStore(tmp_path / "checkpoints")
    assert sorted(_applied(tmp_path / "checkpoints")) == [f"v{i}" for i in range(5)]
    current = store.manifest(store.current_version())
    assert current.offsets[topics["requests"]][0] == 7  # every record read, answered and committed
