"""`HostNetwork` keeps its view of a real kernel across passes only while the kernel is
quiet: a change anyone makes sends a netlink notification, and the next pass reads again.
Runs inside a network namespace of its own (removed by name at the end)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nwc.lab.netns import Lab, unique_prefix

pytestmark = pytest.mark.functional

# Runs inside the namespace: each step's answer, and how many dumps it took.
INSIDE = r"""
import ipaddress, json, subprocess
from nwc.hostnet import HostNetwork

dst = ipaddress.IPv4Address("100.100.7.2")
clock = [0.0]
net = HostNetwork(clock=lambda: clock[0])
dumps = [0]
real = net._ipr.get_routes
def counted(*args, **kwargs):
    dumps[0] += 1
    return real(*args, **kwargs)
net._ipr.get_routes = counted

def one_pass(check):
    before = dumps[0]
    with net.one_pass():
        answer = check()
    clock[0] += 0.1
    return [answer, dumps[0] - before]

out = {}
out["make"] = one_pass(lambda: net.ensure_blackhole(dst) or net.has_blackhole(dst))
out["after_own_change"] = one_pass(lambda: net.has_blackhole(dst))
out["settled"] = one_pass(lambda: net.has_blackhole(dst))
out["quiet"] = one_pass(lambda: net.has_blackhole(dst))
subprocess.run(["ip", "route", "del", "blackhole", f"{dst}/32"], check=True)
out["after_outside_delete"] = one_pass(lambda: net.has_blackhole(dst))
out["put_back"] = one_pass(lambda: net.ensure_blackhole(dst) or net.has_blackhole(dst))
subprocess.run(["ip", "link", "add", "nwveth0", "type", "veth", "peer", "name", "nwveth1"],
               check=True)
out["after_outside_link"] = one_pass(lambda: net.link_exists("nwveth0"))
out["settled_again"] = one_pass(lambda: net.link_exists("nwveth0"))
out["quiet_again"] = one_pass(lambda: net.link_exists("nwveth0"))
print(json.dumps(out))
"""


def test_a_kept_view_of_the_kernel_follows_outside_changes() -> None:
    with Lab(unique_prefix("hn")) as lab:
        ns = lab.netns("net")
        done = subprocess.run(ns.cmd(sys.executable, "-c", INSIDE), capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["make"] == [True, 2]  # the first read, and the read after its own change
    assert out["after_own_change"] == [True, 1]  # its own change noticed: read again
    # A dump just after a notification may not show all of what it announced (a route's
    # deletion is sent before the route leaves the table): one more pass reads again.
    assert out["settled"] == [True, 1]
    assert out["quiet"] == [True, 0]  # nothing changed: the kept view answers
    assert out["after_outside_delete"] == [False, 1]  # `ip route del`, seen by the next pass
    assert out["put_back"] == [True, 2]  # read again (not settled), and after the add
    assert out["after_outside_link"] == [True, 1]  # a new device: seen too
    assert out["settled_again"] == [True, 1]
    assert out["quiet_again"] == [True, 0]
