"""Judging a host's agent by its heartbeat and its OVSDB by whether it is read, on the
controller's clock only."""

from __future__ import annotations

import datetime as dt

import pytest

from nwc.hostwatch import HostWatch
from nwc.tunnel import AGENT_ALIVE_KEY

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def beat(n: int) -> dict[str, str]:
    return {AGENT_ALIVE_KEY: str(n)}


def run(watch: HostWatch, reads: list[dict[str, str] | None], start: float = 0.0
        ) -> list[tuple[str, bool]]:
    """One pass a second; what changed, as (kind, up)."""
    out = []
    for i, ids in enumerate(reads):
        t = start + i
        out += [(c.kind, c.up) for c in watch.observe("h1", ids, t,
                                                      T0 + dt.timedelta(seconds=t))]
    return out


def test_the_hosts_clock_is_never_read_only_whether_the_value_changes() -> None:
    watch = HostWatch(silent_s=5)
    # Values from a clock far behind, or going backwards: they change, so the agent lives.
    assert run(watch, [beat(n) for n in (900, 3, 3, 1, 1, 1, 7, 7, 7, 7, 7)]) == []
    assert run(watch, [beat(7)] * 3, start=11) == [("agent", False)]
    assert watch.health("h1").since == T0 + dt.timedelta(seconds=6)  # when 7 was first read


def test_a_dead_agent_behind_an_ovsdb_that_comes_and_goes_is_said_once() -> None:
    watch = HostWatch(silent_s=5)
    assert run(watch, [beat(1)] * 7) == [("agent", False)]
    # Its OVSDB lost, then back with the same value: still dead, said once; never "up".
    assert run(watch, [None] * 7 + [beat(1)] * 8, start=7) == [("ovsdb", False), ("ovsdb", True)]
    assert watch.health("h1").agent_up is False
    assert run(watch, [beat(2)], start=22) == [("agent", True)]


def test_an_agent_unseen_while_its_ovsdb_was_away_gets_a_full_bound_again() -> None:
    watch = HostWatch(silent_s=5)
    assert run(watch, [beat(1), beat(2)] + [None] * 10) == [("ovsdb", False)]
    assert watch.health("h1").agent_up is None
    # Back: the agent is judged only after the bound counted from now, not from its last beat.
    assert run(watch, [beat(2)] * 6, start=12) == [("ovsdb", True)]
    assert run(watch, [beat(2)], start=18) == [("agent", False)]


def test_a_bound_other_than_the_default_is_the_one_applied() -> None:
    watch = HostWatch(silent_s=30)
    assert run(watch, [beat(1)] * 31) == []  # 30 s unchanged: not more than the bound
    (change,) = watch.observe("h1", beat(1), 31, T0 + dt.timedelta(seconds=31))
    assert (change.kind, change.up) == ("agent", False)
    assert "has not changed for more than 30 s" in change.detail


def test_an_agent_that_never_beat_is_said_to_be_older_or_not_running() -> None:
    """An agent from before heartbeats writes no nwc-agent-alive at all: "unchanged since"
    the controller's start would send the operator after a hung agent instead of an old one."""
    watch = HostWatch(silent_s=5)
    changes = []
    for t in range(7):
        changes += watch.observe("h1", {"nwc-agent-ack": "3"}, t, T0 + dt.timedelta(seconds=t))
    assert [(c.kind, c.up) for c in changes] == [("agent", False)]
    assert "no heartbeat was ever seen from its agent" in changes[0].detail
    assert "upgrade the agents before the controller" in changes[0].detail
    assert "unchanged since" not in changes[0].detail
    health = watch.health("h1")
    assert health.never_beat and health.since is None
    problem = health.problem()
    assert problem.startswith("agent unresponsive, no heartbeat was ever seen")
    assert "upgrade the agents before the controller" in problem
    # Upgraded: its first heartbeat brings it back, and a later silence is dated as usual.
    assert run(watch, [beat(1)], start=7) == [("agent", True)]
    assert run(watch, [beat(1)] * 7, start=8) == [("agent", False)]
    assert not watch.health("h1").never_beat
    assert watch.health("h1").problem().startswith("agent unresponsive since ")
