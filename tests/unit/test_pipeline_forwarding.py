"""The compiler's flows and meters, run through fake switches: who reaches whom, and how."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakeoftable import ip, mac
from netsim import Sim

from nwc.pipeline import OWNER_MASK, T_CLASSIFY, gateway_mac, ivn_cookie, weave_switches

pytestmark = pytest.mark.unit


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    return Sim.build(tmp_path)


def test_ivn_base_same_host_and_across_hosts(sim: Sim) -> None:
    # web1 and web3 share h1; web2 is on h2 (base overlay over the fabric).
    assert sim.reaches("web1", "web3")
    assert sim.reaches("web1", "web2")
    assert sim.reaches("web2", "web1")
    delivered = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.11"))
    (d,) = delivered
    gw = sim.policy.ivns["acme-web"]
    # Routed by the distributed gateway: MACs rewritten, TTL decremented.
    assert d.packet["eth_src"] == mac(gateway_mac(gw))
    assert d.packet["eth_dst"] == mac(sim.topology.vms["web2"].mac)
    assert d.packet["nw_ttl"] == 63
    assert d.fabric_paths == [("h1", "s1", "s2", "h2")]


def test_switched_traffic_inside_a_subnet_keeps_its_macs(sim: Sim) -> None:
    web2 = sim.topology.vms["web2"]
    (d,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.11", eth_dst=web2.mac))
    assert d.vm == "web2"
    assert d.packet["eth_src"] == mac(sim.topology.vms["web1"].mac)
    assert d.packet["nw_ttl"] == 64


def test_default_deny_between_ivns(sim: Sim) -> None:
    assert not sim.ping("web1", "db1")
    assert not sim.ping("db1", "web1")
    assert not sim.ping("lab1", "db2")  # same tenant, other IVN: still isolated
    assert not sim.ping("app1", "web1")  # same host, other IVN
    assert not sim.ping("web1", "app1")


def test_gateway_answers_arp_and_nothing_floods(sim: Sim) -> None:
    web1 = sim.topology.vms["web1"]
    (reply,) = sim.net.send("web1", sim.net.vm_arp_request("web1", "192.0.2.1"))
    gw_mac = mac(gateway_mac(sim.policy.ivns["acme-web"]))
    assert reply.vm == "web1"
    assert reply.packet["arp_op"] == 2
    assert reply.packet["arp_sha"] == gw_mac and reply.packet["eth_src"] == gw_mac
    assert reply.packet["arp_spa"] == ip("192.0.2.1")
    assert reply.packet["arp_tpa"] == int(web1.ip)
    assert reply.packet["eth_dst"] == mac(web1.mac) == reply.packet["arp_tha"]
    # A peer's address is answered with the peer's MAC, on its own host or not.
    (peer,) = sim.net.send("web1", sim.net.vm_arp_request("web1", "192.0.2.11"))
    assert peer.packet["arp_sha"] == mac(sim.topology.vms["web2"].mac)
    # Another IVN's addresses and unknown ones: no answer, and no broadcast reaches anyone.
    assert sim.net.send("web1", sim.net.vm_arp_request("web1", "192.0.2.70")) == []
    assert sim.net.send("web1", sim.net.vm_arp_request("web1", "192.0.2.33")) == []


def test_gateway_answers_ping_for_its_own_address_only(sim: Sim) -> None:
    web1 = sim.topology.vms["web1"]
    gw_mac = mac(gateway_mac(sim.policy.ivns["acme-web"]))
    (reply,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.1"))
    assert reply.vm == "web1" and reply.packet["icmpv4_type"] == 0
    assert reply.packet["ipv4_src"] == ip("192.0.2.1")
    assert reply.packet["ipv4_dst"] == int(web1.ip)
    assert reply.packet["eth_src"] == gw_mac and reply.packet["eth_dst"] == mac(web1.mac)
    # Only echo requests: other traffic to the gateway goes nowhere.
    assert sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.1", proto=17)) == []
    # Another IVN's gateway is not this VM's: no answer.
    other = str(sim.policy.ivns["globex-db"].gateway)
    assert sim.net.send("web1", sim.net.vm_ip_packet("web1", other)) == []


def test_spoofed_source_mac_or_ip_is_dropped(sim: Sim) -> None:
    net = sim.net
    assert not net.send("web1", net.vm_ip_packet("web1", "192.0.2.11",
                                                  ipv4_src=ip("192.0.2.40")))
    assert not net.send("web1", net.vm_ip_packet("web1", "192.0.2.11",
                                                  eth_src=mac("02:00:00:00:00:99")))
    # Claiming another IVN's address does not help either.
    assert not net.send("lab1", net.vm_ip_packet("lab1", "192.0.2.10",
                                                  ipv4_src=ip("192.0.2.11")))
    arp = net.vm_arp_request("web1", "192.0.2.1")
    arp["arp_spa"] = ip("192.0.2.11")
    assert net.send("web1", arp) == []


def _forged_echo(sim: Sim, dst: str, src_ip: str = "192.0.2.99") -> dict[str, int]:
    """The inner frame of hand-built VXLAN: an echo request straight to a VM's MAC."""
    vm = sim.topology.vms[dst]
    return {"eth_src": mac("02:dd:00:00:01:99"), "eth_dst": mac(vm.mac), "eth_type": 0x0800,
            "ipv4_src": ip(src_ip), "ipv4_dst": int(vm.ip), "ip_proto": 1, "icmpv4_type": 8,
            "nw_ttl": 64, "len": 100}


def test_ivn_overlay_takes_a_vni_only_from_hosts_with_vms_of_that_ivn(sim: Sim) -> None:
    # globex-db has db1 on h2 and db2 on h3; h1 has none of its VMs. Root on h1 sends VXLAN
    # with globex-db's VNI to h3's underlay address (the tester's injection).
    vni = sim.policy.ivns["globex-db"].vni
    forged = _forged_echo(sim, "db2")
    assert sim.net.forge_overlay("h1", "h3", vni, forged) == []
    # Dropped by a flow of the IVN's own, which counts it.
    drops = [f for f in sim.net.switches["h3"].flow_stats(ivn_cookie(vni), OWNER_MASK)
             if f.table == T_CLASSIFY and "tunnel_id" in f.match and not f.instructions]
    assert [f.packets for f in drops] == [1]
    # From h2, which has a globex-db VM, the same frame is the IVN's own overlay traffic and
    # is delivered (the documented limit: such a host can inject into that IVN).
    assert [d.vm for d in sim.net.forge_overlay("h2", "h3", vni, forged)] == ["db2"]
    assert sim.reaches("db1", "db2") and sim.reaches("db2", "db1")
    # Nor does h3 take acme-web's VNI at all: none of its VMs is acme-web's.
    acme = sim.policy.ivns["acme-web"].vni
    assert sim.net.forge_overlay("h2", "h3", acme, _forged_echo(sim, "db2")) == []


def test_a_weave_vni_is_never_taken_from_the_ivn_overlay_port(sim: Sim) -> None:
    # Weave traffic enters br-int only through its leg's port; VXLAN with a leg's VNI that
    # arrives at ivn-vxlan instead (from the leg's far end or any other host) goes nowhere,
    # even with a source the weave's ACL allows.
    weave = sim.weave("acme-web", "globex-db")
    leg = next(leg for leg in weave.legs if (leg.requester_host, leg.target_host) == ("h1", "h3"))
    assert leg.slot is not None
    vni = sim.topology.weave_addresses(leg.slot).vni
    forged = _forged_echo(sim, "db2", src_ip=str(sim.topology.vms["web1"].ip))
    for sender in ("h1", "h2"):
        assert sim.net.forge_overlay(sender, "h3", vni, forged) == [], sender
    assert sim.reaches("web1", "db2")


def test_weave_joins_two_ivns_only_while_active(sim: Sim) -> None:
    assert not sim.reaches("web1", "db1")
    weave = sim.weave("acme-web", "globex-db")
    # Every pair, across hosts and on one host (web2 and db1 share h2), both ways.
    for a, b in (("web1", "db1"), ("web1", "db2"), ("web2", "db1"), ("web2", "db2")):
        assert sim.reaches(a, b), (a, b)
        assert sim.reaches(b, a), (b, a)
    # No other VM reaches the target: another IVN of the target's tenant, a third tenant,
    # and acme's own VM outside the prefix globex accepts (192.0.2.0/27).
    for outsider in ("lab1", "app1", "web3"):
        assert not sim.ping(outsider, "db1"), outsider
    assert not sim.ping("db1", "web3")
    # The VM sees its own gateway's MAC as the source, as if routed; nothing was configured.
    (d,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.70"))
    assert d.packet["eth_src"] == mac(gateway_mac(sim.policy.ivns["globex-db"]))
    assert d.packet["eth_dst"] == mac(sim.topology.vms["db1"].mac)
    sim.weaver.terminate(weave.id)
    sim.sync()
    for a, b in (("web1", "db1"), ("db1", "web1"), ("web2", "db1")):
        assert not sim.ping(a, b), (a, b)


def test_weave_traffic_crosses_the_fabric_on_the_leg_path_never_the_base_overlay(
        sim: Sim) -> None:
    weave = sim.weave("acme-web", "globex-db")
    (d,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.71"))
    leg = next(leg for leg in weave.legs if (leg.requester_host, leg.target_host) == ("h1", "h3"))
    assert d.fabric_paths == [leg.path]
    # The leg's port on the way back too.
    (back,) = sim.net.send("db2", sim.net.vm_ip_packet("db2", "192.0.2.10"))
    assert back.fabric_paths == [tuple(reversed(leg.path))]


def test_proxy_arp_for_the_partner_prefix_while_woven(sim: Sim) -> None:
    assert sim.net.send("web1", sim.net.vm_arp_request("web1", "192.0.2.70")) == []
    sim.weave("acme-web", "globex-db")
    (reply,) = sim.net.send("web1", sim.net.vm_arp_request("web1", "192.0.2.70"))
    assert reply.packet["arp_spa"] == ip("192.0.2.70")
    assert reply.packet["arp_sha"] == mac(gateway_mac(sim.policy.ivns["acme-web"]))
    assert reply.packet["arp_tpa"] == ip("192.0.2.10")


def test_hard_timeout_ends_weave_flows_even_if_the_controller_is_gone(sim: Sim) -> None:
    sim.weave("acme-web", "globex-db", duration_s=120)
    sim.advance(119)
    assert sim.reaches("web1", "db2")
    sim.advance(2)
    assert not sim.ping("web1", "db2")
    assert sim.reaches("web1", "web2")  # the IVN base has no timeout


def test_dscp_from_each_senders_qos_class(sim: Sim) -> None:
    sim.weave("acme-web", "globex-db")
    (d,) = sim.net.send("web1", sim.net.vm_ip_packet("web1", "192.0.2.71"))
    assert d.packet["ip_dscp"] == sim.policy.qos_classes["premium"].dscp
    (back,) = sim.net.send("db2", sim.net.vm_ip_packet("db2", "192.0.2.10"))
    assert back.packet["ip_dscp"] == sim.policy.qos_classes["business"].dscp


def test_silver_acl_lets_the_requester_open_https_and_nothing_else(sim: Sim) -> None:
    sim.weave("acme-web", "initech-app", profile="silver")
    net = sim.net
    app = "203.0.113.10"

    def tcp(src: str, dst: str, sport: int, dport: int, flags: int) -> bool:
        pkt = net.vm_ip_packet(src, dst, proto=6, tcp_src=sport, tcp_dst=dport,
                               tcp_flags=flags)
        return bool(net.send(src, pkt))

    syn, syn_ack = 0x002, 0x012
    # web2 (h2) -> app1 (h1) across a leg, web1 -> app1 on one host.
    for web, web_ip in (("web1", "192.0.2.10"), ("web2", "192.0.2.11")):
        assert tcp(web, app, 40000, 443, syn)
        assert tcp("app1", web_ip, 443, 40000, syn_ack)  # the reply
        assert tcp(web, app, 40001, 5201, syn)
        assert not tcp(web, app, 40000, 22, syn)
        # The target cannot open a connection, not even from the allowed port.
        assert not tcp("app1", web_ip, 443, 40000, syn)
        assert not tcp("app1", web_ip, 40000, 443, syn)
        assert bool(net.send(web, net.vm_ip_packet(web, app, proto=17, udp_src=5000,
                                                   udp_dst=5201)))
        assert not net.send(web, net.vm_ip_packet(web, app, proto=17, udp_src=5000,
                                                  udp_dst=53))
        # ICMP: either side.
        assert sim.reaches(web, "app1")
        assert sim.reaches("app1", web)


def test_meter_drops_what_exceeds_the_reserved_rate(sim: Sim) -> None:
    weave = sim.weave("acme-web", "globex-db", mbps=1)
    premium = sim.policy.qos_classes["premium"]
    sent = 200
    size = 1000
    delivered = 0
    for _ in range(sent):
        pkt = sim.net.vm_ip_packet("web1", "192.0.2.71", len=size)
        delivered += len(sim.net.send("web1", pkt))
    # The legs on h1 (to h2 and h3) share h1's requester->target meter: rate x 2 legs.
    legs_on_h1 = sum(1 for leg in weave.legs if "h1" in (leg.requester_host, leg.target_host))
    burst_bits = premium.burst_kbits(weave.kbps * legs_on_h1) * 1000
    assert delivered == burst_bits // (size * 8)
    assert 0 < delivered < sent
    # Time refills the bucket at the reserved rate.
    sim.advance(1.0)
    assert sim.reaches("web1", "db2", len=size)


def test_weave_flows_live_only_on_the_switches_it_uses(sim: Sim) -> None:
    weave = sim.weave("acme-web", "initech-app", profile="silver")
    used = weave_switches(sim.topology, weave)
    for name, switch in sim.net.switches.items():
        dpid = (sim.topology.hosts[name].dpid if name in sim.topology.hosts
                else sim.topology.switches[name].dpid)
        owned = switch.flow_stats(weave.number << 8 | 2 << 56, 0xFFFF_FFFF_FFFF_FF00)
        assert bool(owned) == (dpid in used), name
