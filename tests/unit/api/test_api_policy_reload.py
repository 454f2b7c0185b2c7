"""Policy reloads (SIGHUP) on /metrics and in the event stream: applied and refused ones are
counted, the last outcome and its time are gauges, and admins alone hear of each."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from api_harness import Harness
from policy_edits import copy_shipped_policies

from nwc.config import Config

pytestmark = pytest.mark.unit


def reloadable(harness: Harness, tmp_path: Path) -> Path:
    """Point the harness's controller at a copy of the shipped policies, for a test to edit
    and reload."""
    policy_dir = copy_shipped_policies(tmp_path / "policies")
    config = harness.controller.config
    harness.controller.config = Config(config.policy, config.topology, (policy_dir,),
                                       config.topology_path)
    return policy_dir


def test_reloads_are_counted_and_the_last_outcome_is_a_gauge(harness: Harness,
                                                             tmp_path: Path) -> None:
    policy_dir = reloadable(harness, tmp_path)
    # Before any reload: the running policy is the one the start loaded, a success.
    assert harness.metric("nwc_policy_reloads_total", outcome="refused") == 0
    assert harness.metric("nwc_policy_last_reload_success") == 1
    good = (policy_dir / "20-ivns.yaml").read_text()
    harness.clock.advance(100)
    (policy_dir / "20-ivns.yaml").write_text("ivns: [unclosed\n")
    assert harness.controller.reload_policy()
    assert harness.metric("nwc_policy_reloads_total", outcome="refused") == 1
    assert harness.metric("nwc_policy_last_reload_success") == 0
    assert harness.metric("nwc_policy_last_reload_timestamp_seconds") == \
        harness.clock.now().timestamp()
    harness.clock.advance(100)
    (policy_dir / "20-ivns.yaml").write_text(good)
    assert harness.controller.reload_policy() == []
    assert harness.metric("nwc_policy_reloads_total", outcome="applied") == 1
    assert harness.metric("nwc_policy_reloads_total", outcome="refused") == 1
    assert harness.metric("nwc_policy_last_reload_success") == 1
    assert harness.metric("nwc_policy_last_reload_timestamp_seconds") == \
        harness.clock.now().timestamp()


def test_admins_alone_hear_of_a_reload(harness: Harness, tmp_path: Path) -> None:
    policy_dir = reloadable(harness, tmp_path)
    harness.create()  # a live weave of acme and globex: the reload concerns them no more
    hub = harness.api.hub

    async def scenario() -> tuple[list[dict[str, Any]], bool]:
        tenant = hub.subscribe("acme")
        admin = hub.subscribe(None)
        seen = []
        ivns = policy_dir / "20-ivns.yaml"
        good = ivns.read_text()
        ivns.write_text("ivns: [unclosed\n")
        await asyncio.to_thread(harness.controller.reload_policy)
        seen.append((await asyncio.wait_for(admin.queue.get(), timeout=5))[1])
        ivns.write_text(good)
        await asyncio.to_thread(harness.controller.reload_policy)
        seen.append((await asyncio.wait_for(admin.queue.get(), timeout=5))[1])
        tenant_heard = not tenant.queue.empty()
        hub.unsubscribe(tenant)
        hub.unsubscribe(admin)
        return seen, tenant_heard

    seen, tenant_heard = asyncio.run(scenario())
    assert [(e["type"], e["outcome"]) for e in seen] == [("policy.reload", "refused"),
                                                         ("policy.reload", "applied")]
    assert seen[0]["problems"] and seen[0]["detail"]
    assert seen[1]["withdrawn"] == []
    assert not tenant_heard


def test_a_policy_that_cannot_even_be_loaded_is_a_counted_refusal(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Whatever loading raises, SIGHUP's thread records a refusal instead of dying."""
    reloadable(harness, tmp_path)

    def fails(paths: object) -> None:
        raise MemoryError

    monkeypatch.setattr("nwc.controller.load_policy", fails)
    before = harness.controller.weaver.policy
    problems = harness.controller.reload_policy()
    assert problems == ["loading the policy failed: MemoryError (the controller's log has the "
                        "traceback)"]
    assert harness.controller.weaver.policy is before
    assert harness.metric("nwc_policy_reloads_total", outcome="refused") == 1
    assert harness.metric("nwc_policy_last_reload_success") == 0
    refused = harness.audit()[-1]
    assert (refused["action"], refused["outcome"]) == ("policy.reload", "refused")
    assert "MemoryError" in caplog.text and "Traceback" in caplog.text
