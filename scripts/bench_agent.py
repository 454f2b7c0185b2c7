"""Tunnel agent benchmark: what one steady-state reconciliation pass costs the host's kernel
networking, against one full read of the same kernel state through pyroute2.

In a network namespace of its own (made here, removed by name at the end), the real agent
(`nwc.agent.Agent`) with the real `nwc.hostnet.HostNetwork` builds 1, then 10, then 100 legs
(a VXLAN device, two /32 addresses, a /32 link route and a /32 blackhole route each, all in
100.64.0.0/10) and is then timed over many passes in which nothing changes. Its OVSDB and IKE
daemon are in-memory stand-ins (every leg's record present, every SA installed), so what is
measured is the agent's own pass: reading the records, and checking each leg's routes,
addresses and device over netlink. The agent reads the kernel again only after a change
notification or once its view is MAX_VIEW_AGE_S old (by a clock that moves one agent interval,
0.1 s, per pass), so the pass's time is a mean over passes that read and passes that do not.

Side by side, in the same namespace and run, the baseline: one route dump, one address dump
and one link dump per pass through pyroute2 (as the agent read the kernel before it had
`nwc.rtnetlink`), parsed in Python into sets and every leg's state looked up in them. A third
column, the same agent over a kernel stand-in that answers at once, is the floor of the
pass's non-netlink work (records, statuses); a fourth, one full read by the agent's reader
(`nwc.rtnetlink.NetlinkReader`: links, addresses, routes), what a pass that reads costs it.

Netlink requests are counted as messages sent on the agent's rtnetlink sockets (pyroute2's for
changes, the reader's for reads) and the baseline's; a dump counts as one request, however
many answers it brings.

Needs root. Last line:
    RESULT agent_pass_ms_100_legs=<x> ratio_vs_dump_baseline_100=<x>
           netlink_requests_per_pass_100=<x>   (one line)
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from nwc.agent import Agent
from nwc.hostnet import RT_TABLE_MAIN, RTN_BLACKHOLE, ChangeMonitor, HostNetwork
from nwc.ike import InitiateResult
from nwc.lab.netns import Lab
from nwc.pki import Secret, new_psk
from nwc.rtnetlink import NETLINK_ROUTE, NetlinkReader
from nwc.tunnel import (
    RECORD_PREFIX,
    LegRecord,
    Phase,
    SaInfo,
    TunnelSpec,
)

COUNTS = (1, 10, 100)
DEFAULT_INTERVAL_S = 0.1  # `nwc agent --interval`
UNDERLAY_DEVICE = "ul0"
NLM_F_DUMP = 0x300
ENDPOINTS = ipaddress.IPv4Address("100.64.128.0")  # underlay /32s, two per leg
VTEPS = ipaddress.IPv4Address("100.100.0.0")  # VXLAN endpoints, two per leg


def leg_spec(i: int) -> TunnelSpec:
    return TunnelSpec(
        weave_id=f"wv-{i + 1:06d}", slot=i, side="requester", host="h1", peer_host="h2",
        backend="strongswan", vni=1000 + i,
        local_endpoint=ENDPOINTS + 2 * i + 1, remote_endpoint=ENDPOINTS + 2 * i + 2,
        local_vtep=VTEPS + 2 * i + 1, remote_vtep=VTEPS + 2 * i + 2, auth="psk",
        local_id=f"h1.s{i}.wv.nwc", remote_id=f"h2.s{i}.wv.nwc",
        ike_proposals=("aes256gcm16-prfsha256-x25519",), esp_proposals=("aes256gcm16",),
        rekey_s=3600, underlay_mtu=1500)


# -- stand-ins for OVSDB and charon: in memory, no netlink, so they cost the pass nothing ------

class StandInDb:
    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.ports: dict[str, dict[str, Any]] = {}

    def external_ids(self, prefix: str = "nwc-") -> dict[str, str]:
        return {k: v for k, v in self.ids.items() if k.startswith(prefix)}

    def update_external_ids(self, set_keys: Mapping[str, str] | None = None,
                            delete_keys: Iterable[str] = ()) -> None:
        for key in delete_keys:
            self.ids.pop(key, None)
        self.ids.update(set_keys or {})

    def other_config(self) -> dict[str, str]:
        return {}

    def update_other_config(self, set_keys: Mapping[str, str] | None = None,
                            delete_keys: Iterable[str] = ()) -> None:
        pass

    def add_port(self, bridge: str, columns: Mapping[str, Any]) -> None:
        self.ports[columns["name"]] = dict(columns)

    def delete_port(self, name: str) -> None:
        self.ports.pop(name, None)

    def interface(self, name: str) -> dict[str, Any] | None:
        port = self.ports.get(name)
        return None if port is None else {"ofport": port["ofport_request"], "error": None}

    def bridge_datapath_type(self, bridge: str) -> str | None:
        return ""


class StandInIke:
    """Every loaded connection has an installed SA: the agent has nothing to start."""

    def __init__(self) -> None:
        self.conns: set[str] = set()

    def load_connection(self, conn: dict[str, Any]) -> None:
        self.conns.update(conn)

    def unload_connection(self, name: str) -> None:
        self.conns.discard(name)

    def connections(self) -> set[str]:
        return set(self.conns)

    def load_shared(self, secret_id: str, secret: Secret, owners: list[str]) -> None:
        pass

    def unload_shared(self, secret_id: str) -> None:
        pass

    def load_key(self, der: Secret, kind: str = "any") -> str:
        raise NotImplementedError("the benchmark's legs are PSK")

    def unload_key(self, key_id: str) -> None:
        pass

    def initiate(self, name: str, timeout_s: float = 10.0) -> InitiateResult:
        return InitiateResult(True)

    def terminate(self, name: str, timeout_s: float = 10.0) -> None:
        pass

    def sas(self) -> dict[str, SaInfo]:
        return {name: SaInfo("ESTABLISHED", "INSTALLED", child_id=f"c-{name}",
                             ike_id=f"i-{name}") for name in self.conns}


class StandInNet:
    """A kernel that has everything already: the agent's pass without netlink."""

    def one_pass(self) -> AbstractContextManager[None]:
        return nullcontext()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: True if name == "link_exists" else None


# -- counting netlink requests ----------------------------------------------------------------

class RequestCounter:
    """Counts the netlink messages a pyroute2 IPRoute sends (one per request; a dump is one),
    and those sent on the sockets it wraps (`counting`)."""

    def __init__(self, ipr: IPRoute) -> None:
        self.requests = self.dumps = 0
        core = ipr.asyncore
        core.send = self._counted(core.send)

    def _counted(self, send: Callable[..., int]) -> Callable[..., int]:
        def counting(data: bytes, flags: int = 0) -> int:
            self.requests += 1
            (msg_flags,) = struct.unpack_from("=H", data, 6)
            if msg_flags & NLM_F_DUMP == NLM_F_DUMP:
                self.dumps += 1
            return send(data, flags)
        return counting

    def counting(self, sock: socket.socket) -> CountedSocket:
        return CountedSocket(sock, self._counted(sock.send))


class CountedSocket:
    """A netlink socket for `NetlinkReader` whose requests a RequestCounter counts."""

    def __init__(self, sock: socket.socket, send: Callable[..., int]) -> None:
        self.sock, self.send = sock, send

    def recvmsg(self, bufsize: int) -> tuple[bytes, list[Any], int, Any]:
        return self.sock.recvmsg(bufsize)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.sock.setsockopt(level, option, value)

    def close(self) -> None:
        self.sock.close()


# -- the baseline -----------------------------------------------------------------------------

def baseline_pass(ipr: IPRoute, specs: list[TunnelSpec]) -> int:
    """One dump each of routes, addresses and links, parsed; every leg looked up in them.
    Returns how many legs are complete (a check that it read what the agent built)."""
    routes = set()
    for r in ipr.get_routes(family=2, table=RT_TABLE_MAIN):
        if r["dst_len"] == 32:
            routes.add((r.get_attr("RTA_DST"), r["type"], r.get_attr("RTA_OIF"),
                        r.get_attr("RTA_PREFSRC")))
    addrs = {(a["index"], a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=2)
             if a["prefixlen"] == 32}
    links = {}
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        links[link.get_attr("IFLA_IFNAME")] = (
            link["index"], info.get_attr("IFLA_INFO_KIND") if info is not None else None)
    ul, lo = links[UNDERLAY_DEVICE][0], links["lo"][0]
    complete = 0
    for s in specs:
        complete += ((str(s.remote_vtep), RTN_BLACKHOLE, None, None) in routes
                     and (str(s.remote_endpoint), 1, ul, str(s.local_endpoint)) in routes
                     and (ul, str(s.local_endpoint)) in addrs
                     and (lo, str(s.local_vtep)) in addrs
                     and links.get(s.device, (0, None))[1] == "vxlan")
    return complete


# -- one run inside the namespace ---------------------------------------------------------------

def timed(passes: int, budget_s: float, one: Callable[[], object]) -> tuple[float, int]:
    """Mean milliseconds of one call (the mean, as the cost of the passes that read the
    kernel again is spread over the quiet ones), and how many calls it is the mean of:
    `passes` calls, or fewer (at least 5) once `budget_s` is spent, as a slow pass would
    otherwise hold the run for many minutes."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < passes and (len(samples) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        one()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.mean(samples), len(samples)


class PassClock:
    """Monotonic seconds that move by one agent interval per pass."""

    def __init__(self) -> None:
        self.now = 0.0

    def tick(self) -> None:
        self.now += DEFAULT_INTERVAL_S

    def __call__(self) -> float:
        return self.now


def settle(agent: Agent, db: StandInDb, what: str) -> None:
    for _ in range(20 + len(db.ids)):  # new legs are built a few per pass
        agent.step()
        if all(leg.phase is Phase.INSTALLED for leg in agent.legs.values()):
            return
    phases = {k: (leg.phase, leg.detail) for k, leg in agent.legs.items()
              if leg.phase is not Phase.INSTALLED}
    raise RuntimeError(f"{what}: legs not installed after {20 + len(db.ids)} passes: {phases}")


def inside(passes: int, budget_s: float) -> int:
    subprocess.run(["ip", "link", "add", UNDERLAY_DEVICE, "type", "veth", "peer", "name",
                    f"{UNDERLAY_DEVICE}p"], check=True)
    for dev in (UNDERLAY_DEVICE, f"{UNDERLAY_DEVICE}p", "lo"):
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    # The agent's view of the kernel is kept while the kernel sends no change notification,
    # for at most MAX_VIEW_AGE_S: passes here come back to back, so the view's clock moves by
    # the agent's default interval per pass, and it reads the kernel again as often as it
    # does in production.
    view_clock = PassClock()
    ipr = IPRoute()
    counter = RequestCounter(ipr)  # the agent's own sockets: nothing else uses them
    reads = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          NETLINK_ROUTE)
    reads.settimeout(10.0)
    net = HostNetwork(ipr, ChangeMonitor(), view_clock,
                      NetlinkReader(counter.counting(reads)))
    base_ipr = IPRoute()
    base_counter = RequestCounter(base_ipr)
    reader = NetlinkReader()  # a socket of its own: not counted
    db, ike = StandInDb(), StandInIke()
    agent = Agent(db=db, ike=ike, net=net, backend="strongswan",
                  underlay_device=UNDERLAY_DEVICE, clock=time.monotonic)
    floor_db, floor_ike = StandInDb(), StandInIke()
    floor = Agent(db=floor_db, ike=floor_ike, net=StandInNet(), backend="strongswan",
                  underlay_device=UNDERLAY_DEVICE, clock=time.monotonic)
    specs: list[TunnelSpec] = []
    results = {}
    for n in COUNTS:
        while len(specs) < n:
            spec = leg_spec(len(specs))
            specs.append(spec)
            text = LegRecord(spec, new_psk(), start=True).to_json()
            db.ids[RECORD_PREFIX + spec.key] = floor_db.ids[RECORD_PREFIX + spec.key] = text
        build_start = time.perf_counter()
        settle(agent, db, f"{n} legs")
        build_s = time.perf_counter() - build_start
        settle(floor, floor_db, f"{n} legs, no kernel")
        complete = baseline_pass(base_ipr, specs)
        if complete != n:
            raise RuntimeError(f"the agent built {complete} of {n} legs in the kernel")
        counter.requests = counter.dumps = 0
        agent_ms, runs = timed(passes, budget_s, lambda: (view_clock.tick(), agent.step()))
        requests, dumps = counter.requests / runs, counter.dumps / runs
        base_counter.requests = 0
        base_ms, base_runs = timed(passes, budget_s, lambda: baseline_pass(base_ipr, specs))
        base_requests = base_counter.requests / base_runs
        floor_ms, _ = timed(passes, budget_s, floor.step)
        read_ms, _ = timed(passes, budget_s,
                           lambda: (reader.links(), reader.addresses(), reader.routes()))
        results[n] = (agent_ms, base_ms, requests)
        print(f"{n:4d} legs: agent pass {agent_ms:8.3f} ms (mean of {runs}), "
              f"{requests:6.1f} netlink requests "
              f"({dumps:.1f} dumps)   dump baseline {base_ms:7.3f} ms, {base_requests:.0f} "
              f"requests   ratio {agent_ms / base_ms:6.2f}   agent pass without netlink "
              f"{floor_ms:7.3f} ms   one full read by the agent's reader {read_ms:7.3f} ms; "
              f"building the new legs took {build_s:.2f} s", flush=True)
    base_ipr.close()
    reader.close()
    net.close()
    agent_ms, base_ms, requests = results[100]
    print(f"RESULT agent_pass_ms_100_legs={agent_ms:.3f} "
          f"ratio_vs_dump_baseline_100={agent_ms / base_ms:.2f} "
          f"netlink_requests_per_pass_100={requests:.1f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=200,
                        help="timed passes per leg count (at most)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed passes per leg count and column, after 5")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args.passes, args.budget)
    with Lab() as lab:
        ns = lab.netns("agent")  # nw<pid>-agent, deleted by name when the run ends
        child = subprocess.run(ns.cmd(sys.executable, str(Path(__file__).resolve()),
                                      "--inside", "--passes", str(args.passes),
                                      "--budget", str(args.budget)), check=False)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
