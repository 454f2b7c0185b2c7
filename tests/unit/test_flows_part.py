"""The flows part end to end on fake switches: what a weave, a reconnect, a lease, a slow or
lying switch do to the tables the part keeps."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flowsim import FakeDatapath, FlowsSim
from netsim import TRIANGLE
from os_ken.controller.handler import MAIN_DISPATCHER
from os_ken.ofproto import ofproto_v1_3 as ofp
from policy_edits import shipped_text

from nwc import ofapp
from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES
from nwc.ofmessages import delete_owner_mod
from nwc.pipeline import (
    DIRECTIONS,
    METER_SPACE,
    OWNER_MASK,
    meter_id,
    weave_cookie,
    weave_switches,
)
from nwc.policy import Policy, load_policy, parse_policy_text
from nwc.topology import parse_topology_text
from nwc.weave import State, Weave

pytestmark = pytest.mark.unit


@pytest.fixture
def fsim(tmp_path: Path) -> Iterator[FlowsSim]:
    with FlowsSim.build(tmp_path) as sim:
        yield sim


def test_a_weave_is_confirmed_by_every_switch_and_carries_traffic(fsim: FlowsSim) -> None:
    fsim.connect_all()
    assert fsim.reaches("web1", "web2")  # the IVN base came with the resync
    assert not fsim.ping("web1", "db2")
    weave = fsim.weave("acme-web", "globex-db")
    assert fsim.weaver.live[weave.id].state is State.ACTIVE
    assert fsim.reaches("web1", "db2")
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    assert not fsim.ping("web1", "db2")
    assert fsim.reaches("web1", "web2")


def test_a_switch_that_stops_reading_does_not_stall_the_weaver(fsim: FlowsSim) -> None:
    for name in ("h2", "h3", "s1", "s2", "s3"):
        fsim.connect(name, settle=False)
    never = threading.Event()  # h1 takes its handshake, then never reads again
    stuck = fsim.connect("h1", block=never, settle=False)
    # The weaver keeps serving: a weave is admitted and programmed on the switches that read.
    weave = fsim.loop.call(fsim.weaver.create, WeaveRequest("acme-web", "globex-db", 600, 5,
                                                            None), timeout=10)
    assert isinstance(weave, Weave)
    for name in ("h2", "h3", "s1", "s2", "s3"):
        assert fsim.dps[name].sent, name
    fsim.part.flush(timeout=10, only=[fsim.dpid(n) for n in ("h2", "h3", "s1", "s2", "s3")])
    fsim.loop.call(lambda: None, timeout=10)
    assert fsim.reaches("web2", "db1")  # joined on h2, which h1's socket does not hold up
    assert fsim.loop.call(lambda: fsim.weaver.live[weave.id].state, timeout=10) is \
        State.PROVISIONING  # h1 has not confirmed it
    assert not stuck.closed.is_set()  # a slow reader is not dropped before its queue fills


def test_a_switch_whose_queue_overflows_is_dropped_and_resynced_on_reconnect(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ofapp, "MAX_OUTBOX_BYTES", 2048)  # less than one host resync
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    fsim.dps["h1"].hang_up()
    fsim.settle()
    never = threading.Event()
    stuck = fsim.connect("h1", block=never, settle=False)  # its resync waits in the queue
    assert not stuck.closed.is_set()
    # More for h1 (another weave) would pass the bound: the connection is dropped instead.
    other = fsim.loop.call(fsim.weaver.create, WeaveRequest("acme-web", "initech-app", 600, 5,
                                                            "silver"), timeout=10)
    assert isinstance(other, Weave)
    assert stuck.closed.wait(10)
    fsim.loop.call(lambda: None, timeout=10)
    assert fsim.dpid("h1") not in fsim.part.switches
    fsim.connect("h1")  # the switch comes back and reads: a full resync
    assert fsim.reaches("web1", "db2")
    assert fsim.reaches("web1", "app1")
    assert fsim.weaver.live[weave.id].state is State.ACTIVE
    assert fsim.weaver.live[other.id].state is State.ACTIVE


def _policy_with_long_leases(tmp_path: Path) -> Policy:
    """The shipped policy, with leases of up to 200,000 s on every IVN."""
    directory = tmp_path / "policies"
    directory.mkdir()
    for source in SHIPPED_POLICIES.glob("*.yaml"):
        text = re.sub(r"max_duration_s: \d+", "max_duration_s: 200000", source.read_text())
        (directory / source.name).write_text(text)
    return load_policy([directory])


def test_flows_of_a_lease_longer_than_the_hard_timeout_cap_do_not_expire(tmp_path: Path) -> None:
    """OpenFlow hard timeouts stop at 65,535 s; a 100,000 s lease keeps its flows anyway."""
    sim = FlowsSim.build(tmp_path / "state", policy=_policy_with_long_leases(tmp_path))
    try:
        sim.connect_all()
        weave = sim.weave("acme-web", "globex-db", duration_s=100_000)
        h3 = sim.net.switches["h3"]  # db2's host: counts what the weave delivered

        def delivered() -> int:
            return sum(f.packets for f in h3.flow_stats(weave_cookie(weave.number, 3),
                                                        2**64 - 1))
        for sent in range(1, 71):  # 70,000 s in steps, the part's timer running as it does
            assert sim.reaches("web1", "db2"), sim.clock.now()
            assert delivered() == sent  # counters survive a refresh
            sim.advance(1000)
            sim.loop.call(sim.part.refresh_due)
            sim.settle()
        assert sim.reaches("web1", "db2")
        assert sim.weaver.live[weave.id].state is State.ACTIVE
        # Flows refreshed for the rest of the lease end with it, not after.
        left = (weave.expires_at - sim.clock.now()).total_seconds()
        h1 = sim.net.switches["h1"].flow_stats(weave_cookie(weave.number), OWNER_MASK)
        assert h1 and all(f.installed_at + f.hard_timeout <= sim.fake_clock.now + left
                          for f in h1)
    finally:
        sim.close()


def _colliding(fsim: FlowsSim, first: Weave) -> None:
    """The next weave gets a number METER_SPACE above `first`: the same meter ids. The weaver
    itself skips such numbers; this stands for a live set that holds a collision anyway (a
    store written before numbers were checked), which the flows part must survive."""
    fsim.loop.call(setattr, fsim.weaver, "_next_number", first.number + METER_SPACE)
    fsim.loop.call(setattr, fsim.weaver, "_free_number", lambda number: number)


def _ended(fsim: FlowsSim, weave_id: str) -> Weave:
    ended = fsim.loop.call(fsim.weaver.store.weave, weave_id)
    assert ended is not None and weave_id not in fsim.weaver.live
    return ended


def test_a_weave_whose_meter_ids_collide_with_a_live_one_is_refused_harmlessly(
        fsim: FlowsSim) -> None:
    fsim.connect_all()
    first = fsim.weave("acme-web", "globex-db")
    meters = set(fsim.net.switches["h1"].meters)
    _colliding(fsim, first)
    second = fsim.loop.call(fsim.weaver.create,
                            WeaveRequest("acme-web", "initech-app", 600, 5, "silver"))
    assert isinstance(second, Weave)
    fsim.settle()
    ended = _ended(fsim, second.id)
    assert ended.state is State.FAILED
    assert "meter" in (fsim.loop.call(_last_detail, fsim, second.id) or "")
    assert not fsim.ping("web1", "app1")
    # The live weave kept its meters (removing the refused one deleted none of them) and flows.
    assert set(fsim.net.switches["h1"].meters) == meters
    assert fsim.reaches("web1", "db2")
    assert fsim.weaver.live[first.id].state is State.ACTIVE


def _last_detail(fsim: FlowsSim, weave_id: str) -> str | None:
    records = [r for r in fsim.weaver.store.audit_records()
               if r.get("weave_id") == weave_id or r.get("weave", {}).get("id") == weave_id]
    return next((str(r.get("detail")) for r in reversed(records) if r.get("detail")), None)


def _timed_out(fsim: FlowsSim, weave: Weave) -> str | None:
    """The weave is past its provision timeout: what its failure's detail says."""
    fsim.advance(fsim.weaver.provision_timeout.total_seconds() + 1)
    fsim.loop.call(fsim.weaver.tick)
    assert _ended(fsim, weave.id).state is State.FAILED
    return fsim.loop.call(_last_detail, fsim, weave.id)


def test_a_provision_timeout_names_the_switch_that_never_connected(fsim: FlowsSim) -> None:
    """Found deploying: with s1's management link down the timeout named only the part, and
    the tunnel part's host legs took the blame for a fabric fault."""
    for name in ("h1", "h2", "h3", "s2", "s3"):
        fsim.connect(name, settle=False)
    fsim.settle()
    weave = fsim.loop.call(fsim.weaver.create,
                           WeaveRequest("acme-web", "globex-db", 600, 5, None))
    assert isinstance(weave, Weave)
    fsim.settle()
    assert fsim.dpid("s1") in weave_switches(fsim.topology, weave)  # web1's host hangs off s1
    timeout = fsim.weaver.provision_timeout.total_seconds()
    assert _timed_out(fsim, weave) == f"not ready after {timeout:g} s: flows (s1: not connected)"


def test_a_provision_timeout_names_a_switch_whose_barrier_is_not_back(fsim: FlowsSim) -> None:
    fsim.connect_all()
    hold = threading.Event()  # h2 was resynced, then stops reading
    fsim.dps["h2"].block = hold
    try:
        weave = fsim.loop.call(fsim.weaver.create,
                               WeaveRequest("acme-web", "globex-db", 600, 5, None))
        assert isinstance(weave, Weave)
        fsim.part.flush(timeout=10, only=[fsim.dpid(n) for n in ("h1", "h3", "s1", "s2",
                                                                  "s3")])
        fsim.loop.call(lambda: None)
        timeout = fsim.weaver.provision_timeout.total_seconds()
        assert _timed_out(fsim, weave) == (
            f"not ready after {timeout:g} s: flows (h2: connected, barrier not back)")
    finally:
        hold.set()


def test_a_reconnect_programs_everything_but_a_colliding_weave(fsim: FlowsSim) -> None:
    fsim.connect_all()
    first = fsim.weave("acme-web", "globex-db")
    # A colliding pair in the live set (as a store written before numbers were checked could
    # hold): admitted while the part was away, so nothing refused it yet.
    _colliding(fsim, first)
    fsim.loop.call(fsim.weaver.parts.remove, fsim.part)
    second = fsim.loop.call(fsim.weaver.create,
                            WeaveRequest("acme-web", "initech-app", 600, 5, "silver"))
    assert isinstance(second, Weave)
    fsim.loop.call(fsim.weaver.parts.append, fsim.part)
    fsim.dps["h1"].hang_up()
    fsim.settle()
    fsim.net.switches["h1"].tables.clear()  # the switch restarted empty
    fsim.connect("h1")
    assert fsim.reaches("web1", "web3")  # the IVN base is back
    assert fsim.reaches("web1", "db2")  # and the weave that owns the meter ids
    assert not fsim.ping("web1", "app1")
    assert _ended(fsim, second.id).state is State.FAILED
    assert "meter" in (fsim.loop.call(_last_detail, fsim, second.id) or "")


def test_a_weave_that_fails_to_compile_does_not_leave_its_switch_empty(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fsim.connect_all()
    good = fsim.weave("acme-web", "globex-db")
    bad = fsim.weave("acme-web", "initech-app", profile="silver")
    real = ofapp.compile_weave

    def broken(state: Any, weave: Weave, dpid: int, ports: Any) -> Any:
        if weave.id == bad.id:
            raise KeyError("a bug in the compiler")
        return real(state, weave, dpid, ports)
    monkeypatch.setattr(ofapp, "compile_weave", broken)
    fsim.dps["h1"].hang_up()
    fsim.settle()
    fsim.net.switches["h1"].tables.clear()
    fsim.connect("h1")
    assert fsim.reaches("web1", "web3")
    assert fsim.reaches("web1", "db2")
    assert fsim.weaver.live[good.id].state is State.ACTIVE
    assert _ended(fsim, bad.id).state is State.FAILED
    assert any(bad.id in r.getMessage() and "a bug in the compiler" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")


def test_a_base_that_fails_to_compile_still_lets_the_weaves_in(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")

    def broken(*args: Any) -> Any:
        raise ValueError("a bug in the base compiler")
    monkeypatch.setattr(ofapp, "compile_base", broken)
    fsim.dps["h1"].hang_up()
    fsim.settle()
    # The switch kept its tables across the reconnect, all but the weave's flows.
    fsim.net.switches["h1"].apply(delete_owner_mod(None, weave_cookie(weave.number)))
    assert not fsim.ping("web1", "db2")
    fsim.connect("h1")
    assert fsim.reaches("web1", "web3")  # the old base stays (no delete-all without a new one)
    assert fsim.reaches("web1", "db2")
    assert fsim.weaver.live[weave.id].state is State.ACTIVE
    assert any("a bug in the base compiler" in r.getMessage() for r in caplog.records
               if r.levelname == "ERROR")


def test_a_second_connection_for_a_live_switch_is_refused_and_believed_in_nothing(
        fsim: FlowsSim) -> None:
    fsim.connect_all()
    s1 = fsim.dpid("s1")
    live = fsim.dps["s1"]
    weave = fsim.weave("acme-web", "globex-db")
    path = next(leg.path for leg in weave.legs if leg.slot is not None)
    impostor = fsim.connect("s1", address=("198.51.100.7", 6653))
    assert impostor.closed.is_set()
    assert fsim.part.switches[s1].datapath is live
    assert not impostor.sent  # it got none of s1's program
    # Whatever it says about s1's ports or batches is not believed.
    link_port = fsim.topology.ports("s1")["s2"]
    fsim.loop.call(fsim.part.port_changed, impostor, "s1-s2", link_port, up=False, present=True)
    live.block = threading.Event()  # hold s1's next batch while the impostor answers for it
    fsim.loop.call(fsim.weaver.extend, weave.id, 1200)
    pending = [x for b in fsim.part.switches[s1].batches.values() for x in b.xids]
    assert pending
    for xid in pending:
        fsim.part.on_error(impostor, SimpleNamespace(xid=xid, type=1, code=1))
    live.block.set()
    fsim.settle()
    after = fsim.weaver.live[weave.id]
    assert after.state is State.ACTIVE
    assert next(leg.path for leg in after.legs if leg.slot is not None) == path
    assert fsim.part.switches[s1].datapath is live
    assert fsim.reaches("web1", "db2")


def test_a_silent_connection_gives_way_to_a_new_one(fsim: FlowsSim) -> None:
    fsim.connect_all()
    old = fsim.dps["h1"]
    old.socket.idle = 3600.0  # the switch rebooted without closing its old connection
    fsim.net.switches["h1"].tables.clear()
    new = fsim.connect("h1")
    assert old.closed.is_set()
    assert fsim.part.switches[fsim.dpid("h1")].datapath is new
    assert fsim.reaches("web1", "web2")


PINNED = TRIANGLE.replace("h1: {switch: s1, uplink_mbps: 1000, underlay_ip: 100.64.0.1}",
                          "h1: {switch: s1, uplink_mbps: 1000, underlay_ip: 100.64.0.1, "
                          "management_ip: 198.51.100.11}")


def test_a_host_with_a_management_address_is_accepted_only_from_it(tmp_path: Path) -> None:
    assert PINNED != TRIANGLE
    sim = FlowsSim.build(tmp_path, PINNED)
    try:
        elsewhere = sim.connect("h1", address=("198.51.100.99", 6653))
        assert elsewhere.closed.is_set()
        assert sim.dpid("h1") not in sim.part.switches
        assert not elsewhere.sent
        pinned = sim.connect("h1", address=("198.51.100.11", 6653))
        assert sim.part.switches[sim.dpid("h1")].datapath is pinned
        sim.connect("h2")  # hosts without a management address: from anywhere
        assert sim.dpid("h2") in sim.part.switches
        assert sim.reaches("web1", "web3")
    finally:
        sim.close()


def _port_event(dp: Any, port_no: int, name: str, *, up: bool) -> Any:
    desc = SimpleNamespace(name=name.encode(), port_no=port_no, state=0 if up else 1, config=0)
    return SimpleNamespace(msg=SimpleNamespace(datapath=dp, reason=2, desc=desc))


def test_a_flood_of_port_status_leaves_one_pending_call_per_port(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    app = ofapp.FlowsApp()
    app.attach(fsim.part)
    posted: list[Any] = []
    post = fsim.loop.post

    def counting(fn: Any, *args: Any, **kwargs: Any) -> None:
        posted.append(fn)
        post(fn, *args, **kwargs)
    monkeypatch.setattr(fsim.loop, "post", counting)
    busy = threading.Event()
    post(busy.wait)  # the loop is busy while the flood arrives
    try:
        s1 = fsim.dps["s1"]
        to_s2, to_s3 = fsim.topology.ports("s1")["s2"], fsim.topology.ports("s1")["s3"]
        for i in range(5000):  # flapping; the last word: s1-s2 down
            app.port_status(_port_event(s1, to_s2, "s1-s2", up=i % 2 == 0))
            app.port_status(_port_event(s1, to_s3, "s1-s3", up=True))
        assert len(posted) <= 2  # one pending call per port, not one per message
    finally:
        busy.set()
    fsim.settle()
    assert ("s1", "s2") in fsim.weaver.fabric.down
    moved = fsim.weaver.live[weave.id]
    assert next(leg.path for leg in moved.legs if leg.slot is not None) != \
        next(leg.path for leg in weave.legs if leg.slot is not None)
    assert fsim.reaches("web1", "db1")


def test_a_switch_listing_more_meters_than_a_switch_can_hold_is_dropped(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ofapp, "MAX_METERS", 100)
    app = ofapp.FlowsApp()
    app.attach(fsim.part)
    dp = FakeDatapath(fsim.dpid("h1"), fsim.net, "h1")
    app.state_change(SimpleNamespace(datapath=dp, state=MAIN_DISPATCHER))
    fsim.part.flush(timeout=10)
    xid = app._meter_requests[id(dp)][1]
    for start in range(0, 1000, 50):  # a reply that keeps going
        body = [SimpleNamespace(meter_id=m) for m in range(start, start + 50)]
        app.meter_config(SimpleNamespace(msg=SimpleNamespace(
            datapath=dp, xid=xid, flags=ofp.OFPMPF_REPLY_MORE, body=body)))
        if dp.closed.is_set():
            break
    assert dp.closed.is_set()
    assert id(dp) not in app._meter_requests


def test_a_switch_that_connected_before_the_part_attached_is_resynced_when_it_does(
        fsim: FlowsSim) -> None:
    """nwc run starts os-ken's listener, then attaches the part: a switch whose handshake
    ended in between sends nothing more (it is connected), so it must be taken on attach."""
    app = ofapp.FlowsApp()  # listening, no part yet
    dp = FakeDatapath(fsim.dpid("h1"), fsim.net, "h1")
    dp.part = fsim.part
    dp.ports = {number: SimpleNamespace(name=name.encode(), port_no=number, state=0, config=0)
                for name, number in fsim.net.ports["h1"].items()}
    app.state_change(SimpleNamespace(datapath=dp, state=MAIN_DISPATCHER))
    xid = app._meter_requests[id(dp)][1]
    app.meter_config(SimpleNamespace(msg=SimpleNamespace(datapath=dp, xid=xid, flags=0,
                                                         body=[])))
    fsim.settle()
    assert fsim.dpid("h1") not in fsim.part.switches  # nobody to hand it to yet
    app.attach(fsim.part)
    fsim.settle()
    assert fsim.part.switches[fsim.dpid("h1")].synced
    assert fsim.reaches("web1", "web3")  # its base program, from the resync


FLOW_STATS = (ofp.OFPT_MULTIPART_REQUEST, ofp.OFPMP_FLOW)
METER_STATS = (ofp.OFPT_MULTIPART_REQUEST, ofp.OFPMP_METER)
FLOW_STATS_PER_ROUND = 2  # a host's weave flows, and its counting drops


def _scrape(fsim: FlowsSim) -> dict[str, dict[str, Any]]:
    """What a metrics scrape does: the statistics of every live weave, one after another."""
    for dp in fsim.dps.values():
        dp.sent.clear()
    return {w.id: fsim.part.weave_stats(w) for w in list(fsim.weaver.live.values())}


def test_a_scrape_asks_each_switch_once_and_a_hung_switch_costs_one_wait(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ofapp, "STATS_TIMEOUT_S", 0.5)
    fsim.connect_all()
    first = fsim.weave("acme-web", "globex-db")
    second = fsim.weave("acme-web", "initech-app", profile="silver")
    for _ in range(3):
        assert fsim.reaches("web1", "db2")
    assert fsim.reaches("web1", "app1")
    stats = _scrape(fsim)
    assert stats[first.id]["packets_requester_to_target"] == 3
    assert stats[first.id]["bytes_requester_to_target"] == 300
    assert stats[first.id]["packets_target_to_requester"] == 0
    assert stats[second.id]["packets_requester_to_target"] == 1
    assert stats[second.id]["meter_dropped_bytes_target_to_requester"] == 0
    # Both weaves touch h1: it was still asked once, in one round of a weave flow-stats, a
    # counting-drop flow-stats and a meter-stats request.
    for dp in fsim.dps.values():
        assert dp.sent.count(FLOW_STATS) <= FLOW_STATS_PER_ROUND, dp.name
        assert dp.sent.count(METER_STATS) <= 1, dp.name
    assert fsim.dps["h1"].sent.count(FLOW_STATS) == FLOW_STATS_PER_ROUND
    # h1 stops answering statistics (it still forwards): the next scrape waits for it once,
    # and leaves out what it cannot measure rather than reporting zeros.
    fsim.dps["h1"].answer_stats = False
    fsim.advance(60)
    stats = _scrape(fsim)
    assert fsim.dps["h1"].sent.count(FLOW_STATS) == FLOW_STATS_PER_ROUND
    assert fsim.dps["h1"].sent.count(METER_STATS) == 1
    assert stats == {first.id: {}, second.id: {}}


def test_a_policy_reload_rebuilds_every_hosts_base_flows(fsim: FlowsSim) -> None:
    """A gateway (or VNI, or prefix) lives in every host's base flows, not in a weave's:
    after a reload, each connected switch answers for the new one and not the old."""
    fsim.connect_all()

    def arp_answered(ip: str) -> bool:
        return any(d.packet.get("arp_op") == 2
                   for d in fsim.net.send("web1", fsim.net.vm_arp_request("web1", ip)))

    assert arp_answered("192.0.2.1") and not arp_answered("192.0.2.2")
    moved = shipped_text({"cidrs: [192.0.2.0/26]\n    gateway: 192.0.2.1":
                          "cidrs: [192.0.2.0/26]\n    gateway: 192.0.2.2"})
    fsim.loop.call(fsim.weaver.reload_policy, parse_policy_text(moved))
    fsim.settle()
    assert arp_answered("192.0.2.2") and not arp_answered("192.0.2.1")


def _state(fsim: FlowsSim, weave_id: str) -> State:
    weave = fsim.loop.call(fsim.weaver.store.weave, weave_id)
    assert weave is not None
    return weave.state


def test_a_terminated_weave_is_terminating_until_every_switch_removed_it(
        fsim: FlowsSim) -> None:
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    # h1 takes the removal but does not read it yet: its barrier has not come back.
    hold = threading.Event()
    fsim.dps["h1"].block = hold
    ended = fsim.loop.call(fsim.weaver.terminate, weave.id)
    assert ended.state is State.TERMINATING and ended.reason == "requested"
    assert _state(fsim, weave.id) is State.TERMINATING
    # Released at once all the same: the fabric and the weave's slot are free already...
    assert fsim.loop.call(lambda: fsim.weaver.fabric.by_weave.get(weave.id)) is None
    hold.set()
    fsim.settle()
    # ...and once h1 confirmed, the record says so.
    assert _state(fsim, weave.id) is State.TERMINATED
    assert not fsim.ping("web1", "db2")
    audit = [r["outcome"] for r in fsim.weaver.store.audit_records()
             if r.get("weave_id") == weave.id]
    assert audit[-2:] == ["released", "terminated"]


def _weave_flows(fsim: FlowsSim, name: str, weave: Weave) -> list[Any]:
    """The weave's flows still in one fake switch's tables."""
    return fsim.net.switches[name].flow_stats(weave_cookie(weave.number), OWNER_MASK)


def test_a_switch_that_drops_during_teardown_holds_it_until_its_resync(
        fsim: FlowsSim) -> None:
    """A switch with fail_mode=secure that loses the controller keeps its flows: a removal
    it never got is not confirmed by its drop, but by its resync once it is back."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    hold = threading.Event()
    fsim.dps["h1"].block = hold
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    assert _state(fsim, weave.id) is State.TERMINATING
    fsim.dps["h1"].hang_up()  # before it read the removal
    hold.set()
    fsim.settle()
    assert _weave_flows(fsim, "h1", weave)  # still there: it forwards the weave's traffic
    assert _weave_flows(fsim, "h3", weave) == []  # the others answered their removal
    assert _state(fsim, weave.id) is State.TERMINATING
    assert fsim.loop.call(fsim.weaver.tearing_down, weave.id)  # slots not given back yet
    fsim.connect("h1")  # back: its resync leaves the weave out, and its barrier confirms
    assert _weave_flows(fsim, "h1", weave) == []
    assert _state(fsim, weave.id) is State.TERMINATED
    assert not fsim.loop.call(fsim.weaver.tearing_down, weave.id)
    assert not fsim.part.removing


def _terminate_while_h1_is_away(fsim: FlowsSim) -> Weave:
    """A weave terminated while h1, one of its switches, is disconnected."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    fsim.dps["h1"].hang_up()
    fsim.settle()
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    return weave


def test_a_switch_away_when_the_teardown_starts_holds_it_too(fsim: FlowsSim) -> None:
    """Gone just before the teardown or just after: the switch keeps the flows either way."""
    weave = _terminate_while_h1_is_away(fsim)
    assert _state(fsim, weave.id) is State.TERMINATING
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    assert _state(fsim, weave.id) is State.TERMINATED


def test_a_resync_that_keeps_the_table_removes_the_waiting_weaves(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    """A switch whose base flows cannot be compiled keeps its table on reconnect (only its
    weave flows are replaced): a weave whose removal it missed goes, and its barrier
    confirms the teardown."""
    weave = _terminate_while_h1_is_away(fsim)

    def broken(*args: Any) -> Any:
        raise ValueError("cannot compile")
    monkeypatch.setattr(ofapp, "compile_base", broken)
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    assert _state(fsim, weave.id) is State.TERMINATED


def test_a_dropped_switch_holds_a_teardown_no_longer_than_the_teardown_timeout(
        fsim: FlowsSim) -> None:
    events: list[dict[str, Any]] = []
    fsim.loop.call(fsim.weaver.subscribe, events.append)
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    hold = threading.Event()
    fsim.dps["h1"].block = hold
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.dps["h1"].hang_up()
    hold.set()
    fsim.settle()
    fsim.advance(fsim.weaver.teardown_timeout.total_seconds() + 1)
    fsim.loop.call(fsim.weaver.tick)
    assert _state(fsim, weave.id) is State.TERMINATED
    assert {"type": "weave.teardown_unconfirmed", "weave_id": weave.id, "parts": ["flows"],
            "detail": "teardown not confirmed within 10 s by: flows (h1: not connected, "
            "removal not confirmed) (resynced when they answer)"} in [
                {k: v for k, v in e.items() if k != "ts"} for e in events]
    # The part forgets it at the next teardown rather than keep it for a switch that may
    # never come back; h1 loses the weave's flows on its resync all the same.
    other = fsim.weave("acme-web", "initech-app", profile="silver")
    fsim.loop.call(fsim.weaver.terminate, other.id)
    fsim.settle()
    assert weave.id not in fsim.part.removing
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []


def test_with_no_switch_connected_a_terminated_weave_ends_at_once(fsim: FlowsSim) -> None:
    weave = fsim.loop.call(fsim.weaver.create,
                           WeaveRequest("acme-web", "globex-db", 600, 5, None))
    assert isinstance(weave, Weave)
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.loop.call(lambda: None)  # the part's report was posted behind the terminate
    assert _state(fsim, weave.id) is State.TERMINATED


def _table(switch: Any) -> tuple[list[tuple[Any, ...]], list[tuple[int, int, int]]]:
    """A fake switch's flows and meters, comparable across installs."""
    flows = sorted((f.table, f.priority, sorted(f.match.items()), repr(f.instructions),
                    f.cookie, f.hard_timeout) for f in switch.flows())
    meters = sorted((m.meter_id, m.kbps, m.burst_kbits) for m in switch.meters.values())
    return flows, meters


def test_a_fabric_link_change_resyncs_only_the_switches_whose_routes_it_changes(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")  # web1 on h1, db1 on h2: over s1-s2
    resynced: list[int] = []
    resync = fsim.part.resync

    def counting(dpid: int, base: Any = None) -> None:
        resynced.append(dpid)
        resync(dpid, base)

    monkeypatch.setattr(fsim.part, "resync", counting)
    s1 = fsim.dps["s1"]
    fsim.loop.call(fsim.part.port_changed, s1, "s1-s2", fsim.topology.ports("s1")["s2"],
                   up=False, present=True)
    fsim.settle()
    # s3 still reaches h1 through s1 and h2 through s2: its routes did not change, so it is
    # not resynced (the weave that moved onto it was installed there on its own).
    assert sorted(resynced) == sorted([fsim.dpid("s1"), fsim.dpid("s2")])
    moved = fsim.weaver.live[weave.id]
    assert "s3" in next(leg.path for leg in moved.legs if leg.slot is not None)
    assert fsim.reaches("web1", "db1")
    # Every table is what a full resync of every switch makes of it.
    names = sorted(fsim.net.switches)
    after_change = {n: _table(fsim.net.switches[n]) for n in names}
    for name in names:
        fsim.loop.call(resync, fsim.dpid(name))
    fsim.settle()
    assert {n: _table(fsim.net.switches[n]) for n in names} == after_change


def test_a_link_that_came_back_while_its_switch_was_away_is_up_again(fsim: FlowsSim) -> None:
    """Found in review: a switch reported only its down ports on connect, so a link that came
    back up while it was disconnected stayed down for the controller."""
    fsim.connect_all()
    s1 = fsim.dps["s1"]
    fsim.loop.call(fsim.part.port_changed, s1, "s1-h1", fsim.topology.ports("s1")["h1"],
                   up=False, present=True)  # the cable is out
    fsim.settle()
    assert ("h1", "s1") in fsim.weaver.fabric.down and not fsim.reaches("web2", "web1")
    s1.hang_up()  # s1 loses the controller; the cable is fixed meanwhile
    fsim.settle()
    fsim.connect("s1")  # every port up in its description
    assert fsim.weaver.fabric.down == set()
    assert fsim.reaches("web2", "web1") and fsim.reaches("web1", "web2")
    assert isinstance(fsim.weave("acme-web", "globex-db"), Weave)


def test_a_teardown_waiting_on_a_replaced_silent_connection_is_confirmed(
        fsim: FlowsSim) -> None:
    """Found in review: removals waiting on the barrier of a connection that went silent and
    was replaced were never confirmed (its end is not reported), so the weave stayed
    terminating until the teardown timeout."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    old = fsim.dps["h1"]
    old.part = None  # h1's connection stops answering (a half-open TCP connection)
    old.socket.idle = 3600.0
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    assert weave.id in fsim.weaver._tearing
    fsim.connect("h1")  # h1 is back on a new connection, which replaces the silent one
    left = [f for f in fsim.net.switches["h1"].flows()
            if f.cookie & ~0xFF == weave_cookie(weave.number)]
    assert left == []
    assert weave.id not in fsim.weaver._tearing
    assert fsim.weaver.store.weave(weave.id).state is State.TERMINATED


def _link(fsim: FlowsSim, a: str, b: str, *, up: bool) -> None:
    fsim.loop.call(fsim.part.port_changed, fsim.dps[a], f"{a}-{b}",
                   fsim.topology.ports(a)[b], up=up, present=True)
    fsim.settle()


@pytest.fixture
def one_remote_leg(tmp_path: Path) -> Iterator[FlowsSim]:
    """The triangle with globex-db on h2 only: the weave's one remote leg is h1-s1-s2-h2,
    and h1-s1-s3-s2-h2 when s1-s2 is down."""
    sim = FlowsSim.build(tmp_path, TRIANGLE.replace("db2: {host: h3", "db2: {host: h2"))
    try:
        yield sim
    finally:
        sim.close()


def _ends_while_s3_is_away(fsim: FlowsSim, weave: Weave) -> None:
    """s3 holds none of the weave's flows, goes away, and the weave ends: s3 must not keep it
    terminating until the teardown timeout."""
    assert _weave_flows(fsim, "s3", weave) == []
    fsim.dps["s3"].hang_up()
    fsim.settle()
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    assert _state(fsim, weave.id) is State.TERMINATED


def test_a_switch_a_weave_moved_off_does_not_hold_its_teardown(one_remote_leg: FlowsSim
                                                                ) -> None:
    """A switch whose removal of a moved weave's flows was confirmed (barrier) holds none of
    them: that it is away when the weave ends later must not keep the weave terminating
    until the teardown timeout."""
    fsim = one_remote_leg
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    _link(fsim, "s1", "s2", up=False)  # moves onto s3
    _link(fsim, "s1", "s2", up=True)
    _link(fsim, "s1", "s3", up=False)  # moves off s3 again: s3 removes its flows
    path = next(leg.path for leg in fsim.weaver.live[weave.id].legs if leg.slot is not None)
    assert "s3" not in path
    _ends_while_s3_is_away(fsim, weave)


def _restart_without(fsim: FlowsSim, *away: str) -> None:
    """NWC restarts; every switch but `away` reconnects to it."""
    fsim.restart()
    for name in fsim.net.switches:
        if name not in away:
            fsim.connect(name, settle=False)
    fsim.settle()


def test_a_recovered_weave_waits_at_teardown_for_a_switch_not_back_since_the_restart(
        fsim: FlowsSim) -> None:
    """The new run never sent the weave to h1, but the old run did, and h1 (fail_mode=secure)
    kept its flows: the teardown waits for h1's resync as it would for a switch that dropped
    in this run, rather than free the weave's slots while h1 still forwards into its leg."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    _restart_without(fsim, "h1")
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    assert _weave_flows(fsim, "h1", weave)
    assert _weave_flows(fsim, "h3", weave) == []  # the others answered their removal
    assert _state(fsim, weave.id) is State.TERMINATING
    assert fsim.loop.call(fsim.weaver.tearing_down, weave.id)  # slots not given back yet
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    assert _state(fsim, weave.id) is State.TERMINATED
    assert not fsim.part.removing


def _slots(weave: Weave) -> set[int]:
    return {leg.slot for leg in weave.legs if leg.slot is not None}


def test_a_weave_left_terminating_by_a_stop_waits_for_a_switch_not_back_since(
        fsim: FlowsSim) -> None:
    """NWC stopped in the middle of a teardown that waited for h1, and h1 is still away
    after the restart, holding the weave's flows: the weave stays terminating and keeps its
    slot until h1's resync removes them, then is terminated as it was ended."""
    weave = _terminate_while_h1_is_away(fsim)
    _restart_without(fsim, "h1")
    assert _weave_flows(fsim, "h1", weave)
    assert _state(fsim, weave.id) is State.TERMINATING
    other = fsim.weave("acme-web", "globex-db")
    assert not _slots(other) & _slots(weave)  # h1 would steer it into the old tunnel
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    done = fsim.loop.call(fsim.weaver.store.weave, weave.id)
    assert (done.state, done.reason) == (State.TERMINATED, "requested")
    assert fsim.weaver.live[other.id].state is State.ACTIVE
    assert fsim.reaches("web1", "db2")  # the new weave, through h1 too
    assert not fsim.part.removing


def test_a_weave_withdrawn_at_a_restart_waits_for_a_switch_not_back_since(
        fsim: FlowsSim) -> None:
    """The policy changed while NWC was down and no longer allows the weave: it ends at
    recovery, before the flows part is there, and h1 (away) still holds its flows. Its
    slots are held until h1's resync removes them, as for a weave ending in this run."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    revoked = parse_policy_text(shipped_text(
        {"        - ivn: acme-web\n          prefixes: [192.0.2.0/27]":
         "        - ivn: initech-app\n          prefixes: [203.0.113.0/27]"}))
    fsim.restart(policy=revoked)
    for name in fsim.net.switches:
        if name != "h1":
            fsim.connect(name, settle=False)
    fsim.settle()
    ended = fsim.loop.call(fsim.weaver.store.weave, weave.id)
    assert (ended.state, ended.reason) == (State.FAILED, "policy_withdrawn")
    assert _weave_flows(fsim, "h3", weave) == []  # the others' resync removed them
    assert _weave_flows(fsim, "h1", weave)
    assert fsim.loop.call(fsim.weaver.tearing_down, weave.id)  # its slot is not free
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    assert not fsim.loop.call(fsim.weaver.tearing_down, weave.id)
    assert not fsim.part.removing


def test_a_weave_whose_host_left_the_topology_is_torn_down_from_the_others(
        fsim: FlowsSim) -> None:
    """h3 was taken out of the topology while NWC was down: the weave with a leg to it no
    longer fits and fails at recovery; its teardown still waits for the switches NWC knows
    (h1, away, here) rather than stopping the flows part from attaching."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    text = TRIANGLE.replace("  h3: {switch: s3, uplink_mbps: 1000, underlay_ip: 100.64.0.3}\n",
                            "").replace("  db2: {host: h3, ivn: globex-db, ip: 192.0.2.71}\n",
                                        "")
    fsim.restart(topology=parse_topology_text(text, fsim.policy))
    for name in ("h2", "s1", "s2", "s3"):
        fsim.connect(name, settle=False)
    fsim.settle()
    ended = fsim.loop.call(fsim.weaver.store.weave, weave.id)
    assert (ended.state, ended.reason) == (State.FAILED, "topology_changed")
    assert _weave_flows(fsim, "h2", weave) == []
    assert fsim.loop.call(fsim.weaver.tearing_down, weave.id)
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    assert not fsim.loop.call(fsim.weaver.tearing_down, weave.id)


def test_a_recovered_weave_that_moved_off_a_resynced_switch_does_not_wait_for_it(
        one_remote_leg: FlowsSim) -> None:
    """A switch that was resynced after the weave moved off it holds none of its flows: that
    it is away again when the weave ends must not hold the teardown."""
    fsim = one_remote_leg
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    _link(fsim, "s1", "s2", up=False)  # h1-s1-s3-s2-h2
    _restart_without(fsim, "s1", "s3")
    fsim.connect("s1")  # says s1-s2 is up again (the weave stays on s3)...
    _link(fsim, "s1", "s3", up=False)  # ...and moves back while s3 is away
    path = next(leg.path for leg in fsim.weaver.live[weave.id].legs if leg.slot is not None)
    assert "s3" not in path
    fsim.connect("s3")  # its resync leaves the weave out
    _ends_while_s3_is_away(fsim, weave)


def _moved_off_s3_while_it_was_away(fsim: FlowsSim) -> Weave:
    """The weave moves onto s3, s3 loses the controller (keeping the weave's flows:
    fail_mode=secure), and the weave moves back off s3: no removal could reach s3."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    _link(fsim, "s1", "s2", up=False)  # h1-s1-s3-s2-h2
    fsim.dps["s3"].hang_up()
    fsim.settle()
    _link(fsim, "s1", "s2", up=True)
    _link(fsim, "s1", "s3", up=False)  # back onto h1-s1-s2-h2
    path = next(leg.path for leg in fsim.weaver.live[weave.id].legs if leg.slot is not None)
    assert "s3" not in path
    assert _weave_flows(fsim, "s3", weave)
    return weave


def test_a_recovered_weave_waits_at_teardown_for_a_switch_of_an_earlier_path(
        one_remote_leg: FlowsSim) -> None:
    """s3, on a path the weave left while s3 was away, still holds the weave's flows after a
    restart, and is still away: the teardown waits for s3's resync, as it would have without
    the restart, rather than call the weave terminated (and free its slot) meanwhile."""
    fsim = one_remote_leg
    weave = _moved_off_s3_while_it_was_away(fsim)
    _restart_without(fsim, "s3")
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    assert _state(fsim, weave.id) is State.TERMINATING
    assert fsim.loop.call(fsim.weaver.tearing_down, weave.id)
    fsim.connect("s3")
    assert _weave_flows(fsim, "s3", weave) == []
    assert _state(fsim, weave.id) is State.TERMINATED
    assert not fsim.part.removing


def test_a_teardown_left_by_a_stop_waits_for_a_switch_of_an_earlier_path(
        one_remote_leg: FlowsSim) -> None:
    """The same with the weave ended before the stop, its removal from s3 still waited for."""
    fsim = one_remote_leg
    weave = _moved_off_s3_while_it_was_away(fsim)
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    _restart_without(fsim, "s3")
    assert _state(fsim, weave.id) is State.TERMINATING
    fsim.connect("s3")
    assert _weave_flows(fsim, "s3", weave) == []
    assert _state(fsim, weave.id) is State.TERMINATED


def test_a_switch_of_an_earlier_path_resynced_since_is_not_waited_for_after_a_restart(
        one_remote_leg: FlowsSim) -> None:
    """Once s3's resync removed the weave's flows, a later restart does not wait for s3."""
    fsim = one_remote_leg
    weave = _moved_off_s3_while_it_was_away(fsim)
    _restart_without(fsim, "s3")
    fsim.connect("s3")  # its resync leaves the weave out
    _restart_without(fsim, "s3")
    assert _weave_flows(fsim, "s3", weave) == []
    fsim.loop.call(fsim.weaver.terminate, weave.id)
    fsim.settle()
    assert _state(fsim, weave.id) is State.TERMINATED


def test_switches_off_a_weaves_paths_are_saved_with_any_datapath_id(tmp_path: Path) -> None:
    """Datapath ids are 64 bits unsigned: one above SQLite's largest integer is kept too."""
    fsim = FlowsSim.build(tmp_path)
    try:
        weave = fsim.weave("acme-web", "globex-db")
        store = fsim.weaver.store
        big = 2**64 - 1
        fsim.loop.call(store.save_off_path_flows, weave.id, [big, 7])
        assert fsim.loop.call(store.off_path_flows) == {weave.id: {7, big}}
        fsim.loop.call(store.save_off_path_flows, weave.id, [])
        assert fsim.loop.call(store.off_path_flows) == {}
    finally:
        fsim.close()


def test_a_resync_that_keeps_the_table_removes_a_weave_the_teardown_stopped_waiting_for(
        fsim: FlowsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the teardown timeout the part forgets a removal; a switch whose base cannot be
    compiled keeps its table on reconnect, and must lose that weave's flows and meters all
    the same (every weave flow but the live weaves' goes), its base staying as it was."""
    weave = _terminate_while_h1_is_away(fsim)
    fsim.advance(fsim.weaver.teardown_timeout.total_seconds() + 1)
    fsim.loop.call(fsim.weaver.tick)
    assert _state(fsim, weave.id) is State.TERMINATED
    other = fsim.weave("acme-web", "globex-db")
    fsim.loop.call(fsim.weaver.terminate, other.id)  # its teardown forgets the first one's
    fsim.settle()
    assert weave.id not in fsim.part.removing
    # Waits for h1. Another pair of IVNs: its flows replace none of the old weave's.
    live = fsim.weave("acme-web", "initech-app", profile="silver")

    def broken(*args: Any) -> Any:
        raise ValueError("cannot compile")
    monkeypatch.setattr(ofapp, "compile_base", broken)
    fsim.connect("h1")
    assert _weave_flows(fsim, "h1", weave) == []
    assert not {meter_id(weave.number, d) for d in DIRECTIONS} & set(
        fsim.net.switches["h1"].meters)
    assert not fsim.ping("web1", "db2")
    assert fsim.reaches("web1", "web3")  # the kept base
    assert fsim.reaches("web1", "app1")  # the live weave
    assert fsim.weaver.live[live.id].state is State.ACTIVE


def _vm_port_events(fsim: FlowsSim) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    fsim.loop.call(fsim.weaver.subscribe, lambda e: events.append(
        {k: v for k, v in e.items() if k != "ts"}) if e["type"] == "vm.port" else None)
    return events


def test_a_vm_port_down_when_its_switch_connects_is_reported_at_once(fsim: FlowsSim) -> None:
    """From the port description of the connect, not only from a later port status."""
    events = _vm_port_events(fsim)
    fsim.connect_all()
    assert events == []  # every VM port up: nothing to say
    fsim.dps["h1"].hang_up()
    fsim.settle()
    fsim.connect("h1", down=("web1",))
    assert events == [{"type": "vm.port", "vm": "web1", "host": "h1", "up": False}]
    fsim.dps["h1"].hang_up()
    fsim.settle()
    fsim.connect("h1")  # back up while h1 was away from NWC
    assert events[1:] == [{"type": "vm.port", "vm": "web1", "host": "h1", "up": True}]


def test_a_vm_port_status_is_reported_once_per_change(fsim: FlowsSim) -> None:
    events = _vm_port_events(fsim)
    fsim.connect_all()
    h2 = fsim.dps["h2"]
    port = fsim.net.ports["h2"]["db1"]
    for up in (False, False, True):
        fsim.loop.call(fsim.part.port_changed, h2, "db1", port, up=up, present=True)
    fsim.loop.call(fsim.part.port_changed, h2, "db1", port, up=True, present=False)
    fsim.loop.call(fsim.part.port_changed, h2, "db1", port, up=True, present=True)
    # Its number now names another port (the deletion of db1 was coalesced away).
    fsim.loop.call(fsim.part.port_changed, h2, "tap-new", port, up=True, present=True)
    assert [(e["vm"], e["host"], e["up"]) for e in events] == [
        ("db1", "h2", False), ("db1", "h2", True), ("db1", "h2", False), ("db1", "h2", True),
        ("db1", "h2", False)]


def _counted(fsim: FlowsSim, weave: Weave) -> dict[str, Any]:
    """The weave's statistics as a later scrape sees them (the cached reading has expired)."""
    fsim.advance(ofapp.STATS_CACHE_S + 1)
    return fsim.part.weave_stats(fsim.weaver.live[weave.id])


def _hosts(weave: Weave) -> set[str]:
    return {h for leg in weave.legs for h in (leg.requester_host, leg.target_host)}


def test_a_weaves_counters_keep_counting_across_every_reinstall(fsim: FlowsSim) -> None:
    """Found in acceptance: an extend re-adds the weave's flows, whose counters start from 0
    on the switch, and the weave's totals (and Prometheus counters) fell back with them."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    packets, size = "packets_requester_to_target", "bytes_requester_to_target"
    for _ in range(5):
        assert fsim.reaches("web1", "db2")
    assert _counted(fsim, weave)[packets] == 5
    for _ in range(2):  # after the last reading: read just before the re-install
        assert fsim.reaches("web1", "db2")
    fsim.loop.call(fsim.weaver.extend, weave.id, 60)
    fsim.settle()
    restarted = [f for h in _hosts(weave) for f in _weave_flows(fsim, h, weave)]
    assert restarted and all(f.packets == 0 for f in restarted)  # the switches' own counters
    assert _counted(fsim, weave)[packets] == 7
    assert fsim.reaches("web1", "db2")
    assert _counted(fsim, weave)[packets] == 8
    # A switch that reconnects is resynced (every flow replaced); what it counted while it
    # was away from the controller (its flows stay: fail_mode=secure) is kept too.
    fsim.dps["h1"].hang_up()
    fsim.settle()
    assert fsim.reaches("web1", "db2")
    fsim.connect("h1")
    counted = _counted(fsim, weave)
    assert counted[packets] == 9 and counted[size] == 900
    # Counters that restarted without NWC knowing (a switch restarted, flows re-added by
    # someone else): a lower reading is carried over, not reported.
    for f in _weave_flows(fsim, "h1", weave):
        f.packets = f.bytes = 0
    assert _counted(fsim, weave)[packets] == 9
    assert fsim.reaches("web1", "db2")
    assert _counted(fsim, weave)[packets] == 10


def test_meter_drops_keep_counting_across_a_reinstall(fsim: FlowsSim) -> None:
    """A re-install modifies the weave's meters, which start counting from 0 again (OVS 3.1,
    and the fake): the drops counted before are carried, and a meter made afresh behind
    NWC's back (a lower reading) loses nothing either."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db", mbps=1)
    key = "meter_dropped_bytes_requester_to_target"
    packet = fsim.net.vm_ip_packet("web1", str(fsim.topology.vms["db2"].ip))
    fsim.net.send("web1", dict(packet, len=10**7))  # far over the rate and the burst
    dropped = _counted(fsim, weave)[key]
    assert dropped > 0
    fsim.loop.call(fsim.weaver.extend, weave.id, 60)
    fsim.settle()
    meters = [m for h in _hosts(weave) for m in fsim.net.switches[h].meters.values()]
    assert meters and all(m.bytes_dropped == 0 for m in meters)  # the switches restarted
    for _ in range(2):  # more than before, unread: no lower reading would tell the restart
        fsim.net.send("web1", dict(packet, len=10**7))
    more = _counted(fsim, weave)[key]
    assert more == 3 * dropped
    for meter in meters:
        meter.bytes_dropped = 0
    assert _counted(fsim, weave)[key] == more


def test_an_ended_weaves_carried_counters_are_dropped(fsim: FlowsSim) -> None:
    """Totals are kept per live weave only: what the part carries does not grow with every
    weave that ever ran."""
    fsim.connect_all()
    first = fsim.weave("acme-web", "globex-db")
    second = fsim.weave("acme-web", "initech-app", profile="silver")
    assert fsim.reaches("web1", "db2")
    fsim.loop.call(fsim.weaver.extend, first.id, 60)  # one re-install: counts carried
    fsim.settle()
    assert _counted(fsim, first)["packets_requester_to_target"] == 1
    fsim.loop.call(fsim.weaver.terminate, first.id)
    fsim.settle()
    for counts in fsim.part.counters.values():
        for counters in (counts.delivered, counts.dropped):
            numbers = {k[0] for k in counters.tracked()}  # type: ignore[index]
            assert numbers <= {second.number}
    assert any(counts.delivered.tracked() for counts in fsim.part.counters.values())


def test_a_fabric_switchs_reinstall_reads_no_counters(fsim: FlowsSim) -> None:
    """Found in review: every install restarted the counters of every switch it touched, so
    a fabric switch (whose counters nobody sums) got a flow-stats and a meter-stats read
    before each later re-install. Only host switches are counted; theirs still carry."""
    fsim.connect_all()
    weave = fsim.weave("acme-web", "globex-db")
    topo = fsim.topology
    fabric = {n for n in fsim.dps if n not in topo.hosts
              and fsim.dpid(n) in weave_switches(topo, weave)}
    assert fabric  # the weave crosses the fabric: the case under test
    for _ in range(3):
        assert fsim.reaches("web1", "db2")
    for dp in fsim.dps.values():
        dp.sent.clear()
    fsim.loop.call(fsim.weaver.extend, weave.id, 60)  # re-installs on every switch it uses
    fsim.settle()
    for name in fabric:
        sent = fsim.dps[name].sent
        assert sent, name  # it was re-installed there...
        assert FLOW_STATS not in sent and METER_STATS not in sent, name  # ...unread
    for host in _hosts(weave):
        assert FLOW_STATS in fsim.dps[host].sent, host  # read just before its re-install
    assert set(fsim.part.counters) <= {h.dpid for h in topo.hosts.values()}
    assert _counted(fsim, weave)["packets_requester_to_target"] == 3
