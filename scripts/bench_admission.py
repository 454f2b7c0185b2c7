"""Admission benchmark: NWC's full admission (bilateral policy, constrained path over every leg,
reservation, durable SQLite commit with its audit record) against a bare networkx shortest path
between the same hosts on the same graph, in the same run.

Two generated fabric families, each at about 100, 1,000 and 10,000 switches:
- `clos`: a sparse three-tier Clos (pods of leaves and four pod spines under a small core).
  A path search here touches a few hundred links, so the bare path is about 30 us and
  admission's fixed costs (policy, audit record, the SQLite writes and the fsync) dominate.
- `fat-tree`: the k-ary fat tree, the usual data-centre fabric. A search touches thousands of
  links, as the fabric size grows.
Each carries 1,000 live weaves before timing starts and keeps about that many while it runs
(each timed admission is followed by an untimed release of a random live weave). Admissions
are timed twice: alone (each waits for its own fsync), and in batches that arrive together and
share one group commit, as the weaver's loop takes them from its queue under load.
Nothing touches the network.

The RESULT line: `admit_p99_ms_1k` and `admit_per_s_1k` (lone admissions on the 1k clos);
`ratio_vs_bare_path_10k` (batched admission / bare path, 10k clos) and
`lone_ratio_vs_bare_path_10k` (the same, alone); `path_only_ratio_vs_bare_path_10k` (the
constrained search alone / bare, 10k clos); and the two ratios on the 10k fat tree
(`fat_tree_ratio_vs_bare_path_10k`, `fat_tree_lone_ratio_vs_bare_path_10k`).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import networkx as nx

from nwc.admission import Denial, WeaveRequest, plan_legs
from nwc.lease import ManualClock
from nwc.policy import (
    AclRule,
    Ivn,
    PartnerRule,
    Policy,
    QosClass,
    SecurityProfile,
    Tenant,
    WeavingPolicy,
)
from nwc.store import Store
from nwc.topology import ComputeHost, Link, Switch, Topology, Underlay, Vm, derived_mac
from nwc.weaver import Weaver


def clos(n_switches: int, n_hosts: int, seed: int) -> tuple[dict, list[Link], dict]:
    """A three-tier Clos: `cores` core switches; pods of 4 pod spines and `leaves` leaves,
    every leaf to every spine of its pod, pod spine j to cores j, j+4, j+8... Leftover
    switches become extra leaves. Hosts sit on leaves, spread evenly."""
    cores = 4 if n_switches <= 1000 else 16
    leaves_per_pod = 20 if n_switches <= 1000 else 48
    pods = max(1, (n_switches - cores) // (4 + leaves_per_pod))
    switches: dict[str, Switch] = {}
    links: list[Link] = []

    def switch(name: str) -> str:
        switches[name] = Switch(name, len(switches) + 1)
        return name

    core = [switch(f"c{i}") for i in range(cores)]
    leaves: list[str] = []
    pod_spines: list[list[str]] = []
    for p in range(pods):
        spines = [switch(f"p{p}s{j}") for j in range(4)]
        pod_spines.append(spines)
        for j, s in enumerate(spines):
            for c in core[j::4]:
                links.append(Link(s, c, 40_000, 0.8))
        for i in range(leaves_per_pod):
            leaves.append(switch(f"p{p}l{i}"))
    extra = n_switches - len(switches)
    for i in range(extra):
        leaves.append(switch(f"p{i % pods}x{i}"))
    for leaf in leaves:
        pod = int(leaf[1:].split("l")[0].split("x")[0])
        for s in pod_spines[pod]:
            links.append(Link(leaf, s, 1_000, 0.8))
    return switches, links, attach_hosts(leaves, n_hosts, seed, links)


def attach_hosts(access: list[str], n_hosts: int, seed: int,
                 links: list[Link]) -> dict[str, ComputeHost]:
    """Hosts spread evenly (with a little jitter) over the access switches, one link each."""
    rnd = random.Random(seed)
    hosts: dict[str, ComputeHost] = {}
    underlay = ipaddress.IPv4Network("100.64.0.0/16")
    for h in range(n_hosts):
        switch = access[(h * 7919 + rnd.randrange(3)) % len(access)]
        name = f"h{h}"
        hosts[name] = ComputeHost(name, switch, underlay[h + 1], 10**9 + h, "strongswan")
        links.append(Link(name, switch, 25_000, 0.8))
    return hosts


def fat_tree(n_switches: int, n_hosts: int, seed: int) -> tuple[dict, list[Link], dict]:
    """The k-ary fat tree (Al-Fares et al.), the usual generated data-centre fabric: k pods of
    k/2 edge and k/2 aggregation switches, every edge to every aggregation switch of its pod,
    aggregation switch j of each pod to core switches j*k/2 .. (j+1)*k/2 - 1; 5k^2/4 switches
    in all, k even and chosen to come closest to `n_switches`. Hosts sit on edge switches."""
    k = min(range(4, 400, 2), key=lambda k: abs(5 * k * k // 4 - n_switches))
    half = k // 2
    switches: dict[str, Switch] = {}
    links: list[Link] = []

    def switch(name: str) -> str:
        switches[name] = Switch(name, len(switches) + 1)
        return name

    core = [switch(f"c{i}") for i in range(half * half)]
    edges: list[str] = []
    for p in range(k):
        aggs = [switch(f"p{p}a{j}") for j in range(half)]
        for j, agg in enumerate(aggs):
            for c in core[j * half:(j + 1) * half]:
                links.append(Link(agg, c, 40_000, 0.8))
        for i in range(half):
            edge = switch(f"p{p}e{i}")
            edges.append(edge)
            for agg in aggs:
                links.append(Link(edge, agg, 10_000, 0.8))
    return switches, links, attach_hosts(edges, n_hosts, seed, links)


FABRICS = {"clos": clos, "fat-tree": fat_tree}


def synthetic_policy(n_pairs: int) -> Policy:
    """Tenant a's IVN i may weave with tenant b's IVN i (tenant-wide partner rules), with caps
    that leave the fabric as the limit. Prefixes are synthetic (10/8): nothing is sent."""
    profile = SecurityProfile("gold", ("aes256gcm16-prfsha256-x25519",), ("aes256gcm16",), "psk",
                              3600, (AclRule("either", "any"),))
    ivns = {}
    for side, other, base in (("a", "b", 0), ("b", "a", n_pairs)):
        rule = WeavingPolicy((PartnerRule(tenant=other),), 1000.0, 10_000.0, 86_400, ("gold",),
                             "standard")
        for i in range(n_pairs):
            k = base + i
            net = ipaddress.IPv4Network(f"10.{k // 256}.{k % 256}.0/24")
            ivns[f"{side}{i}"] = Ivn(f"{side}{i}", side, k + 1, (net,), net[1], rule)
    return Policy({"a": Tenant("a"), "b": Tenant("b")}, ivns, {"gold": profile},
                  {"standard": QosClass("standard", 0, 100)})


def build(n_switches: int, n_pairs: int, seed: int,
          fabric: str = "clos") -> tuple[Policy, Topology]:
    policy = synthetic_policy(n_pairs)
    switches, links, hosts = FABRICS[fabric](n_switches, 2 * n_pairs, seed)
    vms = {}
    host_names = sorted(hosts, key=lambda h: int(h[1:]))
    for i in range(n_pairs):
        for side, host in (("a", host_names[2 * i]), ("b", host_names[2 * i + 1])):
            ivn = policy.ivns[f"{side}{i}"]
            name = f"v{side}{i}"
            vms[name] = Vm(name, host, ivn.name, ivn.cidrs[0][10], derived_mac(name), name[:15])
    underlay = Underlay(ipaddress.IPv4Network("100.64.0.0/16"),
                        ipaddress.IPv4Network("100.96.0.0/12"),
                        ipaddress.IPv4Network("100.112.0.0/12"), 9000)
    return policy, Topology(f"{fabric}{n_switches}", underlay, switches, tuple(links), hosts, vms)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_scale(fabric: str, n_switches: int, live: int, timed: int, batch: int, seed: int,
                state_root: Path) -> dict:
    n_pairs = live + 2 * timed
    policy, topology = build(n_switches, n_pairs, seed, fabric)
    graph = topology.graph()
    clock = ManualClock()
    with tempfile.TemporaryDirectory(dir=state_root, prefix="nwc-bench-") as tmp:
        store = Store(Path(tmp))
        weaver = Weaver(policy=policy, topology=topology, store=store, clock=clock)
        weaver.recover()
        rnd = random.Random(seed)
        for i in range(live):
            result = weaver.create(WeaveRequest(f"a{i}", f"b{i}", 3600, rnd.choice((50, 100, 200))))
            assert not isinstance(result, Denial), result

        def request(i: int) -> tuple[WeaveRequest, str, str]:
            return (WeaveRequest(f"a{i}", f"b{i}", 3600, rnd.choice((50, 100, 200))),
                    topology.vms[f"va{i}"].host, topology.vms[f"vb{i}"].host)

        # A lone request: it waits for its own fsync.
        nwc_s, plan_s, bare_s, denied = [], [], [], 0
        for i in range(live, live + timed):
            req, ha, hb = request(i)
            # Side by side, alternating so that machine noise hits both alike.
            t0 = time.perf_counter()
            nx.shortest_path(graph, ha, hb)
            t1 = time.perf_counter()
            plan_legs(weaver.fabric, [(ha, hb)], req.bandwidth_mbps * 1000)
            t2 = time.perf_counter()
            result = weaver.create(req)
            t3 = time.perf_counter()
            bare_s.append(t1 - t0)
            plan_s.append(t2 - t1)
            nwc_s.append(t3 - t2)
            denied += isinstance(result, Denial)
            weaver.terminate(rnd.choice(sorted(weaver.live)))
        # Requests that arrive together (as the weaver's loop takes them from its queue):
        # one group commit for `batch` admissions, each with its own path, reservation and
        # audit record. Per admission = the batch's time / its size, beside the bare paths
        # of the same pairs.
        group_s, group_bare_s = [], []
        for start in range(live + timed, live + 2 * timed, batch):
            reqs = [request(i) for i in range(start, min(start + batch, live + 2 * timed))]
            t0 = time.perf_counter()
            for _, ha, hb in reqs:
                nx.shortest_path(graph, ha, hb)
            t1 = time.perf_counter()
            with weaver.admission_batch():
                results = [weaver.create(req) for req, _, _ in reqs]
            t2 = time.perf_counter()
            group_bare_s.append((t1 - t0) / len(reqs))
            group_s.append((t2 - t1) / len(reqs))
            denied += sum(isinstance(r, Denial) for r in results)
            for _ in reqs:
                weaver.terminate(rnd.choice(sorted(weaver.live)))
        assert weaver.fabric.violations() == []
        store.close()
    return {
        "switches": len(topology.switches), "links": len(topology.links),
        "live": live, "timed": timed, "denied": denied, "batch": batch,
        "admit_p50_ms": statistics.median(nwc_s) * 1e3, "admit_p99_ms": pct(nwc_s, 99) * 1e3,
        "admit_per_s": len(nwc_s) / sum(nwc_s),
        "bare_p50_ms": statistics.median(bare_s) * 1e3,
        "path_p50_ms": statistics.median(plan_s) * 1e3,
        "lone_ratio": statistics.median(nwc_s) / statistics.median(bare_s),
        "path_ratio": statistics.median(plan_s) / statistics.median(bare_s),
        "group_p50_ms": statistics.median(group_s) * 1e3,
        "group_per_s": len(group_s) / sum(group_s),
        "group_ratio": statistics.median(group_s) / statistics.median(group_bare_s),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="100,1000,10000")
    parser.add_argument("--fabrics", default="clos,fat-tree")
    parser.add_argument("--live", type=int, default=1000)
    parser.add_argument("--timed", type=int, default=500,
                        help="timed admissions of each kind (lone, then in batches)")
    parser.add_argument("--batch", type=int, default=16,
                        help="admissions that arrive together and share one commit")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--state-root", type=Path, default=Path("/var/tmp"),
                        help="where the benchmark's SQLite lives (a real disk: fsync counts)")
    args = parser.parse_args()
    results: dict[tuple[str, int], dict] = {}
    for fabric in args.fabrics.split(","):
        for scale in (int(s) for s in args.scales.split(",")):
            r = bench_scale(fabric, scale, args.live, args.timed, args.batch, args.seed,
                            args.state_root)
            results[(fabric, scale)] = r
            print(f"{fabric:>8} {r['switches']:>6} switches {r['links']:>6} links, {r['live']} "
                  f"live weaves, {r['denied']} denied: lone admission p50 "
                  f"{r['admit_p50_ms']:.3f} ms p99 {r['admit_p99_ms']:.3f} ms "
                  f"({r['admit_per_s']:.0f}/s); in batches of {r['batch']} "
                  f"{r['group_p50_ms']:.3f} ms each ({r['group_per_s']:.0f}/s); constrained "
                  f"path p50 {r['path_p50_ms']:.3f} ms; bare networkx path p50 "
                  f"{r['bare_p50_ms']:.3f} ms; admission/bare: lone {r['lone_ratio']:.1f}x, "
                  f"batched {r['group_ratio']:.1f}x; path/bare {r['path_ratio']:.1f}x",
                  flush=True)
    one_k = results.get(("clos", 1000))
    ten_k = {f: r for (f, n), r in results.items() if n == 10000}
    if not one_k or set(ten_k) != {"clos", "fat-tree"}:
        print("RESULT needs both fabrics at the 1000 and 10000 scales", file=sys.stderr)
        return 1
    print(f"RESULT admit_p99_ms_1k={one_k['admit_p99_ms']:.3f} "
          f"admit_per_s_1k={one_k['admit_per_s']:.0f} "
          f"ratio_vs_bare_path_10k={ten_k['clos']['group_ratio']:.2f} "
          f"lone_ratio_vs_bare_path_10k={ten_k['clos']['lone_ratio']:.2f} "
          f"path_only_ratio_vs_bare_path_10k={ten_k['clos']['path_ratio']:.2f} "
          f"fat_tree_ratio_vs_bare_path_10k={ten_k['fat-tree']['group_ratio']:.2f} "
          f"fat_tree_lone_ratio_vs_bare_path_10k={ten_k['fat-tree']['lone_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
