"""`fabric-link A B down|up` in the lab's Mininet CLI: cut (or mend) a fabric link at both ends.

The fabric switches are bridges of one private OVS in the lab's fabric namespace, not Mininet
nodes, so Mininet's own `link s1 s2 down` answers `src not in network`. A fabric link is a veth
pair: between two switches both ends are in the fabric namespace (`<switch>-<neighbour>`);
between a switch and a compute host the host's end is its uplink in the host's namespace.
Setting both ends down is what a cut cable looks like to each side (and to NWC, which hears of
it from the switches' port status).

Parsing and the commands are pure (tested without a lab); running them is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nwc.lab.host import UPLINK, EmulatedFabric
from nwc.topology import Topology, link_key

COMMAND = "fabric-link"
USAGE = f"usage: {COMMAND} NODE NODE down|up (a link of the topology's fabric)"


class FabricLinkUsage(ValueError):
    """A `fabric-link` line that does not name a fabric link and a state."""


@dataclass(frozen=True)
class LinkChange:
    a: str
    b: str
    up: bool


def parse(line: str, topology: Topology) -> LinkChange:
    """`s1 s2 down` (the arguments after the command) as a change of one fabric link."""
    args = line.split()
    if len(args) != 3 or args[2] not in ("up", "down"):
        raise FabricLinkUsage(USAGE)
    a, b, state = args
    for node in (a, b):
        if node not in topology.switches and node not in topology.hosts:
            what = "a VM (its link is Mininet's: `link`)" if node in topology.vms else \
                "not a fabric switch or compute host of the topology"
            raise FabricLinkUsage(f"{node} is {what}; {USAGE}")
    if not any(link.key == link_key(a, b) for link in topology.links):
        raise FabricLinkUsage(f"the topology has no link between {a} and {b}")
    return LinkChange(a, b, state == "up")


def commands(change: LinkChange, topology: Topology, fabric_netns: str,
             host_netns: Mapping[str, str]) -> list[list[str]]:
    """The commands that set both ends of the link down (or up): a switch's end is its port
    in the fabric namespace, a compute host's its uplink in its own namespace."""
    state = "up" if change.up else "down"
    out = []
    for node, neighbour in ((change.a, change.b), (change.b, change.a)):
        if node in topology.switches:
            netns, dev = fabric_netns, EmulatedFabric.port_name(node, neighbour)
        else:
            netns, dev = host_netns[node], UPLINK
        out.append(["ip", "netns", "exec", netns, "ip", "link", "set", "dev", dev, state])
    return out


def fabric_link(line: str, topology: Topology, fabric_netns: str,
                host_netns: Mapping[str, str],
                runner: Callable[[Sequence[str]], Any]) -> str:
    """Run a `fabric-link` line (its arguments); what was done. Raises FabricLinkUsage for
    a bad line, and whatever `runner` raises for a command that failed."""
    change = parse(line, topology)
    for cmd in commands(change, topology, fabric_netns, host_netns):
        runner(cmd)
    return (f"link {change.a}-{change.b} {'up' if change.up else 'down'} at both ends "
            "(NWC hears of it from the switches' port status)")


def command_line(line: str) -> str:
    """A CLI line with `fabric-link` spelt as the method's name: cmd.Cmd reads a command name
    of identifier characters only, so `fabric-link` would be taken for `fabric`."""
    head, _, rest = line.strip().partition(" ")
    if head == COMMAND:
        return f"fabric_link {rest}"
    return line


def mininet_link_hint(line: str, topology: Topology) -> str | None:
    """For Mininet's `link` given a fabric switch (which it does not know): the command that
    does it; None when `link` can handle the line."""
    args = line.split()
    if any(arg in topology.switches for arg in args[:2]):
        return (f"fabric switches are not Mininet nodes: use `{COMMAND} {line.strip()}` "
                "(both ends of the link)")
    return None
