"""Emulated compute hosts and provider fabric, built from a topology, in network namespaces.

- `ManagementNet`: how switches reach the controller. A Linux bridge in the root namespace
  holding the controller's address, one veth per emulated node. Its /26 comes from
  100.126.0.0/16 by the lab's pid, skipping any /26 already in use, so concurrent labs of
  different engineers never share addresses or names.
- `EmulatedHost`: one namespace per compute host with its private OVS: `br-int` (userspace,
  fail_mode=secure, OpenFlow 1.3, dpid from the topology, controller = NWC) holding the VM
  ports and the IVN base overlay port (`ivn-vxlan`, OVS native tunnelling, remote_ip=flow,
  key=flow, ofport 9000), and `br-ul`, the underlay bridge: the host's underlay address on its
  internal port, the uplink `ul0` as its port, one NORMAL flow (it carries only the host's own
  traffic, never a tenant's; NWC does not program it). VMs are namespaces on veth pairs.
- `EmulatedFabric`: one namespace with a private OVS holding one bridge per fabric switch,
  wired to each other and to the hosts by veth pairs, ports numbered as `Topology.ports()`.

Everything is created under the Lab's prefix and removed by `Lab.close()` (by name and pid).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass, field

from nwc.lab.labpki import TlsFilePaths
from nwc.lab.netns import Lab, Netns, run
from nwc.lab.ovs import PrivateOvs
from nwc.pipeline import (
    INTEGRATION_BRIDGE,
    IVN_TUNNEL_OFPORT,
    IVN_TUNNEL_PORT,
    gateway_mac,
    leg_ofport,
    leg_port_name,
)
from nwc.policy import Policy
from nwc.topology import Topology, Vm

MANAGEMENT_POOL = ipaddress.IPv4Network("100.126.0.0/16")
UNDERLAY_BRIDGE = "br-ul"
UPLINK = "ul0"


def management_subnet(seed: int | None = None) -> ipaddress.IPv4Network:
    """A /26 of 100.126.0.0/16 chosen from the pid, skipping subnets with an address in the
    root namespace (another lab's)."""
    subnets = list(MANAGEMENT_POOL.subnets(new_prefix=26))
    used = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    start = (os.getpid() if seed is None else seed) % len(subnets)
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if f" {net[1]}/" not in used and not any(
                f" {a}/" in used for a in list(net.hosts())[:4]):
            return net
    raise RuntimeError("no free management /26 in 100.126.0.0/16")


@dataclass
class ManagementNet:
    lab: Lab
    subnet: ipaddress.IPv4Network = field(default_factory=management_subnet)
    bridge: str = ""
    _next: int = 2

    def __post_init__(self) -> None:
        self.bridge = f"{self.lab.prefix}m"
        self.lab.own_link(self.bridge)
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self.lab.on_close(f"link {self.bridge}",
                          lambda: run(["ip", "link", "del", self.bridge], check=False))
        run(["ip", "addr", "add", f"{self.controller_ip}/{self.subnet.prefixlen}", "dev",
             self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    @property
    def controller_ip(self) -> ipaddress.IPv4Address:
        return self.subnet[1]

    def attach(self, ns: Netns) -> ipaddress.IPv4Address:
        """Give `ns` an address on the management network (device mgmt0)."""
        index = self._next
        self._next += 1
        address = self.subnet[index]
        root_end = f"{self.lab.prefix}m{index}"
        self.lab.veth(None, root_end, ns, "mgmt0")
        run(["ip", "link", "set", root_end, "master", self.bridge])
        ns.ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "mgmt0")
        return address


@dataclass
class EmulatedHost:
    lab: Lab
    topology: Topology
    policy: Policy
    name: str
    controller: str  # e.g. tcp:100.126.3.1:6653, or ssl:... with switch_tls
    mgmt: ManagementNet
    switch_tls: TlsFilePaths | None = None  # ovs-vswitchd's key, certificate, CA
    ovsdb_tls: TlsFilePaths | None = None  # the same for ovsdb-server (pssl:)
    ns: Netns = field(init=False)
    ovs: PrivateOvs = field(init=False)
    management_ip: ipaddress.IPv4Address = field(init=False)
    vms: dict[str, Netns] = field(default_factory=dict, init=False)

    def build(self) -> EmulatedHost:
        host = self.topology.hosts[self.name]
        self.ns = self.lab.netns(self.name)
        self.management_ip = self.mgmt.attach(self.ns)
        self.ovs = PrivateOvs(self.lab, self.ns, self.name).start(tls=self.switch_tls,
                                                                   ovsdb_tls=self.ovsdb_tls)
        self.ovs.add_bridge(INTEGRATION_BRIDGE, dpid=host.dpid, controller=self.controller)
        self.ovs.vsctl("set", "controller", INTEGRATION_BRIDGE, "max_backoff=1000")
        self.ovs.add_port(INTEGRATION_BRIDGE, IVN_TUNNEL_PORT, ofport=IVN_TUNNEL_OFPORT,
                          type="vxlan", **{"options:remote_ip": "flow", "options:key": "flow"})
        self.ovs.add_bridge(UNDERLAY_BRIDGE, dpid=host.dpid ^ (1 << 31))
        self.ovs.ofctl("add-flow", UNDERLAY_BRIDGE, "priority=0,actions=NORMAL")
        mtu = str(self.topology.underlay.mtu)
        self.ns.ip("link", "set", UNDERLAY_BRIDGE, "mtu", mtu)
        self.ns.ip("link", "set", UNDERLAY_BRIDGE, "up")
        prefixlen = self.topology.underlay.hosts.prefixlen
        self.ns.ip("addr", "add", f"{host.underlay_ip}/{prefixlen}", "dev", UNDERLAY_BRIDGE)
        # Weave endpoint addresses are reached on-link over the underlay, like host addresses.
        self.ns.ip("route", "add", str(self.topology.underlay.weave_endpoints), "dev",
                   UNDERLAY_BRIDGE)
        return self

    def plug_uplink(self) -> None:
        """After the fabric made the veth: the uplink joins br-ul with its topology port."""
        port = self.topology.ports(self.name)[self.topology.hosts[self.name].switch]
        self.ns.ip("link", "set", UPLINK, "mtu", str(self.topology.underlay.mtu))
        self.ovs.add_port(UNDERLAY_BRIDGE, UPLINK, ofport=port)

    def add_vm(self, vm: Vm) -> Netns:
        """A VM: a namespace on a veth into br-int, configured as a tenant would (address in
        its IVN prefix, default route via the IVN gateway)."""
        ivn = self.policy.ivns[vm.ivn]
        net = next(n for n in ivn.cidrs if vm.ip in n)
        ns = self.lab.netns(f"vm-{vm.name}")
        self.lab.veth(ns, "eth0", self.ns, vm.port)
        ns.ip("link", "set", "eth0", "address", vm.mac)
        ns.ip("addr", "add", f"{vm.ip}/{net.prefixlen}", "dev", "eth0")
        ns.ip("route", "add", "default", "via", str(ivn.gateway))
        ns.no_offload("eth0")
        self.ns.no_offload(vm.port)
        self.ovs.add_port(INTEGRATION_BRIDGE, vm.port)
        self.vms[vm.name] = ns
        return ns

    def add_clear_leg(self, slot: int, local_endpoint: str, remote_endpoint: str,
                      vni: int) -> None:
        """A leg's tunnel port without IPsec, for tests of the OpenFlow side: a kernel VXLAN
        device `nwv<slot>` between the leg's endpoint addresses (on lo), so the fabric steers
        it like the real ESP packets. The tunnel agent builds the real one."""
        dev = leg_port_name(slot)
        self.ns.ip("addr", "add", f"{local_endpoint}/32", "dev", "lo")
        self.ns.ip("link", "add", dev, "type", "vxlan", "id", str(vni), "local", local_endpoint,
                   "remote", remote_endpoint, "dstport", "4789")
        self.ns.ip("link", "set", dev, "up")
        self.ns.no_offload(dev)
        self.ovs.add_port(INTEGRATION_BRIDGE, dev, ofport=leg_ofport(slot))

    def remove_clear_leg(self, slot: int, local_endpoint: str) -> None:
        dev = leg_port_name(slot)
        self.ovs.vsctl("--if-exists", "del-port", INTEGRATION_BRIDGE, dev)
        self.ns.ip("link", "del", dev, check=False)
        self.ns.ip("addr", "del", f"{local_endpoint}/32", "dev", "lo", check=False)


@dataclass
class EmulatedFabric:
    lab: Lab
    topology: Topology
    controller: str
    mgmt: ManagementNet
    switch_tls: TlsFilePaths | None = None
    ns: Netns = field(init=False)
    ovs: PrivateOvs = field(init=False)

    def build(self, hosts: dict[str, EmulatedHost]) -> EmulatedFabric:
        self.ns = self.lab.netns("fabric")
        self.mgmt.attach(self.ns)
        self.ovs = PrivateOvs(self.lab, self.ns, "fabric").start(tls=self.switch_tls)
        mtu = self.topology.underlay.mtu
        for name, switch in sorted(self.topology.switches.items()):
            self.ovs.add_bridge(name, dpid=switch.dpid, controller=self.controller)
            self.ovs.vsctl("set", "controller", name, "max_backoff=1000")
        for link in self.topology.links:
            a, b = link.a, link.b
            if a in self.topology.hosts or b in self.topology.hosts:
                host, switch = (a, b) if a in self.topology.hosts else (b, a)
                self.lab.veth(hosts[host].ns, UPLINK, self.ns, self.port_name(switch, host),
                              mtu=mtu)
                self._plug(switch, host)
                hosts[host].plug_uplink()
            else:
                self.lab.veth(self.ns, self.port_name(a, b), self.ns, self.port_name(b, a),
                              mtu=mtu)
                self._plug(a, b)
                self._plug(b, a)
        return self

    @staticmethod
    def port_name(switch: str, neighbour: str) -> str:
        return f"{switch}-{neighbour}"[:15]

    def _plug(self, switch: str, neighbour: str) -> None:
        port = self.topology.ports(switch)[neighbour]
        self.ovs.add_port(switch, self.port_name(switch, neighbour), ofport=port)

    def set_link(self, a: str, b: str, up: bool) -> None:
        """Take a fabric link down (or up) at both ends, as a cut cable would."""
        state = "up" if up else "down"
        for switch, neighbour in ((a, b), (b, a)):
            if switch in self.topology.switches:
                self.ns.ip("link", "set", self.port_name(switch, neighbour), state)


@dataclass
class EmulatedNetwork:
    """A topology's hosts, VMs and fabric, with switches pointed at one controller."""

    lab: Lab
    topology: Topology
    policy: Policy
    controller_port: int
    mgmt: ManagementNet = field(init=False)
    hosts: dict[str, EmulatedHost] = field(default_factory=dict, init=False)
    fabric: EmulatedFabric = field(init=False)

    def build(self, vms: list[str] | None = None) -> EmulatedNetwork:
        self.mgmt = ManagementNet(self.lab)
        target = f"tcp:{self.mgmt.controller_ip}:{self.controller_port}"
        for name in sorted(self.topology.hosts):
            self.hosts[name] = EmulatedHost(self.lab, self.topology, self.policy, name, target,
                                            self.mgmt).build()
        self.fabric = EmulatedFabric(self.lab, self.topology, target, self.mgmt)
        self.fabric.build(self.hosts)
        for vm_name in sorted(vms if vms is not None else self.topology.vms):
            vm = self.topology.vms[vm_name]
            self.hosts[vm.host].add_vm(vm)
        return self

    @property
    def controller_ip(self) -> str:
        return str(self.mgmt.controller_ip)

    def vm(self, name: str) -> Netns:
        return self.hosts[self.topology.vms[name].host].vms[name]

    def ping(self, src: str, dst_ip: str, count: int = 1, wait: float = 1) -> bool:
        result = self.vm(src).run("ping", "-n", "-c", str(count), "-W", str(wait), dst_ip,
                                  check=False, timeout=count * wait + 10)
        return result.returncode == 0

    def ping_popen(self, src: str, dst_ip: str, interval: float,
                   count: int) -> subprocess.Popen[str]:
        """A long ping run in the background; its output tells which replies came back."""
        cmd = self.vm(src).cmd("ping", "-n", "-i", str(interval), "-c", str(count), "-W", "1",
                               dst_ip)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        return self.lab.process(proc, f"ping from {src}")

    def gateway_mac(self, ivn: str) -> str:
        return gateway_mac(self.policy.ivns[ivn])
