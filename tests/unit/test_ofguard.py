"""The gate in front of os-ken's parser: public reproducers of its infinite loops are refused
on raw bytes, and what a real switch sends passes."""

from __future__ import annotations

import contextlib
import struct
import threading
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from os_ken.ofproto import ofproto_parser, ofproto_protocol
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from nwc import ofguard
from nwc.ofguard import GuardedSocket, Rejected, check_message, parse_networks, peer_allowed

pytestmark = pytest.mark.unit

# Ryu issue tracker reproducers (each loops forever in the unguarded parser).
HELLO_ZERO_ELEMENT = bytes.fromhex("04000010000000130001000000000010")
FLOW_STATS_ZERO_INSTRUCTION = (
    b"\x04\x13\x00\x50\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    b"\x00\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x01\x00\x04\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00")
FLOW_MOD_FROM_A_SWITCH = (
    b"\x04\x0e\x00\x50\x00\x00\x00\x22" + b"\x00" * 22 + b"\x80\x00\xff\xff\xff\xff"
    + b"\x00" * 12 + b"\x00\x01\x00\x04\x00\x00\x00\x00\x00\x04\x00\x08\x00\x00\x00\x00"
    + b"\x00\x00\x00\x00\xff\xff\xff\xfd\xff\xff\x00\x00\x00\x00\x00\x00")
MULTIPART_ZERO_LENGTH_BODY = struct.pack("!BBHIHH4x", 4, 19, 16 + 8, 7, 1, 0) + b"\x00" * 8


def _wire(msg: object) -> bytes:
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
    msg.datapath = dp  # type: ignore[attr-defined]
    msg.set_xid(5)  # type: ignore[attr-defined]
    msg.serialize()  # type: ignore[attr-defined]
    return bytes(msg.buf)  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [HELLO_ZERO_ELEMENT, FLOW_STATS_ZERO_INSTRUCTION,
                                 FLOW_MOD_FROM_A_SWITCH, MULTIPART_ZERO_LENGTH_BODY],
                         ids=["hello", "flow-stats", "flow-mod", "multipart"])
def test_known_parser_hangs_are_refused(raw: bytes) -> None:
    assert len(raw) == struct.unpack_from("!H", raw, 2)[0]
    with pytest.raises(Rejected):
        check_message(raw)


def test_what_a_switch_sends_passes() -> None:
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
    assert check_message(_wire(parser.OFPHello(dp)))
    assert check_message(_wire(parser.OFPEchoRequest(dp, data=b"x" * 16)))
    # A flow stats reply entry as OVS reports one of NWC's flows: the match and
    # instructions on the wire are those of the flow mod that installed it.
    inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, [
        parser.OFPActionSetField(eth_dst="02:00:00:00:00:01"),
        parser.NXActionRegMove(src_field="eth_src", dst_field="eth_dst", n_bits=48),
        parser.OFPActionOutput(3, 0)]), parser.OFPInstructionGotoTable(3)]
    mod = _wire(parser.OFPFlowMod(dp, priority=200, table_id=2, instructions=inst,
                                  match=parser.OFPMatch(in_port=1, eth_type=0x800,
                                                        ipv4_dst="192.0.2.1")))
    rest = mod[48:]
    entry = struct.pack("!HBxIIHHHH4xQQQ", 48 + len(rest), 2, 1, 0, 200, 0, 0, 0, 1, 1,
                        64) + rest
    reply = struct.pack("!BBHIHH4x", 4, 19, 16 + len(entry), 9, 1, 0) + entry
    assert check_message(reply)
    parsed = ofproto_parser.msg(dp, 4, 19, len(reply), 9, reply)
    assert parsed.body[0].priority == 200
    # Packet-ins are never asked for: dropped without parsing, not a reason to hang up.
    packet_in = struct.pack("!BBHI", 4, 10, 8, 1)
    assert check_message(packet_in) is False


def test_other_versions_and_unexpected_types_are_refused() -> None:
    with pytest.raises(Rejected):
        check_message(struct.pack("!BBHI", 1, 2, 8, 1))  # OpenFlow 1.0 echo
    with pytest.raises(Rejected):
        check_message(struct.pack("!BBHI", 4, 14, 8, 1))  # a flow mod, from a switch
    with pytest.raises(Rejected):
        check_message(struct.pack("!BBHI", 4, 21, 12, 1) + b"1234")  # barrier with a body


@given(st.binary(min_size=8, max_size=300))
def test_arbitrary_bytes_are_decided_quickly_and_never_crash(raw: bytes) -> None:
    """Whatever the gate lets through, os-ken's parser finishes (it may still raise)."""
    raw = bytes([4]) + raw[1:2] + struct.pack("!H", len(raw)) + raw[4:]
    try:
        accepted = check_message(raw)
    except Rejected:
        return
    if accepted:
        dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
        with contextlib.suppress(Exception):
            ofproto_parser.msg(dp, 4, raw[1], len(raw), 1, raw)


def test_allowed_peers_are_networks_and_everything_else_is_refused() -> None:
    allowed = parse_networks("198.51.100.0/24, 2001:db8::/32,192.0.2.7")
    assert peer_allowed(("198.51.100.9", 40000), allowed)
    assert peer_allowed(("::ffff:198.51.100.9", 40000, 0, 0), allowed)  # IPv4 on a v6 socket
    assert peer_allowed(("2001:db8::1", 40000, 0, 0), allowed)
    assert peer_allowed(("192.0.2.7", 1), allowed)
    assert not peer_allowed(("192.0.2.8", 1), allowed)
    assert not peer_allowed(("127.0.0.1", 1), allowed)
    assert not peer_allowed(("not an address", 1), allowed)
    assert peer_allowed(("127.0.0.1", 1), None)  # no list: everyone
    for bad in ("", "10.0.0.0/33", "example.org"):
        with pytest.raises(ValueError):
            parse_networks(bad)


class _Sock:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_peer_outside_the_allowed_networks_is_closed_before_os_ken_sees_it() -> None:
    from nwc import ofapp
    reached: list[Any] = []
    factory = ofapp._guarded_factory(lambda sock, address: reached.append(sock))
    ofapp.set_allowed_peers(parse_networks("198.51.100.0/24"))
    try:
        outsider = _Sock()
        factory(outsider, ("203.0.113.5", 6653))
        assert outsider.closed and not reached
        insider = _Sock()
        factory(insider, ("198.51.100.5", 6653))
        assert not insider.closed
        assert len(reached) == 1 and isinstance(reached[0], GuardedSocket)
    finally:
        ofapp.set_allowed_peers(None)


class _Feed:
    """A socket whose peer sends these messages, one per recv."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = list(messages)

    def recv(self, size: int) -> bytes:
        return self.messages.pop(0) if self.messages else b""


def _drain(guard: GuardedSocket) -> int:
    """Messages the guard handed on before the stream ended."""
    passed = 0
    while True:
        data = guard.recv(65536)
        if not data:
            return passed
        passed += 1


def _multipart(xid: int, more: bool, body: bytes = b"") -> bytes:
    return struct.pack("!BBHIHH4x", 4, 19, 16 + len(body), xid, 13, 1 if more else 0) + body


def _port(port_no: int) -> bytes:
    return struct.pack("!I4x6s2x16sIIIIIIII", port_no, b"\x02\0\0\0\0\x01", b"p", 0, 0, 0,
                       0, 0, 0, 0, 0)


def _port_status(port_no: int, reason: int) -> bytes:
    return struct.pack("!BBHIB7x", 4, 12, 80, 0, reason) + _port(port_no)


def test_a_multipart_reply_that_never_ends_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ofguard, "MAX_MULTIPART_CHAIN", 8)
    finished = [_multipart(1, True)] * 7 + [_multipart(1, False)]
    guard = GuardedSocket(_Feed(finished * 3), "peer")  # chains within the cap: all pass
    assert _drain(guard) == 24 and guard.rejected is None
    endless = GuardedSocket(_Feed([_multipart(2, True)] * 100), "peer")
    assert _drain(endless) == 8
    assert endless.rejected and "multipart" in endless.rejected
    # Many chains left open at once are cut off too.
    monkeypatch.setattr(ofguard, "MAX_OPEN_CHAINS", 4)
    spread = GuardedSocket(_Feed([_multipart(x, True) for x in range(100)]), "peer")
    assert _drain(spread) == 4 and spread.rejected


def test_a_peer_cannot_announce_ports_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ofguard, "MAX_PORTS", 16)
    # Ports that come and go (add, delete) never add up.
    churn = [_port_status(n % 10 + 1, reason) for n in range(200) for reason in (0, 1)]
    guard = GuardedSocket(_Feed(churn), "peer")
    assert _drain(guard) == 400 and guard.rejected is None
    growing = GuardedSocket(_Feed([_port_status(n, 0) for n in range(1, 100)]), "peer")
    assert _drain(growing) == 16
    assert growing.rejected and "ports" in growing.rejected
    # A port description counts its ports as well.
    desc = _multipart(3, False, b"".join(_port(n) for n in range(1, 18)))
    described = GuardedSocket(_Feed([desc]), "peer")
    assert _drain(described) == 0 and described.rejected


def _flow_stats_reply(instructions: bytes) -> bytes:
    """A one-entry flow stats reply with an empty match and these instructions."""
    match = struct.pack("!HH4x", 1, 4)
    entry = struct.pack("!HBxIIHHHH4xQQQ", 48 + len(match) + len(instructions), 0, 0, 0,
                        100, 0, 0, 0, 1, 1, 1) + match + instructions
    return struct.pack("!BBHIHH4x", 4, 19, 16 + len(entry), 7, 1, 0) + entry


def _apply_actions(actions: bytes) -> bytes:
    return struct.pack("!HH4x", 4, 8 + len(actions)) + actions


def _os_ken_finishes(raw: bytes, timeout_s: float = 2.0) -> bool:
    """os-ken's parser, in a thread: False if it is still running after the timeout (a hung
    parse spins in a daemon thread until the test process exits)."""
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)

    def parse() -> None:
        with contextlib.suppress(Exception):
            ofproto_parser.msg(dp, *ofproto_parser.header(raw), raw)

    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


# Review reproducers: a fixed-size item claiming more than os-ken steps over hides a
# zero-length item from the guard; os-ken then parses it and never advances.
ZERO_LENGTH_APPLY = struct.pack("!HH4x", 4, 0)
ZERO_LENGTH_EXPERIMENTER = struct.pack("!HHI", 0xFFFF, 0, 0x12345678)
GOTO_HIDING_AN_INSTRUCTION = _flow_stats_reply(
    struct.pack("!HHB3x", 1, 16, 1) + ZERO_LENGTH_APPLY)
OUTPUT_HIDING_AN_ACTION = _flow_stats_reply(_apply_actions(
    struct.pack("!HHIH6x", 0, 24, 1, 0) + ZERO_LENGTH_EXPERIMENTER))


@pytest.mark.parametrize("raw", [GOTO_HIDING_AN_INSTRUCTION, OUTPUT_HIDING_AN_ACTION],
                         ids=["goto-16", "output-24"])
def test_items_longer_than_os_ken_steps_are_refused_before_os_ken_parses(raw: bytes) -> None:
    with pytest.raises(Rejected, match="claims"):
        check_message(raw)
    # Through the socket wrapper: os-ken is handed nothing, and the connection ends.
    guard = GuardedSocket(_Feed([raw]), "peer")
    assert guard.recv(65536) == b""
    assert guard.rejected and "claims" in guard.rejected


def test_fixed_sizes_are_the_ones_os_ken_steps_by() -> None:
    os_ken_instructions = {
        ofp.OFPIT_GOTO_TABLE: ofp.OFP_INSTRUCTION_GOTO_TABLE_SIZE,
        ofp.OFPIT_WRITE_METADATA: ofp.OFP_INSTRUCTION_WRITE_METADATA_SIZE,
        ofp.OFPIT_METER: ofp.OFP_INSTRUCTION_METER_SIZE}
    os_ken_actions = {
        ofp.OFPAT_OUTPUT: parser.OFPActionOutput.cls_action_len,
        ofp.OFPAT_DEC_NW_TTL: parser.OFPActionDecNwTtl.cls_action_len}
    assert os_ken_instructions == ofguard.FIXED_INSTRUCTION_SIZES
    assert os_ken_actions == ofguard.FIXED_ACTION_SIZES


def test_every_action_and_instruction_nwc_installs_passes_at_its_own_length() -> None:
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
    inst = [parser.OFPInstructionMeter(3, ofp.OFPIT_METER),
            parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, [
                parser.OFPActionSetField(ipv6_dst="2001:db8::1"),  # 16-byte OXM: 24
                parser.OFPActionSetField(vlan_vid=0x1005),  # 2-byte OXM: 16
                parser.OFPActionDecNwTtl(),
                parser.NXActionRegMove(src_field="reg0", dst_field="reg1", n_bits=32),
                parser.OFPActionOutput(1, 0)]),
            parser.OFPInstructionWriteMetadata(5, 2**64 - 1),
            parser.OFPInstructionGotoTable(4)]
    mod = _wire(parser.OFPFlowMod(dp, instructions=inst, match=parser.OFPMatch()))
    reply = _flow_stats_reply(mod[56:])
    assert check_message(reply)
    assert _os_ken_finishes(reply)
    # One byte of slack on any of them (a set_field claiming 8 more) is refused.
    padded_set_field = _flow_stats_reply(_apply_actions(
        struct.pack("!HH", 25, 24) + bytes.fromhex("80000c02") + b"\x10\x05" + bytes(14)))
    with pytest.raises(Rejected, match="claims"):
        check_message(padded_set_field)


# Random instruction lists: each item of a type os-ken knows (and a few it does not), with a
# declared length that may or may not be its true size, followed by items a wrong length
# could hide, the zero-length ones that hang os-ken among them.
_HIDDEN = st.sampled_from([b"", b"", b"", ZERO_LENGTH_APPLY, ZERO_LENGTH_EXPERIMENTER,
                           struct.pack("!HH4x", 25, 0), bytes(8), bytes(16)])
_LENGTHS = st.sampled_from([0, 8, 16, 24, 32, 40])


@st.composite
def _actions(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["output", "dec_nw_ttl", "set_field", "reg_move",
                                     "group"]))
        body = {"output": struct.pack("!IH6x", 1, 0), "dec_nw_ttl": bytes(4),
                "set_field": bytes.fromhex("80000c02") + b"\x10\x05" + bytes(6),
                "reg_move": struct.pack("!IHHHHII", 0x2320, 6, 32, 0, 0, 0x10004,
                                        0x10204) + bytes(4),
                "group": struct.pack("!I", 1)}[kind]
        act_type = {"output": 0, "dec_nw_ttl": 24, "set_field": 25, "reg_move": 0xFFFF,
                    "group": 22}[kind]
        declared = draw(st.one_of(st.just(4 + len(body)), st.just(4 + len(body)), _LENGTHS))
        out += struct.pack("!HH", act_type, declared) + body + draw(_HIDDEN)
    return out


@st.composite
def _instructions(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["goto", "write_metadata", "meter", "apply", "clear"]))
        if kind == "apply":
            body, inst_type = bytes(4) + draw(_actions()), 4
        else:
            body, inst_type = {"goto": (b"\x01" + bytes(3), 1),
                               "write_metadata": (bytes(20), 2),
                               "meter": (struct.pack("!I", 1), 6),
                               "clear": (bytes(4), 5)}[kind]
        declared = draw(st.one_of(st.just(4 + len(body)), st.just(4 + len(body)), _LENGTHS))
        out += struct.pack("!HH", inst_type, declared) + body + draw(_HIDDEN)
    return out


@settings(max_examples=400, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(_instructions())
def test_whatever_the_guard_accepts_os_ken_finishes_parsing(instructions: bytes) -> None:
    """No shrinking: a failing example leaves a spinning thread behind, so stop at the first."""
    raw = _flow_stats_reply(instructions)
    try:
        accepted = check_message(raw)
    except Rejected:
        return
    assert accepted
    assert _os_ken_finishes(raw), f"os-ken hangs on {raw.hex()}"


# Bundle control replies (ONF bundle extension, as OVS answers NWC's OF1.3 bundles). Each
# property's length excludes the zero padding to 8 bytes that follows it (OpenFlow 1.4
# property lists; ONF EXT-230), and the message length includes it.
# The commit reply ovs-vswitchd 3.1 sent for NWC's bundle 2 (xid 0x4e57000f), as captured by
# tests/functional/test_flows_ovs.py: 24 bytes, no properties.
OVS_BUNDLE_COMMIT_REPLY = bytes.fromhex("040400184e57000f4f4e4600000008fc0000000200050000")


def _bundle_reply(properties: bytes, reply: bytes = OVS_BUNDLE_COMMIT_REPLY) -> bytes:
    """A bundle reply with these properties after its 24-byte head, its length fixed."""
    raw = reply[:24] + properties
    return raw[:2] + struct.pack("!H", len(raw)) + raw[4:]


def _property(prop_type: int, payload: bytes, padded: bool = True) -> bytes:
    raw = struct.pack("!HH", prop_type, 4 + len(payload)) + payload
    return raw + bytes(-len(raw) % 8) if padded else raw


# An experimenter property of 12 bytes and one of 5: 4 and 3 bytes of padding after them.
PADDED_PROPERTIES = (_property(0xFFFF, struct.pack("!II", 0x2320, 1))
                     + _property(7, b"\x01"))


def test_a_bundle_reply_with_padded_properties_passes_and_os_ken_reads_each() -> None:
    assert check_message(OVS_BUNDLE_COMMIT_REPLY)  # what OVS sends today
    raw = _bundle_reply(PADDED_PROPERTIES)
    assert len(raw) == 24 + 16 + 8
    assert check_message(raw)
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
    msg = ofproto_parser.msg(dp, *ofproto_parser.header(raw), raw)
    assert isinstance(msg, parser.ONFBundleCtrlMsg) and msg.bundle_id == 2
    assert msg.type == ofp.ONF_BCT_COMMIT_REPLY
    assert [(p.type, p.length) for p in msg.properties] == [(0xFFFF, 12), (7, 5)]
    # Through the socket wrapper too: the switch stays connected.
    guard = GuardedSocket(_Feed([raw]), "peer")
    assert guard.recv(65536) == raw and guard.rejected is None


@pytest.mark.parametrize("properties", [
    struct.pack("!HH", 0xFFFF, 0) + bytes(4),  # zero length: os-ken raises
    _property(7, b"\x01", padded=False),  # its padding cut off by the message's end
    _property(7, b"\x01", padded=False) + _property(7, b"\x02"),  # framed unpadded
    _property(0xFFFF, bytes(8)) + b"\x00\x00",  # a truncated property header
], ids=["zero-length", "unpadded-last", "unpadded-first", "truncated"])
def test_bundle_properties_os_ken_would_frame_differently_are_refused(
        properties: bytes) -> None:
    with pytest.raises(Rejected, match="bundle property"):
        check_message(_bundle_reply(properties))


_BUNDLE_PROPERTY = st.tuples(st.sampled_from([0, 1, 3, 4, 5, 8, 12, 13, 16, 20]),
                             st.sampled_from([0, 1, 3, 4, 8]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_BUNDLE_PROPERTY, max_size=4))
def test_whatever_bundle_properties_the_guard_accepts_os_ken_frames_alike(
        items: list[tuple[int, int]]) -> None:
    """Properties of declared length `length` followed by `pad` bytes (a short pad lets the
    next header fall into a property's padding): if the guard accepts the reply, os-ken
    parses it and sees exactly the properties the guard walked."""
    properties = b"".join(struct.pack("!HH", 0xFFFF, length) + bytes(max(0, length - 4) + pad)
                          for length, pad in items)
    raw = _bundle_reply(properties)
    try:
        accepted = check_message(raw)
    except Rejected:
        return
    assert accepted
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
    msg = ofproto_parser.msg(dp, *ofproto_parser.header(raw), raw)
    walked = ofguard._walk_tlvs(raw, 24, len(raw), unit=1, what="bundle property", min_len=4,
                                padded=True)
    assert [p.length for p in msg.properties] == [length for _, length in walked]
