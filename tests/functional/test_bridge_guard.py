"""Real OVS: OVS's hidden in-band flows and fail-open, and NWC's bridge guard removing both.

A br-int configured as docs/deploy.md did (fail_mode=secure, `set-controller ssl:...`, no
connection_mode) gets OVS's in-band flows (priority 180000-180008, NORMAL), which carry TCP
to and from the controller's address and port between any two ports: a VM reaches another
IVN's VM with an empty OpenFlow table. The tunnel part's pass over the host's OVSDB sets
the controllers out-of-band and the bridge secure, and does so again when someone undoes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nwc
from fake_parts import TunnelReports

from nwc.config import SHIPPED_POLICIES
from nwc.lab.netns import Lab, Netns, wait_for
from nwc.lab.ovs import PrivateOvs
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.pki import CertificateAuthority
from nwc.policy import load_policy
from nwc.topology import parse_topology_text
from nwc.tunnels import Tunnels

pytestmark = pytest.mark.functional

CONTROLLER_IP = "198.51.100.1"  # the guide's
VM2_MAC = "02:00:00:00:00:02"


def in_band_flows(ovs: PrivateOvs, bridge: str) -> int:
    """OVS's hidden flows (not in `ovs-ofctl dump-flows`), as deploy.md section 9 counts them."""
    return sum(1 for line in ovs.appctl("bridge/dump-flows", bridge).splitlines()
               if "priority=180" in line)


@pytest.fixture
def host() -> Iterator[tuple[PrivateOvs, Netns]]:
    """h1's OVS with the guide's br-int, and two VMs of different IVNs on it. vm2 also
    answers on the controller's address and port, as any VM may choose to."""
    with Lab() as lab:
        ns = lab.netns("h1")
        ovs = PrivateOvs(lab, ns, "h1").start()
        ovs.vsctl("--may-exist", "add-br", "br-int", "--", "set", "bridge", "br-int",
                  "datapath_type=netdev", "protocols=OpenFlow13", "fail_mode=secure")
        ovs.vsctl("set-controller", "br-int", f"ssl:{CONTROLLER_IP}:6653",
                  "tcp:127.0.0.1:6653")
        vm1, vm2 = lab.netns("vm1"), lab.netns("vm2")
        for vm, port, addr in ((vm1, "vm1", "192.0.2.10/26"), (vm2, "vm2", "192.0.2.70/26")):
            lab.veth(vm, "eth0", ns, port)
            vm.ip("addr", "add", addr, "dev", "eth0")
            vm.no_offload("eth0")
            ns.no_offload(port)
            ovs.add_port("br-int", port)
        vm2.ip("link", "set", "eth0", "address", VM2_MAC)
        vm2.ip("addr", "add", f"{CONTROLLER_IP}/32", "dev", "eth0")
        lab.process(vm2.popen(["python3", "-c", (
            "import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('{CONTROLLER_IP}', 6653)); s.listen()\n"
            "while True: s.accept()[0].close()\n")]), "listener in vm2")
        # vm1 sends to the controller's address at vm2's MAC; vm2 answers from it.
        vm1.ip("route", "add", f"{CONTROLLER_IP}/32", "dev", "eth0")
        vm1.ip("neigh", "replace", CONTROLLER_IP, "lladdr", VM2_MAC, "dev", "eth0",
               "nud", "permanent")
        vm1_mac = vm1.run("cat", "/sys/class/net/eth0/address").stdout.strip()
        vm2.ip("neigh", "replace", "192.0.2.10", "lladdr", vm1_mac, "dev", "eth0",
               "nud", "permanent")
        vm2.ip("route", "add", "192.0.2.10/32", "dev", "eth0", "src", CONTROLLER_IP)
        wait_for(lambda: vm2.run("ss", "-ltn").stdout.count(":6653") > 0, 10,
                 "the listener in vm2")
        yield ovs, vm1


def reaches(vm1: Netns) -> bool:
    """Whether vm1 completes a TCP handshake with vm2 (another IVN) through br-int."""
    return vm1.run("python3", "-c", (
        "import socket\n"
        f"socket.create_connection(('{CONTROLLER_IP}', 6653), timeout=3).close()\n"),
        check=False, timeout=15).returncode == 0


def test_the_guides_bridge_leaks_between_ivns_until_the_guard_sets_it_out_of_band(
        host: tuple[PrivateOvs, Netns], tmp_path: Path) -> None:
    ovs, vm1 = host
    wait_for(lambda: in_band_flows(ovs, "br-int") > 0, 10, "OVS's in-band flows")
    assert ovs.ofctl("dump-flows", "br-int").count("priority") == 0  # NWC's table is empty
    assert reaches(vm1)  # the leak the tester found, through fail_mode=secure

    told = TunnelReports()
    policy = load_policy([SHIPPED_POLICIES])
    part = Tunnels(topology=parse_topology_text(TWO_HOSTS, policy), policy=lambda: policy,
                   ca=CertificateAuthority.load_or_create(tmp_path / "pki",
                                                          now=dt.datetime.now(dt.UTC)),
                   reports=told, ovsdb_targets={"h1": ovs.db_target}, io_wait_s=10)
    try:
        wait_for(lambda: (part.sync(), bool(told.bridges))[1], 20, "the guard's first pass")
        modes = ovs.vsctl("--columns=connection_mode", "--bare", "list", "controller").split()
        assert modes == ["out-of-band", "out-of-band"]
        wait_for(lambda: in_band_flows(ovs, "br-int") == 0, 10, "in-band flows to go")
        assert not reaches(vm1)
        assert [(h, b, [f.old for f in fixed]) for h, b, fixed, _ in told.bridges] == [
            ("h1", "br-int", [None, None])]

        # An operator's mistake while NWC runs: found and undone by a later pass.
        ovs.vsctl("set-fail-mode", "br-int", "standalone")
        wait_for(lambda: (part.sync(), len(told.bridges) > 1)[1], 20, "the guard to see it")
        assert ovs.vsctl("get", "bridge", "br-int", "fail_mode") == "secure"
        assert [f.old for f in told.bridges[1][2]] == ["standalone"]
        part.sync()
        assert len(told.bridges) == 2  # a safe bridge is left alone and nothing said
    finally:
        part.stop()


def test_the_labs_bridges_have_no_in_band_flows(nwc: Nwc) -> None:
    """Every bridge the lab makes, hosts' and fabric's, has a controller or sits beside one:
    none may carry OVS's in-band flows."""
    for ovs in [h.ovs for h in nwc.net.hosts.values()] + [nwc.net.fabric.ovs]:
        for bridge in ovs.vsctl("list-br").split():
            assert in_band_flows(ovs, bridge) == 0, (ovs.name, bridge)
            assert ovs.vsctl("get", "bridge", bridge, "fail_mode") == "secure"
