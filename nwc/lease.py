"""Leases: when each weave ends, and the clock that says what time it is.

Expiry times are wall-clock instants in UTC (they are stored and shown to tenants); waiting is
done on the monotonic clock, so a wall-clock step neither fires a lease early nor stalls it
for long (the wait is capped and recomputed). Everything takes its clock as an argument.
"""

from __future__ import annotations

import heapq
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

# The longest the scheduler sleeps before looking at the wall clock again.
MAX_WAIT_S = 1.0


class Clock(Protocol):
    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware, in UTC."""
        ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to: for tests, the demo's fast-forward and benches."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def step_wall(self, seconds: float) -> None:
        """The wall clock jumps (an NTP step); no time passes."""
        self._now += timedelta(seconds=seconds)


def utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime: NWC keeps every instant in UTC with its timezone")
    return value.astimezone(UTC)


def iso(value: datetime) -> str:
    """The one text form of an instant NWC writes: 2026-01-01T00:00:00.000000Z."""
    if value.tzinfo is not UTC:  # astimezone costs as much as the formatting: skip it for UTC
        value = utc(value)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class LeaseBook:
    """Which weave expires when. A heap with lazy deletion: updating a lease pushes a new entry
    and the stale one is skipped when it surfaces."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []
        self._expiry: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, weave_id: str) -> bool:
        return weave_id in self._expiry

    def set(self, weave_id: str, expires_at: datetime) -> None:
        expires_at = utc(expires_at)
        self._expiry[weave_id] = expires_at
        heapq.heappush(self._heap, (expires_at, weave_id))

    def remove(self, weave_id: str) -> None:
        self._expiry.pop(weave_id, None)

    def expires_at(self, weave_id: str) -> datetime | None:
        return self._expiry.get(weave_id)

    def _settle(self) -> None:
        while self._heap and self._expiry.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def next_expiry(self) -> datetime | None:
        self._settle()
        return self._heap[0][0] if self._heap else None

    def due(self, now: datetime) -> list[str]:
        """Weaves whose lease has ended at `now`, soonest first; they leave the book."""
        out = []
        self._settle()
        while self._heap and self._heap[0][0] <= now:
            _, weave_id = heapq.heappop(self._heap)
            del self._expiry[weave_id]
            out.append(weave_id)
            self._settle()
        return out

    def wait_seconds(self, now: datetime) -> float:
        """How long the scheduler may sleep (on the monotonic clock) before the next expiry."""
        nxt = self.next_expiry()
        if nxt is None:
            return MAX_WAIT_S
        return max(0.0, min(MAX_WAIT_S, (nxt - now).total_seconds()))
