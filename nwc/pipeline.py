"""The flow and meter compiler: desired state in, OpenFlow 1.3 flows and meters out, as plain data.

Pure: no sockets, no clock of its own. `compile_switch` takes the policy, the topology, the live
weaves, the time, the fabric links that are down, and what a switch reports (port name ->
ofport) and returns every flow and meter that switch must hold. The os-ken shell (`ofapp.py`)
turns them into messages with `flow_mod` / `meter_mod`; the unit tests run them through a fake
OpenFlow table (`tests/fakeoftable.py`) and assert forwarding. docs/design.md describes the
tables, the cookie scheme and the IVN base realisation.

Every flow has exactly one owner, written in its cookie: NWC's own scaffolding (table-miss
drops), an IVN's base network, the fabric's host routes and edge checks, or a weave
(`weave_cookie`). A weave's flows on every switch share the weave's cookie above the low byte,
so they are deleted and counted as a unit; the low byte says which direction and end a flow
serves (for statistics). A low byte with its top bit set (`ROLE_DROP`) marks a counting drop:
a flow that refuses what it matches, whose counters are exported as dropped traffic.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from nwc.policy import AclRule, Ivn, Policy, QosClass
from nwc.topology import Topology, Vm, link_key
from nwc.weave import Leg, Weave

# -- contracts with the hosts (docs/design.md) -------------------------------------------------

INTEGRATION_BRIDGE = "br-int"
# The IVN base overlay: one OVS native-tunnelling VXLAN port per br-int, remote_ip=flow,
# key=flow. Its ofport is fixed so flows compile before the port reports in.
IVN_TUNNEL_PORT = "ivn-vxlan"
IVN_TUNNEL_OFPORT = 9000
LEG_OFPORT_BASE = 10000  # the leg of slot s is port nwv<s>, ofport 10000 + s
OFPP_IN_PORT = 0xFFFFFFF8
MAX_HARD_TIMEOUT_S = 65535

ETH_IP = 0x0800
ETH_ARP = 0x0806
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_ECHO_REPLY, ICMP_ECHO = 0, 8
TCP_ACK = 0x010
ICMP_REPLY_TYPES = (0, 3, 11)  # echo reply, unreachable, time exceeded: answers, not requests

# -- tables of br-int --------------------------------------------------------------------------

T_CLASSIFY = 0  # which port: VM (anti-spoofing, IVN tag), base overlay (VNI), weave leg
T_L3_IN = 1  # ARP responder; IPv4 on to routing
T_ROUTE = 2  # by destination address: same IVN (MAC rewrite when routed), or into a weave
T_EGRESS = 3  # by destination MAC inside the IVN: local VM port or the base overlay
T_OVERLAY_IN = 4  # from the base overlay: local VMs only
T_WEAVE_IN = 5  # from a weave leg: the weave's own checks, MAC rewrite, local VM
HOST_TABLES = (T_CLASSIFY, T_L3_IN, T_ROUTE, T_EGRESS, T_OVERLAY_IN, T_WEAVE_IN)

# -- cookies -----------------------------------------------------------------------------------

KIND_INFRA, KIND_IVN, KIND_WEAVE, KIND_FABRIC = 0, 1, 2, 3
KIND_SHIFT = 56
OWNER_MASK = 0xFFFF_FFFF_FFFF_FF00  # ignores the role byte: selects every flow of one owner
ROLE_CONTROL = 0  # classification, ARP proxy, fabric steering
ROLE_SEND_RT, ROLE_SEND_TR = 1, 2  # into a leg, requester->target / target->requester
ROLE_RECV_RT, ROLE_RECV_TR = 3, 4  # out of a leg to a VM
ROLE_LOCAL_RT, ROLE_LOCAL_TR = 5, 6  # both ends on one host
# Flows whose counters say what a weave delivered, by direction.
DELIVERED_ROLES = {"requester_to_target": (ROLE_RECV_RT, ROLE_LOCAL_RT),
                   "target_to_requester": (ROLE_RECV_TR, ROLE_LOCAL_TR)}

# Counting drops, whatever their owner: the role byte's top bit, so that one flow-stats
# request (this bit as cookie and as mask) finds every one on a switch. The other roles stay
# below it. Each drop's role names why it refuses (`DROP_REASONS`, the metrics' `reason`).
ROLE_DROP = 0x80
DROP_FABRIC_EDGE = ROLE_DROP | 1  # a fabric port facing a host: a source not the host's
DROP_OVERLAY_SOURCE = ROLE_DROP | 2  # br-int: an IVN's VNI from a host without its VMs
DROP_VM_SPOOF = ROLE_DROP | 3  # br-int: a VM port, not the VM's own MAC and address
DROP_DEFAULT_DENY = ROLE_DROP | 4  # br-int route miss: no route nor weave for it
DROP_REASONS = {DROP_FABRIC_EDGE: "fabric_edge_source", DROP_OVERLAY_SOURCE: "overlay_source",
                DROP_VM_SPOOF: "vm_spoof", DROP_DEFAULT_DENY: "default_deny"}

INFRA_COOKIE = KIND_INFRA << KIND_SHIFT
FABRIC_COOKIE = KIND_FABRIC << KIND_SHIFT
DEFAULT_DENY_COOKIE = INFRA_COOKIE | DROP_DEFAULT_DENY


def ivn_cookie(vni: int, role: int = ROLE_CONTROL) -> int:
    return (KIND_IVN << KIND_SHIFT) | (vni << 8) | role


def weave_cookie(number: int, role: int = ROLE_CONTROL) -> int:
    """The cookie of a weave's flows, from its sequence number (wv-000042 -> 42)."""
    if not 0 <= number < 2**48:
        raise ValueError(f"weave number {number} does not fit a cookie")
    return (KIND_WEAVE << KIND_SHIFT) | (number << 8) | role


def cookie_owner(cookie: int) -> tuple[int, int]:
    """(kind, owner number): IVN VNI, weave number, or 0."""
    return cookie >> KIND_SHIFT, (cookie & ~(0xFF << KIND_SHIFT)) >> 8


# -- meters ------------------------------------------------------------------------------------

METER_SPACE = 2**17  # weave numbers share 2^18 meter ids (OVS userspace: max_meter 262144)
Direction = Literal["requester_to_target", "target_to_requester"]
DIRECTIONS: tuple[Direction, Direction] = ("requester_to_target", "target_to_requester")


def meter_id(number: int, direction: Direction) -> int:
    """Derived from the weave number, so a restarted controller finds its meters again."""
    return (number % METER_SPACE) * 2 + 1 + DIRECTIONS.index(direction)


# -- plain-data flows and meters -----------------------------------------------------------------

MatchValue = int | str | tuple[int | str, int | str]


@dataclass(frozen=True)
class Output:
    port: int


@dataclass(frozen=True)
class SetField:
    field: str  # os-ken OXM name (eth_dst, ip_dscp, tun_ipv4_dst, tunnel_id...)
    value: int | str


@dataclass(frozen=True)
class Move:
    """Copy one field into another (Nicira reg_move; OVS has it on OpenFlow 1.3)."""

    src: str
    dst: str
    bits: int


@dataclass(frozen=True)
class DecTtl:
    pass


Action = Output | SetField | Move | DecTtl


@dataclass(frozen=True)
class Flow:
    table: int
    priority: int
    match: tuple[tuple[str, MatchValue], ...]
    actions: tuple[Action, ...] = ()  # apply-actions, in order
    goto: int | None = None
    metadata: int | None = None  # write-metadata (all 64 bits)
    meter: int | None = None
    cookie: int = INFRA_COOKIE
    hard_timeout: int = 0


@dataclass(frozen=True)
class Meter:
    meter_id: int
    kbps: int
    burst_kbits: int
    cookie: int  # the owning weave's cookie (meters carry no cookie on the wire)


@dataclass
class Program:
    """Everything one switch must hold."""

    flows: list[Flow] = field(default_factory=list)
    meters: list[Meter] = field(default_factory=list)

    def owned_by(self, cookie: int) -> Program:
        owner = cookie & OWNER_MASK
        return Program([f for f in self.flows if f.cookie & OWNER_MASK == owner],
                       [m for m in self.meters if m.cookie & OWNER_MASK == owner])

    def extend(self, other: Program) -> None:
        self.flows.extend(other.flows)
        self.meters.extend(other.meters)


def match(**fields: MatchValue | None) -> tuple[tuple[str, MatchValue], ...]:
    return tuple(sorted((k, v) for k, v in fields.items() if v is not None))


def prefix_match(net: ipaddress.IPv4Network) -> MatchValue:
    if net.prefixlen == 32:
        return str(net.network_address)
    return (str(net.network_address), str(net.netmask))


class PipelineError(Exception):
    """The desired state cannot be compiled (e.g. two live weaves share meter ids)."""


# -- desired state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredState:
    policy: Policy
    topology: Topology
    weaves: tuple[Weave, ...]
    now: datetime
    down_links: frozenset[tuple[str, str]] = frozenset()


def gateway_mac(ivn: Ivn) -> str:
    """The distributed gateway's MAC, from the VNI: locally administered, never a VM's
    (derived VM MACs start 02:4e)."""
    v = ivn.vni
    return f"0a:4e:57:{v >> 16 & 0xFF:02x}:{v >> 8 & 0xFF:02x}:{v & 0xFF:02x}"


def leg_ofport(slot: int) -> int:
    return LEG_OFPORT_BASE + slot


def leg_port_name(slot: int) -> str:
    return f"nwv{slot}"


def lease_remaining_s(weave: Weave, now: datetime) -> int:
    """The backstop hard timeout: the lease's remaining whole seconds, at most 65535."""
    return min(MAX_HARD_TIMEOUT_S, math.ceil((weave.expires_at - now).total_seconds()))


# -- which switch is what ---------------------------------------------------------------------


def switch_name(topology: Topology, dpid: int) -> tuple[Literal["host", "fabric"], str] | None:
    for host in topology.hosts.values():
        if host.dpid == dpid:
            return "host", host.name
    for switch in topology.switches.values():
        if switch.dpid == dpid:
            return "fabric", switch.name
    return None


def weave_switches(topology: Topology, weave: Weave) -> set[int]:
    """Datapath ids that hold flows of this weave: both hosts of every leg and every fabric
    switch on a leg's path."""
    out = set()
    for leg in weave.legs:
        for node in leg.path:
            if node in topology.hosts:
                out.add(topology.hosts[node].dpid)
            elif node in topology.switches:
                out.add(topology.switches[node].dpid)
        for host in (leg.requester_host, leg.target_host):
            # A weave recovered after its host left the topology is torn down all the same
            # (nothing can be sent to, or waited for from, a switch NWC no longer knows).
            if host in topology.hosts:
                out.add(topology.hosts[host].dpid)
    return out


def compile_switch(state: DesiredState, dpid: int, ports: Mapping[str, int]) -> Program:
    """Every flow and meter switch `dpid` must hold."""
    what = switch_name(state.topology, dpid)
    if what is None:
        return Program()
    program = compile_base(state, dpid, ports)
    check_meter_ids(state.weaves)
    for weave in state.weaves:
        program.extend(compile_weave(state, weave, dpid, ports))
    return program


def compile_base(state: DesiredState, dpid: int, ports: Mapping[str, int]) -> Program:
    what = switch_name(state.topology, dpid)
    if what is None:
        return Program()
    kind, name = what
    if kind == "host":
        return host_base(state.policy, state.topology, name, ports)
    return fabric_base(state.topology, name, state.down_links)


def compile_weave(state: DesiredState, weave: Weave, dpid: int,
                  ports: Mapping[str, int]) -> Program:
    what = switch_name(state.topology, dpid)
    if what is None:
        return Program()
    kind, name = what
    remaining = lease_remaining_s(weave, state.now)
    if remaining <= 0:
        return Program()  # the lease is over; the weaver's timer is about to end it
    if kind == "host":
        return host_weave(state.policy, state.topology, weave, name, ports, remaining)
    return fabric_weave(state.topology, weave, name, remaining)


def meter_collisions(weaves: Iterable[Weave]) -> dict[str, Weave]:
    """Weaves that cannot have their meters because another weave's number maps to the
    same meter ids (numbers METER_SPACE apart): refused weave id -> the weave that keeps them
    (the lowest number, i.e. the oldest)."""
    ordered = sorted(weaves, key=lambda w: (w.number, w.id))
    owner: dict[int, Weave] = {}
    for weave in ordered:
        owner.setdefault(meter_id(weave.number, DIRECTIONS[0]), weave)
    return {w.id: owner[meter_id(w.number, DIRECTIONS[0])] for w in ordered
            if owner[meter_id(w.number, DIRECTIONS[0])].id != w.id}


def check_meter_ids(weaves: Iterable[Weave]) -> None:
    collisions = meter_collisions(weaves)
    if collisions:
        refused, keeper = min(collisions.items())
        raise PipelineError(f"weaves {keeper.id} and {refused} map to the same meter ids; "
                            f"their numbers are {METER_SPACE} apart")


# -- IVN base on a host's br-int ---------------------------------------------------------------


def arp_responder(answer_mac: str, answer_ip: str | None) -> tuple[Action, ...]:
    """Turn an ARP request into the reply for `answer_ip` (None: whatever address was asked
    for, for proxy ARP over a prefix) and send it back where it came from. No ARP broadcast
    ever leaves the host: NWC knows every address a VM may ask for."""
    head: tuple[Action, ...] = (Move("eth_src", "eth_dst", 48), SetField("eth_src", answer_mac),
                                SetField("arp_op", 2), Move("arp_sha", "arp_tha", 48))
    if answer_ip is None:
        swap: tuple[Action, ...] = (Move("arp_tpa", "reg0", 32), Move("arp_spa", "arp_tpa", 32),
                                    Move("reg0", "arp_spa", 32))
    else:
        swap = (Move("arp_spa", "arp_tpa", 32), SetField("arp_spa", answer_ip))
    return (*head, *swap, SetField("arp_sha", answer_mac), Output(OFPP_IN_PORT))


def echo_responder(gateway_mac_: str, gateway_ip: str) -> tuple[Action, ...]:
    """Turn an ICMP echo request to the gateway into its reply and send it back, as a router
    would: `ping <gateway>` is the first thing an operator tries from a VM. OVS adjusts the
    IPv4 and ICMP checksums for the rewritten fields."""
    return (Move("eth_src", "eth_dst", 48), SetField("eth_src", gateway_mac_),
            Move("ipv4_src", "ipv4_dst", 32), SetField("ipv4_src", gateway_ip),
            SetField("icmpv4_type", ICMP_ECHO_REPLY), Output(OFPP_IN_PORT))


def overlay_sources(topology: Topology, ivn: Ivn, host: str, members: Sequence[Vm]) -> list[Flow]:
    """Which base-overlay packets of `ivn` a host's br-int takes: the IVN's VNI from the
    underlay address of another host with VMs of the IVN (OVS's `tun_src`: the outer source,
    which OVS sends from), nothing else. `ivn-vxlan` takes VXLAN from anyone (remote_ip=flow)
    and the IVN VXLAN is cleartext on the underlay, so the VNI alone would let root on any
    compute host inject into any IVN. The rest with the IVN's VNI meets a drop of the IVN's
    own, whose counter says how much was refused."""
    cookie = ivn_cookie(ivn.vni)
    senders = sorted({topology.hosts[vm.host].underlay_ip for vm in members if vm.host != host})
    flows = [Flow(T_CLASSIFY, 200, match(in_port=IVN_TUNNEL_OFPORT, tunnel_id=ivn.vni,
                                         tun_ipv4_src=str(ip)),
                  goto=T_OVERLAY_IN, metadata=ivn.vni, cookie=cookie) for ip in senders]
    flows.append(Flow(T_CLASSIFY, 100, match(in_port=IVN_TUNNEL_OFPORT, tunnel_id=ivn.vni),
                      cookie=ivn_cookie(ivn.vni, DROP_OVERLAY_SOURCE)))
    return flows


def host_base(policy: Policy, topology: Topology, host: str,
              ports: Mapping[str, int]) -> Program:
    # Table misses drop. Route's counts what no route of the VM's IVN nor any weave took:
    # the default deny between IVNs.
    flows: list[Flow] = [Flow(t, 0, (), cookie=DEFAULT_DENY_COOKIE if t == T_ROUTE
                              else INFRA_COOKIE) for t in HOST_TABLES]
    flows.append(Flow(T_L3_IN, 100, match(eth_type=ETH_IP), goto=T_ROUTE))
    local = sorted((vm for vm in topology.vms.values() if vm.host == host), key=lambda v: v.name)
    ivns = sorted({vm.ivn for vm in local})
    for ivn_name in ivns:
        ivn = policy.ivns[ivn_name]
        cookie = ivn_cookie(ivn.vni)
        gw_mac = gateway_mac(ivn)
        members = sorted((vm for vm in topology.vms.values() if vm.ivn == ivn_name),
                         key=lambda v: v.name)
        flows += overlay_sources(topology, ivn, host, members)
        flows.append(Flow(T_L3_IN, 300, match(metadata=ivn.vni, eth_type=ETH_ARP, arp_op=1,
                                              arp_tpa=str(ivn.gateway)),
                          arp_responder(gw_mac, str(ivn.gateway)), cookie=cookie))
        flows.append(Flow(T_L3_IN, 300, match(metadata=ivn.vni, eth_type=ETH_IP,
                                              ip_proto=IPPROTO_ICMP, icmpv4_type=ICMP_ECHO,
                                              ipv4_dst=str(ivn.gateway)),
                          echo_responder(gw_mac, str(ivn.gateway)), cookie=cookie))
        for vm in members:
            ip = str(vm.ip)
            flows.append(Flow(T_L3_IN, 300, match(metadata=ivn.vni, eth_type=ETH_ARP, arp_op=1,
                                                  arp_tpa=ip),
                              arp_responder(vm.mac, ip), cookie=cookie))
            # Routed (sent to the gateway MAC): rewrite like a router would.
            flows.append(Flow(T_ROUTE, 200, match(metadata=ivn.vni, eth_type=ETH_IP,
                                                  eth_dst=gw_mac, ipv4_dst=ip),
                              (SetField("eth_src", gw_mac), SetField("eth_dst", vm.mac),
                               DecTtl()), goto=T_EGRESS, cookie=cookie))
            # Switched (same subnet, the VM ARPed for its peer).
            flows.append(Flow(T_ROUTE, 200, match(metadata=ivn.vni, eth_type=ETH_IP,
                                                  eth_dst=vm.mac, ipv4_dst=ip),
                              goto=T_EGRESS, cookie=cookie))
            if vm.host == host:
                port = ports.get(vm.port)
                if port is None or port < 0:
                    continue  # not plugged in yet: its flows come with its port status
                flows.append(Flow(T_EGRESS, 200, match(metadata=ivn.vni, eth_dst=vm.mac),
                                  (Output(port),), cookie=cookie))
                flows.append(Flow(T_OVERLAY_IN, 200, match(metadata=ivn.vni, eth_dst=vm.mac),
                                  (Output(port),), cookie=cookie))
            else:
                remote_ip = str(topology.hosts[vm.host].underlay_ip)
                flows.append(Flow(T_EGRESS, 200, match(metadata=ivn.vni, eth_dst=vm.mac),
                                  (SetField("tun_ipv4_dst", remote_ip),
                                   SetField("tunnel_id", ivn.vni), Output(IVN_TUNNEL_OFPORT)),
                                  cookie=cookie))
        for vm in local:
            if vm.ivn != ivn_name:
                continue
            port = ports.get(vm.port)
            if port is None or port < 0:
                continue
            # Anti-spoofing: only the VM's own MAC and IP get a tag; the rest is dropped.
            flows.append(Flow(T_CLASSIFY, 100, match(in_port=port),
                              cookie=ivn_cookie(ivn.vni, DROP_VM_SPOOF)))
            flows.append(Flow(T_CLASSIFY, 200, match(in_port=port, eth_src=vm.mac,
                                                     eth_type=ETH_IP, ipv4_src=str(vm.ip)),
                              goto=T_L3_IN, metadata=ivn.vni, cookie=cookie))
            flows.append(Flow(T_CLASSIFY, 200, match(in_port=port, eth_src=vm.mac,
                                                     eth_type=ETH_ARP, arp_spa=str(vm.ip),
                                                     arp_sha=vm.mac),
                              goto=T_L3_IN, metadata=ivn.vni, cookie=cookie))
    return Program(flows)


# -- ACL: stateless, replies recognised by their shape ------------------------------------------

Side = Literal["requester", "target"]


def port_masks(lo: int, hi: int) -> list[MatchValue]:
    """An inclusive port range as the fewest value/mask pairs."""
    out: list[MatchValue] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append(lo if size == 1 else (lo, 0xFFFF & ~(size - 1)))
        lo += size
    return out


def _ports(rule: AclRule) -> list[MatchValue | None]:
    if not rule.ports:
        return [None]
    return [m for lo, hi in rule.ports for m in port_masks(lo, hi)]


def acl_matches(rules: Sequence[AclRule], sender: Side) -> list[dict[str, MatchValue]]:
    """Match fields for packets sent by `sender`'s side across the weave that the ACL allows.
    A rule lets its initiator open flows (requests) and lets answers come back (replies):
    TCP segments with ACK set from the allowed port, UDP from the allowed port, ICMP echo
    replies and errors. An empty dict means everything."""
    receiver: Side = "target" if sender == "requester" else "requester"
    out: list[dict[str, MatchValue]] = []
    for rule in rules:
        if rule.initiator in (sender, "either"):  # requests
            if rule.protocol == "any":
                return [{}]
            proto = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP}[rule.protocol]
            for port in _ports(rule):
                m: dict[str, MatchValue] = {"ip_proto": proto}
                if port is not None:
                    m[f"{rule.protocol}_dst"] = port
                out.append(m)
        if rule.initiator in (receiver, "either"):  # replies
            protocols = ("tcp", "udp", "icmp") if rule.protocol == "any" else (rule.protocol,)
            for proto_name in protocols:
                if proto_name == "icmp":
                    out += [{"ip_proto": IPPROTO_ICMP, "icmpv4_type": t}
                            for t in ICMP_REPLY_TYPES]
                    continue
                for port in _ports(rule) if rule.protocol != "any" else [None]:
                    m = {"ip_proto": IPPROTO_TCP if proto_name == "tcp" else IPPROTO_UDP}
                    if port is not None:
                        m[f"{proto_name}_src"] = port
                    if proto_name == "tcp":
                        m["tcp_flags"] = (TCP_ACK, TCP_ACK)
                    out.append(m)
    return _without_subsumed(out)


def _without_subsumed(matches: list[dict[str, MatchValue]]) -> list[dict[str, MatchValue]]:
    """Drop duplicates and matches implied by a broader one, so no two flows of one weave
    overlap at the same priority."""
    unique: list[dict[str, MatchValue]] = []
    for m in matches:
        if m not in unique:
            unique.append(m)
    keep = []
    for m in unique:
        broader = [o for o in unique if o is not m and o.items() <= m.items() and o != m]
        if not broader:
            keep.append(m)
    return keep


# -- weave splice on a host's br-int -----------------------------------------------------------


def _members(topology: Topology, ivn: str, prefixes: Sequence[ipaddress.IPv4Network],
             host: str) -> list[Vm]:
    return sorted((vm for vm in topology.vms.values()
                   if vm.ivn == ivn and vm.host == host and any(vm.ip in p for p in prefixes)),
                  key=lambda v: v.name)


@dataclass(frozen=True)
class _DirectionPlan:
    direction: Direction
    sender: Side
    src_ivn: Ivn
    dst_ivn: Ivn
    src_prefixes: tuple[ipaddress.IPv4Network, ...]
    dst_prefixes: tuple[ipaddress.IPv4Network, ...]
    acl: list[dict[str, MatchValue]]
    qos: QosClass
    roles: tuple[int, int, int]  # send, receive, local


def _directions(policy: Policy, weave: Weave) -> tuple[_DirectionPlan, _DirectionPlan]:
    requester, target = policy.ivns[weave.requester], policy.ivns[weave.target]
    rules = policy.profiles[weave.profile].acl
    return (
        _DirectionPlan("requester_to_target", "requester", requester, target,
                       weave.requester_prefixes, weave.target_prefixes,
                       acl_matches(rules, "requester"),
                       policy.qos_classes[requester.weaving.qos_class],
                       (ROLE_SEND_RT, ROLE_RECV_RT, ROLE_LOCAL_RT)),
        _DirectionPlan("target_to_requester", "target", target, requester,
                       weave.target_prefixes, weave.requester_prefixes,
                       acl_matches(rules, "target"),
                       policy.qos_classes[target.weaving.qos_class],
                       (ROLE_SEND_TR, ROLE_RECV_TR, ROLE_LOCAL_TR)))


def _sender_host(leg: Leg, d: _DirectionPlan) -> str:
    return leg.requester_host if d.sender == "requester" else leg.target_host


def _receiver_host(leg: Leg, d: _DirectionPlan) -> str:
    return leg.target_host if d.sender == "requester" else leg.requester_host


WEAVE_PRIORITY = 400


def host_weave(policy: Policy, topology: Topology, weave: Weave, host: str,
               ports: Mapping[str, int], hard_timeout: int) -> Program:
    legs = [leg for leg in weave.legs if host in (leg.requester_host, leg.target_host)]
    if not legs:
        return Program()
    n = weave.number
    flows: list[Flow] = []
    meters: list[Meter] = []
    plans = _directions(policy, weave)

    def flow(table: int, m: dict[str, MatchValue], actions: tuple[Action, ...] = (),
             role: int = ROLE_CONTROL, meter: int | None = None,
             goto: int | None = None) -> Flow:
        return Flow(table, WEAVE_PRIORITY if table != T_L3_IN else 250, match(**m), actions,
                    goto=goto, meter=meter, cookie=weave_cookie(n, role),
                    hard_timeout=hard_timeout)

    for d in plans:
        rate = weave.kbps * len(legs)  # one meter per direction per host, shared by its legs
        meters.append(Meter(meter_id(n, d.direction), rate, d.qos.burst_kbits(rate),
                            weave_cookie(n)))
        # Proxy ARP: a VM whose netmask covers the partner's prefix asks for the partner's
        # addresses directly; the gateway answers, so no VM configuration changes.
        if any(_sender_host(leg, d) == host for leg in legs) and \
                _members(topology, d.src_ivn.name, d.src_prefixes, host):
            for net in d.dst_prefixes:
                flows.append(flow(T_L3_IN, {"metadata": d.src_ivn.vni, "eth_type": ETH_ARP,
                                            "arp_op": 1, "arp_tpa": prefix_match(net)},
                                  arp_responder(gateway_mac(d.src_ivn), None)))

    for leg in legs:
        for d in plans:
            send_role, recv_role, local_role = d.roles
            meter = meter_id(n, d.direction)
            if leg.local:
                for dst in _members(topology, d.dst_ivn.name, d.dst_prefixes, host):
                    port = ports.get(dst.port)
                    if port is None or port < 0:
                        continue
                    for src_net, acl in itertools.product(d.src_prefixes, d.acl):
                        flows.append(flow(
                            T_ROUTE, {"metadata": d.src_ivn.vni, "eth_type": ETH_IP,
                                      "ipv4_src": prefix_match(src_net),
                                      "ipv4_dst": str(dst.ip), **acl},
                            (SetField("ip_dscp", d.qos.dscp),
                             SetField("eth_src", gateway_mac(d.dst_ivn)),
                             SetField("eth_dst", dst.mac), DecTtl(), Output(port)),
                            role=local_role, meter=meter))
                continue
            assert leg.slot is not None
            leg_port = leg_ofport(leg.slot)
            if _sender_host(leg, d) == host:
                far = _receiver_host(leg, d)
                for dst in _members(topology, d.dst_ivn.name, d.dst_prefixes, far):
                    for src_net, acl in itertools.product(d.src_prefixes, d.acl):
                        flows.append(flow(
                            T_ROUTE, {"metadata": d.src_ivn.vni, "eth_type": ETH_IP,
                                      "ipv4_src": prefix_match(src_net),
                                      "ipv4_dst": str(dst.ip), **acl},
                            (SetField("ip_dscp", d.qos.dscp), Output(leg_port)),
                            role=send_role, meter=meter))
            if _receiver_host(leg, d) == host:
                for dst in _members(topology, d.dst_ivn.name, d.dst_prefixes, host):
                    port = ports.get(dst.port)
                    if port is None or port < 0:
                        continue
                    for src_net, acl in itertools.product(d.src_prefixes, d.acl):
                        flows.append(flow(
                            T_WEAVE_IN, {"in_port": leg_port, "eth_type": ETH_IP,
                                         "ipv4_src": prefix_match(src_net),
                                         "ipv4_dst": str(dst.ip), **acl},
                            (SetField("eth_src", gateway_mac(d.dst_ivn)),
                             SetField("eth_dst", dst.mac), DecTtl(), Output(port)),
                            role=recv_role, meter=meter))
        if not leg.local:
            assert leg.slot is not None
            flows.append(flow(T_CLASSIFY, {"in_port": leg_ofport(leg.slot)}, goto=T_WEAVE_IN))
    return Program(_unique(flows), meters)


def _unique(flows: list[Flow]) -> list[Flow]:
    seen: set[tuple[int, int, Any]] = set()
    out = []
    for f in flows:
        key = (f.table, f.priority, f.match)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


# -- provider fabric ---------------------------------------------------------------------------

# Tables of a fabric switch. Edge first: routing is by destination only, so without it a host
# could send with any source address (another host's underlay address, a leg endpoint of a
# weave it is no end of) and whatever trusts that address downstream (br-int's tun_src check,
# IKE peers by address) would take it.
F_EDGE = 0  # by in_port: a host's port passes only the addresses that host may use
F_ROUTE = 1  # by destination address: host routes, leg steering
FABRIC_TABLES = (F_EDGE, F_ROUTE)

EDGE_PASS_PRIORITY = 100  # a fabric-to-fabric port, or a host port with a permitted source
EDGE_DROP_PRIORITY = 10  # the rest of a host port: dropped by a flow of its own, which counts
HOST_ROUTE_PRIORITY = 100
LEG_ROUTE_PRIORITY = 200
# Its own role byte, so `dump-flows cookie=...` shows exactly the refusals.
FABRIC_EDGE_DROP_COOKIE = FABRIC_COOKIE | DROP_FABRIC_EDGE


def host_route_next_hops(topology: Topology,
                         down: frozenset[tuple[str, str]]) -> dict[str, dict[str, str]]:
    """For each host, each switch's next hop towards it: a breadth-first tree grown from the
    host over links that are up, neighbours in name order (the same tree whoever sends, so a
    loop in the graph never loops a packet). Hosts are never transit."""
    adjacency: dict[str, list[str]] = {n: [] for n in (*topology.switches, *topology.hosts)}
    for link in topology.links:
        if link.key in down:
            continue
        adjacency[link.a].append(link.b)
        adjacency[link.b].append(link.a)
    trees: dict[str, dict[str, str]] = {}
    for host in sorted(topology.hosts):
        parent: dict[str, str] = {}
        queue = deque([host])
        seen = {host}
        while queue:
            node = queue.popleft()
            if node != host and node in topology.hosts:
                continue
            for nb in sorted(adjacency[node]):
                if nb in seen or nb in topology.hosts:
                    continue
                seen.add(nb)
                parent[nb] = node
                queue.append(nb)
        trees[host] = parent
    return trees


def edge_permits(in_port: int, address: str, cookie: int, hard_timeout: int = 0) -> list[Flow]:
    """A host port may send IPv4 from `address` and ARP that claims it (arp_spa), on to routing."""
    return [Flow(F_EDGE, EDGE_PASS_PRIORITY, match(in_port=in_port, eth_type=ETH_IP,
                                                   ipv4_src=address),
                 goto=F_ROUTE, cookie=cookie, hard_timeout=hard_timeout),
            Flow(F_EDGE, EDGE_PASS_PRIORITY, match(in_port=in_port, eth_type=ETH_ARP,
                                                   arp_spa=address),
                 goto=F_ROUTE, cookie=cookie, hard_timeout=hard_timeout)]


def fabric_base(topology: Topology, switch: str,
                down: frozenset[tuple[str, str]] = frozenset()) -> Program:
    ports = topology.ports(switch)
    flows = [Flow(F_EDGE, 0, ()), Flow(F_ROUTE, 0, ())]  # table misses: drop
    for neighbour, port in sorted(ports.items()):
        host = topology.hosts.get(neighbour)
        if host is None:
            # Fabric-to-fabric: every switch checks its own hosts, so what comes from another
            # switch was checked where it entered.
            flows.append(Flow(F_EDGE, EDGE_PASS_PRIORITY, match(in_port=port), goto=F_ROUTE,
                              cookie=FABRIC_COOKIE))
            continue
        # The host's underlay address; its legs' endpoint addresses come with each weave's
        # flows (fabric_weave), so they pass exactly while the weave's routes exist. IPv6
        # and anything else from the host's port (ARP probes from 0.0.0.0 too) is dropped.
        flows += edge_permits(port, str(host.underlay_ip), FABRIC_COOKIE)
        flows.append(Flow(F_EDGE, EDGE_DROP_PRIORITY, match(in_port=port),
                          cookie=FABRIC_EDGE_DROP_COOKIE))
    for host, parents in host_route_next_hops(topology, down).items():
        nxt = parents.get(switch)
        if nxt is None:
            continue
        out = (Output(ports[nxt]),)
        ip = str(topology.hosts[host].underlay_ip)
        flows.append(Flow(F_ROUTE, HOST_ROUTE_PRIORITY, match(eth_type=ETH_IP, ipv4_dst=ip),
                          out, cookie=FABRIC_COOKIE))
        flows.append(Flow(F_ROUTE, HOST_ROUTE_PRIORITY, match(eth_type=ETH_ARP, arp_tpa=ip),
                          out, cookie=FABRIC_COOKIE))
    return Program(flows)


def fabric_weave(topology: Topology, weave: Weave, switch: str, hard_timeout: int) -> Program:
    """Each leg's endpoint addresses follow the leg's reserved path (both directions), and
    the switch a leg's host hangs off lets that host send from its end's endpoint address."""
    ports = topology.ports(switch)
    flows = []
    cookie = weave_cookie(weave.number)
    for leg in weave.legs:
        if leg.slot is None or switch not in leg.path:
            continue
        addresses = topology.weave_addresses(leg.slot)
        i = leg.path.index(switch)
        towards = ((str(addresses.target_endpoint), leg.path[i + 1]),
                   (str(addresses.requester_endpoint), leg.path[i - 1]))
        for ip, nxt in towards:
            out = (Output(ports[nxt]),)
            flows.append(Flow(F_ROUTE, LEG_ROUTE_PRIORITY, match(eth_type=ETH_IP, ipv4_dst=ip),
                              out, cookie=cookie, hard_timeout=hard_timeout))
            flows.append(Flow(F_ROUTE, LEG_ROUTE_PRIORITY, match(eth_type=ETH_ARP, arp_tpa=ip),
                              out, cookie=cookie, hard_timeout=hard_timeout))
            # An endpoint is routed towards the host that owns it: where that next hop is the
            # host itself, this is its edge switch, and the host may send from it.
            if nxt in topology.hosts:
                flows += edge_permits(ports[nxt], ip, cookie, hard_timeout)
    return Program(flows)


def fabric_link_of_port(topology: Topology, switch: str, port_no: int) -> tuple[str, str] | None:
    """The fabric link behind a port of a fabric switch (its neighbour may be a host)."""
    for neighbour, number in topology.ports(switch).items():
        if number == port_no:
            return link_key(switch, neighbour)
    return None


# -- counting drops, as metrics ----------------------------------------------------------------


# Which kind of owner each counting drop has: a cookie with the drop bit set and another
# owner kind is not one of NWC's drops.
_DROP_OWNER_KINDS = {DROP_FABRIC_EDGE: KIND_FABRIC, DROP_OVERLAY_SOURCE: KIND_IVN,
                     DROP_VM_SPOOF: KIND_IVN, DROP_DEFAULT_DENY: KIND_INFRA}


@dataclass(frozen=True, order=True)
class DropLabels:
    """What a counting drop refused: its reason, the IVN it guards and the port it watches
    ("" where the drop has none). Every value comes from the policy and the topology, so
    the series a switch can have are bounded by them, never by traffic."""

    reason: str
    ivn: str = ""
    port: str = ""


@dataclass(frozen=True)
class DroppedTraffic:
    """What the counting drops of one switch with these labels refused since NWC started
    counting them (carried across re-installs: never lower than an earlier reading)."""

    switch: str
    labels: DropLabels
    bytes: int
    packets: int


def drop_labels(policy: Policy, topology: Topology, switch: str, ports: Mapping[str, int],
                cookie: int, in_port: int | None) -> DropLabels | None:
    """The labels of a counting drop found on `switch` (a host's br-int by the host's name,
    or a fabric switch; `ports`: the port numbers it reported, by name) by its cookie and the
    `in_port` it matches. The port is named as the topology names it: on br-int the VM's
    port, on a fabric switch the compute host the port leads to (the one that sent what was
    refused). None: not a counting drop, or one of an IVN the policy no longer has (removed
    by a reload, until the resync that follows it)."""
    role = cookie & 0xFF
    reason = DROP_REASONS.get(role)
    kind, owner = cookie_owner(cookie)
    if reason is None or _DROP_OWNER_KINDS[role] != kind:
        return None  # not NWC's (flows someone else put on the bridge may set the bit)
    ivn = ""
    if kind == KIND_IVN:
        ivn = next((i.name for i in policy.ivns.values() if i.vni == owner), "")
        if not ivn:
            return None
    port = ""
    if in_port is not None and role == DROP_FABRIC_EDGE and switch in topology.switches:
        port = next((n for n, p in topology.ports(switch).items() if p == in_port), "")
    elif in_port is not None and role == DROP_VM_SPOOF:
        port = next((vm.port for vm in topology.vms.values()
                     if vm.host == switch and ports.get(vm.port) == in_port), "")
    return DropLabels(reason, ivn, port)
