"""A policy reload that fails while the weaver applies it is a refusal, never half applied:
the switch is audited before it takes effect, a failure leaves the running policy in force
and is recorded, a busy loop applies it later instead of killing SIGHUP's thread, and
SIGHUPs in a row reload one at a time, the file read last applied last."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from db_faults import CommitFails
from loop_control import held
from policy_edits import copy_shipped_policies, shipped_text

from nwc import controller as controller_module
from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_TOPOLOGIES
from nwc.controller import Controller, PolicyReloads
from nwc.policy import Policy, parse_policy_text
from nwc.weave import Weave

pytestmark = pytest.mark.unit

REQ = WeaveRequest("acme-web", "globex-db", 600, 20)
# acme-web no longer a partner of globex-db: a live weave between them is withdrawn.
REVOKED = {"        - ivn: acme-web\n          prefixes: [192.0.2.0/27]":
           "        - ivn: initech-app\n          prefixes: [203.0.113.0/27]"}
HANG_GUARD_S = 30.0  # only ever reached when the code under test is broken


def revoked_policy() -> Policy:
    return parse_policy_text(shipped_text(REVOKED))


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    policy_dir = copy_shipped_policies(tmp_path / "policies")
    made = Controller.from_paths(tmp_path / "state", [policy_dir],
                                 SHIPPED_TOPOLOGIES / "small.yaml")
    made.start()
    try:
        yield made
    finally:
        made.stop()


def test_a_reload_whose_record_cannot_be_committed_leaves_the_old_policy(make_weaver,
                                                                         small) -> None:
    weaver = make_weaver(small)
    weave = weaver.create(REQ)
    assert isinstance(weave, Weave)
    before = weaver.policy
    weaver.store.db = CommitFails(weaver.store.db, times=1)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        weaver.reload_policy(revoked_policy())
    # Not in force: the weave it would withdraw is live, and admission reads the old one.
    assert weaver.policy is before
    assert weave.id in weaver.live


def test_a_failure_applying_a_reload_is_a_recorded_refusal(controller: Controller,
                                                           monkeypatch) -> None:
    weave = controller.call(controller.weaver.create, REQ)
    assert isinstance(weave, Weave)
    before = controller.weaver.policy
    events: list[dict[str, Any]] = []
    controller.call(controller.weaver.subscribe, events.append)
    monkeypatch.setattr(controller_module, "load_policy", lambda paths: revoked_policy())
    store = controller.store
    store.db = CommitFails(store.db, times=1)  # type: ignore[assignment]
    problems = controller.reload_policy()  # returns: SIGHUP's thread lives on
    assert problems and "applying the policy failed: OperationalError" in problems[0]
    assert controller.weaver.policy is before and controller.config.policy is before
    assert weave.id in controller.weaver.live
    (event,) = [e for e in events if e["type"] == "policy.reload"]
    assert event["outcome"] == "refused" and event["problems"] == problems
    records = controller.call(store.audit_records)
    assert [r["outcome"] for r in records if r["action"] == "policy.reload"] == ["refused"]


def test_a_reload_the_busy_loop_takes_late_is_applied_then(controller: Controller,
                                                           monkeypatch) -> None:
    weave = controller.call(controller.weaver.create, REQ)
    assert isinstance(weave, Weave)
    monkeypatch.setattr(controller_module, "load_policy", lambda paths: revoked_policy())
    before = controller.config.policy
    controller.reload_wait_s = 0  # the loop is held: the wait ends at once, deterministically
    with held(controller.loop):
        assert controller.reload_policy() == []  # not refused: left to the loop
        assert controller.weaver.policy is before
    controller.call(lambda: None)  # the loop has run everything queued before
    assert controller.config.policy is controller.weaver.policy is not before
    assert weave.id not in controller.weaver.live  # withdrawn by the late reload


class FakeLoader:
    """A reload that reads a 'file' (a version number) when it starts; the first one blocks
    until the test lets it go, so signals can come in while it runs."""

    def __init__(self) -> None:
        self.file = 1
        self.read: list[int] = []
        self.applied: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.first_started, self.let_go = threading.Event(), threading.Event()
        self.lock = threading.Lock()

    def __call__(self) -> list[str]:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            version = self.file
            self.read.append(version)
        if len(self.read) == 1:
            self.first_started.set()
            self.let_go.wait(HANG_GUARD_S)
        with self.lock:
            self.applied.append(version)
            self.running -= 1
        return []


def test_sighups_in_a_row_reload_one_at_a_time_the_last_file_last() -> None:
    loader = FakeLoader()
    reloads = PolicyReloads(loader)
    try:
        reloads.request()
        assert loader.first_started.wait(HANG_GUARD_S)
        for version in (2, 3, 4):  # the file is edited and signalled again, three times
            loader.file = version
            reloads.request()
        loader.let_go.set()
    finally:
        reloads.stop(HANG_GUARD_S)
    assert loader.most_at_once == 1
    assert loader.applied == [1, 4]  # the three signals that came meanwhile: one reload
