"""The OpenFlow app driving real private ovs-vswitchd (userspace datapath) in namespaces."""

from __future__ import annotations

import re
import time

import pytest
from conftest import Nwc

from nwc.weave import State

pytestmark = pytest.mark.functional


def test_ivn_base_connects_an_ivn_across_hosts_and_isolates_the_rest(nwc: Nwc) -> None:
    net = nwc.net
    assert net.ping("web1", "192.0.2.11", count=2)  # acme-web, h1 -> h2 over the overlay
    assert not net.ping("web1", "192.0.2.70")  # globex-db: another tenant
    assert not net.ping("lab1", "192.0.2.70")  # globex-lab: same tenant, another IVN
    # The distributed gateway answered ARP for the IVN's gateway address.
    web1 = net.vm("web1")
    web1.run("ping", "-c1", "-W1", "192.0.2.1", check=False)
    neigh = web1.run("ip", "neigh", "show", "192.0.2.1").stdout
    assert net.gateway_mac("acme-web") in neigh
    # A VM that takes another address is dropped (anti-spoofing).
    web1.ip("addr", "add", "192.0.2.12/26", "dev", "eth0")
    spoofed = web1.run("ping", "-c1", "-W1", "-I", "192.0.2.12", "192.0.2.11", check=False)
    assert spoofed.returncode != 0
    assert net.ping("web1", "192.0.2.11")


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
    # A switch reconnects: its tables are rebuilt in one atomic bundle.
    h1 = nwc.net.hosts["h1"]
    h1.ovs.vsctl("del-controller", "br-int")
    time.sleep(0.3)
    h1.ovs.vsctl("set-controller", "br-int", nwc.net.hosts["h1"].controller)
    h1.ovs.vsctl("set", "controller", "br-int", "max_backoff=1000")
    nwc.wait_connected()
    # The controller restarts: every switch reconnects and is resynced.
    nwc.restart_controller()
    nwc.wait_connected()
    out, _ = ping.communicate(timeout=30)
    sent, received = _received(out)
    assert sent == 120
    assert received == sent, out[-400:]
    assert nwc.net.ping("web1", "192.0.2.70")


def test_fabric_link_down_moves_the_weave_and_its_steering(nwc: Nwc) -> None:
    weave = nwc.weave("acme-web", "globex-db")
    remote = next(leg for leg in weave.legs if leg.slot is not None)
    assert remote.path == ("h1", "s1", "s2", "h2")
    assert nwc.net.ping("web1", "192.0.2.70")
    nwc.net.fabric.set_link("s1", "s2", up=False)

    def moved() -> bool:
        w = nwc.live(weave.id)
        return w is not None and any("s3" in leg.path for leg in w.legs)
    from nwc.lab.netns import wait_for
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
