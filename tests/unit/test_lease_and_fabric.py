"""The lease book and the fabric ledger on their own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nwc.fabric import CapacityError, Fabric
from nwc.lease import MAX_WAIT_S, LeaseBook, ManualClock, iso, parse_iso

pytestmark = pytest.mark.unit
T0 = datetime(2026, 5, 1, tzinfo=UTC)


def test_lease_book_orders_updates_and_removes() -> None:
    book = LeaseBook()
    book.set("a", T0 + timedelta(seconds=30))
    book.set("b", T0 + timedelta(seconds=10))
    book.set("c", T0 + timedelta(seconds=20))
    book.set("b", T0 + timedelta(seconds=40))  # extended: the old entry must not fire
    book.remove("c")
    assert book.next_expiry() == T0 + timedelta(seconds=30)
    assert book.due(T0 + timedelta(seconds=25)) == []
    assert book.due(T0 + timedelta(seconds=45)) == ["a", "b"]
    assert len(book) == 0 and book.next_expiry() is None


def test_lease_book_wait_is_capped_and_never_negative() -> None:
    book = LeaseBook()
    assert book.wait_seconds(T0) == MAX_WAIT_S
    book.set("a", T0 + timedelta(seconds=0.25))
    assert book.wait_seconds(T0) == 0.25
    assert book.wait_seconds(T0 + timedelta(seconds=5)) == 0.0
    book.set("a", T0 + timedelta(hours=1))
    assert book.wait_seconds(T0) == MAX_WAIT_S  # look at the wall clock again soon


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        LeaseBook().set("a", datetime(2026, 1, 1))


def test_iso_round_trip_is_utc() -> None:
    clock = ManualClock(T0)
    clock.advance(1.5)
    text = iso(clock.now())
    assert text == "2026-05-01T00:00:01.500000Z"
    assert parse_iso(text) == clock.now()


def test_reserve_is_all_or_nothing_and_release_is_exact(small) -> None:
    fabric = Fabric(small)
    path = ("h1", "s1", "s2", "h2")
    fabric.reserve("w1", [path], 10_001)
    fabric.reserve("w2", [path], 19_999)
    assert fabric.free("s1", "s2") == 0 and fabric.free("s2", "s1") == 0
    with pytest.raises(CapacityError, match="s1-s2"):
        fabric.reserve("w3", [("h1", "s1"), path], 1)
    assert fabric.reserved[("h1", "s1")] == 30_000  # w3's first path was not taken
    with pytest.raises(CapacityError, match="already holds"):
        fabric.reserve("w1", [path], 1)
    fabric.release("w1")
    fabric.release("w2")
    assert set(fabric.reserved.values()) == {0}
    assert fabric.release("w1") is None


def test_two_legs_sharing_a_link_are_counted_twice(small) -> None:
    fabric = Fabric(small)
    path = ("h1", "s1", "s2", "h2")
    with pytest.raises(CapacityError):
        fabric.reserve("w", [path, path], 16_000)  # 32 of 30 Mbit/s
    fabric.reserve("w", [path, path], 15_000)
    assert fabric.reserved[("s2", "s1")] == 30_000
    assert fabric.violations() == []


def test_down_links_are_not_used_or_reservable(small) -> None:
    fabric = Fabric(small)
    assert fabric.set_link("s2", "s1", up=False) is True
    assert fabric.set_link("s1", "s2", up=False) is False
    assert fabric.find_path("h1", "h2") is None
    with pytest.raises(CapacityError, match="down"):
        fabric.reserve("w", [("h1", "s1", "s2", "h2")], 1)
    fabric.set_link("s1", "s2", up=True)
    assert fabric.find_path("h1", "h2") == ("h1", "s1", "s2", "h2")
    with pytest.raises(KeyError):
        fabric.set_link("s1", "h2", up=False)


def test_hosts_are_never_transit(leaf_spine) -> None:
    fabric = Fabric(leaf_spine)
    for path in (fabric.find_path(a, b) for a in leaf_spine.hosts for b in leaf_spine.hosts):
        assert path is not None
        assert not set(path[1:-1]) & set(leaf_spine.hosts)


def test_violations_detects_a_corrupted_ledger(small) -> None:
    fabric = Fabric(small)
    fabric.reserve("w", [("h1", "s1", "s2", "h2")], 1000)
    fabric.reserved[("s1", "s2")] += 1
    assert fabric.violations() == ["('s1', 's2'): ledger says 1001 kbit/s, weaves hold 1000"]
