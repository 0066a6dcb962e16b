"""Tests for streamer.state.ledger: append-only outcomes, the queries the daemon asks, reconciliation."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

from streamer.state.checkpoints import CheckpointStore, Manifest
from streamer.state.ledger import Ledger
from streamer.state.reconcile import reconcile
from streamer.intake.goal import Goal
from streamer.state.outcome import STATUSES, RequestOutcome

T = "requests"
NOW = "2024-05-01T12:00:00.000Z"


def _o(status: str, offset: int, request_id: str | None = None, version: str | None = None,
       reason: str | None = None) -> RequestOutcome:
    return RequestOutcome(status=status, request_id=request_id, version=version, reason=reason, topic=T, partition=0,
                   offset=offset, subject=None, completed_at=NOW)


def _entry(request_id: str, offset: int, status: str = "forgotten") -> dict[str, Any]:
    return {"request_id": request_id, "status": status, "reason": None, "topic": T, "partition": 0,
            "offset": offset, "subject": "s", "mode": "misclassify", "label": 1, "target_label": None}


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    with Ledger(tmp_path / "ledger.sqlite3") as opened:
        yield opened


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpt")


def _publish(store: CheckpointStore, parent: str | None, entries: list[dict[str, Any]],
             duplicates: list[dict[str, Any]] = ()) -> Manifest:  # type: ignore[assignment]
    state = {"w": torch.zeros(1)}
    return store.publish(parent, state, requests=entries, duplicates=duplicates,
                         offsets={T: {0: max([e["offset"] for e in entries], default=-1) + 1}})


class TestAppend:
    def test_rows_round_trip(self, ledger: Ledger) -> None:
        """Appended outcomes come back in order with every field."""
        outcomes = [_o("forgotten", 0, "a", "v000001"), _o("rejected", 1, None, None, "bad JSON")]
        seqs = ledger.append(outcomes)
        assert [row.outcome for row in ledger.rows()] == outcomes
        assert [row.seq for row in ledger.rows()] == seqs

    def test_same_outcome_twice_is_one_row(self, ledger: Ledger) -> None:
        """Appending an outcome already present (a re-read record, a re-run reconcile) adds nothing."""
        first = ledger.append([_o("rejected", 3, None, None, "bad")])
        again = ledger.append([_o("rejected", 3, None, None, "bad, read again")])
        assert first == again and len(ledger.rows()) == 1

    @pytest.mark.parametrize("statement", ["UPDATE outcomes SET status = 'forgotten'", "DELETE FROM outcomes",
                                           "DELETE FROM receipts_sent"])
    def test_rows_cannot_be_changed(self, ledger: Ledger, statement: str) -> None:
        """The tables refuse UPDATE and DELETE: the ledger is append-only."""
        (seq,) = ledger.append([_o("forgotten", 0, "a", "v000001")])
        ledger.mark_receipts_sent([seq], NOW)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            ledger._db.execute(statement)

    def test_unknown_status_is_refused(self) -> None:
        """An outcome's status is one of the documented ones."""
        with pytest.raises(ValueError, match="unknown status"):
            _o("lost", 0, "a")

    def test_rows_survive_reopening(self, tmp_path: Path) -> None:
        """The ledger is a file: rows and sent receipts persist across processes."""
        with Ledger(tmp_path / "l.db") as first:
            (seq,) = first.append([_o("forgotten", 0, "a", "v000001")])
            first.mark_receipts_sent([seq], NOW)
        with Ledger(tmp_path / "l.db") as second:
            assert [(r.outcome.request_id, r.receipt_sent) for r in second.rows()] == [("a", True)]


class TestQueries:
    def test_applied_names_the_version(self, ledger: Ledger) -> None:
        """applied() is the version holding a forgotten, relabelled or failed request; None otherwise."""
        ledger.append([_o("forgotten", 0, "a", "v000001"), _o("failed", 1, "b", "v000002", "cap"),
                       _o("rejected", 2, "c"), _o("duplicate", 3, "a", "v000001")])
        assert (ledger.applied("a"), ledger.applied("b"), ledger.applied("c"), ledger.applied("x")) == (
            "v000001", "v000002", None, None)

    def test_handled_is_keyed_by_record(self, ledger: Ledger) -> None:
        """A record with any standing outcome is handled, even without a request_id."""
        ledger.append([_o("rejected", 5, None, None, "not JSON")])
        assert ledger.handled(T, 0, 5) and not ledger.handled(T, 0, 6) and not ledger.handled(T, 1, 5)

    def test_receipts_owed(self, ledger: Ledger) -> None:
        """Every outcome with a request_id owes one receipt until marked; id-less rejections owe none."""
        seqs = ledger.append([_o("forgotten", 0, "a", "v000001"), _o("rejected", 1, None, None, "x"),
                              _o("duplicate", 2, "a", "v000001")])
        assert [r.outcome.offset for r in ledger.unsent_receipts()] == [0, 2]
        ledger.mark_receipts_sent(seqs[:1], NOW)
        assert [r.outcome.offset for r in ledger.unsent_receipts()] == [2]

    def test_counts_and_requests_of(self, ledger: Ledger) -> None:
        """counts() has every status; requests_of() lists one version's outcomes."""
        ledger.append([_o("forgotten", 0, "a", "v000001"), _o("relabelled", 1, "b", "v000001"),
                       _o("rejected", 2, None)])
        counts = ledger.counts()
        assert set(counts) == set(STATUSES)
        assert (counts["forgotten"], counts["relabelled"], counts["rejected"], counts["failed"]) == (1, 1, 1, 0)
        assert [o.request_id for o in ledger.requests_of("v000001")] == ["a", "b"]


class TestReconcile:
    def test_copies_manifests_the_ledger_lacks(self, ledger: Ledger, store: CheckpointStore) -> None:
        """A crash between checkpoint and ledger: reconcile adds the rows, with their receipts owed."""
        _publish(store, None, [])
        v1 = _publish(store, "v000000", [_entry("a", 0), _entry("b", 1)])
        v2 = _publish(store, v1.version, [_entry("c", 2, "failed")], duplicates=[_entry("c", 3, "duplicate")])
        ledger.append([RequestOutcome.from_manifest(e, v1.version, v1.created_at) for e in v1.requests])
        result = reconcile(ledger, store.lineage(v2.version))
        assert (result.added, result.rolled_back) == (2, 0)
        assert [(o.request_id, o.status) for o in ledger.requests_of(v2.version)] == [("c", "failed"), ("c", "duplicate")]
        assert {r.outcome.request_id for r in ledger.unsent_receipts()} == {"a", "b", "c"}
        assert reconcile(ledger, store.lineage(v2.version)).added == 0

    def test_ledger_agrees_with_manifests(self, ledger: Ledger, store: CheckpointStore) -> None:
        """After reconcile every manifest request is in the ledger with the manifest's version, once."""
        _publish(store, None, [])
        v1 = _publish(store, "v000000", [_entry("a", 0)])
        v2 = _publish(store, v1.version, [_entry("b", 1), _entry("c", 2)])
        reconcile(ledger, store.lineage(v2.version))
        for manifest in store.lineage(v2.version):
            assert [o.request_id for o in ledger.requests_of(manifest.version)] == [
                e["request_id"] for e in manifest.requests]
        assert len(ledger.rows()) == 3

    def test_rollback_marks_newer_versions(self, ledger: Ledger, store: CheckpointStore) -> None:
        """Rows of versions newer than CURRENT become rolled_back: no longer applied, their records re-readable."""
        _publish(store, None, [])
        v1 = _publish(store, "v000000", [_entry("a", 0)])
        v2 = _publish(store, v1.version, [_entry("b", 1)])
        reconcile(ledger, store.lineage(v2.version))
        ledger.append([_o("rejected", 2, None, None, "bad"), _o("duplicate", 3, "a", v1.version)])
        store.switch(v1.version)  # the operator rolls back
        result = reconcile(ledger, store.lineage(v1.version))
        assert result.rolled_back == 1
        assert ledger.applied("b") is None and ledger.applied("a") == v1.version
        assert not ledger.handled(T, 0, 1)  # b's record will be applied again
        assert ledger.handled(T, 0, 2) and ledger.handled(T, 0, 3)  # answers that do not depend on the model
        assert reconcile(ledger, store.lineage(v1.version)).rolled_back == 0
        assert ledger.counts()["rolled_back"] == 1

    def test_reapplied_after_rollback_counts_as_applied(self, ledger: Ledger) -> None:
        """A request applied again after a rollback is applied in the new version."""
        ledger.append([_o("forgotten", 1, "b", "v000002"), _o("rolled_back", 1, "b", "v000002"),
                       _o("forgotten", 1, "b", "v000003")])
        assert ledger.applied("b") == "v000003" and ledger.handled(T, 0, 1)


_SCHEMA_1 = """
CREATE TABLE outcomes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('forgotten', 'relabelled', 'duplicate', 'rejected', 'failed', 'rolled_back')),
    version TEXT, reason TEXT, topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    subject TEXT, completed_at TEXT NOT NULL);
CREATE UNIQUE INDEX outcomes_key ON outcomes (topic, partition, "offset", status, IFNULL(version, ''));
CREATE TABLE receipts_sent (seq INTEGER PRIMARY KEY REFERENCES outcomes (seq), sent_at TEXT NOT NULL);
CREATE TRIGGER outcomes_no_delete BEFORE DELETE ON outcomes BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
INSERT INTO outcomes (request_id, status, version, reason, topic, partition, "offset", subject, completed_at)
    VALUES ('r1', 'forgotten', 'v000001', NULL, 't', 0, 0, NULL, '2024-01-01T00:00:00.000Z');
INSERT INTO receipts_sent (seq, sent_at) VALUES (1, '2024-01-01T00:00:01.000Z');
"""


class TestSchemaAndText:
    def test_a_schema_1_ledger_keeps_its_rows_and_takes_new_statuses(self, tmp_path) -> None:
        """A ledger written before `abandoned` existed opens with its rows and receipts, then accepts it."""
        path = tmp_path / "ledger.sqlite3"
        db = sqlite3.connect(path)
        db.executescript(_SCHEMA_1)
        db.close()
        with Ledger(path) as ledger:
            (row,) = ledger.rows()
            assert (row.outcome.request_id, row.outcome.status, row.receipt_sent) == ("r1", "forgotten", True)
            ledger.append([RequestOutcome(status="abandoned", request_id="r1", version="v000002", reason=None, topic="t",
                                   partition=0, offset=0, subject=None, completed_at=NOW)])
            assert ledger.counts()["abandoned"] == 1
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                ledger._db.execute("DELETE FROM outcomes")

    def test_a_schema_2_ledger_gains_mode_and_target_class(self, tmp_path) -> None:
        """A ledger written before the goal columns opens with its rows (mode and target_class
        null); new rows keep both, and reconcile copies them from a manifest entry."""
        path = tmp_path / "ledger.sqlite3"
        db = sqlite3.connect(path)
        db.executescript(_SCHEMA_1.replace(
            "CHECK (status IN ('forgotten', 'relabelled', 'duplicate', 'rejected', 'failed', 'rolled_back'))", ""))
        db.execute("PRAGMA user_version = 2")
        db.close()
        with Ledger(path) as ledger:
            (row,) = ledger.rows()
            assert (row.outcome.request_id, row.outcome.mode, row.outcome.target_class) == ("r1", None, None)
            ledger.append([RequestOutcome.from_manifest({**_entry("u", 1), "mode": "unseen", "target_class": 3},
                                                        "v000002", NOW)])
        with Ledger(path) as ledger:
            assert [(r.outcome.mode, r.outcome.target_class) for r in ledger.rows()] == [(None, None), ("unseen", 3)]
            assert ledger._db.execute("PRAGMA user_version").fetchone() == (4,)
            ledger._db.execute("PRAGMA user_version = 2")  # as an older daemon leaves it after opening it
        with Ledger(path) as ledger:
            assert len(ledger.rows()) == 2

    def test_text_a_utf8_store_cannot_hold_is_escaped(self, tmp_path) -> None:
        """An unpaired surrogate or a control character in a reason or subject is stored escaped, never raised."""
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            outcome = RequestOutcome(status="rejected", request_id=None, version=None, reason="bad \ud83d key\x00",
                              topic="t", partition=0, offset=3, subject="user-\ud83d", completed_at="now")
            ledger.append([outcome])
            (row,) = ledger.rows()
        assert row.outcome.reason == "bad \\ud83d key\\x00" and row.outcome.subject == "user-\\ud83d"

    def test_a_quarantined_failure_is_not_applied(self, tmp_path) -> None:
        """`failed` without a version (quarantined, never in the model) does not make a request applied."""
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            ledger.append([_o("failed", 5, "r9")])
            assert ledger.applied("r9") is None and ledger.handled(T, 0, 5)


class TestSchema4:
    def test_sample_ref_numbers_and_received_at_round_trip(self, ledger: Ledger) -> None:
        """The columns schema 4 added come back as they went in; owed() follows a deferral until it is applied."""
        base = dict(request_id="q", reason="budget", topic=T, partition=0, subject=None, completed_at=NOW,
                    goal=Goal("misclassify", 1), received_at="2024-05-01T11:59:00.000Z")
        ledger.append([RequestOutcome(status="deferred", version=None, offset=5, numbers={"audit_drop": 0.2},
                                      sample_ref={"dataset": "digits", "index": 7}, **base)])
        (row,) = ledger.rows()
        assert (row.outcome.sample_ref, dict(row.outcome.numbers), row.outcome.received_at) == (
            {"dataset": "digits", "index": 7}, {"audit_drop": 0.2}, "2024-05-01T11:59:00.000Z")
        assert ledger.owed("q") and not ledger.owed("other")
        ledger.append([RequestOutcome(status="forgotten", version="v000004", offset=6, **base)])
        assert not ledger.owed("q")

    def test_a_schema_3_ledger_gains_the_new_columns(self, tmp_path: Path) -> None:
        """A ledger written by schema 3 opens, keeps its rows (NULL in the new columns) and takes new ones."""
        path = tmp_path / "old.sqlite3"
        db = sqlite3.connect(path)
        db.executescript(_SCHEMA_1.replace(
            "CHECK (status IN ('forgotten', 'relabelled', 'duplicate', 'rejected', 'failed', 'rolled_back'))", ""))
        db.execute("ALTER TABLE outcomes ADD COLUMN mode TEXT")
        db.execute("ALTER TABLE outcomes ADD COLUMN target_class INTEGER")
        db.execute("INSERT INTO outcomes (request_id, status, topic, partition, \"offset\", completed_at, mode) "
                   "VALUES ('r2', 'forgotten', 't', 0, 1, '2024-01-01T00:00:00.000Z', 'misclassify')")
        db.execute("PRAGMA user_version = 3")
        db.commit()
        db.close()
        with Ledger(path) as ledger:
            old = ledger.rows()[-1].outcome  # r1 from _SCHEMA_1, then this one
            assert (old.request_id, old.mode, old.sample_ref, dict(old.numbers)) == ("r2", "misclassify", None, {})
            ledger.append([RequestOutcome(status="rejected", request_id="r3", version=None, reason="x", topic="t",
                                          partition=0, offset=2, subject=None, completed_at=NOW,
                                          sample_ref={"uri": "file:///a.png"})])
            assert ledger.rows()[-1].outcome.sample_ref == {"uri": "file:///a.png"}
