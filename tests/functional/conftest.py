"""Functional fixtures: one os-ken OpenFlow listener per test process (os-ken's app manager is
process-wide), and per test a fresh NWC controller attached to it, plus an emulated network
(private OVS per host and for the fabric) whose switches connect to that listener; and per
test module a `world` of two compute hosts with real charons and agents (weave_world.py)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from weave_world import World, running_world

from nwc.admission import WeaveRequest
from nwc.controller import Controller
from nwc.lab.host import EmulatedNetwork
from nwc.lab.netns import Lab, free_port, wait_for
from nwc.ofapp import FlowsPart, serve, start_osken
from nwc.weave import State, Weave

TOPOLOGY = """
version: 1
name: fun
underlay: {hosts: 100.64.0.0/24, weave_endpoints: 100.64.128.0/24,
           weave_vteps: 100.100.0.0/24, mtu: 9000}
switches: {s1: {}, s2: {}, s3: {}}
links:
  - {between: [s1, s2], capacity_mbps: 100}
  - {between: [s1, s3], capacity_mbps: 100}
  - {between: [s2, s3], capacity_mbps: 100}
hosts:
  h1: {switch: s1, uplink_mbps: 1000, underlay_ip: 100.64.0.1}
  h2: {switch: s2, uplink_mbps: 1000, underlay_ip: 100.64.0.2}
vms:
  web1: {host: h1, ivn: acme-web, ip: 192.0.2.10}
  web2: {host: h2, ivn: acme-web, ip: 192.0.2.11}
  db1: {host: h2, ivn: globex-db, ip: 192.0.2.70}
  lab1: {host: h1, ivn: globex-lab, ip: 203.0.113.140}
"""


@pytest.fixture(scope="session")
def ofp_port() -> int:
    port = free_port("0.0.0.0")
    start_osken("0.0.0.0", port)
    return port


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_world() as w:
        yield w


@dataclass
class Nwc:
    """A controller attached to the process's OpenFlow listener, and its network."""

    state_dir: Path
    topology_path: Path
    port: int
    controller: Controller
    part: FlowsPart
    net: EmulatedNetwork

    @classmethod
    def start_controller(cls, state_dir: Path, topology_path: Path, port: int,
                         **kw: Any) -> tuple[Controller, FlowsPart]:
        """As `nwc run` starts one: recovery, then the flows part attaches. `kw`: more
        Controller options."""
        controller = Controller.from_paths(state_dir, None, topology_path,
                                           provision_timeout_s=30, **kw)
        controller.start(parts_to_attach=True)
        args = argparse.Namespace(ofp_listen_host="0.0.0.0", ofp_tcp_listen_port=port)
        part = serve(controller, args)
        controller.parts_attached()
        return controller, part

    def restart_controller(self, **kw: Any) -> None:
        """NWC stops (its switch connections close) and a new one starts on the same state."""
        self.controller.stop()
        self.controller, self.part = self.start_controller(self.state_dir, self.topology_path,
                                                           self.port, **kw)

    def wait_connected(self, timeout: float = 20) -> None:
        wanted = {h.dpid for h in self.controller.config.topology.hosts.values()} | \
            {s.dpid for s in self.controller.config.topology.switches.values()}

        def all_synced() -> bool:
            with self.part.lock:
                return all(d in self.part.switches and self.part.switches[d].synced
                           and not self.part.switches[d].batches for d in wanted)
        wait_for(all_synced, timeout, "every switch connected and synced")

    def weave(self, requester: str, target: str, mbps: float = 5, duration_s: int = 600,
              profile: str | None = None) -> Weave:
        result = self.controller.call(self.controller.weaver.create,
                                      WeaveRequest(requester, target, duration_s, mbps, profile))
        assert isinstance(result, Weave), result
        self.wait_state(result.id, State.ACTIVE)
        self.build_legs(result)
        return result

    def live(self, weave_id: str) -> Weave | None:
        return self.controller.call(lambda: self.controller.weaver.live.get(weave_id))

    def wait_state(self, weave_id: str, state: State, timeout: float = 20) -> None:
        def reached() -> bool:
            w = self.live(weave_id)
            return w is not None and w.state is state
        wait_for(reached, timeout, f"{weave_id} {state}")

    def build_legs(self, weave: Weave) -> None:
        """What the tunnel agent does, without IPsec: a clear VXLAN device per remote leg."""
        topo = self.controller.config.topology
        for leg in weave.legs:
            if leg.slot is None:
                continue
            a = topo.weave_addresses(leg.slot)
            self.net.hosts[leg.requester_host].add_clear_leg(
                leg.slot, str(a.requester_endpoint), str(a.target_endpoint), a.vni)
            self.net.hosts[leg.target_host].add_clear_leg(
                leg.slot, str(a.target_endpoint), str(a.requester_endpoint), a.vni)

    def remove_legs(self, weave: Weave) -> None:
        topo = self.controller.config.topology
        for leg in weave.legs:
            if leg.slot is None:
                continue
            a = topo.weave_addresses(leg.slot)
            self.net.hosts[leg.requester_host].remove_clear_leg(leg.slot,
                                                                str(a.requester_endpoint))
            self.net.hosts[leg.target_host].remove_clear_leg(leg.slot, str(a.target_endpoint))


@pytest.fixture
def nwc(ofp_port: int, tmp_path: Path) -> Iterator[Nwc]:
    topology_path = tmp_path / "topology.yaml"
    topology_path.write_text(TOPOLOGY)
    state_dir = tmp_path / "state"
    controller, part = Nwc.start_controller(state_dir, topology_path, ofp_port)
    with Lab() as lab:
        net = EmulatedNetwork(lab, controller.config.topology, controller.config.policy,
                              ofp_port).build()
        env = Nwc(state_dir, topology_path, ofp_port, controller, part, net)
        try:
            env.wait_connected()
            yield env
        finally:
            env.controller.stop()
