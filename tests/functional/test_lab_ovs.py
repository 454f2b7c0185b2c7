"""The private OVS harness: an instance per namespace, secure bridges, cleanup by pid/name."""

from __future__ import annotations

import pytest

from nwc.lab.netns import Lab
from nwc.lab.ovs import PrivateOvs

pytestmark = pytest.mark.functional


def test_secure_bridge_forwards_only_what_flows_allow_and_cleanup_removes_everything() -> None:
    with Lab() as lab:
        host = lab.netns("h1")
        vm1, vm2 = lab.netns("v1"), lab.netns("v2")
        ovs = PrivateOvs(lab, host, "h1").start()
        ovs.add_bridge("br-int", dpid=0x42)
        lab.veth(vm1, "eth0", host, "vm1")
        lab.veth(vm2, "eth0", host, "vm2")
        vm1.ip("addr", "add", "192.0.2.10/26", "dev", "eth0")
        vm2.ip("addr", "add", "192.0.2.11/26", "dev", "eth0")
        ovs.add_port("br-int", "vm1", ofport=1)
        ovs.add_port("br-int", "vm2", ofport=2)
        assert (ovs.ofport("vm1"), ovs.ofport("vm2")) == (1, 2)
        assert ovs.vsctl("get", "bridge", "br-int", "fail_mode") == "secure"
        # fail_mode=secure with an empty table: nothing crosses.
        assert vm1.run("ping", "-c1", "-W1", "192.0.2.11", check=False).returncode != 0
        ovs.ofctl("add-flow", "br-int", "priority=1,actions=NORMAL")
        assert vm1.run("ping", "-c1", "-W2", "192.0.2.11", check=False).returncode == 0
        names = [host.name, vm1.name, vm2.name]
        pids = [p.pid for p in ovs._procs]
        rundir = ovs.rundir
    assert not any(_netns_exists(n) for n in names)
    assert not any(_pid_alive(p) for p in pids)
    assert not rundir.exists()


def _netns_exists(name: str) -> bool:
    from pathlib import Path

    return Path("/run/netns", name).exists()


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
