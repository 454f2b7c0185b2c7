"""Who may do what: every endpoint, asked by the requester's tenant (acme), the target's
tenant (globex), a tenant not party to the weave (initech), the operator (admin), a token
NWC never issued, and nobody. The weave under test is acme-web -> globex-db (wv-000001)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from api_harness import Harness

pytestmark = pytest.mark.unit

WHO = ("acme", "globex", "initech", "admin", "bogus", None)
WEAVE = "/v1/weaves/wv-000001"

# endpoint -> expected status per caller, in WHO's order.
MATRIX: dict[str, tuple[int, ...]] = {
    "create": (201, 403, 403, 201, 401, 401),
    "list": (200, 200, 200, 200, 401, 401),
    "show": (200, 200, 404, 200, 401, 401),
    "stats": (200, 200, 404, 200, 401, 401),
    "extend": (200, 403, 404, 200, 401, 401),
    "delete": (200, 200, 404, 200, 401, 401),
    "ivns": (200, 200, 200, 200, 401, 401),
    "fabric": (200, 200, 200, 200, 401, 401),
    "health": (200, 200, 200, 200, 200, 200),
    "events": (200, 200, 200, 200, 401, 401),
    "metrics": (403, 403, 403, 200, 401, 401),
    "openapi": (200, 200, 200, 200, 200, 200),
}


def call(h: Harness, endpoint: str, who: str | None) -> int:
    if endpoint == "create":
        # A second weave from acme-web, to initech-app (leaf-spine has VMs of both).
        return int(h.create(who, target="initech-app", bandwidth_mbps=5).status_code)
    if endpoint == "events":
        with h.client.stream("GET", "/v1/events", headers=h.auth(who),
                             params={"max_events": 1}) as r:
            return int(r.status_code)
    method, path, body = {
        "list": ("GET", "/v1/weaves", None),
        "show": ("GET", WEAVE, None),
        "stats": ("GET", f"{WEAVE}/stats", None),
        "extend": ("POST", f"{WEAVE}/extend", {"duration_s": 60}),
        "delete": ("DELETE", WEAVE, None),
        "ivns": ("GET", "/v1/ivns", None),
        "fabric": ("GET", "/v1/fabric", None),
        "health": ("GET", "/v1/health", None),
        "metrics": ("GET", "/metrics", None),
        "openapi": ("GET", "/openapi.json", None),
    }[endpoint]
    return int(h.request(method, path, who, json=body).status_code)


@pytest.fixture
def woven(make_harness: Callable[..., Harness]) -> Harness:
    h = make_harness(topology="leaf-spine")
    assert h.create("acme", bandwidth_mbps=5).status_code == 201
    return h


@pytest.mark.parametrize("endpoint", sorted(MATRIX))
@pytest.mark.parametrize("who", WHO, ids=[str(w) for w in WHO])
def test_authorization_matrix(woven: Harness, endpoint: str, who: str | None) -> None:
    expected = MATRIX[endpoint][WHO.index(who)]
    assert call(woven, endpoint, who) == expected


def test_another_tenants_weave_is_indistinguishable_from_a_missing_one(woven: Harness
                                                                         ) -> None:
    theirs = woven.request("GET", WEAVE, "initech").json()
    missing = woven.request("GET", "/v1/weaves/wv-000404", "initech").json()
    assert theirs["error"] == missing["error"] == "unknown_weave"
    assert theirs["detail"].replace("wv-000001", "X") == missing["detail"].replace(
        "wv-000404", "X")


def test_lists_hold_only_the_weaves_a_tenant_is_party_to(woven: Harness) -> None:
    def ids(who: str) -> list[str]:
        return [w["id"] for w in woven.request("GET", "/v1/weaves", who).json()["weaves"]]

    assert ids("acme") == ids("globex") == ids("admin") == ["wv-000001"]
    assert ids("initech") == []


def test_a_tenant_cannot_create_from_another_tenants_ivn(woven: Harness) -> None:
    r = woven.create("globex", requester="acme-web", target="initech-app", bandwidth_mbps=5)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert woven.request("GET", "/v1/weaves", "admin").json()["count"] == 1  # nothing made


def test_only_the_requester_side_may_extend_but_either_may_terminate(woven: Harness) -> None:
    r = woven.request("POST", f"{WEAVE}/extend", "globex", json={"duration_s": 60})
    assert r.status_code == 403 and "requester" in r.json()["detail"]
    r = woven.request("DELETE", WEAVE, "globex")
    assert r.status_code == 200 and r.json()["state"] == "terminated"


def test_a_revoked_token_is_refused_at_once(woven: Harness) -> None:
    from nwc.auth import TokenStore

    store = TokenStore(woven.state_dir)
    record = next(r for r in store.records() if r.principal == "acme")
    assert woven.request("GET", "/v1/weaves", "acme").status_code == 200
    assert store.revoke(record.token_id)
    assert woven.request("GET", "/v1/weaves", "acme").status_code == 401


def test_tokens_never_appear_in_answers_or_the_audit_log(woven: Harness) -> None:
    woven.request("GET", "/v1/weaves", "acme")
    woven.request("GET", "/v1/weaves", "bogus")
    log = (woven.state_dir / "audit.jsonl").read_text()
    tokens_file = (woven.state_dir / "tokens").read_text()
    for token in woven.tokens.values():
        assert token not in log and token not in tokens_file
    assert "x" * 43 not in log  # nor a token someone tried


def without_request_id(r: object) -> dict:
    body = dict(r.json())  # type: ignore[attr-defined]
    body.pop("request_id")
    return body


@pytest.mark.parametrize(("hidden", "missing", "role"), [
    ({"target": "globex-lab"}, {"target": "nosuch"}, "target"),  # weaves with nobody
    ({"requester": "globex-lab"}, {"requester": "nosuch"}, "requester"),
])
def test_an_ivn_the_tenant_may_not_see_is_answered_as_one_that_does_not_exist(
        woven: Harness, hidden: dict, missing: dict, role: str) -> None:
    seen = {i["name"] for i in woven.request("GET", "/v1/ivns", "acme").json()["ivns"]}
    assert "globex-lab" not in seen
    r_hidden = woven.create("acme", **hidden)
    r_missing = woven.create("acme", **missing)
    assert r_hidden.status_code == r_missing.status_code == 404
    body = without_request_id(r_hidden)
    assert body == {"error": "unknown_ivn",
                    "detail": f"{role} IVN 'globex-lab' does not exist"}
    assert body["detail"].replace("globex-lab", "nosuch") == without_request_id(r_missing)[
        "detail"]
    assert set(r_hidden.headers) == set(r_missing.headers)


def test_the_audit_keeps_the_true_reason_of_an_answer_given_as_unknown(woven: Harness
                                                                      ) -> None:
    target = woven.create("acme", target="globex-lab").json()["request_id"]
    requester = woven.create("acme", requester="globex-lab").json()["request_id"]
    records = {a.get("request_id"): a for a in woven.audit()}
    assert records[target]["reason"] == "policy_violation"
    assert "globex-lab" in records[target]["detail"]
    assert records[target]["tenant_told"] == "unknown_ivn"
    assert records[requester]["reason"] == "forbidden"
    assert "tenant globex's, which tenant acme may not see" in records[requester]["detail"]
    assert records[requester]["tenant_told"] == "unknown_ivn"
    # The operator is told the truth as well.
    r = woven.create("admin", target="globex-lab")
    assert r.status_code == 403 and r.json()["error"] == "policy_violation"


def test_refusals_about_visible_ivns_stay_precise(woven: Harness) -> None:
    # globex-db is acme's partner: its caps refuse, and acme learns which rule did.
    r = woven.create("acme", target="globex-db", bandwidth_mbps=22)  # 2 legs: 44 > 40
    assert r.status_code == 403 and r.json()["error"] == "policy_violation"
    assert (r.json()["side"], r.json()["rule"]) == ("target", "bandwidth")
    assert "globex-db" in r.json()["detail"]
    # acme-web is visible to globex (its partner): using it is forbidden, not unknown.
    r = woven.create("globex", requester="acme-web", target="globex-db")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # globex-db is no partner of any of initech's IVNs: to initech it does not exist.
    r = woven.create("initech", requester="globex-db", target="initech-app")
    assert r.status_code == 404 and r.json()["detail"] == \
        "requester IVN 'globex-db' does not exist"


def test_a_tenants_event_stream_reads_a_hidden_ivn_as_unknown(woven: Harness) -> None:
    hub = woven.api.hub

    async def heard(tenant: str | None, target: str) -> dict:
        sub = hub.subscribe(tenant)
        try:
            await asyncio.to_thread(woven.create, "acme", target=target)
            return (await asyncio.wait_for(sub.queue.get(), timeout=5))[1]
        finally:
            hub.unsubscribe(sub)

    def strip(event: dict) -> dict:
        return {k: v for k, v in event.items() if k not in ("ts", "request_id", "target",
                                                            "detail")}

    hidden = asyncio.run(heard("acme", "globex-lab"))
    missing = asyncio.run(heard("acme", "nosuch"))
    assert hidden["type"] == "weave.denied" and hidden["error"] == "unknown_ivn"
    assert hidden["detail"] == "target IVN 'globex-lab' does not exist"
    assert strip(hidden) == strip(missing)
    operator = asyncio.run(heard(None, "globex-lab"))
    assert operator["error"] == "policy_violation" and "tenant_view" not in operator


def test_probes_with_a_hidden_requester_are_audited_as_missing_ones_are(
        make_harness: Callable[..., Harness]) -> None:
    """Found in review: naming another tenant's hidden IVN as requester was answered by the
    API itself, an ordinary 404 charged to the tenant's refusal budget, while a missing one
    went through the weaver, which always writes its record: five probes of each left two
    records against five (a gap in the audit, and a durable write or none to time)."""
    from nwc.api import ApiSettings

    h = make_harness(topology="leaf-spine",
                     settings=ApiSettings(audit_refusals_per_s=0.001, audit_refusals_burst=2))
    events: list[dict] = []
    h.controller.call(h.controller.weaver.subscribe, events.append)
    ids: dict[str, list[str]] = {}
    for requester in ("globex-lab", "nosuch"):
        answers = [h.create("acme", requester=requester, target="acme-db") for _ in range(5)]
        assert {r.status_code for r in answers} == {404}
        ids[requester] = [r.json()["request_id"] for r in answers]
    records = {r.get("request_id"): r for r in h.audit()}
    for requester, reason in (("globex-lab", "forbidden"), ("nosuch", "unknown_ivn")):
        mine = [records.get(i) for i in ids[requester]]
        assert all(r is not None for r in mine), requester
        assert {(r["action"], r["outcome"], r["reason"], r.get("via")) for r in mine} == \
            {("weave.create", "denied", reason, None)}
    assert h.metric("nwc_audit_records_suppressed_total") == 0
    # Neither is any tenant's to hear of: operators' streams only, like a missing IVN's.
    denied = [e for e in events if e["type"] == "weave.denied"]
    assert len(denied) == 10 and all(h.api.hub._audience(e) == frozenset() for e in denied)


def test_an_operators_refusal_reads_a_hidden_ivn_as_missing_in_the_tenants_stream(
        woven: Harness) -> None:
    """Found in review: the tenant view was built only for a tenant asking, but an
    operator's refusal goes to the requester IVN's tenant too: acme's stream read
    policy_violation naming globex-lab and its tenant, for admin's acme-web -> globex-lab."""
    hub = woven.api.hub

    async def heard(tenant: str | None, target: str) -> tuple[int, dict]:
        sub = hub.subscribe(tenant)
        try:
            r = await asyncio.to_thread(woven.create, "admin", target=target)
            return r.status_code, (await asyncio.wait_for(sub.queue.get(), timeout=5))[1]
        finally:
            hub.unsubscribe(sub)

    def strip(event: dict) -> dict:
        return {k: v for k, v in event.items() if k not in ("ts", "request_id", "target",
                                                            "detail")}

    status, hidden = asyncio.run(heard("acme", "globex-lab"))
    assert status == 403  # the operator's own answer stays precise
    _, missing = asyncio.run(heard("acme", "nosuch"))
    assert hidden["type"] == "weave.denied" and hidden["error"] == "unknown_ivn"
    assert hidden["detail"] == "target IVN 'globex-lab' does not exist"
    assert "globex" not in json.dumps({k: v for k, v in hidden.items() if k != "target"}) \
        .replace("globex-lab", "")
    assert strip(hidden) == strip(missing)
    _, operator = asyncio.run(heard(None, "globex-lab"))
    assert operator["error"] == "policy_violation" and "globex-lab" in operator["detail"]
    assert "tenant_view" not in operator and "audience" not in operator
