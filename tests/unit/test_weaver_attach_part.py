"""Weaver.attach_part: a part that joins a running weaver (as `nwc run`'s shells do) is handed
every live weave, and weaves still provisioning wait for it too."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fake_parts import RecordingPart

from nwc.admission import WeaveRequest
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.lease import ManualClock
from nwc.policy import Policy
from nwc.topology import Topology, parse_topology_text
from nwc.weave import State, Weave
from nwc.weaver import Weaver

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


def test_a_restart_finishes_a_weave_left_terminating(make_weaver: Callable[..., Weaver],
                                                    two_hosts: Topology) -> None:
    weaver, _ = _teardown_weaver(make_weaver, two_hosts)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    weaver.terminate(weave.id)
    weaver.store.close()  # the controller stops before any part confirmed
    again, _ = _teardown_weaver(make_weaver, two_hosts)  # recovers, as a restart does
    assert again.store.weave(weave.id).state is State.TERMINATED
    assert not again.live and again.fabric.violations() == []
