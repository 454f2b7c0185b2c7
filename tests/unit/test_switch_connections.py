"""Whether each switch is connected, on /metrics (`nwc_switch_connected`), from the flows part
talking to the fake switches of the triangle. Found deploying: with s1 and s2 never connected
every link showed up and nothing said a switch was missing (a link's `up` is its last known
port state, which a switch that never connected does not report)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from flowsim import FlowsSim
from prometheus_client.parser import text_string_to_metric_families

from nwc.metrics import Metrics, link_loads

pytestmark = pytest.mark.unit

EVERY_SWITCH = ("h1", "h2", "h3", "s1", "s2", "s3")


@pytest.fixture
def fsim(tmp_path: Path) -> Iterator[FlowsSim]:
    with FlowsSim.build(tmp_path) as sim:
        yield sim


def _connected(fsim: FlowsSim) -> dict[str, float]:
    """One scrape of the REST app's metrics, wired to the sim's flows part as `nwc run` does:
    nwc_switch_connected by switch."""
    controller = SimpleNamespace(
        weaver=fsim.weaver, call=lambda fn, *args, timeout=None: fsim.loop.call(fn, *args),
        host_sources=[], drop_sources=[], weave_stats=lambda weave: {}, cert_watch=None,
        switch_sources=[fsim.part.switch_connections])
    text = Metrics(controller).exposition().decode()  # type: ignore[arg-type]
    return {s.labels["switch"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "nwc_switch_connected"}


def test_a_switch_is_connected_only_from_its_resync_to_its_disconnect(fsim: FlowsSim) -> None:
    assert _connected(fsim) == dict.fromkeys(EVERY_SWITCH, 0)  # every one, before any connects
    fsim.connect("s1")
    assert _connected(fsim) == {**dict.fromkeys(EVERY_SWITCH, 0), "s1": 1}
    fsim.dps["s1"].hang_up()
    fsim.settle()
    assert _connected(fsim)["s1"] == 0
    # s1's links stay as last known (up): the switch's own series says it is not there.
    links = {ld.name: ld.up for ld in fsim.loop.call(link_loads, fsim.weaver)}
    assert links["s1-s2"] and links["s1-s3"]


def test_a_switch_whose_resync_is_not_confirmed_is_not_connected(fsim: FlowsSim) -> None:
    never = threading.Event()  # h1 takes its handshake, then never reads its resync
    fsim.connect("h1", block=never, settle=False)
    fsim.loop.call(lambda: None)
    assert fsim.dpid("h1") in fsim.part.switches  # the connection is up
    assert _connected(fsim)["h1"] == 0
    assert fsim.part.switch_connections()["h1"].detail == "connected, resync not confirmed"
    never.set()
    fsim.settle()
    assert _connected(fsim)["h1"] == 1
    assert fsim.part.switch_connections()["h1"].detail == "connected"
