"""Group commit: admissions that arrive together share one durable commit. Each still decides
exactly as it would alone, nothing is told before the commit is on disk, one failing admission
leaves the others, and a failed commit undoes every admission of the batch in memory too."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import pytest
import test_reservation_properties as mesh

from nwc.admission import Denial, WeaveRequest
from nwc.audit import verify_chain
from nwc.weave import Weave
from nwc.weaver import Weaver, WeaverLoop

pytestmark = pytest.mark.unit

# Nine admissible requests (every a-IVN with every b-IVN of the mesh policy) and one denial
# (over the 500 Mbit/s per-weave cap).
REQUESTS = [WeaveRequest(a, b, 600, 10) for a, b in mesh.PAIRS[:9]]
DENIED = WeaveRequest("a0", "b3", 600, 900)


class RecordingPart:
    name = "recorder"

    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []

    def weave_up(self, weave: Weave) -> None:
        self.told.append(("up", weave.id))

    def weave_down(self, weave: Weave) -> None:
        self.told.append(("down", weave.id))

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        self.told.append(("moved", weave.id))


def mesh_weaver(make_weaver, **kw: Any) -> Weaver:
    return make_weaver(mesh.TOPOLOGY, mesh.POLICY, **kw)


def commits(weaver: Weaver) -> list[str]:
    statements: list[str] = []
    weaver.store.db.set_trace_callback(statements.append)
    return statements


def memory(weaver: Weaver) -> dict[str, Any]:
    """Everything an admission changes in memory."""
    return {"reserved": dict(weaver.fabric.reserved), "by_weave": dict(weaver.fabric.by_weave),
            "live": dict(weaver.live), "leases": len(weaver.leases),
            "number": weaver._next_number, "next_slot": weaver._next_slot,
            "free_slots": sorted(weaver._free_slots), "waiting": dict(weaver._waiting)}


def summary(result: Weave | Denial) -> tuple[Any, ...]:
    if isinstance(result, Denial):
        return ("denied", result.reason, result.detail)
    return (result.id, result.paths, [leg.slot for leg in result.legs], result.expires_at)


def test_a_batch_commits_once_and_decides_as_one_by_one_would(make_weaver, tmp_path) -> None:
    alone = mesh_weaver(make_weaver)
    one_by_one = [summary(alone.create(r)) for r in [*REQUESTS[:4], DENIED, *REQUESTS[4:]]]

    from nwc.store import Store
    store = Store(tmp_path / "batched")
    batched = Weaver(policy=mesh.POLICY, topology=mesh.TOPOLOGY, store=store, clock=alone.clock)
    batched.recover()
    statements = commits(batched)
    with batched.admission_batch():
        together = [summary(batched.create(r)) for r in [*REQUESTS[:4], DENIED, *REQUESTS[4:]]]
    assert together == one_by_one
    assert statements.count("COMMIT") == 1
    assert {w.id for w in store.weaves()} == set(alone.live) == set(batched.live)
    assert batched.fabric.reserved == alone.fabric.reserved
    records = store.audit_records()
    assert [r["outcome"] for r in records].count("admitted") == 9
    assert [r["reason"] for r in records if r["outcome"] == "denied"] == ["policy_violation"]
    assert verify_chain(records) == []
    store.close()


def test_nothing_is_told_before_the_commit(make_weaver) -> None:
    part = RecordingPart()
    weaver = mesh_weaver(make_weaver, parts=[part])
    events: list[dict[str, Any]] = []
    weaver.subscribe(events.append)
    with weaver.admission_batch():
        admitted = [weaver.create(r) for r in REQUESTS[:3]]
        weaver.create(DENIED)
        assert events == [] and part.told == []
        # The database itself has not got them either until the batch commits.
        reader = sqlite3.connect(weaver.store.path)
        assert reader.execute("SELECT COUNT(*) FROM weaves").fetchone() == (0,)
    assert reader.execute("SELECT COUNT(*) FROM weaves").fetchone() == (3,)
    reader.close()
    assert part.told == [("up", w.id) for w in admitted]
    assert [e["type"] for e in events] == ["weave.state"] * 3 + ["weave.denied"]
    assert [e["weave"]["id"] for e in events[:3]] == [w.id for w in admitted]


def test_a_failed_commit_undoes_every_admission_of_the_batch(make_weaver) -> None:
    part = RecordingPart()
    weaver = mesh_weaver(make_weaver, parts=[part])
    first = weaver.create(REQUESTS[0])
    kept = weaver.create(REQUESTS[1])  # something held before the batch
    weaver.terminate(first.id)  # ...and slots given back, so the free list is not empty
    events: list[dict[str, Any]] = []
    weaver.subscribe(events.append)
    told_before, before = list(part.told), memory(weaver)
    audit_before = weaver.store.audit_records()
    real_db = weaver.store.db
    weaver.store.db = mesh.CommitFails(real_db)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"), weaver.admission_batch():
        for request in [*REQUESTS[2:6], DENIED]:
            weaver.create(request)
        assert len(weaver.live) == 5
    weaver.store.db = real_db
    assert memory(weaver) == before
    assert weaver.fabric.violations() == []
    assert events == [] and part.told == told_before
    assert weaver.store.audit_records() == audit_before
    assert [w.id for w in weaver.store.weaves()] == [first.id, kept.id]
    # The next admission is exactly the one the failed batch's first would have been.
    again = weaver.create(REQUESTS[2])
    assert again.id == f"wv-{kept.number + 1:06d}"
    assert first.legs[0].slot in [leg.slot for leg in again.legs]  # the freed slot first
    assert verify_chain(weaver.store.audit_records()) == []
    assert [r["seq"] for r in weaver.store.audit_records()] == \
        list(range(1, len(audit_before) + 2))


def test_one_failing_admission_leaves_the_rest_of_its_batch(make_weaver, monkeypatch) -> None:
    weaver = mesh_weaver(make_weaver)
    save = weaver.store.save_reservation
    calls = []

    def second_call_fails(reservation: Any) -> None:
        calls.append(reservation.weave_id)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        save(reservation)

    monkeypatch.setattr(weaver.store, "save_reservation", second_call_fails)
    outcomes: list[Any] = []
    with weaver.admission_batch():
        for request in REQUESTS[:4]:
            try:
                outcomes.append(weaver.create(request))
            except sqlite3.OperationalError as exc:
                outcomes.append(exc)
    assert isinstance(outcomes[1], sqlite3.OperationalError)
    admitted = [o for o in outcomes if isinstance(o, Weave)]
    assert len(admitted) == 3 and set(weaver.live) == {w.id for w in admitted}
    assert [w.id for w in weaver.store.weaves()] == [w.id for w in admitted]
    assert set(weaver.store.reservations()) == set(weaver.live)
    assert weaver.fabric.violations() == [] and set(weaver.fabric.by_weave) == set(weaver.live)
    # Its audit record went with it: the chain has no hole.
    records = weaver.store.audit_records()
    assert [r["weave_id"] for r in records] == [w.id for w in admitted]
    assert verify_chain(records) == []
    slots = sorted(leg.slot for w in admitted for leg in w.legs if leg.slot is not None)
    assert weaver._take_slot() not in slots


def test_a_weave_cannot_end_inside_a_batch(make_weaver) -> None:
    weaver = mesh_weaver(make_weaver)
    live = weaver.create(REQUESTS[0])
    before = memory(weaver)
    with pytest.raises(RuntimeError, match="cannot end inside"), weaver.admission_batch():
        weaver.create(REQUESTS[1])
        weaver.terminate(live.id)
    assert memory(weaver) == before
    with pytest.raises(RuntimeError, match="do not nest"), weaver.admission_batch(), \
            weaver.admission_batch():
        pass


def test_the_loop_commits_queued_admissions_together_and_keeps_order(make_weaver) -> None:
    weaver = mesh_weaver(make_weaver)
    order: list[str] = []
    weaver.subscribe(lambda e: order.append(e["weave"]["id"]) if "weave" in e else None)
    statements = commits(weaver)
    loop = WeaverLoop(weaver)
    loop.start()
    gate = threading.Event()
    results: dict[int, Any] = {}
    try:
        holding = threading.Event()

        def hold() -> None:  # holds the loop while the requests queue up
            holding.set()
            gate.wait(10)

        loop.post(hold)
        assert holding.wait(5)

        def ask(i: int) -> None:
            results[i] = loop.admit(weaver.create, REQUESTS[i])

        threads = []

        def queue_in_order(fn: Any, *args: Any) -> None:
            queued = loop._queue.qsize()
            thread = threading.Thread(target=fn, args=args)
            thread.start()
            threads.append(thread)
            deadline = time.monotonic() + 5
            while loop._queue.qsize() == queued and time.monotonic() < deadline:
                time.sleep(0.001)

        for i in range(6):
            queue_in_order(ask, i)
        queue_in_order(loop.call, order.append, "marker")
        queue_in_order(ask, 6)
        queue_in_order(ask, 7)
        gate.set()
        for thread in threads:
            thread.join(10)
    finally:
        loop.stop()
    assert all(isinstance(results[i], Weave) for i in range(8))
    ids = [results[i].id for i in range(8)]
    assert order == [*ids[:6], "marker", *ids[6:]]
    # Six admissions, then the marker on its own, then the last two together.
    assert statements.count("COMMIT") == 2
