"""`HostNetwork`'s per-pass view of the kernel, against a fake kernel behind the pyroute2
calls it makes and the netlink socket it reads (`kernel_fake`): a change made in a pass is
read back by the same pass, a change made by someone else between passes is seen by the next
one, and the agent's safety rules (the blackhole back every pass; no blackhole, no VXLAN
device) hold through the view."""

from __future__ import annotations

import ipaddress

import pytest
from kernel_fake import BLACKHOLE, FakeKernel, FakeMonitor, fake_host_network
from tunnel_fakes import POLICY, TOPO, FakeClock, FakeHostDb, FakeIke, one_leg_weave, run_now

from nwc import hostnet
from nwc.agent import Agent
from nwc.hostnet import HostNetwork, VxlanDevice
from nwc.pki import new_psk
from nwc.tunnel import RECORD_PREFIX, LegRecord, Phase, TunnelSpec, leg_specs

pytestmark = pytest.mark.unit

DST = ipaddress.IPv4Address("100.100.0.2")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def monitored() -> tuple[HostNetwork, FakeKernel, Clock]:
    kernel, clock = FakeKernel(), Clock()
    net = fake_host_network(kernel, FakeMonitor(kernel), clock)
    return net, kernel, clock


@pytest.fixture(autouse=True)
def no_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostnet, "_disable_ipv6", lambda device: None)


def test_a_change_made_in_a_pass_is_read_back_by_the_same_pass() -> None:
    kernel = FakeKernel()
    net = fake_host_network(kernel)
    with net.one_pass():
        assert not net.has_blackhole(DST)
        assert not net.has_address(DST, "lo")
        assert kernel.dumps == 3  # one view: links, addresses, routes
        assert not net.has_blackhole(DST) and net.link_exists("ul0")
        assert kernel.dumps == 3  # read from the view, not asked again
        net.ensure_blackhole(DST)
        assert net.has_blackhole(DST)  # the change made the routes stale: read afresh
        assert kernel.dumps == 4  # the routes only: a route change leaves the rest as it was
        net.ensure_blackhole(DST)  # so the next ensure sees it and adds nothing
        net.ensure_address(DST, "lo")
        net.ensure_address(DST, "lo")
        assert kernel.changes == [("route", "add", f"{DST}/32"), ("addr", "add", str(DST))]
        # A new device's index exists only once it is made: read after the add, not before.
        want = VxlanDevice("nwv0", 1000, ipaddress.IPv4Address("100.100.0.1"), DST, 4789, 1500)
        net.ensure_vxlan(want)
        assert net.vxlan("nwv0") == want and kernel.links["nwv0"]["up"]
        net.remove_link("nwv0")
        assert not net.link_exists("nwv0")


def test_a_change_made_by_someone_else_between_passes_is_seen_at_the_next_pass() -> None:
    kernel = FakeKernel()
    net = fake_host_network(kernel)
    with net.one_pass():
        net.ensure_blackhole(DST)
        net.ensure_address(DST, "lo")
        assert net.has_blackhole(DST)
    # Between passes: `ip route flush`, `ip addr flush`
    kernel.routes.clear()
    kernel.addresses.clear()
    with net.one_pass():
        assert not net.has_blackhole(DST) and not net.has_address(DST, "lo")
        net.ensure_blackhole(DST)
        net.ensure_address(DST, "lo")
    assert kernel.routes == [{"dst": str(DST), "type": BLACKHOLE}]
    assert kernel.addresses == {(1, str(DST))}
    # Outside a pass nothing is kept: each read asks the kernel.
    kernel.routes.clear()
    assert not net.has_blackhole(DST)


def test_a_dump_the_kernel_marks_inconsistent_is_read_again() -> None:
    kernel = FakeKernel()
    kernel.routes.append({"dst": str(DST), "type": BLACKHOLE})
    kernel.interrupt_next_dumps = 1
    net = fake_host_network(kernel)
    with net.one_pass():
        assert net.has_blackhole(DST)
    assert kernel.dumps == 6
    kernel.interrupt_next_dumps = 3  # tables that never stop changing: no answer at all
    with net.one_pass(), pytest.raises(RuntimeError, match="kept changing"):
        net.has_blackhole(DST)


# -- the agent over the real HostNetwork ------------------------------------------------------

def installed_leg() -> tuple[Agent, FakeKernel, TunnelSpec]:
    w = one_leg_weave(7, 0)
    spec, _ = leg_specs(w, w.legs[0], POLICY.profiles["gold"], TOPO)
    kernel = FakeKernel()
    db = FakeHostDb()
    agent = Agent(db=db, ike=FakeIke(), net=fake_host_network(kernel),
                  backend="strongswan", underlay_device="ul0", submit=run_now,
                  clock=FakeClock())
    db.ids[RECORD_PREFIX + spec.key] = LegRecord(spec, new_psk(), start=True).to_json()
    for _ in range(3):
        agent.step()
    assert agent.legs[spec.key].phase is Phase.INSTALLED
    return agent, kernel, spec


def test_the_agent_puts_back_a_blackhole_removed_between_passes() -> None:
    agent, kernel, spec = installed_leg()
    built = list(kernel.routes)
    assert {"dst": str(spec.remote_vtep), "type": BLACKHOLE} in built
    kernel.routes = [r for r in kernel.routes if r["type"] != BLACKHOLE]
    dumps, changes = kernel.dumps, len(kernel.changes)
    agent.step()
    assert sorted(map(str, kernel.routes)) == sorted(map(str, built))
    assert "nwv0" in kernel.links  # the device was never without its blackhole: left alone
    assert kernel.changes[changes:] == [("route", "add", f"{spec.remote_vtep}/32")]
    assert kernel.dumps - dumps == 4  # the pass's view, then the routes after its change
    agent.step()
    assert len(kernel.changes) == changes + 1  # nothing more to do


def test_the_agent_removes_the_device_while_the_blackhole_cannot_be_put_back() -> None:
    agent, kernel, spec = installed_leg()
    kernel.routes = [r for r in kernel.routes if r["type"] != BLACKHOLE]
    kernel.refuse_blackholes = True
    agent.step()
    assert "nwv0" not in kernel.links
    assert agent.legs[spec.key].phase is Phase.ERROR
    agent.step()
    assert "nwv0" not in kernel.links  # still no blackhole: still no device
    kernel.refuse_blackholes = False
    for _ in range(2):
        agent.step()
    assert {"dst": str(spec.remote_vtep), "type": BLACKHOLE} in kernel.routes
    assert "nwv0" in kernel.links and agent.legs[spec.key].phase is Phase.INSTALLED
    order = [c for c in kernel.changes if c in (("route", "add", f"{spec.remote_vtep}/32"),
                                                ("link", "add", "nwv0"))]
    assert order[-2:] == [("route", "add", f"{spec.remote_vtep}/32"), ("link", "add", "nwv0")]


# -- a view kept across passes while the kernel is quiet ---------------------------------------

def test_a_quiet_kernel_lets_the_next_pass_keep_the_view() -> None:
    net, kernel, _ = monitored()
    with net.one_pass():
        net.ensure_blackhole(DST)  # its notification: the next pass reads again ...
    for _ in range(2):  # ... and, having just heard one, the pass after it too
        with net.one_pass():
            assert net.has_blackhole(DST)
    dumps = kernel.dumps
    with net.one_pass():
        assert net.has_blackhole(DST) and net.link_exists("ul0")
    assert kernel.dumps == dumps  # nothing changed: nothing read
    kernel.routes.clear()  # someone else, between passes: the kernel tells
    kernel.notifications += 1
    with net.one_pass():
        assert not net.has_blackhole(DST)
        net.ensure_blackhole(DST)
    assert kernel.dumps == dumps + 3 and net.has_blackhole(DST)


def with_a_kept_blackhole_view() -> tuple[HostNetwork, FakeKernel, Clock]:
    """A blackhole put in place, then two passes: the second keeps its view, so the next
    pass starts with one (see the test above)."""
    net, kernel, clock = monitored()
    with net.one_pass():
        net.ensure_blackhole(DST)
    for _ in range(2):
        with net.one_pass():
            assert net.has_blackhole(DST)
    return net, kernel, clock


def test_a_kept_view_is_read_again_once_it_is_old_even_without_a_notification() -> None:
    net, kernel, clock = with_a_kept_blackhole_view()
    kernel.routes.clear()  # and the notification is lost
    clock.now += hostnet.MAX_VIEW_AGE_S - 0.5
    with net.one_pass():
        assert net.has_blackhole(DST)  # the bound on what a lost notification hides
    clock.now += 0.5
    with net.one_pass():
        assert not net.has_blackhole(DST)


def test_a_read_between_passes_does_not_leave_the_next_pass_a_stale_view() -> None:
    """The read between passes takes the notifications the next pass would have seen."""
    net, kernel, _ = monitored()
    with net.one_pass():
        net.ensure_blackhole(DST)
    with net.one_pass():
        assert net.has_blackhole(DST)
    kernel.routes.clear()
    kernel.notifications += 1
    assert not net.has_blackhole(DST)  # outside a pass: read afresh
    with net.one_pass():
        assert not net.has_blackhole(DST)


def test_a_change_reads_again_only_its_table_and_leaves_the_rest_to_the_next_pass() -> None:
    """Building a leg makes several changes; reading all three tables after each made a
    100-leg host take tens of seconds to build. A re-read of one table must not swallow
    the notice of someone else's change to another: the next pass reads everything."""
    net, kernel, _ = monitored()
    with net.one_pass():
        net.ensure_address(DST, "lo")
    for _ in range(2):
        with net.one_pass():
            assert net.has_address(DST, "lo")
    with net.one_pass():  # the kept view
        kernel.addresses.clear()  # someone else, during this pass
        kernel.notifications += 1
        dumps = kernel.dumps
        net.ensure_blackhole(DST)
        assert net.has_blackhole(DST) and kernel.dumps == dumps + 1  # the routes alone
    with net.one_pass():
        assert not net.has_address(DST, "lo")
        net.ensure_address(DST, "lo")
    assert kernel.addresses == {(1, str(DST))}


def test_a_view_dumped_just_after_a_notification_is_not_kept_for_the_next_pass() -> None:
    """The kernel announces a route's deletion (RTM_DELROUTE) before the route leaves the
    table, and a device going down (RTM_NEWLINK) before its routes are flushed, with no
    notification for the flush; route dumps run under RCU, not the lock the writer holds.
    A dump just after a notification was read may so still show what it announced gone,
    and no later notification says otherwise: that view must not outlive its pass."""
    net, kernel, _ = monitored()
    with net.one_pass():
        net.ensure_blackhole(DST)
    kernel.notifications += 1  # someone deletes it: announced, still in the table ...
    with net.one_pass():
        assert net.has_blackhole(DST)  # ... when this pass dumps it
    kernel.routes.clear()  # then gone, and nothing more is sent
    with net.one_pass():
        assert not net.has_blackhole(DST)


def test_a_notification_read_at_the_start_of_a_pass_also_unsettles_its_dump() -> None:
    net, kernel, _ = with_a_kept_blackhole_view()
    kernel.notifications += 1  # read by the third pass's first look at the monitor
    with net.one_pass():
        assert net.has_blackhole(DST)
    kernel.routes.clear()
    with net.one_pass():
        assert not net.has_blackhole(DST)
