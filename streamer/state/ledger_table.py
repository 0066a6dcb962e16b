"""The base of the tables that share the ledger database with the outcomes (shreds, rotations, uploads)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from .ledger import LedgerError, connect

__all__ = ["LedgerTable"]


class LedgerTable:
    """Base of the other tables that share the ledger database (shreds, rotations, uploads): opens
    `path` (created if missing) with `schema`, one connection per instance; a context manager.
    Raises LedgerError naming `what` when the database cannot be opened."""

    def __init__(self, path: str | Path, schema: str, what: str):
        self.path = Path(path)
        try:
            self._db = connect(self.path)
            self._db.executescript(schema)
        except sqlite3.Error as err:
            raise LedgerError(f"cannot open the {what} in {self.path}: {err}") from err

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
