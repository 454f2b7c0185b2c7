"""Constrained path search against networkx on every small graph (networkx's graph atlas:
all graphs up to seven nodes), with capacities that cut some links out."""

from __future__ import annotations

import ipaddress
import itertools

import networkx as nx
import pytest

from nwc.fabric import Fabric
from nwc.topology import ComputeHost, Link, Switch, Topology, Underlay

pytestmark = pytest.mark.unit

UNDERLAY = Underlay(ipaddress.IPv4Network("100.64.0.0/24"),
                    ipaddress.IPv4Network("100.64.128.0/24"),
                    ipaddress.IPv4Network("100.100.0.0/24"), 9000)


def fabric_of(graph: nx.Graph, capacity: dict[tuple[int, int], int]) -> Fabric:
    """Switches s<n> for the graph's nodes; host ha on the first node, hb on the last."""
    nodes = sorted(graph.nodes)
    switches = {f"s{n}": Switch(f"s{n}", n + 1) for n in nodes}
    links = [Link(f"s{a}", f"s{b}", capacity[(a, b)], 1.0) for a, b in graph.edges]
    hosts = {}
    for name, node, ip in (("ha", nodes[0], "100.64.0.1"), ("hb", nodes[-1], "100.64.0.2")):
        hosts[name] = ComputeHost(name, f"s{node}", ipaddress.IPv4Address(ip), 100 + node,
                                  "strongswan")
        links.append(Link(name, f"s{node}", 1000, 1.0))
    return Fabric(Topology("atlas", UNDERLAY, switches, tuple(links), hosts, {}))


def small_connected_graphs() -> list[nx.Graph]:
    return [g for g in nx.graph_atlas_g() if g.number_of_nodes() >= 2 and nx.is_connected(g)]


def test_atlas_is_not_trivially_small() -> None:
    assert len(small_connected_graphs()) > 800


def test_constrained_path_is_shortest_feasible_on_every_small_graph() -> None:
    checked = 0
    for index, graph in enumerate(small_connected_graphs()):
        # Deterministic capacities in Mbit/s: 10..100, varying by edge and graph.
        capacity = {}
        for a, b in graph.edges:
            capacity[(a, b)] = capacity[(b, a)] = 10 + ((a * 7 + b * 13 + index) % 10) * 10
        fabric = fabric_of(graph, capacity)
        first, last = min(graph.nodes), max(graph.nodes)
        for need_mbps in (0, 30, 60, 90):
            kbps = need_mbps * 1000
            feasible = nx.Graph((a, b) for a, b in graph.edges if capacity[(a, b)] >= need_mbps)
            feasible.add_nodes_from((first, last))
            path = fabric.find_path("ha", "hb", kbps)
            if nx.has_path(feasible, first, last):
                assert path is not None, (index, need_mbps)
                assert path[0] == "ha" and path[-1] == "hb"
                expected_hops = nx.shortest_path_length(feasible, first, last)
                assert len(path) - 3 == expected_hops, (index, need_mbps, path)
                for a, b in itertools.pairwise(path[1:-1]):
                    assert capacity[(int(a[1:]), int(b[1:]))] >= need_mbps
                assert fabric.find_path("ha", "hb", kbps) == path  # deterministic
            else:
                assert path is None, (index, need_mbps, path)
            checked += 1
    assert checked > 3000


def test_reserving_along_found_paths_until_full_never_overbooks() -> None:
    for index, graph in enumerate(small_connected_graphs()[::7]):
        capacity = {}
        for a, b in graph.edges:
            capacity[(a, b)] = capacity[(b, a)] = 20 + ((a + b + index) % 4) * 20
        fabric = fabric_of(graph, capacity)
        taken = []
        while (path := fabric.find_path("ha", "hb", 15_000)) is not None:
            taken.append(fabric.reserve(f"w{len(taken)}", [path], 15_000))
            assert fabric.violations() == []
            assert len(taken) < 100
        # Cut set argument: what was admitted fits through the min cut of the graph.
        g = nx.Graph()
        for (a, b), cap in capacity.items():
            g.add_edge(a, b, capacity=cap)
        cut = nx.minimum_cut_value(g, min(graph.nodes), max(graph.nodes)) \
            if graph.number_of_nodes() > 1 else 0
        assert len(taken) * 15 <= cut
        for reservation in taken:
            fabric.release(reservation.weave_id)
        assert all(v == 0 for v in fabric.reserved.values())
