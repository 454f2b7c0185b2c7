"""The weave tunnel benchmark (`scripts/bench-tunnel`).

On two emulated compute hosts (private OVS, charon with kernel-libipsec, `nwc agent`; see
tunnel_lab.py) with the controller's tunnel part in this process:

1. Time to first packet: a VM sends a UDP datagram every millisecond to its partner across a
   weave that does not exist yet; the clock starts when admission is asked for and stops when
   the first datagram arrives, so it covers the controller, both agents and IKE. Before the
   SA exists every datagram is dropped by the blackhole route. Repeated a few times, median.
   The VMs know each other's MAC (as NWC's gateway would answer their ARP locally), so the
   number is the tunnel's, not the VM's ARP retry timer's.
2. Throughput: iperf3 between the same two VMs through the encrypted weave, then through a
   plain VXLAN port between the same two hosts (same bridges, same VMs), in the same run.

The last line is `RESULT first_packet_ms=<x> encrypted_vs_plain_throughput=<x>`. Numbers are
printed, never asserted: a benchmark measures, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES, Config
from nwc.controller import Controller
from nwc.lab.netns import Lab, wait_for
from nwc.lab.tunnel_lab import TWO_HOSTS, TunnelLab
from nwc.policy import load_policy
from nwc.topology import parse_topology_text
from nwc.tunnels import tunnels_for
from nwc.weave import State, Weave

PYTHON = "/usr/bin/python3"
PLAIN_PORT = "nwp0"
PLAIN_OFPORT = 9999
PLAIN_VNI = 4242

RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000)); s.settimeout(60)
s.recv(2048)
print(repr(time.time()), flush=True)
"""
SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.time() + 60
while time.time() < end:
    try:
        s.sendto(b"first-packet probe", (sys.argv[1], 9000))
    except OSError:
        pass  # no route yet (the blackhole answers EINVAL): keep trying
    time.sleep(0.001)
"""


def first_packet_ms(lab: Lab, tl: TunnelLab, controller: Controller) -> float:
    """Admission to the first datagram through the encrypted tunnel, in milliseconds."""
    web1, db1 = tl.vm("web1"), tl.vm("db1")
    # In NWC the distributed gateway answers a VM's ARP on its own host; here the VMs are
    # bridged across the weave, so without this the first datagram would wait for the VM's
    # next ARP retry (a second apart) rather than for the tunnel.
    for vm, peer in ((web1, "db1"), (db1, "web1")):
        other = tl.topology.vms[peer]
        vm.ip("neigh", "replace", str(other.ip), "lladdr", other.mac, "dev", "eth0",
              "nud", "permanent")
    out = lab.directory("bench") / f"receiver-{time.monotonic_ns()}.out"
    receiver = lab.process(db1.popen([PYTHON, "-c", RECEIVER], log=out), "receiver")
    time.sleep(0.3)  # let it bind
    sender = lab.process(web1.popen([PYTHON, "-c", SENDER, str(tl.topology.vms["db1"].ip)]),
                         "sender")
    slot = 0  # one weave at a time: it always gets the lowest slot
    tl.connect("web1", "db1", slot)  # the pipeline's flows exist before the port does
    started = time.time()
    weave = controller.call(controller.weaver.create,
                            WeaveRequest("acme-web", "globex-db", 600, 10, "gold"))
    assert isinstance(weave, Weave) and weave.legs[0].slot == slot, weave
    receiver.wait(60)
    arrived = float(out.read_text().split()[-1])
    sender.kill()
    sender.wait()
    _end(tl, controller, weave)
    return (arrived - started) * 1000


def _end(tl: TunnelLab, controller: Controller, weave: Weave) -> None:
    controller.call(controller.weaver.terminate, weave.id)
    tl.disconnect(weave.legs[0].slot)


def iperf_mbps(lab: Lab, tl: TunnelLab, seconds: int) -> float:
    db1 = tl.vm("db1")
    server = lab.process(db1.popen(["iperf3", "-s", "-1"]), "iperf3 server")
    time.sleep(0.3)
    result = tl.vm("web1").run("iperf3", "-c", str(tl.topology.vms["db1"].ip), "-t",
                               str(seconds), "-J", timeout=seconds + 30)
    server.wait(10)
    data = json.loads(result.stdout)
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def plain_vxlan(tl: TunnelLab) -> None:
    """A VXLAN port without IPsec between the two hosts' underlay addresses, joining the same
    two VMs: the comparison for the encrypted weave."""
    hosts = tl.hosts
    for name, peer in (("h1", "h2"), ("h2", "h1")):
        host = hosts[name]
        host.ns.ip("link", "add", PLAIN_PORT, "type", "vxlan", "id", str(PLAIN_VNI), "local",
                   str(host.underlay_ip), "remote", str(hosts[peer].underlay_ip), "dstport",
                   "4790", "nolearning")
        host.ns.ip("link", "set", PLAIN_PORT, "up")
        host.ovs.add_port("br-int", PLAIN_PORT, ofport=PLAIN_OFPORT)
    for vm_name in ("web1", "db1"):
        vm = tl.topology.vms[vm_name]
        ovs = hosts[vm.host].ovs
        port = ovs.ofport(vm.port)
        ovs.ofctl("add-flow", "br-int", f"priority=100,in_port={port},actions=output:"
                                         f"{PLAIN_OFPORT}")
        ovs.ofctl("add-flow", "br-int", f"priority=100,in_port={PLAIN_OFPORT},actions=output:"
                                         f"{port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="first-packet measurements")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 duration")
    args = parser.parse_args(argv)
    policy = load_policy([SHIPPED_POLICIES])
    topo = parse_topology_text(TWO_HOSTS, policy)
    with Lab() as lab:
        tl = TunnelLab(lab, topo).build()
        tl.start_agents()
        controller = Controller(Config(policy, topo, (SHIPPED_POLICIES,), Path("bench")),
                                lab.directory("controller"))
        part = tunnels_for(controller, tl.ovsdb_targets(), poll_interval=0.05)
        controller.add_part(part)
        controller.start()
        part.start()
        try:
            samples = []
            for trial in range(args.trials):
                ms = first_packet_ms(lab, tl, controller)
                wait_for(part.drained, 30, "teardown between trials")
                samples.append(ms)
                print(f"trial {trial + 1}: first packet {ms:.1f} ms after admission")
            first = statistics.median(samples)

            weave = controller.call(controller.weaver.create,
                                    WeaveRequest("acme-web", "globex-db", 600, 10, "gold"))
            assert isinstance(weave, Weave), weave
            tl.connect("web1", "db1", weave.legs[0].slot)
            wait_for(lambda: controller.call(
                lambda: controller.weaver.live[weave.id].state) is State.ACTIVE, 30, "active")
            encrypted = iperf_mbps(lab, tl, args.seconds)
            print(f"encrypted weave (VXLAN in ESP, kernel-libipsec): {encrypted:.1f} Mbit/s")
            _end(tl, controller, weave)
            wait_for(part.drained, 30, "teardown")
            plain_vxlan(tl)
            plain = iperf_mbps(lab, tl, args.seconds)
            print(f"plain VXLAN, same hosts and VMs: {plain:.1f} Mbit/s")
        finally:
            part.stop()
            controller.stop()
    print(f"RESULT first_packet_ms={first:.1f} encrypted_vs_plain_throughput="
          f"{encrypted / plain:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
