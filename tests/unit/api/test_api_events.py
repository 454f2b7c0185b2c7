"""GET /v1/events: live weave state changes and security events, each to those allowed to
see it, through bounded per-client queues."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from api_harness import Harness, TeardownPart
from policy_edits import shipped_text
from starlette.requests import ClientDisconnect

from nwc import __version__
from nwc.api import ApiSettings, EventStreamResponse
from nwc.auth import TokenStore
from nwc.events import EventHub, Subscription, stream
from nwc.policy import parse_policy_text

pytestmark = pytest.mark.unit


def read_events(lines: Any, count: int) -> list[tuple[str, dict[str, Any]]]:
    """Parse server-sent events from an iterator of lines until `count` were read."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = None
    for line in lines:
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind is not None:
            events.append((kind, json.loads(line.split(":", 1)[1])))
            kind = None
            if len(events) == count:
                break
    return events


def test_a_tenant_follows_its_weaves_over_sse(harness: Harness) -> None:
    with harness.client.stream("GET", "/v1/events", headers=harness.auth("acme"),
                               params={"max_events": 3}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert read_events(lines, 1) == [("ready", {"principal": "acme",
                                                    "version": __version__})]
        # Subscribed from here on: act, then read what the stream says.
        weave_id = harness.create().json()["id"]
        harness.create(bandwidth_mbps=500)  # refused: acme hears why
        harness.request("DELETE", f"/v1/weaves/{weave_id}")
        events = read_events(lines, 3)
    assert [k for k, _ in events] == ["weave.state", "weave.denied", "weave.state"]
    assert events[0][1]["weave"]["state"] == "active"
    assert events[1][1]["error"] == "policy_violation"
    assert events[2][1]["weave"]["state"] == "terminated"


async def _next(sub: Subscription) -> Any:
    return await asyncio.wait_for(sub.queue.get(), timeout=5)


def test_events_reach_only_those_they_concern(harness: Harness) -> None:
    weave_id = harness.create().json()["id"]
    hub, weaver = harness.api.hub, harness.controller.weaver

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        subs = {who: hub.subscribe(who) for who in ("initech", "acme", "globex")}
        subs["admin"] = hub.subscribe(None)  # last: once it has an event, the others do too
        seen: dict[str, list[dict[str, Any]]] = {who: [] for who in subs}

        async def drain() -> None:
            admin_event = (await _next(subs["admin"]))[1]
            seen["admin"].append(admin_event)
            for who in ("initech", "acme", "globex"):
                while not subs[who].queue.empty():
                    seen[who].append(subs[who].queue.get_nowait()[1])

        # A security event about the weave (as the tunnel part reports an IKE failure)...
        await asyncio.to_thread(harness.controller.call, weaver.security_event, weave_id,
                                "ike_failure", "AUTH_FAILED from the peer")
        await drain()
        # ...and an authentication failure, which concerns no tenant.
        await asyncio.to_thread(harness.request, "GET", "/v1/weaves", "bogus")
        await drain()
        for sub in subs.values():
            hub.unsubscribe(sub)
        return seen

    seen = asyncio.run(scenario())
    assert [e["kind"] for e in seen["admin"]] == ["ike_failure", "auth_failure"]
    assert [e["kind"] for e in seen["acme"]] == ["ike_failure"]
    assert [e["kind"] for e in seen["globex"]] == ["ike_failure"]
    assert seen["initech"] == []
    assert "Bearer" not in json.dumps(seen["admin"])  # the presented token is never echoed


def test_a_client_that_falls_behind_is_told_and_disconnected() -> None:
    async def scenario() -> list[str]:
        hub = EventHub(queue_size=2)
        sub = hub.subscribe("acme")
        for n in range(5):
            hub.publish({"type": "weave.state", "n": n}, {"acme"})
        await asyncio.sleep(0)  # the hand-offs run on this loop
        return [chunk async for chunk in stream(hub, sub, ready={}, keepalive_s=5)]

    chunks = asyncio.run(scenario())
    assert "event: ready" in chunks[0]
    assert "event: overflow" in chunks[-1]
    assert len(chunks) == 2  # the stream ended: no further reads, no unbounded memory


def test_streams_end_when_the_controller_stops() -> None:
    async def scenario() -> list[str]:
        hub = EventHub()
        sub = hub.subscribe(None)
        hub.close()
        await asyncio.sleep(0)
        return [chunk async for chunk in stream(hub, sub, ready={}, keepalive_s=5)]

    chunks = asyncio.run(scenario())
    assert "event: closing" in chunks[-1]


def test_open_streams_are_capped_per_principal(make_harness: Any) -> None:
    h = make_harness(settings=ApiSettings(max_event_streams_per_principal=1))
    with h.client.stream("GET", "/v1/events", headers=h.auth("acme"),
                         params={"max_events": 1}) as first:
        read_events(first.iter_lines(), 1)  # ready: the first stream is open
        second = h.request("GET", "/v1/events", "acme", params={"max_events": 1})
        assert second.status_code == 429 and second.json()["error"] == "too_many_streams"
        with h.client.stream("GET", "/v1/events", headers=h.auth("globex"),
                             params={"max_events": 1}) as other:
            assert other.status_code == 200


def test_a_tenant_reads_nothing_of_the_other_sides_policy_in_events(harness: Harness) -> None:
    """Found in review: a refused extension went to both parties with the requester policy's
    text, and a weave ended by a policy reload told both parties the withdrawing side's
    partner list."""
    weave_id = harness.create().json()["id"]  # acme-web -> globex-db
    hub, weaver = harness.api.hub, harness.controller.weaver
    withdrawn = parse_policy_text(shipped_text({
        "        - ivn: acme-web\n          prefixes: [192.0.2.0/27]    # only this part of "
        "acme-web may reach us\n": "        - tenant: initech\n"}))

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        subs = {who: hub.subscribe(who) for who in ("acme", "globex")}
        subs["admin"] = hub.subscribe(None)
        seen: dict[str, list[dict[str, Any]]] = {who: [] for who in subs}

        async def drain() -> None:
            seen["admin"].append((await _next(subs["admin"]))[1])
            for who in ("acme", "globex"):
                while not subs[who].queue.empty():
                    seen[who].append(subs[who].queue.get_nowait()[1])

        # Over acme-web's own maximum duration: acme's policy refuses.
        refused = await asyncio.to_thread(harness.request, "POST",
                                          f"/v1/weaves/{weave_id}/extend", "acme",
                                          json={"duration_s": 86400})
        assert refused.status_code == 403
        await drain()
        await asyncio.to_thread(harness.controller.call, weaver.reload_policy, withdrawn)
        await drain()
        for sub in subs.values():
            hub.unsubscribe(sub)
        return seen

    seen = asyncio.run(scenario())
    assert [e["type"] for e in seen["acme"]] == ["weave.denied", "weave.state"]
    assert "86400" in seen["acme"][0]["detail"]  # its own policy: it may read it
    # globex hears of the end, not of acme's caps, and nobody reads globex's partner list.
    assert [e["type"] for e in seen["globex"]] == ["weave.state"]
    ended = [seen[who][-1] for who in ("acme", "globex")]
    assert all(e["weave"]["state"] == "failed" for e in ended)
    assert all("initech" not in e["detail"] and "allows:" not in e["detail"] for e in ended)
    assert all("no longer allows this weave" in e["detail"] for e in ended)
    assert "initech" in seen["admin"][-1]["detail"]  # the operator reads everything


def test_the_other_party_hears_who_ended_a_weave_never_a_token(make_harness: Any) -> None:
    """Found by a tester: globex was told only "terminated (requested)", not by whom. Each
    end names the tenant that asked, `operator` or `nwc`, in the events and in the API; and
    every event has a `detail` (it was null on some and missing on others)."""
    part = TeardownPart()
    h = make_harness(parts=(part,))
    hub = h.api.hub

    async def scenario() -> tuple[list[str], list[dict[str, Any]]]:
        sub = hub.subscribe("globex")  # the target's tenant, which ends none of them
        seen: list[dict[str, Any]] = []
        ids = []

        async def weave(duration_s: int) -> str:
            made = await asyncio.to_thread(h.create, duration_s=duration_s)
            ids.append(made.json()["id"])
            await asyncio.to_thread(part.report_ready, ids[-1])
            return str(ids[-1])

        async def ended(weave_id: str) -> None:
            # terminating, then terminated once the part confirms
            await asyncio.to_thread(part.report_down, weave_id)
            while True:
                seen.append((await _next(sub))[1])
                if (seen[-1]["weave"]["id"], seen[-1]["weave"]["state"]) == \
                        (weave_id, "terminated"):
                    return

        for who in ("acme", "admin"):
            weave_id = await weave(600)
            await asyncio.to_thread(h.request, "DELETE", f"/v1/weaves/{weave_id}", who)
            await ended(weave_id)
        weave_id = await weave(30)
        await asyncio.to_thread(h.tick, 31)
        await ended(weave_id)
        hub.unsubscribe(sub)
        return ids, seen

    (by_acme, by_admin, expired), seen = asyncio.run(scenario())
    ends = [(e["weave"]["id"], e["weave"]["state"], e["weave"]["reason"],
             e["weave"]["ended_by"]) for e in seen
            if e["weave"]["state"] in ("terminating", "terminated")]
    assert ends == [(by_acme, "terminating", "requested", "acme"),
                    (by_acme, "terminated", "requested", "acme"),
                    (by_admin, "terminating", "requested", "operator"),
                    (by_admin, "terminated", "requested", "operator"),
                    (expired, "terminating", "expired", "nwc"),
                    (expired, "terminated", "expired", "nwc")]
    live = [e for e in seen if e["weave"]["state"] in ("provisioning", "active")]
    assert len(live) == 6 and all(e["weave"]["ended_by"] is None for e in live)
    assert all("detail" in e for e in seen) and all(e["detail"] is None for e in live)
    text = json.dumps(seen)
    assert "tk-" not in text and "admin" not in text  # no token, no operator's name
    # The API tells the other party the same.
    for weave_id, by in ((by_acme, "acme"), (by_admin, "operator"), (expired, "nwc")):
        assert h.request("GET", f"/v1/weaves/{weave_id}", "globex").json()["ended_by"] == by


def test_stream_limits_hold_when_streams_open_at_once() -> None:
    # The handler reserves the slot: reserving is the check, so no two opens can both pass
    # a check made before either subscribed.
    async def scenario() -> tuple[list[bool], list[bool], int]:
        hub = EventHub()
        acme = [hub.reserve("acme", max_streams=6, max_per_principal=4) is not None
                for _ in range(6)]
        others = [hub.reserve(t, max_streams=6, max_per_principal=4) is not None
                  for t in ("globex", "globex", "initech")]
        return acme, others, hub.count()

    acme, others, open_streams = asyncio.run(scenario())
    assert acme == [True] * 4 + [False] * 2
    assert others == [True, True, False]  # the global cap: 6
    assert open_streams == 6


def test_a_stream_that_never_starts_gives_its_slot_back(harness: Harness) -> None:
    async def scenario() -> int:
        hub = harness.api.hub
        sub = hub.reserve("acme", max_per_principal=1)
        assert sub is not None

        async def gone(message: Any) -> None:
            raise OSError("the client went away")

        async def never() -> Any:
            return {"type": "http.disconnect"}

        response = EventStreamResponse(stream(hub, sub, ready={}), lambda: hub.unsubscribe(sub))
        with pytest.raises((OSError, ClientDisconnect)):  # as the Starlette version has it
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, never, gone)
        return hub.count_for("acme")

    assert asyncio.run(scenario()) == 0


def test_a_revoked_tokens_open_stream_is_closed(harness: Harness) -> None:
    store = TokenStore(harness.state_dir)
    acme_token = next(r.token_id for r in store.records() if r.principal == "acme")
    with harness.client.stream("GET", "/v1/events", headers=harness.auth("acme"),
                               params={"max_events": 2}) as r:
        lines = r.iter_lines()
        assert read_events(lines, 1)[0][0] == "ready"
        assert store.revoke(acme_token)
        harness.create(who="admin")  # a weave acme is party to: it must not hear of it
        events = read_events(lines, 2)
    assert [k for k, _ in events] == ["closing"]
    assert "no longer valid" in events[0][1]["detail"]
