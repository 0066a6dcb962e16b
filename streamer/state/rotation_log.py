"""The ledger's record of KEK rotations and of old KEKs destroyed: two append-only tables.

They live in the ledger database (`ledger.sqlite3`) beside the outcomes and the shreds:
`rotations` holds one row per rotation (keyed by its id, so the row written again after a crash
is a no-op: exactly once), `kek_disposals` one row per old KEK destroyed or scheduled for
deletion, from when on backups of `vault/` wrapped by it are unreadable. Like the other tables,
rows can be neither updated nor deleted (SQLite triggers).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .ledger import LedgerError, transaction
from .ledger_table import LedgerTable

__all__ = ["DisposalRow", "RotationLog", "RotationRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rotations (
    rotation_id  TEXT PRIMARY KEY,
    old_key_id   TEXT NOT NULL,
    new_key_id   TEXT NOT NULL,
    entries      INTEGER NOT NULL,   -- live vault entries whose DEK was re-wrapped
    rotated_at   TEXT NOT NULL,      -- RFC 3339: the commit point (the rotation record written)
    finished_at  TEXT NOT NULL,      -- RFC 3339: this row written (later after a crash)
    finished_by  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kek_disposals (
    key_id          TEXT PRIMARY KEY,
    how             TEXT NOT NULL,  -- erased | deletion_scheduled
    disposed_at     TEXT NOT NULL,  -- RFC 3339
    unreadable_from TEXT NOT NULL,  -- RFC 3339: backups wrapped by this KEK cannot be opened from then on
    detail          TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS rotations_no_update BEFORE UPDATE ON rotations
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS rotations_no_delete BEFORE DELETE ON rotations
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS kek_disposals_no_update BEFORE UPDATE ON kek_disposals
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS kek_disposals_no_delete BEFORE DELETE ON kek_disposals
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


@dataclass(frozen=True)
class RotationRow:
    rotation_id: str
    old_key_id: str
    new_key_id: str
    entries: int
    rotated_at: str
    finished_at: str
    finished_by: str


@dataclass(frozen=True)
class DisposalRow:
    key_id: str
    how: str
    disposed_at: str
    unreadable_from: str
    detail: str


_ROTATION_COLUMNS = tuple(RotationRow.__dataclass_fields__)
_DISPOSAL_COLUMNS = tuple(DisposalRow.__dataclass_fields__)


class RotationLog(LedgerTable):
    """The `rotations` and `kek_disposals` tables of the ledger database at `path` (created if missing)."""

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA, "rotation log")

    def record_rotation(self, row: RotationRow) -> None:
        """Append a rotation; one already recorded under its id keeps its first row."""
        self._insert("rotations", _ROTATION_COLUMNS, tuple(getattr(row, c) for c in _ROTATION_COLUMNS))

    def record_disposal(self, row: DisposalRow) -> None:
        """Append an old KEK's disposal; a key already recorded keeps its first row."""
        self._insert("kek_disposals", _DISPOSAL_COLUMNS, tuple(getattr(row, c) for c in _DISPOSAL_COLUMNS))

    def rotations(self) -> list[RotationRow]:
        return [RotationRow(*r) for r in self._db.execute(
            f"SELECT {', '.join(_ROTATION_COLUMNS)} FROM rotations ORDER BY rowid")]

    def disposals(self) -> list[DisposalRow]:
        return [DisposalRow(*r) for r in self._db.execute(
            f"SELECT {', '.join(_DISPOSAL_COLUMNS)} FROM kek_disposals ORDER BY rowid")]

    def _insert(self, table: str, columns: tuple[str, ...], values: tuple) -> None:
        try:
            with transaction(self._db):
                self._db.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) "
                                 f"VALUES ({', '.join('?' for _ in columns)})", values)
        except sqlite3.Error as err:
            raise LedgerError(f"cannot append to {table} in {self.path}: {err}") from err
