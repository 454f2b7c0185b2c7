"""Group commit: admissions that arrive together share one durable commit. Each still decides
exactly as it would alone, nothing is told before the commit is on disk, one failing admission
leaves the others, and a failed commit undoes every admission of the batch in memory too."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest
import test_reservation_properties as mesh
from db_faults import CommitFails, InterruptsWeaveInserts
from fake_parts import RecordingPart
from loop_control import held

from nwc.admission import Denial, WeaveRequest
from nwc.audit import verify_chain
from nwc.store import Store, TransactionLost
from nwc.weave import Weave
from nwc.weaver import AdmissionNotCommitted, Weaver, WeaverLoop

pytestmark = pytest.mark.unit

# Nine admissible requests (every a-IVN with every b-IVN of the mesh policy) and one denial
# (over the 500 Mbit/s per-weave cap).
REQUESTS = [WeaveRequest(a, b, 600, 10) for a, b in mesh.PAIRS[:9]]
DENIED = WeaveRequest("a0", "b3", 600, 900)


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
    part = RecordingPart("recorder")
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
    part = RecordingPart("recorder")
    weaver = mesh_weaver(make_weaver, parts=[part])
    first = weaver.create(REQUESTS[0])
    kept = weaver.create(REQUESTS[1])  # something held before the batch
    weaver.terminate(first.id)  # ...and slots given back, so the free list is not empty
    events: list[dict[str, Any]] = []
    weaver.subscribe(events.append)
    told_before, before = list(part.told), memory(weaver)
    audit_before = weaver.store.audit_records()
    real_db = weaver.store.db
    weaver.store.db = CommitFails(real_db)  # type: ignore[assignment]
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
    results: dict[int, Any] = {}
    threads: list[threading.Thread] = []

    def ask(i: int) -> None:
        results[i] = loop.admit(weaver.create, REQUESTS[i])

    try:
        with held(loop) as queue:
            for n, (fn, args) in enumerate([*[(ask, (i,)) for i in range(6)],
                                            (loop.call, (order.append, "marker")),
                                            (ask, (6,)), (ask, (7,))], start=1):
                threads.append(threading.Thread(target=fn, args=args))
                threads[-1].start()
                queue.wait_queued(n)  # one at a time, so the queue's order is known
        for thread in threads:
            thread.join(10)
    finally:
        loop.stop()
    assert all(isinstance(results[i], Weave) for i in range(8))
    ids = [results[i].id for i in range(8)]
    assert order == [*ids[:6], "marker", *ids[6:]]
    # Six admissions, then the marker on its own, then the last two together.
    assert statements.count("COMMIT") == 2


def test_sqlite_rolling_back_the_whole_batch_keeps_nothing_of_it(make_weaver) -> None:
    """Found in review: after SQLite had rolled back the whole transaction, the next
    admission's savepoint began a new transaction and its release committed it, while the
    batch's failed commit undid memory: ghost weaves on disk, a broken audit chain."""
    weaver = mesh_weaver(make_weaver)
    kept = weaver.create(REQUESTS[0])
    before, audit_before = memory(weaver), weaver.store.audit_records()
    real_db = weaver.store.db
    outcomes: list[Any] = []
    with pytest.raises(TransactionLost), weaver.admission_batch():
        for k, request in enumerate(REQUESTS[1:5]):
            if k == 1:
                weaver.store.db = InterruptsWeaveInserts(real_db)  # type: ignore[assignment]
            try:
                outcomes.append(weaver.create(request))
            except sqlite3.OperationalError as exc:
                outcomes.append(exc)
    weaver.store.db = real_db
    assert isinstance(outcomes[0], Weave)
    assert [type(o) for o in outcomes[1:]] == \
        [sqlite3.OperationalError, TransactionLost, TransactionLost]
    assert memory(weaver) == before
    assert [w.id for w in weaver.store.weaves()] == [kept.id]
    assert weaver.store.audit_records() == audit_before
    # Everything goes on as if the batch had never been.
    later = [weaver.create(r) for r in REQUESTS[1:4]]
    assert [w.id for w in later] == [f"wv-{n:06d}" for n in range(2, 5)]
    assert verify_chain(weaver.store.audit_records()) == []
    assert {w.id for w in weaver.store.weaves()} == set(weaver.live)


def test_sqlite_rolling_back_a_lone_admission_leaves_no_trace(make_weaver) -> None:
    weaver = mesh_weaver(make_weaver)
    before = memory(weaver)
    real_db = weaver.store.db
    weaver.store.db = InterruptsWeaveInserts(real_db)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        weaver.create(REQUESTS[0])
    weaver.store.db = real_db
    # A lone admission gives its slots back to the free list (the batch restores the counter).
    slots = ("next_slot", "free_slots")
    assert {k: v for k, v in memory(weaver).items() if k not in slots} == \
        {k: v for k, v in before.items() if k not in slots}
    assert weaver.store.weaves() == []
    again = weaver.create(REQUESTS[0])
    assert again.id == "wv-000001" and [leg.slot for leg in again.legs] == [0, 1]


def test_a_failing_effect_after_the_commit_does_not_stop_the_others(make_weaver,
                                                                     monkeypatch) -> None:
    """A part that cannot build a committed weave fails that weave; if even that fails, the
    other weaves of the batch are still handed to the parts and the batch stands."""
    part = RecordingPart("recorder")
    weaver = mesh_weaver(make_weaver, parts=[part])
    first: list[str] = []

    def weave_up(weave: Weave) -> None:
        if not first:
            first.append(weave.id)
            raise OSError("the switch went away")
        part.told.append(("up", weave.id))

    monkeypatch.setattr(part, "weave_up", weave_up)

    def part_failed(*_: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(weaver, "part_failed", part_failed)
    with weaver.admission_batch():
        admitted = [weaver.create(r) for r in REQUESTS[:3]]
    assert part.told == [("up", w.id) for w in admitted[1:]]
    assert {w.id for w in weaver.store.weaves()} == {w.id for w in admitted}


def test_each_caller_of_a_failed_group_commit_gets_its_own_error(make_weaver) -> None:
    weaver = mesh_weaver(make_weaver)
    loop = WeaverLoop(weaver)
    loop.start()
    errors: list[BaseException] = []
    real_db = weaver.store.db

    def ask(i: int) -> None:
        try:
            loop.admit(weaver.create, REQUESTS[i])
        except BaseException as exc:
            errors.append(exc)

    try:
        with held(loop) as queue:
            weaver.store.db = CommitFails(real_db, times=1)  # type: ignore[assignment]
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            queue.wait_queued(3)
        for thread in threads:
            thread.join(10)
        assert loop.call(lambda: len(weaver.live)) == 0
        again = loop.admit(weaver.create, REQUESTS[0])
    finally:
        loop.stop()
        weaver.store.db = real_db
    assert len(errors) == 3 and len({id(e) for e in errors}) == 3
    assert all(isinstance(e, AdmissionNotCommitted) for e in errors)
    assert all(isinstance(e.__cause__, sqlite3.OperationalError) for e in errors)
    assert again.id == "wv-000001"
