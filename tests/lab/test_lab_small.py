"""End to end on the demo topology: two tenants, two hosts, one thin fabric link.

acme-web (web1, web2, web3 on h1) and globex-db (db1 on h2); globex-db accepts only
192.0.2.0/27 of acme-web, so web3 (192.0.2.40) never reaches it; the s1-s2 link has 30 Mbit/s
reservable.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from labkit import start_lab

from nwc.lab.capture import cleartext, contains, summarize
from nwc.lab.provider import ClientError, ProviderLab

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("ends_clean")]

RATE = 10


@pytest.fixture(scope="module")
def lab() -> Iterator[ProviderLab]:
    yield from start_lab("small")


def weave(lab: ProviderLab, **kw: object) -> dict:
    params = {"duration_s": 300, "bandwidth_mbps": RATE, **kw}
    return lab.weave("acme", "acme-web", "globex-db", **params)  # type: ignore[arg-type]


def cross_ivn_pairs(lab: ProviderLab) -> list[tuple[str, str]]:
    vms = lab.topo.vms
    return [(a, b) for a, b in itertools.permutations(sorted(vms), 2)
            if vms[a].ivn != vms[b].ivn]


def cross_ivn_packets(lab: ProviderLab) -> dict[str, int]:
    """Ping every VM of another IVN from every VM; count what reached anyone."""
    captures = {vm: lab.vm_capture(vm, f"iso-{vm}-{time.monotonic_ns()}") for vm in lab.topo.vms}
    for src, dst in cross_ivn_pairs(lab):
        lab.ping(src, lab.ip_of(dst), count=1, wait_s=0.3)
    received = {}
    for vm, capture in captures.items():
        foreign = {_ip_bytes(str(lab.topo.vms[o].ip)) for o in lab.topo.vms
                   if lab.topo.vms[o].ivn != lab.topo.vms[vm].ivn}
        received[vm] = sum(_sender(frame) in foreign for frame in capture.stop())
    return received


def _ip_bytes(ip: str) -> bytes:
    return bytes(int(x) for x in ip.split("."))


def _sender(frame: bytes) -> bytes:
    """The IPv4 source of an IP packet, or the sender address of an ARP message."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00":
        return frame[26:30]
    if ethertype == b"\x08\x06":
        return frame[28:32]
    return b""


def vm_config(lab: ProviderLab) -> dict[str, str]:
    return {vm: lab.vm(vm).cmd("ip -o addr; ip route; ip neigh show nud permanent")
            for vm in lab.topo.vms}


def test_the_management_plane_is_tls(lab: ProviderLab) -> None:
    """Every switch reaches NWC over OpenFlow on TLS and is connected; every host's OVSDB
    listens only with TLS; NWC says it requires switch certificates naming the switch."""
    instances = [h.emulated.ovs for h in lab.hosts.values()] + [lab.fabric.ovs]
    for ovs in instances:
        targets = ovs.vsctl("--columns=target", "--bare", "list", "controller").split()
        connected = ovs.vsctl("--columns=is_connected", "--bare", "list", "controller").split()
        assert targets and all(t.startswith('"ssl:') or t.startswith("ssl:") for t in targets)
        assert connected and set(connected) == {"true"}
    for host in lab.hosts.values():
        managers = host.emulated.ovs.vsctl("get-manager").split()
        assert managers and all(m.startswith("pssl:") for m in managers)
    log = (lab.logs / "nwc-run.log").read_text()
    assert "TLS, switch certificates required, naming the switch" in log
    assert "is not encrypted" not in log  # what NWC warns for a tcp: OVSDB target
    assert "refusing the OVSDB server" not in log  # each host's certificate names it
    assert "refusing switch" not in log  # each switch's certificate names the switch it is


def test_isolation_before_and_after_a_weave(lab: ProviderLab) -> None:
    assert cross_ivn_packets(lab) == dict.fromkeys(lab.topo.vms, 0)
    w = weave(lab)
    assert w["state"] == "active"
    lab.client("acme").call("DELETE", f"/v1/weaves/{w['id']}")
    assert cross_ivn_packets(lab) == dict.fromkeys(lab.topo.vms, 0)


def test_same_ivn_reaches_across_the_host(lab: ProviderLab) -> None:
    assert lab.ping("web1", lab.ip_of("web2"))
    assert lab.ping("web2", lab.ip_of("web3"))


def test_a_weave_connects_both_ways_with_no_vm_change(lab: ProviderLab) -> None:
    before = vm_config(lab)
    w = weave(lab)
    assert w["state"] == "active" and w["path"] == ["h1", "s1", "s2", "h2"]
    assert lab.ping("web1", lab.ip_of("db1"), count=3)
    assert lab.ping("db1", lab.ip_of("web2"), count=3)
    # Only the prefixes globex-db accepts: web3 (192.0.2.40) is outside 192.0.2.0/27.
    assert not lab.ping("web3", lab.ip_of("db1"), count=2, wait_s=0.5)
    assert not lab.ping("db1", lab.ip_of("web3"), count=2, wait_s=0.5)
    assert vm_config(lab) == before


def test_only_esp_crosses_the_fabric(lab: ProviderLab) -> None:
    from nwc.lab.capture import Capture

    weave(lab)
    capture = Capture(lab.lab, lab.fabric.ns, "s1-s2", f"fabric-{time.monotonic_ns()}").start()
    marker = "nwc-cleartext-marker"
    lab.vm("web1").cmd(f"ping -n -c 5 -i 0.1 -p {marker.encode().hex()[:32]} "
                       f"{lab.ip_of('db1')}")
    lab.iperf("web1", "db1", "-b", "5M", "-u", seconds=2)
    frames = capture.stop()
    kinds = summarize(frames)
    assert kinds["esp-in-udp"] > 100, kinds
    assert cleartext(frames) == {}, kinds
    assert contains(frames, marker.encode()[:16]) == 0


def test_meter_holds_the_reserved_rate(lab: ProviderLab) -> None:
    w = weave(lab)
    udp = lab.iperf("web1", "db1", "-u", "-b", f"{2 * RATE}M")["end"]["sum"]
    delivered = udp["bits_per_second"] * (1 - udp["lost_percent"] / 100) / 1e6
    assert abs(delivered - RATE) <= 0.1 * RATE, udp
    # NWC's own counters (flow and meter stats by cookie) saw the same thing.
    stats = lab.client("acme").call("GET", f"/v1/weaves/{w['id']}/stats")["measured"]
    sent = udp["bytes"]
    assert stats["meter_dropped_bytes_requester_to_target"] > 0.3 * sent
    assert stats["bytes_requester_to_target"] > 0.4 * sent
    assert stats["sa_state"] == "established"
    tcp = lab.iperf("web1", "db1", seconds=8)["end"]["sum_received"]
    assert tcp["bits_per_second"] / 1e6 >= 0.8 * RATE, tcp


def _reply_times(output: str) -> list[float]:
    """Timestamps (ping -D) of the echo replies in ping's output."""
    return [float(line.split("]")[0].lstrip("["))
            for line in output.splitlines() if line.startswith("[") and "bytes from" in line]


def _epoch(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=__import__("datetime").UTC).timestamp()


def test_traffic_stops_within_2s_of_the_lease_end(lab: ProviderLab) -> None:
    w = weave(lab, duration_s=6)
    pinger = lab.vm_popen("web1", ["ping", "-n", "-D", "-i", "0.05", "-W", "1", "-c", "200",
                                   lab.ip_of("db1")], text=True)
    out, _ = pinger.communicate(timeout=40)
    replies = _reply_times(out)
    ended = lab.wait_state("acme", w["id"], {"terminated"})
    assert ended["reason"] == "expired"
    expires = _epoch(w["expires_at"])
    assert replies and replies[0] < expires - 3  # it did carry traffic
    assert max(replies) <= expires + 2.0, (max(replies) - expires)


def test_explicit_termination_stops_traffic_within_2s(lab: ProviderLab) -> None:
    w = weave(lab)
    pinger = lab.vm_popen("web1", ["ping", "-n", "-D", "-i", "0.05", "-W", "1", "-c", "120",
                                   lab.ip_of("db1")], text=True)
    time.sleep(2)
    asked = time.time()
    lab.client("globex").call("DELETE", f"/v1/weaves/{w['id']}")  # either party may end it
    out, _ = pinger.communicate(timeout=40)
    replies = _reply_times(out)
    assert replies and min(replies) < asked
    assert max(replies) <= asked + 2.0


def test_denials_say_why(lab: ProviderLab) -> None:
    with pytest.raises(ClientError) as exc:
        weave(lab, duration_s=7200)  # globex-db allows at most 3600 s
    assert exc.value.status == 403
    assert exc.value.body["error"] == "policy_violation"
    assert exc.value.body["side"] == "target" and exc.value.body["rule"] == "duration"
    # An IVN acme may not see (nobody may weave with globex-lab) reads as one that does not
    # exist: a tenant cannot learn other tenants' IVNs by trying names.
    with pytest.raises(ClientError) as exc:
        lab.weave("acme", "acme-web", "globex-lab", duration_s=60, bandwidth_mbps=5)
    assert exc.value.status == 404 and exc.value.body["error"] == "unknown_ivn"
    with pytest.raises(ClientError) as exc:
        weave(lab, bandwidth_mbps=35)
    assert exc.value.status == 409
    assert exc.value.body["error"] == "insufficient_bandwidth"
    assert exc.value.body["link"] == ["s1", "s2"]
    assert "30 Mbit/s free of 30 reservable" in exc.value.body["detail"]
