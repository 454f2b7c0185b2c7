"""Weaver.attach_part: a part that joins a running weaver (as `nwc run`'s shells do) is handed
every live weave, and weaves still provisioning wait for it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.lease import ManualClock
from nwc.policy import load_policy
from nwc.store import Store
from nwc.topology import parse_topology_text
from nwc.weave import State, Weave
from nwc.weaver import Weaver

pytestmark = pytest.mark.unit

POLICY = load_policy([SHIPPED_POLICIES])


class RecordingPart:
    def __init__(self, name: str) -> None:
        self.name = name
        self.up: list[str] = []

    def weave_up(self, weave: Weave) -> None:
        self.up.append(weave.id)

    def weave_down(self, weave: Weave) -> None:
        pass

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        pass


def test_a_late_part_gets_live_weaves_and_provisioning_ones_wait_for_it(tmp_path: Path) -> None:
    topo = parse_topology_text(TWO_HOSTS, POLICY)
    first = RecordingPart("flows")
    weaver = Weaver(policy=POLICY, topology=topo, store=Store(tmp_path), clock=ManualClock(),
                    parts=[first])
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave) and weave.state is State.PROVISIONING
    late = RecordingPart("tunnels")
    weaver.attach_part(late)
    assert late.up == [weave.id]
    weaver.part_ready(weave.id, "flows")
    assert weaver.live[weave.id].state is State.PROVISIONING  # still waiting for tunnels
    weaver.part_ready(weave.id, "tunnels")
    assert weaver.live[weave.id].state is State.ACTIVE


class TeardownPart(RecordingPart):
    """A part that confirms teardown, when the test says so."""

    confirms_teardown = True


def _teardown_weaver(tmp_path: Path, clock: ManualClock) -> tuple[Weaver, list[dict]]:
    topo = parse_topology_text(TWO_HOSTS, POLICY)
    weaver = Weaver(policy=POLICY, topology=topo, store=Store(tmp_path), clock=clock,
                    parts=[TeardownPart("flows"), RecordingPart("tunnels")])
    events: list[dict] = []
    weaver.subscribe(events.append)
    return weaver, events


def test_terminating_lasts_until_the_confirming_parts_report(tmp_path: Path) -> None:
    weaver, events = _teardown_weaver(tmp_path, ManualClock())
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


def test_an_unconfirmed_teardown_ends_at_its_deadline_with_an_event(tmp_path: Path) -> None:
    clock = ManualClock()
    weaver, events = _teardown_weaver(tmp_path, clock)
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


def test_a_restart_finishes_a_weave_left_terminating(tmp_path: Path) -> None:
    clock = ManualClock()
    weaver, _ = _teardown_weaver(tmp_path, clock)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5))
    assert isinstance(weave, Weave)
    weaver.terminate(weave.id)
    weaver.store.close()  # the controller stops before any part confirmed
    again, _ = _teardown_weaver(tmp_path, clock)
    again.recover()
    assert again.store.weave(weave.id).state is State.TERMINATED
    assert not again.live and again.fabric.violations() == []
    again.store.close()
