"""Emulated compute hosts for weave tunnels: what the tunnel tests and `scripts/bench-tunnel`
run on.

Each host of a topology becomes a network namespace with a private OVS (br-int, userspace
datapath, secure), a private charon, a `nwc agent` process and its VMs (namespaces on br-int
ports named as the topology says). The hosts' underlay devices (`ul0`, the host's underlay
address, the topology's MTU) share one segment: a veth pair for two hosts, a Linux bridge in a
"fabric" namespace for more. That stands in for NWC's OpenFlow fabric, which routes by
destination address and answers for every address a host owns. The OpenFlow pipeline is
another part's job: `connect` installs two static flows per host joining a VM port to a
leg's port, enough to carry a weave's traffic.

IPv6 is off in every namespace, so a capture on the underlay holds only what the weaves (and
IKE, and ARP) put there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nwc.ike import IkeDaemon, IkeNoAnswer, IkeUnavailable
from nwc.lab.netns import Lab, Netns
from nwc.lab.ovs import PrivateOvs
from nwc.lab.strongswan import PrivateCharon, start_agent
from nwc.pipeline import INTEGRATION_BRIDGE, leg_ofport
from nwc.topology import Topology
from nwc.tunnel import AGENT_ACK_KEY, AGENT_ALIVE_KEY, RECORDS_VERSION_KEY

UNDERLAY_DEV = "ul0"


@dataclass
class EmulatedHost:
    lab: Lab
    name: str
    ns: Netns
    underlay_ip: ipaddress.IPv4Address
    backend: str
    ovs: PrivateOvs = field(init=False)
    charon: PrivateCharon = field(init=False)
    state_dir: Path = field(init=False)
    vms: dict[str, Netns] = field(default_factory=dict)
    _agent: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ovs = PrivateOvs(self.lab, self.ns, self.name)
        self.charon = PrivateCharon(self.lab, self.ns, self.name)
        self.state_dir = self.lab.directory(f"agent-{self.name}")

    @property
    def ike(self) -> IkeDaemon:
        return IkeDaemon(self.charon.vici_socket)

    def start_agent(self, interval: float = 0.05) -> None:
        if self._agent is not None and self._agent.poll() is None:
            return
        self._agent = start_agent(self.lab, self.ns, self.ovs, self.charon, self.name,
                                  backend=self.backend, underlay_dev=UNDERLAY_DEV,
                                  interval=interval)

    @property
    def agent_pid(self) -> int | None:
        return self._agent.pid if self._agent is not None else None

    def snapshot(self) -> dict[str, Any]:
        """Everything a weave may leave on this host, in comparable form."""
        def lines(*args: str) -> list[str]:
            return sorted(line.strip() for line in self.ns.run(*args).stdout.splitlines()
                          if line.strip())

        links = sorted(line.split(":")[1].strip().split("@")[0]
                       for line in self.ns.run("ip", "-o", "link").stdout.splitlines())
        addrs = sorted(" ".join(line.split()[1:4])
                       for line in self.ns.run("ip", "-o", "-4", "addr").stdout.splitlines())
        state: dict[str, Any] = {
            "links": links, "addresses": addrs,
            "routes": lines("ip", "-4", "route", "show", "table", "all"),
            "rules": lines("ip", "-4", "rule"),
            "ovs_ports": sorted(self.ovs.vsctl("list-ports", INTEGRATION_BRIDGE).split()),
            "ovs_interfaces": sorted(self.ovs.vsctl("--columns=name", "--bare", "list",
                                                    "interface").split()),
            "ovs_other_config": self.ovs.vsctl("get", "open_vswitch", ".", "other_config"),
            "ovs_external_ids": self._external_ids(),
            "agent_files": sorted(str(p.relative_to(self.state_dir))
                                  for p in self.state_dir.rglob("*")),
            "charon_files": sorted(p.name for p in self.charon.directory.iterdir()),
        }
        try:
            ike = self.ike
            state["ike_connections"] = sorted(ike.connections())
            state["ike_sas"] = sorted(ike.sas())
            state["ike_shared"] = sorted(ike.shared_ids())
            state["ike_keys"] = sorted(ike.key_ids())
        except (IkeUnavailable, IkeNoAnswer):
            state["ike"] = "unavailable"
        return state

    def _external_ids(self) -> dict[str, str]:
        """The Open_vSwitch row's external_ids, less the records version, the agent's ack
        and its heartbeat: those stay once written (they only grow), and name nothing of any
        weave."""
        table = json.loads(self.ovs.vsctl("--format=json", "--columns=external_ids", "list",
                                          "open_vswitch"))
        (_, pairs), = table["data"][0]
        return {k: v for k, v in pairs
                if k not in (RECORDS_VERSION_KEY, AGENT_ACK_KEY, AGENT_ALIVE_KEY)}


@dataclass
class TunnelLab:
    """The hosts (and VMs) of a topology, emulated; `start()` brings up every daemon."""

    lab: Lab
    topology: Topology
    vm_prefixlen: int = 24  # VMs' on-link prefix: static flows bridge, there is no gateway
    hosts: dict[str, EmulatedHost] = field(default_factory=dict)
    fabric: Netns | None = None

    def build(self) -> TunnelLab:
        topo = self.topology
        for name in sorted(topo.hosts):
            spec = topo.hosts[name]
            ns = self.lab.netns(name)
            ns.no_ipv6()
            self.hosts[name] = EmulatedHost(self.lab, name, ns, spec.underlay_ip, spec.backend)
        self._underlay()
        for host in self.hosts.values():
            host.ovs.start()
            host.ovs.add_bridge(INTEGRATION_BRIDGE, dpid=topo.hosts[host.name].dpid)
            host.charon.start()
        for vm in sorted(topo.vms.values(), key=lambda v: v.name):
            host = self.hosts[vm.host]
            ns = self.lab.netns(vm.name)
            ns.no_ipv6()
            self.lab.veth(ns, "eth0", host.ns, vm.port)
            ns.ip("link", "set", "eth0", "address", vm.mac)
            ns.ip("addr", "add", f"{vm.ip}/{self.vm_prefixlen}", "dev", "eth0")
            ns.no_offload("eth0")
            host.ns.no_offload(vm.port)
            host.ovs.add_port(INTEGRATION_BRIDGE, vm.port)
            host.vms[vm.name] = ns
        return self

    def _underlay(self) -> None:
        topo = self.topology
        mtu = topo.underlay.mtu
        prefix = topo.underlay.hosts.prefixlen
        names = sorted(self.hosts)
        if len(names) == 2:
            a, b = (self.hosts[n] for n in names)
            self.lab.veth(a.ns, UNDERLAY_DEV, b.ns, UNDERLAY_DEV, mtu=mtu)
        else:
            self.fabric = self.lab.netns("fabric")
            self.fabric.no_ipv6()
            self.fabric.ip("link", "add", "fab", "type", "bridge")
            self.fabric.ip("link", "set", "fab", "mtu", str(mtu), "up")
            for n in names:
                self.lab.veth(self.hosts[n].ns, UNDERLAY_DEV, self.fabric, f"p-{n}", mtu=mtu)
                self.fabric.ip("link", "set", f"p-{n}", "master", "fab")
        for host in self.hosts.values():
            host.ns.ip("addr", "add", f"{host.underlay_ip}/{prefix}", "dev", UNDERLAY_DEV)

    def start_agents(self) -> None:
        for host in self.hosts.values():
            host.start_agent()

    def ovsdb_targets(self) -> dict[str, str]:
        return {name: host.ovs.db_target for name, host in self.hosts.items()}

    def connect(self, vm_a: str, vm_b: str, slot: int) -> None:
        """Join two VMs (on the leg's two hosts) through leg `slot`'s port, with one flow
        each way on each host (the OpenFlow pipeline's job in the real controller)."""
        port = leg_ofport(slot)
        for vm_name, peer in ((vm_a, vm_b), (vm_b, vm_a)):
            vm = self.topology.vms[vm_name]
            # The VMs may be in different subnets (different IVNs): with no gateway in this
            # lab, each reaches the other on-link across the bridged leg.
            self.vm(vm_name).ip("route", "replace", f"{self.topology.vms[peer].ip}/32",
                                "dev", "eth0")
            ovs = self.hosts[vm.host].ovs
            vm_port = ovs.ofport(vm.port)
            ovs.ofctl("add-flow", INTEGRATION_BRIDGE,
                      f"cookie=0x7e{slot:04x},priority=100,in_port={vm_port},actions=output:{port}")
            ovs.ofctl("add-flow", INTEGRATION_BRIDGE,
                      f"cookie=0x7e{slot:04x},priority=100,in_port={port},actions=output:{vm_port}")

    def disconnect(self, slot: int) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(RuntimeError):
                host.ovs.ofctl("del-flows", INTEGRATION_BRIDGE, f"cookie=0x7e{slot:04x}/-1")

    def vm(self, name: str) -> Netns:
        return self.hosts[self.topology.vms[name].host].vms[name]


# Two compute hosts on one fabric switch, with VMs of the shipped policies' IVNs: acme-web on
# h1, globex-db and initech-app on h2. acme-web may weave with globex-db (gold: PSK) and with
# initech-app (silver: x509), so two weaves between the same two hosts get different profiles.
TWO_HOSTS = """\
version: 1
name: tunnel-lab
description: two compute hosts for the weave tunnel tests and benchmark
underlay:
  hosts: 100.64.0.0/24
  weave_endpoints: 100.64.128.0/24
  weave_vteps: 100.100.0.0/24
  mtu: 9000
switches:
  s1: {}
links: []
hosts:
  h1: {switch: s1, uplink_mbps: 10000, underlay_ip: 100.64.0.1}
  h2: {switch: s1, uplink_mbps: 10000, underlay_ip: 100.64.0.2}
vms:
  web1: {host: h1, ivn: acme-web, ip: 192.0.2.10}
  web2: {host: h1, ivn: acme-web, ip: 192.0.2.11}
  db1: {host: h2, ivn: globex-db, ip: 192.0.2.70}
  app1: {host: h2, ivn: initech-app, ip: 203.0.113.10}
"""
