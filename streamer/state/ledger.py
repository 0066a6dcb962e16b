"""The ledger: an append-only SQLite record of every request's outcome and the version holding it.

It answers "was request R applied, and in which version?" (duplicates), "which receipts are
still owed?" (receipts are re-sent after a crash), "what happened to record (topic, partition,
offset)?" (a record re-read after a crash is not handled twice) and the audit counts.

Rows are never updated or deleted (SQLite triggers refuse it). A receipt that went out is
recorded in a second append-only table. Rows are keyed by (topic, partition, offset, status,
version): appending the same outcome twice is a no-op, which is what makes `reconcile` and a
re-read record safe. The checkpoint manifests are the source of truth for applied requests:
`reconcile.py` makes the ledger agree with CURRENT's lineage at start.
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import StreamerError
from ..intake import Goal, storable_text
from .durable import PRIVATE_FILE, restrict
from .outcome import RECEIPTED, STATUSES, RequestOutcome

LEDGER_FILE = "ledger.sqlite3"  # beside the version directories
SCHEMA_VERSION = 4  # PRAGMA user_version; 1 had a CHECK on the status list, which froze it; 3 added mode,
# target_class; 4 added received_at, sample_ref and numbers (JSON: the measured numbers behind a status)

__all__ = ["LEDGER_FILE", "Ledger", "LedgerError", "LedgerRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id   TEXT,
    status       TEXT NOT NULL,
    version      TEXT,
    reason       TEXT,
    topic        TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    "offset"     INTEGER NOT NULL,
    subject      TEXT,
    completed_at TEXT NOT NULL,
    mode         TEXT,
    target_class INTEGER,
    received_at  TEXT,
    sample_ref   TEXT,
    numbers      TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS outcomes_key ON outcomes (topic, partition, "offset", status, IFNULL(version, ''));
CREATE INDEX IF NOT EXISTS outcomes_request ON outcomes (request_id);
CREATE INDEX IF NOT EXISTS outcomes_version ON outcomes (version);
CREATE TABLE IF NOT EXISTS receipts_sent (
    seq     INTEGER PRIMARY KEY REFERENCES outcomes (seq),
    sent_at TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS outcomes_no_update BEFORE UPDATE ON outcomes
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS outcomes_no_delete BEFORE DELETE ON outcomes
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts_sent
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts_sent
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""
_V2_COLUMNS = ("request_id", "status", "version", "reason", "topic", "partition", "offset", "subject", "completed_at")
_ADDED = (("mode", "TEXT"), ("target_class", "INTEGER"), ("received_at", "TEXT"), ("sample_ref", "TEXT"),
          ("numbers", "TEXT"))  # after schema 2, in order
_COLUMNS = (*_V2_COLUMNS, *(name for name, _ in _ADDED))
_JSON_COLUMNS = ("sample_ref", "numbers")
_SELECT = "SELECT seq, " + ", ".join(f'"{c}"' for c in _COLUMNS) + " FROM outcomes"


class LedgerError(StreamerError):
    """The ledger cannot be opened or written: stop (nothing is committed after a failed write)."""


@dataclass(frozen=True)
class LedgerRow:
    seq: int
    outcome: RequestOutcome
    receipt_sent: bool


class Ledger:
    """The ledger database at `path` (created if missing). Used from one thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._db = connect(self.path)
            _migrate(self._db)
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as err:
            raise LedgerError(f"cannot open the ledger {self.path}: {err}") from err

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- writing -----------------------------------------------------------------------------

    def append(self, outcomes: Iterable[RequestOutcome]) -> list[int]:
        """Append outcomes in one transaction; one already present is kept. Returns each one's seq."""
        seqs: list[int] = []
        try:
            with transaction(self._db):
                for o in outcomes:
                    self._db.execute(
                        f'INSERT OR IGNORE INTO outcomes ({", ".join(_quoted(_COLUMNS))}) '
                        f'VALUES ({", ".join("?" for _ in _COLUMNS)})',
                        tuple(_column(o, c) for c in _COLUMNS),
                    )
                    (seq,) = self._db.execute(
                        'SELECT seq FROM outcomes WHERE topic = ? AND partition = ? AND "offset" = ? AND status = ? '
                        "AND IFNULL(version, '') = IFNULL(?, '')",
                        (o.topic, o.partition, o.offset, o.status, o.version),
                    ).fetchone()
                    seqs.append(seq)
        except sqlite3.Error as err:
            raise LedgerError(f"cannot append to the ledger {self.path}: {err}") from err
        return seqs

    def mark_receipts_sent(self, seqs: Iterable[int], sent_at: str) -> None:
        try:
            with transaction(self._db):
                self._db.executemany("INSERT OR IGNORE INTO receipts_sent (seq, sent_at) VALUES (?, ?)",
                                     [(seq, sent_at) for seq in seqs])
        except sqlite3.Error as err:
            raise LedgerError(f"cannot record sent receipts in {self.path}: {err}") from err

    # --- queries -----------------------------------------------------------------------------

    def applied(self, request_id: str) -> str | None:
        """The version that applied `request_id`, or None (never applied, or rolled back since)."""
        row = self._db.execute(
            "SELECT status, version FROM outcomes WHERE request_id = ? "
            "AND status IN ('forgotten', 'relabelled', 'failed', 'rolled_back') AND version IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1",
            (request_id,),
        ).fetchone()
        return None if row is None or row[0] == "rolled_back" else row[1]

    def owed(self, request_id: str) -> bool:
        """Whether `request_id` is deferred and not applied since (a rebase applies it)."""
        row = self._db.execute(
            "SELECT status FROM outcomes WHERE request_id = ? AND (status = 'deferred' OR "
            "(status IN ('forgotten', 'relabelled', 'failed', 'rebased') AND version IS NOT NULL)) "
            "ORDER BY seq DESC LIMIT 1", (request_id,)).fetchone()
        return row is not None and row[0] == "deferred"

    def last_applied(self, request_id: str) -> RequestOutcome | None:
        """The outcome that applied `request_id` (its record's coordinates), or None."""
        version = self.applied(request_id)
        if version is None:
            return None
        rows = self._rows("WHERE request_id = ? AND version = ? AND status IN ('forgotten', 'relabelled', 'failed') "
                          "ORDER BY seq DESC LIMIT 1", (request_id, version))
        return rows[0].outcome if rows else None

    def handled(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the record at (topic, partition, offset) already has an outcome that stands."""
        row = self._db.execute(
            'SELECT 1 FROM outcomes o WHERE topic = ? AND partition = ? AND "offset" = ? AND status != \'rolled_back\' '
            "AND NOT EXISTS (SELECT 1 FROM outcomes r WHERE r.status = 'rolled_back' AND r.topic = o.topic "
            'AND r.partition = o.partition AND r."offset" = o."offset" AND r.version IS o.version) LIMIT 1',
            (topic, partition, offset),
        ).fetchone()
        return row is not None

    def requests_of(self, version: str) -> list[RequestOutcome]:
        """The outcomes recorded with `version`, in ledger order."""
        return [row.outcome for row in self._rows("WHERE version = ? ORDER BY seq", (version,))]

    def counts(self) -> dict[str, int]:
        """Rows per status (every status present, 0 when none)."""
        found = dict(self._db.execute("SELECT status, COUNT(*) FROM outcomes GROUP BY status").fetchall())
        return {status: int(found.get(status, 0)) for status in STATUSES}

    def contains(self, o: RequestOutcome) -> bool:
        """Whether this outcome (same record, status and version) is already recorded."""
        row = self._db.execute(
            'SELECT 1 FROM outcomes WHERE topic = ? AND partition = ? AND "offset" = ? AND status = ? '
            "AND IFNULL(version, '') = IFNULL(?, '')",
            (o.topic, o.partition, o.offset, o.status, o.version),
        ).fetchone()
        return row is not None

    def applied_after(self, version_number: int) -> list[RequestOutcome]:
        """Applied outcomes recorded with a version numbered above `version_number`."""
        return [row.outcome for row in self._rows(
            "WHERE status IN ('forgotten', 'relabelled', 'failed') AND CAST(SUBSTR(version, 2) AS INTEGER) > ? "
            "ORDER BY seq", (version_number,))]

    def rows(self) -> list[LedgerRow]:
        return self._rows("ORDER BY seq", ())

    def unsent_receipts(self) -> list[LedgerRow]:
        """Rows that owe a receipt (a readable request_id and a receipted status) not sent yet."""
        placeholders = ", ".join("?" for _ in RECEIPTED)
        return self._rows(f"WHERE request_id IS NOT NULL AND status IN ({placeholders}) "
                          "AND seq NOT IN (SELECT seq FROM receipts_sent) ORDER BY seq", RECEIPTED)

    def _rows(self, where: str, params: Sequence[Any]) -> list[LedgerRow]:
        sent = {seq for (seq,) in self._db.execute("SELECT seq FROM receipts_sent")}
        return [LedgerRow(r[0], _from_row(dict(zip(_COLUMNS, r[1:]))), r[0] in sent)
                for r in self._db.execute(f"{_SELECT} {where}", tuple(params))]


def _from_row(row: dict[str, Any]) -> RequestOutcome:
    """A ledger row as its outcome (the ledger keeps the goal's mode and target class, not its label)."""
    mode = row.pop("mode")
    target_class = row.pop("target_class")
    sample_ref, numbers = (json.loads(text) if (text := row.pop(c)) is not None else None for c in _JSON_COLUMNS)
    return RequestOutcome(**row, goal=None if mode is None else Goal(mode, None, target_class), sample_ref=sample_ref,
                          numbers=MappingProxyType(numbers or {}))


def _column(o: RequestOutcome, column: str) -> Any:
    """An outcome's value for a column: JSON text for the mappings, storable text for the strings."""
    value = getattr(o, column)
    if column in _JSON_COLUMNS:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False) if value else None
    return _storable(value)


def connect(path: Path) -> sqlite3.Connection:
    """The ledger database (the outcomes and the shred log share it): autocommit, WAL, and
    synchronous=FULL, so a committed row survives power loss. Owner-only (0600; SQLite gives its
    -wal and -shm files the database's mode). Raises sqlite3.Error."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE))
        for own in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            restrict(own, PRIVATE_FILE)  # a ledger written before modes were set
    except OSError as err:
        raise sqlite3.OperationalError(f"cannot open {path}: {err}") from err
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _storable(value: Any) -> Any:
    """Every text column holds what SQLite can encode (no unpaired surrogates), by construction."""
    return storable_text(value) if isinstance(value, str) else value


def _migrate(db: sqlite3.Connection) -> None:
    """Schema 1 -> 4: drop the CHECK on `status` (new statuses must not need a table rebuild); the
    append-only triggers go with the old table and are re-created by _SCHEMA. Schema 2 or 3 -> 4:
    add the columns missing (NULL in older rows)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outcomes'").fetchone()
    if version >= SCHEMA_VERSION or not exists:
        return
    columns = ", ".join(_quoted(("seq", *_V2_COLUMNS)))
    db.execute("PRAGMA legacy_alter_table = ON")  # a renamed `outcomes`: receipts_sent keeps referring to the new one
    with transaction(db):
        if version < 2:
            db.execute("ALTER TABLE outcomes RENAME TO outcomes_v1")
            db.execute(_SCHEMA.split(";")[0])  # CREATE TABLE outcomes (this schema)
            db.execute(f"INSERT INTO outcomes ({columns}) SELECT {columns} FROM outcomes_v1")
            db.execute("DROP TABLE outcomes_v1")
        else:  # only the columns missing (an older daemon that opened it may also have set user_version back)
            present = {row[1] for row in db.execute("PRAGMA table_info(outcomes)")}
            for column, kind in _ADDED:
                if column not in present:
                    db.execute(f"ALTER TABLE outcomes ADD COLUMN {column} {kind}")


def _quoted(columns: Sequence[str]) -> list[str]:
    return [f'"{c}"' for c in columns]


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
