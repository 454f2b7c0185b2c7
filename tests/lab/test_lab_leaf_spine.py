"""End to end on the leaf-spine topology, where paths and capacity decide things.

Four hosts on four leaves; spine1's links are thin (32 Mbit/s reservable), spine2's fat (80).
acme-web has VMs on h1 and h2, globex-db on h3, initech-app on h4, so weaves have two legs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from labkit import start_lab

from nwc.lab.provider import ProviderLab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("ends_clean")]


@pytest.fixture(scope="module")
def lab() -> Iterator[ProviderLab]:
    yield from start_lab("leaf-spine")


def links_of(path: list[str]) -> set[tuple[str, str]]:
    return {tuple(sorted(hop)) for hop in itertools.pairwise(path)}  # type: ignore


def fabric_links(lab: ProviderLab) -> dict[tuple[str, str], dict]:
    return {tuple(sorted((link["a"], link["b"]))): link
            for link in lab.client("admin").call("GET", "/v1/fabric")["links"]}


def test_weaves_that_cannot_share_a_link_are_routed_apart(lab: ProviderLab) -> None:
    # Two legs of 20 Mbit/s to h3 cannot both take leaf3-spine1 (32 reservable).
    w1 = lab.weave("acme", "acme-web", "globex-db", bandwidth_mbps=20)
    spines = {leg["requester_host"]: leg["path"][2] for leg in w1["legs"]}
    assert spines == {"h1": "spine1", "h2": "spine2"}, w1["legs"]
    # spine1-leaf1 already holds 20 of 32: initech's leg to h1 must go round by spine2.
    w2 = lab.weave("initech", "initech-app", "acme-web", bandwidth_mbps=20)
    to_h1 = next(leg for leg in w2["legs"] if leg["target_host"] == "h1")
    assert to_h1["path"][2] == "spine2"
    for key, link in fabric_links(lab).items():
        assert link["reserved_mbps"] <= link["reservable_mbps"], key
    assert fabric_links(lab)[("leaf1", "spine1")]["reserved_mbps"] == 20
    assert all(lab.ping(*pair, count=2) for pair in (("web1", lab.ip_of("db1")),
                                                       ("web2", lab.ip_of("db1")),
                                                       ("app1", lab.ip_of("web1")),
                                                       ("app1", lab.ip_of("web2"))))


def test_weave_traffic_crosses_exactly_its_reserved_links(lab: ProviderLab) -> None:
    w = lab.weave("initech", "initech-app", "acme-web", bandwidth_mbps=10)
    leg = next(leg for leg in w["legs"] if leg["target_host"] == "h1")
    on_path = links_of(leg["path"])
    before = lab.fabric_port_bytes()
    result = lab.iperf("app1", "web1", "-u", "-b", "8M", seconds=3)
    volume = result["end"]["sum"]["bytes"]
    moved = lab.link_bytes(before, lab.fabric_port_bytes())
    assert set(moved) == {tuple(sorted((x.a, x.b))) for x in lab.topo.links}
    for key, count in moved.items():
        if key in on_path:
            assert count >= volume, (key, count, volume)
        else:
            assert count < 0.05 * volume, (key, count, volume, leg["path"])


def test_silver_profile_lets_only_its_ports_across(lab: ProviderLab) -> None:
    # initech asks; silver (initech's first choice that acme allows) lets the requester open
    # tcp/5201 and udp/5201, and ping both ways; nothing else.
    w = lab.weave("initech", "initech-app", "acme-web", bandwidth_mbps=10)
    assert w["security_profile"] == "silver"
    assert lab.ping("app1", lab.ip_of("web1")) and lab.ping("web1", lab.ip_of("app1"))
    assert _tcp_opens(lab, "app1", "web1", 5201)
    assert not _tcp_opens(lab, "app1", "web1", 22)
    assert not _tcp_opens(lab, "web1", "app1", 5201)  # only the requester opens flows


def _tcp_opens(lab: ProviderLab, client: str, server: str, port: int) -> bool:
    srv = lab.vm_popen(server, ["iperf3", "-s", "-1", "-p", str(port)])
    try:
        time.sleep(0.4)
        out = lab.vm(client).cmd(f"timeout 6 iperf3 -c {lab.ip_of(server)} -p {port} -t 1 "
                                 "--connect-timeout 2000; echo rc=$?")
        return "rc=0" in out
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)


def test_link_down_moves_the_weave_then_fails_it_without_a_path(lab: ProviderLab) -> None:
    w = lab.weave("initech", "initech-app", "acme-web", bandwidth_mbps=10)
    leg = next(leg for leg in w["legs"] if leg["target_host"] == "h1")
    cut = (leg["path"][1], leg["path"][2])  # leaf4 and the spine it uses
    pinger = lab.vm_popen("app1", ["ping", "-n", "-D", "-i", "0.1", "-W", "1", "-c", "150",
                                   lab.ip_of("web1")], text=True)
    try:
        time.sleep(3)
        lab.set_link(*cut, up=False)
        cut_at = time.time()
        out, _ = pinger.communicate(timeout=60)
        replies = sorted(float(line.split("]")[0].lstrip("[")) for line in out.splitlines()
                         if line.startswith("[") and "bytes from" in line)
        after = [t for t in replies if t > cut_at]
        assert after, "no traffic after the cut"
        assert after[0] - cut_at <= 5.0
        moved = lab.client("initech").call("GET", f"/v1/weaves/{w['id']}")
        assert moved["state"] == "active"
        assert all(tuple(sorted(cut)) not in links_of(g["path"]) for g in moved["legs"])
        # Now the other spine too: leaf4 has no way out, the weave fails with a reason.
        other = "spine2" if cut[1] == "spine1" else "spine1"
        lab.set_link("leaf4", other, up=False)
        failed = lab.wait_state("initech", w["id"], {"failed"}, timeout=10)
        assert (failed["state"], failed["reason"]) == ("failed", "no_path")
        assert not lab.ping("app1", lab.ip_of("web1"), count=2, wait_s=0.5)
    finally:
        if pinger.poll() is None:
            pinger.kill()
        lab.set_link(*cut, up=True)
        lab.set_link("leaf4", "spine1", up=True)
        lab.set_link("leaf4", "spine2", up=True)
        time.sleep(1)  # port status reaches NWC: the links are usable again
