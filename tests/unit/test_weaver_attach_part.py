"""Weaver.attach_part: a part that joins a running weaver (as `nwc run`'s shells do) is handed
every live weave, and weaves still provisioning wait for it too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fake_parts import RecordingPart
from policy_edits import shipped_text

from nwc.admission import WeaveRequest
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.lease import ManualClock
from nwc.pipeline import METER_SPACE
from nwc.policy import Policy, parse_policy_text
from nwc.store import Store
from nwc.topology import Topology, parse_topology_text
from nwc.weave import State, Weave
from nwc.weaver import Teardowns, Weaver

pytestmark = pytest.mark.unit


@pytest.fixture
def two_hosts(shipped_policy: Policy) -> Topology:
    return parse_topology_text(TWO_HOSTS, shipped_policy)


def test_a_late_part_gets_live_weaves_and_provisioning_ones_wait_for_it(
        make_weaver: Callable[..., Weaver], two_hosts: Topology) -> None:
    first = RecordingPart("flows")
    weaver = make_weaver(two_hosts, parts=[first])
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave) and weave.state is State.PROVISIONING
    late = RecordingPart("tunnels")
    weaver.attach_part(late)
    assert late.up == [weave.id]
    weaver.part_ready(weave.id, "flows")
    assert weaver.live[weave.id].state is State.PROVISIONING  # still waiting for tunnels
    weaver.part_ready(weave.id, "tunnels")
    assert weaver.live[weave.id].state is State.ACTIVE


def _teardown_weaver(make_weaver: Callable[..., Weaver],
                     topology: Topology) -> tuple[Weaver, list[dict]]:
    weaver = make_weaver(topology, parts=[RecordingPart("flows", confirms_teardown=True),
                                             RecordingPart("tunnels")])
    events: list[dict] = []
    weaver.subscribe(events.append)
    return weaver, events


def test_terminating_lasts_until_the_confirming_parts_report(
        make_weaver: Callable[..., Weaver], two_hosts: Topology) -> None:
    weaver, events = _teardown_weaver(make_weaver, two_hosts)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    slots = {leg.slot for leg in weave.legs}
    ended = weaver.terminate(weave.id)
    assert ended is not None and ended.state is State.TERMINATING
    assert weaver.store.weave(weave.id).state is State.TERMINATING
    assert weave.id not in weaver.live and weaver.fabric.by_weave.get(weave.id) is None
    assert not slots & set(weaver._free_slots)  # its tunnels' addresses are not reused yet
    weaver.part_down(weave.id, "tunnels")  # not a confirming part: changes nothing
    assert weaver.store.weave(weave.id).state is State.TERMINATING
    weaver.part_down(weave.id, "flows")
    done = weaver.store.weave(weave.id)
    assert done.state is State.TERMINATED and done.reason == "requested"
    assert slots <= set(weaver._free_slots)
    states = [e["weave"]["state"] for e in events if e["type"] == "weave.state"]
    assert states[-2:] == ["terminating", "terminated"]


def test_a_weave_being_torn_down_keeps_its_meter_ids(
        make_weaver: Callable[..., Weaver], two_hosts: Topology) -> None:
    """Weave numbers METER_SPACE apart share meter ids: a new weave does not get those of a
    weave a switch may still hold, until its teardown is confirmed."""
    weaver, _ = _teardown_weaver(make_weaver, two_hosts)
    old = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(old, Weave)
    weaver.terminate(old.id)
    clash = old.number + METER_SPACE
    weaver._next_number = clash
    first = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(first, Weave) and first.number == clash + 1
    weaver.terminate(first.id)
    weaver.part_down(old.id, "flows")
    weaver._next_number = clash
    second = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(second, Weave) and second.number == clash  # free once confirmed


def test_teardowns_count_meter_ids_through_a_replaced_entry(
        make_weaver: Callable[..., Weaver], two_hosts: Topology) -> None:
    """The teardowns' meter-id count follows an entry replaced in place (a late part extends
    its deadline) and its removal: nothing is left held once it is gone."""
    weaver, _ = _teardown_weaver(make_weaver, two_hosts)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    tearing = Teardowns()
    tearing[weave.id] = (weave, {"flows"}, 1.0)
    tearing[weave.id] = (weave, {"flows", "tunnels"}, 2.0)
    assert tearing.residues.holds(weave.number + METER_SPACE)
    assert not tearing.residues.holds(weave.number + 1)
    del tearing[weave.id]
    assert not tearing.residues.holds(weave.number)
    assert tearing.pop(weave.id) is None


def test_an_unconfirmed_teardown_ends_at_its_deadline_with_an_event(
        make_weaver: Callable[..., Weaver], two_hosts: Topology, clock: ManualClock) -> None:
    weaver, events = _teardown_weaver(make_weaver, two_hosts)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    weaver.terminate(weave.id)
    assert weaver.seconds_to_next_deadline() <= 10.0
    clock.advance(9)
    weaver.tick()
    assert weaver.store.weave(weave.id).state is State.TERMINATING
    clock.advance(1)
    weaver.tick()
    assert weaver.store.weave(weave.id).state is State.TERMINATED
    (unconfirmed,) = [e for e in events if e["type"] == "weave.teardown_unconfirmed"]
    assert unconfirmed["parts"] == ["flows"]
    weaver.part_down(weave.id, "flows")  # late: nothing changes
    assert weaver.store.weave(weave.id).state is State.TERMINATED


def test_a_weave_left_terminating_is_torn_down_again_after_a_restart(
        make_weaver: Callable[..., Weaver], two_hosts: Topology) -> None:
    """The stop came before the parts confirmed: a switch or host not back since may still
    hold the weave, so the restarted weaver tells its parts again and the weave stays
    terminating, its slots held, until they confirm; then terminated, as it was ended."""
    weaver, _ = _teardown_weaver(make_weaver, two_hosts)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    weaver.terminate(weave.id)
    weaver.store.close()  # the controller stops before any part confirmed
    again, events = _teardown_weaver(make_weaver, two_hosts)  # recovers, as a restart does
    assert again.store.weave(weave.id).state is State.TERMINATING
    assert [p.down for p in again.parts] == [[weave.id], [weave.id]]
    assert again.tearing_down(weave.id)
    other = again.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(other, Weave)
    assert not _slots(other) & _slots(weave)  # not while h1 or h2 may still hold it
    again.part_down(weave.id, "flows")
    done = again.store.weave(weave.id)
    assert (done.state, done.reason) == (State.TERMINATED, "requested")
    assert not again.live.get(weave.id) and again.fabric.violations() == []
    assert all(map(_free(again), _slots(weave)))
    assert [e["weave"]["state"] for e in events
            if e["type"] == "weave.state" and e["weave"]["id"] == weave.id] == ["terminated"]
    last = again.store.audit_records()[-1]
    assert (last["weave_id"], last["action"], last["outcome"]) == \
        (weave.id, "weave.state", "terminated")


def test_without_parts_a_restart_finishes_a_weave_left_terminating(
        make_weaver: Callable[..., Weaver], two_hosts: Topology) -> None:
    """A weaver that drives no data plane (and expects none) has nothing to wait for."""
    weaver, _ = _teardown_weaver(make_weaver, two_hosts)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    weaver.terminate(weave.id)
    weaver.store.close()
    again = make_weaver(two_hosts)
    assert again.store.weave(weave.id).state is State.TERMINATED
    assert not again.tearing_down(weave.id) and all(map(_free(again), _slots(weave)))


def _slots(weave: Weave) -> set[int]:
    return {leg.slot for leg in weave.legs if leg.slot is not None}


def _free(weaver: Weaver) -> Callable[[int], bool]:
    """Whether the weaver could hand a slot to a new weave."""
    return lambda slot: slot in weaver._free_slots or slot >= weaver._next_slot


def _restarted(tmp_path: Path, clock: ManualClock, policy: Policy,
               topology: Topology) -> tuple[Weaver, list[dict]]:
    """A controller restart as `nwc run` does it: recovery first, its parts attach after."""
    weaver = Weaver(policy=policy, topology=topology, store=Store(tmp_path / "state"),
                    clock=clock)
    events: list[dict] = []
    weaver.subscribe(events.append)
    weaver.recover(parts_to_attach=True)
    return weaver, events


def _attach_parts(weaver: Weaver) -> tuple[RecordingPart, RecordingPart]:
    flows = RecordingPart("flows", confirms_teardown=True)
    tunnels = RecordingPart("tunnels", confirms_teardown=True)
    weaver.attach_part(flows)
    weaver.attach_part(tunnels)
    weaver.parts_attached()
    return flows, tunnels


@pytest.fixture
def before_restart(make_weaver: Callable[..., Weaver], two_hosts: Topology) -> Weaver:
    return make_weaver(two_hosts, parts=[RecordingPart("flows", confirms_teardown=True)])


def _terminated_across_a_restart(before: Weaver, tmp_path: Path, clock: ManualClock,
                                 policy: Policy, topo: Topology
                                 ) -> tuple[Weave, Weaver, list[dict]]:
    """A weave `before` created and terminated (its teardown not confirmed) before it stopped,
    and the weaver that recovered it, with the events it sent."""
    weave = before.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    before.terminate(weave.id)
    before.store.close()
    weaver, events = _restarted(tmp_path, clock, policy, topo)
    return weave, weaver, events


def test_a_weave_left_terminating_waits_for_the_parts_that_attach_after_recovery(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    weave, weaver, _ = _terminated_across_a_restart(
        before_restart, tmp_path, clock, shipped_policy, two_hosts)
    clock.advance(9)  # the parts take their time to attach: the wait starts when they do
    weaver.tick()
    assert weaver.store.weave(weave.id).state is State.TERMINATING
    flows, tunnels = _attach_parts(weaver)
    assert (flows.down, tunnels.down) == ([weave.id], [weave.id])
    clock.advance(9)
    weaver.tick()
    weaver.part_down(weave.id, "flows")
    assert weaver.store.weave(weave.id).state is State.TERMINATING  # tunnels not yet
    weaver.part_down(weave.id, "tunnels")
    done = weaver.store.weave(weave.id)
    assert (done.state, done.reason) == (State.TERMINATED, "requested")
    assert all(map(_free(weaver), _slots(weave)))
    weaver.store.close()


def test_weaves_ended_at_recovery_wait_for_the_parts_that_attach_after(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    """Expired while the controller was down, withdrawn by a policy changed meanwhile: they
    end at recovery, before any part is there to be told. The previous run built them, so
    their teardown waits for the parts that attach (slots held, terminating until confirmed
    for a weave that ended normally)."""
    expiring = before_restart.create(WeaveRequest("acme-web", "globex-db", 60, 5))
    withdrawn = before_restart.create(WeaveRequest("acme-web", "initech-app", 600, 5,
                                                   "silver"))
    assert isinstance(expiring, Weave) and isinstance(withdrawn, Weave)
    before_restart.store.close()
    clock.advance(61)
    policy = parse_policy_text(shipped_text(
        {"        - tenant: initech             # ...or every IVN of a tenant\n": ""}))
    weaver, events = _restarted(tmp_path, clock, policy, two_hosts)
    ended = {w: weaver.store.weave(w) for w in (expiring.id, withdrawn.id)}
    assert (ended[expiring.id].state, ended[expiring.id].reason) == \
        (State.TERMINATING, "expired")
    assert (ended[withdrawn.id].state, ended[withdrawn.id].reason) == \
        (State.FAILED, "policy_withdrawn")
    assert not weaver.live
    assert weaver.tearing_down(expiring.id) and weaver.tearing_down(withdrawn.id)
    held = _slots(expiring) | _slots(withdrawn)
    assert not any(map(_free(weaver), held))
    flows, tunnels = _attach_parts(weaver)
    assert sorted(flows.down) == sorted(tunnels.down) == sorted([expiring.id, withdrawn.id])
    for weave_id in (expiring.id, withdrawn.id):
        weaver.part_down(weave_id, "flows")
        weaver.part_down(weave_id, "tunnels")
    done = weaver.store.weave(expiring.id)
    assert (done.state, done.reason) == (State.TERMINATED, "expired")
    assert weaver.store.weave(withdrawn.id).state is State.FAILED
    assert all(map(_free(weaver), held))
    assert [(e["weave"]["id"], e["weave"]["state"]) for e in events
            if e["type"] == "weave.state"] == [(withdrawn.id, "failed"),
                                               (expiring.id, "terminating"),
                                               (expiring.id, "terminated")]
    weaver.store.close()


def test_a_recovered_teardown_no_part_attaches_for_ends_at_its_deadline(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    weave, weaver, _ = _terminated_across_a_restart(
        before_restart, tmp_path, clock, shipped_policy, two_hosts)
    clock.advance(weaver.teardown_timeout.total_seconds())
    weaver.tick()
    assert weaver.store.weave(weave.id).state is State.TERMINATED
    last = weaver.store.audit_records()[-1]
    assert last["outcome"] == "terminated"
    assert "no part that confirms teardowns attached" in last["detail"]
    assert all(map(_free(weaver), _slots(weave)))
    weaver.store.close()


def test_an_inherited_teardown_stays_open_for_a_part_that_attaches_after_another_confirmed(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    """Found in review: flows attaches and resyncs its switches (confirming the teardown)
    before tunnels attaches, as in `nwc run`. The teardown must not finish then: tunnels
    has not been told, and a host it cannot reach may still hold the old leg, whose slot a
    new weave would get."""
    weave, weaver, events = _terminated_across_a_restart(
        before_restart, tmp_path, clock, shipped_policy, two_hosts)
    flows = RecordingPart("flows", confirms_teardown=True)
    weaver.attach_part(flows)
    weaver.part_down(weave.id, "flows")
    assert weaver.tearing_down(weave.id)
    assert weaver.store.weave(weave.id).state is State.TERMINATING
    tunnels = RecordingPart("tunnels", confirms_teardown=True)
    weaver.attach_part(tunnels)
    weaver.parts_attached()
    assert tunnels.down == [weave.id]
    other = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(other, Weave)
    assert not _slots(other) & _slots(weave)  # the old leg may still be up on a host
    weaver.part_down(weave.id, "tunnels")
    done = weaver.store.weave(weave.id)
    assert (done.state, done.reason) == (State.TERMINATED, "requested")
    assert all(map(_free(weaver), _slots(weave)))
    assert [e["weave"]["state"] for e in events
            if e["type"] == "weave.state" and e["weave"]["id"] == weave.id] == ["terminated"]
    weaver.store.close()


def test_parts_attached_finishes_an_inherited_teardown_its_parts_all_confirmed(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    """The teardown kept open for parts still to attach ends once they are all there and
    none of them is left to confirm (here the later part does not confirm teardowns)."""
    weave, weaver, _ = _terminated_across_a_restart(
        before_restart, tmp_path, clock, shipped_policy, two_hosts)
    weaver.attach_part(RecordingPart("flows", confirms_teardown=True))
    weaver.part_down(weave.id, "flows")
    silent = RecordingPart("tunnels")
    weaver.attach_part(silent)
    assert silent.down == [weave.id] and weaver.tearing_down(weave.id)
    weaver.parts_attached()
    assert not weaver.tearing_down(weave.id)
    last = weaver.store.audit_records()[-1]
    assert (last["weave_id"], last["outcome"]) == (weave.id, "terminated")
    assert "detail" not in last  # every part there confirmed: nothing to warn about
    assert all(map(_free(weaver), _slots(weave)))
    weaver.store.close()


def _failed_before_restart(before_restart: Weaver) -> Weave:
    """A weave that failed in the previous run, its teardown not confirmed by its stop."""
    weave = before_restart.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    before_restart.part_failed(weave.id, "flows", "switch h1 refused a change")
    assert before_restart.store.weave(weave.id).state is State.FAILED
    assert before_restart.tearing_down(weave.id)
    before_restart.store.close()
    return weave


def test_a_failed_weave_whose_teardown_was_unconfirmed_holds_its_slots_after_a_restart(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    """Found in review: a failed weave is just `failed` in the store, so a restart could not
    tell it from one whose data plane is gone, and gave its slots to the next weave while a
    host not back since may still hold its leg. It is now told down again and waited for,
    as a weave left terminating is, and stays failed."""
    weave = _failed_before_restart(before_restart)
    weaver, events = _restarted(tmp_path, clock, shipped_policy, two_hosts)
    assert weaver.tearing_down(weave.id)
    assert [w.id for w in weaver.inherited_teardowns()] == [weave.id]
    other = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(other, Weave)
    assert not _slots(other) & _slots(weave)
    flows, tunnels = _attach_parts(weaver)
    assert (flows.down, tunnels.down) == ([weave.id], [weave.id])
    weaver.part_down(weave.id, "flows")
    weaver.part_down(weave.id, "tunnels")
    assert not weaver.tearing_down(weave.id)
    assert all(map(_free(weaver), _slots(weave)))
    failed = weaver.store.weave(weave.id)
    assert (failed.state, failed.reason) == (State.FAILED, "provision_failed")
    assert not [e for e in events if e.get("weave", {}).get("id") == weave.id]
    weaver.store.close()
    again, _ = _restarted(tmp_path, clock, shipped_policy, two_hosts)  # confirmed: recorded
    assert not again.tearing_down(weave.id)
    again.store.close()


def test_a_failed_weaves_inherited_teardown_is_bounded_by_the_teardown_timeout(
        before_restart: Weaver, tmp_path: Path, clock: ManualClock, shipped_policy: Policy,
        two_hosts: Topology) -> None:
    weave = _failed_before_restart(before_restart)
    weaver, events = _restarted(tmp_path, clock, shipped_policy, two_hosts)
    flows, _ = _attach_parts(weaver)
    assert flows.down == [weave.id]
    clock.advance(weaver.teardown_timeout.total_seconds())
    weaver.tick()
    assert not weaver.tearing_down(weave.id)
    assert all(map(_free(weaver), _slots(weave)))
    (unconfirmed,) = [e for e in events if e["type"] == "weave.teardown_unconfirmed"]
    assert (unconfirmed["weave_id"], unconfirmed["parts"]) == (weave.id, ["flows", "tunnels"])
    assert weaver.store.weave(weave.id).state is State.FAILED
    weaver.store.close()


def test_without_parts_a_restart_forgets_a_failed_weaves_pending_teardown(
        before_restart: Weaver, make_weaver: Callable[..., Weaver],
        two_hosts: Topology) -> None:
    weave = _failed_before_restart(before_restart)
    again = make_weaver(two_hosts)
    assert not again.tearing_down(weave.id) and all(map(_free(again), _slots(weave)))
    assert again.store.weave(weave.id).state is State.FAILED
    assert again.store.unconfirmed_teardowns() == []
