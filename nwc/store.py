"""Durable controller state in SQLite: weaves, their reservations and leases, the audit chain.

Every change is one transaction (WAL, synchronous=FULL: committed means on disk), so a
controller that restarts finds exactly the weaves that were live, with their reservations, and
an audit record for every decision up to the crash. The state directory is private (0700) and
the database 0600: it names tenants and their networks.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nwc.audit import GENESIS, JsonlMirror, seal
from nwc.fabric import Reservation
from nwc.weave import State, Weave

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS weaves (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    state TEXT NOT NULL,
    requester TEXT NOT NULL,
    target TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    record TEXT NOT NULL,
    requester_tenant TEXT NOT NULL DEFAULT '',
    target_tenant TEXT NOT NULL DEFAULT '',
    teardown_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS weaves_state ON weaves(state);
CREATE TABLE IF NOT EXISTS reservations (
    weave_id TEXT PRIMARY KEY REFERENCES weaves(id),
    paths TEXT NOT NULL,
    kbps INTEGER NOT NULL
);
-- The flows part's: switches off a weave's current paths that may still hold its flows (it
-- moved while they were away), a JSON list of datapath ids, so that a restart still waits
-- for them at teardown. Added without a schema change: older databases get the empty table.
CREATE TABLE IF NOT EXISTS off_path_flows (
    weave_id TEXT PRIMARY KEY REFERENCES weaves(id),
    dpids TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    record TEXT NOT NULL
);
"""


class TransactionLost(sqlite3.OperationalError):
    """SQLite ended the transaction on its own, part-way: none of it is on disk."""


# The database's name inside a state directory (`nwc token issue` and `nwc audit verify`
# look for it too).
DATABASE_FILE = "nwc.db"


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.dir = private_dir(state_dir)
        self.path = self.dir / DATABASE_FILE
        old_umask = os.umask(0o077)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._tx_depth = 0
        self._pending_audit: list[tuple[int, str]] = []  # (seq, JSON text)
        self._after_commit: list[Callable[[], None]] = []
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema {row[0]}, this NWC knows "
                               f"{SCHEMA_VERSION}")
        last = self.db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        self._audit_seq, self._audit_hash = (last[0], last[1]) if last else (0, GENESIS)
        self.mirror = JsonlMirror(self.dir / "audit.jsonl")
        # Catch the file up with records committed before a crash.
        self.mirror.append(self._audit_texts(after=self.mirror.last_seq))
        self._add_tenant_columns()
        self._add_teardown_column()

    def _add_tenant_columns(self) -> None:
        """Databases made before the tenant columns get them, filled from the records."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(weaves)")}
        if "requester_tenant" not in columns:
            with self.transaction():
                for column in ("requester_tenant", "target_tenant"):
                    self.db.execute(f"ALTER TABLE weaves ADD COLUMN {column} TEXT NOT NULL "
                                    "DEFAULT ''")
                for weave_id, record in self.db.execute("SELECT id, record FROM weaves"
                                                        ).fetchall():
                    d = json.loads(record)
                    self.db.execute("UPDATE weaves SET requester_tenant=?, target_tenant=? "
                                    "WHERE id=?", (d["requester_tenant"], d["target_tenant"],
                                                   weave_id))
        # A tenant's listing asks "requester_tenant = ? OR target_tenant = ?": one index per
        # column lets SQLite answer each side of the OR from an index.
        self.db.execute("DROP INDEX IF EXISTS weaves_tenants")
        self.db.execute("CREATE INDEX IF NOT EXISTS weaves_requester_tenant "
                        "ON weaves(requester_tenant)")
        self.db.execute("CREATE INDEX IF NOT EXISTS weaves_target_tenant "
                        "ON weaves(target_tenant)")

    def _add_teardown_column(self) -> None:
        """Databases made before it get the teardown_pending column: 0 for every weave, as
        nothing recorded whether an ended weave's teardown was confirmed (those left
        terminating still say so by their state)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(weaves)")}
        if "teardown_pending" not in columns:
            with self.transaction():
                self.db.execute("ALTER TABLE weaves ADD COLUMN teardown_pending INTEGER "
                                "NOT NULL DEFAULT 0")
        # A start looks for the few pending teardowns among a long history of ended weaves.
        self.db.execute("CREATE INDEX IF NOT EXISTS weaves_teardown_pending "
                        "ON weaves(teardown_pending) WHERE teardown_pending = 1")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all; audit records reach the JSONL
        file, and `after_commit` callbacks run, only once their transaction commits. A
        transaction inside another is a savepoint: if it fails, its own writes, audit records
        and callbacks are undone and the outer one goes on without them. Some errors (an
        interrupt, a full disk) make SQLite roll back the whole transaction at once: then
        every savepoint after it is refused and the outer transaction fails too
        (`TransactionLost`), so nothing is written half."""
        with self._lock:
            depth = self._tx_depth
            if depth == 0:
                self.db.execute("BEGIN IMMEDIATE")
            elif not self.db.in_transaction:
                # A savepoint now would begin a new transaction and RELEASE would commit it.
                raise TransactionLost("SQLite rolled back the enclosing transaction")
            else:
                self.db.execute(f"SAVEPOINT nwc{depth}")
            saved = (self._audit_seq, self._audit_hash, len(self._pending_audit),
                     len(self._after_commit))
            self._tx_depth += 1
            try:
                yield
                if not self.db.in_transaction:
                    raise TransactionLost("SQLite rolled the transaction back part-way "
                                          "(see the error logged before this one)")
                self.db.execute("COMMIT" if depth == 0 else f"RELEASE nwc{depth}")
            except BaseException:
                self._audit_seq, self._audit_hash = saved[0], saved[1]
                del self._pending_audit[saved[2]:]
                del self._after_commit[saved[3]:]
                if self.db.in_transaction:
                    if depth == 0:
                        self.db.execute("ROLLBACK")
                    else:
                        self.db.execute(f"ROLLBACK TO nwc{depth}")
                        self.db.execute(f"RELEASE nwc{depth}")
                raise
            finally:
                self._tx_depth -= 1
            if depth == 0:
                pending, self._pending_audit = self._pending_audit, []
                self._mirror(pending)
                callbacks, self._after_commit = self._after_commit, []
                for callback in callbacks:
                    # Committed is committed: one callback failing (a part, a listener) must
                    # not keep the others from running, nor fail the caller's transaction.
                    try:
                        callback()
                    except Exception:
                        log.exception("a callback after a commit failed")

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the open transaction commits (dropped if it rolls back); at
        once when none is open."""
        if self._tx_depth == 0:
            callback()
        else:
            self._after_commit.append(callback)

    def _mirror(self, pending: list[tuple[int, str]]) -> None:
        """Copy committed audit records to the JSONL file. Committed is committed: a failing
        file (disk full) is logged, never raised into the caller, and the records it missed
        are copied from the database on the next commit."""
        try:
            if pending and pending[0][0] != self.mirror.last_seq + 1:
                pending = self._audit_texts(after=self.mirror.last_seq)
            self.mirror.append(pending)
        except OSError:
            log.exception("could not append to %s; it catches up on the next commit",
                          self.mirror.path)

    # -- weaves ---------------------------------------------------------------------------

    def next_weave_number(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM weaves").fetchone()
        return int(row[0])

    def save_weave(self, weave: Weave, record: dict[str, Any] | None = None, *,
                   teardown_pending: bool = False) -> None:
        """Insert or update a weave; `record` is its `to_dict()` when the caller has it.
        `teardown_pending`: the weave ended but its data plane is not confirmed gone yet (a
        failed weave's state cannot say so), so that a restart goes on waiting for it."""
        record = weave.to_dict() if record is None else record
        self.db.execute(
            "INSERT INTO weaves (id, number, state, requester, target, expires_at, record, "
            "requester_tenant, target_tenant, teardown_pending) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state=excluded.state, "
            "expires_at=excluded.expires_at, record=excluded.record, "
            "teardown_pending=excluded.teardown_pending",
            (weave.id, weave.number, weave.state.value, weave.requester, weave.target,
             record["expires_at"], json.dumps(record),
             weave.requester_tenant, weave.target_tenant, int(teardown_pending)))

    def weave(self, weave_id: str) -> Weave | None:
        row = self.db.execute("SELECT record FROM weaves WHERE id=?", (weave_id,)).fetchone()
        return Weave.from_dict(json.loads(row[0])) if row else None

    def weaves(self, *, states: Iterable[State] | None = None) -> list[Weave]:
        """Every weave (or those in `states`), oldest first."""
        if states is None:
            rows = self.db.execute("SELECT record FROM weaves ORDER BY number")
        else:
            values = [s.value for s in states]
            marks = ",".join("?" * len(values))
            rows = self.db.execute(f"SELECT record FROM weaves WHERE state IN ({marks}) "
                                   "ORDER BY number", values)
        return [Weave.from_dict(json.loads(r[0])) for r in rows]

    def unconfirmed_teardowns(self) -> list[Weave]:
        """Ended weaves whose teardown was not confirmed (left terminating, or failed with
        teardown_pending), oldest first."""
        rows = self.db.execute("SELECT record FROM weaves WHERE state = ? OR "
                               "teardown_pending = 1 ORDER BY number",
                               (State.TERMINATING.value,))
        return [Weave.from_dict(json.loads(r[0])) for r in rows]

    def newest_weaves(self, *, tenant: str | None = None, state: str | None = None,
                      limit: int = 100) -> list[Weave]:
        """The newest `limit` weaves a tenant is party to (tenant None: everyone's), done in
        SQL so a long history costs the loop thread only what is returned."""
        sql = "SELECT record FROM weaves WHERE 1=1"
        args: list[Any] = []
        if tenant is not None:
            sql += " AND (requester_tenant = ? OR target_tenant = ?)"
            args += [tenant, tenant]
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        sql += " ORDER BY number DESC LIMIT ?"
        args.append(limit)
        return [Weave.from_dict(json.loads(r[0])) for r in self.db.execute(sql, args)]

    def count_weaves_by_state(self) -> dict[str, int]:
        """How many weaves are in each state (ended ones included): for metrics."""
        rows = self.db.execute("SELECT state, COUNT(*) FROM weaves GROUP BY state")
        return {state: count for state, count in rows}

    # -- reservations ---------------------------------------------------------------------

    def save_reservation(self, reservation: Reservation) -> None:
        self.db.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?, ?)",
                        (reservation.weave_id, json.dumps([list(p) for p in reservation.paths]),
                         reservation.kbps))

    def delete_reservation(self, weave_id: str) -> None:
        self.db.execute("DELETE FROM reservations WHERE weave_id=?", (weave_id,))

    def reservations(self) -> dict[str, Reservation]:
        rows = self.db.execute("SELECT weave_id, paths, kbps FROM reservations")
        return {w: Reservation(w, tuple(tuple(p) for p in json.loads(ps)), k)
                for w, ps, k in rows}

    # -- switches that may hold a weave's flows off its paths --------------------------------

    def save_off_path_flows(self, weave_id: str, dpids: Iterable[int]) -> None:
        """Record the switches off the weave's current paths that may still hold its flows
        (none: the record goes)."""
        held = sorted(set(dpids))
        if held:
            # Text: a datapath id is 64 bits unsigned, beyond SQLite's signed integers.
            self.db.execute("INSERT OR REPLACE INTO off_path_flows VALUES (?, ?)",
                            (weave_id, json.dumps([f"{d:x}" for d in held])))
        else:
            self.db.execute("DELETE FROM off_path_flows WHERE weave_id=?", (weave_id,))

    def off_path_flows(self) -> dict[str, set[int]]:
        rows = self.db.execute("SELECT weave_id, dpids FROM off_path_flows")
        return {w: {int(d, 16) for d in json.loads(ds)} for w, ds in rows}

    # -- audit ----------------------------------------------------------------------------

    def audit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Append a record to the chain; must run inside a transaction."""
        if self._tx_depth == 0:
            with self.transaction():
                return self.audit(body)
        seq = self._audit_seq + 1
        record, text = seal({**body, "seq": seq}, self._audit_hash)
        self.db.execute("INSERT INTO audit VALUES (?, ?, ?)", (seq, record["hash"], text))
        self._audit_seq, self._audit_hash = seq, record["hash"]
        self._pending_audit.append((seq, text))
        return record

    def _audit_texts(self, after: int) -> list[tuple[int, str]]:
        """Committed records after `after` as (seq, JSON text), for the mirror to catch up."""
        return list(self.db.execute("SELECT seq, record FROM audit WHERE seq > ? ORDER BY seq",
                                    (after,)))

    def audit_records(self, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT record FROM audit WHERE seq > ? ORDER BY seq"
        args: list[Any] = [after]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [json.loads(r[0]) for r in self.db.execute(sql, args)]
