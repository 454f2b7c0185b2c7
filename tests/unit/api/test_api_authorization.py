"""Who may do what: every endpoint, asked by the requester's tenant (acme), the target's
tenant (globex), a tenant not party to the weave (initech), the operator (admin), a token
NWC never issued, and nobody. The weave under test is acme-web -> globex-db (wv-000001)."""

from __future__ import annotations

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
