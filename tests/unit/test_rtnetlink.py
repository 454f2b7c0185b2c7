"""The agent's reads of the kernel (`nwc.rtnetlink`, through `HostNetwork`): a recent kernel
is asked for the main table and the VXLAN devices alone, and an older one (no strict
checking, no kind filter, or one refusing what is asked) gives the same answers from full
dumps filtered here. The fake kernel encodes its answers with pyroute2 (`kernel_fake`)."""

from __future__ import annotations

import ipaddress

import pytest
from kernel_fake import BLACKHOLE, LOCAL, RTM_F_CLONED, UNICAST, FakeKernel, fake_host_network
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from nwc import hostnet
from nwc.hostnet import VxlanDevice
from nwc.rtnetlink import parse_link

pytestmark = pytest.mark.unit

A = ipaddress.IPv4Address
LOCAL_VTEP, REMOTE_VTEP = A("100.100.0.1"), A("100.100.0.2")
LOCAL_END, REMOTE_END = A("100.64.128.1"), A("100.64.128.2")
OTHER = A("100.64.128.9")
WANT = VxlanDevice("nwv0", 1000, LOCAL_VTEP, REMOTE_VTEP, 4789, 1450)


@pytest.fixture(autouse=True)
def no_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostnet, "_disable_ipv6", lambda device: None)


def a_built_leg(kernel: FakeKernel) -> FakeKernel:
    """A leg as the agent builds it, and what else a host's tables hold: the local table's
    routes for its addresses, kernel-libipsec's route for the peer's VTEP in table 220, and a
    learnt path MTU to another host cached as an exception in the main table."""
    kernel.link("add", ifname="nwv0", vxlan_id=1000, vxlan_local=str(LOCAL_VTEP),
                vxlan_group=str(REMOTE_VTEP), vxlan_port=4789, mtu=1450)
    kernel.link("set", index=kernel.links["nwv0"]["index"], state="up")
    kernel.addresses |= {(1, str(LOCAL_VTEP)), (2, str(LOCAL_END))}
    kernel.routes += [
        {"dst": str(REMOTE_VTEP), "type": BLACKHOLE},
        {"dst": str(REMOTE_END), "type": UNICAST, "oif": 2, "src": str(LOCAL_END)},
        {"dst": str(LOCAL_VTEP), "type": LOCAL, "oif": 1, "table": 255},
        {"dst": str(LOCAL_END), "type": LOCAL, "oif": 2, "table": 255},
        {"dst": str(REMOTE_VTEP), "type": UNICAST, "oif": 2, "src": str(LOCAL_VTEP),
         "table": 220},
        {"dst": str(OTHER), "type": UNICAST, "oif": 2, "flags": RTM_F_CLONED},
    ]
    return kernel


def answers(kernel: FakeKernel) -> dict[str, object]:
    """What the agent reads of the leg, in one pass."""
    net = fake_host_network(kernel)
    with net.one_pass():
        return {
            "blackhole": net.has_blackhole(REMOTE_VTEP),
            "link route": net.has_link_route(REMOTE_END, "ul0", LOCAL_END),
            "no blackhole where none": net.has_blackhole(REMOTE_END),
            # Table 220 (kernel-libipsec's) is not the main table; nor is a cached exception
            # a route: either taken for one, a missing link route would not be put back.
            "not from table 220": net.has_link_route(REMOTE_VTEP, "ul0", None),
            "not from the route cache": net.has_link_route(OTHER, "ul0", None),
            "addresses": (net.has_address(LOCAL_VTEP, "lo"), net.has_address(LOCAL_END, "ul0"),
                          net.has_address(REMOTE_END, "ul0")),
            "device": net.vxlan("nwv0"),
            "up": net._is_up("nwv0"),
            "lo": net.link_exists("lo"),
            "missing": net.link_exists("nwv9"),
        }


EXPECTED = {"blackhole": True, "link route": True, "no blackhole where none": False,
            "not from table 220": False, "not from the route cache": False,
            "addresses": (True, True, False), "device": WANT, "up": True, "lo": True,
            "missing": False}


def test_a_recent_kernel_sends_the_main_table_and_the_vxlan_devices_alone() -> None:
    kernel = a_built_leg(FakeKernel())
    assert answers(kernel) == EXPECTED
    assert sorted(kernel.asked[:3], key=str) == [
        ("addresses", True), ("links", "vxlan", True), ("routes", 254, True)]
    # The devices that are not VXLAN, asked for by name once each.
    assert sorted(kernel.asked[3:]) == [("link", "lo"), ("link", "nwv9"), ("link", "ul0")]


@pytest.mark.parametrize("age", [
    pytest.param({"strict": False, "kind_filter": False}, id="before-4.15"),
    pytest.param({"strict": False, "kind_filter": True}, id="4.15-4.19"),
    pytest.param({"refuses_filters": True}, id="refusing-filters"),
])
def test_an_older_kernel_gives_the_same_answers_from_full_dumps(age: dict[str, bool]) -> None:
    kernel = a_built_leg(FakeKernel(**age))
    assert answers(kernel) == EXPECTED
    if not age.get("kind_filter", True):
        # A link dump it did not filter holds every device: none is asked for by name.
        assert not [a for a in kernel.asked if a[0] == "link"]


def test_a_kernel_refusing_the_filters_is_asked_without_strict_checking_from_then_on() -> None:
    kernel = a_built_leg(FakeKernel(refuses_filters=True))
    net = fake_host_network(kernel)
    for _ in range(2):
        with net.one_pass():
            assert net.has_blackhole(REMOTE_VTEP)
    assert [a for a in kernel.asked if a[0] == "refused"] == [kernel.asked[0]]  # once
    assert {a[-1] for a in kernel.asked if a[0] in ("links", "addresses", "routes")} == {False}


def test_an_empty_kind_filtered_link_dump_is_not_taken_for_a_host_without_devices() -> None:
    """Linux 4.15-4.19 filter links by kind but mark only the devices they send as filtered:
    with no VXLAN device yet, the answer is empty and unmarked."""
    kernel = FakeKernel(strict=False, kind_filter=True)
    net = fake_host_network(kernel)
    with net.one_pass():
        assert net.link_exists("lo") and net.link_exists("ul0")
        net.ensure_address(LOCAL_VTEP, "lo")
    assert kernel.addresses == {(1, str(LOCAL_VTEP))}


def test_a_device_of_another_kind_in_a_legs_place_is_replaced() -> None:
    """Not in the VXLAN devices' dump, it is still found by name, and removed: the leg's
    device is made in its place."""
    kernel = FakeKernel()
    index = kernel.add_foreign_link("nwv0")
    net = fake_host_network(kernel)
    with net.one_pass():
        assert net.vxlan("nwv0") is None and net.link_exists("nwv0")
        net.ensure_vxlan(WANT)
        assert net.vxlan("nwv0") == WANT
    assert kernel.changes[0] == ("link", "del", str(index))
    assert kernel.links["nwv0"]["vxlan"] == WANT


def test_a_device_asked_for_by_name_is_asked_again_after_the_passs_own_link_change() -> None:
    """What a pass reads after its own change is the kernel's answer, for the devices it
    asks for by name as for the dumped ones."""
    kernel = FakeKernel()
    net = fake_host_network(kernel)
    with net.one_pass():
        assert not net.link_exists("nwx0")
        kernel.add_foreign_link("nwx0")  # someone else, during the pass
        assert not net.link_exists("nwx0")  # the view's answer until something changes
        net.ensure_vxlan(WANT)  # a change to the links: they are read again
        assert net.link_exists("nwx0")


def test_a_link_message_is_read_whatever_other_attributes_it_carries() -> None:
    """Only the name, index, state and kind are decoded; nested and unknown attributes are
    stepped over."""
    msg = ifinfmsg()
    msg["index"], msg["flags"] = 7, 0
    msg["attrs"] = [("IFLA_TXQLEN", 1000), ("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_KIND", "bridge")]}), ("IFLA_IFNAME", "br-int"), ("IFLA_GROUP", 0)]
    msg.encode()
    name, link = parse_link(bytes(msg.data)) or ("", None)
    assert name == "br-int" and link is not None
    assert (link.index, link.up, link.vxlan()) == (7, False, None)
