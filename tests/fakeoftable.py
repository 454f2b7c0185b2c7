"""A fake OpenFlow 1.3 switch that really forwards, and a fake network of them built from a
topology (hosts' br-int plus fabric switches, wired as `Topology.ports()` says).

It takes the very os-ken messages the app would send: each one is serialised to bytes and
parsed back by os-ken first, so a message the wire cannot carry fails here too. It simulates
tables and goto, priorities (two overlapping flows at one priority are an error, as their
order is undefined on a real switch), masked matches with OVS's prerequisites, apply-actions
(output, set-field, Nicira reg_move, dec_ttl), write-metadata, meters (a token bucket per
meter against a fake clock: packets over the rate are dropped and counted; a modify restarts
the counters, as OVS 3.1 does), cookies (delete by cookie and mask, per-flow counters, kept
when an identical ADD replaces a flow), hard timeouts against the fake clock (restarted by
such an ADD), and ONF bundles (all or nothing; a meter mod inside a bundle fails it, as OVS
3.1 does).

The network carries the base overlay (VXLAN by tunnel id to a host's underlay address, arriving
with the sender's underlay address as the tunnel source; `forge_overlay` sends such VXLAN built by
hand on a host, as root there could, with any outer source; `underlay` sends any frame out of a
host's uplink) and
weave legs (port nwv<slot> between the leg's endpoint addresses) through the fabric switches'
own flows, and records which switches every tunnelled packet crossed.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from os_ken.ofproto import ofproto_parser, ofproto_protocol
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from nwc.pipeline import IVN_TUNNEL_OFPORT, LEG_OFPORT_BASE, OFPP_IN_PORT, gateway_mac
from nwc.policy import Policy
from nwc.topology import Topology

MAC_FIELDS = {"eth_src", "eth_dst", "arp_sha", "arp_tha"}
IP_FIELDS = {"ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa", "tun_ipv4_dst", "tun_ipv4_src"}
FIELD_BITS = {"eth_src": 48, "eth_dst": 48, "arp_sha": 48, "arp_tha": 48, "ipv4_src": 32,
              "ipv4_dst": 32, "arp_spa": 32, "arp_tpa": 32, "reg0": 32, "reg1": 32,
              "metadata": 64, "tunnel_id": 64}
# What a field needs matched before it may be matched (OVS refuses the flow otherwise).
PREREQUISITES: dict[str, dict[str, int]] = {
    "ipv4_src": {"eth_type": 0x0800}, "ipv4_dst": {"eth_type": 0x0800},
    "ip_proto": {"eth_type": 0x0800}, "ip_dscp": {"eth_type": 0x0800},
    "arp_op": {"eth_type": 0x0806}, "arp_spa": {"eth_type": 0x0806},
    "arp_tpa": {"eth_type": 0x0806}, "arp_sha": {"eth_type": 0x0806},
    "arp_tha": {"eth_type": 0x0806},
    "tcp_src": {"ip_proto": 6}, "tcp_dst": {"ip_proto": 6}, "tcp_flags": {"ip_proto": 6},
    "udp_src": {"ip_proto": 17}, "udp_dst": {"ip_proto": 17},
    "icmpv4_type": {"ip_proto": 1}, "icmpv4_code": {"ip_proto": 1},
}
ALL_ONES = 2**64 - 1


class FakeOFError(Exception):
    """What a real switch would answer with an OFPT_ERROR."""


def to_int(name: str, value: Any) -> int:
    if isinstance(value, int):
        return value
    if name in MAC_FIELDS:
        return int(value.replace(":", ""), 16)
    if name in IP_FIELDS:
        return int(ipaddress.IPv4Address(value))
    raise TypeError(f"{name}={value!r}")


def mac(text: str) -> int:
    return to_int("eth_src", text)


def ip(text: str) -> int:
    return to_int("ipv4_src", text)


def _datapath() -> Any:
    return ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)


def reparse(msg: Any) -> Any:
    """Serialise a message as the app would send it and parse it back with os-ken (os-ken has
    no parser for meter mods: those are only checked to serialise)."""
    msg.datapath = _datapath()
    if msg.xid is None:
        msg.set_xid(1)
    msg.serialize()
    if isinstance(msg, parser.OFPMeterMod):
        return msg
    buf = bytes(msg.buf)
    version, msg_type, msg_len, xid = ofproto_parser.header(buf)
    return ofproto_parser.msg(_datapath(), version, msg_type, msg_len, xid, buf)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeFlow:
    table: int
    priority: int
    match: dict[str, tuple[int, int]]  # field -> (value, mask)
    instructions: list[Any]
    cookie: int
    hard_timeout: int
    installed_at: float
    packets: int = 0
    bytes: int = 0

    def matches(self, packet: dict[str, int]) -> bool:
        for name, (value, mask) in self.match.items():
            if name not in packet or packet[name] & mask != value & mask:
                return False
        return True

    def overlaps(self, other: FakeFlow) -> bool:
        """Could one packet match both? (fields both match must agree under both masks)"""
        for name in self.match.keys() & other.match.keys():
            (v1, m1), (v2, m2) = self.match[name], other.match[name]
            common = m1 & m2
            if v1 & common != v2 & common:
                return False
        return True


@dataclass
class FakeMeter:
    meter_id: int
    kbps: int
    burst_kbits: int
    tokens_bits: float
    last: float
    packets_in: int = 0
    bytes_in: int = 0
    packets_dropped: int = 0
    bytes_dropped: int = 0

    def admit(self, size: int, now: float) -> bool:
        capacity = self.burst_kbits * 1000
        self.tokens_bits = min(capacity, self.tokens_bits + (now - self.last) * self.kbps * 1000)
        self.last = now
        self.packets_in += 1
        self.bytes_in += size
        if self.tokens_bits >= size * 8:
            self.tokens_bits -= size * 8
            return True
        self.packets_dropped += 1
        self.bytes_dropped += size
        return False


def _match_fields(match: Any) -> dict[str, tuple[int, int]]:
    out = {}
    for name, value in match.items():
        if isinstance(value, tuple):
            v, m = to_int(name, value[0]), to_int(name, value[1])
        else:
            v, m = to_int(name, value), ALL_ONES
        out[name] = (v & m, m)
    return out


def _check_prerequisites(fields: dict[str, tuple[int, int]]) -> None:
    for name in fields:
        for need, value in PREREQUISITES.get(name, {}).items():
            got = fields.get(need)
            if got is None or got[0] != value:
                raise FakeOFError(f"OFPBMC_BAD_PREREQ: {name} needs {need}={value:#x}")


@dataclass
class FakeSwitch:
    name: str
    clock: Callable[[], float]
    tables: dict[int, list[FakeFlow]] = field(default_factory=dict)
    meters: dict[int, FakeMeter] = field(default_factory=dict)
    _bundle: list[Any] | None = None

    # -- control plane ------------------------------------------------------------------

    def apply(self, msg: Any) -> None:
        """Apply one message as the switch would; FakeOFError is the switch's error reply."""
        if isinstance(msg, parser.ONFBundleCtrlMsg):
            self._bundle_ctrl(msg)
            return
        if isinstance(msg, parser.ONFBundleAddMsg):
            if self._bundle is None:
                raise FakeOFError("ONF_BFC_BAD_ID: no open bundle")
            self._bundle.append(msg.message)
            return
        msg = reparse(msg)
        if isinstance(msg, parser.OFPFlowMod):
            self._flow_mod(msg)
        elif isinstance(msg, parser.OFPMeterMod):
            self._meter_mod(msg)
        elif isinstance(msg, parser.OFPBarrierRequest):
            pass
        else:
            raise FakeOFError(f"unsupported message {type(msg).__name__}")

    def apply_all(self, msgs: Iterable[Any]) -> None:
        for msg in msgs:
            self.apply(msg)

    def _bundle_ctrl(self, msg: Any) -> None:
        if msg.type == ofp.ONF_BCT_OPEN_REQUEST:
            self._bundle = []
        elif msg.type == ofp.ONF_BCT_COMMIT_REQUEST:
            staged, self._bundle = self._bundle, None
            if staged is None:
                raise FakeOFError("ONF_BFC_BAD_ID: commit without open")
            saved = (copy.deepcopy(self.tables), copy.deepcopy(self.meters))
            try:
                for inner in staged:
                    if isinstance(inner, parser.OFPMeterMod):
                        raise FakeOFError("OFPBFC_MSG_UNSUP: meter mod inside a bundle")
                    self.apply(inner)
            except FakeOFError:
                self.tables, self.meters = saved  # the switch keeps what it had
                raise
        elif msg.type == ofp.ONF_BCT_DISCARD_REQUEST:
            self._bundle = None

    def _flow_mod(self, msg: Any) -> None:
        fields = _match_fields(msg.match)
        if msg.command == ofp.OFPFC_ADD:
            _check_prerequisites(fields)
            for inst in msg.instructions:
                if isinstance(inst, parser.OFPInstructionMeter) and \
                        inst.meter_id not in self.meters:
                    raise FakeOFError(f"OFPMMFC_UNKNOWN_METER: meter {inst.meter_id}")
                if isinstance(inst, parser.OFPInstructionGotoTable) and \
                        inst.table_id <= msg.table_id:
                    raise FakeOFError("OFPBIC_BAD_TABLE_ID: goto must go forward")
            table = self.tables.setdefault(msg.table_id, [])
            same = [f for f in table if f.priority == msg.priority and f.match == fields]
            table[:] = [f for f in table if f not in same]
            new = FakeFlow(msg.table_id, msg.priority, fields, list(msg.instructions),
                           msg.cookie, msg.hard_timeout, self.clock())
            # An identical ADD replaces the flow and restarts its timeouts; its counters
            # carry over unless OFPFF_RESET_COUNTS (as OVS 3.1 does).
            if same and not msg.flags & ofp.OFPFF_RESET_COUNTS:
                new.packets, new.bytes = same[0].packets, same[0].bytes
            table.append(new)
        elif msg.command in (ofp.OFPFC_DELETE, ofp.OFPFC_DELETE_STRICT):
            strict = msg.command == ofp.OFPFC_DELETE_STRICT
            for table_id, table in self.tables.items():
                if msg.table_id not in (ofp.OFPTT_ALL, table_id):
                    continue
                table[:] = [f for f in table if not self._selected(f, msg, fields, strict)]
        else:
            raise FakeOFError(f"unsupported flow mod command {msg.command}")

    @staticmethod
    def _selected(flow: FakeFlow, msg: Any, fields: dict[str, tuple[int, int]],
                  strict: bool) -> bool:
        if flow.cookie & msg.cookie_mask != msg.cookie & msg.cookie_mask:
            return False
        if strict:
            return flow.priority == msg.priority and flow.match == fields
        return all(flow.match.get(k) == v for k, v in fields.items())

    def _meter_mod(self, msg: Any) -> None:
        if msg.command == ofp.OFPMC_DELETE:
            if msg.meter_id == ofp.OFPM_ALL:
                self.meters.clear()
            self.meters.pop(msg.meter_id, None)
            # OVS deletes the flows that use a deleted meter.
            for table in self.tables.values():
                table[:] = [f for f in table if not any(
                    isinstance(i, parser.OFPInstructionMeter) and i.meter_id == msg.meter_id
                    for i in f.instructions)]
            return
        if msg.command == ofp.OFPMC_ADD and msg.meter_id in self.meters:
            raise FakeOFError(f"OFPMMFC_METER_EXISTS: meter {msg.meter_id}")
        if msg.command == ofp.OFPMC_MODIFY and msg.meter_id not in self.meters:
            raise FakeOFError(f"OFPMMFC_UNKNOWN_METER: meter {msg.meter_id}")
        (band,) = msg.bands
        if band.type != ofp.OFPMBT_DROP or not msg.flags & ofp.OFPMF_KBPS:
            raise FakeOFError("OFPMMFC_BAD_BAND: userspace OVS meters drop, in kbps")
        # A modified meter counts from 0 again, as OVS 3.1's userspace datapath does (seen:
        # packet_in_count 7 before an OFPMC_MODIFY, 0 after).
        self.meters[msg.meter_id] = FakeMeter(msg.meter_id, band.rate, band.burst_size,
                                              band.burst_size * 1000.0, self.clock())

    # -- queries --------------------------------------------------------------------------

    def flows(self) -> list[FakeFlow]:
        self._expire()
        return [f for t in sorted(self.tables) for f in self.tables[t]]

    def flow_stats(self, cookie: int, mask: int) -> list[FakeFlow]:
        return [f for f in self.flows() if f.cookie & mask == cookie & mask]

    def _expire(self) -> None:
        now = self.clock()
        for table in self.tables.values():
            table[:] = [f for f in table
                        if not f.hard_timeout or now < f.installed_at + f.hard_timeout]

    # -- data plane -----------------------------------------------------------------------

    def lookup(self, table_id: int, packet: dict[str, int]) -> FakeFlow | None:
        candidates = [f for f in self.tables.get(table_id, []) if f.matches(packet)]
        if not candidates:
            return None
        best = max(f.priority for f in candidates)
        top = [f for f in candidates if f.priority == best]
        if len(top) > 1:
            raise AssertionError(f"{self.name} table {table_id}: {len(top)} flows match at "
                                 f"priority {best}; a real switch picks any")
        return top[0]

    def process(self, packet: dict[str, int]) -> list[tuple[int, dict[str, int]]]:
        """Run a packet (with in_port set) through the tables; returns (port, packet) outputs.
        Output to the ingress port needs OFPP_IN_PORT, as on a real switch."""
        self._expire()
        pkt = dict(packet)
        pkt.setdefault("metadata", 0)
        outputs: list[tuple[int, dict[str, int]]] = []
        table_id: int | None = 0
        while table_id is not None:
            flow = self.lookup(table_id, pkt)
            if flow is None:
                return outputs  # table miss: drop
            flow.packets += 1
            flow.bytes += pkt.get("len", 64)
            table_id = None
            for inst in flow.instructions:
                if isinstance(inst, parser.OFPInstructionMeter):
                    if not self.meters[inst.meter_id].admit(pkt.get("len", 64), self.clock()):
                        return outputs
                elif isinstance(inst, parser.OFPInstructionActions):
                    if not self._actions(inst.actions, pkt, outputs):
                        return outputs
                elif isinstance(inst, parser.OFPInstructionWriteMetadata):
                    mask = inst.metadata_mask
                    pkt["metadata"] = (pkt["metadata"] & ~mask) | (inst.metadata & mask)
                elif isinstance(inst, parser.OFPInstructionGotoTable):
                    table_id = inst.table_id
        return outputs

    @staticmethod
    def _actions(actions: list[Any], pkt: dict[str, int],
                 outputs: list[tuple[int, dict[str, int]]]) -> bool:
        for action in actions:
            if isinstance(action, parser.OFPActionOutput):
                port = pkt["in_port"] if action.port == OFPP_IN_PORT else action.port
                if action.port != OFPP_IN_PORT and port == pkt["in_port"]:
                    continue
                outputs.append((port, dict(pkt)))
            elif isinstance(action, parser.OFPActionSetField):
                pkt[action.key] = to_int(action.key, action.value)
            elif isinstance(action, parser.NXActionRegMove):
                bits = (1 << action.n_bits) - 1
                value = (pkt.get(action.src_field, 0) >> action.src_ofs) & bits
                dst = pkt.get(action.dst_field, 0) & ~(bits << action.dst_ofs)
                pkt[action.dst_field] = dst | (value << action.dst_ofs)
            elif isinstance(action, parser.OFPActionDecNwTtl):
                if pkt.get("nw_ttl", 64) <= 1:
                    return False
                pkt["nw_ttl"] = pkt.get("nw_ttl", 64) - 1
            else:
                raise AssertionError(f"unsupported action {action!r}")
        return True


# -- a network of fake switches ------------------------------------------------------------------


@dataclass
class Delivery:
    vm: str
    packet: dict[str, int]
    fabric_paths: list[tuple[str, ...]]  # the switches each tunnelled hop crossed


class LoopError(AssertionError):
    pass


class FakeNetwork:
    """Every host's br-int and every fabric switch of a topology, wired as the lab wires them.
    VM ports get ofports 1, 2, ... per host in VM name order (like OVS, the app learns them)."""

    def __init__(self, topology: Topology, policy: Policy, clock: FakeClock | None = None) -> None:
        self.topology = topology
        self.policy = policy
        self.clock = clock or FakeClock()
        self.switches: dict[str, FakeSwitch] = {}
        self.ports: dict[str, dict[str, int]] = {}
        for host in sorted(topology.hosts):
            self.switches[host] = FakeSwitch(host, self.clock)
            vms = sorted((v for v in topology.vms.values() if v.host == host),
                         key=lambda v: v.name)
            self.ports[host] = {vm.port: i + 1 for i, vm in enumerate(vms)}
        for name in sorted(topology.switches):
            self.switches[name] = FakeSwitch(name, self.clock)
            self.ports[name] = {}
        self.legs: dict[int, tuple[str, str]] = {}  # slot -> (requester host, target host)

    def dpid_switch(self, dpid: int) -> FakeSwitch:
        for host in self.topology.hosts.values():
            if host.dpid == dpid:
                return self.switches[host.name]
        for sw in self.topology.switches.values():
            if sw.dpid == dpid:
                return self.switches[sw.name]
        raise KeyError(dpid)

    # -- packets a VM would send ------------------------------------------------------------

    def vm_ip_packet(self, vm_name: str, dst_ip: str, *, eth_dst: str | None = None,
                     proto: int = 1, **fields: int) -> dict[str, int]:
        """An IPv4 packet as the VM would send it: to its gateway's MAC unless told."""
        vm = self.topology.vms[vm_name]
        ivn = self.policy.ivns[vm.ivn]
        pkt = {"eth_src": mac(vm.mac), "eth_dst": mac(eth_dst or gateway_mac(ivn)),
               "eth_type": 0x0800, "ipv4_src": int(vm.ip), "ipv4_dst": ip(dst_ip),
               "ip_proto": proto, "ip_dscp": 0, "nw_ttl": 64, "len": 100}
        if proto == 1:
            pkt.setdefault("icmpv4_type", 8)
        pkt.update(fields)
        return pkt

    def vm_arp_request(self, vm_name: str, target_ip: str) -> dict[str, int]:
        vm = self.topology.vms[vm_name]
        return {"eth_src": mac(vm.mac), "eth_dst": 2**48 - 1, "eth_type": 0x0806, "arp_op": 1,
                "arp_sha": mac(vm.mac), "arp_spa": int(vm.ip), "arp_tha": 0,
                "arp_tpa": ip(target_ip), "len": 42}

    # -- forwarding ---------------------------------------------------------------------------

    def send(self, vm_name: str, packet: dict[str, int]) -> list[Delivery]:
        vm = self.topology.vms[vm_name]
        port = self.ports[vm.host][vm.port]
        return self._into_host(vm.host, port, packet, [])

    def _vm_at(self, host: str, port: int) -> str | None:
        for name, number in self.ports[host].items():
            if number == port:
                return next(v.name for v in self.topology.vms.values()
                            if v.host == host and v.port == name)
        return None

    def _into_host(self, host: str, in_port: int, packet: dict[str, int],
                   paths: list[tuple[str, ...]]) -> list[Delivery]:
        if len(paths) > 4:
            raise LoopError(f"packet tunnelled more than 4 times: {paths}")
        pkt = {k: v for k, v in packet.items() if k not in ("metadata", "reg0", "in_port")}
        pkt["in_port"] = in_port
        out: list[Delivery] = []
        for port, sent in self.switches[host].process(pkt):
            sent = {k: v for k, v in sent.items() if k not in ("metadata", "reg0")}
            vm = self._vm_at(host, port)
            if vm is not None:
                out.append(Delivery(vm, sent, paths))
            elif port == IVN_TUNNEL_OFPORT:
                out += self._overlay(host, sent, paths)
            elif port >= LEG_OFPORT_BASE:
                out += self._leg(host, port - LEG_OFPORT_BASE, sent, paths)
        return out

    def forge_overlay(self, host: str, to_host: str, tunnel_id: int,
                      inner: dict[str, int], outer_src: str | None = None) -> list[Delivery]:
        """VXLAN that root on `host` builds by hand (not its br-int's flows), with any VNI, to
        `to_host`'s underlay address, from `host`'s underlay address or any `outer_src` it
        writes: carried by the fabric's own flows, it reaches the far br-int's `ivn-vxlan`
        port like the host's own overlay traffic would."""
        packet = {**inner, "tunnel_id": tunnel_id,
                  "tun_ipv4_dst": int(self.topology.hosts[to_host].underlay_ip)}
        return self._overlay(host, packet, [], None if outer_src is None else ip(outer_src))

    def underlay(self, host: str, outer: dict[str, int]) -> tuple[str | None, tuple[str, ...]]:
        """Any frame root on `host` sends out of its uplink (IPv4, ARP, IPv6...): the host it
        reached through the fabric's flows (or None) and the nodes it crossed."""
        return self._through_fabric(host, outer)

    def _overlay(self, host: str, inner: dict[str, int],
                 paths: list[tuple[str, ...]], forged_src: int | None = None) -> list[Delivery]:
        src = int(self.topology.hosts[host].underlay_ip) if forged_src is None else forged_src
        dst = inner.pop("tun_ipv4_dst")
        arrived, path = self._through_fabric(host, {"eth_type": 0x0800, "ipv4_src": src,
                                                    "ipv4_dst": dst})
        if arrived is None or int(self.topology.hosts[arrived].underlay_ip) != dst:
            return []
        # OVS's tunnel port hands the outer source to the pipeline as tun_src: here, the
        # sending host's underlay address (OVS sends from it, the route's source), or the
        # forged one.
        inner["tun_ipv4_src"] = src
        return self._into_host(arrived, IVN_TUNNEL_OFPORT, inner, [*paths, path])

    def _leg(self, host: str, slot: int, inner: dict[str, int],
             paths: list[tuple[str, ...]]) -> list[Delivery]:
        if slot not in self.legs:
            return []  # no such tunnel device on this host
        requester, target = self.legs[slot]
        addresses = self.topology.weave_addresses(slot)
        if host == requester:
            src, dst, far = addresses.requester_endpoint, addresses.target_endpoint, target
        elif host == target:
            src, dst, far = addresses.target_endpoint, addresses.requester_endpoint, requester
        else:
            return []
        inner = {k: v for k, v in inner.items() if not k.startswith("tun")}
        arrived, path = self._through_fabric(host, {"eth_type": 0x0800, "ipv4_src": int(src),
                                                    "ipv4_dst": int(dst)})
        if arrived != far:
            return []
        return self._into_host(far, LEG_OFPORT_BASE + slot, inner, [*paths, path])

    def _through_fabric(self, host: str,
                        outer: dict[str, int]) -> tuple[str | None, tuple[str, ...]]:
        """Carry an underlay packet from a host's uplink along the fabric switches' flows;
        returns the host it reached (or None) and the nodes it crossed."""
        node = self.topology.hosts[host].switch
        prev = host
        path = [host]
        for _ in range(64):
            path.append(node)
            ports = self.topology.ports(node)
            pkt = {**outer, "in_port": ports[prev], "len": 150}
            outs = self.switches[node].process(pkt)
            if len(outs) != 1:
                return None, tuple(path)
            port = outs[0][0]
            nxt = next(n for n, number in ports.items() if number == port)
            if nxt in self.topology.hosts:
                path.append(nxt)
                return nxt, tuple(path)
            prev, node = node, nxt
        raise LoopError(f"underlay packet looped: {path[:12]}...")


def program_network(network: FakeNetwork, state: Any) -> None:
    """Make every fake switch equal to the desired state, the way the app resyncs a switch on
    connect (meters, one atomic bundle, stale meters); legs get their tunnel devices."""
    from nwc.ofmessages import sync_messages
    from nwc.pipeline import compile_switch

    network.legs = {leg.slot: (leg.requester_host, leg.target_host)
                    for w in state.weaves for leg in w.legs if leg.slot is not None}
    for name, switch in network.switches.items():
        dpid = (network.topology.hosts[name].dpid if name in network.topology.hosts
                else network.topology.switches[name].dpid)
        program = compile_switch(state, dpid, network.ports[name])
        switch.apply_all(sync_messages(None, program, set(switch.meters), bundle_id=1))
