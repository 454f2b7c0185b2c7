"""The OpenFlow app driving real private ovs-vswitchd (userspace datapath) in namespaces."""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from datetime import timedelta
from typing import Any

import pytest
from conftest import Nwc
from prometheus_client.parser import text_string_to_metric_families

from nwc import ofapp
from nwc.admission import WeaveRequest
from nwc.lab.netns import wait_for
from nwc.metrics import Metrics
from nwc.ofapp import _close
from nwc.pipeline import DROP_OVERLAY_SOURCE, FABRIC_EDGE_DROP_COOKIE, ivn_cookie
from nwc.weave import State, Weave

pytestmark = pytest.mark.functional


def test_ivn_base_connects_an_ivn_across_hosts_and_isolates_the_rest(nwc: Nwc) -> None:
    net = nwc.net
    # acme-web, h1 -> h2 over the overlay. The userspace datapath drops a tunnel's first
    # packets while it resolves the remote VTEP's MAC on the underlay (tnl/neigh): allow
    # that, bounded, then require every ping to pass.
    wait_for(lambda: net.ping("web1", "192.0.2.11"), 15, "web1 reaches web2 across hosts")
    assert net.ping("web1", "192.0.2.11", count=2)
    assert not net.ping("web1", "192.0.2.70")  # globex-db: another tenant
    assert not net.ping("lab1", "192.0.2.70")  # globex-lab: same tenant, another IVN
    # The distributed gateway answers ARP and ping for the IVN's gateway address (the reply's
    # checksums are OVS's to fix after the rewrite: ping checks them).
    web1 = net.vm("web1")
    assert net.ping("web1", "192.0.2.1", count=2)
    neigh = web1.run("ip", "neigh", "show", "192.0.2.1").stdout
    assert net.gateway_mac("acme-web") in neigh
    # A VM that takes another address is dropped (anti-spoofing).
    web1.ip("addr", "add", "192.0.2.12/26", "dev", "eth0")
    spoofed = web1.run("ping", "-c1", "-W1", "-I", "192.0.2.12", "192.0.2.11", check=False)
    assert spoofed.returncode != 0
    assert net.ping("web1", "192.0.2.11")


def _flow_lines(ovs: Any, match: str) -> list[str]:
    out = ovs.ofctl("dump-flows", "br-int", "-O", "OpenFlow13", match)
    return [line for line in out.splitlines() if "n_packets=" in line]


def _packets(line: str) -> int:
    m = re.search(r"n_packets=(\d+)", line)
    assert m, line
    return int(m.group(1))


def test_ivn_vxlan_from_a_host_without_vms_of_the_ivn_is_dropped_and_counted(nwc: Nwc) -> None:
    """The tester's injection, on real OVS: root on h1 (no globex-db VM there) sends VXLAN
    with globex-db's VNI to h2's underlay address, where db1 is. OVS takes the tun_src flows,
    the forged packets reach br-int's table 0 and meet the IVN's counting drop there, and
    none of them gets to overlay-in; the IVN base across hosts keeps working."""
    net = nwc.net
    wait_for(lambda: net.ping("web1", "192.0.2.11"), 15, "web1 reaches web2 across hosts")
    h1, h2 = net.hosts["h1"], net.hosts["h2"]
    # h2 takes acme-web's VNI from h1's underlay address only (which OVS sends from: the
    # ping above crossed).
    acme = nwc.controller.config.policy.ivns["acme-web"].vni
    (accept,) = [line for line in _flow_lines(h2.ovs, f"table=0,in_port=9000,tun_id={acme}")
                 if "goto_table" in line]
    assert "tun_src=100.64.0.1" in accept and _packets(accept) > 0, accept
    ivn = nwc.controller.config.policy.ivns["globex-db"]
    cookie = f"cookie={ivn_cookie(ivn.vni):#x}/-1"
    drop_cookie = f"cookie={ivn_cookie(ivn.vni, DROP_OVERLAY_SOURCE):#x}/-1"
    db1 = nwc.controller.config.topology.vms["db1"]
    # The device lives in h1's namespace, which the lab made and removes with all in it. No
    # IPv6 on it and a permanent neighbour: only the forged echo requests cross it.
    dev = "fvx0"
    h1.ns.ip("link", "add", dev, "type", "vxlan", "id", str(ivn.vni), "remote", "100.64.0.2",
             "local", "100.64.0.1", "dstport", "4789", "dev", "br-ul")
    h1.ns.run("sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1")
    h1.ns.ip("link", "set", dev, "address", "02:dd:00:00:01:99", "up")
    h1.ns.no_offload(dev)
    h1.ns.ip("addr", "add", "192.0.2.99/26", "dev", dev)
    h1.ns.ip("neigh", "replace", str(db1.ip), "lladdr", db1.mac, "dev", dev, "nud", "permanent")
    try:
        def dropped() -> int:
            return sum(_packets(line) for line in _flow_lines(h2.ovs, f"{drop_cookie},table=0")
                       if "in_port=9000" in line and line.endswith("actions=drop"))

        def forged_and_dropped() -> bool:
            h1.ns.run("ping", "-n", "-c", "1", "-W", "1", str(db1.ip), check=False, timeout=10)
            return dropped() > 0
        # The first packets may go while h1 resolves h2's underlay MAC: bounded retries.
        wait_for(forged_and_dropped, 20, "h2 counts the forged VXLAN as dropped")
        overlay_in = _flow_lines(h2.ovs, f"{cookie},table=4")
        assert overlay_in and not any(_packets(line) for line in overlay_in), overlay_in
    finally:
        h1.ns.ip("link", "del", dev, check=False)
    assert net.ping("web1", "192.0.2.11", count=2)


def _echo_requests_in(ns: Any) -> int:
    """ICMP echo requests the namespace's kernel took in (its own /proc/net/snmp)."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Icmp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("InEchos")])


def _dropped_packets(metrics: Metrics) -> dict[tuple[str, str, str, str], float]:
    """nwc_dropped_packets_total of one scrape, by (switch, reason, ivn, port)."""
    return {(s.labels["switch"], s.labels["reason"], s.labels["ivn"], s.labels["port"]): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples if s.name == "nwc_dropped_packets_total"}


def test_a_host_sending_from_an_address_it_does_not_own_is_dropped_at_its_edge(
        nwc: Nwc) -> None:
    """Root on h1 sends from an address that is not h1's (a weave endpoint of no weave of
    h1's): s1, the switch h1 hangs off, drops it and counts it; h2 never sees it. From h1's
    own underlay address the same ping crosses."""
    h1, h2 = nwc.net.hosts["h1"], nwc.net.hosts["h2"]
    fabric = nwc.net.fabric.ovs
    h2_mac = h2.ns.run("cat", "/sys/class/net/br-ul/address").stdout.strip()
    # A permanent neighbour: the forged packets go out as IPv4 at once (no ARP first, which
    # the edge would refuse too, but then nothing forged would ever be sent).
    h1.ns.ip("neigh", "replace", "100.64.0.2", "lladdr", h2_mac, "dev", "br-ul",
             "nud", "permanent")
    forged = "100.64.128.2"  # slot 0's requester endpoint; no weave holds it
    h1.ns.ip("addr", "add", f"{forged}/32", "dev", "lo")

    def refused() -> int:
        out = fabric.ofctl("dump-flows", "s1",
                           f"cookie={FABRIC_EDGE_DROP_COOKIE:#x}/-1")
        return sum(_packets(line) for line in out.splitlines() if "n_packets=" in line)

    metrics = Metrics(nwc.controller)
    series = ("s1", "fabric_edge_source", "", "h1")
    before, echoes = refused(), _echo_requests_in(h2.ns)
    exported = _dropped_packets(metrics)[series]
    sent = h1.ns.run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", forged,
                     "100.64.0.2", check=False, timeout=15)
    assert sent.returncode != 0, sent.stdout
    assert _echo_requests_in(h2.ns) == echoes
    assert refused() >= before + 3
    # /metrics says the same once its statistics cache (STATS_CACHE_S) has expired.
    wait_for(lambda: _dropped_packets(metrics)[series] >= exported + 3, 20,
             "nwc_dropped_packets_total counts what s1 refused from h1")
    wait_for(lambda: h1.ns.run("ping", "-n", "-c", "1", "-W", "1", "100.64.0.2",
                               check=False, timeout=10).returncode == 0,
             10, "h1 reaches h2 from its own underlay address")
    assert _echo_requests_in(h2.ns) > echoes


def test_weave_carries_traffic_only_while_active(nwc: Nwc) -> None:
    net = nwc.net
    assert not net.ping("web1", "192.0.2.70")
    weave = nwc.weave("acme-web", "globex-db")
    assert net.ping("web1", "192.0.2.70", count=2)  # h1 -> h2 through the leg's tunnel
    assert net.ping("web2", "192.0.2.70", count=2)  # both on h2: joined on h2's br-int
    assert net.ping("db1", "192.0.2.10")  # and back, from the target's side
    assert not net.ping("lab1", "192.0.2.70")  # nobody else reaches the target
    stats = nwc.controller.weave_stats(nwc.live(weave.id))
    assert stats["packets_requester_to_target"] > 0
    assert stats["packets_target_to_requester"] > 0
    nwc.controller.call(nwc.controller.weaver.terminate, weave.id)
    nwc.wait_connected()
    assert not net.ping("web1", "192.0.2.70")
    assert not net.ping("web2", "192.0.2.70")


def _received(output: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert m, output
    return int(m.group(1)), int(m.group(2))


def test_reconnect_and_controller_restart_resync_without_losing_weave_traffic(
        nwc: Nwc) -> None:
    nwc.weave("acme-web", "globex-db")
    ping = nwc.net.ping_popen("web1", "192.0.2.70", interval=0.05, count=120)
    time.sleep(0.5)
    # A switch's connection drops and it reconnects: its tables are rebuilt in one bundle.
    h1 = nwc.controller.config.topology.hosts["h1"].dpid
    old = nwc.part.switches[h1].datapath
    _close(old)
    wait_for(lambda: h1 in nwc.part.switches and nwc.part.switches[h1].datapath is not old,
             15, "h1 to reconnect")
    nwc.wait_connected()
    # The controller restarts: every switch reconnects and is resynced.
    nwc.restart_controller()
    nwc.wait_connected()
    out, _ = ping.communicate(timeout=30)
    sent, received = _received(out)
    assert sent == 120
    seen = {int(n) for n in re.findall(r"icmp_seq=(\d+)", out)}
    assert received == sent, f"lost {sorted(set(range(1, sent + 1)) - seen)}"
    assert nwc.net.ping("web1", "192.0.2.70")


def test_a_switch_whose_controller_is_reset_is_taken_back_at_once(
        nwc: Nwc, caplog: pytest.LogCaptureFixture) -> None:
    """`ovs-vsctl del-controller` then `set-controller`: OVS flushes its tables when its
    controller set empties and reconnects. os-ken reports the old connection dead only
    seconds later (it joins its echo and send threads first); the reconnecting switch must
    not be refused as a second connection meanwhile, and gets its tables back."""
    caplog.set_level(logging.INFO)
    nwc.weave("acme-web", "globex-db")
    h1 = nwc.net.hosts["h1"].ovs
    dpid = nwc.controller.config.topology.hosts["h1"].dpid
    target = h1.vsctl("get-controller", "br-int")
    old = nwc.part.switches[dpid].datapath
    h1.vsctl("del-controller", "br-int")
    h1.vsctl("set-controller", "br-int", target)
    wait_for(lambda: dpid in nwc.part.switches and nwc.part.switches[dpid].datapath is not old
             and nwc.part.switches[dpid].synced, 10, "h1 to be resynced on its new connection")
    assert not [r for r in caplog.records if "refusing a second connection" in r.getMessage()]
    wait_for(lambda: nwc.net.ping("web1", "192.0.2.70"), 10, "the weave to carry traffic again")
    # The IVN base too (the flush also emptied the tunnel's neighbour cache: its first
    # packets resolve the remote VTEP again).
    wait_for(lambda: nwc.net.ping("web1", "192.0.2.11"), 10, "the IVN base to carry traffic")


def test_fabric_link_down_moves_the_weave_and_its_steering(nwc: Nwc) -> None:
    weave = nwc.weave("acme-web", "globex-db")
    remote = next(leg for leg in weave.legs if leg.slot is not None)
    assert remote.path == ("h1", "s1", "s2", "h2")
    assert nwc.net.ping("web1", "192.0.2.70")
    nwc.net.fabric.set_link("s1", "s2", up=False)

    def moved() -> bool:
        w = nwc.live(weave.id)
        return w is not None and any("s3" in leg.path for leg in w.legs)
    wait_for(moved, 15, "the weave to move off the dead link")
    nwc.wait_connected()
    after = nwc.live(weave.id)
    assert after is not None and after.state is State.ACTIVE
    assert next(leg for leg in after.legs if leg.slot is not None).path == \
        ("h1", "s1", "s3", "s2", "h2")
    assert nwc.net.ping("web1", "192.0.2.70", count=3, wait=2)  # over s3 now
    assert nwc.net.ping("web1", "192.0.2.11", count=2, wait=2)  # host routes followed too
    # The weave's outer addresses really take s3: its counters on s3 grow.
    s3 = nwc.net.fabric.ovs.ofctl("dump-flows", "s3", f"cookie={weave.number << 8 | 2 << 56:#x}"
                                  "/0xffffffffffffff00")
    assert re.search(r"n_packets=[1-9]", s3), s3


def _closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    """True once the controller hung up (after its hello, which it sends first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError):
        return False
    return True


def test_malformed_openflow_is_refused_while_real_switches_stay_served(nwc: Nwc) -> None:
    from test_ofguard_vectors import GARBAGE, HELLO_ZERO_ELEMENT, MULTIPART_ZERO_LENGTH_BODY

    hello = bytes.fromhex("0400000800000001")
    peers = []
    for payload in (GARBAGE, HELLO_ZERO_ELEMENT, hello + MULTIPART_ZERO_LENGTH_BODY):
        s = socket.create_connection(("127.0.0.1", nwc.port), timeout=5)
        s.sendall(payload)
        peers.append(s)
    # A peer that promises a 64 KiB message and sends half: it waits alone.
    slow = socket.create_connection(("127.0.0.1", nwc.port), timeout=5)
    slow.sendall(hello + struct.pack("!BBHI", 4, 19, 65535, 2) + b"\0" * 30000)
    for s in peers:
        assert _closed_by_peer(s)
        s.close()
    # Meanwhile the real switches are served: a weave is programmed end to end.
    weave = nwc.weave("acme-web", "globex-db")
    assert nwc.net.ping("web1", "192.0.2.70", count=2)
    assert nwc.live(weave.id).state is State.ACTIVE
    slow.close()


def test_a_refresh_restarts_hard_timeouts_without_losing_counters(nwc: Nwc) -> None:
    """What the part does for leases past the 65,535 s cap, on real OVS: one bundle re-adding
    the weave's flows; OVS takes it, keeps the counters and restarts the timeouts."""
    weave = nwc.weave("acme-web", "globex-db")
    assert nwc.net.ping("web1", "192.0.2.70", count=3)
    h2 = nwc.controller.config.topology.hosts["h2"]
    live = nwc.part.switches[h2.dpid].datapath
    cookie = f"cookie={weave.number << 8 | 3 | 2 << 56:#x}/-1"  # delivered to db1
    ovs = nwc.net.hosts["h2"].ovs

    def flow() -> tuple[int, float]:
        out = ovs.ofctl("dump-flows", "br-int", "-O", "OpenFlow13", cookie)
        m = re.search(r"duration=([\d.]+)s.*n_packets=(\d+)", out)
        assert m, out
        return int(m.group(2)), float(m.group(1))
    packets, age = flow()
    since = time.monotonic()
    assert packets > 0
    time.sleep(1.5)  # so a flow installed afresh is at least this much younger than the old

    def force() -> None:  # as if the lease outlasted the cap and the refresh came due
        now = nwc.controller.weaver.clock.now()
        nwc.part.capped[weave.id] = {h2.dpid: now}
        nwc.part.refresh_due()
    nwc.controller.call(force)
    nwc.wait_connected()
    assert nwc.part.switches[h2.dpid].datapath is live  # accepted, not dropped and resynced
    after, younger = flow()
    elapsed = time.monotonic() - since
    assert after >= packets  # not reset to 0
    # The same flow would be age + elapsed old; replaced after the sleep, it is younger than
    # elapsed - 1.5 however slow the machine is.
    assert younger < age + elapsed - 1.0
    assert nwc.net.ping("web1", "192.0.2.70")


def test_an_extend_keeps_the_weaves_counters_counting(
        nwc: Nwc, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found in acceptance: an extend re-adds the weave's flows, OVS starts their counters
    from 0, and the weave's stats (and its Prometheus counters) fell back to 0 with them."""
    monkeypatch.setattr(ofapp, "STATS_CACHE_S", 0.0)  # every call reads the switches afresh
    weave = nwc.weave("acme-web", "globex-db")
    key = "packets_requester_to_target"
    h2 = nwc.net.hosts["h2"].ovs
    cookie = f"cookie={weave.number << 8 | 3 | 2 << 56:#x}/-1"  # delivered to db1

    def on_switch() -> int:
        out = h2.ofctl("dump-flows", "br-int", "-O", "OpenFlow13", cookie)
        m = re.search(r"n_packets=(\d+)", out)
        assert m, out
        return int(m.group(1))
    assert nwc.net.ping("web1", "192.0.2.70", count=5)
    before = nwc.controller.weave_stats(nwc.live(weave.id))[key]
    assert before > 0
    assert nwc.net.ping("web1", "192.0.2.70", count=2)  # after that reading, before the extend
    counted = on_switch()
    assert counted > before
    extended = nwc.controller.call(nwc.controller.weaver.extend, weave.id, 60)
    assert extended is not None and extended.expires_at > weave.expires_at
    nwc.wait_connected()
    assert on_switch() < counted  # what the tester saw: OVS counts the re-added flows anew
    after = nwc.controller.weave_stats(nwc.live(weave.id))[key]
    assert after >= counted  # the pings before the extend were read just before it
    assert nwc.net.ping("web1", "192.0.2.70", count=2)
    assert nwc.controller.weave_stats(nwc.live(weave.id))[key] > after
    # The reads before the re-install are answered, never refused.
    assert not [r for r in caplog.records if "OpenFlow error" in r.getMessage()]


def test_ovs_bundle_replies_pass_the_guard_with_spec_padded_properties(
        nwc: Nwc, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle replies a real ovs-vswitchd sends for NWC's bundles pass the guard, and so
    do the same replies carrying properties padded as the spec has them (OVS 3.1 sends none;
    a switch that does must not be hung up on)."""
    from os_ken.ofproto import ofproto_parser, ofproto_protocol
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as parser

    from nwc import ofguard

    replies: list[bytes] = []
    refused: list[str] = []
    check = ofguard.check_message

    def capture(buf: bytes) -> bool:
        if buf[1] == ofguard.EXPERIMENTER:
            replies.append(bytes(buf))
        try:
            return check(buf)
        except ofguard.Rejected as exc:  # the switch would be hung up on (and reconnect)
            refused.append(f"{exc}: {buf.hex()}")
            raise
    monkeypatch.setattr(ofguard, "check_message", capture)
    weave = nwc.weave("acme-web", "globex-db")  # bundles on h1, h2 and the fabric
    nwc.controller.call(nwc.controller.weaver.terminate, weave.id)
    nwc.wait_connected()
    monkeypatch.undo()
    assert refused == []
    kinds = {struct.unpack_from("!H", r, 20)[0] for r in replies}
    assert {ofp.ONF_BCT_OPEN_REPLY, ofp.ONF_BCT_COMMIT_REPLY} <= kinds, replies
    dp = ofproto_protocol.ProtocolDesc(version=ofp.OFP_VERSION)
    # An experimenter property of 12 bytes (4 of padding follow) and one of 5 (3 follow).
    properties = (struct.pack("!HHII", 0xFFFF, 12, 0x2320, 1) + bytes(4)
                  + struct.pack("!HHB", 7, 5, 1) + bytes(3))
    for reply in replies:
        assert len(reply) == 24 and ofguard.check_message(reply)  # OVS 3.1: no properties
        padded = reply[:2] + struct.pack("!H", 24 + len(properties)) + reply[4:] + properties
        assert ofguard.check_message(padded), padded.hex()
        msg = ofproto_parser.msg(dp, *ofproto_parser.header(padded), padded)
        assert isinstance(msg, parser.ONFBundleCtrlMsg)
        assert [(p.type, p.length) for p in msg.properties] == [(0xFFFF, 12), (7, 5)]


class _AwayHost:
    """h1's OVS, which can lose NWC and come back, and the weave's flows it holds."""

    def __init__(self, nwc: Nwc, weave: Weave) -> None:
        self.nwc = nwc
        self.ovs = nwc.net.hosts["h1"].ovs
        self.dpid = nwc.controller.config.topology.hosts["h1"].dpid
        self.target = self.ovs.vsctl("get-controller", "br-int").strip()
        self.cookie = f"cookie={weave.number << 8 | 2 << 56:#x}/0xffffffffffffff00"

    def weave_flows(self) -> int:
        out = self.ovs.ofctl("dump-flows", "br-int", "-O", "OpenFlow13", self.cookie)
        return sum(1 for line in out.splitlines() if "cookie=" in line)

    def away(self) -> None:
        # Point h1 at a port nobody listens on: it drops NWC but keeps a controller (an empty
        # controller set would make OVS flush its tables).
        self.ovs.vsctl("set-controller", "br-int", "tcp:127.0.0.1:9")
        wait_for(lambda: self.dpid not in self.nwc.part.switches, 15,
                 "NWC to notice h1 is gone")

    def back(self) -> None:
        self.ovs.vsctl("set-controller", "br-int", self.target)


def _wait_removal_waits_only_for(nwc: Nwc, weave_id: str, dpid: int) -> None:
    def waits_for_it_only() -> bool:
        removal = nwc.controller.call(lambda: nwc.part.removing.get(weave_id))
        return removal is not None and removal.waiting == {dpid}
    wait_for(waits_for_it_only, 15, "every switch but h1 to confirm the removal")


def _terminate_with_h1_away(nwc: Nwc, weave: Weave) -> _AwayHost:
    """h1, holding the weave's flows, loses NWC; then the weave is terminated, with a
    teardown timeout longer than the tests wait (TERMINATED can only come from a
    confirmation)."""
    h1 = _AwayHost(nwc, weave)
    assert h1.weave_flows() > 0
    h1.away()
    nwc.controller.call(setattr, nwc.controller.weaver, "teardown_timeout",
                        timedelta(seconds=120))
    nwc.controller.call(nwc.controller.weaver.terminate, weave.id)
    return h1


def _wait_terminated_by_resync(nwc: Nwc, weave_id: str) -> None:
    def terminated() -> bool:
        weaver = nwc.controller.weaver
        return nwc.controller.call(weaver.store.weave, weave_id).state is State.TERMINATED
    wait_for(terminated, 30, "the teardown to be confirmed by h1's resync")


def test_a_switch_away_during_teardown_keeps_it_terminating_until_resynced(nwc: Nwc) -> None:
    """Real OVS with fail_mode=secure keeps a weave's flows while its controller is away: the
    teardown is confirmed only once it is back and its resync removed them."""
    weave = nwc.weave("acme-web", "globex-db")
    h1 = _terminate_with_h1_away(nwc, weave)
    time.sleep(1)
    record = nwc.controller.call(nwc.controller.weaver.store.weave, weave.id)
    assert record.state is State.TERMINATING
    assert h1.weave_flows() > 0  # h1 still forwards with them
    h1.back()
    _wait_terminated_by_resync(nwc, weave.id)
    assert h1.weave_flows() == 0
    assert not nwc.controller.call(nwc.controller.weaver.tearing_down, weave.id)


def test_a_switch_away_across_a_restart_holds_a_recovered_weaves_teardown(nwc: Nwc) -> None:
    """h1 loses NWC, NWC restarts, and the weave it recovers is terminated before h1 is back:
    the new run never programmed h1, but h1 kept the flows the old run installed, so the
    teardown is confirmed only by h1's resync."""
    weave = nwc.weave("acme-web", "globex-db")
    h1 = _AwayHost(nwc, weave)
    assert h1.weave_flows() > 0
    h1.away()
    nwc.restart_controller()
    topo = nwc.controller.config.topology
    others = {h.dpid for h in topo.hosts.values()} | {s.dpid for s in topo.switches.values()}
    others.discard(h1.dpid)

    def others_synced() -> bool:
        with nwc.part.lock:
            return all(d in nwc.part.switches and nwc.part.switches[d].synced for d in others)
    wait_for(others_synced, 20, "every switch but h1 back and resynced")
    weaver = nwc.controller.weaver
    nwc.controller.call(setattr, weaver, "teardown_timeout", timedelta(seconds=120))
    nwc.controller.call(weaver.terminate, weave.id)
    _wait_removal_waits_only_for(nwc, weave.id, h1.dpid)
    assert nwc.controller.call(weaver.store.weave, weave.id).state is State.TERMINATING
    assert h1.weave_flows() > 0  # h1 still forwards with them
    h1.back()
    _wait_terminated_by_resync(nwc, weave.id)
    assert h1.weave_flows() == 0


def test_a_teardown_under_way_at_a_stop_waits_after_the_restart_for_a_switch_still_away(
        nwc: Nwc) -> None:
    """NWC stops while a weave's teardown waits for h1 (away, holding its flows), and h1 is
    still away after the restart: the weave stays terminating, its slot not given to a new
    weave, until h1's resync removes the flows; then it is terminated, confirmed."""
    weave = nwc.weave("acme-web", "globex-db")
    h1 = _terminate_with_h1_away(nwc, weave)
    _wait_removal_waits_only_for(nwc, weave.id, h1.dpid)
    # Longer than this test waits: TERMINATED below can only come from a confirmation.
    nwc.restart_controller(teardown_timeout_s=120)
    weaver = nwc.controller.weaver
    assert nwc.controller.call(weaver.store.weave, weave.id).state is State.TERMINATING
    assert nwc.controller.call(weaver.tearing_down, weave.id)
    assert h1.weave_flows() > 0  # h1 still forwards with them
    other = nwc.controller.call(weaver.create, WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(other, Weave)
    slots = {leg.slot for leg in weave.legs if leg.slot is not None}
    assert not slots & {leg.slot for leg in other.legs if leg.slot is not None}
    h1.back()
    _wait_terminated_by_resync(nwc, weave.id)
    assert h1.weave_flows() == 0
    (last,) = [r for r in nwc.controller.call(weaver.store.audit_records)
               if r.get("weave_id") == weave.id and r["outcome"] == "terminated"]
    assert "detail" not in last  # confirmed, not given up on at the teardown timeout
