"""A gate in front of os-ken's OpenFlow parser.

os-ken (like Ryu before it) walks length-prefixed lists with `while offset < end: offset +=
item.len`; an item whose length is 0 never advances and the connection's thread spins forever
(the public reproducers: hello elements, instructions, actions, multipart bodies, buckets,
queue properties). One such peer would eat the controller's CPU and its other switches.

So every message from a peer is checked here, on raw bytes, before os-ken sees it: only the
message types a switch sends NWC, only OpenFlow 1.3, and every nested length walked and
bounded. A message that fails is never parsed: the connection is closed. Messages NWC never
asks for (packet-in, flow-removed...) are dropped unparsed. Pure functions plus a socket
wrapper; the os-ken shell installs the wrapper on every accepted connection.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

OFP13 = 4
HEADER = struct.Struct("!BBHI")

HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY, EXPERIMENTER = 0, 1, 2, 3, 4
FEATURES_REPLY, GET_CONFIG_REPLY, PACKET_IN, FLOW_REMOVED, PORT_STATUS = 6, 8, 10, 11, 12
MULTIPART_REPLY, BARRIER_REPLY, ROLE_REPLY, GET_ASYNC_REPLY = 19, 21, 25, 27

# Multipart types NWC requests.
MP_FLOW, MP_PORT_DESC, MP_METER, MP_METER_CONFIG = 1, 13, 9, 10

ONF_EXPERIMENTER_ID = 0x4F4E4600
ONF_ET_BUNDLE_CONTROL = 2300

# Instruction and action types NWC installs (and so may see in flow stats). os-ken steps
# over a fixed-size item by its class size, not by the length the peer wrote: an item that
# claims more would hide bytes the guard never checks but os-ken parses as the next item (a
# zero-length one spins it forever). So each of these must declare exactly that size.
IT_GOTO_TABLE, IT_WRITE_METADATA, IT_APPLY_ACTIONS, IT_METER = 1, 2, 4, 6
FIXED_INSTRUCTION_SIZES = {IT_GOTO_TABLE: 8, IT_WRITE_METADATA: 24, IT_METER: 8}
AT_OUTPUT, AT_DEC_NW_TTL, AT_SET_FIELD, AT_EXPERIMENTER = 0, 24, 25, 0xFFFF
FIXED_ACTION_SIZES = {AT_OUTPUT: 16, AT_DEC_NW_TTL: 8}
NX_VENDOR = 0x00002320
NXAST_REG_MOVE = 6
OXM_CLASS_EXPERIMENTER = 0xFFFF


class Rejected(Exception):
    """The peer sent something NWC will not parse."""


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(text: str) -> list[IpNetwork]:
    """`--ofp-allowed-peers`: comma-separated CIDRs (a bare address is a /32 or /128).
    Raises ValueError naming the entry it cannot read."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"not an address or CIDR: {item!r}") from exc
    if not out:
        raise ValueError("no address or CIDR given")
    return out


def peer_ip(address: Any) -> IpAddress | None:
    """The IP address of a peer as the listener reports it ((host, port, ...)); an IPv4
    peer on an IPv6 socket (::ffff:a.b.c.d) counts as IPv4."""
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except (ValueError, TypeError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_allowed(address: Any, allowed: Sequence[IpNetwork] | None) -> bool:
    """No list: everyone. Otherwise only peers inside one of the networks."""
    if allowed is None:
        return True
    ip = peer_ip(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in allowed)


# Dropped without parsing: a switch may send them, NWC never needs them.
IGNORED = {PACKET_IN, FLOW_REMOVED, ROLE_REPLY, GET_ASYNC_REPLY, GET_CONFIG_REPLY}
EXPECTED = {HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY, EXPERIMENTER, FEATURES_REPLY, PORT_STATUS,
            MULTIPART_REPLY, BARRIER_REPLY} | IGNORED
# A switch talks at least every few seconds (OVS probes an idle connection after 5 s); a peer
# silent for this long, or stuck half-way through a message, is let go.
IDLE_LIMIT_S = 30.0
# Volume limits per connection: what a peer can make NWC and os-ken hold. A multipart reply
# (flow stats of a busy switch: about 64 KB per part) may run this many parts, this many
# replies may be open at once, and a switch may have this many ports (os-ken keeps each in
# `Datapath.ports`; a port deleted no longer counts). Past any of them: the connection ends.
MAX_MULTIPART_CHAIN = 1024
MAX_OPEN_CHAINS = 16
MAX_PORTS = 16384
OFPMPF_REPLY_MORE = 1
OFPPR_DELETE = 1
PORT_SIZE = 64


def check_header(version: int, msg_type: int, length: int) -> None:
    """Refuse a message from its first 8 bytes, before waiting for the rest of it."""
    if length < HEADER.size:
        raise Rejected(f"message length {length}")
    if msg_type != HELLO and version != OFP13:
        raise Rejected(f"OpenFlow version {version}; NWC speaks 1.3 (4) only")
    if msg_type not in EXPECTED:
        raise Rejected(f"unexpected message type {msg_type} from a switch")


def check_message(buf: bytes) -> bool:
    """True: hand to os-ken. False: drop quietly. Raises Rejected: close the connection."""
    if len(buf) < HEADER.size:
        raise Rejected("short header")
    version, msg_type, length, _xid = HEADER.unpack_from(buf)
    if length != len(buf):
        raise Rejected("length field does not match the message")
    if msg_type == HELLO:
        if version < 1:
            raise Rejected("hello with version 0")
        _walk_tlvs(buf, 8, len(buf), unit=1, what="hello element", min_len=4)
        return True
    if version != OFP13:
        raise Rejected(f"OpenFlow version {version}; NWC speaks 1.3 (4) only")
    if msg_type in IGNORED:
        return False
    if msg_type in (ECHO_REQUEST, ECHO_REPLY, BARRIER_REPLY):
        if msg_type == BARRIER_REPLY and length != 8:
            raise Rejected("barrier reply with a body")
        return True
    if msg_type == ERROR:
        if length < 12:
            raise Rejected("error message shorter than 12 bytes")
        return True
    if msg_type == FEATURES_REPLY:
        if length != 32:
            raise Rejected("features reply is not 32 bytes")
        return True
    if msg_type == PORT_STATUS:
        if length != 80:
            raise Rejected("port status is not 80 bytes")
        return True
    if msg_type == EXPERIMENTER:
        return _check_experimenter(buf)
    if msg_type == MULTIPART_REPLY:
        _check_multipart(buf)
        return True
    raise Rejected(f"unexpected message type {msg_type} from a switch")


def _walk_tlvs(buf: bytes, start: int, end: int, *, unit: int, what: str,
               min_len: int, len_offset: int = 2, padded: bool = False) -> list[tuple[int, int]]:
    """Walk type-length items; each must be at least `min_len`, a multiple of `unit`, and
    inside [start, end). `padded`: a length excludes the padding to 8 bytes that follows the
    item, which must be inside too, and the next item starts after it. Returns (offset,
    length) of each."""
    items = []
    offset = start
    while offset < end:
        if offset + len_offset + 2 > end:
            raise Rejected(f"truncated {what}")
        (length,) = struct.unpack_from("!H", buf, offset + len_offset)
        step = _round_up_8(length) if padded else length
        if length < min_len or length % unit or offset + step > end:
            raise Rejected(f"{what} of length {length} at offset {offset}")
        items.append((offset, length))
        offset += step
    return items


def _check_experimenter(buf: bytes) -> bool:
    if len(buf) < 16:
        raise Rejected("experimenter message shorter than 16 bytes")
    experimenter, exp_type = struct.unpack_from("!II", buf, 8)
    if (experimenter, exp_type) != (ONF_EXPERIMENTER_ID, ONF_ET_BUNDLE_CONTROL):
        return False  # NWC asked for no other experimenter message
    if len(buf) < 24:
        raise Rejected("bundle control reply shorter than 24 bytes")
    # A property's length excludes the padding to 8 bytes that follows it, and os-ken
    # (OFPPropBase.parse) steps over the padded length: the guard steps the same way, or a
    # spec-conforming padded property would look like a zero-length one to it (a false reject
    # that drops the switch), and an unpadded one followed by another would be framed
    # differently by the two. Like OVS's own ofpprop_pull, the padding must be there.
    _walk_tlvs(buf, 24, len(buf), unit=1, what="bundle property", min_len=4, padded=True)
    return True


def _check_multipart(buf: bytes) -> None:
    if len(buf) < 16:
        raise Rejected("multipart reply shorter than 16 bytes")
    (mp_type,) = struct.unpack_from("!H", buf, 8)
    body = 16
    end = len(buf)
    if mp_type == MP_PORT_DESC:
        if (end - body) % 64:
            raise Rejected("port description body is not whole 64-byte ports")
    elif mp_type == MP_FLOW:
        for offset, length in _walk_tlvs(buf, body, end, unit=8, what="flow stats entry",
                                         min_len=56, len_offset=0):
            _check_flow_stats(buf, offset, offset + length)
    elif mp_type == MP_METER:
        for offset, length in _walk_tlvs(buf, body, end, unit=8, what="meter stats entry",
                                         min_len=40, len_offset=4):
            if (length - 40) % 16:
                raise Rejected("meter band stats are not whole 16-byte entries")
            del offset
    elif mp_type == MP_METER_CONFIG:
        for offset, length in _walk_tlvs(buf, body, end, unit=8, what="meter config",
                                         min_len=8, len_offset=0):
            _walk_tlvs(buf, offset + 8, offset + length, unit=8, what="meter band",
                       min_len=16)
    else:
        raise Rejected(f"multipart reply of type {mp_type}, which NWC never requests")


def _check_flow_stats(buf: bytes, start: int, end: int) -> None:
    match_at = start + 48
    if match_at + 4 > end:
        raise Rejected("flow stats entry without a match")
    (match_len,) = struct.unpack_from("!H", buf, match_at + 2)
    padded = (match_len + 7) // 8 * 8
    if match_len < 4 or match_at + padded > end:
        raise Rejected(f"match of length {match_len}")
    offset = match_at + 4
    while offset < match_at + match_len:  # OXM TLVs: 4-byte header, payload length byte
        if offset + 4 > match_at + match_len:
            raise Rejected("truncated OXM field")
        payload = buf[offset + 3]
        offset += 4 + payload
    if offset != match_at + match_len:
        raise Rejected("OXM fields overrun the match")
    for inst_at, inst_len in _walk_tlvs(buf, match_at + padded, end, unit=8,
                                        what="instruction", min_len=8):
        (inst_type,) = struct.unpack_from("!H", buf, inst_at)
        if inst_type in FIXED_INSTRUCTION_SIZES:
            _require_length("instruction", inst_type, inst_at, inst_len,
                            FIXED_INSTRUCTION_SIZES[inst_type])
        elif inst_type == IT_APPLY_ACTIONS:  # os-ken steps by its declared length
            _check_actions(buf, inst_at + 8, inst_at + inst_len)
        else:
            raise Rejected(f"instruction type {inst_type}")


def _check_actions(buf: bytes, start: int, end: int) -> None:
    for act_at, act_len in _walk_tlvs(buf, start, end, unit=8, what="action", min_len=8):
        (act_type,) = struct.unpack_from("!H", buf, act_at)
        if act_type in FIXED_ACTION_SIZES:
            expected = FIXED_ACTION_SIZES[act_type]
        elif act_type == AT_SET_FIELD:
            expected = _set_field_length(buf, act_at, act_at + act_len)
        elif act_type == AT_EXPERIMENTER:
            expected = _nx_action_length(buf, act_at, act_at + act_len)
        else:
            raise Rejected(f"action type {act_type}")
        _require_length("action", act_type, act_at, act_len, expected)


def _require_length(what: str, item_type: int, at: int, declared: int, expected: int) -> None:
    if declared != expected:
        raise Rejected(f"{what} type {item_type} at offset {at} claims {declared} bytes; "
                       f"it is {expected}")


def _round_up_8(length: int) -> int:
    return (length + 7) // 8 * 8


def _oxm_header_length(buf: bytes, at: int, end: int) -> int:
    """An OXM header's size: 8 for an experimenter class (its id follows), 4 otherwise."""
    if at + 4 > end:
        raise Rejected(f"truncated OXM header at offset {at}")
    (oxm_class,) = struct.unpack_from("!H", buf, at)
    return 8 if oxm_class == OXM_CLASS_EXPERIMENTER else 4


def _set_field_length(buf: bytes, at: int, end: int) -> int:
    """What a set_field action must be: its 4-byte header and one OXM, padded to 8 (os-ken
    steps by the declared length but reads the OXM by its own, so the two must agree)."""
    if at + 8 > end:
        raise Rejected(f"set_field at offset {at} without an OXM header")
    payload = buf[at + 7]
    if payload == 0:  # os-ken asserts a value is there
        raise Rejected(f"set_field at offset {at} with an empty OXM")
    return _round_up_8(4 + 4 + payload)


def _nx_action_length(buf: bytes, at: int, end: int) -> int:
    """What an experimenter action must be. Only NXAST_REG_MOVE (the one NWC installs):
    8-byte experimenter header, subtype, n_bits/src_ofs/dst_ofs, two OXM headers, padded."""
    if end - at < 16:
        raise Rejected("experimenter action shorter than 16 bytes")
    vendor, subtype = struct.unpack_from("!IH", buf, at + 4)
    if vendor != NX_VENDOR or subtype != NXAST_REG_MOVE:
        raise Rejected(f"experimenter action {vendor:#x}/{subtype}")
    src_at = at + 16
    dst_at = src_at + _oxm_header_length(buf, src_at, end)
    return _round_up_8(dst_at + _oxm_header_length(buf, dst_at, end) - at)


class GuardedSocket:
    """Wraps an accepted socket: `recv` returns only bytes of whole, checked messages, and
    end-of-stream as soon as the peer sends something rejected (os-ken then closes)."""

    def __init__(self, sock: socket.socket, peer: Any, certificate: bytes | None = None) -> None:
        self._sock = sock
        self._peer = peer
        # The peer's TLS certificate (DER), None over plain TCP: the flows part checks that
        # it names the switch whose datapath id the peer announces.
        self.certificate = certificate
        self._raw = bytearray()
        self._ready = bytearray()
        self.rejected: str | None = None
        # The peer's end of the stream was seen (or the connection refused): os-ken takes a
        # while to report such a connection dead (it joins its echo and send threads first),
        # and a switch reconnecting meanwhile must not be turned away for it.
        self.ended = False
        self._last = time.monotonic()
        self._chains: dict[int, int] = {}  # xid -> parts of a multipart reply still running
        self._ports: set[int] = set()  # port numbers the peer says it has

    def idle_s(self) -> float:
        """Seconds since the peer's last complete message (a live switch answers os-ken's
        echo requests, so this stays small while it is there)."""
        return time.monotonic() - self._last

    def recv(self, size: int, *flags: int) -> bytes:
        while not self._ready:
            if self.rejected:
                self.ended = True
                return b""
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                # os-ken retries on a timeout; NWC gives up on a peer that went quiet.
                if time.monotonic() - self._last > IDLE_LIMIT_S:
                    self._reject(f"nothing complete for {IDLE_LIMIT_S:g} s")
                    self.ended = True
                    return b""
                raise
            except OSError:
                self.ended = True
                raise
            if not data:
                self.ended = True
                return b""
            self._raw += data
            self._take_messages()
        out = bytes(self._ready[:size])
        del self._ready[:size]
        return out

    def _take_messages(self) -> None:
        while len(self._raw) >= HEADER.size:
            version, msg_type, length, _xid = HEADER.unpack_from(self._raw)
            try:
                check_header(version, msg_type, length)
            except Rejected as exc:
                self._reject(str(exc))
                return
            if len(self._raw) < length:
                return
            msg = bytes(self._raw[:length])
            del self._raw[:length]
            self._last = time.monotonic()
            try:
                if check_message(msg):  # False: harmless but unwanted, left out
                    self._account(msg)
                    self._ready += msg
            except Rejected as exc:
                self._reject(str(exc))
                return

    def _account(self, msg: bytes) -> None:
        """Per-connection volume: checked messages that would make NWC or os-ken hold more
        than the limits above are refused like malformed ones."""
        _version, msg_type, _length, xid = HEADER.unpack_from(msg)
        if msg_type == PORT_STATUS:
            reason = msg[8]
            (port_no,) = struct.unpack_from("!I", msg, 16)
            if reason == OFPPR_DELETE:
                self._ports.discard(port_no)
            else:
                self._add_ports([port_no])
        elif msg_type == MULTIPART_REPLY:
            mp_type, flags = struct.unpack_from("!HH", msg, 8)
            if mp_type == MP_PORT_DESC:
                self._add_ports(struct.unpack_from("!I", msg, at)[0]
                                for at in range(16, len(msg), PORT_SIZE))
            if flags & OFPMPF_REPLY_MORE:
                parts = self._chains.get(xid, 0) + 1
                if parts > MAX_MULTIPART_CHAIN:
                    raise Rejected(f"multipart reply {xid:#x} runs past {MAX_MULTIPART_CHAIN} "
                                   "parts")
                if xid not in self._chains and len(self._chains) >= MAX_OPEN_CHAINS:
                    raise Rejected(f"more than {MAX_OPEN_CHAINS} multipart replies open")
                self._chains[xid] = parts
            else:
                self._chains.pop(xid, None)

    def _add_ports(self, numbers: Iterable[int]) -> None:
        self._ports.update(numbers)
        if len(self._ports) > MAX_PORTS:
            raise Rejected(f"more than {MAX_PORTS} ports")

    def _reject(self, why: str) -> None:
        self.rejected = why
        self._raw.clear()
        log.warning("OpenFlow peer %s sent a malformed or unexpected message (%s): "
                    "closing the connection without parsing it", self._peer, why)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
