"""Totals that never go down, from counters that start again from 0.

A switch's flow counters start from 0 whenever NWC installs a weave's flows again (an extend,
a move, a resync after a reconnect), its meter counters when a meter is made afresh, and an
IKE daemon's byte counters with every new CHILD SA. What NWC reports (the API's stats, and
Prometheus counters, which must never decrease) is the total since the weave came up: what
earlier incarnations counted, carried over as a base, plus what the current one says.

Pure: callers say when a counter restarts (`restart`, when they know: they re-installed it)
and hand in readings in the order they were taken (`observe`); a reading lower than the
previous one for the same key means the counter restarted unseen, and is carried over too.
What passes between the last reading and a restart is not counted: callers read just before
a restart they cause, to keep that small.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass


@dataclass
class _Carried:
    base: list[int]  # what earlier incarnations of the counter reached
    last: list[int]  # the current incarnation's latest reading


class CarriedCounters:
    """Per key, a fixed number of counters (e.g. bytes and packets) carried across restarts.
    Not thread-safe: the caller's lock guards it."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._keys: dict[Hashable, _Carried] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def tracked(self) -> list[Hashable]:
        return list(self._keys)

    def track(self, key: Hashable) -> None:
        """Start counting `key` from 0, unless it is counted already."""
        self._keys.setdefault(key, _Carried([0] * self.width, [0] * self.width))

    def restart(self, key: Hashable) -> None:
        """The counters of `key` start again from 0 now: carry the last reading over. A key
        not tracked yet starts being tracked."""
        entry = self._keys.get(key)
        if entry is None:
            self.track(key)
            return
        entry.base = [b + v for b, v in zip(entry.base, entry.last, strict=True)]
        entry.last = [0] * self.width

    def observe(self, key: Hashable, values: Iterable[int]) -> bool:
        """A reading of a tracked key's counters (an untracked key is ignored: False). Any
        counter lower than its last reading means they all restarted since (they are one
        flow's, one SA's): the last reading is carried."""
        entry = self._keys.get(key)
        if entry is None:
            return False
        now = [max(0, int(v)) for v in values]
        if len(now) != self.width:
            raise ValueError(f"a reading of {self.width} counters, not {len(now)}")
        if any(value < last for value, last in zip(now, entry.last, strict=True)):
            entry.base = [b + v for b, v in zip(entry.base, entry.last, strict=True)]
        entry.last = now
        return True

    def total(self, key: Hashable) -> tuple[int, ...]:
        """Everything counted for `key` (zeros for a key not tracked)."""
        entry = self._keys.get(key)
        if entry is None:
            return (0,) * self.width
        return tuple(b + v for b, v in zip(entry.base, entry.last, strict=True))

    def discard(self, key: Hashable) -> None:
        """Stop tracking `key`, if it is tracked."""
        self._keys.pop(key, None)

    def forget(self, which: Callable[[Hashable], bool]) -> None:
        """Stop tracking the keys `which` selects (what they counted ended with them)."""
        for key in [k for k in self._keys if which(k)]:
            del self._keys[key]
