"""What operators see of the weaver: a lease that ran out while the controller was down is
recorded as ending at its lease end; policy reloads, applied or refused, are logged, audited
and announced; every weave lifecycle change is one log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fake_parts import RecordingPart
from policy_edits import copy_shipped_policies, shipped_text

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_TOPOLOGIES
from nwc.controller import Controller
from nwc.lease import iso
from nwc.policy import parse_policy_text
from nwc.store import Store
from nwc.weave import State
from nwc.weaver import MAX_PROBLEM_CHARS, MAX_RECORDED_PROBLEMS, Actor, Weaver

pytestmark = pytest.mark.unit

SHORT = WeaveRequest("acme-web", "globex-db", 60, 5)
NARROWED = {"prefixes: [192.0.2.0/27]    # only this part": "prefixes: [192.0.2.0/28]    # only"}


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


def test_a_lease_that_ran_out_while_down_is_not_withdrawn_by_a_policy_changed_since(
        make_weaver, small, clock) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(SHORT)
    weaver.store.close()
    clock.advance(120)
    again = make_weaver(small, parse_policy_text(shipped_text(NARROWED)))
    record = again.store.weave(weave.id)
    assert (record.state, record.reason, record.ended_at) == (State.TERMINATED, "expired",
                                                              weave.expires_at)
    assert [r["action"] for r in again.store.audit_records()
            if r.get("weave_id") == weave.id] == ["weave.create", "weave.expire"]


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


def lifecycle_lines(caplog: pytest.LogCaptureFixture, weave_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "nwc.weaver" and r.levelno == logging.INFO
            and r.getMessage().startswith(f"weave {weave_id} ")]


def test_every_lifecycle_change_is_one_log_line(make_weaver, leaf_spine, clock,
                                                 caplog) -> None:
    caplog.set_level(logging.INFO, logger="nwc.weaver")
    part = RecordingPart()
    weaver = make_weaver(leaf_spine, parts=[part])
    alice = Actor("alice-laptop-token", "initech")
    moved = weaver.create(WeaveRequest("initech-app", "acme-web", 600, 10), alice)
    weaver.part_ready(moved.id, part.name)
    weaver.link_changed("leaf4", "spine1", up=False)  # rerouted over spine2
    weaver.link_changed("leaf4", "spine2", up=False)  # no path left
    created, active, rerouted, no_path = lifecycle_lines(caplog, moved.id)
    assert created.startswith(f"weave {moved.id} created for tenant initech: initech-app > "
                              "acme-web, 10.0 Mbit/s")
    assert active == f"weave {moved.id} active: every part built it"
    assert rerouted.startswith(f"weave {moved.id} rerouted: ") and "spine2" in rerouted
    assert no_path.startswith(f"weave {moved.id} failed (no_path) by nwc: ")

    weaver.link_changed("leaf4", "spine1", up=True)
    expired = weaver.create(WeaveRequest("acme-web", "globex-db", 60, 5))
    released = weaver.create(WeaveRequest("initech-app", "acme-web", 600, 5), alice)
    weaver.terminate(released.id, alice)
    clock.advance(61)
    weaver.tick()
    assert lifecycle_lines(caplog, released.id)[1:] == [
        f"weave {released.id} terminated (requested) by initech"]
    assert lifecycle_lines(caplog, expired.id)[1:] == [
        f"weave {expired.id} terminated (expired) by nwc"]
    # Who asked is the tenant, never the name of the token it used.
    assert not any("alice-laptop-token" in r.getMessage() for r in caplog.records)


def test_a_weave_withdrawn_by_a_reload_and_a_confirmed_teardown_are_logged(
        make_weaver, small, caplog) -> None:
    caplog.set_level(logging.INFO, logger="nwc.weaver")
    part = RecordingPart(confirms_teardown=True)
    weaver = make_weaver(small, parts=[part])
    ended = weaver.create(SHORT)
    weaver.terminate(ended.id, Actor("ops-token"))
    weaver.part_down(ended.id, part.name)
    withdrawn = weaver.create(SHORT)  # one weave per pair of IVNs at a time
    weaver.reload_policy(parse_policy_text(shipped_text(
        {"prefixes: [192.0.2.0/27]    # only this part":
         "prefixes: [192.0.2.0/28]    # only"})))
    assert lifecycle_lines(caplog, ended.id)[1:] == [
        f"weave {ended.id} terminating (requested) by operator",
        f"weave {ended.id} terminated: its data plane is gone"]
    (_, line) = lifecycle_lines(caplog, withdrawn.id)
    assert line.startswith(f"weave {withdrawn.id} failed (policy_withdrawn) by nwc: ")


def test_an_applied_reload_is_logged_with_the_weaves_it_withdrew(make_weaver, small,
                                                                 caplog) -> None:
    caplog.set_level(logging.INFO, logger="nwc.weaver")
    weaver = make_weaver(small)
    events: list[dict] = []
    weaver.subscribe(events.append)
    weave = weaver.create(SHORT)
    weaver.reload_policy(parse_policy_text(shipped_text(NARROWED)))
    (line,) = [r.getMessage() for r in caplog.records if "policy reload" in r.getMessage()]
    assert line.startswith("policy reload applied: ") and line.endswith(f"withdrew {weave.id}")
    reload = events[-1]
    assert (reload["type"], reload["outcome"], reload["withdrawn"]) == (
        "policy.reload", "applied", [weave.id])
    weaver.reload_policy(weaver.policy)
    assert events[-1]["withdrawn"] == []


@pytest.mark.parametrize("ivns", ["ivns: [unclosed\n",  # a YAML syntax error
                                  "version: 1\nivns: {}\n",  # the topology's VMs orphaned
                                  "version: 1\nivns: {}\x00\n",  # a character YAML refuses
                                  "version: 1\nivns: {}  # \x1b[31m\n"],
                         ids=["syntax", "no-ivns", "nul", "esc"])
def test_a_refused_reload_is_audited_and_announced_with_its_problems(tmp_path: Path,
                                                                      ivns: str) -> None:
    policy_dir = copy_shipped_policies(tmp_path / "policies")
    controller = Controller.from_paths(tmp_path / "state", [policy_dir],
                                       SHIPPED_TOPOLOGIES / "small.yaml")
    controller.start()
    events: list[dict] = []
    controller.weaver.subscribe(events.append)
    try:
        (policy_dir / "20-ivns.yaml").write_text(ivns)
        problems = controller.reload_policy(Actor("ops-token"))
        assert problems
        records = controller.call(controller.store.audit_records)
        refused = records[-1]
        assert (refused["action"], refused["outcome"], refused["actor"]) == (
            "policy.reload", "refused", "ops-token")
        assert refused["problems"] == problems
        assert events[-1]["type"] == "policy.reload" and events[-1]["outcome"] == "refused"
        assert events[-1]["problems"] == problems
    finally:
        controller.stop()


def test_a_refused_reloads_record_is_bounded(make_weaver, small) -> None:
    weaver = make_weaver(small)
    events: list[dict] = []
    weaver.subscribe(events.append)
    many = [f"20-ivns.yaml:{n}: {'x' * 1000}" for n in range(1000)]
    weaver.policy_refused(many)
    (record,) = weaver.store.audit_records()
    assert len(record["problems"]) == MAX_RECORDED_PROBLEMS
    assert all(len(p) <= MAX_PROBLEM_CHARS for p in record["problems"])
    assert record["problems"][0].startswith("20-ivns.yaml:0: xxx")
    assert record["detail"].startswith("1000 problems")
    assert events[-1]["problems"] == record["problems"]
