"""Chaos tests of the failure policy against the real broker: no input stops the daemon.

Each test feeds the kind of input that used to halt the daemon for good (or publish a broken
model with success receipts) and checks that the daemon stays alive, that every request has
exactly one terminal outcome with a reason, and that healthy requests behind the poison are
applied. The poisoned model is a `factory:` model (tests/poisoned_model.py, made importable
through PYTHONPATH) whose forward raises on an all-ones image and returns NaN logits on an
all-0.5 image, as a user's model with an assertion, or a CUDA OOM on one input, would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from daemon_harness import DaemonProcess, new_topics, produce, read_topic, train_digits, values, write_config
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.state.checkpoints import CheckpointStore
from streamer.state.ledger import LEDGER_FILE, Ledger

pytestmark = pytest.mark.kafka

TRAIN = load_splits("digits").train
TESTS = Path(__file__).resolve().parents[1]
ONES = torch.ones(1, 8, 8)
HALVES = torch.full((1, 8, 8), 0.5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _event(rid: str, index: int, target: int | None = None, **extra) -> tuple[bytes, bytes]:
    mode = "relabel" if target is not None else "misclassify"
    return rid.encode(), encode_event(rid, mode, int(TRAIN.y[index]), TRAIN.x[index], target_label=target, **extra)


def _image_event(rid: str, x: torch.Tensor, label: int = 3) -> tuple[bytes, bytes]:
    return rid.encode(), encode_event(rid, "misclassify", label, x)


def _with_member(rid: str, index: int, member: str) -> tuple[bytes, bytes]:
    """A valid event with `member` (raw JSON text) added as its first member."""
    value = encode_event(rid, "misclassify", int(TRAIN.y[index]), TRAIN.x[index]).decode()
    assert value.startswith('{"schema":1,')
    return rid.encode(), ('{' + member + ',' + value[1:]).encode()


def _receipts(bootstrap: str, topic: str, expected: int) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = {}
    for receipt in values(read_topic(bootstrap, topic, expected, timeout_s=60)):
        by_id.setdefault(receipt["request_id"], []).append(receipt)
    return by_id


def _verify(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}  # the factory model's module
    return subprocess.run([sys.executable, "-m", "streamer", "verify", "--config", str(config)],
                          capture_output=True, text=True, timeout=300, env=env)


def _scrape(daemon: DaemonProcess) -> str:
    status, body = daemon.get("/metrics")
    assert status == 200
    return body


def _sample(body: str, line_start: str) -> float:
    (line,) = [line for line in body.splitlines() if line.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


def test_a_mixed_stream_of_poison_and_healthy_requests_keeps_the_daemon_alive(kafka_bootstrap, weights, tmp_path):
    """A raising model input, a NaN input, bad text, duplicate keys, a conflicting relabel and
    compressed batches in one stream: the daemon stays up, every request gets exactly one
    receipt with a reason, every healthy one (also behind the poison) is applied, verify passes."""
    topics = new_topics(kafka_bootstrap, "chaos")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights,
                          model={"source": "factory:poisoned_model:build"})
    conflict_target = (int(TRAIN.y[20]) + 1) % 10
    plain = [_event(f"h{i}", 10 + i) for i in range(3)]
    plain += [_image_event("p-raise", ONES), _event("h3", 13), _image_event("p-nan", HALVES)]
    plain += [_with_member("bad-text", 1, '"subject":"user-\\ud83d"'), _with_member("dup-key", 2, '"label":5')]
    plain += [_event("c-a", 20, conflict_target), _event("c-b", 20, (conflict_target + 1) % 10)]
    produce(kafka_bootstrap, topics["requests"], plain)
    produce(kafka_bootstrap, topics["requests"], [_event("h4", 14), _event("h5", 15)], "lz4")
    produce(kafka_bootstrap, topics["requests"], [_event("h6", 16), _event("h7", 17)], "zstd")
    produce(kafka_bootstrap, topics["requests"], [_event("h8", 18)], "snappy")
    produce(kafka_bootstrap, topics["requests"], [_event("h9", 19)])  # healthy, behind everything
    total = 16

    daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"PYTHONPATH": str(TESTS)})
    try:
        daemon.wait_for("request_outcome", timeout_s=240, where=lambda e: e.get("request_id") == "h9")
        receipts = _receipts(kafka_bootstrap, topics["receipts"], total)
        assert daemon.process.poll() is None, daemon.tail()
        body = _scrape(daemon)
        assert _sample(body, 'streamer_fragment_failures_total{kind="engine_error"}') >= 1
        assert _sample(body, 'streamer_fragment_failures_total{kind="non_finite"}') >= 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    assert all(len(r) == 1 for r in receipts.values()), receipts  # exactly one outcome each
    status = {rid: r[0]["status"] for rid, r in receipts.items()}
    reason = {rid: r[0]["reason"] or "" for rid, r in receipts.items()}
    assert {rid: status[rid] for rid in (f"h{i}" for i in range(10))} == {f"h{i}": "forgotten" for i in range(10)}
    assert status["p-raise"] == "failed" and "poisoned input" in reason["p-raise"]
    assert status["p-nan"] == "failed" and "NaN" in reason["p-nan"]
    assert status["bad-text"] == "rejected" and "U+D83D" in reason["bad-text"]
    assert status["dup-key"] == "rejected" and "duplicate key 'label'" in reason["dup-key"]
    assert status["c-a"] == "relabelled"
    assert status["c-b"] == "rejected" and "conflicts with a goal already asked for the same instance" in reason["c-b"]
    assert "c-a" not in reason["c-b"]  # never the other request's id
    assert len(status) == total
    verified = _verify(config)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr


def test_an_undecodable_batch_is_skipped_by_offset_range(kafka_bootstrap, weights, tmp_path):
    """A batch the client cannot decode (its codec missing) gets rejected ledger rows and one dead
    letter naming partition and offsets; the records before and after it are applied."""
    stub = tmp_path / "no_lz4"
    (stub / "lz4").mkdir(parents=True)
    (stub / "lz4" / "__init__.py").write_text("raise ImportError('lz4 is hidden from this daemon')\n")
    topics = new_topics(kafka_bootstrap, "codec")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights)
    produce(kafka_bootstrap, topics["requests"], [_event("u0", 10)])
    produce(kafka_bootstrap, topics["requests"], [_event("u1", 11), _event("u2", 12)], "lz4")
    produce(kafka_bootstrap, topics["requests"], [_event("u3", 13)])

    daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"PYTHONPATH": str(stub)})
    try:
        daemon.wait_for("request_outcome", timeout_s=180, where=lambda e: e.get("request_id") == "u3")
        assert daemon.process.poll() is None, daemon.tail()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    receipts = {r["request_id"]: r["status"] for r in values(read_topic(kafka_bootstrap, topics["receipts"], 2))}
    assert receipts == {"u0": "forgotten", "u3": "forgotten"}
    (letter,) = values(read_topic(kafka_bootstrap, topics["dead_letter"], 1))
    assert "offsets 1-2" in letter["reason"] and "UnsupportedCodecError" in letter["reason"]
    with Ledger(tmp_path / "checkpoints" / LEDGER_FILE) as ledger:
        skipped = sorted(o.offset for o in (row.outcome for row in ledger.rows()) if o.status == "rejected")
    assert skipped == [1, 2]


@pytest.mark.parametrize("unlearning, kind, words", [
    ({"method": "neggrad", "lr": 1e20, "max_steps": 50}, "non_finite", "NaN/Inf"),  # blows up at step 1
])
def test_a_broken_model_is_never_published(kafka_bootstrap, weights, tmp_path, unlearning, kind, words):
    """A method that gives NaN/Inf: the requests get `failed` with the measured reason, CURRENT
    stays the base, the failure is counted, the daemon goes on."""
    topics = new_topics(kafka_bootstrap, kind)
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, unlearning=unlearning)
    produce(kafka_bootstrap, topics["requests"], [_event(f"g{i}", 10 + i) for i in range(4)])
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for("request_outcome", timeout_s=240, count=4)
        metrics = _scrape(daemon)
        assert _sample(metrics, f'streamer_fragment_failures_total{{kind="{kind}"}}') >= 1
        assert _sample(metrics, 'streamer_fragments_total{outcome="failed"}') >= 1  # refused: counted and timed too
        (line,) = daemon.wait_for("fragment_not_published")[:1]
        assert line["steps"] >= 1 and line["seconds"] > 0 and kind in line["trips"]
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 4))
    assert Counter(r["status"] for r in receipts) == {"failed": 4}
    assert all(words in r["reason"] and r["version"] is None for r in receipts), receipts
    assert CheckpointStore(tmp_path / "checkpoints").current_version() == "v000000"


def test_a_fragment_past_the_utility_budget_is_deferred(kafka_bootstrap, weights, tmp_path):
    """A fragment that would take audit accuracy past unlearning.max_audit_drop is deferred whole:
    `deferred` receipts without the model's numbers (those are in the ledger), nothing applied
    (the version that records the deferral serves the base's weights), the instances in the vault
    under the version's `deferred` list, counted as a deferred fragment; a re-sent id is a duplicate."""
    topics = new_topics(kafka_bootstrap, "deferred")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, unlearning={"max_audit_drop": 0.0})
    produce(kafka_bootstrap, topics["requests"], [_event(f"g{i}", 10 + i) for i in range(4)])
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for("request_outcome", timeout_s=240, count=4)
        produce(kafka_bootstrap, topics["requests"], [_event("g0", 10)])
        daemon.wait_for("request_outcome", count=5)
        metrics = _scrape(daemon)
        assert _sample(metrics, 'streamer_fragment_failures_total{kind="utility_floor"}') >= 1
        assert _sample(metrics, 'streamer_fragments_total{outcome="deferred"}') == 1
        assert _sample(metrics, 'streamer_requests_total{outcome="deferred"}') == 4
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 5))
    assert Counter(r["status"] for r in receipts) == {"deferred": 4, "duplicate": 1}
    for r in receipts[:4]:
        assert r["version"] is None and "utility budget" in r["reason"] and "audit accuracy" not in r["reason"]
    assert "deferred (owed)" in receipts[4]["reason"]
    store = CheckpointStore(tmp_path / "checkpoints")
    current = store.manifest(store.current_version())
    assert current.version == "v000001" and current.requests == () and current.model_sha256 == store.manifest(
        "v000000").model_sha256
    assert sorted(d["request_id"] for d in current.deferred) == [f"g{i}" for i in range(4)]
    with Ledger(tmp_path / "checkpoints" / LEDGER_FILE) as ledger:
        rows = [r.outcome for r in ledger.rows() if r.outcome.status == "deferred"]
        assert len(rows) == 4 and all(o.numbers["audit_drop"] > 0 and o.version is None for o in rows)
        assert all(ledger.owed(f"g{i}") for i in range(4))


def test_a_second_daemon_on_the_same_directory_touches_nothing(kafka_bootstrap, weights, tmp_path):
    """A second `streamer run` on a locked directory exits 2 with one line before cleaning or
    writing anything; the first daemon's temp files survive and it keeps publishing."""
    topics = new_topics(kafka_bootstrap, "second")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights)
    first = DaemonProcess(config, tmp_path / "first.log")
    try:
        first.wait_for("daemon_started", timeout_s=120)
        in_flight = tmp_path / "checkpoints" / ".tmp-v000001-inflight"
        in_flight.mkdir()
        second = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "locked by another process" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and in_flight.is_dir()
        in_flight.rmdir()
        produce(kafka_bootstrap, topics["requests"], [_event("s0", 10)])
        first.wait_for("fragment_published", timeout_s=120)
        assert first.stop() == 0
    finally:
        first.kill()


def test_a_stop_request_is_honoured_during_a_long_attack(kafka_bootstrap, weights, tmp_path):
    """SIGTERM while PGD runs a huge iteration budget: the daemon abandons the fragment and exits
    cleanly, publishing nothing (before, it waited for the whole attack)."""
    topics = new_topics(kafka_bootstrap, "stop")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, unlearning={"pgd_steps": 1_000_000})
    produce(kafka_bootstrap, topics["requests"], [_event(f"t{i}", 10 + i) for i in range(4)])
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for("fragment_started", timeout_s=120)
        time.sleep(2.0)  # inside the attack stage
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout_s=60) == 0
    finally:
        daemon.kill()
    assert any(e["event"] == "fragment_abandoned" for e in daemon.events())
    assert CheckpointStore(tmp_path / "checkpoints").current_version() == "v000000"
