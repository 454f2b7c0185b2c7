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
