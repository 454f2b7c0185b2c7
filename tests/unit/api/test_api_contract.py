"""The REST contract, endpoint by endpoint and error by error (docs/api.md)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from api_harness import EagerPart, Harness, ManualPart

from nwc.api import ApiSettings
from nwc.auth import TokenStore
from nwc.lease import parse_iso
from nwc.ofapp import SwitchConnection

pytestmark = pytest.mark.unit

MakeHarness = Callable[..., Harness]


def error_of(response: object) -> str:
    return response.json()["error"]  # type: ignore[attr-defined, no-any-return]


def s1_s2_reserved(h: Harness) -> float:
    links = h.request("GET", "/v1/fabric", "admin").json()["links"]
    return next(ln["reserved_mbps"] for ln in links if (ln["a"], ln["b"]) == ("s1", "s2"))


# -- POST /v1/weaves ------------------------------------------------------------------------

def test_create_answers_201_with_the_weave(harness: Harness) -> None:
    r = harness.create(bandwidth_mbps=20)
    assert r.status_code == 201
    w = r.json()
    assert w["id"] == "wv-000001"
    assert w["state"] == "active"  # no data-plane part attached: active at once
    assert w["path"] == ["h1", "s1", "s2", "h2"]
    assert w["bandwidth_mbps"] == 20 and w["kbps"] == 20000
    assert w["security_profile"] == "gold"  # acme-web's first choice that globex-db allows
    created, expires = parse_iso(w["created_at"]), parse_iso(w["expires_at"])
    assert expires - created == timedelta(seconds=600)
    assert r.headers["Location"] == "/v1/weaves/wv-000001"
    assert r.headers["X-Request-ID"].startswith("req-")
    assert s1_s2_reserved(harness) == 20


def test_policy_violation_is_403_naming_side_and_rule(harness: Harness) -> None:
    r = harness.create(security_profile="silver")
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "policy_violation"
    assert body["side"] == "target" and body["rule"] == "profile"
    assert "globex-db" in body["detail"]
    assert body["request_id"] == r.headers["X-Request-ID"]


def test_over_the_per_weave_cap_is_a_policy_violation(harness: Harness) -> None:
    r = harness.create(bandwidth_mbps=50)
    assert r.status_code == 403 and r.json()["rule"] == "bandwidth"


def test_insufficient_bandwidth_is_409_naming_the_link(harness: Harness) -> None:
    r = harness.create(bandwidth_mbps=35)  # within both caps (40), over s1-s2's 30 reservable
    assert r.status_code == 409
    assert r.json()["error"] == "insufficient_bandwidth"
    assert r.json()["link"] == ["s1", "s2"]
    assert s1_s2_reserved(harness) == 0  # nothing half-reserved


def test_unknown_ivn_is_404(harness: Harness) -> None:
    r = harness.create(target="nowhere")
    assert r.status_code == 404 and error_of(r) == "unknown_ivn"


def test_weaving_the_same_pair_twice_is_a_cidr_overlap(harness: Harness) -> None:
    assert harness.create().status_code == 201
    r = harness.create()
    assert r.status_code == 409 and error_of(r) == "cidr_overlap"


def test_overlapping_prefixes_are_409_cidr_overlap(make_harness: MakeHarness) -> None:
    h = make_harness(topology="leaf-spine")
    r = h.create(target="initech-legacy", bandwidth_mbps=5)  # re-uses acme-web's addresses
    assert r.status_code == 409 and error_of(r) == "cidr_overlap"


def test_unknown_field_is_400_naming_it(harness: Harness) -> None:
    r = harness.create(colour="blue")
    assert r.status_code == 400
    assert error_of(r) == "unknown_field"
    assert {"field": "body.colour", "problem": "unknown field"} in r.json()["fields"]


def test_unknown_field_names_are_few_and_shown_only_as_names_in_the_answer_and_the_audit(
        harness: Harness) -> None:
    odd_name = "\u202e<script>" + "A" * 10_000
    r = harness.create(**{odd_name: 1, **{f"x{i}": 1 for i in range(50)}})
    assert r.status_code == 400 and error_of(r) == "unknown_field"
    fields = r.json()["fields"]
    assert len(fields) == 5
    assert [f["field"] for f in fields] == ["body.(name not shown)", "body.x0", "body.x1",
                                            "body.x2", "body.x3"]
    assert "and 46 more" in r.json()["detail"] and len(r.json()["detail"]) < 300
    assert "script" not in r.text and "\u202e" not in r.json()["detail"]
    record = next(a for a in harness.audit() if a.get("request_id") == r.json()["request_id"])
    assert record["detail"] == r.json()["detail"]


def test_unknown_query_parameter_is_400(harness: Harness) -> None:
    r = harness.create(params={"wiat": "true"})
    assert r.status_code == 400 and r.json()["fields"][0]["field"] == "query.wiat"


@pytest.mark.parametrize("name", ["\u202e<script>", "Requester", "a" * 33, "x-y", "é"])
def test_an_unknown_name_is_quoted_only_if_it_has_the_shape_of_a_field_name(
        harness: Harness, name: str) -> None:
    for r, prefix in ((harness.create(**{name: 1}), "body."),
                      (harness.create(params={name: "1"}), "query.")):
        assert r.status_code == 400 and error_of(r) == "unknown_field"
        assert r.json()["fields"] == [{"field": f"{prefix}(name not shown)",
                                       "problem": "unknown field"}]
        assert name not in r.text


def test_a_body_that_repeats_a_key_is_400_naming_it(harness: Harness) -> None:
    # json keeps the last of two equal keys: this would have been a weave of acme-web.
    raw = ('{"requester": "initech-app", "requester": "acme-web", "target": "globex-db", '
           '"duration_s": 600, "bandwidth_mbps": 1, "duration_s": 60}')
    r = harness.request("POST", "/v1/weaves", content=raw,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "duplicate_field"
    assert body["detail"] == "field(s) given more than once: requester, duration_s"
    assert body["fields"] == [
        {"field": "body.requester", "problem": "given more than once"},
        {"field": "body.duration_s", "problem": "given more than once"}]
    assert "initech-app" not in r.text and "acme-web" not in r.text
    assert body["request_id"] == r.headers["X-Request-ID"]
    assert harness.request("GET", "/v1/weaves").json()["count"] == 0
    record = next(a for a in harness.audit() if a.get("request_id") == body["request_id"])
    assert record["reason"] == "duplicate_field"


def test_a_repeated_key_inside_a_nested_object_is_refused_too(harness: Harness) -> None:
    raw = ('{"requester": "acme-web", "target": "globex-db", "duration_s": 600, '
           '"bandwidth_mbps": 1, "security_profile": {"a": 1, "a": 2}}')
    r = harness.request("POST", "/v1/weaves", content=raw,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r) == "duplicate_field"


@pytest.mark.parametrize("query", ["state=active&state=failed", "limit=5&limit=6",
                                   "limit=5&limit=5"])
def test_a_repeated_query_parameter_is_400_naming_it(harness: Harness, query: str) -> None:
    r = harness.request("GET", f"/v1/weaves?{query}")
    assert r.status_code == 400
    name = query.split("=")[0]
    assert r.json()["error"] == "duplicate_field"
    assert r.json()["fields"] == [{"field": f"query.{name}", "problem": "given more than once"}]
    assert r.json()["detail"] == f"query parameter(s) given more than once: {name}"


def test_each_query_parameter_once_is_still_fine(harness: Harness) -> None:
    r = harness.request("GET", "/v1/weaves?state=active&limit=5")
    assert r.status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"'])
def test_a_body_that_is_not_a_json_object_is_400(harness: Harness, raw: bytes) -> None:
    r = harness.request("POST", "/v1/weaves", content=raw,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r) == "malformed_request"


@pytest.mark.parametrize(("field", "value"), [
    ("duration_s", "600"),  # a string, not a number
    ("duration_s", 0),
    ("duration_s", 1.5),
    ("bandwidth_mbps", -1),
    ("bandwidth_mbps", True),
    ("requester", "Acme Web"),
    ("security_profile", 7),
])
def test_wrong_values_are_422_field_by_field(harness: Harness, field: str, value: object
                                             ) -> None:
    r = harness.create(**{field: value})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_request"
    assert [f["field"] for f in body["fields"]] == [f"body.{field}"]


def test_invalid_input_is_not_echoed_back(harness: Harness) -> None:
    r = harness.create(requester="<script>alert(1)</script>")
    assert r.status_code == 422 and "<script>" not in r.text


def test_missing_fields_are_422(harness: Harness) -> None:
    r = harness.request("POST", "/v1/weaves", json={"requester": "acme-web"})
    assert r.status_code == 422
    assert {f["field"] for f in r.json()["fields"]} == {
        "body.target", "body.duration_s", "body.bandwidth_mbps"}


def test_semantically_invalid_requests_are_422(harness: Harness) -> None:
    r = harness.create(target="acme-web")
    assert r.status_code == 422 and "itself" in r.json()["detail"]
    r = harness.create(security_profile="platinum")
    assert r.status_code == 422 and "platinum" in r.json()["detail"]


def test_a_body_over_the_limit_is_413(make_harness: MakeHarness) -> None:
    h = make_harness(settings=ApiSettings(max_body_bytes=256))
    r = h.create(requester="acme-web", padding="x" * 300)
    assert r.status_code == 413 and error_of(r) == "body_too_large"


def test_a_chunked_body_over_the_limit_is_413(make_harness: MakeHarness) -> None:
    h = make_harness(settings=ApiSettings(max_body_bytes=256))

    def chunks() -> object:
        for _ in range(10):
            yield b'{"requester": "' + b"a" * 40

    r = h.request("POST", "/v1/weaves", content=chunks(),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_body_that_is_not_json_is_415(harness: Harness) -> None:
    r = harness.request("POST", "/v1/weaves", content=b"requester=acme-web",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and error_of(r) == "unsupported_media_type"


def test_live_weave_quota_is_429(make_harness: MakeHarness) -> None:
    h = make_harness(topology="leaf-spine",
                     settings=ApiSettings(max_live_weaves_per_tenant=1))
    assert h.create(bandwidth_mbps=5).status_code == 201
    r = h.create(target="initech-app", bandwidth_mbps=5)
    assert r.status_code == 429 and error_of(r) == "quota_exceeded"
    # The quota counts live weaves: ending one makes room.
    assert h.request("DELETE", "/v1/weaves/wv-000001").status_code == 200
    assert h.create(target="initech-app", bandwidth_mbps=5).status_code == 201


def test_request_rate_is_429_until_the_bucket_refills(make_harness: MakeHarness) -> None:
    h = make_harness(settings=ApiSettings(rate_per_s=1.0, rate_burst=3))
    for _ in range(3):
        assert h.request("GET", "/v1/weaves").status_code == 200
    r = h.request("GET", "/v1/weaves")
    assert r.status_code == 429 and error_of(r) == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    assert h.request("GET", "/v1/weaves", "globex").status_code == 200  # per tenant
    second_acme_token = TokenStore(h.state_dir).issue("acme")[0]
    r = h.client.get("/v1/weaves", headers={"Authorization": f"Bearer {second_acme_token}"})
    assert r.status_code == 429  # another token of the same tenant shares its budget
    h.clock.advance(1.0)
    assert h.request("GET", "/v1/weaves").status_code == 200


def test_wait_true_blocks_until_active(make_harness: MakeHarness) -> None:
    h = make_harness(parts=(EagerPart(),))
    r = h.create(params={"wait": "true"})
    assert r.status_code == 201 and r.json()["state"] == "active"


def test_without_wait_creation_answers_at_once(make_harness: MakeHarness) -> None:
    part = ManualPart()
    h = make_harness(parts=(part,))
    r = h.create()
    assert r.status_code == 201 and r.json()["state"] == "provisioning"
    part.report_ready(r.json()["id"])
    assert h.request("GET", f"/v1/weaves/{r.json()['id']}").json()["state"] == "active"


def test_wait_true_returns_failed_with_the_reservation_released(make_harness: MakeHarness
                                                                ) -> None:
    h = make_harness(parts=(EagerPart(fail_with="charon refused the proposal"),))
    r = h.create(bandwidth_mbps=20, params={"wait": "true"})
    assert r.status_code == 201
    assert r.json()["state"] == "failed" and r.json()["reason"] == "provision_failed"
    assert s1_s2_reserved(h) == 0


def test_wait_is_bounded(make_harness: MakeHarness) -> None:
    h = make_harness(parts=(ManualPart(),), settings=ApiSettings(wait_timeout_s=0.05))
    r = h.create(params={"wait": "true"})
    assert r.status_code == 201 and r.json()["state"] == "provisioning"


def test_the_client_may_wait_less_than_the_server_would(make_harness: MakeHarness) -> None:
    h = make_harness(parts=(ManualPart(),))  # the server would hold it for 35 s
    r = h.create(params={"wait": "true", "wait_timeout_s": "0.05"})
    assert r.status_code == 201 and r.json()["state"] == "provisioning"
    r = h.create(params={"wait": "true", "wait_timeout_s": "0"})
    assert r.status_code == 422


def test_a_weave_no_host_builds_fails_after_the_provision_timeout(make_harness: MakeHarness
                                                                  ) -> None:
    part = ManualPart()
    h = make_harness(parts=(part,), provision_timeout_s=5)
    weave = h.create(bandwidth_mbps=20).json()
    assert weave["state"] == "provisioning" and part.up == [weave["id"]]
    h.tick(4)
    assert h.request("GET", f"/v1/weaves/{weave['id']}").json()["state"] == "provisioning"
    h.tick(2)
    failed = h.request("GET", f"/v1/weaves/{weave['id']}").json()
    assert failed["state"] == "failed" and failed["reason"] == "provision_timeout"
    # Which part it waited for is in the weave itself, not only in the log and the audit (a
    # deploy-guide tester's CLI said only "failed: provision_timeout").
    assert failed["end_detail"].startswith("not ready after 5 s: ")
    assert part.name in failed["end_detail"]
    assert s1_s2_reserved(h) == 0
    assert part.down == [weave["id"]]


# -- GET /v1/weaves, GET /v1/weaves/{id} -----------------------------------------------------

def test_list_newest_first_with_state_filter_and_limit(make_harness: MakeHarness) -> None:
    h = make_harness(topology="leaf-spine")
    h.create(bandwidth_mbps=5)
    h.create(target="initech-app", bandwidth_mbps=5)
    h.request("DELETE", "/v1/weaves/wv-000001")
    r = h.request("GET", "/v1/weaves")
    assert r.status_code == 200
    assert [w["id"] for w in r.json()["weaves"]] == ["wv-000002", "wv-000001"]
    assert r.json()["count"] == 2
    active = h.request("GET", "/v1/weaves", params={"state": "active"}).json()
    assert [w["id"] for w in active["weaves"]] == ["wv-000002"]
    assert h.request("GET", "/v1/weaves", params={"limit": 1}).json()["count"] == 1
    r = h.request("GET", "/v1/weaves", params={"state": "sleeping"})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "query.state"
    assert h.request("GET", "/v1/weaves", params={"limit": 0}).status_code == 422


def test_show_one_and_unknown_ids(harness: Harness) -> None:
    harness.create()
    r = harness.request("GET", "/v1/weaves/wv-000001")
    assert r.status_code == 200 and r.json()["target"] == "globex-db"
    for missing in ("wv-000999", "not-a-weave", "wv-1"):
        r = harness.request("GET", f"/v1/weaves/{missing}")
        assert r.status_code == 404 and error_of(r) == "unknown_weave"


@pytest.mark.parametrize("path", ["%E2%80%AE%3Cscript%3Ealert(1)", "wv-%D9%A1%D9%A2%D9%A3%D9%A4"
                                  "%D9%A5%D9%A6", "not-a-weave"])
@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("GET", "/stats"),
                                                ("DELETE", "")])
def test_an_unknown_weave_answer_quotes_only_a_weave_id(harness: Harness, method: str,
                                                        suffix: str, path: str) -> None:
    r = harness.request(method, f"/v1/weaves/{path}{suffix}")
    assert r.status_code == 404
    assert (r.json()["error"], r.json()["detail"]) == ("unknown_weave", "no weave has that id")
    r = harness.request(method, f"/v1/weaves/wv-000999{suffix}")
    assert r.json()["detail"] == "no weave wv-000999"


def test_show_with_wait_returns_once_the_weave_settles(make_harness: MakeHarness) -> None:
    part = ManualPart()
    h = make_harness(parts=(part,), settings=ApiSettings(wait_timeout_s=0.05))
    weave_id = h.create().json()["id"]
    # Not settled: the bounded wait answers with the weave as it is.
    assert h.request("GET", f"/v1/weaves/{weave_id}",
                     params={"wait": "true"}).json()["state"] == "provisioning"
    part.report_ready(weave_id)
    assert h.request("GET", f"/v1/weaves/{weave_id}",
                     params={"wait": "true"}).json()["state"] == "active"


# -- DELETE /v1/weaves/{id} -----------------------------------------------------------------

def test_delete_terminates_and_releases_everything(harness: Harness) -> None:
    harness.create(bandwidth_mbps=20)
    r = harness.request("DELETE", "/v1/weaves/wv-000001")
    assert r.status_code == 200
    assert r.json()["state"] == "terminated" and r.json()["reason"] == "requested"
    assert r.json()["ended_at"] is not None
    assert s1_s2_reserved(harness) == 0
    again = harness.request("DELETE", "/v1/weaves/wv-000001")  # idempotent
    assert again.status_code == 200 and again.json() == r.json()
    assert harness.request("DELETE", "/v1/weaves/wv-000404").status_code == 404
    # The bandwidth really is free again: the same weave fits once more.
    assert harness.create(bandwidth_mbps=20).status_code == 201


# -- POST /v1/weaves/{id}/extend ------------------------------------------------------------

def test_extend_moves_the_end_later(harness: Harness) -> None:
    w = harness.create(duration_s=600).json()
    r = harness.request("POST", f"/v1/weaves/{w['id']}/extend", json={"duration_s": 300})
    assert r.status_code == 200
    assert parse_iso(r.json()["expires_at"]) - parse_iso(w["expires_at"]) == \
        timedelta(seconds=300)


def test_extend_is_checked_against_both_policies_again(harness: Harness) -> None:
    w = harness.create(duration_s=600).json()
    # globex-db allows at most 3600 s: 600 + 3500 is too long.
    r = harness.request("POST", f"/v1/weaves/{w['id']}/extend", json={"duration_s": 3500})
    assert r.status_code == 403
    assert r.json()["error"] == "policy_violation" and r.json()["rule"] == "duration"
    assert harness.request("GET", f"/v1/weaves/{w['id']}").json()["expires_at"] == \
        w["expires_at"]  # unchanged


def test_extend_errors(harness: Harness) -> None:
    wid = harness.create().json()["id"]
    path = f"/v1/weaves/{wid}/extend"
    assert harness.request("POST", path, json={"duration_s": 0}).status_code == 422
    assert harness.request("POST", path, json={"duration_s": 60, "x": 1}).status_code == 400
    assert harness.request("POST", path, json={}).status_code == 422
    assert harness.request("POST", "/v1/weaves/wv-000404/extend",
                           json={"duration_s": 60}).status_code == 404
    harness.request("DELETE", f"/v1/weaves/{wid}")
    r = harness.request("POST", path, json={"duration_s": 60})
    assert r.status_code == 409 and error_of(r) == "weave_not_live"


# -- GET /v1/weaves/{id}/stats --------------------------------------------------------------

def test_stats_carry_what_the_data_plane_reports(harness: Harness) -> None:
    wid = harness.create().json()["id"]
    harness.stats[wid] = {"bytes_requester_to_target": 1500, "sa_state": "established",
                          "not_json": object()}
    harness.tick(100)
    r = harness.request("GET", f"/v1/weaves/{wid}/stats")
    assert r.status_code == 200
    body = r.json()
    assert body["measured"]["bytes_requester_to_target"] == 1500
    assert body["measured"]["sa_state"] == "established"
    assert isinstance(body["measured"]["not_json"], str)  # made safe, not a 500
    assert body["remaining_s"] == 500 and body["state"] == "active"
    harness.request("DELETE", f"/v1/weaves/{wid}")
    ended = harness.request("GET", f"/v1/weaves/{wid}/stats").json()
    assert ended["measured"] == {} and ended["remaining_s"] == 0
    assert harness.request("GET", "/v1/weaves/wv-000404/stats").status_code == 404


def test_stats_show_each_tunnel_leg_ends_values(harness: Harness) -> None:
    """The deepest documented measurement (a leg end's counters, docs/design.md) comes through
    as the part reported it; only what nests deeper than that is cut off."""
    wid = harness.create().json()["id"]
    end = {"phase": "installed", "ike_state": "ESTABLISHED", "child_state": "INSTALLED",
           "encryption": "AES_GCM_16", "key_bits": 256, "dh_group": "CURVE_25519",
           "bytes_in": 4200, "bytes_out": 3100, "rekeys": 2}
    harness.stats[wid] = {"sa_state": "established", "rekeys": 2, "tunnel_legs": [
        {"slot": 7, "device": "nwv7", "requester_host": "h1", "target_host": "h2",
         "auth": "psk", "installed": True, "rekeying": False,
         "ends": {"h1": dict(end), "h2": dict(end, bytes_in=3100, bytes_out=4200)}}],
        "deeper": [[[[[["level 6"]]]]]]}
    measured = harness.request("GET", f"/v1/weaves/{wid}/stats").json()["measured"]
    leg = measured["tunnel_legs"][0]
    assert leg["ends"]["h1"] == end
    assert leg["ends"]["h2"]["bytes_in"] == 3100 and leg["ends"]["h2"]["key_bits"] == 256
    assert leg["slot"] == 7 and leg["installed"] is True
    assert measured["deeper"] == [[[[[None]]]]]  # still bounded against a runaway part


# -- GET /v1/ivns, /v1/fabric, /v1/health ---------------------------------------------------

def test_ivns_show_own_networks_in_full_and_partners_by_name(harness: Harness) -> None:
    ivns = {i["name"]: i for i in harness.request("GET", "/v1/ivns").json()["ivns"]}
    assert ivns["acme-web"]["own"] and ivns["acme-web"]["cidrs"] == ["192.0.2.0/26"]
    assert ivns["acme-web"]["weaving"]["max_weave_mbps"] == 50
    assert "globex-db" in ivns["acme-web"]["can_weave_with"]
    assert ivns["globex-db"] == {"name": "globex-db", "tenant": "globex", "own": False,
                                 "can_weave_with": ["acme-web"]}
    assert "globex-lab" not in ivns  # it weaves with nobody
    admin = {i["name"]: i for i in harness.request("GET", "/v1/ivns", "admin").json()["ivns"]}
    assert set(admin) == {"acme-web", "globex-db", "globex-lab", "initech-app",
                          "initech-legacy"}
    assert all(i["own"] and "cidrs" in i for i in admin.values())


def test_fabric_shows_capacity_and_reservations(harness: Harness) -> None:
    harness.create(bandwidth_mbps=20)
    tenant_view = harness.request("GET", "/v1/fabric").json()
    link = next(ln for ln in tenant_view["links"] if (ln["a"], ln["b"]) == ("s1", "s2"))
    assert link == {"a": "s1", "b": "s2", "capacity_mbps": 60, "reservable_mbps": 30,
                    "reserved_mbps": 20, "free_mbps": 10, "up": True}
    assert tenant_view["topology"] == "small" and tenant_view["hosts"] == ["h1", "h2"]
    admin_view = harness.request("GET", "/v1/fabric", "admin").json()
    link = next(ln for ln in admin_view["links"] if (ln["a"], ln["b"]) == ("s1", "s2"))
    assert link["weaves"] == ["wv-000001"]


def test_fabric_shows_each_switchs_connection_why_to_admins_only(harness: Harness) -> None:
    assert "connections" not in harness.request("GET", "/v1/fabric", "admin").json()  # no OF
    harness.controller.switch_sources.append(lambda: {
        "s1": SwitchConnection("fabric", False, "not connected: refused for its certificate"),
        "h1": SwitchConnection("host", True, "connected")})
    admin = harness.request("GET", "/v1/fabric", "admin").json()["connections"]
    assert admin == [
        {"name": "h1", "kind": "host", "connected": True, "detail": "connected"},
        {"name": "s1", "kind": "fabric", "connected": False,
         "detail": "not connected: refused for its certificate"}]
    tenant = harness.request("GET", "/v1/fabric").json()["connections"]
    assert tenant == [{"name": "h1", "kind": "host", "connected": True},
                      {"name": "s1", "kind": "fabric", "connected": False}]


def test_health_needs_no_token_and_says_little(harness: Harness) -> None:
    r = harness.request("GET", "/v1/health", None)
    assert r.status_code == 200 and set(r.json()) == {"status", "version"}
    assert r.json()["status"] == "ok"


def test_health_is_503_when_the_weaver_does_not_answer(make_harness: MakeHarness) -> None:
    h = make_harness(settings=ApiSettings(health_timeout_s=0.05, call_timeout_s=0.05))
    h.controller.loop.stop()
    r = h.request("GET", "/v1/health", None)
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    r = h.create()
    assert r.status_code == 503 and error_of(r) == "busy"


# -- the rest of HTTP ------------------------------------------------------------------------

def test_wrong_method_is_405_listing_every_allowed_method(harness: Harness) -> None:
    r = harness.request("PUT", "/v1/weaves")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, POST"


def test_unknown_paths_need_a_token_then_answer_404(harness: Harness) -> None:
    assert harness.request("GET", "/v1/nothing", None).status_code == 401
    r = harness.request("GET", "/v1/nothing")
    assert r.status_code == 404 and error_of(r) == "not_found"


def test_an_internal_error_is_a_500_with_the_request_id(make_harness: MakeHarness) -> None:
    h = make_harness(raise_server_exceptions=False)
    wid = h.create().json()["id"]

    def broken(weave: object) -> dict[str, object]:
        raise RuntimeError("secret internals")

    h.controller.weave_stats = broken  # type: ignore[method-assign]
    r = h.request("GET", f"/v1/weaves/{wid}/stats")
    assert r.status_code == 500
    assert error_of(r) == "internal_error" and "secret" not in r.text
    # In the header too, as on every other answer (this one is sent outside the gate).
    assert r.headers["X-Request-ID"] == r.json()["request_id"]
    record = h.audit()[-1]
    assert record["outcome"] == "error" and record["action"] == "weave.stats"


def test_openapi_describes_the_v1_contract(harness: Harness) -> None:
    doc = harness.request("GET", "/openapi.json", None).json()
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    assert {"/v1/weaves", "/v1/weaves/{weave_id}", "/v1/weaves/{weave_id}/extend",
            "/v1/weaves/{weave_id}/stats", "/v1/ivns", "/v1/fabric", "/v1/health",
            "/v1/events", "/metrics"} == paths
    create = doc["paths"]["/v1/weaves"]["post"]
    assert {"201", "400", "401", "403", "404", "409", "413", "422", "429"} <= \
        set(create["responses"])
    assert "bearer" in str(doc["components"]["securitySchemes"]).lower()


def test_concurrent_requests_are_decided_one_at_a_time(make_harness: MakeHarness) -> None:
    """Eight threads ask for the same weave at once: the weaver's loop decides them
    in turn, so exactly one is admitted and the rest see it (cidr_overlap), and the ledger
    holds exactly one reservation."""
    h = make_harness()
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = sorted(pool.map(lambda _: h.create(bandwidth_mbps=20).status_code, range(8)))
    assert codes == [201] + [409] * 7
    assert s1_s2_reserved(h) == 20
