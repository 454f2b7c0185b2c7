"""The audit trail: one record per decision, request and state change, chained by hash.

Each record carries `prev` (the hash of the record before it) and `hash` (SHA-256 over its own
canonical JSON, `prev` included), so editing, deleting or reordering any record breaks the chain
from that record on. Records are written to SQLite in the same transaction as the state change
they describe, then mirrored to `audit.jsonl` (append-only, mode 0600) for tools and humans.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def canonical(body: dict[str, Any]) -> bytes:
    return _canonical_text(body).encode()


def _canonical_text(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def seal(body: dict[str, Any], prev: str) -> tuple[dict[str, Any], str]:
    """The record with `prev` and `hash` set, and its JSON text: the canonical text it was
    hashed over with the hash added at the end. Stored and mirrored as it is, so a record is
    encoded once (encoding it again for the database and the file was a third of its cost)."""
    record = {k: v for k, v in body.items() if k != "hash"}
    record["prev"] = prev
    text = _canonical_text(record)
    record["hash"] = digest = hashlib.sha256(text.encode()).hexdigest()
    return record, f'{text[:-1]},"hash":"{digest}"}}'


@dataclass(frozen=True)
class ChainBreak:
    line: int  # 1-based line in the JSONL file (or position in the sequence)
    seq: int | None
    message: str
    # About what should follow the file's last line (`line`, 0 for an empty file): records
    # cut from its end. There is no line to name, so none is invented.
    at_end: bool = False
    # The file is a clean prefix of the database's chain that lacks its newest records: not
    # (yet) mirrored rather than proven deleted (see `check_tail`).
    behind: bool = False

    def __str__(self) -> str:
        if self.at_end:
            where = f"after line {self.line} (the last)" if self.line else "the file is empty"
            return f"{where}: {self.message}"
        where = f"record {self.seq}" if self.seq is not None else "a record"
        return f"line {self.line}: {where}: {self.message}"


def verify_chain(records: Iterable[dict[str, Any]]) -> list[ChainBreak]:
    """Check hashes, links and sequence numbers; report where the chain first breaks, plus
    every later record whose own hash is wrong (so several edits are all named)."""
    records = list(records)
    present = {r.get("seq") for r in records if isinstance(r, dict)}
    breaks: list[ChainBreak] = []
    prev, expected_seq = GENESIS, 1
    for line, record in enumerate(records, start=1):
        seq = record.get("seq") if isinstance(record, dict) else None
        if not isinstance(record, dict) or "hash" not in record:
            breaks.append(ChainBreak(line, None, "not an audit record"))
            continue
        body = {k: v for k, v in record.items() if k != "hash"}
        if hashlib.sha256(canonical(body)).hexdigest() != record["hash"]:
            breaks.append(ChainBreak(line, seq, "contents do not match its hash (edited)"))
        elif record.get("prev") != prev:
            breaks.append(ChainBreak(line, seq, _link_problem(seq, expected_seq, present)))
        elif seq != expected_seq:
            breaks.append(ChainBreak(line, seq, f"sequence number {seq}, expected "
                                     f"{expected_seq} (deleted or reordered records)"))
        prev = record["hash"]
        expected_seq = (seq if isinstance(seq, int) else expected_seq) + 1
    return breaks


def _link_problem(seq: Any, expected: int, present: set[Any]) -> str:
    """Why a record does not follow the one before it, as precisely as the file tells."""
    if isinstance(seq, int) and seq > expected:
        gap = range(expected, seq)
        name = f"record {gap[0]}" if len(gap) == 1 else f"records {gap[0]}..{gap[-1]}"
        if any(s in present for s in gap):
            return f"out of order: {name} should come before it (reordered)"
        return f"{name} before it {'is' if len(gap) == 1 else 'are'} missing (deleted)"
    if isinstance(seq, int) and seq < expected:
        return (f"out of order: it comes after record {expected - 1} "
                "(reordered, or replayed from earlier)")
    return "does not follow the record before it (a record was deleted, inserted or reordered)"


def database_head(db_path: Path) -> tuple[int, str] | None:
    """The last (seq, hash) of the audit chain in the controller's database, read-only.
    Removing records from the end of the file leaves an intact chain; the database, written
    in the same transaction as each record, still knows how long it was."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return (int(row[0]), str(row[1])) if row else None


def database_hash(db_path: Path, seq: int) -> str | None:
    """The hash of the database's audit record `seq` (None if it holds none), read-only."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()
    return str(row[0]) if row else None


def last_seq(records: list[dict[str, Any]]) -> int:
    """The sequence number of the file's last record (0 if it has none)."""
    last = next((r for r in reversed(records)
                 if isinstance(r, dict) and isinstance(r.get("seq"), int)), None)
    return int(last["seq"]) if last else 0


def check_tail(records: list[dict[str, Any]], head: tuple[int, str] | None,
               hash_at_file_end: str | None = None) -> ChainBreak | None:
    """Compare the file's end with the database's (see `database_head`): records the file
    lacks, a last record that differs, or records the database never held.
    `hash_at_file_end` is the database's hash of the file's last record's seq (`database_hash`):
    the controller commits a record to the database before appending it to the file, and a
    failed append (a full disk) catches up only at its next commit, so a file that ends
    exactly where the database's chain passes is `behind`, not proven cut."""
    db_seq, db_hash = head if head is not None else (0, "")
    seq = last_seq(records)
    if db_seq > seq:
        gap = f"record {db_seq} is" if db_seq == seq + 1 else f"records {seq + 1}..{db_seq} are"
        if seq == 0 or _last_hash(records, seq) == hash_at_file_end:
            return ChainBreak(len(records), seq + 1, f"{gap} in the database but not yet in "
                              "the file (the controller appends after each commit, and after "
                              "a failed append, at its next one), or cut from its end",
                              at_end=True, behind=True)
        return ChainBreak(len(records), seq + 1, f"{gap} missing from the end of the file "
                          "(deleted): the database holds them, and the file's last record "
                          "differs from the database's", at_end=True)
    if seq > db_seq:
        # The file is a mirror written after each commit: it never runs ahead of the
        # database, so these were added to it (or the database is older than the file).
        line = next(n for n, r in enumerate(records, start=1)
                    if isinstance(r, dict) and isinstance(r.get("seq"), int)
                    and r["seq"] > db_seq)
        return ChainBreak(line, db_seq + 1, f"not in the database, whose last record is "
                          f"{db_seq} (added to the file, or the database is older than it)")
    last = _last_hash(records, seq)
    if last is not None and last != db_hash:
        return ChainBreak(len(records), seq, "differs from the database's last record")
    return None


def _last_hash(records: list[dict[str, Any]], seq: int) -> Any:
    """The hash of the file's last record numbered `seq` (None if there is none)."""
    last = next((r for r in reversed(records) if isinstance(r, dict) and r.get("seq") == seq),
                None)
    return None if last is None else last.get("hash")


def compare_with_database(path: Path, db_path: Path) -> tuple[list[dict[str, Any]],
                                                               ChainBreak | None]:
    """Read the audit file and compare its end with the database (`check_tail`), while a
    controller may be writing both. The file is read before the database, so a record
    committed between the two reads is only ever missing from the file: when the file is
    behind, both are read once more, which such a record has reached by then."""
    records, tail = _read_and_check(path, db_path)
    if tail is not None and tail.behind:
        records, tail = _read_and_check(path, db_path)
    return records, tail


def _read_and_check(path: Path, db_path: Path) -> tuple[list[dict[str, Any]],
                                                        ChainBreak | None]:
    records = list(read_jsonl(path))  # first: see compare_with_database
    seq = last_seq(records)
    return records, check_tail(records, database_head(db_path),
                               database_hash(db_path, seq) if seq else None)


def intact(records: list[dict[str, Any]], *, database_checked: bool) -> str:
    """What an unbroken chain shows, and what it cannot: records cut from the end of the file
    leave the rest intact, so only the database (written with each record) shows them."""
    if database_checked:
        return (f"{len(records)} records, chain intact, up to the database's last record "
                f"({last_seq(records)})")
    return (f"{len(records)} records, chain intact up to record {last_seq(records)}; the file "
            "alone cannot show records cut from its end (the controller's nwc.db can: "
            "--state-dir)")


def describe(record: dict[str, Any]) -> str:
    """One record for a reader: `#7 weave.expire: expired, wv-000001, by nwc` (the reason
    only where it says more than the outcome: "expired expired" said nothing twice)."""
    outcome = record.get("outcome", "")
    reason = record.get("reason")
    text = f"#{record.get('seq')} {record.get('action')}: {outcome}"
    if reason and reason != outcome:
        text += f" ({reason})"
    if record.get("weave_id"):
        text += f", {record['weave_id']}"
    if record.get("actor"):
        text += f", by {record['actor']}"
    return text


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                yield {"unparseable": raw[:80]}


class JsonlMirror:
    """Appends sealed records to the audit file, in order, never rewriting it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_seq = 0
        if path.exists():
            for record in read_jsonl(path):
                if isinstance(record.get("seq"), int):
                    self.last_seq = max(self.last_seq, record["seq"])

    def append(self, records: Iterable[tuple[int, str]]) -> None:
        """Write records (sequence number, JSON text) after `last_seq`, in order; `last_seq`
        moves only past what was written in full, so a failed write is retried rather than
        skipped."""
        lines, last = [], self.last_seq
        for seq, text in records:
            if seq <= last:
                continue
            lines.append(text + "\n")
            last = seq
        if not lines:
            return
        data = "".join(lines).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = os.write(fd, data)
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError:
                # A half-written record (disk full) would join the retry's first one on one
                # line, and the file would look tampered with: cut it back (found in review).
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        self.last_seq = last
