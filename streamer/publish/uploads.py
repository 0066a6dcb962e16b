"""The `uploads` table of the ledger database: which version reached which publish target, and
where each target's alias points. Append-only (SQLite triggers refuse UPDATE and DELETE), one
connection per thread (the mirror thread has its own)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from ..state import LedgerError, LedgerTable, ledger_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    target      TEXT NOT NULL,
    version     TEXT NOT NULL,
    kind        TEXT NOT NULL,   -- version: its files are there; alias: the alias points at it
    uploaded_at TEXT NOT NULL,
    PRIMARY KEY (target, version, kind)
);
CREATE TRIGGER IF NOT EXISTS uploads_no_update BEFORE UPDATE ON uploads
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS uploads_no_delete BEFORE DELETE ON uploads
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""

__all__ = ["UploadLog"]


class UploadLog(LedgerTable):
    """What the publish targets hold, as recorded after each upload succeeded."""

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA, "upload log")

    def record(self, target: str, version: str, kind: str, at: str) -> None:
        """Note an upload (kind "version") or an alias move (kind "alias"); a repeat is a no-op."""
        try:
            with ledger_transaction(self._db):
                self._db.execute("INSERT OR IGNORE INTO uploads (target, version, kind, uploaded_at) VALUES (?, ?, ?, ?)",
                                 (target, version, kind, at))
        except sqlite3.Error as err:
            raise LedgerError(f"cannot record an upload in {self.path}: {err}") from err

    def uploaded(self, target: str) -> set[str]:
        """The versions whose files `target` holds."""
        rows = self._db.execute("SELECT version FROM uploads WHERE target = ? AND kind = 'version'", (target,))
        return {version for (version,) in rows}

    def alias(self, target: str) -> str | None:
        """The version `target`'s alias was last moved to, or None."""
        row = self._db.execute("SELECT version FROM uploads WHERE target = ? AND kind = 'alias' "
                               "ORDER BY rowid DESC LIMIT 1", (target,)).fetchone()
        return None if row is None else row[0]
