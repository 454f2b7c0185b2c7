"""The weaver: leases, extensions, restarts, provisioning, link failures, policy reloads, and an
audit record for every decision."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fake_parts import RecordingPart
from policy_edits import copy_shipped_policies, shipped_text

from nwc.admission import Denial, Reason, WeaveRequest
from nwc.audit import read_jsonl, verify_chain
from nwc.config import SHIPPED_TOPOLOGIES
from nwc.controller import Controller
from nwc.lease import SystemClock, iso
from nwc.policy import MAX_LEASE_S, parse_policy_text
from nwc.store import Store
from nwc.weave import State, Weave
from nwc.weaver import Actor, WeaverLoop

pytestmark = pytest.mark.unit

ACME = Actor("alice", "acme")
REQ = WeaveRequest("acme-web", "globex-db", 600, 20)


def audit_trail(weaver) -> list[tuple[str, str, str | None]]:
    return [(r["action"], r["outcome"], r.get("reason"))
            for r in weaver.store.audit_records()]


def test_lease_expiry_releases_everything_and_is_audited(make_weaver, small, clock) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(REQ, ACME, request_id="req-1")
    assert isinstance(weave, Weave) and weave.state is State.ACTIVE
    assert weaver.fabric.reserved[("s1", "s2")] == 20_000
    clock.advance(599)
    assert weaver.tick() == [] and weave.id in weaver.live
    clock.advance(1)
    (ended,) = weaver.tick()
    assert (ended.state, ended.reason) == (State.TERMINATED, "expired")
    assert ended.ended_at == weave.expires_at
    assert weaver.fabric.reserved[("s1", "s2")] == 0 and not weaver.live
    assert weaver.store.reservations() == {}
    assert weaver.store.weave(weave.id).state is State.TERMINATED
    assert audit_trail(weaver) == [("weave.create", "admitted", None),
                                   ("weave.expire", "expired", "expired")]
    first = weaver.store.audit_records()[0]
    assert (first["actor"], first["tenant"], first["request_id"]) == ("alice", "acme", "req-1")


def test_expires_at_is_utc(make_weaver, small) -> None:
    weave = make_weaver(small).create(REQ)
    assert weave.expires_at.utcoffset() == timedelta(0)
    assert weave.to_dict()["expires_at"].endswith("Z")


def test_terminate_on_request(make_weaver, small) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(REQ, ACME)
    ended = weaver.terminate(weave.id, ACME)
    assert (ended.state, ended.reason) == (State.TERMINATED, "requested")
    assert weaver.terminate(weave.id) is None  # already gone
    assert weaver.fabric.violations() == [] and weaver.fabric.reserved[("s1", "s2")] == 0
    assert audit_trail(weaver)[-1] == ("weave.terminate", "released", "requested")


def test_every_denial_is_audited_with_its_reason(make_weaver, small) -> None:
    weaver = make_weaver(small)
    for request in (WeaveRequest("acme-web", "globex-db", 0, 1),
                    WeaveRequest("acme-web", "nosuch", 60, 1),
                    WeaveRequest("acme-web", "globex-lab", 60, 1),
                    WeaveRequest("acme-web", "globex-db", 60, 35)):
        assert isinstance(weaver.create(request, ACME), Denial)
    assert [r for _, _, r in audit_trail(weaver)] == [
        "invalid_request", "unknown_ivn", "policy_violation", "insufficient_bandwidth"]
    assert not weaver.live


def test_extension_is_validated_again(make_weaver, small, clock) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 3000, 20))
    # globex-db allows at most 3600 s of lease from now.
    extended = weaver.extend(weave.id, 600)
    assert extended.expires_at == weave.expires_at + timedelta(seconds=600)
    too_long = weaver.extend(weave.id, 1)
    assert isinstance(too_long, Denial) and too_long.rule == "duration"
    assert weaver.live[weave.id].expires_at == extended.expires_at
    clock.advance(1000)
    assert not isinstance(weaver.extend(weave.id, 900), Denial)
    # A policy change since admission is seen by the extension.
    capped = parse_policy_text(shipped_text(
        {"max_weave_mbps: 40\n      max_total_mbps: 40": "max_weave_mbps: 10\n"
                                                        "      max_total_mbps: 40"}))
    weaver.policy = capped
    denial = weaver.extend(weave.id, 60)
    assert isinstance(denial, Denial)
    assert (denial.reason, denial.side, denial.rule) == (Reason.POLICY_VIOLATION, "target",
                                                         "bandwidth")
    assert [o for a, o, _ in audit_trail(weaver) if a == "weave.extend"] == [
        "extended", "denied", "extended", "denied"]


def test_a_too_long_extension_says_what_was_asked_in_whole_seconds(make_weaver, small,
                                                                    clock) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 3000, 20))
    clock.advance(447.3)  # 2552.7 s left
    denial = weaver.extend(weave.id, 3600)
    assert isinstance(denial, Denial) and denial.rule == "duration"
    asked = ("the lease would end in 6153 s (3600 s requested on top of the 2553 s left), "
             "which exceeds target IVN globex-db's maximum")
    assert denial.detail == asked + " of 3600 s"
    assert denial.tenant_detail == asked  # the target's cap is the other tenant's to know
    huge = weaver.create(WeaveRequest("acme-web", "globex-db", 999_999, 20))
    assert isinstance(huge, Denial)
    assert huge.detail == "duration 999999 s exceeds requester IVN acme-web's maximum of 86400 s"


def test_extend_rejects_bad_duration_and_unknown_weave(make_weaver, small) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(REQ)
    assert weaver.extend(weave.id, 0).reason is Reason.INVALID_REQUEST
    assert weaver.extend("wv-999999", 10) is None


def test_extensions_never_carry_a_weave_past_its_whole_life_cap(make_weaver, small,
                                                                 clock) -> None:
    # Found in review: each extension only checked the time left, so a weave extended again
    # and again outlived its x509 leaves (signed until created_at + MAX_LEASE_S).
    year = parse_policy_text(shipped_text({"max_duration_s: 86400": "max_duration_s: 31622400",
                                           "max_duration_s: 3600": "max_duration_s: 31622400"}))
    weaver = make_weaver(small, year)
    day = 86400
    weave = weaver.create(WeaveRequest("acme-web", "globex-db", 300 * day, 20), ACME)
    cap = weave.created_at + timedelta(seconds=MAX_LEASE_S)
    clock.advance(200 * day)
    # 100 days left + 200 asked is within both IVNs' caps, but past the weave's whole life.
    denial = weaver.extend(weave.id, 200 * day, ACME)
    assert isinstance(denial, Denial) and denial.reason is Reason.INVALID_REQUEST
    assert f"at most {MAX_LEASE_S} s (366 days) from its creation" in denial.detail
    assert iso(cap) in denial.detail and "create a new weave" in denial.detail
    assert denial.detail_for(operator=False) == denial.detail
    assert weaver.live[weave.id].expires_at == weave.expires_at
    assert audit_trail(weaver)[-1] == ("weave.extend", "denied", "invalid_request")
    # Up to the cap exactly is allowed: the leaves are valid until then.
    extended = weaver.extend(weave.id, int((cap - weave.expires_at).total_seconds()), ACME)
    assert isinstance(extended, Weave) and extended.expires_at == cap
    denial = weaver.extend(weave.id, 1, ACME)
    assert isinstance(denial, Denial) and denial.reason is Reason.INVALID_REQUEST


def test_restart_finds_live_weaves_and_releases_those_expired_meanwhile(
        make_weaver, leaf_spine, clock) -> None:
    weaver = make_weaver(leaf_spine)
    short = weaver.create(WeaveRequest("acme-web", "globex-db", 100, 5))
    long = weaver.create(WeaveRequest("initech-app", "acme-web", 1000, 5))
    ended = weaver.create(WeaveRequest("acme-web", "initech-legacy", 1000, 5))
    assert isinstance(ended, Denial)  # cidr overlap; a denial leaves nothing behind
    reserved = dict(weaver.fabric.reserved)
    weaver.store.close()
    clock.advance(500)  # the controller was down for 500 s
    again = make_weaver(leaf_spine)
    assert set(again.live) == {long.id}
    assert again.store.weave(short.id).state is State.TERMINATED
    assert again.store.weave(short.id).reason == "expired"
    assert again.fabric.violations() == []
    released_short = {arc: v - (5000 * sum(1 for p in short.paths
                                           for x in itertools.pairwise(p)
                                           if x == arc or x[::-1] == arc))
                      for arc, v in reserved.items()}
    assert again.fabric.reserved == released_short
    # Slots and ids continue without reuse of a live one.
    new = again.create(WeaveRequest("acme-web", "globex-db", 100, 5))
    assert new.id == "wv-000003"  # denials take no number
    live_slots = [leg.slot for w in again.live.values() for leg in w.legs]
    assert len(live_slots) == len(set(live_slots))


class SlowPart:
    name = "flows"

    def __init__(self) -> None:
        self.up: list[str] = []
        self.down: list[str] = []
        self.moved: list[tuple[str, tuple]] = []

    def weave_up(self, weave: Weave) -> None:
        self.up.append(weave.id)

    def weave_down(self, weave: Weave) -> None:
        self.down.append(weave.id)

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        self.moved.append((weave.id, weave.paths))


def test_provisioning_until_every_part_is_ready(make_weaver, small) -> None:
    part, tunnels = SlowPart(), SlowPart()
    tunnels.name = "tunnels"
    weaver = make_weaver(small, parts=[part, tunnels])
    weave = weaver.create(REQ)
    assert weave.state is State.PROVISIONING and part.up == [weave.id] == tunnels.up
    weaver.part_ready(weave.id, "flows")
    assert weaver.live[weave.id].state is State.PROVISIONING
    weaver.part_ready(weave.id, "tunnels")
    assert weaver.live[weave.id].state is State.ACTIVE
    assert audit_trail(weaver)[-1] == ("weave.state", "active", None)


def test_provisioning_timeout_fails_and_releases(make_weaver, small, clock) -> None:
    part = SlowPart()
    weaver = make_weaver(small, parts=[part], provision_timeout_s=5)
    weave = weaver.create(REQ)
    clock.advance(4)
    assert weaver.tick() == []
    clock.advance(1)
    (failed,) = weaver.tick()
    assert (failed.state, failed.reason) == (State.FAILED, "provision_timeout")
    assert part.down == [weave.id]
    assert weaver.fabric.reserved[("s1", "s2")] == 0


class WaitingPart(SlowPart):
    """A part that says what it still waits for, as the tunnel part does."""

    name = "tunnels"
    confirms_teardown = True

    def waiting_on(self, weave_id: str) -> str | None:
        return f"h1, agent unresponsive since T: leg {weave_id}-s0"


def test_timeouts_say_what_each_part_waits_for(make_weaver, small, clock) -> None:
    """Found by a tester: "not ready after 30 s: tunnels", and a teardown not confirmed by
    ["tunnels"], named no host."""
    tunnels, quiet = WaitingPart(), SlowPart()
    weaver = make_weaver(small, parts=[tunnels, quiet], provision_timeout_s=5)
    events: list[dict] = []
    weaver.subscribe(events.append)
    weave = weaver.create(REQ)
    clock.advance(5)
    (failed,) = weaver.tick()
    assert (failed.id, failed.reason) == (weave.id, "provision_timeout")
    (ended,) = [e for e in events if e["type"] == "weave.state"
                and e["weave"]["state"] == "failed"]
    assert ended["detail"] == (f"not ready after 5 s: flows, tunnels (h1, agent unresponsive "
                               f"since T: leg {weave.id}-s0)")
    clock.advance(11)
    weaver.tick()
    (unconfirmed,) = [e for e in events if e["type"] == "weave.teardown_unconfirmed"]
    assert unconfirmed["parts"] == ["tunnels"]
    assert unconfirmed["detail"] == (
        f"teardown not confirmed within 10 s by: tunnels (h1, agent unresponsive since T: "
        f"leg {weave.id}-s0) (resynced when they answer)")


def test_part_failure_fails_the_weave(make_weaver, small) -> None:
    weaver = make_weaver(small, parts=[SlowPart()])
    weave = weaver.create(REQ)
    weaver.part_failed(weave.id, "tunnels", "IKE authentication failed")
    stored = weaver.store.weave(weave.id)
    assert (stored.state, stored.reason) == (State.FAILED, "provision_failed")
    assert not weaver.live


def test_link_down_moves_weave_or_fails_it(make_weaver, leaf_spine) -> None:
    part = SlowPart()
    weaver = make_weaver(leaf_spine, parts=[part])
    weave = weaver.create(WeaveRequest("initech-app", "acme-web", 600, 10))
    assert all(leg.path[2] == "spine1" for leg in weave.legs)
    (moved,) = weaver.link_changed("leaf4", "spine1", up=False)
    assert all(leg.path[2] == "spine2" for leg in moved.legs)
    assert part.moved == [(weave.id, moved.paths)]
    assert weaver.fabric.reserved[("leaf4", "spine1")] == 0
    assert weaver.fabric.reserved[("leaf4", "spine2")] == 2 * 10_000  # two legs share it
    assert weaver.fabric.violations() == []
    (failed,) = weaver.link_changed("leaf4", "spine2", up=False)
    assert (failed.state, failed.reason) == (State.FAILED, "no_path")
    assert all(v == 0 for v in weaver.fabric.reserved.values())
    assert weaver.link_changed("leaf4", "spine2", up=False) == []  # no change, no event
    actions = [a for a, _, _ in audit_trail(weaver)]
    assert actions.count("weave.reroute") == 1 and actions[-1] == "weave.fail"


def test_policy_reload_ends_weaves_no_longer_allowed(make_weaver, small) -> None:
    part = SlowPart()
    weaver = make_weaver(small, parts=[part])
    weave = weaver.create(REQ)
    weaver.reload_policy(weaver.policy)
    assert part.moved == [(weave.id, weave.paths)]  # still allowed: recompiled, not ended
    revoked = parse_policy_text(shipped_text(
        {"        - ivn: acme-web\n          prefixes: [192.0.2.0/27]":
         "        - ivn: initech-app\n          prefixes: [203.0.113.0/27]"}))
    (ended,) = weaver.reload_policy(revoked)
    assert (ended.state, ended.reason) == (State.FAILED, "policy_withdrawn")
    assert weave.id not in weaver.live


def test_controller_keeps_last_good_policy_when_reload_fails(tmp_path: Path) -> None:
    policy_dir = copy_shipped_policies(tmp_path / "policies")
    controller = Controller.from_paths(tmp_path / "state", [policy_dir],
                                       SHIPPED_TOPOLOGIES / "small.yaml")
    controller.start()
    try:
        before = controller.weaver.policy
        (policy_dir / "20-ivns.yaml").write_text(
            (policy_dir / "20-ivns.yaml").read_text().replace("vni: 201", "vni: 201\n    vni: 5"))
        problems = controller.reload_policy()
        assert problems and "duplicate key" in problems[0]
        assert controller.weaver.policy is before
        weave = controller.call(controller.weaver.create, REQ)
        assert isinstance(weave, Weave)
    finally:
        controller.stop()


def test_scheduler_expires_on_its_own(tmp_path: Path) -> None:
    """The loop thread sleeps until the next expiry and releases it with nobody calling."""
    controller = Controller.from_paths(tmp_path / "state", None, "small", clock=SystemClock())
    controller.start()
    try:
        weave = controller.call(controller.weaver.create,
                                WeaveRequest("acme-web", "globex-db", 1, 5))
        deadline = time.monotonic() + 10
        while weave.id in controller.weaver.live and time.monotonic() < deadline:
            time.sleep(0.05)
        assert controller.call(controller.weaver.store.weave, weave.id).state is \
            State.TERMINATED
    finally:
        controller.stop()


def test_loop_runs_calls_in_order_and_reports_exceptions(make_weaver, small) -> None:
    weaver = make_weaver(small)
    loop = WeaverLoop(weaver)
    loop.start()
    try:
        seen = []
        for i in range(20):
            loop.post(seen.append, i)
        assert loop.call(len, seen) == 20 and seen == list(range(20))
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: 1 / 0)
        assert loop.call(lambda: "still alive") == "still alive"
    finally:
        loop.stop()


def test_audit_file_mirrors_the_database_and_verifies(make_weaver, small, tmp_path) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(REQ)
    weaver.create(WeaveRequest("acme-web", "globex-lab", 60, 1))
    weaver.terminate(weave.id)
    records = list(read_jsonl(tmp_path / "state" / "audit.jsonl"))
    assert records == weaver.store.audit_records()
    assert verify_chain(records) == []
    assert (tmp_path / "state" / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state" / "nwc.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_audit_text_is_what_was_hashed_and_survives_a_reopen(tmp_path) -> None:
    """A record is encoded once (the hashed text plus its hash) for both the database and
    the file; non-ASCII text, and a file that lost its tail, must still verify and catch up."""
    state = tmp_path / "state"
    store = Store(state)
    store.audit({"action": "note", "detail": "caf\u00e9 \u2615", "n": 1.5})
    store.audit({"action": "note", "detail": 'quote " and \\ backslash'})
    lines = (state / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    store.close()
    for line in lines:  # as docs/api.md says: the hashed text, then the hash
        hashed, digest = line.rsplit(',"hash":"', 1)
        assert hashlib.sha256(f"{hashed}}}".encode()).hexdigest() == digest.removesuffix('"}')
    assert [json.loads(line) for line in lines] == Store(state).audit_records()
    (state / "audit.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    reopened = Store(state)  # catches the file up from the database
    records = list(read_jsonl(state / "audit.jsonl"))
    assert records == reopened.audit_records() and len(records) == 2
    assert records[0]["detail"] == "caf\u00e9 \u2615"
    assert verify_chain(records) == []


def test_failed_commit_leaves_memory_and_disk_unchanged(make_weaver, small, monkeypatch) -> None:
    weaver = make_weaver(small)

    def boom(_weave) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(weaver.store, "save_reservation", boom)
    with pytest.raises(OSError):
        weaver.create(REQ)
    assert not weaver.live and weaver.fabric.violations() == []
    assert all(v == 0 for v in weaver.fabric.reserved.values())
    assert weaver.store.weaves() == [] and weaver.store.audit_records() == []
    monkeypatch.undo()
    assert isinstance(weaver.create(REQ), Weave)
    assert verify_chain(weaver.store.audit_records()) == []


def test_a_request_after_a_lease_ended_finds_the_weave_ended(make_weaver, small,
                                                             clock) -> None:
    """Found in review: the loop released expired leases only after each call, so a call
    arriving between the end of a lease and the next tick saw the weave live, and an
    extension revived it."""
    weaver = make_weaver(small)
    loop = WeaverLoop(weaver)
    loop.start()
    try:
        weave = loop.admit(weaver.create, REQ)
        clock.advance(601)  # no tick yet: the loop sleeps until its next deadline or call
        assert isinstance(loop.admit(weaver.create, REQ), Weave)  # the pair is free again
        assert loop.call(weaver.extend, weave.id, 600) is None
    finally:
        loop.stop()
    assert weaver.store.weave(weave.id).reason == "expired"
    # Called directly (no loop), an extension of a lease that is over ends it too.
    again = weaver.live[next(iter(weaver.live))]
    clock.advance(601)
    assert weaver.extend(again.id, 600) is None
    assert weaver.store.weave(again.id).reason == "expired"


def test_a_wall_clock_step_does_not_move_the_provision_deadline(make_weaver, small,
                                                                clock) -> None:
    """Found in review: deadlines were wall-clock instants, so an NTP step forward failed
    every weave still provisioning at once, and a step back kept a stuck one for an hour."""
    weaver = make_weaver(small, parts=[RecordingPart("tunnels")])
    weave = weaver.create(REQ)
    clock.step_wall(45)  # past the 30 s provision timeout, but no time passed
    assert weaver.tick() == [] and weaver.live[weave.id].state is State.PROVISIONING
    assert 0 < weaver.seconds_to_next_deadline() <= 30
    clock.step_wall(-3600)
    clock.advance(30)
    (failed,) = weaver.tick()
    assert (failed.id, failed.reason) == (weave.id, "provision_timeout")
