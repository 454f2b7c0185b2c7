"""Fabric steering over every small graph, rerouting, and the switch (re)sync sequences."""

from __future__ import annotations

import subprocess
from pathlib import Path

import networkx as nx
import pytest
from fakeoftable import FakeNetwork, FakeOFError, FakeSwitch, program_network
from hypothesis import given
from hypothesis import strategies as st
from netsim import Sim
from os_ken.ofproto import ofproto_v1_3_parser as parser

from nwc.config import SHIPPED_POLICIES
from nwc.ofmessages import (
    bundle,
    flow_mod,
    install_messages,
    ofctl_flows,
    remove_messages,
    sync_messages,
)
from nwc.pipeline import (
    DesiredState,
    Flow,
    Output,
    compile_switch,
    compile_weave,
    match,
    port_masks,
    weave_cookie,
)
from nwc.policy import load_policy
from nwc.topology import parse_topology_text

pytestmark = pytest.mark.unit

POLICY = load_policy([SHIPPED_POLICIES])


def _topology_from_graph(g: nx.Graph) -> str:
    switches = {f"s{n}": {} for n in g.nodes}
    links = "".join(f"  - {{between: [s{a}, s{b}], capacity_mbps: 100}}\n" for a, b in g.edges)
    hosts = "".join(f"  h{n}: {{switch: s{n}, uplink_mbps: 1000, underlay_ip: 100.64.0.{n + 1}}}\n"
                    for n in g.nodes)
    return (f"version: 1\nname: atlas\nunderlay: {{hosts: 100.64.0.0/24, "
            f"weave_endpoints: 100.64.128.0/24, weave_vteps: 100.100.0.0/24}}\n"
            f"switches: {switches}\nlinks:\n{links or '  []'}\nhosts:\n{hosts}")


ATLAS = [g for g in nx.graph_atlas_g()[1:60] if nx.is_connected(g)]


@pytest.mark.parametrize("graph", ATLAS, ids=lambda g: f"{len(g)}n{g.number_of_edges()}e")
def test_every_host_reaches_every_host_on_any_small_fabric(graph: nx.Graph) -> None:
    """Loops in the fabric graph do no harm: host routes follow one tree per destination."""
    text = _topology_from_graph(graph).replace("links:\n  []", "links: []")
    topology = parse_topology_text(text, POLICY)
    net = FakeNetwork(topology, POLICY)
    from datetime import UTC, datetime
    program_network(net, DesiredState(POLICY, topology, (), datetime(2026, 1, 1, tzinfo=UTC)))
    for src in topology.hosts:
        for dst, host in topology.hosts.items():
            if src == dst:
                continue
            # From the sender's own underlay address: the edge drops any other source.
            sender = int(topology.hosts[src].underlay_ip)
            arrived, path = net.underlay(src, {"eth_type": 0x0800, "ipv4_src": sender,
                                               "ipv4_dst": int(host.underlay_ip)})
            assert arrived == dst, (src, dst, path)
            arp = {"eth_type": 0x0806, "arp_op": 1, "arp_spa": sender,
                   "arp_tpa": int(host.underlay_ip)}
            assert net.underlay(src, arp)[0] == dst, (src, dst)
            # Shortest: as many switches as the graph distance says.
            sa, sb = int(src[1:]), int(dst[1:])
            assert len(path) - 3 == nx.shortest_path_length(graph, sa, sb)


def test_a_dead_link_moves_weave_and_host_routes(tmp_path: Path) -> None:
    sim = Sim.build(tmp_path)
    weave = sim.weave("acme-web", "globex-db")
    leg = next(leg for leg in weave.legs if (leg.requester_host, leg.target_host) == ("h1", "h3"))
    assert leg.path == ("h1", "s1", "s3", "h3")
    sim.weaver.link_changed("s1", "s3", up=False)
    sim.sync()
    moved = sim.weaver.live[weave.id]
    new_leg = next(x for x in moved.legs if x.slot == leg.slot)
    assert new_leg.path == ("h1", "s1", "s2", "s3", "h3")
    (d,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.71"))
    assert d.fabric_paths == [new_leg.path]
    assert sim.reaches("web1", "web2")  # h1 -> h2 did not use s1-s3; still fine
    assert sim.reaches("db2", "web1")


def test_every_compiled_host_flow_is_ovs_ofctl_text_that_ovs_ofctl_takes(
        tmp_path: Path) -> None:
    """The ovs-ofctl rendering (benchmark, humans) names each field as ovs-ofctl does
    (tun_src, not os-ken's tun_ipv4_src). ovs-ofctl parses offline: no switch needed."""
    sim = Sim.build(tmp_path)
    sim.weave("acme-web", "globex-db")
    state = sim.state()
    for name, host in sorted(sim.topology.hosts.items()):
        text = ofctl_flows(compile_switch(state, host.dpid, sim.net.ports[name]).flows)
        assert "tun_src=" in text, name  # every host has an IVN with VMs elsewhere
        parsed = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "parse-flows", "/dev/stdin"],
                                input=text, text=True, capture_output=True, check=False)
        assert parsed.returncode == 0, (name, parsed.stderr)


def test_resync_replaces_stale_flows_and_meters_atomically(tmp_path: Path) -> None:
    sim = Sim.build(tmp_path)
    weave = sim.weave("acme-web", "globex-db")
    h1 = sim.net.switches["h1"]
    # Stale state a previous controller left: a flow joining tenants, a meter of a dead weave.
    stale_meter = parser.OFPMeterMod(None, command=0, flags=1 | 4, meter_id=77,
                                     bands=[parser.OFPMeterBandDrop(rate=10, burst_size=10)])
    h1.apply(stale_meter)
    lab1, web1 = sim.net.ports["h1"]["lab1"], sim.net.ports["h1"]["web1"]
    h1.apply_all(bundle(None, 9, [flow_mod(None, Flow(0, 1000, match(in_port=lab1),
                                                      (Output(web1),)))]))
    assert sim.ping("lab1", "web1") == ["web1"]  # leaked
    sim.sync()
    assert 77 not in h1.meters
    assert not sim.ping("lab1", "web1")
    assert sim.reaches("web1", "db2")
    assert weave.id in sim.weaver.live


def test_a_failed_bundle_leaves_the_table_as_it_was(tmp_path: Path) -> None:
    sim = Sim.build(tmp_path)
    weave = sim.weave("acme-web", "globex-db")
    h1 = sim.net.switches["h1"]
    before = [(f.table, f.priority, f.match, f.cookie) for f in h1.flows()]
    # Weave flows refer to meters; sent without them, the switch refuses the whole bundle.
    program = compile_weave(sim.state(), weave, sim.topology.hosts["h1"].dpid,
                            sim.net.ports["h1"])
    h1.apply_all(remove_messages(None, weave_cookie(weave.number),
                                 [m.meter_id for m in program.meters], 5))
    assert not sim.ping("web1", "db2")
    removed = [(f.table, f.priority, f.match, f.cookie) for f in h1.flows()]
    msgs = install_messages(None, program, weave_cookie(weave.number), set(), 6)
    with pytest.raises(FakeOFError):
        h1.apply_all(msgs[len(program.meters):])  # the bundle alone, meters skipped
    assert [(f.table, f.priority, f.match, f.cookie) for f in h1.flows()] == removed
    assert removed != before
    h1.apply_all(msgs)  # meters first, then the bundle: accepted
    assert sim.reaches("web1", "db2")


def test_meters_inside_a_bundle_are_refused_like_ovs_does(tmp_path: Path) -> None:
    sim = Sim.build(tmp_path)
    weave = sim.weave("acme-web", "globex-db")
    program = compile_switch(sim.state(), sim.topology.hosts["h1"].dpid, sim.net.ports["h1"])
    switch = FakeSwitch("x", sim.fake_clock)
    from nwc.ofmessages import meter_mod
    with pytest.raises(FakeOFError):
        switch.apply_all(bundle(None, 1, [meter_mod(None, program.meters[0])]))
    switch.apply_all(sync_messages(None, program, set(), 2))
    assert {m.meter_id for m in program.meters} == set(switch.meters)
    assert {m.cookie for m in program.meters} == {weave_cookie(weave.number)}


def test_weave_removal_takes_its_meters_and_only_its_flows(tmp_path: Path) -> None:
    sim = Sim.build(tmp_path)
    first = sim.weave("acme-web", "globex-db")
    second = sim.weave("acme-web", "initech-app", profile="silver")
    sim.weaver.terminate(first.id)
    sim.sync()
    assert not sim.ping("web1", "db2")
    assert sim.reaches("web1", "app1")
    assert all(m not in sim.net.switches["h1"].meters for m in (
        first.number * 2 + 1, first.number * 2 + 2))
    assert second.id in sim.weaver.live


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_ranges_become_exact_masks(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    masks = port_masks(lo, hi)
    covered = set()
    for m in masks:
        value, mask = m if isinstance(m, tuple) else (m, 0xFFFF)
        block = {p for p in range(value, value + (0xFFFF & ~mask) + 1)}
        assert not covered & block
        covered |= block
    assert covered == set(range(lo, hi + 1))
