"""The exclusion list a retraining needs (pipeline/forgotten.py), from a real ledger."""
from __future__ import annotations

from pathlib import Path

import pytest

from streamer.intake.goal import Goal
from streamer.pipeline.forgotten import exclusion_list, listed_ids
from streamer.state.ledger import Ledger
from streamer.state.manifest import Manifest, RetainedRef
from streamer.state.outcome import RequestOutcome
from streamer.state.shreds import ShredRow

NOW = "2024-05-01T12:00:00.000Z"


def _o(rid: str, status: str, offset: int, version: str | None = "v000001", sample=None) -> RequestOutcome:
    return RequestOutcome(status=status, request_id=rid, version=version, reason=None, topic="t", partition=0,
                          offset=offset, subject=f"s-{rid}", completed_at=NOW, goal=Goal("misclassify", 1),
                          sample_ref=sample)


def test_every_owed_or_applied_request_once_with_its_standing(tmp_path: Path) -> None:
    """Applied (retained, shredded, abandoned), deferred and rolled-back requests are listed once, with
    subject and sample reference; rejected, duplicates and never-applied failures are not."""
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.append([_o("kept", "forgotten", 0, sample={"dataset": "digits", "index": 4}),
                       _o("gone", "forgotten", 1, sample={"uri": "file:///data/x.png"}),
                       _o("late", "deferred", 2, version=None), _o("plain", "forgotten", 3),
                       _o("back", "forgotten", 4), _o("back", "rolled_back", 4, version="v000001"),
                       _o("bad", "rejected", 5, version=None), _o("never", "failed", 6, version=None),
                       _o("kept", "duplicate", 7)])
        current = Manifest(version="v000003", parent="v000002", created_at=NOW, requests=(), offsets={}, metrics={},
                           model_sha256="00" * 32, retained=(RetainedRef("kept", "d" * 64, "v000001", NOW),),
                           deferred=({"request_id": "late"},))
        shreds = {"gone": ShredRow("gone", "v000002", "v000003", NOW, "local:1", "window closed")}
        document = exclusion_list(ledger, current, shreds, clock=lambda: 1_700_000_000.0)
    assert document["current"] == "v000003" and document["schema"] == 1
    assert document["requests"] == [
        {"request_id": "kept", "subject": "s-kept", "sample": {"dataset": "digits", "index": 4}, "status": "retained"},
        {"request_id": "gone", "subject": "s-gone", "sample": {"uri": "file:///data/x.png"}, "status": "shredded"},
        {"request_id": "late", "subject": "s-late", "sample": None, "status": "deferred"},
        {"request_id": "plain", "subject": "s-plain", "sample": None, "status": "applied"},
        {"request_id": "back", "subject": "s-back", "sample": None, "status": "rolled_back"}]
    assert listed_ids(document) == {"kept", "gone", "late", "plain", "back"}


def test_plain_lists_are_read_and_anything_else_refused() -> None:
    assert listed_ids(["a", {"request_id": "b"}]) == {"a", "b"}
    for bad in ({"ids": []}, [{"id": "x"}], "a,b", [3]):
        with pytest.raises(ValueError):
            listed_ids(bad)
