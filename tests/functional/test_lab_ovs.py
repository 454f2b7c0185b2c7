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


def test_remains_finds_what_a_lab_left_by_its_prefix_and_pids() -> None:
    """`nwc demo` said "nothing left running" without looking: `Lab.remains` looks in the
    system for the lab's namespaces, directories and processes, not in its bookkeeping."""
    import os
    import subprocess

    from nwc.lab.netns import kill_pid, run, unique_prefix

    lab = Lab(unique_prefix("rm"))
    leak_ns = f"{lab.prefix}-leak"
    strays: list[subprocess.Popen[bytes]] = []
    try:
        host = lab.netns("h1")
        PrivateOvs(lab, host, "h1").start(switchd=False)
        up = lab.remains()
        assert f"namespace {host.name}" in up
        assert any("ovsdb-server" in line for line in up)  # found by its run directory
        # What the lab's bookkeeping does not hold: a namespace named with its prefix, a
        # process naming one of its directories, a process someone else was to stop.
        run(["ip", "netns", "add", leak_ns])
        strays.append(subprocess.Popen(["sleep", "60"], start_new_session=True,
                                       env={**os.environ, "LEAK": f"/tmp/{lab.prefix}-x"}))
        strays.append(subprocess.Popen(["sleep", "61"], start_new_session=True))
        lab.watch_pid(strays[1].pid, "a shell Mininet should have stopped")
        lab.close()
        assert lab.remains() == [f"namespace {leak_ns}",
                                 f"process {strays[0].pid} (sleep 60)",
                                 f"process {strays[1].pid} (a shell Mininet should have "
                                 "stopped)"]
    finally:
        for proc in strays:
            kill_pid(proc.pid, timeout=2)
        run(["ip", "netns", "delete", leak_ns], check=False)
        lab.close()
    assert lab.remains() == []
