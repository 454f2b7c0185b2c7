"""The host's kernel networking as the tunnel agent changes it, through pyroute2 (netlink);
what it reads of the kernel comes through `nwc.rtnetlink`.

Every operation is idempotent ("ensure" / "remove", either way a no-op when already so), so the
agent can replay a leg after a restart without knowing what it had done before. Runs in the
network namespace of the calling process (the agent is started inside the host's).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nwc.rtnetlink import (
    NETLINK_ROUTE,
    RT_TABLE_MAIN,
    AddressDump,
    Link,
    LinkDump,
    NetlinkReader,
    Route,
    RouteDump,
)

log = logging.getLogger(__name__)

RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
LINKS, ADDRESSES, ROUTES = "links", "addresses", "routes"
ALL_TABLES = frozenset({LINKS, ADDRESSES, ROUTES})
# The longest a view is kept across passes without a change notification: a bound on what a
# lost notification (or a kernel that does not send one) could hide.
MAX_VIEW_AGE_S = 2.0


class ChangeMonitor:
    """Whether the kernel's links, IPv4 addresses or IPv4 routes may have changed since the
    last look: a netlink socket subscribed to their change notifications. Any message, or a
    socket that overflowed (ENOBUFS: some were lost), says "maybe"; only a quiet socket says
    no. The notifications are not parsed: which change it was does not matter, only that
    the view of the kernel must be read again."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK,
                                   socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))

    def changed(self) -> bool:
        """Read every notification waiting; True if there was any."""
        changed = False
        while True:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
            changed = True

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    local: ipaddress.IPv4Address
    remote: ipaddress.IPv4Address
    port: int
    mtu: int


@dataclass(frozen=True)
class _View:
    """What the agent reads of the kernel: one dump each of links, IPv4 addresses (the /32s)
    and main-table routes (to /32s)."""

    links: dict[str, Link]
    # Every device is in `links`; otherwise only the VXLAN devices are (the kernel filtered
    # the dump by kind), and another is asked for by name, once per view (`named`).
    links_complete: bool
    addresses: frozenset[tuple[int, str]]  # (ifindex, address)
    routes: dict[str, tuple[Route, ...]]  # by destination
    # Devices asked for by name, None for a name that is no device. They belong with the
    # links: a view whose links are read again starts without them.
    named: dict[str, Link | None] = field(default_factory=dict, compare=False)


class HostNetwork:
    """The host's kernel networking. Inside `one_pass()` its reads share one view of the
    kernel (three dumps), taken at the first read and dropped by any change this object
    makes; outside, every read dumps afresh. With a `ChangeMonitor` (the default on a real
    kernel) a view is also kept from one pass to the next while the kernel sends no change
    notification, for at most MAX_VIEW_AGE_S. Changes go through `ipr`, reads through
    `reader`."""

    def __init__(self, ipr: IPRoute | None = None, monitor: ChangeMonitor | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 reader: NetlinkReader | None = None) -> None:
        if ipr is None:
            ipr, monitor = IPRoute(), monitor or ChangeMonitor()
        self._ipr = ipr
        self._reader = reader or NetlinkReader()
        self._monitor = monitor
        self._clock = clock
        self._in_pass = False
        self._view: _View | None = None
        self._kept: tuple[_View, float] | None = None  # the last pass's view, and its time
        self._view_taken = 0.0
        self._stale: set[str] = set()  # tables of the view that changes made stale
        # A notification was read since the last dump a pass kept; the next dump then may
        # not show all of the change it announced, so its view is not kept past its pass.
        self._heard = False
        self._view_settled = False  # the pass's view was dumped with nothing just heard

    def close(self) -> None:
        self._ipr.close()
        self._reader.close()
        if self._monitor is not None:
            self._monitor.close()

    @contextmanager
    def one_pass(self) -> Iterator[None]:
        """One reconciliation pass. Checking each leg with its own requests cost about a
        dozen netlink requests per leg per pass, most of them full dumps of a table that
        grows with the legs (quadratic); here a pass costs three dumps (and a request per
        device it names that is not VXLAN, when the kernel filters the link dump), plus a
        dump of what changed at the first read after each change it makes. A change always
        empties the view, so what the pass reads after it is the kernel's answer, not this
        object's idea of it. Without a monitor the view never outlives the pass, so what
        someone else changed between passes is read at the next one; with one, the next
        pass keeps it only if the kernel sent no change notification since it was read (any
        change, by anyone, sends one) and it is younger than MAX_VIEW_AGE_S, and only if no
        notification was read just before its dump (the kernel announces some changes
        before it has made all of them)."""
        self._in_pass, self._view = True, None
        if self._kept is not None and self._monitor is not None:
            view, taken = self._kept
            # A notification read here may be about a change made after the view was
            # taken: drop it. Quiet since the dump (drained just before it), it still holds.
            if self._monitor.changed():
                self._heard = True
            elif self._clock() - taken < MAX_VIEW_AGE_S:
                self._view = view
        self._kept = None
        try:
            yield
        finally:
            if self._monitor is not None and self._view is not None and not self._stale \
                    and self._view_settled:
                self._kept = (self._view, self._view_taken)
            self._in_pass, self._view = False, None
            self._stale.clear()

    def _read(self) -> _View:
        if self._view is not None and not self._stale:
            return self._view
        if self._view is not None:
            # Only the tables this pass changed are read again. The monitor is not drained
            # here: the notifications of this pass's changes (and of anyone else's) stay for
            # the next pass, which then reads every table.
            self._view = self._dump(frozenset(self._stale), self._view)
            self._stale.clear()
            return self._view
        if self._monitor is not None:
            # Notifications of what happened before this dump are answered by it; a change
            # from here on sends one that the next pass reads (and so reads the kernel).
            # A view kept from a pass cannot tell the notifications drained here: drop it.
            # The kernel sends some notifications before the change is all done (a route's
            # deletion before it leaves the table, which an RCU dump may still walk; a
            # device going down before its routes are flushed, which sends nothing more):
            # after one, this dump is good for this pass only, and the next reads again.
            if self._monitor.changed():
                self._heard = True
            self._kept = None
        taken = self._clock()
        view = self._dump(ALL_TABLES)
        if self._in_pass:
            self._view, self._view_taken = view, taken
            self._view_settled, self._heard = not self._heard, False
        return view

    def _dump(self, tables: frozenset[str], base: _View | None = None) -> _View:
        """`tables` read afresh; the others taken from `base`."""
        dumpers: dict[str, Callable[[], LinkDump | AddressDump | RouteDump]] = {
            LINKS: self._reader.links, ADDRESSES: self._reader.addresses,
            ROUTES: self._reader.routes}
        for _ in range(3):
            fresh = {table: dumpers[table]() for table in tables}
            # The kernel marks a dump during which its table changed: what came back is
            # then not one state of the kernel (an entry may be missing). Read again.
            if not any(dump.interrupted for dump in fresh.values()):
                return _view(fresh, base)
        raise RuntimeError("the kernel's tables kept changing while they were read")

    def _change(self, request: Callable[..., object], *args: object,
                tables: frozenset[str] = ALL_TABLES, **kwargs: object) -> None:
        """Every change goes through here, naming the tables it may change: whatever its
        outcome (an error may come after the kernel acted), those tables are read again
        before the view is next used, so what the pass reads after it is the kernel's
        answer. (Reading all three after every change made building a leg cost about six
        full reads; with 100 legs on a host each read is tens of milliseconds.)"""
        if tables == ALL_TABLES:
            self._view = None
        elif self._view is not None:
            self._stale |= tables
        request(*args, **kwargs)

    def _link(self, device: str, view: _View | None = None) -> Link | None:
        """`device` as `view` (by default the pass's) has it."""
        view = view if view is not None else self._read()
        link = view.links.get(device)
        if link is not None or view.links_complete:
            return link
        if device not in view.named:
            # Asked of the kernel after the view's dumps, so no older than them: a change
            # since the pass began sends a notification all the same, which the next pass
            # reads.
            view.named[device] = self._reader.link(device)
        return view.named[device]

    def _index(self, device: str) -> int | None:
        link = self._link(device)
        return link.index if link is not None else None

    def link_exists(self, device: str) -> bool:
        return self._link(device) is not None

    # -- addresses ------------------------------------------------------------------------

    def has_address(self, address: ipaddress.IPv4Address, device: str) -> bool:
        view = self._read()  # one view: outside a pass each read is a dump
        link = self._link(device, view)
        return link is not None and (link.index, str(address)) in view.addresses

    def ensure_address(self, address: ipaddress.IPv4Address, device: str) -> None:
        index = self._index(device)
        if index is None:
            raise RuntimeError(f"no device {device}")
        if self.has_address(address, device):
            return
        try:
            self._change(self._ipr.addr, "add", index=index, address=str(address),
                         prefixlen=32, tables=frozenset({ADDRESSES}))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    def remove_address(self, address: ipaddress.IPv4Address, device: str) -> None:
        index = self._index(device)
        if index is None or not self.has_address(address, device):
            return
        try:
            self._change(self._ipr.addr, "del", index=index, address=str(address),
                         prefixlen=32, tables=frozenset({ADDRESSES}))
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise

    # -- routes (main table, /32s) ----------------------------------------------------------

    def _routes_to(self, destination: ipaddress.IPv4Address) -> tuple[Route, ...]:
        return self._read().routes.get(str(destination), ())

    def has_blackhole(self, destination: ipaddress.IPv4Address) -> bool:
        return any(r.type == RTN_BLACKHOLE for r in self._routes_to(destination))

    def ensure_blackhole(self, destination: ipaddress.IPv4Address) -> None:
        if self.has_blackhole(destination):
            return
        self._change(self._ipr.route, "add", dst=f"{destination}/32", type="blackhole",
                     table=RT_TABLE_MAIN, tables=frozenset({ROUTES}))

    def remove_blackhole(self, destination: ipaddress.IPv4Address) -> None:
        if self.has_blackhole(destination):
            self._change(self._ipr.route, "del", dst=f"{destination}/32", type="blackhole",
                         table=RT_TABLE_MAIN, tables=frozenset({ROUTES}))

    def has_link_route(self, destination: ipaddress.IPv4Address, device: str,
                       source: ipaddress.IPv4Address | None) -> bool:
        index = self._index(device)
        return any(r.type == RTN_UNICAST and r.oif == index
                   and (source is None or r.src == str(source))
                   for r in self._routes_to(destination))

    def ensure_link_route(self, destination: ipaddress.IPv4Address, device: str,
                          source: ipaddress.IPv4Address | None) -> None:
        index = self._index(device)
        if index is None:
            raise RuntimeError(f"no device {device}")
        if self.has_link_route(destination, device, source):
            return
        args: dict[str, object] = {"dst": f"{destination}/32", "oif": index,
                                   "scope": 253, "table": RT_TABLE_MAIN}  # scope link
        if source is not None:
            args["prefsrc"] = str(source)
        self._change(self._ipr.route, "replace", **args, tables=frozenset({ROUTES}))

    def remove_link_route(self, destination: ipaddress.IPv4Address, device: str) -> None:
        index = self._index(device)
        if index is None:
            return
        for r in self._routes_to(destination):
            if r.type == RTN_UNICAST and r.oif == index:
                try:
                    self._change(self._ipr.route, "del", dst=f"{destination}/32", oif=index,
                                 table=RT_TABLE_MAIN, tables=frozenset({ROUTES}))
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise

    # -- the VXLAN device -------------------------------------------------------------------

    def vxlan(self, name: str) -> VxlanDevice | None:
        link = self._link(name)
        settings = link.vxlan() if link is not None else None
        if settings is None:
            return None
        return VxlanDevice(name, settings.vni, ipaddress.IPv4Address(settings.local),
                           ipaddress.IPv4Address(settings.remote), settings.port, settings.mtu)

    def ensure_vxlan(self, want: VxlanDevice) -> None:
        """A VXLAN device exactly as wanted (re-created if it differs), up, with no IPv6
        (it is a bridge port: the host itself must not talk through it). Its outer header
        leaves DF clear, so a full-size frame's VXLAN packet may be fragmented inside the
        IPsec tunnel."""
        have = self.vxlan(want.name)
        if have == want:
            if not self._is_up(want.name):
                self._change(self._ipr.link, "set", index=self._index(want.name), state="up",
                             tables=frozenset({LINKS}))
            return
        if have is not None or self.link_exists(want.name):
            self.remove_link(want.name)
        # A new device has no IPv4 address or main-table route yet: only links change.
        self._change(self._ipr.link, "add", tables=frozenset({LINKS}), ifname=want.name,
                     kind="vxlan",
                     vxlan_id=want.vni, vxlan_local=str(want.local),
                     vxlan_group=str(want.remote), vxlan_port=want.port, vxlan_learning=0,
                     mtu=want.mtu)
        _disable_ipv6(want.name)
        index = self._index(want.name)  # the view was dropped: this reads the new device
        if index is None:
            raise RuntimeError(f"{want.name} was added but is not there")
        self._change(self._ipr.link, "set", index=index, state="up", tables=frozenset({LINKS}))

    def _is_up(self, name: str) -> bool:
        link = self._link(name)
        return link is not None and link.up

    def remove_link(self, name: str) -> None:
        index = self._index(name)
        if index is None:
            return
        try:
            self._change(self._ipr.link, "del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def _view(fresh: dict[str, LinkDump | AddressDump | RouteDump], base: _View | None) -> _View:
    """A view from the dumps in `fresh` (by table), the tables not dumped from `base`."""
    view = base if base is not None else _View({}, False, frozenset(), {})
    for dump in fresh.values():
        if isinstance(dump, LinkDump):
            view = replace(view, links=dump.links, links_complete=dump.complete, named={})
        elif isinstance(dump, AddressDump):
            view = replace(view, addresses=dump.addresses)
        else:
            view = replace(view, routes=dump.routes)
    return view


def _disable_ipv6(device: str) -> None:
    path = Path("/proc/sys/net/ipv6/conf") / device / "disable_ipv6"
    try:
        path.write_text("1")
    except OSError:  # no IPv6 in this kernel: nothing to disable
        log.debug("cannot disable IPv6 on %s", device)
