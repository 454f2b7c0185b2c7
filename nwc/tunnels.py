"""The controller's tunnel part: every remote leg of every live weave, realized through the
hosts' OVSDBs and their agents.

For each leg it writes both ends' desired state (`nwc.tunnel.LegRecord`: spec plus the leg's
fresh pre-shared key, or the CA certificate and, once signed, the host's leg certificate) into
the two hosts' OVSDB, and reads back what the agents report. It signs the agents' certificate
requests (after checking they ask for the identity NWC assigned), tells the initiator to start
once the responder listens, and reports to the weaver through its loop: `part_ready` when both
ends of every leg have their CHILD SA installed, `part_failed` plus a security event when
authentication fails or a leg cannot be built, security events when an installed SA goes down
(its traffic is dropped, never sent in clear) or comes back. `weave_down` deletes the records;
the agents remove everything on the hosts and then their status keys.

No OVSDB I/O happens on the weaver's loop: it only updates the desired state in memory and
wakes this part's thread. That thread decides; each host's OVSDB is read and written only
from that host's own worker thread, and a pass waits for a host at most `io_wait_s`. So a host
that is powered off, or whose ovsdb-server accepts and never answers, holds up only the legs
it is part of: every other host is still provisioned and cleaned up. Keys are held in memory
only; a restarted controller adopts the key of a leg whose two hosts still agree on it, and
otherwise draws a new one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Imported here, never first from the part's thread: ovsdbapp pulls in python-ovs, which
# imports eventlet, and a thread that imported eventlet first never finishes exiting.
from nwc import bridgeguard
from nwc.admission import life_ends_at
from nwc.bridgeguard import Fix
from nwc.counters import CarriedCounters
from nwc.hostdb import HostDb, OvsdbConfigError, ServerIdentityError, configure_targets
from nwc.hostwatch import AGENT_SILENT_S, HostHealth, HostWatch
from nwc.ovsdbtls import ServerIdentity
from nwc.pipeline import INTEGRATION_BRIDGE
from nwc.pki import CaExpired, CertificateAuthority, CsrRejected, Secret, new_psk
from nwc.policy import Policy
from nwc.topology import Topology
from nwc.tunnel import (
    AGENT_ACK_KEY,
    RECORD_PREFIX,
    RECORDS_VERSION_KEY,
    STATUS_PREFIX,
    LegRecord,
    LegStatus,
    Phase,
    SaInfo,
    TunnelError,
    TunnelSpec,
    host_text,
    leg_key,
    parse_version,
    weave_specs,
)
from nwc.weave import Weave

log = logging.getLogger(__name__)

PART_NAME = "tunnels"
RECONNECT_S = 2.0
# CHILD SAs remembered per leg end: an agent listing an SA a rekey already replaced (the
# old one lingers a moment) must not count it as new again.
MAX_CHILDREN_KEPT = 4
# How long one pass waits for a host's OVSDB job before going on without that host. A healthy
# host answers in milliseconds (reads come from the IDL's cache); a host that keeps a pass
# waiting is not waited for again until it answers.
IO_WAIT_S = 0.5
# A responder in one of these phases answers IKE: the initiator may start.
RESPONDER_READY = frozenset({Phase.LISTENING, Phase.CONNECTING, Phase.INSTALLED})



def host_safe_traceback(exc: BaseException) -> str:
    """A traceback for the log whose exception text, which may quote what a host wrote, is
    cleaned: its frames are NWC's code, but a raw message could forge log lines."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"Traceback (most recent call last):\n{frames}{type(exc).__name__}: " \
           f"{host_text(str(exc))}"

class Reports(Protocol):
    """How the part tells the weaver (posted to its loop, never called from this thread)."""

    def ready(self, weave_id: str) -> None: ...
    def failed(self, weave_id: str, detail: str) -> None: ...
    def security(self, weave_id: str, kind: str, detail: str) -> None: ...
    def down(self, weave_id: str) -> None: ...
    def host(self, host: str, kind: str, up: bool, detail: str) -> None: ...
    def bridge(self, host: str, bridge: str, fixed: list[Fix], detail: str) -> None: ...


class HostDbLike(Protocol):
    def open(self) -> Any: ...
    def close(self) -> None: ...
    def external_ids(self, prefix: str = ...) -> dict[str, str]: ...
    def update_external_ids(self, set_keys: Mapping[str, str] | None = ...,
                            delete_keys: Any = ...) -> None: ...
    def bridge_rows(self, bridge: str) -> bridgeguard.BridgeRows: ...
    def apply_fixes(self, fixes: Any) -> None: ...


class WeaverReports:
    """Reports for a running controller: each one is posted onto the weaver's loop."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def ready(self, weave_id: str) -> None:
        c = self.controller
        c.loop.post(c.weaver.part_ready, weave_id, PART_NAME)

    def failed(self, weave_id: str, detail: str) -> None:
        c = self.controller
        c.loop.post(c.weaver.part_failed, weave_id, PART_NAME, detail)

    def security(self, weave_id: str, kind: str, detail: str) -> None:
        c = self.controller
        c.loop.post(c.weaver.security_event, weave_id, kind, detail)

    def down(self, weave_id: str) -> None:
        c = self.controller
        c.loop.post(c.weaver.part_down, weave_id, PART_NAME)

    def host(self, host: str, kind: str, up: bool, detail: str) -> None:
        """A host's agent (`host.agent`) or OVSDB (`host.ovsdb`) stopped answering or
        answers again: an event for operators (it concerns no tenant), on a change only."""
        c = self.controller
        c.loop.post(c.weaver.emit, {"type": f"host.{kind}", "host": host, "up": up,
                                    "detail": detail})

    def bridge(self, host: str, bridge: str, fixed: list[Fix], detail: str) -> None:
        """NWC set a host's integration bridge back to safe values (`host.bridge`)."""
        c = self.controller
        c.loop.post(c.weaver.emit, {
            "type": "host.bridge", "host": host, "bridge": bridge, "detail": detail,
            "fixed": [{"table": f.table, "column": f.column, "target": f.target,
                       "old": f.old, "new": f.new} for f in fixed]})


@dataclass
class _Leg:
    """Both ends of one remote leg, and what NWC decided for it."""

    requester: TunnelSpec
    target: TunnelSpec
    psk: Secret | None = None
    certs: dict[str, bytes] = field(default_factory=dict)  # host -> signed leaf
    csrs: dict[str, bytes] = field(default_factory=dict)  # host -> the request it answers
    start: bool = False
    statuses: dict[str, LegStatus] = field(default_factory=dict)
    materialized: bool = False
    down_reported: set[str] = field(default_factory=set)
    # Hosts whose end failed authentication replacing an SA that still carries the traffic,
    # reported once while that lasts.
    refusal_reported: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return self.requester.key

    def ends(self) -> tuple[TunnelSpec, TunnelSpec]:
        return self.requester, self.target

    def installed(self) -> bool:
        return all(self.statuses.get(s.host) is not None
                   and self.statuses[s.host].phase is Phase.INSTALLED for s in self.ends())

    def up(self) -> bool:
        """Whether both ends' SAs carry the leg's traffic: installed for the record, or one
        built from earlier material while it is replaced (for readiness and sa_down)."""
        return all(_end_up(self.statuses.get(s.host)) for s in self.ends())


@dataclass
class _WeaveTunnels:
    weave: Weave
    legs: dict[str, _Leg]
    ready: bool = False
    failed: bool = False


class _HostLink:
    """One host's OVSDB, used only from this link's own thread, one job at a time: whatever
    that host does (not answer, answer slowly, hang mid-transaction) stalls this thread, never
    the part's pass or another host's."""

    def __init__(self, host: str, target: str, factory: Callable[[str], HostDbLike],
                 guard: Callable[[str, HostDbLike], None] | None = None) -> None:
        self.host, self.target = host, target
        self._factory = factory
        # Run after every read that answered (from the cache, so cheap): a wrong value is
        # found within a pass of being set, and again after every reconnection.
        self._guard = guard
        self.db: HostDbLike | None = None
        self.retry_at = 0.0
        self.job: concurrent.futures.Future[Any] | None = None
        # A job outlived a pass's wait: later passes still give this host jobs but do not
        # wait for them (they take what is done by then), until a read succeeds again.
        self.suspect = False
        # The last records version written to this host: a read that does not show it yet
        # must not make the next write reuse it (each version names one set of records).
        self.version = 0
        self._problem: str | None = None  # why it could not be reached, as last logged
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]
                                      | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"nwc-ovsdb-{host}",
                                        daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return self.job is not None and not self.job.done()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any] | None:
        """Queue a job unless the last one is still running (then None: its host is slow,
        and piling jobs up behind it would only replay stale decisions later)."""
        if self.busy():
            return None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.job = future
        self._jobs.put((fn, future))
        return future

    def close(self) -> concurrent.futures.Future[Any]:
        """Close the connection after any job under way, and end the thread."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((self._drop, future))
        self._jobs.put(None)
        return future

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # the pass logs it; the thread must live on
                future.set_exception(exc)

    # -- jobs (on the link's thread) ------------------------------------------------------

    def read(self) -> dict[str, str] | None:
        """NWC's keys on this host, or None if it cannot be read now."""
        db = self._connected()
        if db is None:
            return None
        try:
            ids = db.external_ids("nwc-")
        except Exception as exc:
            log.warning("OVSDB of %s unreadable (%s); reconnecting", self.host,
                        host_text(str(exc)))
            self._drop()
            return None
        self.suspect = False
        if self._guard is not None:
            self._guard(self.host, db)
        return ids

    def write(self, set_keys: Mapping[str, str], delete_keys: list[str]) -> None:
        if self.db is None:
            return
        try:
            self.db.update_external_ids(set_keys, delete_keys)
        except Exception as exc:
            log.warning("writing to OVSDB of %s failed (%s); will retry", self.host, exc)
            self._drop()

    def _connected(self) -> HostDbLike | None:
        if self.db is not None:
            return self.db
        if time.monotonic() < self.retry_at:
            return None
        try:
            db = self._factory(self.target)
            db.open()
        except Exception as exc:
            self.retry_at = time.monotonic() + RECONNECT_S
            self._note_problem(exc)
            return None
        if self._problem is not None:
            log.info("OVSDB of %s at %s reached again", self.host, self.target)
            self._problem = None
        self.db = db
        return db

    def _note_problem(self, exc: Exception) -> None:
        """Say once why this host cannot be reached, until the reason changes or it is
        reached: a refused server certificate stays refused every RECONNECT_S."""
        problem = f"{type(exc).__name__}: {exc}"
        if problem == self._problem:
            log.debug("OVSDB of %s at %s still unreachable (%s)", self.host, self.target, exc)
            return
        self._problem = problem
        if isinstance(exc, ServerIdentityError):
            log.error("refusing the OVSDB server of %s at %s, nothing is written to it: %s; "
                      "the host is unreachable until its server presents its own certificate",
                      self.host, self.target, exc)
        else:
            log.warning("cannot reach the OVSDB of %s at %s (%s); retrying every %g s",
                        self.host, self.target, exc, RECONNECT_S)

    def _drop(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            try:
                db.close()
            except Exception:  # a dead connection still has to go
                log.debug("closing the OVSDB of %s", self.host, exc_info=True)


class Tunnels:
    """The weaver part named "tunnels". Start its thread with `start()` after the weaver has
    handed it the live weaves (records of weaves it does not know are removed from hosts)."""

    name = PART_NAME
    # A terminated weave is terminating until both hosts' agents confirm its legs gone (SAs,
    # keys, VXLAN device, OVS port, addresses).
    confirms_teardown = True

    def __init__(self, *, topology: Topology, policy: Callable[[], Policy],
                 ca: CertificateAuthority, reports: Reports, ovsdb_targets: Mapping[str, str],
                 db_factory: Callable[[str], HostDbLike] | None = None,
                 poll_interval: float = 0.1, bridge: str = INTEGRATION_BRIDGE,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 io_wait_s: float = IO_WAIT_S,
                 monotonic: Callable[[], float] = time.monotonic,
                 agent_silent_s: float = AGENT_SILENT_S) -> None:
        self.topology = topology
        self.policy = policy
        self.ca = ca
        self.reports = reports
        self.targets = dict(ovsdb_targets)
        self.poll_interval = poll_interval
        self.bridge = bridge
        self.now = now
        self.io_wait_s = io_wait_s
        self.monotonic = monotonic
        # Whether each host's OVSDB answers and its agent's heartbeat goes on: judged on the
        # part's thread, read by `stats` and `waiting_on` from others (under `_lock`).
        self.agent_silent_s = agent_silent_s
        self._watch = HostWatch(agent_silent_s)
        self._health: dict[str, HostHealth] = {}
        # Whose certificate each ssl: server must present (nwc.ovsdbtls has the rule).
        self._identities = {
            target: ServerIdentity.of_host(
                name, target, management_ip=host.management_ip,
                cert_name=host.ovsdb_cert_name)
            for name, target in self.targets.items()
            if (host := topology.hosts.get(name)) is not None}
        self._db_factory = db_factory or self._open_hostdb
        self._links: dict[str, _HostLink] = {}  # used by the part's thread only
        # Why a host's bridge could not be guarded, as last logged (each entry is used only
        # by that host's link thread).
        self._guard_problems: dict[str, str] = {}
        # What of each host's bridge corrections has been said (each used only by that
        # host's link thread): a host undoing them each pass is told about once a minute.
        self._guard_notices: dict[str, bridgeguard.Notices] = {}
        self._lock = threading.Lock()
        self._weaves: dict[str, _WeaveTunnels] = {}
        # host -> leg key -> the first records version seen without its record (None until
        # then): the leg is gone once the agent's ack reaches it and its status is gone.
        self._removing: dict[str, dict[str, int | None]] = {}
        self._tearing: dict[str, set[tuple[str, str]]] = {}  # weave id -> (host, leg key)
        # Per leg end, (weave id, leg key, host): the bytes its SAs carried each way and its
        # rekeys, as totals. An SA's counters are its own (every CHILD SA, a rekey's too,
        # starts from 0) and an agent that lost its state counts rekeys from 0 again; the
        # totals carry each over. `_children`: the CHILD SAs seen per end, newest last, by
        # id, each with its last reading (`_reading`).
        self._sa_bytes = CarriedCounters(2)
        self._rekeys = CarriedCounters(1)
        self._children: dict[tuple[str, str, str], dict[str | None, tuple[int, ...]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open_hostdb(self, target: str) -> HostDbLike:
        return HostDb(target, server_identity=self._identities.get(target))

    # -- Part (called on the weaver's loop) -----------------------------------------------

    def weave_up(self, weave: Weave) -> None:
        legs = self._plan(weave)
        with self._lock:
            self._weaves[weave.id] = _WeaveTunnels(weave, legs)
        if not legs:  # every leg inside one host: nothing to encrypt
            self.reports.ready(weave.id)
        self._wake.set()

    def weave_down(self, weave: Weave) -> None:
        with self._lock:
            for counters in (self._sa_bytes, self._rekeys):
                counters.forget(lambda k: k[0] == weave.id)  # type: ignore[index]
            for key in [k for k in self._children if k[0] == weave.id]:
                del self._children[key]
            held = self._weaves.pop(weave.id, None)
            if held is not None:
                ends = {(end.host, leg.key) for leg in held.legs.values() for end in leg.ends()}
            else:
                # Not planned in this run: a weave of the previous run (left terminating by
                # its stop, or ended at the restart) whose legs may still be on the hosts, or
                # one whose planning failed. Its legs are named by weave and slot; hosts NWC
                # has no OVSDB for never got a record.
                ends = {(host, leg_key(weave.id, leg.slot)) for leg in weave.legs
                        if not leg.local and leg.slot is not None
                        for host in (leg.requester_host, leg.target_host)
                        if host in self.targets}
            for host, key in ends:
                self._removing.setdefault(host, {}).setdefault(key, None)
            if ends:
                self._tearing[weave.id] = ends
        if not ends:  # nothing on any host (every leg local)
            self.reports.down(weave.id)
        self._wake.set()

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        """A reroute keeps every leg's slot, so its tunnel stays; only the fabric changes."""
        legs = self._plan(weave)
        with self._lock:
            held = self._weaves.get(weave.id)
            if held is None:
                return
            held.weave = weave
            for key, leg in legs.items():
                if key not in held.legs or held.legs[key].ends() != leg.ends():
                    held.legs[key] = leg
        self._wake.set()

    def _count(self, weave_id: str, leg_key: str, host: str, status: LegStatus) -> None:
        """Take an end's counters into its totals (under `_lock`)."""
        key = (weave_id, leg_key, host)
        self._rekeys.track(key)
        self._rekeys.observe(key, (status.rekeys,))
        sa = status.sa
        if sa is None or not _end_up(status):
            return  # no SA carries this leg's traffic: its totals stay as they were
        children = self._children.setdefault(key, {})
        reading = _reading(sa)
        seen = children.get(sa.child_id)
        # An id seen before with lower counters or a shorter life than its last reading is
        # another SA: a restarted charon numbers its SAs from 1 again (found in review: the
        # new SA was taken for a replaced one, and the totals froze).
        same = seen is not None and all(now >= then for now, then in zip(reading, seen,
                                                                        strict=True))
        latest = next(reversed(children), None)
        if same and sa.child_id != latest:
            children[sa.child_id] = reading
            return  # an SA already replaced, listed once more: its bytes were counted
        if not same:
            # A new CHILD SA (a rekey, a new negotiation) counts from 0: carry the last.
            self._sa_bytes.restart(key)
            children.pop(sa.child_id, None)
            while len(children) >= MAX_CHILDREN_KEPT:
                del children[next(iter(children))]
        children[sa.child_id] = reading
        self._sa_bytes.observe(key, (sa.bytes_in, sa.bytes_out))

    def _plan(self, weave: Weave) -> dict[str, _Leg]:
        profile = self.policy().profiles.get(weave.profile)
        if profile is None:
            raise TunnelError(f"security profile {weave.profile} is not in the policy")
        legs = {}
        for requester, target in weave_specs(weave, profile, self.topology, self.bridge):
            for end in (requester, target):
                if end.host not in self.targets:
                    raise TunnelError(f"no OVSDB target for host {end.host} "
                                      "(set hosts.NAME.ovsdb in the topology)")
            legs[requester.key] = _Leg(requester, target)
        return legs

    # -- observation (any thread) ---------------------------------------------------------

    def stats(self, weave: Weave) -> dict[str, Any]:
        """The controller's stats source (keys as docs/design.md lists them): `sa_state`
        (established, connecting, rekeying or down: the worst of the legs), `rekeys`, and
        `tunnel_legs` with each leg end's phase, algorithms and counters."""
        with self._lock:
            held = self._weaves.get(weave.id)
            if held is None:
                return {}
            legs = []
            fresh_down = stale = False
            for leg in held.legs.values():
                ends = {}
                for end in leg.ends():
                    st = leg.statuses.get(end.host)
                    sa = st.sa if st else None
                    counted = (weave.id, leg.key, end.host)
                    bytes_in, bytes_out = self._sa_bytes.total(counted)
                    # What a host reported while its agent or OVSDB no longer answers is
                    # the past: shown, and said to be.
                    health = self._health.get(end.host)
                    problem = health.problem() if health is not None else None
                    stale = stale or problem is not None
                    # Not `installed`: an SA being replaced still carries the traffic.
                    fresh_down = fresh_down or (problem is None and not _end_up(st))
                    ends[end.host] = {
                        "phase": st.phase.value if st else "pending",
                        "stale": problem is not None,
                        "stale_reason": problem,
                        "ike_state": sa.ike_state if sa else None,
                        "child_state": sa.child_state if sa else None,
                        "encryption": sa.encryption if sa else None,
                        "key_bits": sa.key_bits if sa else None,
                        "dh_group": sa.dh_group if sa else None,
                        "bytes_in": bytes_in,
                        "bytes_out": bytes_out,
                        "rekeys": self._rekeys.total(counted)[0]}
                legs.append({"slot": leg.requester.slot, "device": leg.requester.device,
                             "requester_host": leg.requester.host,
                             "target_host": leg.target.host, "auth": leg.requester.auth,
                             "installed": leg.installed(),
                             "rekeying": any(_rekeying(leg.statuses.get(e.host))
                                             for e in leg.ends()),
                             "ends": ends})
        if not legs:
            return {}  # every leg inside one host: nothing to measure, so nothing reported
        if fresh_down:
            state = "down" if held.ready else "connecting"
        elif stale:
            state = "unknown"  # the ends that answer are up; the others may be, or not
        elif any(leg["rekeying"] for leg in legs):
            state = "rekeying"
        else:
            state = "established"
        return {"sa_state": state,
                "rekeys": sum(e["rekeys"] for leg in legs for e in leg["ends"].values()),
                "tunnel_legs": legs}

    def waiting_on(self, weave_id: str) -> str | None:
        """What the part still waits for with a weave, host by host, and why where known
        (the weaver puts it in its timeout details): a weave being built waits for leg ends
        without their SA installed, one being torn down for its hosts to confirm legs gone.
        None when it waits for nothing."""
        waits: dict[str, list[str]] = {}
        with self._lock:
            held = self._weaves.get(weave_id)
            if held is not None:
                for leg in held.legs.values():
                    for end in leg.ends():
                        st = leg.statuses.get(end.host)
                        if not _end_up(st):
                            phase = st.phase.value if st else "not reported yet"
                            waits.setdefault(end.host, []).append(f"leg {leg.key} {phase}")
            else:
                for host, key in sorted(self._tearing.get(weave_id, ())):
                    waits.setdefault(host, []).append(f"leg {key} not confirmed removed")
            health = dict(self._health)
        said = []
        for host, what in sorted(waits.items()):
            problem = health[host].problem() if host in health else None
            said.append(f"{host}{', ' + problem if problem else ''}: {', '.join(what)}")
        return "; ".join(said) or None

    def host_health(self) -> dict[str, HostHealth]:
        """Each host's OVSDB and agent as last judged (hosts not read yet are left out)."""
        with self._lock:
            return dict(self._health)

    def drained(self) -> bool:
        """Whether every torn-down leg is confirmed gone by its hosts' agents."""
        with self._lock:
            return not any(self._removing.values())

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nwc-tunnels", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        closing = [link.close() for link in self._links.values()]
        self._links.clear()
        # A host stuck mid-job keeps its own thread (a daemon); nobody waits for it long.
        concurrent.futures.wait(closing, timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                log.exception("tunnel sync failed; retrying")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def sync(self) -> None:
        """One pass: read every involved host, decide, write what changed, report."""
        with self._lock:
            weaves = list(self._weaves.values())
        # Every host, not only those with live legs: records of weaves that ended while the
        # controller was away are found and removed too. (Legs are only ever planned on hosts
        # with a target, so hosts with legs being removed are among them.)
        hosts = set(self.targets)
        reads = {}
        for host in sorted(hosts):
            link = self._link(host)
            job = link.submit(link.read) if link is not None else None
            if job is not None:
                reads[host] = job
        # Hosts that cannot be read this pass are left out: their legs keep what they last
        # said and wait; every other host goes on.
        current: dict[str, dict[str, str]] = {
            host: ids for host, ids in self._collect(reads).items() if ids is not None}
        reports: list[Callable[[], None]] = []
        self._judge_hosts(hosts, current, reports)
        with self._lock:
            for held in weaves:
                if held.weave.id not in self._weaves:
                    continue  # went down meanwhile
                # One weave's surprise (a bug, a host answering nonsense) must not stop the
                # pass: other weaves still get their records, ended ones still lose theirs.
                try:
                    for leg in held.legs.values():
                        self._materialize(leg, current)
                        self._absorb(held, leg, current, reports)
                    self._judge(held, reports)
                except Exception as exc:
                    log.error("weave %s: tunnel decision failed:\n%s", held.weave.id,
                              host_safe_traceback(exc))
                    # The surprise may have been a host's text, quoted in the exception.
                    self._fail_weave(held, "tunnel part could not handle it: "
                                     f"{host_text(repr(exc))}", reports)
            desired = self._desired()
            # Legs whose material is not decided yet keep whatever their hosts hold.
            protected = {RECORD_PREFIX + key for held in self._weaves.values()
                         if not held.failed for key in held.legs}
            for host, pending in self._removing.items():
                if host in current:
                    self._confirm_removals(current[host], pending)
            for weave_id, ends in list(self._tearing.items()):
                ends -= {(h, k) for h, k in ends if k not in self._removing.get(h, ())}
                if not ends:
                    del self._tearing[weave_id]
                    reports.append(lambda w=weave_id: self.reports.down(w))
        writes = {}
        for host, ids in current.items():
            want = desired.get(host, {})
            changed = {k: v for k, v in want.items() if ids.get(k) != v}
            deletes = [k for k in ids if k.startswith(RECORD_PREFIX) and k not in want
                       and k not in protected]
            if changed or deletes:
                link = self._links[host]
                # In the same transaction as the records: what the agent acknowledges.
                link.version = max(link.version, parse_version(ids.get(RECORDS_VERSION_KEY))
                                   or 0) + 1
                changed[RECORDS_VERSION_KEY] = str(link.version)
                job = link.submit(lambda ln=link, c=changed, d=deletes: ln.write(c, d))
                if job is not None:
                    writes[host] = job
        self._collect(writes)  # a write that did not land is redone from the next read
        for report in reports:
            report()

    def _judge_hosts(self, hosts: set[str], current: Mapping[str, Mapping[str, str]],
                     reports: list[Callable[[], None]]) -> None:
        """Whether each host's OVSDB answered and its agent's heartbeat goes on (on this
        part's clock): said once per change, in the log and as a report."""
        mono, wall = self.monotonic(), self.now()
        health = {}
        for host in sorted(hosts):
            for change in self._watch.observe(host, current.get(host), mono, wall):
                what = "agent" if change.kind == "agent" else "OVSDB"
                if change.up:
                    log.info("host %s: %s answers again: %s", host, what, change.detail)
                else:
                    log.warning("host %s: %s not answering: %s; what it last reported is "
                                "shown as stale", host, what, change.detail)
                reports.append(lambda c=change: self.reports.host(c.host, c.kind, c.up,
                                                                  c.detail))
            known = self._watch.health(host)
            if known is not None:
                health[host] = known
        with self._lock:
            self._health = health

    def _link(self, host: str) -> _HostLink | None:
        link = self._links.get(host)
        if link is None and host in self.targets:
            link = self._links[host] = _HostLink(host, self.targets[host], self._db_factory,
                                                 self._guard_bridge)
        return link

    def _guard_bridge(self, host: str, db: HostDbLike) -> None:
        """On the host's link thread: fail_mode and connection_mode of its integration
        bridge (nwc.bridgeguard). A failure never stops the tunnel work: the next pass
        looks again."""
        notices = self._guard_notices.setdefault(host, bridgeguard.Notices())
        try:
            bridgeguard.enforce(db, host, self.bridge, self.reports.bridge, notices,
                                self.monotonic())
        except Exception as exc:
            # The host's server wrote what the exception quotes (a row, an error string).
            problem = host_text(f"{type(exc).__name__}: {exc}")
            if self._guard_problems.get(host) != problem:  # once, not every pass
                log.error("host %s: cannot check or correct bridge %s (%s); retrying every "
                          "pass", host, self.bridge, problem)
            self._guard_problems[host] = problem
            return
        if self._guard_problems.pop(host, None) is not None:
            log.info("host %s: bridge %s checked again", host, self.bridge)

    def _collect(self, jobs: Mapping[str, concurrent.futures.Future[Any]]) -> dict[str, Any]:
        """The results of this pass's jobs that are done, after waiting (at most io_wait_s,
        all hosts together) for those of hosts not already known to be slow. A job still
        running is left to finish on its host's thread, and marks that host slow."""
        concurrent.futures.wait([job for host, job in jobs.items()
                                 if not self._links[host].suspect], timeout=self.io_wait_s)
        results = {}
        for host, job in jobs.items():
            if not job.done():
                if not self._links[host].suspect:
                    log.warning("OVSDB of %s has not answered in %g s; going on without it",
                                host, self.io_wait_s)
                self._links[host].suspect = True
            elif job.exception() is not None:
                log.error("OVSDB job for %s failed", host, exc_info=job.exception())
            else:
                results[host] = job.result()
        return results

    # -- decisions (under the lock) -------------------------------------------------------

    @staticmethod
    def _confirm_removals(ids: Mapping[str, str], pending: dict[str, int | None]) -> None:
        """Drop the legs this host's agent has confirmed gone. No status is not enough: an
        agent in the middle of a pass that read the record before it went still builds the
        leg, and writes its status only at the end (found in review: confirmed ~0.1 s early,
        so the slot went back while the leg was being built)."""
        version = parse_version(ids.get(RECORDS_VERSION_KEY)) or 0
        ack_text = ids.get(AGENT_ACK_KEY)
        ack = parse_version(ack_text)
        for key, since in list(pending.items()):
            if RECORD_PREFIX + key in ids:
                pending[key] = None  # the deletion has not landed (or was undone)
                continue
            if since is None:
                since = pending[key] = version
            if STATUS_PREFIX + key in ids:
                continue
            # An agent that never wrote an ack predates them: its status is all there is.
            if ack_text is None or (ack is not None and ack >= since):
                del pending[key]

    def _materialize(self, leg: _Leg, current: Mapping[str, Mapping[str, str]]) -> None:
        """Decide the leg's key material once both hosts can be read: keep what they already
        agree on (a controller restart must not re-key working tunnels), else draw anew."""
        if leg.materialized or any(end.host not in current for end in leg.ends()):
            return
        found = []
        for end in leg.ends():
            text = current[end.host].get(RECORD_PREFIX + leg.key)
            try:
                found.append(LegRecord.from_json(text) if text else None)
            except TunnelError:
                found.append(None)
        req, tgt = found
        if (req is not None and tgt is not None and req.spec == leg.requester
                and tgt.spec == leg.target and req.psk == tgt.psk):
            leg.psk = req.psk
            leg.start = req.start
            for end, rec in ((leg.requester, req), (leg.target, tgt)):
                if rec.cert_pem is not None and rec.ca_pem == self.ca.cert_pem:
                    leg.certs[end.host] = rec.cert_pem
        elif leg.requester.auth == "psk":
            leg.psk = new_psk()
        leg.materialized = True

    def _absorb(self, held: _WeaveTunnels, leg: _Leg, current: Mapping[str, Mapping[str, str]],
                reports: list[Callable[[], None]]) -> None:
        """Take in both agents' statuses; sign certificate requests."""
        weave = held.weave
        for end in leg.ends():
            if end.host not in current:
                continue  # unreachable this round: keep what it last said
            text = current[end.host].get(STATUS_PREFIX + leg.key)
            if text is None:
                leg.statuses.pop(end.host, None)
                continue
            try:
                status = LegStatus.from_json(text)
            except TunnelError as exc:
                # Not "no news": the controller can no longer tell what this end's SA is
                # doing, and the agent never writes this. An error of the leg, like any other.
                log.warning("weave %s: unreadable status from %s for leg %s: %s", weave.id,
                            end.host, leg.key, exc)
                leg.statuses[end.host] = LegStatus(Phase.ERROR,
                                                   f"unreadable status from the agent: {exc}")
                continue
            if status.applied is not None and status.applied != end:
                continue  # the agent still reports an older build of this leg
            if status.phase is Phase.INSTALLED and not self._sa_is_current(leg, end, status):
                # Its SA belongs to another tunnel (older key material, or an earlier weave
                # on a reused slot): this one has none yet.
                status = dataclasses.replace(
                    status, phase=Phase.DELEGATED if end.backend == "ovs-ipsec"
                    else Phase.CONNECTING, detail="the installed SA is of another tunnel")
            leg.statuses[end.host] = status
            self._count(weave.id, leg.key, end.host, status)
            if (status.phase is Phase.WAITING_CERT and status.csr_pem
                    and leg.csrs.get(end.host) != status.csr_pem):
                try:
                    # Extensions never go past life_ends_at (admission), so neither does
                    # a lease past this certificate.
                    leg.certs[end.host] = self.ca.sign_request(
                        status.csr_pem, end.local_id, now=self.now(),
                        not_after=life_ends_at(weave.created_at))
                    leg.csrs[end.host] = status.csr_pem
                    log.info("weave %s: signed %s's certificate for %s", weave.id, end.host,
                             end.local_id)
                except CaExpired as exc:  # not the host's doing: no security report
                    log.error("weave %s: %s", weave.id, exc)
                    if not held.failed:
                        self._fail_weave(held, f"NWC cannot sign {end.host}'s certificate: "
                                         f"{exc}", reports)
                except CsrRejected as exc:
                    # The reason may quote the request (the name it asks for): host text.
                    detail = (f"host {end.host} asked for a certificate NWC will not sign: "
                              f"{host_text(str(exc))}")
                    if not held.failed:
                        reports.append(lambda d=detail: self.reports.security(
                            weave.id, "csr_rejected", d))
                        self._fail_weave(held, detail, reports)
        responder = leg.statuses.get(leg.target.host)
        if not leg.start and responder is not None and responder.phase in RESPONDER_READY \
                and self._current_material(leg, responder):
            leg.start = True

    def _current_material(self, leg: _Leg, status: LegStatus) -> bool:
        """Whether the target end reports the key material of the record NWC writes for it
        now. A restarted controller that draws a new key finds the responder's status about
        the old one still there: starting IKE on it would fail authentication (found in
        review). An agent that does not report its material is taken at its word."""
        reported = status.extra.get("material")
        return reported is None or reported == self._record(leg, leg.target).fingerprint()

    def _sa_is_current(self, leg: _Leg, end: TunnelSpec, status: LegStatus) -> bool:
        """Whether an end's installed SA is of the tunnel NWC asks for now (`sa_of`): not one
        of an earlier weave on a reused slot (ovs-ipsec), nor one built from key material
        before a restarted controller drew new (strongswan). An agent that does not say
        (older agents) is taken at its word."""
        sa_of = status.extra.get("sa_of")
        return sa_of is None or sa_of == self._record(leg, end).tunnel_id()

    def _record(self, leg: _Leg, end: TunnelSpec) -> LegRecord:
        """The record NWC writes for one end of a leg."""
        x509 = end.auth == "x509"
        return LegRecord(end, leg.psk, self.ca.cert_pem if x509 else None,
                         leg.certs.get(end.host) if x509 else None, leg.start and end.initiator)

    def _fail_weave(self, held: _WeaveTunnels, detail: str,
                    reports: list[Callable[[], None]]) -> None:
        """Stop building the weave and tell the weaver (once), which then ends it."""
        if held.failed:
            return
        held.failed = True
        weave_id = held.weave.id
        reports.append(lambda: self.reports.failed(weave_id, detail))

    def _judge(self, held: _WeaveTunnels, reports: list[Callable[[], None]]) -> None:
        weave = held.weave
        if held.failed:
            return
        for leg in held.legs.values():
            for end in leg.ends():
                st = leg.statuses.get(end.host)
                if st is None:
                    continue
                where = f"leg {end.host}-{end.peer_host} (slot {end.slot}) on {end.host}"
                if st.phase is Phase.AUTH_FAILED and st.sa is not None and st.sa.installed:
                    # Replacing an SA built from earlier key material failed authentication;
                    # that SA still encrypts, so the agent keeps it and the weave goes on
                    # over it. A security event, once, as for any authentication failure.
                    if end.host not in leg.refusal_reported:
                        leg.refusal_reported.add(end.host)
                        detail = f"IKE authentication failed replacing the SA, {where}: " \
                                 f"{st.detail}"
                        reports.append(lambda d=detail: self.reports.security(
                            weave.id, "ike_failure", d))
                    continue
                leg.refusal_reported.discard(end.host)
                if st.phase is Phase.AUTH_FAILED:
                    held.failed = True
                    detail = f"IKE authentication failed, {where}: {st.detail}"
                    reports.append(lambda d=detail: self.reports.security(
                        weave.id, "ike_failure", d))
                    reports.append(lambda d=detail: self.reports.failed(weave.id, d))
                    return
                if st.phase is Phase.ERROR:
                    held.failed = True
                    detail = f"{where}: {st.detail}"
                    reports.append(lambda d=detail: self.reports.failed(weave.id, d))
                    return
        if not held.ready:
            if all(leg.up() for leg in held.legs.values()):
                held.ready = True
                reports.append(lambda: self.reports.ready(weave.id))
            return
        for leg in held.legs.values():
            for end in leg.ends():
                st = leg.statuses.get(end.host)
                up = _end_up(st)
                where = f"leg {end.host}-{end.peer_host} (slot {end.slot}) on {end.host}"
                if not up and end.host not in leg.down_reported:
                    leg.down_reported.add(end.host)
                    phase = st.phase.value if st else "no report"
                    detail = (f"{where}: SA not installed ({phase}); the leg's traffic is "
                              "dropped until it is back")
                    reports.append(lambda d=detail: self.reports.security(weave.id, "sa_down",
                                                                          d))
                elif up and end.host in leg.down_reported:
                    leg.down_reported.discard(end.host)
                    reports.append(lambda w=where: self.reports.security(
                        weave.id, "sa_restored", f"{w}: SA installed again"))

    def _desired(self) -> dict[str, dict[str, str]]:
        """Every record each host should hold, as the exact JSON text."""
        want: dict[str, dict[str, str]] = {}
        for held in self._weaves.values():
            if held.failed:
                continue  # the weaver is ending it; don't keep building
            for leg in held.legs.values():
                if not leg.materialized:
                    continue
                for end in leg.ends():
                    want.setdefault(end.host, {})[RECORD_PREFIX + leg.key] = \
                        self._record(leg, end).to_json()
        return want


def _reading(sa: SaInfo) -> tuple[int, ...]:
    """What only grows while one CHILD SA lives: its byte counters and its age."""
    return sa.bytes_in, sa.bytes_out, sa.installed_s


def _end_up(status: LegStatus | None) -> bool:
    """Whether an SA carries the end's traffic (its counters are the end's)."""
    return status is not None and (status.phase is Phase.INSTALLED or status.carrying)


def _rekeying(status: LegStatus | None) -> bool:
    return status is not None and status.sa is not None and status.sa.rekeying


# -- `nwc run` --------------------------------------------------------------------------------

def tunnels_for(controller: Any, ovsdb_targets: Mapping[str, str] | None = None,
                **kwargs: Any) -> Tunnels:
    """A Tunnels part wired to a controller: its CA in <state-dir>/pki, reports posted to
    its loop, OVSDB targets from the topology unless given."""
    topology = controller.config.topology
    targets = dict(ovsdb_targets) if ovsdb_targets is not None else {
        h.name: h.ovsdb for h in topology.hosts.values() if h.ovsdb}
    ca = CertificateAuthority.load_or_create(Path(controller.state_dir) / "pki")
    part = Tunnels(topology=topology, policy=lambda: controller.weaver.policy, ca=ca,
                   reports=WeaverReports(controller), ovsdb_targets=targets, **kwargs)
    controller.stats_sources.append(part.stats)
    controller.host_sources.append(part.host_health)
    return part


def serve(controller: Any, args: argparse.Namespace) -> None:
    """Attach the tunnel part to a running controller (`nwc run` calls this). Without any
    host OVSDB in the topology (an admission-only run) there is nothing to drive. An ssl:
    target without --ovsdb-ssl-* stops `nwc run` at once: retrying could never succeed, and
    falling back to tcp: would put the keys on the wire."""
    from nwc.run import StartRefused

    targets = {h.name: h.ovsdb for h in controller.config.topology.hosts.values() if h.ovsdb}
    if not targets:  # before tunnels_for, which creates the CA: nothing would use it
        log.info("no host has an OVSDB target (hosts.NAME.ovsdb): tunnels are not driven")
        return
    try:
        configure_targets(getattr(args, "ovsdb_ssl_key", None),
                          getattr(args, "ovsdb_ssl_cert", None),
                          getattr(args, "ovsdb_ssl_ca", None), targets.values())
    except OvsdbConfigError as exc:
        raise StartRefused(str(exc)) from None
    part = tunnels_for(controller, targets, agent_silent_s=getattr(
        args, "agent_unresponsive_after", AGENT_SILENT_S))
    controller.call(controller.weaver.attach_part, part)
    part.start()
    controller.on_stop(part.stop)
    log.info("tunnels: driving %d hosts' OVSDBs (an agent whose heartbeat stops for %g s is "
             "called unresponsive)", len(part.targets), part.agent_silent_s)
