"""What NWC insists on in a compute host's OVSDB for the integration bridge it programs.

Two Open vSwitch defaults join tenants behind NWC's pipeline, whatever flows NWC installs:

- `fail_mode` unset or `standalone`: once the bridge has lost its controller for a while, OVS
  adds its fail-open flow (NORMAL) and the bridge becomes a MAC-learning switch across IVNs.
- `connection_mode` unset or `in-band` on a controller (and on an active OVSDB manager): OVS
  adds hidden flows at priorities 180000-180008, above every OpenFlow flow, that forward
  (NORMAL) TCP to and from the controller's address and port, ARP for it, and DHCP from the
  local port. A VM that addresses a frame to another IVN's VM with the controller's address
  and port is delivered, past isolation and anti-spoofing. Seen on OVS 3.1 for every `tcp:`
  and `ssl:` IPv4 target, 127.0.0.1 and unreachable ones too; `unix:` targets and passive
  (`ptcp:`, `pssl:`) managers add none. An active manager adds them to every bridge.

Like ovn-controller for its br-int, NWC sets what is wrong rather than refusing the host:
refusing would leave the hidden flows and fail-open in place (they are OVS's own doing) and
only take the host's weaves away too. Every value it changes is said, with host, bridge and
the old value, so the operator finds and fixes what set it.

What is said comes from the host's own OVSDB (a controller's or manager's target is a free
string there), so it is cleaned (`host_text`) where the decision is made, a message lists a
bounded number of rows, and a correction the host keeps undoing is made every pass but said
at most once a minute, with how often it was made meanwhile (`Notices`).

`fixes` and `Notices` decide, pure; `enforce` reads, writes and tells through the ports given.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nwc.tunnel import host_text

log = logging.getLogger(__name__)

SECURE = "secure"
OUT_OF_BAND = "out-of-band"
# Manager targets that connect out (and so get in-band flows); passive ones (`ptcp:`,
# `pssl:`, `punix:`) listen and get none.
ACTIVE_MANAGER_SCHEMES = ("tcp:", "ssl:")
# A target is a URL-like word; an old value one of OVS's enum words (a host's server could
# send anything else).
MAX_TARGET_CHARS = 128
MAX_VALUE_CHARS = 32
# Rows named in one message (a host can make thousands of Controller rows); the rest counted.
MAX_LISTED = 8
# The same correction on the same host is said at most once per REPEAT_S, and a host gets at
# most NOTICE_BURST messages per REPEAT_S whatever it varies (each target a new text).
REPEAT_S = 60.0
NOTICE_BURST = 5
MAX_REMEMBERED = 64


@dataclass(frozen=True)
class RemoteRow:
    """A Controller or Manager row: its uuid, where it connects, and its connection_mode
    (None when unset, which OVS takes as in-band)."""

    uuid: str
    target: str
    connection_mode: str | None


@dataclass(frozen=True)
class BridgeRows:
    """What decides a bridge's safety, as read from the host's OVSDB (`exists` False: the
    host has no bridge of that name yet, nothing to guard)."""

    bridge: str
    fail_mode: str | None
    controllers: tuple[RemoteRow, ...]
    managers: tuple[RemoteRow, ...]
    exists: bool = True


@dataclass(frozen=True)
class Fix:
    """One column NWC sets: in `table`, the row `record` (a bridge's name, or a uuid).
    `old` and `target` are the host's text, already cleaned (`fixes` does it)."""

    table: str  # "Bridge", "Controller" or "Manager"
    record: str
    column: str
    old: str | None
    new: str
    target: str | None = None  # what a Controller or Manager row connects to

    def describe(self) -> str:
        old = self.old if self.old is not None else (
            "unset (standalone)" if self.column == "fail_mode" else "unset (in-band)")
        what = "fail_mode" if self.table == "Bridge" else \
            f"{self.table.lower()} {self.target} connection_mode"
        return f"{what} {old} -> {self.new}"


def fixes(rows: BridgeRows) -> list[Fix]:
    """The columns to set so that neither fail-open nor in-band flows can appear on the
    bridge: fail_mode secure, and out-of-band on each of its controllers and on each active
    manager (those put in-band flows on every bridge). Nothing for a missing bridge.
    The host's text in them (targets, old values) is cleaned: it goes to the log and events."""
    if not rows.exists:
        return []
    wanted: list[Fix] = []
    if rows.fail_mode != SECURE:
        wanted.append(Fix("Bridge", rows.bridge, "fail_mode", _value(rows.fail_mode), SECURE))
    for c in sorted(rows.controllers, key=lambda r: (r.target, r.uuid)):
        if c.connection_mode != OUT_OF_BAND:
            wanted.append(Fix("Controller", c.uuid, "connection_mode",
                              _value(c.connection_mode), OUT_OF_BAND,
                              host_text(c.target, MAX_TARGET_CHARS)))
    for m in sorted(rows.managers, key=lambda r: (r.target, r.uuid)):
        if m.target.startswith(ACTIVE_MANAGER_SCHEMES) and m.connection_mode != OUT_OF_BAND:
            wanted.append(Fix("Manager", m.uuid, "connection_mode", _value(m.connection_mode),
                              OUT_OF_BAND, host_text(m.target, MAX_TARGET_CHARS)))
    return wanted


def _value(old: str | None) -> str | None:
    return None if old is None else host_text(old, MAX_VALUE_CHARS)


def summary(host: str, bridge: str, done: Sequence[Fix], notice: Notice | None = None) -> str:
    """One sentence for the log and the event: at most MAX_LISTED rows, and, with a
    `notice`, what was done meanwhile without being said."""
    listed = "; ".join(f.describe() for f in done[:MAX_LISTED])
    if len(done) > MAX_LISTED:
        listed += f"; and {len(done) - MAX_LISTED} more rows"
    said = ""
    if notice is not None and notice.repeats:
        said += (f"; the same {notice.repeats} more times since it was last said "
                 f"(said at most every {REPEAT_S:.0f} s)")
    if notice is not None and notice.held:
        said += (f"; {notice.held} further corrections on this host made without being said "
                 f"(at most {NOTICE_BURST} messages per {REPEAT_S:.0f} s)")
    return (f"host {host} bridge {bridge}: set {listed}{said} (fail-open and OVS's hidden "
            "in-band flows would bypass IVN isolation; find what set the old value)")


@dataclass(frozen=True)
class Notice:
    """Say this correction now; `repeats`: times the same one was made since it was last
    said; `held`: corrections on the host left unsaid because it was over the burst."""

    repeats: int = 0
    held: int = 0


@dataclass
class _Said:
    at: float
    repeats: int = 0  # made since `at` without being said


@dataclass
class Notices:
    """Which corrections of one host's bridge to say, on a clock given by the caller: a tool
    that sets the old value back each pass (0.1 s) would otherwise write a warning and an
    event each pass. The correction itself is made every time; only the telling is spaced.
    "The same" ignores row uuids, so recreating the row does not make it new."""

    every_s: float = REPEAT_S
    burst: int = NOTICE_BURST
    _said: dict[tuple[object, ...], _Said] = field(default_factory=dict)
    _times: deque[float] = field(default_factory=deque)  # when the last messages were said
    _held: int = 0

    def due(self, done: Sequence[Fix], now: float) -> Notice | None:
        """A Notice if `done` (made at `now`) is to be said now, else None (counted)."""
        key = tuple((f.table, f.column, f.target, f.old, f.new) for f in done)
        while self._times and self._times[0] <= now - self.every_s:
            self._times.popleft()
        seen = self._said.get(key)
        if seen is not None and now - seen.at < self.every_s:
            seen.repeats += 1
            return None
        if len(self._times) >= self.burst:
            self._held += 1
            return None
        notice = Notice(seen.repeats if seen is not None else 0, self._held)
        self._held = 0
        self._times.append(now)
        self._said[key] = _Said(now)
        # Forget what has not come back within the window, and past MAX_REMEMBERED the
        # oldest (its unsaid count with it): what a host varies must not grow this.
        for old in [k for k, v in self._said.items() if now - v.at >= self.every_s
                    and not v.repeats]:
            del self._said[old]
        while len(self._said) > MAX_REMEMBERED:
            del self._said[min(self._said, key=lambda k: self._said[k].at)]
        return notice


class BridgeDb(Protocol):
    """The part of a host's OVSDB the guard uses (`nwc.hostdb.HostDb`)."""

    def bridge_rows(self, bridge: str) -> BridgeRows: ...
    def apply_fixes(self, fixes: Sequence[Fix]) -> None: ...


def enforce(db: BridgeDb, host: str, bridge: str,
            tell: Callable[[str, str, list[Fix], str], None], notices: Notices,
            now: float) -> list[Fix]:
    """Check `bridge` on `host` and set whatever `fixes` says, in one transaction; then, if
    `notices` says so at `now`, log a warning and `tell(host, bridge, fixes, detail)` (an
    admin event; at most MAX_LISTED rows). Raises what the database raises: the caller
    decides when to look again."""
    wanted = fixes(db.bridge_rows(bridge))
    if not wanted:
        return []
    db.apply_fixes(wanted)
    notice = notices.due(wanted, now)
    if notice is None:
        return wanted
    detail = summary(host, bridge, wanted, notice)
    log.warning("%s", detail)
    tell(host, bridge, wanted[:MAX_LISTED], detail)
    return wanted

