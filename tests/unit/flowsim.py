"""The flows part (`nwc.ofapp.FlowsPart`) on a real weaver loop, talking to fake switches over
fake connections.

`FakeDatapath` stands where os-ken's `Datapath` stands: it takes the bytes the part would write
to a switch's socket, decodes them (os-ken has parsers only for the switch-to-controller side,
so controller messages are decoded here) and applies them to a `FakeSwitch` of a
`FakeNetwork`. Replies (barriers, errors, statistics) come back through the part's `on_*`
methods, from the thread that wrote, as os-ken delivers them from a connection's own thread.
Everything above the socket runs for real: the weaver, its loop, the part, the compiler and the
message sequences.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fakeoftable import FakeClock, FakeNetwork, FakeOFError
from netsim import TRIANGLE
from os_ken.ofproto import ofproto_parser, ofproto_protocol
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES
from nwc.lease import ManualClock
from nwc.ofapp import FlowsPart
from nwc.policy import Policy, load_policy
from nwc.store import Store
from nwc.topology import Topology, parse_topology_text
from nwc.weave import Weave
from nwc.weaver import Weaver, WeaverLoop

HEADER = struct.Struct("!BBHI")
ONF_ET_BUNDLE_ADD = 2301


class FakeSocket:
    """What the part may touch on a connection's socket: shutdown, and how long the peer has
    been silent (`GuardedSocket.idle_s`)."""

    def __init__(self, dp: FakeDatapath) -> None:
        self._dp = dp
        self.idle = 0.0
        self.certificate: bytes | None = None

    def idle_s(self) -> float:
        return self.idle

    def shutdown(self, how: int) -> None:
        self._dp.hang_up()

    def close(self) -> None:
        self._dp.hang_up()


class FakeDatapath(ofproto_protocol.ProtocolDesc):
    """One switch connection. `block` (an Event), when given, holds every write until set:
    a peer that stopped reading."""

    def __init__(self, dpid: int, network: FakeNetwork, name: str,
                 address: tuple[str, int] = ("100.64.255.1", 40000),
                 block: threading.Event | None = None) -> None:
        super().__init__(version=ofp.OFP_VERSION)
        self.id = dpid
        self.address = address
        self.network = network
        self.switch = network.switches[name]
        self.name = name
        self.socket = FakeSocket(self)
        self.block = block
        self.part: FlowsPart | None = None
        self.closed = threading.Event()
        self.on_close: list[Any] = []
        self.sent: list[tuple[int, int]] = []  # (message type, multipart type or 0)
        self.answer_stats = True
        self.lock = threading.Lock()
        self.is_active = True
        self._xid = 0

    # -- what os-ken's Datapath offers --------------------------------------------------------

    def set_xid(self, msg: Any) -> int:
        self._xid += 1
        msg.set_xid(self._xid)
        return self._xid

    def send_msg(self, msg: Any, close_socket: bool = False) -> bool:
        msg.serialize()
        return self.send(bytes(msg.buf))

    def send(self, buf: bytes, close_socket: bool = False) -> bool:
        if self.block is not None:
            self.block.wait()
        if self.closed.is_set():
            return False
        with self.lock:
            self._receive(bytes(buf))
        return True

    def close(self) -> None:
        self.hang_up()

    def hang_up(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.is_active = False
        for fn in self.on_close:
            fn(self)

    # -- the switch side ------------------------------------------------------------------------

    def _receive(self, buf: bytes) -> None:
        _version, msg_type, length, xid = HEADER.unpack_from(buf)
        assert length == len(buf), "one message per write"
        mp_type = struct.unpack_from("!H", buf, 8)[0] if msg_type == ofp.OFPT_MULTIPART_REQUEST \
            else 0
        self.sent.append((msg_type, mp_type))
        try:
            if msg_type == ofp.OFPT_BARRIER_REQUEST:
                if self.part is not None:
                    self.part.on_barrier(self, xid)
            elif msg_type == ofp.OFPT_MULTIPART_REQUEST:
                self._stats(buf, xid, mp_type)
            else:
                self.switch.apply(self._decode(buf))
        except FakeOFError as exc:
            if self.part is not None:
                self.part.on_error(self, SimpleNamespace(xid=xid, type=1, code=str(exc)))

    def _decode(self, buf: bytes) -> Any:
        _version, msg_type, length, _xid = HEADER.unpack_from(buf)
        if msg_type == ofp.OFPT_METER_MOD:
            command, flags, meter_id = struct.unpack_from("!HHI", buf, 8)
            bands = []
            offset = 16
            while offset < length:
                band_type, band_len, rate, burst = struct.unpack_from("!HHII", buf, offset)
                assert band_type == ofp.OFPMBT_DROP, band_type
                bands.append(parser.OFPMeterBandDrop(rate=rate, burst_size=burst))
                offset += band_len
            return parser.OFPMeterMod(self, command=command, flags=flags, meter_id=meter_id,
                                      bands=bands)
        if msg_type == ofp.OFPT_EXPERIMENTER:
            _exp, exp_type = struct.unpack_from("!II", buf, 8)
            if exp_type == ONF_ET_BUNDLE_ADD:
                bundle_id, flags = struct.unpack_from("!IxxH", buf, 16)
                inner_len = struct.unpack_from("!H", buf, 26)[0]
                inner = self._decode(buf[24:24 + inner_len])
                return parser.ONFBundleAddMsg(self, bundle_id, flags, inner, [])
        return ofproto_parser.msg(self, *ofproto_parser.header(buf), buf)

    def _stats(self, buf: bytes, xid: int, mp_type: int) -> None:
        if not self.answer_stats or self.part is None or mp_type == ofp.OFPMP_METER_CONFIG:
            return  # the meter list is FlowsApp's question; tests answer it themselves
        if mp_type == ofp.OFPMP_FLOW:
            cookie, mask = struct.unpack_from("!QQ", buf, 32)
            # The match as os-ken's OFPMatch.get gives it: an unmasked field's value.
            body = [SimpleNamespace(cookie=f.cookie, byte_count=f.bytes,
                                    packet_count=f.packets,
                                    match={k: v for k, (v, _mask) in f.match.items()})
                    for f in self.switch.flow_stats(cookie, mask)]
        elif mp_type == ofp.OFPMP_METER:
            (meter_id,) = struct.unpack_from("!I", buf, 16)
            body = [SimpleNamespace(meter_id=m.meter_id,
                                    band_stats=[SimpleNamespace(byte_band_count=m.bytes_dropped)])
                    for m in self.switch.meters.values()
                    if meter_id in (ofp.OFPM_ALL, m.meter_id)]
        else:
            raise AssertionError(f"multipart request of type {mp_type}")
        self.part.on_stats_reply(self, SimpleNamespace(xid=xid, flags=0, body=body))


def _start(weaver: Weaver, cert_names: str = "match") -> tuple[WeaverLoop, FlowsPart]:
    loop = WeaverLoop(weaver)
    loop.start()
    controller = SimpleNamespace(weaver=weaver, loop=loop, stats_sources=[])
    part = FlowsPart(controller, cert_names)
    loop.call(part.attach)
    return loop, part


@dataclass
class FlowsSim:
    """A weaver with the flows part attached, on its own loop, and a fake network."""

    policy: Policy
    topology: Topology
    weaver: Weaver
    clock: ManualClock
    fake_clock: FakeClock
    net: FakeNetwork
    loop: WeaverLoop
    part: FlowsPart
    state_dir: Path
    dps: dict[str, FakeDatapath] = field(default_factory=dict)

    @classmethod
    def build(cls, tmp_path: Path, topology_text: str = TRIANGLE,
              policy: Policy | None = None, cert_names: str = "match") -> FlowsSim:
        policy = policy or load_policy([SHIPPED_POLICIES])
        topology = parse_topology_text(topology_text, policy)
        clock = ManualClock()
        weaver = Weaver(policy=policy, topology=topology, store=Store(tmp_path), clock=clock)
        fake_clock = FakeClock()
        net = FakeNetwork(topology, policy, fake_clock)
        loop, part = _start(weaver, cert_names)
        return cls(policy, topology, weaver, clock, fake_clock, net, loop, part, tmp_path)

    def __enter__(self) -> FlowsSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for dp in self.dps.values():
            if dp.block is not None:
                dp.block.set()
        self.part.stop()
        self.loop.stop()
        self.weaver.store.close()

    def restart(self, policy: Policy | None = None, topology: Topology | None = None) -> None:
        """NWC stops and a new one starts on the same state directory, as `nwc run` does
        (recover, then attach the flows part), with `policy` or `topology` if given (files
        changed while NWC was down; the network stays as built). The switches keep their
        tables (fail_mode=secure) and are connected to the new controller only by
        `connect`."""
        # The restarted controller runs with the options the first one had.
        cert_names = "match" if self.part.check_cert_names else "any"
        self.close()
        self.dps.clear()
        self.weaver = Weaver(policy=policy or self.policy, topology=topology or self.topology,
                             store=Store(self.state_dir), clock=self.clock)
        self.weaver.recover(parts_to_attach=True)
        self.loop, self.part = _start(self.weaver, cert_names)
        self.loop.call(self.weaver.parts_attached)

    # -- switches -----------------------------------------------------------------------------

    def dpid(self, name: str) -> int:
        if name in self.topology.hosts:
            return self.topology.hosts[name].dpid
        return self.topology.switches[name].dpid

    def connect(self, name: str, *, address: tuple[str, int] = ("100.64.255.1", 40000),
                block: threading.Event | None = None, settle: bool = True,
                down: tuple[str, ...] = (), certificate: bytes | None = None) -> FakeDatapath:
        """A switch (or something claiming to be it) finishes its handshake; the ports named
        in `down` are link-down in its port description. `certificate` (DER): it connected
        over TLS with that certificate (`GuardedSocket.certificate`); None: plain TCP."""
        dp = FakeDatapath(self.dpid(name), self.net, name, address, block)
        if certificate is not None:
            dp.socket.certificate = certificate
        dp.part = self.part
        # As os-ken does: a closed connection ends in DEAD_DISPATCHER -> switch_gone.
        dp.on_close.append(lambda d: self.loop.post(self.part.switch_gone, d))
        if name in self.topology.switches:
            state = {n: True for n in self.topology.ports(name).values()}
        else:
            state = {n: p not in down for p, n in self.net.ports[name].items()}
        self.loop.call(self.part.switch_ready, dp, dict(self.net.ports[name]), state,
                       set(self.net.switches[name].meters))
        if name not in self.dps or self.dps[name].closed.is_set():
            self.dps[name] = dp
        if settle:
            self.settle()
        return dp

    def connect_all(self) -> None:
        for name in self.net.switches:
            self.connect(name, settle=False)
        self.settle()

    def settle(self) -> None:
        """Let every queued write reach its switch and every reply reach the weaver."""
        for _ in range(3):
            self.part.flush(timeout=10)
            self.loop.call(lambda: None)
        self.net.legs = {leg.slot: (leg.requester_host, leg.target_host)
                         for w in self.weaver.live.values() for leg in w.legs
                         if leg.slot is not None}

    # -- weaves and time ------------------------------------------------------------------------

    def weave(self, requester: str, target: str, mbps: float = 5, duration_s: int = 600,
              profile: str | None = None) -> Weave:
        result = self.loop.call(self.weaver.create,
                                WeaveRequest(requester, target, duration_s, mbps, profile))
        assert isinstance(result, Weave), result
        self.settle()
        return self.weaver.live.get(result.id, result)

    def advance(self, seconds: float) -> None:
        """Time passes for the controller and the switches alike."""
        self.loop.call(self.clock.advance, seconds)
        self.fake_clock.advance(seconds)

    def ping(self, src: str, dst: str) -> list[str]:
        dst_ip = str(self.topology.vms[dst].ip)
        return [d.vm for d in self.net.send(src, self.net.vm_ip_packet(src, dst_ip))]

    def reaches(self, src: str, dst: str) -> bool:
        return self.ping(src, dst) == [dst]
