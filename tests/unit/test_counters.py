"""Totals carried across counter restarts (`nwc.counters`): what the flows and tunnel parts
report must never go down."""

from __future__ import annotations

import pytest

from nwc.counters import CarriedCounters

pytestmark = pytest.mark.unit


def test_a_restart_carries_the_last_reading_and_counting_goes_on() -> None:
    c = CarriedCounters(2)
    assert not c.observe("k", (5, 500))  # not tracked: ignored
    c.track("k")
    c.observe("k", (5, 500))
    c.restart("k")  # re-installed: the switch counts from 0 again
    assert c.total("k") == (5, 500)
    c.observe("k", (2, 200))
    assert c.total("k") == (7, 700)


def test_a_lower_reading_is_a_restart_nobody_announced() -> None:
    c = CarriedCounters(2)
    c.track("k")
    c.observe("k", (5, 500))
    c.observe("k", (1, 500))  # restarted: bytes happen to read the same (one flow, 500 B)
    assert c.total("k") == (6, 1000)
    c.observe("k", (3, 600))
    assert c.total("k") == (8, 1100)


def test_totals_never_go_down_whatever_the_readings() -> None:
    c = CarriedCounters(1)
    c.track("k")
    seen = 0
    for value in (3, 3, 9, 0, 4, 2, 2, 10, 1):
        c.observe("k", (value,))
        if value % 3 == 0:
            c.restart("k")
        assert c.total("k")[0] >= seen
        seen = c.total("k")[0]


def test_forgotten_keys_count_nothing() -> None:
    c = CarriedCounters(1)
    for key in ("a", "b"):
        c.track(key)
        c.observe(key, (4,))
    c.forget(lambda k: k == "a")
    assert c.tracked() == ["b"] and c.total("a") == (0,) and c.total("b") == (4,)
    with pytest.raises(ValueError):
        c.observe("b", (1, 2))


def test_a_discarded_key_counts_nothing_and_others_keep_theirs() -> None:
    c = CarriedCounters(1)
    for key in ("a", "b"):
        c.track(key)
        c.observe(key, (4,))
    c.discard("a")
    c.discard("never")  # not tracked: nothing to do
    assert c.tracked() == ["b"] and c.total("a") == (0,) and c.total("b") == (4,)
    assert not c.observe("a", (9,))
