"""The tunnel agent's reads of the kernel over rtnetlink: its links, IPv4 /32 addresses and
main-table IPv4 /32 routes, on a netlink socket of its own.

Why not pyroute2's dumps (it still makes every change): it decodes every message whole
(statistics, per-family settings, every route metric) through its asyncio core, and that was
nearly all of the agent's cost, 30-50 ms per read of a host with 100 legs. Here the kernel is
asked to send less, and of what it sends only the fields the agent reads are decoded:
- routes: with strict checking (NETLINK_GET_STRICT_CHK, Linux 4.20) the kernel dumps the main
  table alone, not the local table with a route per address besides;
- links: only VXLAN devices (a kind filter, Linux 4.15), without their statistics
  (RTEXT_FILTER_SKIP_STATS); any other device the agent names (the loopback, the underlay
  device, a foreign device in a leg's place) is asked for by name;
- addresses: the kernel has no filter that helps (only by device): all IPv4 ones.
Every answer is filtered again here, so a kernel that ignores a filter (older, or built
without VXLAN) gives the same result, only more slowly: a link dump the kernel did not mark
filtered holds every device; routes of other tables are dropped. A kernel that refuses a
filtered request outright makes the reader turn strict checking off and ask again.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
NLM_F_DUMP_INTR, NLM_F_DUMP_FILTERED = 0x10, 0x20
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
IFF_UP = 0x1
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_EXT_MASK = 3, 4, 18, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_GROUP, IFLA_VXLAN_LOCAL, IFLA_VXLAN_PORT = 1, 2, 4, 15
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFA_ADDRESS = 1
RTA_DST, RTA_OIF, RTA_PREFSRC, RTA_TABLE = 1, 4, 7, 15
RTM_F_CLONED = 0x200
RT_TABLE_MAIN = 254
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst/src len, tos, table, protocol,
#                                       scope, type, flags
_NLA = struct.Struct("=HH")  # length, type
_U32, _I32, _BE16 = struct.Struct("=I"), struct.Struct("=i"), struct.Struct(">H")
# One datagram of a dump is at most 32 KiB (the kernel's cap); a bigger buffer never truncates.
RECV_BUFFER = 65536
TIMEOUT_S = 10.0  # a kernel that never answers fails the pass instead of hanging the agent


class VxlanSettings(NamedTuple):
    vni: int
    local: str
    remote: str
    port: int
    mtu: int


@dataclass(frozen=True)
class Link:
    index: int
    up: bool
    # A VXLAN device's message as dumped: its settings are decoded only when asked for (when
    # a leg is built), not on every read.
    vxlan_message: bytes | None = None

    def vxlan(self) -> VxlanSettings | None:
        """The device's VXLAN settings; None for another kind of device, or when they cannot
        be read (a device without a local or remote address is not one the agent made)."""
        if self.vxlan_message is None:
            return None
        return _vxlan_settings(self.vxlan_message)


@dataclass(frozen=True)
class Route:
    type: int  # RTN_*
    oif: int | None
    src: str | None


@dataclass(frozen=True)
class LinkDump:
    links: dict[str, Link]
    # Every device is in `links`; otherwise the kernel filtered by kind and only the VXLAN
    # devices are: another name is asked for (`NetlinkReader.link`).
    complete: bool
    interrupted: bool  # the table changed during the dump (NLM_F_DUMP_INTR): read again


@dataclass(frozen=True)
class AddressDump:
    addresses: frozenset[tuple[int, str]]  # (ifindex, address) of the /32s
    interrupted: bool


@dataclass(frozen=True)
class RouteDump:
    routes: dict[str, tuple[Route, ...]]  # main-table routes to /32s, by destination
    interrupted: bool


class NetlinkSocket(Protocol):
    """What the reader uses of a `socket.socket` (a fake kernel stands in for it in tests)."""

    def send(self, data: bytes, /) -> int: ...
    def recvmsg(self, bufsize: int, /) -> tuple[bytes, list[object], int, object]: ...
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...
    def close(self) -> None: ...


# -- requests (pure) --------------------------------------------------------------------------

def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, sequence: int, body: bytes) -> bytes:
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, sequence, 0) + body


def link_dump_request(sequence: int) -> bytes:
    """Every VXLAN device, without statistics. Header fields left zero: strict checking
    refuses a link dump with any of them set."""
    body = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            + _nla(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
            + _nla(IFLA_LINKINFO, _nla(IFLA_INFO_KIND, b"vxlan\0")))
    return _message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, sequence, body)


def link_request(sequence: int, name: str) -> bytes:
    body = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            + _nla(IFLA_IFNAME, name.encode() + b"\0")
            + _nla(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS)))
    return _message(RTM_GETLINK, NLM_F_REQUEST, sequence, body)


def address_dump_request(sequence: int) -> bytes:
    return _message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence,
                    _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0))


def route_dump_request(sequence: int) -> bytes:
    """IPv4 routes of the main table: a table filter in the header, which a kernel with
    strict checking applies (lengths, tos and scope must then be zero) and one without
    ignores."""
    return _message(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, sequence,
                    _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0))


# -- answers (pure) ---------------------------------------------------------------------------

def _attributes(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Where each attribute's payload is, by type: spans only, nothing decoded."""
    spans: dict[int, tuple[int, int]] = {}
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < _NLA.size or start + length > end:
            break  # malformed: what came before still stands
        spans[kind & NLA_TYPE_MASK] = (start + _NLA.size, start + length)
        start += (length + 3) & ~3
    return spans


def _string(data: bytes, span: tuple[int, int]) -> str:
    return data[span[0]:span[1]].split(b"\0", 1)[0].decode(errors="replace")


def _ipv4(data: bytes, span: tuple[int, int] | None) -> str | None:
    if span is None or span[1] - span[0] != 4:
        return None
    return socket.inet_ntoa(data[span[0]:span[1]])


def _u32(data: bytes, span: tuple[int, int] | None) -> int | None:
    if span is None or span[1] - span[0] < 4:
        return None
    return int(_U32.unpack_from(data, span[0])[0])


def parse_link(message: bytes) -> tuple[str, Link] | None:
    """A link message's name and what the agent reads of it."""
    if len(message) < _HEADER.size + _IFINFO.size:
        return None
    _, _, index, flags, _ = _IFINFO.unpack_from(message, _HEADER.size)
    spans = _attributes(message, _HEADER.size + _IFINFO.size, len(message))
    if IFLA_IFNAME not in spans:
        return None
    kind = None
    info = spans.get(IFLA_LINKINFO)
    if info is not None:
        kind_span = _attributes(message, *info).get(IFLA_INFO_KIND)
        kind = _string(message, kind_span) if kind_span is not None else None
    return _string(message, spans[IFLA_IFNAME]), Link(
        index, bool(flags & IFF_UP), message if kind == "vxlan" else None)


def _vxlan_settings(message: bytes) -> VxlanSettings | None:
    spans = _attributes(message, _HEADER.size + _IFINFO.size, len(message))
    info = spans.get(IFLA_LINKINFO)
    data = _attributes(message, *info).get(IFLA_INFO_DATA) if info is not None else None
    if data is None:
        return None
    settings = _attributes(message, *data)
    local = _ipv4(message, settings.get(IFLA_VXLAN_LOCAL))
    remote = _ipv4(message, settings.get(IFLA_VXLAN_GROUP))
    vni, mtu = _u32(message, settings.get(IFLA_VXLAN_ID)), _u32(message, spans.get(IFLA_MTU))
    port = settings.get(IFLA_VXLAN_PORT)
    if local is None or remote is None or vni is None or mtu is None or port is None:
        return None
    return VxlanSettings(vni, local, remote, _BE16.unpack_from(message, port[0])[0], mtu)


def parse_links(messages: list[bytes], flags: int) -> LinkDump:
    """`flags`: every flag of the answer's messages, together. Only a dump the kernel marked
    filtered can lack devices: any other holds them all, whatever was asked. Except an
    empty one: Linux 4.15-4.19 filter by kind but mark only the devices they send, so no
    VXLAN device looks like no device at all (every namespace has a loopback)."""
    links = {}
    for message in messages:
        parsed = parse_link(message)
        if parsed is not None:
            links[parsed[0]] = parsed[1]
    complete = bool(links) and not flags & NLM_F_DUMP_FILTERED
    return LinkDump(links, complete, bool(flags & NLM_F_DUMP_INTR))


def parse_addresses(messages: list[bytes], flags: int) -> AddressDump:
    found = set()
    for message in messages:
        if len(message) < _HEADER.size + _IFADDR.size:
            continue
        family, prefixlen, _, _, index = _IFADDR.unpack_from(message, _HEADER.size)
        if family != socket.AF_INET or prefixlen != 32:
            continue  # decoded no further: the agent's addresses are /32s
        address = _ipv4(message, _attributes(message, _HEADER.size + _IFADDR.size,
                                             len(message)).get(IFA_ADDRESS))
        if address is not None:
            found.add((index, address))
    return AddressDump(frozenset(found), bool(flags & NLM_F_DUMP_INTR))


def parse_routes(messages: list[bytes], flags: int) -> RouteDump:
    """Main-table routes to /32s: filtered here too, as a kernel without strict checking
    sends every table (and cached exceptions)."""
    to: dict[str, list[Route]] = {}
    for message in messages:
        if len(message) < _HEADER.size + _RTMSG.size:
            continue
        family, dst_len, _, _, table, _, _, kind, route_flags = _RTMSG.unpack_from(
            message, _HEADER.size)
        # A cached exception (a learnt path MTU) is no route: a kernel without strict
        # checking sends them in a route dump.
        if family != socket.AF_INET or dst_len != 32 or route_flags & RTM_F_CLONED:
            continue
        spans = _attributes(message, _HEADER.size + _RTMSG.size, len(message))
        table = _u32(message, spans.get(RTA_TABLE)) or table  # ids past 255 are here only
        destination = _ipv4(message, spans.get(RTA_DST))
        if table != RT_TABLE_MAIN or destination is None:
            continue
        to.setdefault(destination, []).append(
            Route(kind, _u32(message, spans.get(RTA_OIF)), _ipv4(message, spans.get(RTA_PREFSRC))))
    return RouteDump({k: tuple(v) for k, v in to.items()}, bool(flags & NLM_F_DUMP_INTR))


def split(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The messages of one datagram: (type, flags, sequence, the message with its header)."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, sequence, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise RuntimeError("malformed netlink answer")
        yield kind, flags, sequence, data[offset:offset + length]
        offset += (length + 3) & ~3


# -- the socket -------------------------------------------------------------------------------

class NetlinkReader:
    """Dumps over a netlink socket of its own (the changes go through pyroute2's)."""

    def __init__(self, sock: NetlinkSocket | None = None) -> None:
        if sock is None:
            real = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_ROUTE)
            real.settimeout(TIMEOUT_S)
            sock = real
        self._sock = sock
        self._sequence = 0
        self.strict = self._set_strict(True)
        if not self.strict:
            log.info("this kernel has no strict netlink checking: routes of every table are "
                     "read, and dropped here")

    def _set_strict(self, on: bool) -> bool:
        try:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, int(on))
        except OSError:  # ENOPROTOOPT: older than Linux 4.20
            return False
        return on

    def close(self) -> None:
        self._sock.close()

    def links(self) -> LinkDump:
        return parse_links(*self._dump(link_dump_request))

    def addresses(self) -> AddressDump:
        return parse_addresses(*self._dump(address_dump_request))

    def routes(self) -> RouteDump:
        return parse_routes(*self._dump(route_dump_request))

    def link(self, name: str) -> Link | None:
        """One device by name; None when there is none."""
        try:
            messages, _ = self._ask(link_request(self._next(), name))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        for message in messages:
            parsed = parse_link(message)
            if parsed is not None and parsed[0] == name:
                return parsed[1]
        return None

    def _next(self) -> int:
        self._sequence = self._sequence % 0xFFFFFFFF + 1
        return self._sequence

    def _dump(self, request: Callable[[int], bytes]) -> tuple[list[bytes], int]:
        try:
            return self._ask(request(self._next()))
        except OSError as exc:
            # A kernel whose strict checking refuses what this one asks (a field or filter
            # it does not know): without strict checking it ignores them. Once for all.
            if not self.strict or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            log.warning("the kernel refused a filtered dump (%s): reading without kernel-side "
                        "filters from now on", exc)
            self.strict = self._set_strict(False)
            return self._ask(request(self._next()))

    def _ask(self, request: bytes) -> tuple[list[bytes], int]:
        """Send one request; its answer's messages and all their flags together. A message of
        another sequence (left from a request cut short) is skipped."""
        _, _, _, sequence, _ = _HEADER.unpack_from(request, 0)
        self._sock.send(request)
        messages: list[bytes] = []
        flags = 0
        while True:
            data, _, received_flags, _ = self._sock.recvmsg(RECV_BUFFER)
            if received_flags & socket.MSG_TRUNC:
                raise RuntimeError("a netlink answer did not fit the buffer")
            for kind, message_flags, message_sequence, message in split(data):
                if message_sequence != sequence:
                    continue
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    # Both carry an error code: 0 (an acknowledgement, or a dump complete)
                    # or minus an errno.
                    code = -_I32.unpack_from(message, _HEADER.size)[0] \
                        if len(message) >= _HEADER.size + _I32.size else 0
                    if code > 0:
                        raise OSError(code, os.strerror(code))
                    return messages, flags | message_flags
                messages.append(message)
                flags |= message_flags
                if not message_flags & NLM_F_MULTI:
                    return messages, flags  # the one answer to a request that is no dump
