"""What operators see of the weaver: a lease that ran out while the controller was down is
recorded as ending at its lease end; policy reloads, applied or refused, are logged, audited
and announced; every weave lifecycle change is one log line."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_parts import RecordingPart

from nwc.admission import WeaveRequest
from nwc.lease import iso
from nwc.store import Store
from nwc.weave import State
from nwc.weaver import Weaver

pytestmark = pytest.mark.unit

SHORT = WeaveRequest("acme-web", "globex-db", 60, 5)


def test_a_lease_that_ran_out_while_the_controller_was_down_ended_at_its_lease_end(
        make_weaver, small, clock) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(SHORT)
    weaver.store.close()  # kill -9: nothing more is written
    clock.advance(500)  # back 440 s after the lease end
    restarted_at = clock.now()
    again = make_weaver(small)
    record = again.store.weave(weave.id)
    assert (record.state, record.reason) == (State.TERMINATED, "expired")
    assert record.ended_at == weave.expires_at
    (expire,) = [r for r in again.store.audit_records() if r["action"] == "weave.expire"]
    assert expire["ts"] == iso(restarted_at)  # when it was recorded...
    assert "while the controller was down" in expire["detail"]  # ...and why that is late
    assert iso(weave.expires_at) in expire["detail"] and iso(restarted_at) in expire["detail"]


def test_a_lease_that_ran_out_while_down_is_still_torn_down_at_the_restart(
        tmp_path: Path, small, clock, shipped_policy) -> None:
    store = Store(tmp_path / "state")
    first = Weaver(policy=shipped_policy, topology=small, store=store, clock=clock)
    first.recover()
    weave = first.create(SHORT)
    store.close()
    clock.advance(120)
    store = Store(tmp_path / "state")
    try:
        part = RecordingPart(confirms_teardown=True)
        again = Weaver(policy=shipped_policy, topology=small, store=store, clock=clock,
                       parts=[part])
        again.recover()
        # Ended at the lease end, but the data plane is taken down now, and confirmed.
        record = store.weave(weave.id)
        assert (record.state, record.ended_at) == (State.TERMINATING, weave.expires_at)
        assert part.down == [weave.id]
        again.part_down(weave.id, part.name)
        done = store.weave(weave.id)
        assert (done.state, done.ended_at) == (State.TERMINATED, weave.expires_at)
    finally:
        store.close()


def test_a_lease_that_runs_out_while_running_still_ends_when_noticed(
        make_weaver, small, clock) -> None:
    """Not a restart: the loop releases a lease when it is due, and says nothing of a stop."""
    weaver = make_weaver(small)
    weave = weaver.create(SHORT)
    clock.advance(61)
    (ended,) = weaver.tick()
    assert (ended.id, ended.ended_at) == (weave.id, clock.now())
    (expire,) = [r for r in weaver.store.audit_records() if r["action"] == "weave.expire"]
    assert "detail" not in expire
