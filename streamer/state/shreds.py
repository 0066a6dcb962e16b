"""The ledger's record of crypto-shreds: one append-only row per request whose data key was destroyed.

It lives in the ledger database (`ledger.sqlite3`, table `shreds`) beside the outcomes: `streamer
verify` and `streamer erasure-report` read "verified until vN, shredded at T" from it. The vault
shreds first and this row follows; a crash in between is repaired on start from the vault's
index (`record_missing`), so the ledger never claims a shred that did not happen and never misses
one that did. Like the outcomes, rows can be neither updated nor deleted (SQLite triggers).
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .ledger import LedgerError, transaction
from .ledger_table import LedgerTable
from .manifest import rfc3339
from .vault import VaultEntry

__all__ = ["ShredLog", "ShredRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shreds (
    request_id       TEXT PRIMARY KEY,
    verified_version TEXT,              -- the last version whose weights met the request's goal
    at_version       TEXT,              -- CURRENT when the DEK was destroyed (NULL: repaired on start)
    shredded_at      TEXT NOT NULL,     -- RFC 3339
    key_id           TEXT NOT NULL,     -- the KEK that had wrapped the destroyed DEK
    reason           TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS shreds_no_update BEFORE UPDATE ON shreds
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS shreds_no_delete BEFORE DELETE ON shreds
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""
_COLUMNS = ("request_id", "verified_version", "at_version", "shredded_at", "key_id", "reason")


@dataclass(frozen=True)
class ShredRow:
    request_id: str
    verified_version: str | None
    at_version: str | None
    shredded_at: str
    key_id: str
    reason: str

    @property
    def verified_at_shred(self) -> bool:
        """The final check before the shred found the goal met on CURRENT's weights."""
        return self.at_version is not None and self.verified_version == self.at_version


class ShredLog(LedgerTable):
    """The `shreds` table of the ledger database at `path` (created if missing). One thread."""

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA, "shred log")

    def append(self, rows: Iterable[ShredRow]) -> None:
        """Record shreds in one transaction; a request already recorded keeps its first row."""
        try:
            with transaction(self._db):
                self._db.executemany(f"INSERT OR IGNORE INTO shreds ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)",
                                     [tuple(getattr(r, c) for c in _COLUMNS) for r in rows])
        except sqlite3.Error as err:
            raise LedgerError(f"cannot append to the shred log in {self.path}: {err}") from err

    def rows(self) -> dict[str, ShredRow]:
        """Every shred by request id."""
        return {r[0]: ShredRow(*r) for r in self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM shreds ORDER BY rowid")}

    def record_missing(self, entries: Sequence[VaultEntry], key_id: str) -> list[ShredRow]:
        """Rows for shredded vault entries the log lacks (a crash between the shred and its row)."""
        known = self.rows()
        missing = [ShredRow(e.request_id, e.verified_version, None, rfc3339(e.shredded_at or 0.0), key_id,
                            "recorded on start from the vault's index: the daemon stopped between the shred and "
                            "this row") for e in entries if e.shredded and e.request_id not in known]
        if missing:
            self.append(missing)
        return missing
