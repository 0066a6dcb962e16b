"""End-to-end tests of `streamer run` as a subprocess against the real test broker.

Each test has its own topics, consumer group and checkpoint directory. The digits reference
model is trained once per session with few epochs; unlearning caps are small (see
daemon_harness.FAST_UNLEARNING) but still reach every goal.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import (
    AUDIT_FLOOR,
    USEFUL_UNLEARNING,
    DaemonProcess,
    new_topics,
    produce,
    read_topic,
    run_until_crash,
    train_digits,
    values,
    write_config,
)
from streamer.state.checkpoints import CheckpointStore, Manifest
from streamer.config import load_config
from streamer.pipeline.faults import FRAGMENT_CRASH_POINTS
from streamer.state.ledger import LEDGER_FILE
from streamer.engine.data import load_splits
from streamer.engine.evaluate import predict
from streamer.intake.events import encode_event
from streamer.state.ledger import Ledger
from streamer.state.outcome import APPLIED
from streamer.telemetry.metrics import REQUEST_OUTCOMES
from streamer.engine.models import Normalized, digits_cnn

pytestmark = pytest.mark.kafka

TRAIN = load_splits("digits").train


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits reference CNN, trained for a few epochs (a few seconds)."""
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _event(rid: str, index: int, target: int | None = None) -> tuple[bytes, bytes]:
    mode = "relabel" if target is not None else "misclassify"
    return rid.encode(), encode_event(rid, mode, int(TRAIN.y[index]), TRAIN.x[index], target_label=target)


def _json_event(rid: str, label: int, sample: dict[str, Any], mode: str = "misclassify") -> tuple[bytes, bytes]:
    return rid.encode(), json.dumps({"schema": 1, "request_id": rid, "mode": mode, "label": label,
                                     "sample": sample}).encode()


def _relabel_target(index: int) -> int:
    return (int(TRAIN.y[index]) + 1) % 10


def _lineage(checkpoint_dir: Path) -> list[Manifest]:
    store = CheckpointStore(checkpoint_dir)
    return store.lineage(store.current_version() or "")


def _current_model(cfg_path: Path) -> torch.nn.Module:
    """CURRENT's model.pt loaded fresh from disk with the user's one-liner into the user's class
    (the digits reference CNN; sha256 checked by hand), normalised as configured."""
    cfg = load_config(cfg_path)
    directory = cfg.checkpoints.dir / (cfg.checkpoints.dir / "CURRENT").read_text().strip()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["model_format"] == "state_dict" and manifest["model_file"] == "model.pt"
    assert hashlib.sha256((directory / "model.pt").read_bytes()).hexdigest() == manifest["model_sha256"]
    net = digits_cnn()
    net.load_state_dict(torch.load(directory / "model.pt", weights_only=True))  # strict, the user's own keys
    return Normalized(net, cfg.model.mean, cfg.model.std).eval()


def _assert_each_request_in_one_version(checkpoint_dir: Path, request_ids: set[str]) -> None:
    """Every request id is applied in exactly one version of CURRENT's lineage, and the ledger agrees."""
    lineage = _lineage(checkpoint_dir)
    applied = Counter(e["request_id"] for m in lineage for e in m.requests)
    assert set(applied) == request_ids
    assert all(n == 1 for n in applied.values()), applied
    on_disk = Counter(e["request_id"] for v in CheckpointStore(checkpoint_dir).versions()
                      for e in CheckpointStore(checkpoint_dir).manifest(v).requests)
    assert on_disk == applied  # no abandoned version holds a request either
    with Ledger(checkpoint_dir / LEDGER_FILE) as ledger:
        for manifest in lineage:
            in_ledger = [(o.request_id, o.status, o.offset) for o in ledger.requests_of(manifest.version)
                         if o.status in APPLIED]
            assert in_ledger == [(e["request_id"], e["status"], e["offset"]) for e in manifest.requests]
        rows = [r.outcome for r in ledger.rows() if r.outcome.status in APPLIED]
        assert Counter(o.request_id for o in rows) == applied
        assert ledger.counts()["rolled_back"] == 0


def _sample(metrics_text: str, name: str, labels: dict[str, str]) -> float | None:
    """One sample's value from a /metrics exposition, or None when absent."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def _committed(bootstrap: str, group_id: str, topic: str) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


# --- end to end ---------------------------------------------------------------------------------


@dataclass
class E2ERun:
    config: Path
    checkpoint_dir: Path
    topics: dict[str, str]
    expected: list[tuple[str | None, str]]  # (request_id, status) per produced record
    originals: dict[str, bytes]  # rejected request_id (or "<none>") -> value bytes
    receipts: list[dict[str, Any]]
    dead_letters: list[Any]
    checkpoint_records: list[dict[str, Any]]
    metrics_text: str
    probes: dict[str, int]
    events: list[dict[str, Any]]
    exit_code: int


@pytest.fixture(scope="class")
def e2e(kafka_bootstrap: str, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ERun]:
    """One daemon fed valid, malformed, duplicate and hostile events, then stopped with SIGTERM."""
    directory = tmp_path_factory.mktemp("e2e")
    topics = new_topics(kafka_bootstrap, "e2e")
    config = write_config(directory, kafka_bootstrap, topics, weights)
    root = directory / "data"
    np.save(root / "sample.npy", TRAIN.x[7].numpy())  # (1, 8, 8) float32 in [0, 1]

    relabel_a, relabel_b = _relabel_target(4), _relabel_target(5)
    batch: list[tuple[bytes | None, bytes, str | None, str]] = [  # key, value, request_id, expected status
        (*_event("m1", 0), "m1", "forgotten"),
        (*_event("m2", 1), "m2", "forgotten"),
        (*_event("m3", 2), "m3", "forgotten"),
        (*_event("m1", 0), "m1", "duplicate"),  # repeated while its fragment is being collected
        (b"bad-json", b"{not json", "bad-json", "rejected"),
        (*_event("m4", 3), "m4", "forgotten"),
        (*_event("rel1", 4, relabel_a), "rel1", "relabelled"),
        (b"bad-label", encode_event("bad-label", "misclassify", 42, TRAIN.x[8]), "bad-label", "rejected"),
        (b"bad-shape", encode_event("bad-shape", "misclassify", 1, torch.zeros(1, 4, 4)), "bad-shape", "rejected"),
        (*_json_event("passwd", 1, {"uri": "file:///etc/passwd"}), "passwd", "rejected"),
        (*_json_event("traversal", 1, {"uri": f"file://{root}{'/..' * 16}/etc/passwd"}), "traversal", "rejected"),
        (*_event("rel2", 5, relabel_b), "rel2", "relabelled"),
        (*_json_event("ds1", int(TRAIN.y[6]), {"dataset": "digits", "index": 6}), "ds1", "forgotten"),
        (*_json_event("uri1", int(TRAIN.y[7]), {"uri": f"file://{root}/sample.npy"}), "uri1", "forgotten"),
        (None, b"\xff\xfe not utf-8", None, "rejected"),  # no request_id anywhere: ledger row, no receipt
    ]
    late = (*_event("m2", 1), "m2", "duplicate")  # repeats a request applied in an earlier version
    daemon = DaemonProcess(config, directory / "daemon.log")
    try:
        daemon.wait_for("partitions_assigned", timeout_s=90)
        produce(kafka_bootstrap, topics["requests"], [(k, v) for k, v, _, _ in batch])
        daemon.wait_for("fragment_published", timeout_s=180, count=2)
        produce(kafka_bootstrap, topics["requests"], [late[:2]])
        records = [*batch, late]
        daemon.wait_for("request_outcome", timeout_s=60, count=len(records))
        probes = {path: daemon.get(path)[0] for path in ("/healthz", "/readyz")}
        metrics_text = daemon.get("/metrics")[1]
        exit_code = daemon.stop()
    finally:
        daemon.kill()
    n_receipts = sum(1 for r in records if r[2] is not None)
    yield E2ERun(
        config=config, checkpoint_dir=directory / "checkpoints", topics=topics,
        expected=[(rid, status) for _, _, rid, status in records],
        originals={rid or "<none>": value for _, value, rid, status in records if status == "rejected"},
        receipts=values(read_topic(kafka_bootstrap, topics["receipts"], n_receipts)),
        dead_letters=read_topic(kafka_bootstrap, topics["dead_letter"], 6),
        checkpoint_records=values(read_topic(kafka_bootstrap, topics["checkpoints"], 3)),
        metrics_text=metrics_text, probes=probes, events=daemon.events(), exit_code=exit_code,
    )


class TestEndToEnd:
    def test_every_request_gets_exactly_one_receipt_of_the_right_status(self, e2e: E2ERun) -> None:
        """One receipt per record that has a request_id, with the status its content calls for."""
        got = sorted((r["request_id"], r["status"]) for r in e2e.receipts)
        assert got == sorted((rid, status) for rid, status in e2e.expected if rid is not None)
        for receipt in e2e.receipts:
            assert receipt["schema"] == 1 and receipt["completed_at"].endswith("Z")
            if receipt["status"] == "rejected":
                assert receipt["reason"] and receipt["version"] is None
            else:
                assert re.fullmatch(r"v\d{6}", receipt["version"])

    def test_duplicates_name_the_version_that_applied_the_request(self, e2e: E2ERun) -> None:
        """A repeat inside the fragment and a repeat after publication both point at the applying version."""
        applied = {r["request_id"]: r["version"] for r in e2e.receipts if r["status"] in ("forgotten", "relabelled")}
        duplicates = {r["request_id"]: r for r in e2e.receipts if r["status"] == "duplicate"}
        assert set(duplicates) == {"m1", "m2"}
        assert all(d["version"] == applied[rid] for rid, d in duplicates.items())

    def test_dead_letters_keep_a_hash_of_the_original_bytes_and_the_reason(self, e2e: E2ERun) -> None:
        """Each rejected record is dead-lettered once with its size, sha256 and a reason a person can act
        on; the payload itself is not copied by default."""
        letters = {(json.loads(r.value)["request_id"] or "<none>"): r for r in e2e.dead_letters}
        assert sorted(letters) == sorted(e2e.originals)
        reasons = {rid: json.loads(r.value)["reason"] for rid, r in letters.items()}
        for rid, record in letters.items():
            body = json.loads(record.value)
            assert body["value_sha256"] == hashlib.sha256(e2e.originals[rid]).hexdigest()
            assert body["value_bytes"] == len(e2e.originals[rid]) and body["value_b64"] is None
            assert body["topic"] == e2e.topics["requests"] and body["partition"] == 0
            assert dict(record.headers)["streamer.reason"].decode() == body["reason"]
        assert reasons["bad-json"].startswith("payload is not JSON")
        assert reasons["bad-label"] == "label 42 is outside [0, 10)"
        assert reasons["bad-shape"].startswith("sample shape [1, 4, 4] does not match")
        assert "outside the allowed roots" in reasons["passwd"]
        assert "outside the allowed roots" in reasons["traversal"]
        assert "resolves to" not in reasons["traversal"]  # the uri as sent, never the path it resolved to
        assert reasons["<none>"].startswith("payload is not UTF-8")

    def test_published_checkpoint_forgets_every_request(self, e2e: E2ERun) -> None:
        """CURRENT, loaded fresh from disk, misclassifies every forgotten instance and relabels the others."""
        model = _current_model(e2e.config)
        forgotten = [0, 1, 2, 3, 6, 7]
        assert (predict(model, TRAIN.x[forgotten]) != TRAIN.y[forgotten]).all()
        relabelled = predict(model, TRAIN.x[[4, 5]]).tolist()
        assert relabelled == [_relabel_target(4), _relabel_target(5)]

    def test_ledger_and_manifests_agree(self, e2e: E2ERun) -> None:
        """Each applied request is in exactly one version's manifest and in the ledger with that version."""
        _assert_each_request_in_one_version(e2e.checkpoint_dir, {"m1", "m2", "m3", "m4", "rel1", "rel2", "ds1", "uri1"})
        with Ledger(e2e.checkpoint_dir / LEDGER_FILE) as ledger:
            assert len(ledger.rows()) == len(e2e.expected) and ledger.unsent_receipts() == []
            assert Counter(r.outcome.status for r in ledger.rows()) == Counter(s for _, s in e2e.expected)

    def test_checkpoint_records_announce_each_version(self, e2e: E2ERun) -> None:
        """The checkpoints topic carries the base (announced at start) and both fragment versions."""
        assert [r["version"] for r in e2e.checkpoint_records] == ["v000000", "v000001", "v000002"]
        last = e2e.checkpoint_records[-1]
        assert Path(last["model_path"]).is_file() and last["requests"] == 4
        assert hashlib.sha256(Path(last["model_path"]).read_bytes()).hexdigest() == last["sha256"]

    def test_metrics_parse_and_match_the_ledger(self, e2e: E2ERun) -> None:
        """/metrics parses, carries the documented names, and requests_total equals the ledger's counts."""
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(e2e.metrics_text) for s in family.samples}
        names = {name for name, _ in samples}
        assert {"streamer_accuracy_ratio", "streamer_audit_accuracy_drift_ratio", "streamer_requests_total",
                "streamer_fragments_total", "streamer_stage_duration_seconds_count", "streamer_checkpoint_version",
                "streamer_consumer_lag_messages", "streamer_last_fragment_timestamp_seconds"} <= names
        for accuracy_set in ("fragment", "forgotten", "audit"):
            assert 0.0 <= samples[("streamer_accuracy_ratio", (("set", accuracy_set),))] <= 1.0
        stages = {dict(labels)["stage"] for name, labels in samples
                  if name == "streamer_stage_duration_seconds_count" and samples[(name, labels)] > 0}
        assert stages == {"resolve", "adversarial", "importance", "unlearn", "evaluate", "checkpoint"}
        assert samples[("streamer_checkpoint_version", ())] == 2
        assert samples[("streamer_fragments_total", (("outcome", "goal"),))] == 2
        with Ledger(e2e.checkpoint_dir / LEDGER_FILE) as ledger:
            counts = ledger.counts()
        for outcome in REQUEST_OUTCOMES:
            assert samples[("streamer_requests_total", (("outcome", outcome),))] == counts[outcome], outcome

    def test_dashboard_and_alerts_use_only_scraped_names(self, e2e: E2ERun) -> None:
        """Every streamer_* metric in the Grafana dashboard and the alert rules is in this daemon's scrape,
        but the publish target's (with a target only), the forgotten fraction (with
        model.training_set_size only) and KMS errors (with a KMS KEK only):
        tests/telemetry/test_prometheus_e2e.py has them all."""
        from deploy_assets import _alert_rules, _dashboard_exprs, _referenced_metric_names

        scraped = {s.name for family in text_string_to_metric_families(e2e.metrics_text) for s in family.samples}
        scraped |= _referenced_metric_names(sorted(scraped))  # histogram series without _bucket/_sum/_count
        referenced = _referenced_metric_names(_dashboard_exprs() + [rule["expr"] for rule in _alert_rules()])
        assert referenced and referenced - scraped == {"streamer_publish_versions_behind",
                                                       "streamer_publish_failures_total",
                                                       "streamer_forgotten_fraction_ratio",
                                                       "streamer_kms_errors_total"}

    def test_health_and_readiness(self, e2e: E2ERun) -> None:
        """/healthz and /readyz answer 200 while the daemon runs with its partition assigned."""
        assert e2e.probes == {"/healthz": 200, "/readyz": 200}

    def test_one_canonical_log_line_per_request_and_fragment(self, e2e: E2ERun) -> None:
        """Each record has one request_outcome line with its ids bound; each fragment one fragment_published line."""
        outcomes = [e for e in e2e.events if e["event"] == "request_outcome"]
        assert sorted(e["offset"] for e in outcomes) == list(range(len(e2e.expected)))
        assert all({"request_id", "partition", "offset", "version", "status"} <= e.keys() for e in outcomes)
        published = [e for e in e2e.events if e["event"] == "fragment_published"]
        assert [e["version"] for e in published] == ["v000001", "v000002"]

    def test_sigterm_exits_zero(self, e2e: E2ERun) -> None:
        """SIGTERM stops the daemon cleanly with exit status 0."""
        assert e2e.exit_code == 0
        assert e2e.events[-1]["event"] == "daemon_stopped"


# --- crash safety -------------------------------------------------------------------------------


def test_crash_at_every_point_loses_nothing_and_applies_nothing_twice(
        kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
    """kill -9 at each crash point in turn, then restart: every request is applied in exactly one
    version, the ledger agrees with the manifests, and every record has exactly one receipt."""
    topics = new_topics(kafka_bootstrap, "crash")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights)
    ids = [f"c{i}" for i in range(16)]
    records = [_event(ids[0], 10), _event(ids[1], 11), (b"c-bad", b"[1, 2]")]  # offset 2: read before run 1 dies
    records += [_event(rid, 10 + i) for i, rid in enumerate(ids) if i >= 2]
    records.append(_event(ids[1], 11))  # a repeat, read by the last run
    produce(kafka_bootstrap, topics["requests"], records)

    for run, point in enumerate(FRAGMENT_CRASH_POINTS):
        run_until_crash(config, tmp_path / f"run{run}.log", point)
    assert len(_lineage(tmp_path / "checkpoints")) == 4  # base + the versions of the three later crashes

    daemon = DaemonProcess(config, tmp_path / "final.log")
    try:
        daemon.wait_for("request_outcome", timeout_s=120, where=lambda e: e["offset"] == len(records) - 1)
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    _assert_each_request_in_one_version(tmp_path / "checkpoints", set(ids))
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], len(records)))
    # Exactly once here: every crash point lies outside the window between the receipt flush
    # and the ledger noting it (the guarantee in general is at least once).
    assert sorted((r["request_id"], r["status"]) for r in receipts) == sorted(
        [(rid, "forgotten") for rid in ids] + [("c-bad", "rejected"), ("c1", "duplicate")])
    assert len(read_topic(kafka_bootstrap, topics["dead_letter"], 1)) == 1
    with Ledger(tmp_path / "checkpoints" / LEDGER_FILE) as ledger:
        assert len(ledger.rows()) == len(records) and ledger.unsent_receipts() == []
    model = _current_model(config)
    assert (predict(model, TRAIN.x[10:26]) != TRAIN.y[10:26]).all()
    current = _lineage(tmp_path / "checkpoints")[0]
    group = load_config(config).kafka.group_id
    assert _committed(kafka_bootstrap, group, topics["requests"]) == current.offsets[topics["requests"]][0]


# --- max.poll.interval and shutdown --------------------------------------------------------------


def test_long_fragment_keeps_the_assignment_and_sigterm_commits_nothing_unfinished(
        kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
    """A fragment held for three max.poll.interval.ms (a hold point: it cannot end before the test
    releases it) causes no rebalance (one assignment, receipts right, offsets committed); SIGTERM
    during the next, held fragment abandons it and exits 0, with nothing published, receipted or
    committed for it."""
    interval_ms = 1500
    topics = new_topics(kafka_bootstrap, "poll")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, kafka={"max_poll_interval_ms": interval_ms})
    group = load_config(config).kafka.group_id
    ids = [f"p{i}" for i in range(8)]
    release = tmp_path / "release-fragment"
    daemon = DaemonProcess(config, tmp_path / "daemon.log", hold_at=("during_unlearn", release))
    try:
        daemon.wait_for("partitions_assigned", timeout_s=90)
        produce(kafka_bootstrap, topics["requests"], [_event(rid, 20 + i) for i, rid in enumerate(ids[:4])])
        daemon.wait_for("hold_hook", timeout_s=60)
        time.sleep(3 * interval_ms / 1000)  # held: the fragment outlasts the poll interval three times
        assert not [e for e in daemon.events() if e["event"] == "fragment_published"]
        release.touch()
        daemon.wait_for("fragment_published", timeout_s=180)
        daemon.wait_for("request_outcome", count=4)
        assigned = [e for e in daemon.events() if e["event"] == "partitions_assigned"]
        revoked = [e for e in daemon.events() if e["event"] == "partitions_revoked"]
        committed_after_first = _committed(kafka_bootstrap, group, topics["requests"])

        produce(kafka_bootstrap, topics["requests"],
                [_event(rid, 24 + i, target=(int(TRAIN.y[24 + i]) + 5) % 10) for i, rid in enumerate(ids[4:])])
        daemon.wait_for("hold_hook", count=2, timeout_s=60)  # the second fragment is held until SIGTERM
        code = daemon.stop(timeout_s=120)
    finally:
        daemon.kill()
    assert len(assigned) == 1 and revoked == []
    assert committed_after_first == 4

    assert code == 0
    events = [e["event"] for e in daemon.events()]
    assert events.count("fragment_published") == 1 and "fragment_abandoned" in events
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 4))
    assert sorted((r["request_id"], r["status"]) for r in receipts) == [(rid, "forgotten") for rid in ids[:4]]
    assert _lineage(tmp_path / "checkpoints")[0].version == "v000001"
    assert CheckpointStore(tmp_path / "checkpoints").versions() == ["v000000", "v000001"]
    assert _committed(kafka_bootstrap, group, topics["requests"]) == 4


def test_the_served_model_stays_useful_with_the_guard_rail_on(kafka_bootstrap: str, weights: Path,
                                                              tmp_path: Path) -> None:
    """With the utility guard rail on (USEFUL_UNLEARNING: max_audit_drop 0.15, a retain buffer), 16
    requests are all forgotten, no fragment is refused, and the audit accuracy the daemon serves
    stays above AUDIT_FLOOR in every version and in the /metrics gauge."""
    topics = new_topics(kafka_bootstrap, "useful")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, unlearning=USEFUL_UNLEARNING, fast=False,
                          data={"buffer": {"builtin": "digits", "split": "buffer"}})
    ids = [f"u{i}" for i in range(16)]
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for("partitions_assigned", timeout_s=90)
        produce(kafka_bootstrap, topics["requests"], [_event(rid, 40 + 3 * i) for i, rid in enumerate(ids)])
        daemon.wait_for("request_outcome", count=16, timeout_s=600)
        _, text = daemon.get("/metrics")
    finally:
        daemon.stop()
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 16))
    assert sorted((r["request_id"], r["status"]) for r in receipts) == sorted((rid, "forgotten") for rid in ids)
    lineage = _lineage(tmp_path / "checkpoints")
    audit = [m.metrics["audit_accuracy"] for m in reversed(lineage)]
    assert len(lineage) >= 5 and all(a >= AUDIT_FLOOR for a in audit), audit  # v000000 and at least 4 fragments
    gauge = _sample(text, "streamer_accuracy_ratio", {"set": "audit"})
    failures = _sample(text, "streamer_fragment_failures_total", {"kind": "utility_floor"})
    assert gauge == pytest.approx(audit[-1], abs=1e-6) and gauge >= AUDIT_FLOOR and failures == 0.0
