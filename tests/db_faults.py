"""Faults at the database boundary for tests: the real SQLite connection, except that some
statements fail the way a broken or full disk makes them fail."""

from __future__ import annotations

import sqlite3
from typing import Any


class CommitFails:
    """The database connection, except that COMMIT fails as a full or broken disk would
    (the next `times` commits; every one when None)."""

    def __init__(self, db: sqlite3.Connection, times: int | None = None) -> None:
        self._db = db
        self.times = times

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and (self.times is None or self.times > 0):
            if self.times is not None:
                self.times -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class InterruptsWeaveInserts:
    """The database connection, except that the next `times` inserts into the weaves table
    are interrupted by SQLite itself (a progress handler): SQLite then rolls back the whole
    transaction, as it may on a full disk or an I/O error, not just the statement."""

    def __init__(self, db: sqlite3.Connection, times: int = 1) -> None:
        self._db = db
        self.times = times

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("INSERT INTO weaves") and self.times > 0:
            self.times -= 1
            self._db.set_progress_handler(lambda: 1, 1)
            try:
                return self._db.execute(sql, *args)
            finally:
                self._db.set_progress_handler(None, 1)
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)
