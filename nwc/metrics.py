"""Every Prometheus metric NWC exports, declared here and nowhere else.

Each REST app gets its own `CollectorRegistry` (never prometheus_client's global one), so a
process, or a test, may build many apps. Three kinds of metric:

- counted as things happen: decisions (from the API, which knows the outcome and how long it
  took), weave state transitions, provisioning latency and security events (from the weaver's
  event stream; the listener runs on the weaver's thread and only increments counters);
- read at scrape time from the weaver's loop (one `controller.call`): weaves by state, the
  fabric ledger per link;
- read at scrape time from the data-plane parts through `controller.weave_stats` (keys are
  the contract in docs/design.md, "Per-weave measurements"): bytes, packets and meter drops
  each way, IKE SA state and rekeys. A key a part does not report is simply not exported;
- read at scrape time from the flows part (`controller.drop_sources`): what each switch's
  counting drops refused (fabric edge sources, forged overlay, VM spoofing, default deny);
- read at scrape time from the tunnel part (`controller.host_sources`): whether each host's
  OVSDB answers and its agent's heartbeat goes on;
- read at scrape time from the flows part (`controller.switch_sources`): whether each switch
  and host bridge is connected (a link's `up` is only its last known port state);
- read at scrape time from disk: the expiry of each TLS certificate `nwc run` was given
  (`nwc.certexpiry`), so a renewed file shows at the next scrape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nwc.certexpiry import CertFacts, Status
from nwc.lease import parse_iso
from nwc.weave import State, Weave

if TYPE_CHECKING:
    from nwc.controller import Controller
    from nwc.weaver import Weaver

log = logging.getLogger(__name__)
T = TypeVar("T")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The two directions of a weave, as label values and as the suffixes of the stats keys.
DIRECTIONS = ("requester_to_target", "target_to_requester")
# IKE SA states a tunnel part reports (`sa_state`); anything else is exported as "unknown".
SA_STATES = ("established", "connecting", "rekeying", "down", "unknown")
_LABEL_SAFE = re.compile(r"[a-z][a-z0-9_]{0,31}")

ADMISSION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROVISIONING_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

SNAPSHOT_TIMEOUT_S = 5.0
# Label cardinality of the certificate metrics: a CA bundle (`--ca-certs` pointed at a system
# bundle) may hold hundreds; the ones that expire first are what matters.
MAX_CERTS_PER_FILE = 8
MAX_SUBJECT_CHARS = 128


@dataclass(frozen=True)
class LinkLoad:
    """One fabric link as the ledger sees it. Reservations are symmetric (a weave reserves
    its rate both ways), so `reserved_mbps` is the larger of the two directions."""

    a: str
    b: str
    capacity_mbps: float
    reservable_mbps: float
    reserved_mbps: float
    up: bool
    weaves: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    @property
    def free_mbps(self) -> float:
        return max(0.0, self.reservable_mbps - self.reserved_mbps)


@dataclass(frozen=True)
class ControllerSnapshot:
    weaves_by_state: dict[str, int]
    live: tuple[Weave, ...]
    links: tuple[LinkLoad, ...]


def link_loads(weaver: Weaver) -> tuple[LinkLoad, ...]:
    """The ledger per link. Call on the weaver's loop (it reads the live ledger)."""
    fabric = weaver.fabric
    out = []
    for link in weaver.topology.links:
        a, b = link.key
        reserved = max(fabric.reserved[(a, b)], fabric.reserved[(b, a)])
        out.append(LinkLoad(a, b, link.capacity_mbps, link.reservable_mbps, reserved / 1000,
                            (a, b) not in fabric.down, tuple(fabric.weaves_on(a, b))))
    return tuple(out)


def take_snapshot(weaver: Weaver) -> ControllerSnapshot:
    """Everything scrape-time metrics need from the weaver. Call on the weaver's loop."""
    return ControllerSnapshot(weaver.store.count_weaves_by_state(),
                              tuple(weaver.live.values()), link_loads(weaver))


class ControllerCollector(Collector):
    """Reads the weaver (through its loop) and the parts' measurements at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        responsive = GaugeMetricFamily("nwc_weaver_responsive",
                                       "1 if the weaver's loop answered this scrape")
        try:
            snap = self.controller.call(take_snapshot, self.controller.weaver,
                                        timeout=SNAPSHOT_TIMEOUT_S)
        except Exception:
            log.exception("metrics: the weaver did not answer")
            responsive.add_metric([], 0)
            yield responsive
            return
        responsive.add_metric([], 1)
        yield responsive
        yield from self._weaves(snap)
        yield from self._links(snap.links)
        # Drops first: they ask every connected switch in one round, which the weaves'
        # measurements then find cached instead of asking their hosts one weave at a time.
        yield from self._drops()
        yield from self._measurements(snap.live)
        yield from self._hosts()
        yield from self._switches()

    def _hosts(self) -> Iterator[Metric]:
        ovsdb = GaugeMetricFamily("nwc_host_ovsdb_up", "1 if the controller reads the host's "
                                  "OVSDB", labels=["host"])
        agent = GaugeMetricFamily("nwc_host_agent_up", "1 if the host's agent's heartbeat "
                                  "goes on, 0 if it stopped; absent while the host's OVSDB "
                                  "cannot be read (not known)", labels=["host"])
        for hosts in _read_each(self.controller.host_sources, "host"):
            for host, health in sorted(hosts.items()):
                ovsdb.add_metric([host], 1 if health.ovsdb_up else 0)
                if health.agent_up is not None:
                    agent.add_metric([host], 1 if health.agent_up else 0)
        yield from (ovsdb, agent)

    def _switches(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "nwc_switch_connected", "1 while the switch's (or host bridge's) OpenFlow "
            "connection is up and resynced, else 0", labels=["switch"])
        for switches in _read_each(self.controller.switch_sources, "switch"):
            for name, connection in sorted(switches.items()):
                connected.add_metric([name], 1 if connection.connected else 0)
        yield connected

    def _drops(self) -> Iterator[Metric]:
        labels = ["switch", "reason", "ivn", "port"]
        packets = CounterMetricFamily(
            "nwc_dropped_packets", "Packets NWC's counting drops refused, by switch and "
            "reason (fabric_edge_source, overlay_source, vm_spoof, default_deny); ivn and port "
            "where the drop has one", labels=labels)
        octets = CounterMetricFamily("nwc_dropped_bytes", "Bytes of the same", labels=labels)
        for dropped in _read_each(self.controller.drop_sources, "drop"):
            for d in dropped:
                values = [d.switch, d.labels.reason, d.labels.ivn, d.labels.port]
                packets.add_metric(values, d.packets)
                octets.add_metric(values, d.bytes)
        yield from (packets, octets)

    @staticmethod
    def _weaves(snap: ControllerSnapshot) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("nwc_weaves", "Weaves by state (ended ones are counted "
                                     "since the state directory was created)",
                                     labels=["state"])
        for state in State:
            by_state.add_metric([state.value], snap.weaves_by_state.get(state.value, 0))
        yield by_state
        info = GaugeMetricFamily("nwc_weave_info", "One series per live weave, for joins",
                                 labels=["weave", "requester", "target", "requester_tenant",
                                         "target_tenant", "profile", "state"])
        reserved = GaugeMetricFamily("nwc_weave_reserved_mbps",
                                     "Rate reserved and metered per leg and direction",
                                     labels=["weave"])
        expires = GaugeMetricFamily("nwc_weave_expires_timestamp_seconds",
                                    "When the weave's lease ends (Unix time)", labels=["weave"])
        for w in snap.live:
            info.add_metric([w.id, w.requester, w.target, w.requester_tenant, w.target_tenant,
                             w.profile, w.state.value], 1)
            reserved.add_metric([w.id], w.bandwidth_mbps)
            expires.add_metric([w.id], w.expires_at.timestamp())
        yield from (info, reserved, expires)

    @staticmethod
    def _links(links: tuple[LinkLoad, ...]) -> Iterator[Metric]:
        capacity = GaugeMetricFamily("nwc_link_capacity_mbps", "Link capacity", labels=["link"])
        reservable = GaugeMetricFamily("nwc_link_reservable_mbps",
                                       "Share of the link weaves may reserve", labels=["link"])
        reserved = GaugeMetricFamily("nwc_link_reserved_mbps",
                                     "Reserved by live weaves (each direction)",
                                     labels=["link"])
        up = GaugeMetricFamily("nwc_link_up", "1 if the link is up", labels=["link"])
        for link in links:
            capacity.add_metric([link.name], link.capacity_mbps)
            reservable.add_metric([link.name], link.reservable_mbps)
            reserved.add_metric([link.name], link.reserved_mbps)
            up.add_metric([link.name], 1 if link.up else 0)
        yield from (capacity, reservable, reserved, up)

    def _measurements(self, live: tuple[Weave, ...]) -> Iterator[Metric]:
        families = {
            "bytes": CounterMetricFamily("nwc_weave_bytes", "Bytes carried by the weave",
                                         labels=["weave", "direction"]),
            "packets": CounterMetricFamily("nwc_weave_packets", "Packets carried by the weave",
                                           labels=["weave", "direction"]),
            "meter_dropped_bytes": CounterMetricFamily(
                "nwc_weave_meter_dropped_bytes",
                "Bytes the weave's meters dropped (over its reserved rate)",
                labels=["weave", "direction"]),
        }
        sa_state = GaugeMetricFamily("nwc_ike_sa_state", "1 for the weave's current IKE SA "
                                     "state (the worst of its legs)", labels=["weave", "state"])
        rekeys = CounterMetricFamily("nwc_ike_rekeys", "IKE and CHILD SA rekeys of the weave",
                                     labels=["weave"])
        for weave in live:
            # Parts measure what hosts and switches say: an odd value costs its sample
            # (`_number`), a surprise the rest of that weave's series, never the scrape.
            try:
                stats = self.controller.weave_stats(weave)
                for prefix, family in families.items():
                    for direction in DIRECTIONS:
                        value = _number(stats.get(f"{prefix}_{direction}"))
                        if value is not None:
                            family.add_metric([weave.id, direction], value)
                state = stats.get("sa_state")
                if isinstance(state, str):
                    label = state if state in SA_STATES or _LABEL_SAFE.fullmatch(state) \
                        else "unknown"
                    sa_state.add_metric([weave.id, label], 1)
                count = _number(stats.get("rekeys"))
                if count is not None:
                    rekeys.add_metric([weave.id], count)
            except Exception:
                log.exception("metrics: the measurements of %s could not be exported",
                              weave.id)
        yield from families.values()
        yield from (sa_state, rekeys)


def _read_each(sources: Iterable[Callable[[], T]], what: str) -> Iterator[T]:
    """What each scrape-time source answers; one that raises is logged and skipped, so a
    failing part costs its own series, never the scrape."""
    for source in sources:
        try:
            yield source()
        except Exception:
            log.exception("metrics: %s source %s failed", what, source)


class CertificateCollector(Collector):
    """The controller's certificates, read from disk at scrape time. One series per
    certificate (use, subject, serial: the serial keeps an old and a renewed CA of the same
    name, both in one bundle, apart)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        watch = self.controller.cert_watch
        if watch is None:  # not started by `nwc run` (tests, the demo)
            return
        not_after = GaugeMetricFamily(
            "nwc_certificate_not_after_timestamp_seconds",
            "When the certificate expires (Unix time)", labels=["use", "subject", "serial"])
        state = GaugeMetricFamily(
            "nwc_certificate_state", "1 for the certificate's state: ok, expiring (within "
            "--cert-warn-days), expired, not_yet_valid, unreadable (file missing or without a "
            "certificate; subject and serial empty)", labels=["use", "subject", "serial", "state"])
        try:
            facts = watch.check()
        except Exception:
            log.exception("metrics: checking the certificates failed")
            return
        for fact in exported_certificates(facts):
            labels = [fact.use, fact.subject[:MAX_SUBJECT_CHARS], fact.serial]
            state.add_metric([*labels, fact.status.value], 1)
            if fact.not_after is not None:
                not_after.add_metric(labels, fact.not_after.timestamp())
        yield from (not_after, state)


def exported_certificates(facts: Iterable[CertFacts]) -> list[CertFacts]:
    """At most MAX_CERTS_PER_FILE per file and use: unreadable ones first, then the ones
    that expire soonest."""
    by_file: dict[tuple[str, str], list[CertFacts]] = {}
    for fact in facts:
        by_file.setdefault((fact.use, fact.source), []).append(fact)
    out = []
    for group in by_file.values():
        group.sort(key=lambda f: (f.status is not Status.UNREADABLE,
                                  f.not_after.timestamp() if f.not_after else 0.0))
        out.extend(group[:MAX_CERTS_PER_FILE])
    return out


def _number(value: Any) -> float | None:
    """A measurement as a sample value, or None (not exported) if it is not a number or too
    large for one (an integer past a float's range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


class Metrics:
    """One app's metrics. `on_event` is a `Weaver.subscribe` listener."""

    def __init__(self, controller: Controller | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.admissions = Counter("nwc_admissions", "Requests admitted (create, extend)",
                                  ["action"], registry=r)
        self.denials = Counter("nwc_denials", "Requests refused, by reason", ["action", "reason"],
                               registry=r)
        self.admission_latency = Histogram(
            "nwc_admission_latency_seconds", "Time to decide a request (admission and "
            "reservation, on the weaver's loop, as the API saw it)", ["action"],
            buckets=ADMISSION_BUCKETS, registry=r)
        self.provisioning_latency = Histogram(
            "nwc_provisioning_latency_seconds", "From admission until every data-plane part "
            "reported the weave built (outcome active) or it failed", ["outcome"],
            buckets=PROVISIONING_BUCKETS, registry=r)
        self.transitions = Counter("nwc_weave_transitions", "Weaves entering a state",
                                   ["state", "reason"], registry=r)
        self.security_events = Counter("nwc_security_events",
                                       "IKE failures, SAs down, authentication failures...",
                                       ["kind"], registry=r)
        self.api_requests = Counter("nwc_api_requests", "REST requests answered",
                                    ["method", "route", "status"], registry=r)
        self.auth_failures = Counter("nwc_auth_failures", "Requests without a valid token",
                                     ["reason"], registry=r)
        self.audit_suppressed = Counter(
            "nwc_audit_records_suppressed", "Request records not written while refusals came "
            "faster than the audit budget (the next record carries the count)", registry=r)
        self.event_clients = Gauge("nwc_event_stream_clients", "Open /v1/events streams",
                                   registry=r)
        self.event_overflows = Counter("nwc_event_stream_overflows",
                                       "Event streams closed because the client fell behind",
                                       registry=r)
        self.policy_reloads = Counter("nwc_policy_reloads", "Policy reloads (SIGHUP), applied "
                                      "or refused (the running policy stays)", ["outcome"],
                                      registry=r)
        for outcome in ("applied", "refused"):
            self.policy_reloads.labels(outcome)  # both series exist from the start
        self.policy_last_reload_success = Gauge(
            "nwc_policy_last_reload_success", "1 if the last policy reload was applied (or "
            "none was tried: the running policy is the one loaded at the start), 0 if it was "
            "refused", registry=r)
        self.policy_last_reload_success.set(1)
        self.policy_last_reload_time = Gauge(
            "nwc_policy_last_reload_timestamp_seconds", "When the last policy reload, applied "
            "or refused, was decided (Unix time; 0: none since the start)", registry=r)
        self._provisioning: set[str] = set()
        if controller is not None:
            r.register(ControllerCollector(controller))
            r.register(CertificateCollector(controller))

    def on_event(self, event: dict[str, Any]) -> None:
        """Weaver listener (on the weaver's thread): counters only, never blocks."""
        kind = event.get("type")
        if kind == "security":
            self.security_events.labels(str(event.get("kind", "unknown"))).inc()
        elif kind == "weave.part_failed":
            self.security_events.labels("part_failed").inc()
        elif kind == "policy.reload":
            self._policy_reloaded(event)
        if kind != "weave.state" or not isinstance(event.get("weave"), dict):
            return
        weave = event["weave"]
        state, weave_id = weave.get("state"), weave.get("id")
        self.transitions.labels(state, weave.get("reason") or "").inc()
        if state == State.PROVISIONING.value:
            self._provisioning.add(weave_id)
        elif weave_id in self._provisioning:
            self._provisioning.discard(weave_id)
            if state in (State.ACTIVE.value, State.FAILED.value):
                try:
                    took = (parse_iso(event["ts"]) - parse_iso(weave["created_at"]))
                except (KeyError, ValueError):
                    return
                self.provisioning_latency.labels(
                    "active" if state == State.ACTIVE.value else "failed").observe(
                    max(0.0, took.total_seconds()))

    def _policy_reloaded(self, event: dict[str, Any]) -> None:
        applied = event.get("outcome") == "applied"
        self.policy_reloads.labels("applied" if applied else "refused").inc()
        self.policy_last_reload_success.set(1 if applied else 0)
        try:
            self.policy_last_reload_time.set(parse_iso(event["ts"]).timestamp())
        except (KeyError, TypeError, ValueError):
            log.warning("metrics: a policy.reload event without a valid ts")

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
