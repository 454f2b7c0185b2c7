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

`fixes` is the decision, pure; `enforce` reads, writes and tells through the ports given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

SECURE = "secure"
OUT_OF_BAND = "out-of-band"
# Manager targets that connect out (and so get in-band flows); passive ones (`ptcp:`,
# `pssl:`, `punix:`) listen and get none.
ACTIVE_MANAGER_SCHEMES = ("tcp:", "ssl:")


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
    """One column NWC sets: in `table`, the row `record` (a bridge's name, or a uuid)."""

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
    manager (those put in-band flows on every bridge). Nothing for a missing bridge."""
    if not rows.exists:
        return []
    wanted: list[Fix] = []
    if rows.fail_mode != SECURE:
        wanted.append(Fix("Bridge", rows.bridge, "fail_mode", rows.fail_mode, SECURE))
    for c in sorted(rows.controllers, key=lambda r: (r.target, r.uuid)):
        if c.connection_mode != OUT_OF_BAND:
            wanted.append(Fix("Controller", c.uuid, "connection_mode", c.connection_mode,
                              OUT_OF_BAND, c.target))
    for m in sorted(rows.managers, key=lambda r: (r.target, r.uuid)):
        if m.target.startswith(ACTIVE_MANAGER_SCHEMES) and m.connection_mode != OUT_OF_BAND:
            wanted.append(Fix("Manager", m.uuid, "connection_mode", m.connection_mode,
                              OUT_OF_BAND, m.target))
    return wanted


def summary(host: str, bridge: str, done: Sequence[Fix]) -> str:
    """One sentence for the log and the event."""
    return (f"host {host} bridge {bridge}: set " + "; ".join(f.describe() for f in done)
            + " (fail-open and OVS's hidden in-band flows would bypass IVN isolation; "
            "find what set the old value)")


class BridgeDb(Protocol):
    """The part of a host's OVSDB the guard uses (`nwc.hostdb.HostDb`)."""

    def bridge_rows(self, bridge: str) -> BridgeRows: ...
    def apply_fixes(self, fixes: Sequence[Fix]) -> None: ...


def enforce(db: BridgeDb, host: str, bridge: str,
            tell: Callable[[str, str, list[Fix], str], None]) -> list[Fix]:
    """Check `bridge` on `host` and set whatever `fixes` says, in one transaction; then log
    a warning and `tell(host, bridge, fixes, detail)` (an admin event). Raises what the
    database raises: the caller decides when to look again."""
    wanted = fixes(db.bridge_rows(bridge))
    if not wanted:
        return []
    db.apply_fixes(wanted)
    detail = summary(host, bridge, wanted)
    log.warning("%s", detail)
    tell(host, bridge, wanted, detail)
    return wanted

