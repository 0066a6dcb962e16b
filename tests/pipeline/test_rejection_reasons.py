"""What rejection reasons reveal: the dead letters and receipts that go back to producers say what
is wrong with the event, never what exists elsewhere; the operator's log keeps the detail.

Hostile records go through the real Collector, Outbox and Ledger (a fake producer keeps what
would be sent): a `uri` through a link to /proc/self/fd/N (the KEK, opened by the daemon), a goal
that conflicts with another producer's pending request, a request_id reused with another label,
a dataset sample under a wrong label. None of the sent bytes, nor the ledger's reasons (which
receipts are re-sent from), may hold the KEK's path, the other request's id or target, or the
dataset's label."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry

from streamer.config import KafkaTopics
from streamer.intake import SampleContext
from streamer.pipeline import Collector, GoalIndex, Outbox
from streamer.state import LEDGER_FILE, ForgottenSet, Ledger
from streamer.telemetry import Metrics

SHAPE = (1, 4, 4)
X = torch.linspace(0, 1, 16).reshape(SHAPE)


class _Sent:
    def get(self, timeout: float | None = None) -> None:
        return None


class _Producer:
    """Keeps what would go to Kafka."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"", headers: Any = None) -> _Sent:
        self.sent.append((topic, key, value, list(headers or [])))
        return _Sent()

    def flush(self, timeout: float | None = None) -> None:
        pass


def _record(offset: int, value: dict) -> ConsumerRecord:
    data = json.dumps(value).encode()
    return ConsumerRecord("requests", 0, None, offset, 1_700_000_000_000, 0, value.get("request_id", "").encode(),
                          data, [], None, -1, len(data), -1)


def _tensor(x: torch.Tensor) -> dict:
    return {"tensor": {"dtype": "float32", "shape": list(x.shape),
                       "data_b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode()}}


@pytest.fixture()
def kek(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "kek.key"
    path.parent.mkdir()
    path.write_bytes(os.urandom(32))
    return path


def test_what_goes_back_to_producers_reveals_nothing_elsewhere(tmp_path: Path, kek: Path) -> None:
    """Every rejection is answered (dead letter + receipt) without the KEK's path, the other
    request's id or goal, or the dataset's label; the operator's log has each of them."""
    root = tmp_path / "uploads"
    root.mkdir()
    fd = os.open(kek, os.O_RDONLY)  # the daemon holds its KEK file open, as a process may
    os.symlink(f"/proc/self/fd/{fd}", root / "fd.png")
    ctx = SampleContext(num_classes=10, input_shape=SHAPE, uri_roots=(root,),
                        datasets={"train": torch.zeros(2, *SHAPE)}, dataset_labels={"train": torch.tensor([7, 1])})
    producer, ledger = _Producer(), Ledger(tmp_path / LEDGER_FILE)
    metrics = Metrics(CollectorRegistry())
    try:
        with structlog.testing.capture_logs() as logs:
            log = structlog.get_logger()
            outbox = Outbox(producer, KafkaTopics(), ledger, metrics, log)
            collector = Collector(ctx, outbox, metrics, log, GoalIndex(lambda: ForgottenSet.empty(SHAPE), 10))
            victim = {"schema": 1, "request_id": "victim-ann-42", "label": 2, "mode": "relabel", "target_label": 8,
                      "sample": _tensor(X)}
            collector.handle({"tp": [_record(0, victim)]})  # pending: another producer's request
            hostile = [
                {"schema": 1, "request_id": "h-fd", "label": 1, "sample": {"uri": (root / "fd.png").as_uri()}},
                {"schema": 1, "request_id": "h-proc", "label": 1, "sample": {"uri": f"file:///proc/self/fd/{fd}"}},
                {"schema": 1, "request_id": "h-conflict", "label": 2, "mode": "relabel", "target_label": 5,
                 "sample": _tensor(X)},
                {**victim, "label": 3, "target_label": 4},  # the victim's id, another label
                {"schema": 1, "request_id": "h-label", "label": 3, "sample": {"dataset": "train", "index": 0}},
            ]
            collector.handle({"tp": [_record(i + 1, e) for i, e in enumerate(hostile)]})
        rows = ledger.rows()
    finally:
        ledger.close()
        os.close(fd)
    answered = {row.outcome.request_id: row.outcome.reason for row in rows}
    assert set(answered) == {"h-fd", "h-proc", "h-conflict", "h-label", "victim-ann-42"}
    assert all(row.outcome.status == "rejected" for row in rows)
    sent = b"".join((key or b"") + value + b"".join(v for _, v in headers) for _, key, value, headers in producer.sent)
    assert {topic for topic, *_ in producer.sent} == {KafkaTopics().dead_letter, KafkaTopics().receipts}
    assert len(producer.sent) == 2 * len(hostile)
    reasons = " ".join(answered.values())
    for secret in (str(kek), str(kek.parent), "victim-ann-42 for", "relabel 2 -> 8", "(7)", "was 2"):
        assert secret.encode() not in sent and secret not in reasons, secret
    assert "outside the allowed roots" in answered["h-fd"] and "outside the allowed roots" in answered["h-proc"]
    assert "conflicts with a goal already asked for the same instance" in answered["h-conflict"]
    assert "already used by a request for another label:" in answered["victim-ann-42"]
    assert "is not the label dataset 'train' holds for index 0" in answered["h-label"]
    details = " ".join(e.get("detail", "") for e in logs if e["event"] == "event_rejected_detail")
    for secret in (str(kek), "conflicts with request victim-ann-42 for the same instance (relabel 2 -> 8)", "index 0 (7)",
                   "another label (3, was 2)"):
        assert secret in details, (secret, details)
