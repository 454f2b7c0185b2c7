"""`HostNetwork` keeps its view of a real kernel across passes only while the kernel is
quiet: a change anyone makes sends a netlink notification, and the next pass reads again.
Its reads (`nwc.rtnetlink`) see what pyroute2's full dumps see, with the kernel's filters and
without. Runs inside network namespaces of its own (removed by name at the end)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from nwc.lab.netns import Lab, unique_prefix

pytestmark = pytest.mark.functional


def _run_in_netns(prefix: str, script: str) -> dict[str, Any]:
    """What `script` prints (JSON), run by Python in a network namespace of its own."""
    with Lab(unique_prefix(prefix)) as lab:
        ns = lab.netns("net")
        done = subprocess.run(ns.cmd(sys.executable, "-c", script), capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# Runs inside the namespace: each step's answer, and how many dumps it took.
INSIDE = r"""
import ipaddress, json, subprocess
from nwc.hostnet import HostNetwork

dst = ipaddress.IPv4Address("100.100.7.2")
clock = [0.0]
net = HostNetwork(clock=lambda: clock[0])
dumps = [0]
real = net._reader.routes
def counted():
    dumps[0] += 1
    return real()
net._reader.routes = counted

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
    out = _run_in_netns("hn", INSIDE)
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


# Runs inside the namespace: a leg's worth of kernel state, and beside it a route in table
# 220 (kernel-libipsec's) and the local table's routes for the addresses; then what pyroute2's
# full dumps show of it (parsed whole, filtered in Python: the agent's reads before) and what
# the reader shows, with strict checking and without.
FILTERS = r"""
import json, struct, subprocess
from pyroute2 import IPRoute
from nwc.rtnetlink import NetlinkReader, route_dump_request

for command in ["link add ul0 type veth peer name ul0p", "link set lo up", "link set ul0 up",
                "addr add 100.64.128.1/32 dev ul0", "addr add 100.100.7.1/32 dev lo",
                "route add blackhole 100.100.7.2/32",
                "route add 100.64.128.2/32 dev ul0 scope link src 100.64.128.1",
                "route add 100.100.7.2/32 dev ul0 table 220",
                "link add nwv0 type vxlan id 1000 local 100.100.7.1 remote 100.100.7.2 "
                "dstport 4789 nolearning",
                "link set nwv0 up"]:
    subprocess.run(["ip", *command.split()], check=True)
ipr = IPRoute()
links = {m.get_attr("IFLA_IFNAME"): [m["index"], bool(m["flags"] & 1)] for m in ipr.get_links()}
out = {"full": {
    "links": links,
    "addresses": sorted([m["index"], m.get_attr("IFA_ADDRESS")] for m in ipr.get_addr(family=2)
                        if m["prefixlen"] == 32),
    "routes": sorted([m.get_attr("RTA_DST"), m["type"], m.get_attr("RTA_OIF"),
                      m.get_attr("RTA_PREFSRC")]
                     for m in ipr.get_routes(family=2, table=254) if m["dst_len"] == 32)}}
for strict in (True, False):
    reader = NetlinkReader()
    if not strict:
        reader.strict = reader._set_strict(False)
    dump = reader.links()
    raw, _ = reader._ask(route_dump_request(99))
    named = {name: reader.link(name) for name in links}
    out[str(strict)] = {
        "strict": reader.strict, "complete": dump.complete, "dumped": sorted(dump.links),
        "links": {name: [link.index, link.up] for name, link in named.items()},
        "addresses": sorted(map(list, reader.addresses().addresses)),
        "routes": sorted([destination, r.type, r.oif, r.src]
                         for destination, routes in reader.routes().routes.items()
                         for r in routes),
        # The tables the kernel sent routes of: what its filter left to Python.
        "tables": sorted({m[20] for m in raw}),
        "vxlan": list(dump.links["nwv0"].vxlan()),
    }
print(json.dumps(out))
"""


def test_the_reads_see_what_full_dumps_see_with_the_kernels_filters_and_without() -> None:
    out = _run_in_netns("hf", FILTERS)
    full = out["full"]
    # Sanity: table 220's route to the peer's VTEP is not the main table's.
    assert [r for r in full["routes"] if r[0] == "100.100.7.2"] == [["100.100.7.2", 6, None, None]]
    for strict in ("True", "False"):
        seen = out[strict]
        assert seen["links"] == full["links"], strict
        assert seen["addresses"] == full["addresses"], strict
        assert seen["routes"] == full["routes"], strict
        assert seen["vxlan"] == [1000, "100.100.7.1", "100.100.7.2", 4789, 1500], strict
        # The kernel (4.15 on) sends only the VXLAN devices, strict checking or not.
        assert not seen["complete"] and seen["dumped"] == ["nwv0"], strict
    # With strict checking (4.20 on) the kernel sends the main table alone; without, every
    # table comes back (local, main, 220) and the reader keeps only the main table's.
    assert out["True"]["strict"] and out["True"]["tables"] == [254]
    assert not out["False"]["strict"] and {220, 254, 255} <= set(out["False"]["tables"])
