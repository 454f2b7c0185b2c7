"""The audit trail: one record per decision, request and state change, chained by hash.

Each record carries `prev` (the hash of the record before it) and `hash` (SHA-256 over its own
canonical JSON, `prev` included), so editing, deleting or reordering any record breaks the chain
from that record on. Records are written to SQLite in the same transaction as the state change
they describe, then mirrored to `audit.jsonl` (append-only, mode 0600) for tools and humans.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(body: dict[str, Any], prev: str) -> dict[str, Any]:
    """Return the record with `prev` and `hash` set."""
    record = {k: v for k, v in body.items() if k != "hash"}
    record["prev"] = prev
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    return record


@dataclass(frozen=True)
class ChainBreak:
    line: int  # 1-based line in the JSONL file (or position in the sequence)
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"record {self.seq}" if self.seq is not None else "a record"
        return f"line {self.line}: {where}: {self.message}"


def verify_chain(records: Iterable[dict[str, Any]]) -> list[ChainBreak]:
    """Check hashes, links and sequence numbers; report where the chain first breaks, plus
    every later record whose own hash is wrong (so several edits are all named)."""
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
            breaks.append(ChainBreak(line, seq, "does not follow the record before it "
                                     "(a record was deleted, inserted or reordered)"))
        elif seq != expected_seq:
            breaks.append(ChainBreak(line, seq, f"sequence number {seq}, expected "
                                     f"{expected_seq} (deleted or reordered records)"))
        prev = record["hash"]
        expected_seq = (seq if isinstance(seq, int) else expected_seq) + 1
    return breaks


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

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = []
        for record in records:
            if record["seq"] <= self.last_seq:
                continue
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
            self.last_seq = record["seq"]
        if not lines:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)
