"""A weave's whole life through the API (create, build, measure, extend, expire; another one
deleted), checked in /metrics and in the audit log at every step."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from api_harness import Harness, ManualPart, TeardownPart
from db_faults import CommitFails
from loop_control import held

from nwc.audit import verify_chain

pytestmark = pytest.mark.unit


class Recorder:
    """Makes requests through the harness and remembers each one's request id."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.ids: list[str] = []

    def __call__(self, method: str, path: str, who: str | None = "acme", **kw: Any) -> Any:
        r = self.h.request(method, path, who, **kw)
        self.ids.append(r.headers["X-Request-ID"])
        return r


def test_metrics_and_audit_over_a_weaves_life(make_harness: Callable[..., Harness]) -> None:
    part = ManualPart()
    h = make_harness(parts=(part,))
    req = Recorder(h)
    body = {"requester": "acme-web", "target": "globex-db", "duration_s": 600,
            "bandwidth_mbps": 20}

    # Admitted: reserved at once, provisioning until the data plane reports.
    created = req("POST", "/v1/weaves", json=body)
    wid, create_id = created.json()["id"], created.headers["X-Request-ID"]
    assert created.json()["state"] == "provisioning"
    assert h.metric("nwc_weaves", state="provisioning") == 1
    assert h.metric("nwc_admissions_total", action="create") == 1
    assert h.metric("nwc_admission_latency_seconds_count", action="create") == 1
    assert h.metric("nwc_link_reserved_mbps", link="s1-s2") == 20
    assert h.metric("nwc_link_capacity_mbps", link="s1-s2") == 60
    assert h.metric("nwc_link_reservable_mbps", link="s1-s2") == 30

    # Built two seconds later (on the controller's clock).
    h.clock.advance(2)
    part.report_ready(wid)
    assert h.metric("nwc_weaves", state="active") == 1
    assert h.metric("nwc_weaves", state="provisioning") == 0
    assert h.metric("nwc_provisioning_latency_seconds_count", outcome="active") == 1
    assert h.metric("nwc_provisioning_latency_seconds_sum", outcome="active") == 2.0

    # The data plane measures it (keys as docs/design.md names them).
    h.stats[wid] = {"bytes_requester_to_target": 10_000, "bytes_target_to_requester": 4_000,
                    "packets_requester_to_target": 10, "packets_target_to_requester": 4,
                    "meter_dropped_bytes_requester_to_target": 1_500,
                    "meter_dropped_bytes_target_to_requester": 0,
                    "sa_state": "established", "rekeys": 3}
    assert req("GET", f"/v1/weaves/{wid}/stats").json()["measured"]["rekeys"] == 3
    assert h.metric("nwc_weave_bytes_total", weave=wid, direction="requester_to_target") \
        == 10_000
    assert h.metric("nwc_weave_packets_total", weave=wid, direction="target_to_requester") == 4
    assert h.metric("nwc_weave_meter_dropped_bytes_total", weave=wid,
                    direction="requester_to_target") == 1_500
    assert h.metric("nwc_ike_sa_state", weave=wid, state="established") == 1
    assert h.metric("nwc_ike_rekeys_total", weave=wid) == 3
    assert h.metric("nwc_weave_info", weave=wid, requester="acme-web", profile="gold") == 1

    # Refused, then extended.
    denied = req("POST", "/v1/weaves", json={**body, "bandwidth_mbps": 50})
    assert denied.status_code == 403
    assert h.metric("nwc_denials_total", action="create", reason="policy_violation") == 1
    extended = req("POST", f"/v1/weaves/{wid}/extend", json={"duration_s": 300})
    assert extended.status_code == 200
    assert h.metric("nwc_admissions_total", action="extend") == 1

    # Someone without a token.
    assert req("GET", "/v1/weaves", None).status_code == 401
    assert h.metric("nwc_auth_failures_total", reason="missing") == 1
    assert h.metric("nwc_security_events_total", kind="auth_failure") == 1

    # The lease runs out (600 + 300 s after creation, 2 s of which passed above): released,
    # and its per-weave series are gone.
    h.tick(897)
    assert h.metric("nwc_weaves", state="active") == 1
    h.tick(1)
    assert h.metric("nwc_weaves", state="terminated") == 1
    assert h.metric("nwc_weaves", state="active") == 0
    assert h.metric("nwc_weave_transitions_total", state="terminated", reason="expired") == 1
    assert h.metric("nwc_link_reserved_mbps", link="s1-s2") == 0
    assert h.metric("nwc_weave_bytes_total", weave=wid, direction="requester_to_target") \
        is None
    assert part.down == [wid]

    # A second weave, ended on request by the other party.
    second = req("POST", "/v1/weaves", json=body).json()["id"]
    part.report_ready(second)
    deleted = req("DELETE", f"/v1/weaves/{second}", "globex")
    assert deleted.json()["state"] == "terminated"
    assert h.metric("nwc_weaves", state="terminated") == 2
    assert h.metric("nwc_weave_transitions_total", state="terminated", reason="requested") == 1

    # -- the audit log ------------------------------------------------------------------
    records = h.audit()
    assert verify_chain(records) == []
    by_request: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "request_id" in record:
            by_request.setdefault(record["request_id"], []).append(record)
    # One record per request, whether the weaver decided it or the API answered it...
    for request_id in req.ids:
        assert len(by_request.get(request_id, [])) == 1, request_id
    # ...and successful /metrics scrapes (Prometheus' polling) are not among them.
    assert not any(r["action"] == "metrics.scrape" for r in records)

    def one(request_id: str) -> dict[str, Any]:
        return by_request[request_id][0]

    create = one(create_id)
    assert (create["action"], create["outcome"], create["tenant"]) == \
        ("weave.create", "admitted", "acme")
    assert create["actor"].startswith("acme/tk-") and "via" not in create  # weaver's record
    refusal = one(denied.headers["X-Request-ID"])
    assert (refusal["outcome"], refusal["reason"]) == ("denied", "policy_violation")
    extension = one(extended.headers["X-Request-ID"])
    assert (extension["action"], extension["outcome"]) == ("weave.extend", "extended")
    anonymous = one(req.ids[4])
    assert (anonymous["actor"], anonymous["outcome"], anonymous["status"]) == \
        ("anonymous", "unauthenticated", 401)
    termination = one(deleted.headers["X-Request-ID"])
    assert (termination["action"], termination["outcome"], termination["tenant"]) == \
        ("weave.terminate", "released", "globex")
    stats_read = one(req.ids[1])
    assert (stats_read["action"], stats_read["outcome"], stats_read["via"]) == \
        ("weave.stats", "ok", "api")

    # State changes nobody requested are recorded too, by the controller itself.
    system = [(r["action"], r["outcome"], r.get("weave_id")) for r in records
              if r["actor"] == "nwc"]
    assert system == [("weave.state", "active", wid), ("weave.expire", "expired", wid),
                      ("weave.state", "active", second)]


def test_a_flood_of_refusals_is_counted_not_written(make_harness: Callable[..., Harness]
                                                    ) -> None:
    from nwc.api import ApiSettings

    h = make_harness(settings=ApiSettings(audit_refusals_per_s=1.0, audit_refusals_burst=3))
    for _ in range(10):
        assert h.request("GET", "/v1/weaves", "bogus").status_code == 401
    refusals = [r for r in h.audit() if r.get("outcome") == "unauthenticated"]
    assert len(refusals) == 3
    assert h.metric("nwc_audit_records_suppressed_total") == 7
    h.clock.advance(1.0)  # the budget refills: the next record says what was left out
    h.request("GET", "/v1/weaves", "bogus")
    last = h.audit()[-1]
    assert last["outcome"] == "unauthenticated" and last["suppressed_before"] == 7
    assert verify_chain(h.audit()) == []


def test_delete_answers_terminating_until_the_data_plane_confirms(
        make_harness: Callable[..., Harness]) -> None:
    part = TeardownPart()
    h = make_harness(parts=(part,))
    wid = h.create().json()["id"]
    part.report_ready(wid)
    deleted = h.request("DELETE", f"/v1/weaves/{wid}", "globex")
    assert deleted.status_code == 200 and deleted.json()["state"] == "terminating"
    assert deleted.json()["reason"] == "requested"
    assert h.request("GET", f"/v1/weaves/{wid}").json()["state"] == "terminating"
    # Released at once: the fabric shows nothing reserved while the data plane tears down.
    assert h.metric("nwc_link_reserved_mbps", link="s1-s2") == 0
    assert h.metric("nwc_weaves", state="terminating") == 1
    listed = h.request("GET", "/v1/weaves", params={"state": "terminating"}).json()
    assert [w["id"] for w in listed["weaves"]] == [wid]
    # A second DELETE with ?wait=true blocks until the part confirms, then says terminated.
    later = threading.Timer(0.3, part.report_down, args=(wid,))
    later.start()
    try:
        waited = h.request("DELETE", f"/v1/weaves/{wid}", params={"wait": "true",
                                                                  "wait_timeout_s": "20"})
    finally:
        later.join()
    assert waited.status_code == 200 and waited.json()["state"] == "terminated"
    assert h.metric("nwc_weaves", state="terminated") == 1
    outcomes = [(r["action"], r["outcome"]) for r in h.audit() if r.get("weave_id") == wid]
    released = outcomes.index(("weave.terminate", "released"))
    assert ("weave.state", "terminated") in outcomes[released + 1:]


def test_concurrent_creates_share_one_commit_and_decide_in_order(
        make_harness: Callable[..., Harness]) -> None:
    """Requests that reach the weaver together are admitted as one group commit, decided one
    after the other as if alone: the first of a pair is admitted, the rest are told the pair
    is already woven, and every decision is in the audit chain."""
    h = make_harness()
    statements: list[str] = []
    h.controller.store.db.set_trace_callback(statements.append)
    answers: list[Any] = []
    threads = [threading.Thread(target=lambda: answers.append(h.create())) for _ in range(6)]
    with held(h.controller.loop) as queue:  # the loop is busy while the requests arrive
        for thread in threads:
            thread.start()
        queue.wait_queued(6)
        statements.clear()
    for thread in threads:
        thread.join(10)
    assert sorted(a.status_code for a in answers) == [201] + [409] * 5
    assert {a.json()["error"] for a in answers if a.status_code == 409} == {"cidr_overlap"}
    assert statements.count("COMMIT") == 1
    records = h.audit()
    assert verify_chain(records) == []
    assert [r["outcome"] for r in records if r["action"] == "weave.create"] == \
        ["admitted"] + ["denied"] * 5


def test_a_create_whose_commit_fails_is_a_500_the_api_records(
        make_harness: Callable[..., Harness]) -> None:
    """Found in review: the weaver's decision record is rolled back with the commit, so the
    API must write the request's record itself, as it does for every other failure."""
    h = make_harness(raise_server_exceptions=False)
    store = h.controller.store
    real_db = store.db
    store.db = CommitFails(real_db, times=1)  # type: ignore[assignment]
    try:
        r = h.create()
    finally:
        store.db = real_db
    assert r.status_code == 500
    assert h.controller.call(lambda: list(h.controller.weaver.live)) == []
    records = h.audit()
    assert [(x.get("via"), x.get("status"), x.get("path")) for x in records] == \
        [("api", 500, "/v1/weaves")]
    assert h.create().status_code == 201  # and the next one is admitted
    assert verify_chain(h.audit()) == []


def test_a_bogus_token_flood_leaves_a_tenants_refusals_on_record(
        make_harness: Callable[..., Harness]) -> None:
    from nwc.api import ApiSettings

    h = make_harness(settings=ApiSettings(audit_refusals_per_s=1.0, audit_refusals_burst=3))
    for _ in range(10):  # uses up the unauthenticated budget
        assert h.request("GET", "/v1/weaves", "bogus").status_code == 401
    for _ in range(2):
        assert h.request("GET", "/v1/weaves/wv-999999", "acme").status_code == 404
    assert len([r for r in h.audit() if r.get("tenant") == "acme"
                and r.get("outcome") == "not_found"]) == 2


def test_a_tenants_forbidden_requests_are_always_recorded(
        make_harness: Callable[..., Harness]) -> None:
    from nwc.api import ApiSettings

    h = make_harness(settings=ApiSettings(audit_refusals_per_s=1.0, audit_refusals_burst=1))
    for _ in range(5):  # globex's IVN: acme may not ask from it
        assert h.create(requester="globex-db", target="acme-web").status_code == 403
    forbidden = [r for r in h.audit() if r.get("tenant") == "acme"
                 and r.get("reason") == "forbidden"]
    assert len(forbidden) == 5


def test_each_hosts_agent_and_ovsdb_are_metrics(make_harness: Callable[..., Harness]) -> None:
    """nwc_host_agent_up for alerting on a dead agent; an agent behind an OVSDB that cannot
    be read is not known, so not exported (nwc_host_ovsdb_up says why)."""
    from nwc.hostwatch import HostHealth

    h = make_harness()
    assert h.metric("nwc_host_agent_up", host="h1") is None  # no tunnel part: no hosts
    health = {"h1": HostHealth(True, False), "h2": HostHealth(True, True),
              "h3": HostHealth(False, None)}
    h.controller.host_sources.append(lambda: dict(health))
    assert h.metric("nwc_host_agent_up", host="h1") == 0
    assert h.metric("nwc_host_agent_up", host="h2") == 1
    assert h.metric("nwc_host_agent_up", host="h3") is None
    assert [h.metric("nwc_host_ovsdb_up", host=n) for n in ("h1", "h2", "h3")] == [1, 1, 0]


def test_a_hosts_agent_change_is_an_event_for_operators_only(
        make_harness: Callable[..., Harness]) -> None:
    from nwc.events import EventHub
    from nwc.tunnels import WeaverReports

    h = make_harness()
    events: list[dict[str, Any]] = []
    h.controller.call(h.controller.weaver.subscribe, events.append)
    WeaverReports(h.controller).host("h1", "agent", False, "its heartbeat stopped")
    h.controller.call(lambda: None)  # the posted report has been handled
    (event,) = events
    assert {k: v for k, v in event.items() if k != "ts"} == {
        "type": "host.agent", "host": "h1", "up": False, "detail": "its heartbeat stopped"}
    hub = EventHub()
    hub.attach(h.controller.weaver)
    assert hub._audience(event) == frozenset()  # no tenant: admins only


class _Unconvertible(int):
    """A measurement a part got wrong in a way nobody foresaw."""

    def __float__(self) -> float:
        raise ValueError("not a sample")


def test_one_unexportable_measurement_never_fails_the_scrape(
        make_harness: Callable[..., Harness]) -> None:
    """Found by a security test: one host's agent reported a 400-digit rekey count, and
    /metrics answered 500 (float() overflowed) for as long as the weave lived, for every
    weave. The status parser bounds it now; the scrape must not depend on that."""
    h = make_harness(topology="leaf-spine")
    odd, broken = (h.create(target=t, bandwidth_mbps=5).json()["id"]
                   for t in ("globex-db", "initech-app"))
    h.stats[odd] = {"rekeys": int("9" * 400), "bytes_requester_to_target": 5}
    h.stats[broken] = {"bytes_requester_to_target": _Unconvertible(7)}
    assert h.request("GET", "/metrics", "admin").status_code == 200
    assert h.metric("nwc_ike_rekeys_total", weave=odd) is None  # that sample only
    assert h.metric("nwc_weave_bytes_total", weave=odd, direction="requester_to_target") == 5
    assert h.metric("nwc_weave_bytes_total", weave=broken,
                    direction="requester_to_target") is None
    assert h.metric("nwc_weave_info", weave=broken) == 1
    assert h.metric("nwc_weaver_responsive") == 1
