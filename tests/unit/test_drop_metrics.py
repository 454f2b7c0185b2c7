"""Refused traffic on /metrics: packets the pipeline's counting drops refuse, sent through the
fake switches of the triangle (h1-s1, h2-s2, h3-s3; globex-db has VMs on h2 and h3, none on
h1) with the flows part talking to them, read back by a scrape of the metrics collector."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakeoftable import ip, mac
from flowsim import FlowsSim
from netsim import TRIANGLE
from prometheus_client.parser import text_string_to_metric_families

from nwc import ofapp
from nwc.config import SHIPPED_POLICIES
from nwc.metrics import Metrics
from nwc.pipeline import FABRIC_EDGE_DROP_COOKIE, DropLabels, drop_labels
from nwc.policy import load_policy
from nwc.topology import parse_topology_text

pytestmark = pytest.mark.unit

Labels = tuple[str, str, str, str]  # switch, reason, ivn, port
POLICY = load_policy([SHIPPED_POLICIES])


@pytest.fixture
def fsim(tmp_path: Path) -> Iterator[FlowsSim]:
    with FlowsSim.build(tmp_path) as sim:
        sim.connect_all()
        yield sim


def _metrics(fsim: FlowsSim) -> Metrics:
    """The REST app's metrics over the sim's weaver and flows part, as `nwc run` wires them."""
    controller = SimpleNamespace(
        weaver=fsim.weaver, call=lambda fn, *args, timeout=None: fsim.loop.call(fn, *args),
        host_sources=[], drop_sources=[fsim.part.drop_stats], weave_stats=lambda weave: {},
        switch_sources=[fsim.part.switch_connections],
        cert_watch=None)
    return Metrics(controller)  # type: ignore[arg-type]


def _scrape(fsim: FlowsSim, metrics: Metrics) -> dict[str, dict[Labels, float]]:
    """One scrape, past the statistics cache of the previous one: packets and bytes."""
    fsim.advance(ofapp.STATS_CACHE_S + 1)
    out: dict[str, dict[Labels, float]] = {"packets": {}, "bytes": {}}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            for what in out:
                if sample.name == f"nwc_dropped_{what}_total":
                    labels = sample.labels
                    out[what][(labels["switch"], labels["reason"], labels["ivn"],
                               labels["port"])] = sample.value
    return out


def _changed(before: dict[Labels, float], after: dict[Labels, float]) -> dict[Labels, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_every_counting_drop_is_exported_from_the_start(fsim: FlowsSim) -> None:
    packets = _scrape(fsim, _metrics(fsim))["packets"]
    web1 = fsim.topology.vms["web1"]
    assert packets[("h1", "vm_spoof", "acme-web", web1.port)] == 0
    assert packets[("h2", "overlay_source", "globex-db", "")] == 0
    assert packets[("h1", "default_deny", "", "")] == 0
    assert packets[("s1", "fabric_edge_source", "", "h1")] == 0
    # A drop per host port, per local IVN, per local VM port and per host: no more.
    assert {k for k in packets if k[0] == "s2"} == {("s2", "fabric_edge_source", "", "h2")}
    assert {k[1] for k in packets if k[0] == "h1"} == {"vm_spoof", "overlay_source",
                                                        "default_deny"}


def test_a_spoofed_frame_counts_as_vm_spoof_on_its_port(fsim: FlowsSim) -> None:
    metrics = _metrics(fsim)
    before = _scrape(fsim, metrics)
    web1 = fsim.topology.vms["web1"]
    for _ in range(3):  # web1 sends as 192.0.2.40 (web3's address)
        packet = fsim.net.vm_ip_packet("web1", "192.0.2.11", ipv4_src=ip("192.0.2.40"))
        assert fsim.net.send("web1", packet) == []
    after = _scrape(fsim, metrics)
    key = ("h1", "vm_spoof", "acme-web", web1.port)
    assert _changed(before["packets"], after["packets"]) == {key: 3}
    assert _changed(before["bytes"], after["bytes"]) == {key: 300}
    assert fsim.reaches("web1", "web2")


def test_forged_overlay_counts_as_overlay_source_of_its_ivn(fsim: FlowsSim) -> None:
    # Root on h1 (no globex-db VMs) sends VXLAN with globex-db's VNI, from its own underlay
    # address (the fabric edge lets that pass), to h3 where db2 is.
    metrics = _metrics(fsim)
    before = _scrape(fsim, metrics)["packets"]
    db2 = fsim.topology.vms["db2"]
    inner = {"eth_src": mac("02:dd:00:00:01:99"), "eth_dst": mac(db2.mac), "eth_type": 0x0800,
             "ipv4_src": ip("192.0.2.99"), "ipv4_dst": int(db2.ip), "ip_proto": 1,
             "icmpv4_type": 8, "nw_ttl": 64, "len": 100}
    vni = fsim.policy.ivns["globex-db"].vni
    for _ in range(2):
        assert fsim.net.forge_overlay("h1", "h3", vni, dict(inner)) == []
    after = _scrape(fsim, metrics)["packets"]
    assert _changed(before, after) == {("h3", "overlay_source", "globex-db", ""): 2}


def test_a_packet_to_another_ivn_counts_as_default_deny(fsim: FlowsSim) -> None:
    metrics = _metrics(fsim)
    before = _scrape(fsim, metrics)["packets"]
    for _ in range(4):  # acme-web to globex-db, no weave between them
        assert fsim.ping("web1", "db2") == []
    after = _scrape(fsim, metrics)["packets"]
    assert _changed(before, after) == {("h1", "default_deny", "", ""): 4}


def test_a_host_sending_as_another_counts_at_its_fabric_edge(fsim: FlowsSim) -> None:
    metrics = _metrics(fsim)
    before = _scrape(fsim, metrics)["packets"]
    h3_ip = str(fsim.topology.hosts["h3"].underlay_ip)
    forged = {"eth_type": 0x0800, "ipv4_src": ip("203.0.113.9"), "ipv4_dst": ip(h3_ip),
              "ip_proto": 17, "udp_src": 4789, "udp_dst": 4789}
    assert fsim.net.underlay("h1", forged)[0] is None
    after = _scrape(fsim, metrics)["packets"]
    assert _changed(before, after) == {("s1", "fabric_edge_source", "", "h1"): 1}


def _spoof(fsim: FlowsSim, count: int) -> None:
    for _ in range(count):
        packet = fsim.net.vm_ip_packet("web1", "192.0.2.11", ipv4_src=ip("192.0.2.40"))
        assert fsim.net.send("web1", packet) == []


def test_a_resync_never_takes_a_drop_counter_back(fsim: FlowsSim) -> None:
    """A reconnect resyncs the switch: every flow is deleted and added again, its drops'
    counters start from 0 on the switch. The exported counter goes on from where it was,
    even when the new flow counts past the old reading before the next scrape."""
    metrics = _metrics(fsim)
    key = ("h1", "vm_spoof", "acme-web", fsim.topology.vms["web1"].port)
    _spoof(fsim, 2)
    assert _scrape(fsim, metrics)["packets"][key] == 2
    fsim.dps["h1"].hang_up()
    fsim.settle()
    assert not any(k[0] == "h1" for k in _scrape(fsim, metrics)["packets"])  # away: nothing
    _spoof(fsim, 1)  # counted by the switch while away: read before its resync
    fsim.connect("h1")
    _spoof(fsim, 5)
    assert _scrape(fsim, metrics)["packets"][key] == 8


def test_a_disconnected_switch_exports_no_drops(fsim: FlowsSim) -> None:
    metrics = _metrics(fsim)
    assert any(k[0] == "s2" for k in _scrape(fsim, metrics)["packets"])
    fsim.dps["s2"].hang_up()
    fsim.settle()
    packets = _scrape(fsim, metrics)["packets"]
    assert not any(k[0] == "s2" for k in packets)
    assert any(k[0] == "s1" for k in packets)  # the others still are


def test_a_switch_that_does_not_answer_exports_no_drops(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ofapp, "STATS_TIMEOUT_S", 0.2)
    metrics = _metrics(fsim)
    fsim.dps["h2"].answer_stats = False
    packets: dict[Labels, Any] = _scrape(fsim, metrics)["packets"]
    assert not any(k[0] == "h2" for k in packets)
    assert any(k[0] == "h1" for k in packets)


def test_a_cookie_with_the_drop_bit_that_nwc_did_not_give_is_no_drop() -> None:
    """Flows another tool puts on br-int (the tunnel lab's, `0x7e<slot>`) may have the drop
    bit in their low byte; the flow-stats request finds them, their owner kind tells them
    apart from NWC's own drops."""
    topology = parse_topology_text(TRIANGLE, POLICY)
    assert drop_labels(POLICY, topology, "h1", {}, 0x7E0081, 3) is None
    assert drop_labels(POLICY, topology, "s1", {}, FABRIC_EDGE_DROP_COOKIE, 1) \
        == DropLabels("fabric_edge_source", "", "h1")
