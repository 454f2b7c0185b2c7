"""The fabric's edge: a port facing a compute host passes only the addresses that host may use
(its underlay address, the endpoint addresses of its legs while their weave lives); everything
else from it is dropped by a flow that counts. Run through the fake switches of the triangle
(h1-s1, h2-s2, h3-s3; globex-db has VMs on h2 and h3, none on h1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakeoftable import ALL_ONES, FakeSwitch, ip, mac
from netsim import Sim

from nwc.pipeline import FABRIC_EDGE_DROP_COOKIE, host_route_next_hops
from nwc.weave import Leg, Weave

pytestmark = pytest.mark.unit

ETH_IP, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
UDP, ESP = 17, 50


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    return Sim.build(tmp_path)


def _edge_drops(sim: Sim, switch: str) -> dict[int, int]:
    """Packets each edge drop flow of `switch` counted, by the host port it watches."""
    flows = sim.net.switches[switch].flow_stats(FABRIC_EDGE_DROP_COOKIE, ALL_ONES)
    return {f.match["in_port"][0]: f.packets for f in flows}


def _echo_to(sim: Sim, vm_name: str) -> dict[str, int]:
    vm = sim.topology.vms[vm_name]
    return {"eth_src": mac("02:dd:00:00:01:99"), "eth_dst": mac(vm.mac), "eth_type": ETH_IP,
            "ipv4_src": ip("192.0.2.99"), "ipv4_dst": int(vm.ip), "ip_proto": 1,
            "icmpv4_type": 8, "nw_ttl": 64, "len": 100}


def _udp(src: str, dst: str, port: int) -> dict[str, int]:
    return {"eth_type": ETH_IP, "ipv4_src": ip(src), "ipv4_dst": ip(dst), "ip_proto": UDP,
            "udp_src": port, "udp_dst": port}


def _arp(spa: str, tpa: str) -> dict[str, int]:
    return {"eth_type": ETH_ARP, "arp_op": 1, "arp_spa": ip(spa), "arp_tpa": ip(tpa)}


def _leg(weave: Weave, requester: str, target: str) -> Leg:
    return next(leg for leg in weave.legs if (leg.requester_host, leg.target_host)
                == (requester, target))


def test_a_host_faking_another_hosts_underlay_address_is_dropped_and_counted(sim: Sim) -> None:
    # Root on h1 (no globex-db VMs) writes h2's underlay address (h2 has globex-db VMs) as the
    # outer source of VXLAN with globex-db's VNI to h3: br-int's tun_src check alone would
    # take it (the limit the tun_src change left open). The edge switch s1 drops it.
    h1_port = sim.topology.ports("s1")["h1"]
    vni = sim.policy.ivns["globex-db"].vni
    h2_ip = str(sim.topology.hosts["h2"].underlay_ip)
    assert sim.net.forge_overlay("h1", "h3", vni, _echo_to(sim, "db2"), outer_src=h2_ip) == []
    assert _edge_drops(sim, "s1") == {h1_port: 1}
    # The same from h2, whose address it is, is the IVN's own overlay traffic.
    assert [d.vm for d in sim.net.forge_overlay("h2", "h3", vni, _echo_to(sim, "db2"))] \
        == ["db2"]
    # Nor any other source, ARP claiming another host's address (cache poisoning), ARP
    # probes from 0.0.0.0, or IPv6 (the fabric routes none).
    h3_ip = str(sim.topology.hosts["h3"].underlay_ip)
    for frame in (_udp("203.0.113.9", h3_ip, 4789), _arp(h2_ip, h3_ip), _arp("0.0.0.0", h3_ip),
                  {"eth_type": ETH_IPV6}):
        assert sim.net.underlay("h1", frame)[0] is None, frame
    assert _edge_drops(sim, "s1") == {h1_port: 5}
    # Nothing was refused at the other hosts' ports, and real traffic still crosses.
    assert set(_edge_drops(sim, "s2").values()) == {0}
    assert sim.reaches("web1", "web2") and sim.reaches("db1", "db2")
    h1_ip = str(sim.topology.hosts["h1"].underlay_ip)
    assert sim.net.underlay("h1", _arp(h1_ip, h3_ip))[0] == "h3"


def test_a_live_weaves_traffic_flows_and_its_endpoints_pass_only_at_their_owners(
        sim: Sim) -> None:
    weave = sim.weave("acme-web", "globex-db")
    leg = _leg(weave, "h1", "h3")
    assert leg.slot is not None
    addresses = sim.topology.weave_addresses(leg.slot)
    mine, theirs = str(addresses.requester_endpoint), str(addresses.target_endpoint)
    # The leg's tunnel (between the endpoint addresses) carries the tenants' traffic.
    (d,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.71"))
    assert d.vm == "db2" and d.fabric_paths == [leg.path]
    # What the hosts themselves exchange for the leg: IKE, NAT-T, ESP, ARP for the endpoints,
    # both ways.
    for host, src, dst, far in (("h1", mine, theirs, "h3"), ("h3", theirs, mine, "h1")):
        for frame in (_udp(src, dst, 500), _udp(src, dst, 4500), _arp(src, dst),
                      {"eth_type": ETH_IP, "ipv4_src": ip(src), "ipv4_dst": ip(dst),
                       "ip_proto": ESP}):
            assert sim.net.underlay(host, frame)[0] == far, (host, frame)
    # An endpoint passes only at the port of the host it is on: h2, on another leg of the
    # same weave, cannot send as h1's end of this one.
    h3_ip = str(sim.topology.hosts["h3"].underlay_ip)
    for frame in (_udp(mine, theirs, 4500), _udp(mine, h3_ip, 4500), _arp(mine, theirs)):
        assert sim.net.underlay("h2", frame)[0] is None, frame
    assert set(_edge_drops(sim, "s1").values()) == {0}
    assert _edge_drops(sim, "s2") == {sim.topology.ports("s2")["h2"]: 3}


def test_a_leg_endpoint_passes_no_longer_than_its_weave(sim: Sim) -> None:
    weave = sim.weave("acme-web", "globex-db")
    leg = _leg(weave, "h1", "h3")
    assert leg.slot is not None
    addresses = sim.topology.weave_addresses(leg.slot)
    ike = _udp(str(addresses.requester_endpoint), str(addresses.target_endpoint), 500)
    assert sim.net.underlay("h1", ike)[0] == "h3"
    sim.weaver.terminate(weave.id)
    sim.sync()
    # The endpoint is unrouted now anyway; the point is the edge refuses it, and counts it.
    assert sim.net.underlay("h1", ike)[0] is None
    assert _edge_drops(sim, "s1") == {sim.topology.ports("s1")["h1"]: 1}
    # The lease backstop (hard timeout) ends the permit with the routes, also when the
    # controller is not there to remove them.
    weave = sim.weave("acme-web", "globex-db", duration_s=600)
    leg = _leg(weave, "h1", "h3")
    assert leg.slot is not None
    addresses = sim.topology.weave_addresses(leg.slot)
    ike = _udp(str(addresses.requester_endpoint), str(addresses.target_endpoint), 500)
    assert sim.net.underlay("h1", ike)[0] == "h3"
    h1_port = sim.topology.ports("s1")["h1"]
    before = _edge_drops(sim, "s1")[h1_port]  # the sim's resync restarted the counter
    sim.advance(601)
    assert sim.net.underlay("h1", ike)[0] is None
    assert _edge_drops(sim, "s1") == {h1_port: before + 1}


def _route_only(switch: FakeSwitch, in_port: int, frame: dict[str, int]) -> list[int]:
    return [port for port, _ in switch.process({**frame, "in_port": in_port, "len": 100})]


def test_fabric_to_fabric_ports_pass_whatever_source(sim: Sim) -> None:
    # Every switch checks its own hosts' ports; what another switch hands over was checked
    # where it entered, and is routed by destination as before, whatever its source.
    trees = host_route_next_hops(sim.topology, frozenset())
    for name in sim.topology.switches:
        ports = sim.topology.ports(name)
        for neighbour, in_port in ports.items():
            if neighbour in sim.topology.hosts:
                continue
            for host, tree in trees.items():
                if tree.get(name) in (None, neighbour):
                    continue  # no route here, or back where it came from (never sent)
                dst = str(sim.topology.hosts[host].underlay_ip)
                want = [ports[tree[name]]]
                for frame in (_udp("203.0.113.9", dst, 4789), _arp("203.0.113.9", dst)):
                    assert _route_only(sim.net.switches[name], in_port, frame) == want, \
                        (name, neighbour, host)
        assert set(_edge_drops(sim, name).values()) == {0}
