"""Tests for streamer.kafka.records (what goes to Kafka)."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from streamer.state.checkpoints import Manifest
from streamer.state.outcome import RequestOutcome
from streamer.kafka.records import checkpoint_record, dead_letter, receipt


def _outcome(**overrides: object) -> RequestOutcome:
    fields = dict(status="forgotten", request_id="r-1", version="v000003", reason=None, topic="req",
                  partition=2, offset=41, subject="user-9", completed_at="2024-05-01T12:00:00.000Z")
    fields.update(overrides)
    return RequestOutcome(**fields)  # type: ignore[arg-type]


class TestReceipt:
    def test_schema_v1_fields(self) -> None:
        """A receipt is keyed by request_id and carries exactly the documented fields (no subject)."""
        key, value = receipt(_outcome())
        assert key == b"r-1"
        assert json.loads(value) == {"schema": 1, "request_id": "r-1", "status": "forgotten", "applied": True,
                                     "version": "v000003", "reason": None, "completed_at": "2024-05-01T12:00:00.000Z"}

    def test_applied_tells_the_two_failures_apart(self) -> None:
        """`failed` with a version was applied (goal missed at the cap, still worked on); without one it never
        was (re-send); deferred and rejected were not applied; a duplicate says whether its first was."""
        applied = {status: json.loads(receipt(_outcome(status=status, version=version))[1])["applied"]
                   for status, version in (("failed", "v000003"), ("duplicate", "v000003"))}
        never = {status: json.loads(receipt(_outcome(status=status, version=None))[1])["applied"]
                 for status in ("failed", "deferred", "rejected", "duplicate")}
        assert applied == {"failed": True, "duplicate": True}
        assert never == {"failed": False, "deferred": False, "rejected": False, "duplicate": False}

    def test_no_receipt_without_request_id(self) -> None:
        """An event whose request_id could not be read gets no receipt (the ledger row identifies it)."""
        with pytest.raises(ValueError, match="no receipt"):
            receipt(_outcome(status="rejected", request_id=None))


class TestDeadLetter:
    def test_by_default_keeps_sizes_and_hashes_not_the_payload(self) -> None:
        """Without the opt-in the dead letter holds sizes and sha256s, never the bytes (they may be personal data)."""
        raw = b"\xff\x00 not json"
        key, value, _ = dead_letter("payload is not UTF-8", None, "req", 0, 7, b"k", raw, "2024-05-01T12:00:00Z")
        body = json.loads(value)
        assert body["value_b64"] is None and body["key_b64"] is None and body["payload"] == "omitted"
        assert (body["value_bytes"], body["value_sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
        assert raw not in value and key == b"k"

    def test_never_exceeds_the_record_limit(self) -> None:
        """An opted-in payload larger than the limit is dropped, so the dead letter stays deliverable."""
        raw = b"x" * 50_000
        _, value, _ = dead_letter("too big", "r", "req", 0, 1, b"r", raw, "now", include_payload=True, max_bytes=10_000)
        body = json.loads(value)
        assert len(value) <= 10_000 and body["value_b64"] is None and body["payload"].startswith("omitted: over")

    def test_keeps_original_bytes_and_reason_when_opted_in(self) -> None:
        """With include_payload the dead letter carries the original key and value bytes, the source record and the reason."""
        raw = b"\xff\x00 not json"
        key, value, headers = dead_letter("payload is not UTF-8", None, "req", 0, 7, b"k", raw, "2024-05-01T12:00:00Z",
                                          include_payload=True)
        body = json.loads(value)
        assert key == b"k" and base64.b64decode(body["value_b64"]) == raw and base64.b64decode(body["key_b64"]) == b"k"
        assert (body["reason"], body["topic"], body["partition"], body["offset"]) == ("payload is not UTF-8", "req", 0, 7)
        assert dict(headers) == {"streamer.reason": b"payload is not UTF-8", "streamer.source": b"req/0/7"}

    def test_tombstone_and_missing_key(self) -> None:
        """A record without key or value is still dead-lettered, with nulls."""
        _, value, _ = dead_letter("no value", None, "req", 0, 1, None, None, "2024-05-01T12:00:00Z")
        assert json.loads(value)["key_b64"] is None and json.loads(value)["value_b64"] is None


class TestCheckpointRecord:
    def test_announces_path_and_sha(self, tmp_path: Path) -> None:
        """The record names the version, where its model.pt is and the sha256 to check it against."""
        manifest = Manifest(version="v000002", parent="v000001", created_at="2024-05-01T12:00:00.000Z",
                            requests=({"request_id": "a"},), offsets={}, metrics={"steps": 3},
                            model_sha256="ab" * 32)
        key, value = checkpoint_record(manifest, tmp_path / "v000002")
        body = json.loads(value)
        assert key == b"v000002"
        assert body["model_path"] == str(tmp_path / "v000002" / "model.pt") and body["sha256"] == "ab" * 32
        assert (body["parent"], body["requests"], body["metrics"]) == ("v000001", 1, {"steps": 3})
        assert body["model_format"] == "state_dict"

    def test_names_the_model_file_of_its_format(self, tmp_path) -> None:
        """An export version is announced with its model.pt2 path and format, so a server knows its loader."""
        manifest = Manifest(version="v000002", parent="v000001", created_at="2024-05-01T12:00:00.000Z",
                            requests=(), offsets={}, metrics={}, model_sha256="ab" * 32,
                            model_format="export", model_file="model.pt2")
        body = json.loads(checkpoint_record(manifest, tmp_path / "v000002")[1])
        assert (body["model_path"], body["model_format"]) == (str(tmp_path / "v000002" / "model.pt2"), "export")
