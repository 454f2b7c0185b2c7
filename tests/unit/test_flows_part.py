"""The flows part end to end on fake switches: what a weave, a reconnect, a lease, a slow or
lying switch do to the tables the part keeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flowsim import FlowsSim

from nwc.weave import State

pytestmark = pytest.mark.unit


@pytest.fixture
def fsim(tmp_path: Path) -> Iterator[FlowsSim]:
    sim = FlowsSim.build(tmp_path)
    try:
        yield sim
    finally:
        sim.close()


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
