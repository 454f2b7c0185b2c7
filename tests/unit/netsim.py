"""A weaver (real admission, fabric ledger, slots) driving a fake network: the desired state
goes through the compiler and the app's message sequences into fake switches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fakeoftable import FakeClock, FakeNetwork, program_network

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES
from nwc.lease import ManualClock
from nwc.pipeline import DesiredState
from nwc.policy import Policy, load_policy
from nwc.store import Store
from nwc.topology import Topology, parse_topology_text
from nwc.weave import Weave
from nwc.weaver import Weaver

TRIANGLE = """
version: 1
name: tri
underlay: {hosts: 100.64.0.0/24, weave_endpoints: 100.64.128.0/24,
           weave_vteps: 100.100.0.0/24}
switches: {s1: {}, s2: {}, s3: {}}
links:
  - {between: [s1, s2], capacity_mbps: 100}
  - {between: [s2, s3], capacity_mbps: 100}
  - {between: [s1, s3], capacity_mbps: 100}
hosts:
  h1: {switch: s1, uplink_mbps: 1000, underlay_ip: 100.64.0.1}
  h2: {switch: s2, uplink_mbps: 1000, underlay_ip: 100.64.0.2}
  h3: {switch: s3, uplink_mbps: 1000, underlay_ip: 100.64.0.3}
vms:
  web1: {host: h1, ivn: acme-web, ip: 192.0.2.10}
  web2: {host: h2, ivn: acme-web, ip: 192.0.2.11}
  web3: {host: h1, ivn: acme-web, ip: 192.0.2.40}
  db1: {host: h2, ivn: globex-db, ip: 192.0.2.70}
  db2: {host: h3, ivn: globex-db, ip: 192.0.2.71}
  lab1: {host: h1, ivn: globex-lab, ip: 203.0.113.140}
  app1: {host: h1, ivn: initech-app, ip: 203.0.113.10}
"""


@dataclass
class Sim:
    policy: Policy
    topology: Topology
    weaver: Weaver
    clock: ManualClock
    net: FakeNetwork
    fake_clock: FakeClock = field(default_factory=FakeClock)

    @classmethod
    def build(cls, tmp_path: Path, topology_text: str = TRIANGLE) -> Sim:
        policy = load_policy([SHIPPED_POLICIES])
        topology = parse_topology_text(topology_text, policy)
        clock = ManualClock()
        weaver = Weaver(policy=policy, topology=topology, store=Store(tmp_path), clock=clock)
        fake_clock = FakeClock()
        sim = cls(policy, topology, weaver, clock, FakeNetwork(topology, policy, fake_clock),
                  fake_clock)
        sim.sync()
        return sim

    def state(self) -> DesiredState:
        return DesiredState(self.policy, self.topology, tuple(self.weaver.live.values()),
                            self.clock.now(), frozenset(self.weaver.fabric.down))

    def sync(self) -> None:
        program_network(self.net, self.state())

    def weave(self, requester: str, target: str, mbps: float = 5, duration_s: int = 600,
              profile: str | None = None) -> Weave:
        result = self.weaver.create(WeaveRequest(requester, target, duration_s, mbps, profile))
        assert isinstance(result, Weave), result
        self.sync()
        return result

    def advance(self, seconds: float) -> None:
        """Time passes for the switches only (the controller is not told)."""
        self.fake_clock.advance(seconds)

    def ping(self, src: str, dst: str, **fields: int) -> list[str]:
        """Which VMs receive an ICMP echo request from `src` to `dst`'s address."""
        dst_ip = str(self.topology.vms[dst].ip)
        return [d.vm for d in self.net.send(src, self.net.vm_ip_packet(src, dst_ip, **fields))]

    def reaches(self, src: str, dst: str, **fields: int) -> bool:
        return self.ping(src, dst, **fields) == [dst]
