"""A fake kernel for `HostNetwork`: its changes come in through the pyroute2 calls
HostNetwork makes, its reads through a fake netlink socket under `nwc.rtnetlink`, which gets
real netlink bytes (encoded by pyroute2, not by the code under test) and filters them as a
kernel of the chosen age does."""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink import NLM_F_DUMP_INTR, NLM_F_MULTI
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nwc.hostnet import HostNetwork, VxlanDevice
from nwc.rtnetlink import NetlinkReader

BLACKHOLE, UNICAST, LOCAL = 6, 1, 2
RTM_F_CLONED = 0x200
NLM_F_DUMP = 0x300
NLM_F_DUMP_FILTERED = 0x20
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
PER_DATAGRAM = 3  # a real dump packs many messages in one datagram; the fake, a few


@dataclass
class FakeKernel:
    """Links, /32 addresses and /32 routes (main table unless they say otherwise), changed
    only through the requests HostNetwork sends (or directly by a test playing someone
    else). Its age: `strict` (Linux 4.20 on: strict checking, table filter, filtered dumps
    marked as such at their end too), `kind_filter` (4.15 on: link dumps by kind);
    `refuses_filters` plays a kernel whose strict checking refuses what the reader asks."""

    links: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "lo": {"index": 1, "up": True}, "ul0": {"index": 2, "up": True, "kind": "veth"}})
    addresses: set[tuple[int, str]] = field(default_factory=set)
    routes: list[dict[str, Any]] = field(default_factory=list)
    dumps: int = 0
    asked: list[tuple[Any, ...]] = field(default_factory=list)  # every read request
    changes: list[tuple[str, ...]] = field(default_factory=list)
    refuse_blackholes: bool = False
    interrupt_next_dumps: int = 0  # the next dumps come back marked NLM_F_DUMP_INTR
    notifications: int = 0  # change notifications sent (every change sends one)
    strict: bool = True
    kind_filter: bool = True
    refuses_filters: bool = False
    _next_index: int = 3

    # -- reads: what a netlink socket of this kernel answers ----------------------------------

    def socket(self) -> FakeNetlinkSocket:
        return FakeNetlinkSocket(self)

    def answer(self, request: bytes, strict: bool) -> tuple[list[Any], int] | int:
        """The messages answering `request` and the flags of the answer, or an errno."""
        kind, flags = struct.unpack_from("=HH", request, 4)
        if not flags & NLM_F_DUMP:
            assert kind == RTM_GETLINK, kind
            query = ifinfmsg(request)
            query.decode()
            name = query.get_attr("IFLA_IFNAME")
            self.asked.append(("link", name))
            if name not in self.links:
                return errno.ENODEV
            return [self._link_message(name, 0)], 0
        self.dumps += 1
        answer_flags = NLM_F_DUMP_INTR if self.interrupt_next_dumps else 0
        if strict and self.refuses_filters:
            self.asked.append(("refused", kind))
            return errno.EINVAL
        if kind == RTM_GETLINK:
            query = ifinfmsg(request)
            query.decode()
            info = query.get_attr("IFLA_LINKINFO")
            wanted = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if not self.kind_filter:
                wanted = None
            self.asked.append(("links", wanted, strict))
            if wanted is not None:
                answer_flags |= NLM_F_DUMP_FILTERED
            return [self._link_message(name, answer_flags) for name, link in self.links.items()
                    if wanted is None or link.get("kind") == wanted], answer_flags
        if kind == RTM_GETADDR:
            self.asked.append(("addresses", strict))
            return [self._address_message(index, address, answer_flags)
                    for index, address in sorted(self.addresses)], answer_flags
        assert kind == RTM_GETROUTE, kind
        if self.interrupt_next_dumps:
            self.interrupt_next_dumps -= 1
        query = rtmsg(request)
        query.decode()
        table = query["table"] if strict else 0  # only strict checking filters by table
        self.asked.append(("routes", table, strict))
        if table:
            answer_flags |= NLM_F_DUMP_FILTERED
        return [self._route_message(r, answer_flags) for r in self.routes
                if not table or r.get("table", 254) == table], answer_flags

    def _link_message(self, name: str, flags: int) -> Any:
        link = self.links[name]
        attrs: list[Any] = [("IFLA_IFNAME", name), ("IFLA_TXQLEN", 1000),
                            ("IFLA_OPERSTATE", "UP" if link["up"] else "DOWN"),
                            ("IFLA_MTU", link.get("mtu", 1500)),
                            ("IFLA_ADDRESS", f"02:00:00:00:00:{link['index']:02x}")]
        if "vxlan" in link:
            v: VxlanDevice = link["vxlan"]
            attrs.append(("IFLA_LINKINFO", {"attrs": [
                ("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": [
                    ("IFLA_VXLAN_ID", v.vni), ("IFLA_VXLAN_GROUP", str(v.remote)),
                    ("IFLA_VXLAN_LOCAL", str(v.local)), ("IFLA_VXLAN_TTL", 0),
                    ("IFLA_VXLAN_PORT", v.port)]})]}))
        elif "kind" in link:
            attrs.append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", link["kind"])]}))
        msg = ifinfmsg()
        msg["family"], msg["index"], msg["flags"] = 0, link["index"], int(link["up"])
        msg["attrs"] = attrs
        return _with_header(msg, RTM_NEWLINK, flags)

    def _address_message(self, index: int, address: str, flags: int) -> Any:
        msg = ifaddrmsg()
        msg["family"], msg["prefixlen"], msg["index"] = 2, 32, index
        msg["attrs"] = [("IFA_ADDRESS", address), ("IFA_LOCAL", address), ("IFA_FLAGS", 0x80)]
        return _with_header(msg, RTM_NEWADDR, flags)

    def _route_message(self, r: dict[str, Any], flags: int) -> Any:
        msg = rtmsg()
        table = r.get("table", 254)
        msg["family"], msg["dst_len"], msg["type"] = 2, 32, r["type"]
        # A table id past 255 is in RTA_TABLE only; the header says RT_TABLE_COMPAT.
        msg["table"], msg["flags"] = 252 if table > 255 else table, r.get("flags", 0)
        attrs: list[Any] = [("RTA_TABLE", table), ("RTA_DST", r["dst"]), ("RTA_PRIORITY", 0)]
        if r.get("oif") is not None:
            attrs.append(("RTA_OIF", r["oif"]))
        if r.get("src") is not None:
            attrs.append(("RTA_PREFSRC", r["src"]))
        msg["attrs"] = attrs
        return _with_header(msg, RTM_NEWROUTE, flags)

    # -- changes: what HostNetwork asks of pyroute2's IPRoute ---------------------------------

    def addr(self, cmd: str, *, index: int, address: str, prefixlen: int) -> None:
        self.changes.append(("addr", cmd, address))
        self.notifications += 1
        if cmd == "add":
            self.addresses.add((index, address))
        else:
            self.addresses.discard((index, address))

    def route(self, cmd: str, *, dst: str, table: int, type: str = "unicast",
              oif: int | None = None, scope: int | None = None,
              prefsrc: str | None = None) -> None:
        self.changes.append(("route", cmd, dst))
        self.notifications += 1
        dst = dst.removesuffix("/32")
        if cmd == "del":
            self.routes = [r for r in self.routes if not (
                r["dst"] == dst and (oif is None or r.get("oif") == oif)
                and (type != "blackhole" or r["type"] == BLACKHOLE))]
            return
        if type == "blackhole":
            if self.refuse_blackholes:
                raise NetlinkError(errno.EPERM, "Operation not permitted")
            self.routes.append({"dst": dst, "type": BLACKHOLE})
            return
        if cmd == "replace":
            self.routes = [r for r in self.routes if r["dst"] != dst or r["type"] != UNICAST]
        self.routes.append({"dst": dst, "type": UNICAST, "oif": oif, "src": prefsrc})

    def link(self, cmd: str, *, index: int | None = None, ifname: str | None = None,
             state: str | None = None, **vxlan: Any) -> None:
        self.changes.append(("link", cmd, ifname or str(index)))
        self.notifications += 1
        if cmd == "add":
            assert ifname is not None
            if ifname in self.links:
                raise NetlinkError(errno.EEXIST, "File exists")
            self.links[ifname] = {"index": self._next_index, "up": False, "mtu": vxlan["mtu"],
                                  "kind": "vxlan", "vxlan": VxlanDevice(
                                      ifname, vxlan["vxlan_id"],
                                      ipaddress.IPv4Address(vxlan["vxlan_local"]),
                                      ipaddress.IPv4Address(vxlan["vxlan_group"]),
                                      vxlan["vxlan_port"], vxlan["mtu"])}
            self._next_index += 1
            return
        name = next(n for n, link in self.links.items() if link["index"] == index)
        if cmd == "del":
            del self.links[name]
            # As the kernel does: the device's addresses and routes go with it.
            self.addresses = {a for a in self.addresses if a[0] != index}
            self.routes = [r for r in self.routes if r.get("oif") != index]
        elif cmd == "set":
            self.links[name]["up"] = state == "up"

    def add_foreign_link(self, name: str, kind: str = "veth") -> int:
        """Someone else makes a device (no notification: tests that need one send it)."""
        index = self._next_index
        self.links[name] = {"index": index, "up": True, "kind": kind}
        self._next_index += 1
        return index

    def close(self) -> None:
        pass


def _with_header(msg: Any, kind: int, flags: int) -> Any:
    msg["header"]["type"], msg["header"]["flags"] = kind, NLM_F_MULTI | flags
    return msg


class FakeNetlinkSocket:
    """What `NetlinkReader` uses of a socket, answering as `kernel` would."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.strict = False
        self.datagrams: deque[bytes] = deque()
        self.closed = False

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (SOL_NETLINK, NETLINK_GET_STRICT_CHK)
        if not self.kernel.strict:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        self.strict = bool(value)

    def send(self, data: bytes) -> int:
        sequence = struct.unpack_from("=I", data, 8)[0]
        is_dump = struct.unpack_from("=H", data, 6)[0] & NLM_F_DUMP
        answer = self.kernel.answer(data, self.strict)
        if isinstance(answer, int):  # NLMSG_ERROR: minus the errno, then the request's header
            self.datagrams.append(struct.pack("=IHHIIi", 36, 2, 0, sequence, 0, -answer)
                                  + data[:16])
            return len(data)
        messages, answer_flags = answer
        encoded = []
        for msg in messages:
            msg["header"]["sequence_number"] = sequence
            if not is_dump:
                msg["header"]["flags"] &= ~NLM_F_MULTI
            msg.encode()
            encoded.append(bytes(msg.data))
        if is_dump:
            # The end of the dump: errno 0, and the answer's flags from Linux 4.20 on.
            done_flags = NLM_F_MULTI | (answer_flags if self.kernel.strict else 0)
            encoded.append(struct.pack("=IHHIIi", 20, 3, done_flags, sequence, 0, 0))
        # A message of an earlier request, never read: the reader must skip it.
        self.datagrams.append(struct.pack("=IHHIIi", 20, 3, NLM_F_MULTI, sequence - 1, 0, 0))
        for i in range(0, len(encoded), PER_DATAGRAM):
            self.datagrams.append(b"".join(encoded[i:i + PER_DATAGRAM]))
        return len(data)

    def recvmsg(self, bufsize: int) -> tuple[bytes, list[object], int, object]:
        data = self.datagrams.popleft()
        assert len(data) <= bufsize
        return data, [], 0, None

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeMonitor:
    """`ChangeMonitor` over the fake kernel: says whether it sent notifications since the
    last look."""

    kernel: FakeKernel
    seen: int = 0

    def changed(self) -> bool:
        changed, self.seen = self.kernel.notifications != self.seen, self.kernel.notifications
        return changed

    def close(self) -> None:
        pass


def fake_host_network(kernel: FakeKernel, monitor: FakeMonitor | None = None,
                      clock: Any = None) -> HostNetwork:
    """A HostNetwork whose changes and reads both go to `kernel`."""
    extra = {"clock": clock} if clock is not None else {}
    return HostNetwork(kernel, monitor, reader=NetlinkReader(kernel.socket()),  # type: ignore[arg-type]
                       **extra)
