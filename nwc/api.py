"""The northbound REST API (FastAPI, served by uvicorn in `nwc run`).

Everything lives under `/v1` (OpenAPI 3 at `/openapi.json`), except Prometheus' `/metrics`.
Handlers never change state themselves: each decision runs as one function on the weaver's
loop (`controller.call`), so "may this tenant do this" and "do it" happen atomically, in
order with every other change. The full contract, with examples, is docs/api.md.

Who may do what (tenant = the tenant a bearer token was issued to; admin = operator token):

| | tenant | admin |
| --- | --- | --- |
| create | its own IVNs only (403 `forbidden`; 404 for an IVN it may not see) | any IVN |
| list, show, stats | weaves it is party to (requester or target); others answer 404 | all |
| delete (terminate) | either party: consent to a weave can be withdrawn by either side | all |
| extend | the requester's tenant (it holds the lease); the target may terminate instead | all |
| ivns | its own IVNs in full, plus the names of IVNs it may weave with | all |
| fabric | links, reservations (not whose), switches connected | weave ids, why not connected |
| events | events about its own weaves and requests | all, incl. security |
| /metrics | 403 | yes |
| health | no token needed | |

Every request gets an id (`X-Request-ID`, also in error bodies). Requests that reach the weaver
(create, extend, delete) are recorded by the weaver's own decision record, which carries the
request id; every other request gets one `api.request`-style record written here: reads,
refusals, authentication failures, malformed input. While refusals that never reach the weaver
arrive faster than a budget (a flood), their records are counted instead of written, and the
next record says how many were left out (`suppressed_before`), so a flood cannot turn the audit
log's fsyncs into a denial of service for real work. The budget is per principal, with one for
all unauthenticated requests; an authenticated 403 and any 5xx are always written.
"""


import argparse
import ipaddress
import json
import logging
import re
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from nwc import __version__
from nwc.admission import Denial, Reason, WeaveRequest, check_request
from nwc.auth import Principal, TokenStore
from nwc.controller import Controller
from nwc.events import EventHub, stream
from nwc.fabric import CapacityError
from nwc.lease import iso
from nwc.metrics import CONTENT_TYPE, Metrics, link_loads
from nwc.policy import MAX_LEASE_S, Policy
from nwc.weave import TRANSIENT_STATES, State, Weave

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
# Answered without a token: liveness probes and the API's own description.
PUBLIC_PATHS = frozenset({f"{API_PREFIX}/health", "/openapi.json"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# ASCII digits only: \d would also take other scripts' digits, and an answer quotes an id
# only when it has exactly this shape.
WEAVE_ID = re.compile(r"wv-[0-9]{6,12}")
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# The audit budget key of requests no valid token speaks for (principal names are tenants
# of the policy or "admin", neither of which can contain a space).
ANONYMOUS_BUDGET = "no valid token"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class ApiSettings:
    """Limits of the REST API. The defaults suit one controller with tens of tenants."""

    max_body_bytes: int = 16 * 1024
    max_live_weaves_per_tenant: int = 20  # weaves a tenant's IVNs requested, still live
    rate_per_s: float = 5.0  # requests per tenant (admins share one budget), sustained...
    rate_burst: int = 60  # ...and in a burst
    wait_timeout_s: float | None = None  # ?wait=true bound; None: provision timeout + 5 s
    max_waiters: int = 16  # requests blocked in ?wait=true at once; more answer at once
    max_event_streams: int = 32
    max_event_streams_per_principal: int = 4
    event_queue_size: int = 256
    keepalive_s: float = 15.0
    audit_refusals_per_s: float = 20.0  # request records for refusals, sustained...
    audit_refusals_burst: int = 200  # ...and in a burst (see the module docstring)
    call_timeout_s: float = 30.0  # longest wait for the weaver's loop before 503 busy
    health_timeout_s: float = 2.0  # /v1/health answers 503 when the loop is slower


# -- wire models ------------------------------------------------------------------------------

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="an IVN or profile name")]


class WeaveCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"requester": "acme-web", "target": "globex-db", "duration_s": 600,
         "bandwidth_mbps": 10},
        {"requester": "acme-web", "target": "initech-app", "duration_s": 3600,
         "bandwidth_mbps": 5, "security_profile": "silver"}]})

    requester: Name = Field(description="the caller's IVN")
    target: Name = Field(description="the partner IVN")
    duration_s: int = Field(strict=True, ge=1, le=MAX_LEASE_S, description="lease, seconds")
    bandwidth_mbps: float = Field(strict=True, ge=0.001, le=1_000_000, allow_inf_nan=False,
                                  description="reserved per host pair, each direction")
    security_profile: Name | None = Field(
        default=None, description="omit for the best profile both IVNs allow")


class WeaveExtend(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"duration_s": 300}]})

    duration_s: int = Field(strict=True, ge=1, le=MAX_LEASE_S,
                            description="seconds added to the lease's end")


class LegOut(BaseModel):
    requester_host: str
    target_host: str
    path: list[str]
    slot: int | None


class WeaveOut(BaseModel):
    id: str
    state: State
    reason: str | None = Field(description="why it ended (expired, requested, "
                                           "provision_timeout, ...)")
    requester: str
    target: str
    requester_tenant: str
    target_tenant: str
    path: list[str] = Field(description="the first leg's fabric path")
    legs: list[LegOut]
    bandwidth_mbps: float = Field(description="reserved per leg, each direction")
    kbps: int
    security_profile: str
    requester_prefixes: list[str]
    target_prefixes: list[str]
    created_at: str
    expires_at: str
    ended_at: str | None
    ended_by: str | None = Field(description="who ended it: a party's tenant name, "
                                             "`operator` or `nwc` (the controller)")
    end_detail: str | None = Field(default=None,
                                   description="once ended: why, in a sentence (e.g. which "
                                               "host a provision timeout waited for)")


class WeaveList(BaseModel):
    weaves: list[WeaveOut]
    count: int


class WeaveStatsOut(BaseModel):
    weave_id: str
    state: State
    bandwidth_mbps: float
    expires_at: str
    remaining_s: float
    measured: dict[str, Any] = Field(description="what the data plane reports: see "
                                                 "docs/design.md, per-weave measurements")


class IvnWeavingOut(BaseModel):
    partners: list[str]
    max_weave_mbps: float
    max_total_mbps: float
    max_duration_s: int
    profiles: list[str]
    qos_class: str


class IvnOut(BaseModel):
    name: str
    tenant: str
    own: bool = Field(description="false: another tenant's IVN you may weave with")
    can_weave_with: list[str]
    vni: int | None = None
    cidrs: list[str] | None = None
    gateway: str | None = None
    hosts: list[str] | None = None
    weaving: IvnWeavingOut | None = None


class IvnList(BaseModel):
    ivns: list[IvnOut]


class LinkOut(BaseModel):
    a: str
    b: str
    capacity_mbps: float
    reservable_mbps: float
    reserved_mbps: float
    free_mbps: float
    up: bool
    weaves: list[str] | None = Field(default=None, description="admins only")


class SwitchConnectionOut(BaseModel):
    name: str
    kind: Literal["host", "fabric"] = Field(description="a compute host's br-int, or a fabric "
                                            "switch")
    connected: bool = Field(description="its OpenFlow connection is up and resynced")
    detail: str | None = Field(default=None, description="admins only: the state, and why it "
                               "is not connected where known")


class FabricOut(BaseModel):
    topology: str
    switches: list[str]
    hosts: list[str]
    links: list[LinkOut]
    connections: list[SwitchConnectionOut] | None = Field(
        default=None, description="each switch's and host bridge's OpenFlow connection; "
        "absent when no OpenFlow part runs. A link's `up` is its last known port state: a "
        "switch that is not connected reports none")


def switch_connections(controller: Controller,
                       principal: Principal) -> list[dict[str, Any]] | None:
    """The switches' connections for the fabric view (None: no OpenFlow part, not known).
    Tenants see whether each is connected, as they see each link's state; why one is not
    (a refused certificate among the reasons) is for operators, like security events."""
    if not controller.switch_sources:
        return None
    merged: dict[str, Any] = {}
    for source in controller.switch_sources:  # reads under a lock held briefly: no loop call
        merged.update(source())
    return [{"name": name, "kind": c.kind, "connected": c.connected,
             "detail": c.detail if principal.is_admin else None}
            for name, c in sorted(merged.items())]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str


class FieldProblem(BaseModel):
    field: str
    problem: str


class ErrorOut(BaseModel):
    error: str = Field(description="machine-readable: policy_violation, "
                                   "insufficient_bandwidth, unknown_ivn, ...")
    detail: str
    request_id: str | None = None
    fields: list[FieldProblem] | None = None
    side: str | None = None
    rule: str | None = None
    link: list[str] | None = None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


# Any route may answer these: unknown query parameters, no or bad token, a body where none
# belongs (too large, not JSON), over the rate, the weaver's loop not answering in time.
AUTH_ERRORS = (400, 401, 413, 415, 429, 503)
BODY_ERRORS = (400, 413, 415, 422)


# -- errors -----------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, *,
                 fields: list[dict[str, str]] | None = None,
                 extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.fields, self.extra, self.headers = fields, extra or {}, headers


DENIAL_STATUS = {
    Reason.INVALID_REQUEST: 422,
    Reason.UNKNOWN_IVN: 404,
    Reason.POLICY_VIOLATION: 403,
    Reason.CIDR_OVERLAP: 409,
    Reason.INSUFFICIENT_BANDWIDTH: 409,
    Reason.FORBIDDEN: 403,
}


def denial_error(denial: Denial, principal: Principal) -> ApiError:
    """A refusal as the caller may read it: tenants get the tenant-safe detail, which never
    reveals the other tenant's policy or weaves, nor that an IVN they may not see exists
    (then they get the very answer for one that does not); admins get everything."""
    shown = denial.seen_by(operator=principal.is_admin)
    body = shown.as_dict(operator=principal.is_admin)
    extra = {k: v for k, v in body.items() if k not in ("error", "detail")}
    return ApiError(DENIAL_STATUS[shown.reason], shown.reason.value, str(body["detail"]),
                    extra=extra)


# -- per-request bookkeeping ------------------------------------------------------------------

@dataclass
class RequestContext:
    request_id: str
    peer: str
    method: str
    path: str
    client_request_id: str | None = None
    principal: Principal | None = None
    error: str | None = None
    detail: str | None = None
    weave_id: str | None = None
    decided_by_weaver: bool = False  # the weaver wrote this request's decision record
    note: str | None = None


def new_request_id() -> str:
    return f"req-{secrets.token_hex(8)}"


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def seconds_to_next(self) -> float:
        return max(0.0, (1 - self.tokens) / self.rate) if self.rate > 0 else 60.0


class RateLimiter:
    """A token bucket per key, on the controller's monotonic clock (tests move it)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """None if allowed, else seconds until the next request would be."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            return None if bucket.take(now) else bucket.seconds_to_next()


class StateWaiters:
    """Lets `?wait=true` requests sleep until their weave leaves `provisioning` or
    `terminating`. Fed by a weaver listener (on the weaver's thread): it only sets
    threading.Events."""

    def __init__(self) -> None:
        self._events: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()

    def on_event(self, event: dict[str, Any]) -> None:
        weave = event.get("weave")
        if event.get("type") != "weave.state" or not isinstance(weave, dict) \
                or weave.get("state") in TRANSIENT_STATES:  # StrEnum: equal to its value
            return
        with self._lock:
            for waiter in self._events.get(weave.get("id", ""), ()):
                waiter.set()

    def register(self, weave_id: str) -> threading.Event:
        waiter = threading.Event()
        with self._lock:
            self._events.setdefault(weave_id, []).append(waiter)
        return waiter

    def unregister(self, weave_id: str, waiter: threading.Event) -> None:
        with self._lock:
            waiters = self._events.get(weave_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._events.pop(weave_id, None)


# -- views ------------------------------------------------------------------------------------

def weave_view(weave: Weave) -> dict[str, Any]:
    return weave.to_dict()


def visible(weave: Weave, principal: Principal) -> bool:
    return principal.is_admin or principal.tenant in weave.tenants


def ivn_views(policy: Policy, hosts_of: Callable[[str], list[str]],
              principal: Principal) -> list[dict[str, Any]]:
    """A tenant sees its own IVNs in full and, of other tenants' IVNs, only the names of
    those it may weave with (both sides allow it): never their prefixes or caps."""
    ivns = policy.ivns
    own = [i for i in ivns.values() if principal.is_admin or i.tenant == principal.tenant]
    out = []
    for ivn in sorted(own, key=lambda i: i.name):
        w = ivn.weaving
        out.append({
            "name": ivn.name, "tenant": ivn.tenant, "own": True,
            "can_weave_with": sorted(o.name for o in ivns.values()
                                     if o.name != ivn.name and ivn.mutual(o)),
            "vni": ivn.vni, "cidrs": [str(c) for c in ivn.cidrs], "gateway": str(ivn.gateway),
            "hosts": hosts_of(ivn.name),
            "weaving": {"partners": [p.describe() for p in w.partners],
                        "max_weave_mbps": w.max_weave_mbps, "max_total_mbps": w.max_total_mbps,
                        "max_duration_s": w.max_duration_s, "profiles": list(w.profiles),
                        "qos_class": w.qos_class},
        })
    if principal.tenant is not None:
        mine = {i.name for i in own}
        for other in sorted(ivns.values(), key=lambda i: i.name):
            if other.name in mine:
                continue
            # Having a partner among the tenant's own IVNs is what Policy.visible_to means
            # for another tenant's IVN; asking it too would loop over every IVN again.
            partners = sorted(i.name for i in own if i.mutual(other))
            if partners:
                out.append({"name": other.name, "tenant": other.tenant, "own": False,
                            "can_weave_with": partners})
    return out


# -- the app ----------------------------------------------------------------------------------

class NorthboundApi:
    """The REST app's state: the controller it drives, tokens, metrics, events, limits."""

    def __init__(self, controller: Controller, tokens: TokenStore,
                 settings: ApiSettings | None = None) -> None:
        self.controller = controller
        self.tokens = tokens
        self.settings = settings or ApiSettings()
        self.metrics = Metrics(controller)
        self.hub = EventHub(self.settings.event_queue_size)
        self.waiters = StateWaiters()
        weaver = controller.weaver
        # Listeners run on the weaver's thread; each only counts or hands off.
        weaver.subscribe(self.metrics.on_event)
        weaver.subscribe(self.waiters.on_event)
        self.hub.attach(weaver)
        clock = controller.clock.monotonic
        self.limiter = RateLimiter(self.settings.rate_per_s, self.settings.rate_burst, clock)
        # One budget per principal and one for all unauthenticated requests: a flood with
        # bogus tokens must not use up the budget that keeps a real tenant's refusals on record.
        self.audit_budgets = RateLimiter(self.settings.audit_refusals_per_s,
                                         self.settings.audit_refusals_burst, clock)
        self._suppressed = 0
        self._audit_lock = threading.Lock()
        self._wait_slots = threading.BoundedSemaphore(self.settings.max_waiters)
        self.wait_timeout_s = self.settings.wait_timeout_s if \
            self.settings.wait_timeout_s is not None else controller.provision_timeout_s + 5.0
        self.bearer = HTTPBearer(auto_error=False, description="a token from "
                                 "`nwc token issue TENANT|admin`")
        self.app = self._build()

    # -- authentication ---------------------------------------------------------------------

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the weaver's loop and wait (bounded: TimeoutError answers 503)."""
        return self.controller.call(fn, *args, timeout=self.settings.call_timeout_s)

    def authenticate(self, ctx: RequestContext, authorization: str | None) -> ApiError | None:
        """Runs in the gate, before anything reads the body: who is asking, and are they
        within their rate. Sets ctx.principal; returns the refusal, if any."""
        token = None
        if authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                token = credentials.strip()
        principal = self.tokens.authenticate(token) if token else None
        if principal is None:
            why = "missing" if not authorization else "invalid"
            self.metrics.auth_failures.labels(why).inc()
            return ApiError(401, "unauthenticated",
                            "a bearer token is required" if not authorization
                            else "the bearer token is not valid",
                            headers={"WWW-Authenticate": "Bearer"})
        ctx.principal = principal
        # Per tenant, not per token: issuing more tokens does not buy more rate.
        retry = self.limiter.take(principal.name)
        if retry is not None:
            return ApiError(429, "rate_limited",
                            f"more than {self.settings.rate_burst} requests in a burst or "
                            f"{self.settings.rate_per_s:g}/s sustained; retry later",
                            headers={"Retry-After": str(max(1, round(retry)))})
        return None

    # -- audit and events for requests that do not reach the weaver -------------------------

    def request_record(self, ctx: RequestContext, action: str, status: int) -> dict[str, Any]:
        outcome = ("ok" if status < 400 else "unauthenticated" if status == 401
                   else "invalid" if status in BODY_ERRORS
                   else "not_found" if status in (404, 405)
                   else "error" if status >= 500 else "denied")
        record: dict[str, Any] = {
            "ts": iso(self.controller.clock.now()), "action": action, "outcome": outcome,
            "actor": ctx.principal.actor().name if ctx.principal else "anonymous",
            "tenant": ctx.principal.tenant if ctx.principal else None,
            "request_id": ctx.request_id, "via": "api", "status": status,
            "method": ctx.method, "path": ctx.path[:200], "peer": ctx.peer,
        }
        for key, value in (("reason", ctx.error), ("detail", ctx.detail),
                           ("weave_id", ctx.weave_id), ("note", ctx.note),
                           ("client_request_id", ctx.client_request_id)):
            if value is not None:
                record[key] = value
        return record

    def should_record(self, ctx: RequestContext, action: str, status: int) -> bool:
        if ctx.decided_by_weaver:
            return False  # the weaver's decision record carries this request's id
        # Liveness probes and Prometheus scrapes that succeed are not worth a record each.
        if status < 400 and action in ("health", "metrics.scrape"):
            return False
        if status < 400:
            return True
        # Never left out: what an authenticated principal was forbidden, and our own failures.
        if status >= 500 or (status == 403 and ctx.principal is not None):
            return True
        budget = ctx.principal.name if ctx.principal is not None else ANONYMOUS_BUDGET
        if self.audit_budgets.take(budget) is None:
            return True
        with self._audit_lock:
            self._suppressed += 1
        self.metrics.audit_suppressed.inc()
        return False

    def write_record(self, record: dict[str, Any]) -> None:
        with self._audit_lock:
            if self._suppressed:
                record["suppressed_before"] = self._suppressed
                self._suppressed = 0
        # On the weaver's loop: the store is only ever touched from that thread.
        self.on_loop(self.controller.store.audit, record)

    def publish_refusal(self, ctx: RequestContext, action: str, status: int) -> None:
        event = {"ts": iso(self.controller.clock.now()), "action": action, "status": status,
                 "error": ctx.error, "detail": ctx.detail, "request_id": ctx.request_id}
        if status == 401:
            self.hub.publish({"type": "security", "kind": "auth_failure", "peer": ctx.peer,
                              **event})  # admins only
        elif status in (403, 429) and ctx.principal is not None:
            audience = () if ctx.principal.is_admin else (ctx.principal.tenant or "",)
            self.hub.publish({"type": "request.refused", "actor": ctx.principal.actor().name,
                              **event}, audience)

    async def finish(self, scope: Scope, ctx: RequestContext, status: int) -> None:
        """Runs as the response starts: metrics, events, and the request's audit record
        (written before the client sees the answer)."""
        route = scope.get("route") or self.match_route(scope)
        action = getattr(route, "name", None) or "http.unrouted"
        template = getattr(route, "path", None) or "unrouted"
        # Methods are whatever a client sends: keep the label set bounded.
        method = ctx.method if ctx.method in HTTP_METHODS else "OTHER"
        self.metrics.api_requests.labels(method, template, str(status)).inc()
        if status == 401 or (status in (403, 429) and not ctx.decided_by_weaver):
            self.publish_refusal(ctx, action, status)
        if status == 401:
            self.metrics.security_events.labels("auth_failure").inc()
        if self.should_record(ctx, action, status):
            try:
                await run_in_threadpool(self.write_record,
                                        self.request_record(ctx, action, status))
            except Exception:
                log.exception("request %s: the audit record could not be written",
                              ctx.request_id)

    def methods_for(self, scope: Scope) -> list[str]:
        methods: set[str] = set()
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                methods |= set(getattr(route, "methods", None) or ())
        return sorted(methods)

    def match_route(self, scope: Scope) -> Any:
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
        return None

    # -- waiting ----------------------------------------------------------------------------

    def settle(self, weave: Weave, timeout_s: float | None = None) -> Weave:
        """`?wait=true`: block until the weave is active or has ended (torn down), for at most
        the server's bound (or the client's `wait_timeout_s`, if shorter)."""
        if weave.state not in TRANSIENT_STATES:
            return weave
        if not self._wait_slots.acquire(blocking=False):
            return weave  # too many waiting already: answer now, the client can poll
        try:
            waiter = self.waiters.register(weave.id)
            try:
                # Re-read after registering: a change in between has already set nothing.
                current = self.on_loop(self.controller.store.weave, weave.id)
                if current is not None and current.state in TRANSIENT_STATES:
                    waiter.wait(min(timeout_s or self.wait_timeout_s, self.wait_timeout_s))
            finally:
                self.waiters.unregister(weave.id, waiter)
            return self.on_loop(self.controller.store.weave, weave.id) or weave
        finally:
            self._wait_slots.release()

    # -- decisions on the weaver's loop -----------------------------------------------------

    # These run on the weaver's loop and *return* refusals (ApiError) rather than raise them:
    # the loop logs every exception a call raises as a failure, and a refusal is not one.

    def _find(self, weave_id: str, principal: Principal) -> Weave | ApiError:
        """A weave the principal may see, else 404 (also for other tenants' weaves)."""
        weaver = self.controller.weaver
        weave = None
        if WEAVE_ID.fullmatch(weave_id):
            weave = weaver.live.get(weave_id) or weaver.store.weave(weave_id)
        if weave is None or not visible(weave, principal):
            # Quoted only when it is a weave id: anything else in the path is the client's
            # text (markup, bidi controls), never echoed.
            return ApiError(404, "unknown_weave", f"no weave {weave_id}"
                            if WEAVE_ID.fullmatch(weave_id) else "no weave has that id")
        return weave

    def _create_on_loop(self, request: WeaveRequest, principal: Principal,
                        ctx: RequestContext) -> Weave | Denial | ApiError:
        weaver = self.controller.weaver
        requester = weaver.policy.ivns.get(request.requester)
        if requester is not None and principal.tenant is not None \
                and requester.tenant != principal.tenant:
            if not weaver.policy.visible_to(principal.tenant, requester.name):
                # Answered as for an IVN that does not exist (docs/api.md), and through the
                # weaver like one: the same durable record (never charged to the refusal
                # budget), the same path. The record keeps what it really was.
                seen_as = check_request(request, weaver.policy, {requester.name})
                assert seen_as is not None  # the requester at least is unknown to it
                denial = seen_as if seen_as.reason is not Reason.UNKNOWN_IVN else Denial(
                    Reason.FORBIDDEN, f"requester IVN {requester.name} is tenant "
                    f"{requester.tenant}'s, which tenant {principal.tenant} may not see: "
                    "answered as unknown", tenant_view=seen_as)
                return weaver.refuse(request, denial, principal.actor(), ctx.request_id)
            return ApiError(403, "forbidden", f"IVN {request.requester} is not yours: a tenant "
                            "asks for weaves from its own IVNs only")
        if requester is not None:
            live = weaver.live.requested_by(requester.tenant)
            quota = self.settings.max_live_weaves_per_tenant
            if live >= quota:
                return ApiError(429, "quota_exceeded", f"tenant {requester.tenant} already has "
                                f"{live} live weaves it requested (quota {quota})")
        try:
            outcome = weaver.create(request, principal.actor(), ctx.request_id)
        except CapacityError as exc:  # no free weave slot in the underlay pools
            return ApiError(409, "insufficient_capacity", str(exc))
        # ctx.decided_by_weaver is set by the caller once this returns: the weaver's record
        # is only kept when the group commit this admission is part of succeeds.
        return outcome

    def _terminate_on_loop(self, weave_id: str, principal: Principal,
                           ctx: RequestContext) -> Weave | ApiError:
        weave = self._find(weave_id, principal)
        if isinstance(weave, ApiError):
            return weave
        if not weave.live:
            ctx.note = f"already {weave.state.value}"
            return weave
        ended = self.controller.weaver.terminate(weave.id, principal.actor(), ctx.request_id)
        ctx.decided_by_weaver = ended is not None
        return ended or weave

    def _extend_on_loop(self, weave_id: str, duration_s: int, principal: Principal,
                        ctx: RequestContext) -> Weave | Denial | ApiError:
        weave = self._find(weave_id, principal)
        if isinstance(weave, ApiError):
            return weave
        if not principal.is_admin and principal.tenant != weave.requester_tenant:
            return ApiError(403, "forbidden", "only the requester's tenant may extend a weave "
                            "(either party may terminate it)")
        if not weave.live:
            return ApiError(409, "weave_not_live", f"{weave.id} is {weave.state.value}")
        outcome = self.controller.weaver.extend(weave.id, duration_s, principal.actor(),
                                                ctx.request_id)
        if outcome is None:  # cannot happen on the loop after the check above
            return ApiError(409, "weave_not_live", f"{weave.id} is no longer live")
        ctx.decided_by_weaver = True
        return outcome

    def _list_on_loop(self, principal: Principal, state: State | None,
                      limit: int) -> list[Weave]:
        return self.controller.weaver.store.newest_weaves(
            tenant=None if principal.is_admin else principal.tenant,
            state=state.value if state is not None else None, limit=limit)

    # -- routes -----------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="NWC northbound API", version=__version__,
                      description="Weave tenants' isolated virtual networks together, on "
                                  "demand. See docs/api.md.",
                      docs_url=None, redoc_url=None,
                      dependencies=[Depends(reject_unknown_query)])
        app.add_middleware(RequestGate, api=self)
        self._handlers(app)
        controller, settings = self.controller, self.settings
        bearer = self.bearer

        def principal_of(request: Request, credentials: Annotated[
                HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
            # The gate authenticated the request already (before reading its body); this
            # dependency is what puts the bearer scheme into the OpenAPI document.
            principal = request.state.nwc.principal
            if principal is None:
                raise ApiError(401, "unauthenticated", "a bearer token is required",
                               headers={"WWW-Authenticate": "Bearer"})
            return principal

        def admin_of(principal: Annotated[Principal, Depends(principal_of)]) -> Principal:
            if not principal.is_admin:
                raise ApiError(403, "forbidden", "this needs an operator (admin) token")
            return principal

        Caller = Annotated[Principal, Depends(principal_of)]
        WeaveId = Annotated[str, Path(description="wv-NNNNNN", examples=["wv-000001"])]
        WaitBound = Annotated[float | None, Query(
            gt=0, le=3600, description="with wait: the longest the client will wait (the "
            "server's own bound still applies)")]

        @app.post(f"{API_PREFIX}/weaves", name="weave.create", status_code=201,
                  response_model=WeaveOut, tags=["weaves"],
                  responses=_errors(*AUTH_ERRORS, *BODY_ERRORS, 403, 404, 409))
        def create_weave(body: WeaveCreate, request: Request, response: Response,
                         principal: Caller,
                         wait: Annotated[bool, Query(description=
                                                     "block (bounded) until active or failed")]
                         = False, wait_timeout_s: WaitBound = None) -> dict[str, Any]:
            """Ask for a weave. 201 with the weave when admitted (state `provisioning`, or
            `active` when no data plane is attached); a refusal says exactly why."""
            ctx: RequestContext = request.state.nwc
            weave_request = WeaveRequest(body.requester, body.target, body.duration_s,
                                         body.bandwidth_mbps, body.security_profile)
            started = time.perf_counter()
            try:
                outcome = self.controller.admit(self._create_on_loop, weave_request, principal,
                                                ctx, timeout=self.settings.call_timeout_s)
            finally:
                self.metrics.admission_latency.labels("create").observe(
                    time.perf_counter() - started)
            if isinstance(outcome, ApiError):
                self.metrics.denials.labels("create", outcome.error).inc()
                raise outcome
            ctx.decided_by_weaver = True  # committed: the weaver's record says it
            if isinstance(outcome, Denial):
                self.metrics.denials.labels("create", outcome.reason.value).inc()
                raise denial_error(outcome, principal)
            self.metrics.admissions.labels("create").inc()
            ctx.weave_id = outcome.id
            weave = self.settle(outcome, wait_timeout_s) if wait else outcome
            response.headers["Location"] = f"{API_PREFIX}/weaves/{weave.id}"
            return weave_view(weave)

        @app.get(f"{API_PREFIX}/weaves", name="weave.list", response_model=WeaveList,
                 tags=["weaves"], responses=_errors(*AUTH_ERRORS, 422))
        def list_weaves(principal: Caller,
                        state: Annotated[State | None, Query()] = None,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
            """Weaves you are party to (all, for admins), newest first."""
            weaves = self.on_loop(self._list_on_loop, principal, state, limit)
            return {"weaves": [weave_view(w) for w in weaves], "count": len(weaves)}

        @app.get(f"{API_PREFIX}/weaves/{{weave_id}}", name="weave.show",
                 response_model=WeaveOut, tags=["weaves"],
                 responses=_errors(*AUTH_ERRORS, 404, 422))
        def show_weave(weave_id: WeaveId, request: Request, principal: Caller,
                       wait: Annotated[bool, Query(description="block (bounded) while "
                                                   "provisioning")] = False,
                       wait_timeout_s: WaitBound = None) -> dict[str, Any]:
            request.state.nwc.weave_id = weave_id[:40]
            weave = checked(self.on_loop(self._find, weave_id, principal))
            return weave_view(self.settle(weave, wait_timeout_s) if wait else weave)

        @app.delete(f"{API_PREFIX}/weaves/{{weave_id}}", name="weave.terminate",
                    response_model=WeaveOut, tags=["weaves"],
                    responses=_errors(*AUTH_ERRORS, 404, 422))
        def terminate_weave(weave_id: WeaveId, request: Request, principal: Caller,
                            wait: Annotated[bool, Query(description=
                                                        "block (bounded) until torn down")]
                            = False, wait_timeout_s: WaitBound = None) -> dict[str, Any]:
            """End a weave now and release everything it holds. Either party may; a weave
            that has already ended is answered as it is. The reservation is released at
            once; the weave is `terminating` until its flows and tunnels are confirmed gone,
            then `terminated`."""
            ctx: RequestContext = request.state.nwc
            ctx.weave_id = weave_id[:40]
            weave = checked(self.on_loop(self._terminate_on_loop, weave_id, principal, ctx))
            return weave_view(self.settle(weave, wait_timeout_s) if wait else weave)

        @app.post(f"{API_PREFIX}/weaves/{{weave_id}}/extend", name="weave.extend",
                  response_model=WeaveOut, tags=["weaves"],
                  responses=_errors(*AUTH_ERRORS, *BODY_ERRORS, 403, 404, 409))
        def extend_weave(weave_id: WeaveId, body: WeaveExtend, request: Request,
                         principal: Caller) -> dict[str, Any]:
            """Move the lease's end `duration_s` later, checked again against both IVNs'
            policies and the fabric as they are now."""
            ctx: RequestContext = request.state.nwc
            ctx.weave_id = weave_id[:40]
            started = time.perf_counter()
            try:
                outcome = self.on_loop(self._extend_on_loop, weave_id, body.duration_s,
                                          principal, ctx)
            finally:
                self.metrics.admission_latency.labels("extend").observe(
                    time.perf_counter() - started)
            if isinstance(outcome, ApiError):
                self.metrics.denials.labels("extend", outcome.error).inc()
                raise outcome
            if isinstance(outcome, Denial):
                self.metrics.denials.labels("extend", outcome.reason.value).inc()
                raise denial_error(outcome, principal)
            self.metrics.admissions.labels("extend").inc()
            return weave_view(outcome)

        @app.get(f"{API_PREFIX}/weaves/{{weave_id}}/stats", name="weave.stats",
                 response_model=WeaveStatsOut, tags=["weaves"],
                 responses=_errors(*AUTH_ERRORS, 404, 422))
        def weave_stats(weave_id: WeaveId, request: Request, principal: Caller
                        ) -> dict[str, Any]:
            """What the data plane measures for a live weave (bytes, packets and meter drops
            each way, IKE SA state, rekeys); empty once it has ended."""
            request.state.nwc.weave_id = weave_id[:40]
            weave = checked(self.on_loop(self._find, weave_id, principal))
            # Off the loop: sources read counters from the parts and may take a moment.
            measured = json_safe(controller.weave_stats(weave)) if weave.live else {}
            remaining = (weave.expires_at - controller.clock.now()).total_seconds() \
                if weave.live else 0.0
            return {"weave_id": weave.id, "state": weave.state,
                    "bandwidth_mbps": weave.bandwidth_mbps, "expires_at": iso(weave.expires_at),
                    "remaining_s": max(0.0, remaining), "measured": measured}

        @app.get(f"{API_PREFIX}/ivns", name="ivn.list", response_model=IvnList,
                 response_model_exclude_none=True, tags=["ivns"],
                 responses=_errors(*AUTH_ERRORS))
        def list_ivns(principal: Caller) -> dict[str, Any]:
            # The policy is immutable and replaced whole on reload: reading it here is safe.
            policy = controller.weaver.policy
            return {"ivns": ivn_views(policy, controller.config.topology.hosts_of_ivn,
                                      principal)}

        @app.get(f"{API_PREFIX}/fabric", name="fabric.show", response_model=FabricOut,
                 response_model_exclude_none=True, tags=["fabric"],
                 responses=_errors(*AUTH_ERRORS))
        def show_fabric(principal: Caller) -> dict[str, Any]:
            """Every fabric link: capacity, the share weaves may reserve, what is reserved;
            every switch's OpenFlow connection."""
            loads = self.on_loop(link_loads, controller.weaver)
            topology = controller.config.topology
            return {"topology": topology.name, "switches": sorted(topology.switches),
                    "connections": switch_connections(controller, principal),
                    "hosts": sorted(topology.hosts),
                    "links": [{"a": ld.a, "b": ld.b, "capacity_mbps": ld.capacity_mbps,
                               "reservable_mbps": ld.reservable_mbps,
                               "reserved_mbps": ld.reserved_mbps, "free_mbps": ld.free_mbps,
                               "up": ld.up,
                               "weaves": list(ld.weaves) if principal.is_admin else None}
                              for ld in loads]}

        @app.get(f"{API_PREFIX}/health", name="health", response_model=HealthOut,
                 tags=["operations"], responses={503: {"model": HealthOut}})
        def health() -> Any:
            """Liveness: the weaver's loop answers. No token needed; says nothing else."""
            try:
                controller.call(_noop, timeout=settings.health_timeout_s)
            except Exception:
                return JSONResponse({"status": "unavailable", "version": __version__},
                                    status_code=503)
            return {"status": "ok", "version": __version__}

        @app.get(f"{API_PREFIX}/events", name="events.stream", tags=["operations"],
                 response_class=StreamingResponse,
                 responses={200: {"content": {"text/event-stream": {
                     "schema": {"type": "string"}}},
                     "description": "server-sent events: `ready`, then one per event"},
                     **_errors(*AUTH_ERRORS, 422)})
        async def events(principal: Caller,
                         max_events: Annotated[int | None, Query(
                             ge=1, le=100_000, description="end the stream after this many "
                             "events")] = None) -> StreamingResponse:
            """A live stream of weave state changes and security events you may see."""
            # The slot is taken here, atomically with the limit check (parallel opens cannot
            # all pass it), and given back by the response however it ends, even unstarted.
            sub = self.hub.reserve(principal.tenant, max_streams=settings.max_event_streams,
                                   max_per_principal=settings.max_event_streams_per_principal)
            if sub is None:
                raise ApiError(429, "too_many_streams", "too many open event streams")
            self.metrics.event_clients.inc()

            def release() -> None:
                self.hub.unsubscribe(sub)
                self.metrics.event_clients.dec()

            body = stream(self.hub, sub, max_events=max_events,
                          keepalive_s=settings.keepalive_s,
                          ready={"principal": principal.name, "version": __version__},
                          on_overflow=self.metrics.event_overflows.inc,
                          still_authorized=lambda: self.tokens.is_valid(principal.token_id))
            return EventStreamResponse(body, release, media_type="text/event-stream",
                                       headers={"Cache-Control": "no-store",
                                                "X-Accel-Buffering": "no"})

        @app.get("/metrics", name="metrics.scrape", tags=["operations"],
                 response_class=Response,
                 responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {
                     "schema": {"type": "string"}}}, "description": "Prometheus text format"},
                     **_errors(*AUTH_ERRORS, 403)})
        def metrics(principal: Annotated[Principal, Depends(admin_of)]) -> Response:
            """Prometheus metrics (operator token: labels name every tenant's weaves)."""
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

        return app

    def _handlers(self, app: FastAPI) -> None:
        def error_response(request: Request, status: int, error: str, detail: str,
                           **extra: Any) -> JSONResponse:
            ctx: RequestContext | None = getattr(request.state, "nwc", None)
            headers = extra.pop("headers", None)
            if ctx is not None:
                ctx.error, ctx.detail = error, detail
            body = {"error": error, "detail": detail,
                    "request_id": ctx.request_id if ctx else None,
                    **{k: v for k, v in extra.items() if v is not None}}
            return JSONResponse(body, status_code=status, headers=headers)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError) -> JSONResponse:
            return error_response(request, exc.status, exc.error, exc.detail,
                                  fields=exc.fields, headers=exc.headers, **exc.extra)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            status, error, detail, fields = validation_answer(exc.errors())
            return error_response(request, status, error, detail, fields=fields)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            error = {404: "not_found", 405: "method_not_allowed",
                     400: "malformed_request"}.get(exc.status_code, "http_error")
            headers = dict(getattr(exc, "headers", None) or {})
            if exc.status_code == 405:
                # Starlette names only the first route on the path; list every method.
                headers["Allow"] = ", ".join(self.methods_for(request.scope))
            return error_response(request, exc.status_code, error, str(exc.detail),
                                  headers=headers)

        @app.exception_handler(TimeoutError)
        async def busy(request: Request, exc: TimeoutError) -> JSONResponse:
            # The call may still run later: the client should look before asking again.
            return error_response(request, 503, "busy", "the controller did not answer in "
                                  "time; check the weave list before retrying")

        @app.exception_handler(Exception)
        async def internal(request: Request, exc: Exception) -> JSONResponse:
            ctx = getattr(request.state, "nwc", None)
            log.error("request %s failed", ctx.request_id if ctx else "?", exc_info=exc)
            # This handler runs outside RequestGate (Starlette's outermost middleware), whose
            # send wrapper puts the request id on every other answer.
            return error_response(request, 500, "internal_error",
                                  "the controller failed on this request; it is logged",
                                  headers={"X-Request-ID": ctx.request_id} if ctx else None)


class EventStreamResponse(StreamingResponse):
    """A stream that gives its event-hub slot back when the response ends, whether or not
    its body ever started (an async generator never started runs no `finally`)."""

    def __init__(self, content: Any, release: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


_QUERY_NAMES: dict[int, frozenset[str]] = {}
# Unknown, repeated query parameter and body field names are the client's text: answers name
# at most this many, and each only if it has the shape of NWC's own field names.
MAX_ECHOED_NAMES = 5
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
NAME_NOT_SHOWN = "(name not shown)"


def shown_name(name: str) -> str:
    """A client's field or parameter name as an answer may quote it: as it is when it could be
    one of NWC's field names, else a placeholder (it may hold markup or bidi controls)."""
    return name if FIELD_NAME.fullmatch(name) else NAME_NOT_SHOWN


def _named(names: list[str]) -> str:
    """At most MAX_ECHOED_NAMES names (as shown_name shows them) and how many more."""
    shown = ", ".join(shown_name(n) for n in names[:MAX_ECHOED_NAMES])
    more = len(names) - MAX_ECHOED_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _query_names(dependant: Any) -> Iterator[str]:
    yield from (p.alias for p in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_names(sub)


def reject_unknown_query(request: Request) -> None:
    """Unknown query parameters answer 400, as unknown body fields do: a typo such as
    `?wiat=true` must not be silently ignored. So does a parameter given twice
    (`?state=active&state=failed`): the framework would silently keep the last one."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = _QUERY_NAMES.get(id(route))
    if allowed is None:
        allowed = _QUERY_NAMES[id(route)] = frozenset(_query_names(dependant))
    counts = Counter(name for name, _ in request.query_params.multi_items())
    unknown = sorted(set(counts) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown query parameter(s): {_named(unknown)}",
                       fields=[{"field": f"query.{shown_name(u)}", "problem": "unknown field"}
                               for u in unknown[:MAX_ECHOED_NAMES]])
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        raise ApiError(400, "duplicate_field",
                       f"query parameter(s) given more than once: {_named(repeated)}",
                       fields=[{"field": f"query.{name}", "problem": "given more than once"}
                               for name in repeated[:MAX_ECHOED_NAMES]])


class _Keys:
    """json.loads' object_pairs_hook that notes the keys an object repeats (json keeps the
    last silently: `{"requester": "x", "requester": "acme-web"}` would be acme-web)."""

    def __init__(self) -> None:
        self.repeated: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key not in self.repeated:
                    self.repeated.append(key)
                seen.add(key)
        return out


def repeated_keys(body: bytes) -> list[str]:
    """The keys some object of a JSON body repeats, in order; [] for a body that is not JSON
    (the framework's own parse answers that, as it always has)."""
    keys = _Keys()
    try:
        json.loads(body, object_pairs_hook=keys)
    except (ValueError, RecursionError):
        return []
    return keys.repeated


def _noop() -> None:
    return None


def checked(outcome: Weave | ApiError) -> Weave:
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


# How deep a part's measurements may nest. The deepest documented value (docs/design.md,
# per-weave measurements) is a leg end's counter: measured -> tunnel_legs -> one leg -> its
# ends -> one end -> the value, level 5. Deeper is a part's bug (or a cycle), cut off as None.
MEASURED_MAX_DEPTH = 5


def json_safe(value: Any, depth: int = 0) -> Any:
    """Keep only what JSON can carry from a part's measurements (and not too deep)."""
    if depth > MEASURED_MAX_DEPTH:
        return None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return str(value)


def validation_answer(errors: Any) -> tuple[int, str, str, list[dict[str, str]]]:
    """FastAPI's validation errors as NWC answers them: 400 for a body that is not JSON or
    names fields NWC does not know, 422 for values that are wrong; always field by field, and
    never echoing the input back."""
    fields = []
    unknown, malformed = 0, False
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        kind = e.get("type", "")
        if kind == "json_invalid":
            malformed = True
            fields.append({"field": "body", "problem": "not valid JSON"})
            continue
        if kind == "extra_forbidden":
            # Names a client made up: bounded and shown as unknown query parameters are.
            unknown += 1
            if unknown <= MAX_ECHOED_NAMES:
                fields.append({"field": ".".join([*loc[:1], *map(shown_name, loc[1:])]),
                               "problem": "unknown field"})
            continue
        if kind in ("model_attributes_type", "dict_type") and loc == ["body"]:
            malformed = True
            fields.append({"field": "body", "problem": "expected a JSON object"})
            continue
        fields.append({"field": ".".join(loc), "problem": str(e.get("msg", "invalid"))})
    if malformed:
        return 400, "malformed_request", "the body is not a JSON object", fields
    if unknown:
        names = ", ".join(f["field"] for f in fields if f["problem"] == "unknown field")
        more = f" and {unknown - MAX_ECHOED_NAMES} more" if unknown > MAX_ECHOED_NAMES else ""
        return 400, "unknown_field", f"unknown field(s): {names}{more}", fields
    return 422, "invalid_request", "; ".join(f"{f['field']}: {f['problem']}"
                                             for f in fields), fields


class RequestGate:
    """ASGI middleware around every request: id, body size and type limits, and (as the
    response starts) the request's metrics, events and audit record."""

    def __init__(self, app: Any, api: NorthboundApi) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        client = scope.get("client") or ("?", 0)
        ctx = RequestContext(new_request_id(), str(client[0]), scope.get("method", "?"),
                             scope.get("path", "?"))
        supplied = headers.get("x-request-id", "")
        if CLIENT_REQUEST_ID.fullmatch(supplied):
            ctx.client_request_id = supplied
        scope.setdefault("state", {})["nwc"] = ctx
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append("X-Request-ID", ctx.request_id)
                await self.api.finish(scope, ctx, message["status"])
            await send(message)

        if ctx.path not in PUBLIC_PATHS:
            refusal = self.api.authenticate(ctx, headers.get("authorization"))
            if refusal is not None:
                await self.answer(scope, receive, send_wrapper, ctx, refusal)
                return
        limit = self.api.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self.refuse(scope, receive, send_wrapper, ctx, 413, limit)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await self.refuse(scope, receive, send_wrapper, ctx, 413, limit)
                return
        if body and not _is_json(headers.get("content-type", "")):
            await self.refuse(scope, receive, send_wrapper, ctx, 415, limit)
            return
        # Parsed once more here (at most max_body_bytes) only to find repeated keys, which
        # the framework's parse hides by keeping the last.
        repeated = repeated_keys(body) if body else []
        if repeated:
            await self.answer(scope, receive, send_wrapper, ctx, ApiError(
                400, "duplicate_field", f"field(s) given more than once: {_named(repeated)}",
                fields=[{"field": f"body.{shown_name(k)}", "problem": "given more than once"}
                        for k in repeated[:MAX_ECHOED_NAMES]]))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_wrapper)
        except Exception:
            if not started:  # the 500 answer is sent outside this middleware
                ctx.error = ctx.error or "internal_error"
                await self.api.finish(scope, ctx, 500)
            raise

    @classmethod
    async def refuse(cls, scope: Scope, receive: Receive, send: Send, ctx: RequestContext,
                     status: int, limit: int) -> None:
        if status == 413:
            error = ApiError(413, "body_too_large", f"request bodies are limited to {limit} "
                             "bytes", headers={"Connection": "close"})
        else:
            error = ApiError(415, "unsupported_media_type", "send JSON (application/json)")
        await cls.answer(scope, receive, send, ctx, error)

    @staticmethod
    async def answer(scope: Scope, receive: Receive, send: Send, ctx: RequestContext,
                     error: ApiError) -> None:
        ctx.error, ctx.detail = error.error, error.detail
        body: dict[str, Any] = {"error": error.error, "detail": error.detail,
                                "request_id": ctx.request_id}
        if error.fields is not None:
            body["fields"] = error.fields
        response = JSONResponse(body, status_code=error.status, headers=error.headers)
        await response(scope, receive, send)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                          and media.endswith("+json"))


def create_app(controller: Controller, tokens: TokenStore | None = None,
               settings: ApiSettings | None = None) -> FastAPI:
    """The REST app for a controller; tokens default to the controller's state directory."""
    api = NorthboundApi(controller, tokens or TokenStore(controller.state_dir), settings)
    app = api.app
    app.state.nwc_api = api
    return app


# -- serving ------------------------------------------------------------------------------------

@dataclass
class ApiServer:
    """uvicorn on its own thread; `stop` ends event streams, then the server."""

    api: NorthboundApi
    server: uvicorn.Server
    thread: threading.Thread = field(init=False)

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread = threading.Thread(target=self.server.run, name="nwc-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                cfg = self.server.config
                raise RuntimeError(f"the REST API could not listen on {cfg.host}:{cfg.port}")
            time.sleep(0.02)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.api.hub.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


# `nwc run` options for the API's limits, by the ApiSettings field they set.
LIMIT_OPTIONS = {"max_live_weaves_per_tenant": "api_max_live_weaves", "rate_per_s": "api_rate",
                 "rate_burst": "api_rate_burst", "max_body_bytes": "api_max_body"}


def settings_from(args: argparse.Namespace) -> ApiSettings:
    """The API's limits as `nwc run` was told them (ApiSettings' defaults where it was not)."""
    given = {field: getattr(args, option, None) for field, option in LIMIT_OPTIONS.items()}
    return replace(ApiSettings(), **{f: v for f, v in given.items() if v is not None})


def serve(controller: Controller, args: argparse.Namespace) -> ApiServer:
    """Start the REST API for `nwc run` (its stopper is registered with the controller)."""
    host = getattr(args, "api_host", "127.0.0.1")
    port = int(getattr(args, "api_port", 8181))
    key, cert = getattr(args, "api_ssl_key", None), getattr(args, "api_ssl_cert", None)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not key:
        log.warning("the REST API listens on %s, beyond this host, without TLS: bearer tokens "
                    "cross the network in clear unless a TLS proxy fronts it "
                    "(see --api-ssl-key/--api-ssl-cert)", host)
    api = NorthboundApi(controller, TokenStore(controller.state_dir), settings_from(args))
    config = uvicorn.Config(api.app, host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off", server_header=False,
                            proxy_headers=False, limit_concurrency=128,
                            timeout_graceful_shutdown=3,
                            ssl_keyfile=key, ssl_certfile=cert)
    if key:
        try:
            config.load()  # reads the key and certificate now, so a bad pair stops the start
        except (OSError, ssl.SSLError) as exc:
            from nwc.run import StartRefused
            raise StartRefused(f"--api-ssl-key/--api-ssl-cert: {exc}") from None
    server = ApiServer(api, uvicorn.Server(config))
    server.start()
    controller.on_stop(server.stop)
    log.info("REST API on %s://%s:%d%s (OpenAPI at /openapi.json)",
             "https" if key else "http", host, server.port, API_PREFIX)
    return server
