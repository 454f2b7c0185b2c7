"""The OpenFlow 1.3 shell: an os-ken app that connects switches to NWC's pure compiler.

Two pieces:

- `FlowsApp`, the os-ken app. It only receives: switch up/down, port descriptions and status,
  meter lists, errors, barrier and statistics replies. It hands each to the attached
  `FlowsPart` and never computes a flow.
- `FlowsPart`, the weaver `Part` named "flows". Everything that decides what a switch holds
  runs on the weaver's loop thread (weave_up/down/moved are called there; switch events are
  posted there), so programming a switch never races a weave change. It compiles with
  `nwc.pipeline`, sends with `nwc.ofmessages` (meters first, then one atomic ordered bundle,
  then a barrier) and reports `part_ready` once every switch a weave uses confirmed it.

Every accepted connection is wrapped by `nwc.ofguard.GuardedSocket`, so malformed or
unexpected OpenFlow never reaches os-ken's parser (which can loop forever on some). Over TLS,
a switch is taken for the topology switch whose datapath id it announces only if its
certificate names that switch (`switch_identity`; `--ofp-cert-names`). Nothing
NWC sends waits on a switch's socket: messages go into the connection's `Outbox`, which a
thread of its own writes out (see there).
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import (
    CONFIG_DISPATCHER,
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    set_ev_cls,
)
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from nwc import ofguard, oftls
from nwc.certnames import CertIdentity
from nwc.counters import CarriedCounters
from nwc.ofmessages import (
    install_messages,
    refresh_messages,
    remove_messages,
    sync_messages,
    weaves_sync_messages,
)
from nwc.pipeline import (
    DELIVERED_ROLES,
    DIRECTIONS,
    KIND_SHIFT,
    KIND_WEAVE,
    MAX_HARD_TIMEOUT_S,
    METER_SPACE,
    OWNER_MASK,
    ROLE_DROP,
    DesiredState,
    DroppedTraffic,
    Flow,
    Meter,
    Program,
    compile_base,
    compile_weave,
    cookie_owner,
    drop_labels,
    fabric_link_of_port,
    meter_collisions,
    meter_id,
    switch_name,
    weave_cookie,
    weave_switches,
)
from nwc.topology import Topology, Vm
from nwc.weave import Weave

log = logging.getLogger(__name__)
# A switch refused for its certificate retries about once a second: its refusal is logged
# at most this often, with a count of the refusals in between.
REFUSAL_LOG_EVERY_S = 60.0

MAX_CONNECTIONS = 256  # more peers than any fabric NWC runs: the rest are refused
# os-ken asks every switch for an echo this often and hangs up after this many unanswered,
# so a connection that said nothing for LIVE_PEER_S is not a live switch any more.
ECHO_INTERVAL_S = 5
ECHO_UNANSWERED = 3
LIVE_PEER_S = 15.0
# Statistics: one flow-stats and one meter-stats request per switch answers for every weave
# on it, one more flow-stats request for its counting drops, and the answer is reused for
# STATS_CACHE_S (so a scrape of N weaves asks each switch once); a
# caller waits at most STATS_TIMEOUT_S for all its switches together, and a switch that did
# not answer in time is not asked again (nor waited for) until STATS_CACHE_S later.
STATS_TIMEOUT_S = 2.0
STATS_CACHE_S = 5.0
MAX_STATS_KEYS = 2**17  # (weave, direction), meter and drop counters kept from one reply
MAX_METERS = 2**18  # userspace OVS holds at most 262,144 meters: a switch reporting more lies
# Bytes that may wait for one switch. A full resync of a large host is a few MB; a switch this
# far behind is not reading, and is dropped (it gets a full resync when it reconnects).
MAX_OUTBOX_BYTES = 64 * 2**20
# Weave flows carry the lease as hard_timeout, which OpenFlow caps at 65,535 s (~18.2 h). A
# longer lease has its flows installed again this long before the capped timeout runs out,
# checked every REFRESH_POLL_S.
REFRESH_MARGIN_S = 600
REFRESH_POLL_S = 60.0


def _loud(fn: Callable[..., Any]) -> Callable[..., Any]:
    """os-ken's event loop swallows exceptions; NWC logs each with what it was handling."""
    def wrapper(self: Any, ev: Any, *args: Any) -> Any:
        try:
            return fn(self, ev, *args)
        except Exception:
            dp = getattr(getattr(ev, "msg", None), "datapath", None) or \
                getattr(ev, "datapath", None)
            log.error("handler %s failed for switch %s on %s:\n%s", fn.__name__,
                      f"{dp.id:#x}" if dp is not None and dp.id else "?",
                      type(ev).__name__, traceback.format_exc())
            return None
    wrapper.__name__ = fn.__name__
    return wrapper


class Outbox:
    """Messages on their way to one switch, written out by a thread of their own.

    os-ken's `Datapath.send` blocks once 16 messages wait, and its writer sits in `sendall`
    while the peer does not read: whoever sends to a slow switch would wait with it. So
    senders (the weaver's loop, statistics requests, os-ken's event thread) only serialise
    and queue here; this thread alone waits on the switch. The queue is bounded in bytes: on
    overflow the connection is dropped rather than grown.
    """

    def __init__(self, datapath: Any) -> None:
        self._dp = datapath
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, msgs: Iterable[Any]) -> bool:
        """Queue messages (their xids set) in order. False: the connection is closed, or was
        just dropped because it would exceed MAX_OUTBOX_BYTES."""
        bufs = []
        for msg in msgs:
            msg.serialize()
            bufs.append(bytes(msg.buf))
        size = sum(len(b) for b in bufs)
        with self._cond:
            if self._closed:
                return False
            # A batch is taken whenever nothing waits, however large: a big but healthy
            # switch is never dropped for the size of its own program.
            if not self._items or self._bytes + size <= MAX_OUTBOX_BYTES:
                self._items.extend(bufs)
                self._bytes += size
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._drain, name=f"nwc-of-out-{_peer(self._dp)}", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
                return True
            queued = self._bytes
        log.warning("switch %s at %s is not reading: %d bytes wait for it and %d more would "
                    "exceed %d; dropping the connection (it is resynced when it reconnects)",
                    _dpid_text(self._dp), _peer(self._dp), queued, size, MAX_OUTBOX_BYTES)
        _close(self._dp)
        return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once everything queued was handed to the socket (or the outbox closed)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (not self._items and not self._busy), timeout)

    def _drain(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closed)
                if self._closed:
                    return
                buf = self._items.popleft()
                self._busy = True
            try:
                sent = bool(self._dp.send(buf))
            except Exception:
                log.debug("writing to %s", _peer(self._dp), exc_info=True)
                sent = False
            with self._cond:
                self._busy = False
                if not self._closed:
                    self._bytes -= len(buf)
                self._cond.notify_all()
            if not sent:
                # os-ken's writer gave up (socket error or timeout): the connection is half
                # dead; end it so the switch reconnects into a resync.
                _close(self._dp)
                return


# One outbox per connection; FlowsApp removes it when os-ken reports the connection dead.
_outboxes: dict[Any, Outbox] = {}
_outboxes_lock = threading.Lock()


def outbox_of(datapath: Any) -> Outbox:
    """The one outbox of a connection (created on first use)."""
    with _outboxes_lock:
        box = _outboxes.get(datapath)
        if box is None:
            box = _outboxes[datapath] = Outbox(datapath)
        return box


def _peer(datapath: Any) -> str:
    address = getattr(datapath, "address", None)
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def _dpid_text(datapath: Any) -> str:
    dpid = getattr(datapath, "id", None)
    return f"{dpid:#x}" if isinstance(dpid, int) else "?"


CERT_NAMES_MATCH = "match"  # --ofp-cert-names (the other value, "any", turns the check off)


def switch_identity(topology: Topology, kind: str, name: str) -> CertIdentity:
    """Whose certificate a connection announcing this topology switch's dpid must present.

    A host's br-int: the host's certificate, as its OVSDB server's (one key pair serves both,
    `ovs-vsctl set-ssl`): its name or `ovsdb_cert_name`, or one of its addresses. A fabric
    switch: its name or `cert_name` (one certificate serves every bridge of an OVS). Without
    this, any holder of a switch-CA certificate (every compute host) could claim a fabric
    switch's dpid and be given its program."""
    if kind == "host":
        host = topology.hosts[name]
        return CertIdentity.of_host(name, host.ovsdb or "", management_ip=host.management_ip,
                                    cert_name=host.ovsdb_cert_name, peer="switch")
    return CertIdentity.of_switch(name, topology.switches[name].cert_name)


@dataclass
class Batch:
    """Messages sent to one switch, confirmed by the barrier that follows them."""

    kind: str  # "sync", "weave", "refresh", "remove"
    xids: set[int]
    weaves: dict[str, int]  # weave id -> generation this batch installs
    errors: list[str] = field(default_factory=list)
    removes: tuple[str, ...] = ()  # terminated weaves whose flows this batch removes
    # live weaves that moved off this switch, whose flows this batch removes (a removal, or a
    # resync leaving them out) -> generation
    moved_off: dict[str, int] = field(default_factory=dict)
    # Weave numbers whose flows this batch deletes and adds again, so their counters start
    # from 0 (FlowsPart.counters carries them over at its barrier); and those whose flows
    # it removes for good (a teardown: what they counted here is no longer anyone's).
    restarts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()  # xids of the statistics read just before this batch
    # It replaces the switch's base flows (deletes every flow first): the counting drops
    # among them start from 0 again (FlowsPart.drop_counters carries them at its barrier).
    base: bool = False


@dataclass
class Removal:
    """A terminated weave whose flows and meters are not yet confirmed gone everywhere."""

    weave: Weave
    # dpids still to confirm: by the barrier of the removal batch, or, for a switch that was
    # away or dropped before that barrier, by the barrier of its resync on reconnect.
    waiting: set[int]


@dataclass
class SwitchStats:
    """One switch's counters for every weave on it, from one flow-stats and one meter-stats
    request, and (when `xids` asks for "drops") those of its counting drops. Filled by
    os-ken's thread; `done` once every reply ended or NWC gave up."""

    xids: dict[int, str]  # request xid -> "flows", "meters" or "drops", while its reply runs
    delivered: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    dropped: dict[int, int] = field(default_factory=dict)  # meter id -> bytes its bands dropped
    # (cookie, in_port or None) -> [bytes, packets] of each counting drop flow
    drops: dict[tuple[int, int | None], list[int]] = field(default_factory=dict)
    reads_drops: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    complete: bool = False
    fresh_until: float | None = None  # clock.monotonic(); None while the requests run
    numbers: frozenset[int] | None = None  # the weaves it reads (None: every one)

    def add(self, kind: str, entries: Iterable[Any]) -> None:
        for entry in entries:
            if kind == "meters":
                if entry.meter_id in self.dropped or len(self.dropped) < MAX_STATS_KEYS:
                    self.dropped[entry.meter_id] = sum(b.byte_band_count
                                                       for b in entry.band_stats)
                continue
            if kind == "drops":
                # One flow per key (a drop per port, per IVN, per switch), so a key's
                # counters are one flow's and restart together (CarriedCounters).
                drop_key = (entry.cookie, entry.match.get("in_port"))
                if drop_key in self.drops or len(self.drops) < MAX_STATS_KEYS:
                    self.drops[drop_key] = [entry.byte_count, entry.packet_count]
                continue
            kind_of, number = cookie_owner(entry.cookie)
            role = entry.cookie & 0xFF
            direction = next((d for d, roles in DELIVERED_ROLES.items() if role in roles), None)
            if kind_of != KIND_WEAVE or direction is None:
                continue
            key = (number, direction)
            if key not in self.delivered and len(self.delivered) >= MAX_STATS_KEYS:
                continue
            counts = self.delivered.setdefault(key, [0, 0])
            counts[0] += entry.byte_count
            counts[1] += entry.packet_count


@dataclass
class HostCounters:
    """One host switch's weave counters carried across re-installs, keyed (weave number,
    direction): what the weave's flows delivered there (bytes, packets) and what its meters
    dropped (bytes)."""

    delivered: CarriedCounters = field(default_factory=lambda: CarriedCounters(2))
    dropped: CarriedCounters = field(default_factory=lambda: CarriedCounters(1))

    def restart(self, number: int) -> None:
        """The weave's flows and meters were installed afresh: both count from 0 again."""
        for d in DIRECTIONS:
            self.delivered.restart((number, d))
            self.dropped.restart((number, d))

    def discard(self, number: int) -> None:
        """The weave's flows are gone from this switch: what they counted is nobody's."""
        for d in DIRECTIONS:
            self.delivered.discard((number, d))
            self.dropped.discard((number, d))


@dataclass(frozen=True)
class SwitchConnection:
    """One switch's (or host bridge's) OpenFlow connection as the flows part knows it now."""

    kind: str  # "host" (its br-int) or "fabric"
    # Its connection is up and the barrier of its resync is back: it holds what NWC wants.
    connected: bool
    # Why it is not, where known: "not connected", "not connected: refused for its
    # certificate", "connected, resync not confirmed"; "connected" when it is.
    detail: str


@dataclass
class SwitchConn:
    datapath: Any
    dpid: int
    kind: str  # "host" or "fabric"
    name: str
    outbox: Outbox
    ports: dict[str, int] = field(default_factory=dict)
    meters: set[int] = field(default_factory=set)  # meter ids present on the switch
    synced: bool = False
    batches: dict[int, Batch] = field(default_factory=dict)  # barrier xid -> batch
    xids: itertools.count = field(default_factory=lambda: itertools.count(0x4E570000))
    bundles: itertools.count = field(default_factory=lambda: itertools.count(1))
    stats: SwitchStats | None = None  # the latest statistics request and its answer
    reads: dict[int, SwitchStats] = field(default_factory=dict)  # xid -> a read before a batch
    # The base program (everything but weaves) of the last resync, so that a fabric link
    # change resyncs only the switches whose base it changes.
    base: tuple[tuple[Flow, ...], tuple[Meter, ...]] | None = None
    # The barrier of its first resync is back: only then does the switch hold what NWC
    # wants (until then it may hold a previous run's tables, or nothing). Under the lock.
    resynced: bool = False

    def next_xid(self) -> int:
        return next(self.xids) & 0xFFFFFFFF


class FlowsPart:
    """The weaver part "flows". Methods without `on_` run on the weaver's loop thread."""

    name = "flows"
    confirms_teardown = True  # a terminated weave is terminating until its flows are gone

    def __init__(self, controller: Any, cert_names: str = CERT_NAMES_MATCH) -> None:
        self.controller = controller
        self.weaver = controller.weaver
        # CERT_NAMES_MATCH: a TLS switch's certificate must name the switch it claims to be.
        self.check_cert_names = cert_names == CERT_NAMES_MATCH
        # dpid -> why its last claimant was refused for its certificate: a claimant retrying
        # with the same certificate raises one security event, not one per reconnect, and
        # a timeout or the fabric view can say why the switch is not connected. Bounded by
        # the topology's switches. Written on the loop, under `lock` (read from others).
        self._identity_refused: dict[int, str] = {}
        # dpid -> [when the last refusal was logged (weaver's monotonic clock), refusals not
        # logged since]: an impostor retrying each second must not fill the log. Loop only.
        self._refusal_logged: dict[int, list[float]] = {}
        # guards `switches`, their batches and statistics, and `_identity_refused`
        self.lock = threading.Lock()
        self.switches: dict[int, SwitchConn] = {}
        self.pending: dict[str, set[int]] = {}  # weave id -> dpids not yet confirmed
        self.generation: dict[str, int] = {}
        # weave id -> dpid -> when the flows installed there run out while the lease goes
        # on (only weaves whose lease outlasts MAX_HARD_TIMEOUT_S). Loop thread only.
        self.capped: dict[str, dict[int, datetime]] = {}
        # weave id -> dpids a batch with its flows was queued for in this run, or, for a weave
        # recovered at a restart, that the previous run may have sent them to: where they may
        # be, whether or not that switch is connected now. Loop thread only.
        self.placed: dict[str, set[int]] = {}
        # weave id -> the switches off its current paths that it may still be on (`placed`
        # for a live weave, its removal's `waiting` for an ending one), as last saved to the
        # store: a restart knows the current paths from the weave's record, but only this
        # says that a switch of an earlier path never confirmed the removal (it was away when
        # the weave moved). Saved in one transaction per burst of changes (`_off_path_save`,
        # posted to the loop), not one per weave moved or barrier. Loop thread only.
        self._off_path_saved: dict[str, frozenset[int]] = {}
        self._off_path_changed: set[str] = set()
        self._off_path_save_posted = False
        # weave id -> its removal still to be confirmed. A switch that drops keeps the
        # weave's flows (fail_mode=secure) until it reconnects and its resync removes them,
        # so a drop never confirms; the weaver's teardown timeout bounds the wait. Loop only.
        self.removing: dict[str, Removal] = {}
        # Host switch dpid -> what each weave's flows delivered there and its meters dropped:
        # totals since the weave came up, carried across every re-install (which restarts the
        # flows' counters). Host switches only: weave_stats sums those, and a fabric switch's
        # counters would only cost a statistics read before each of its re-installs. Per
        # switch, so that a reading touches only its own switch's keys. Fed in the order the
        # switch answered (statistics replies, then the barrier of the batch that
        # re-installed), on os-ken's thread; guarded by `lock`.
        self.counters: dict[int, HostCounters] = {}
        # Switch dpid -> what each of its counting drops refused, keyed (cookie, in_port),
        # carried like the weave counters: a resync deletes every flow and adds them again
        # (a reconnect, a fabric link change, a VM plugged, a policy reload), which would
        # otherwise take an exported counter back to 0 with the controller still running,
        # and Prometheus' rate() would read that as one more reset among real ones. Every
        # switch (fabric ones too); keys bounded by its drop flows, themselves by the
        # topology. Kept across reconnects. Guarded by `lock`.
        self.drop_counters: dict[int, CarriedCounters] = {}
        self._stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------

    def attach(self) -> None:
        """On the loop: join the weaver (which hands over every live weave and makes the ones
        still provisioning wait for "flows"); each switch's resync confirms them."""
        # A previous run may have installed the live weaves (recovered from the store) on
        # their switches, which keep them (fail_mode=secure) until their resync here: a
        # teardown must wait for those as for a switch that dropped in this run. They are the
        # switches of the current paths, and those of earlier paths that the previous run
        # saved as not confirmed (the weave moved off them while they were away). The same
        # holds for the weaves of the previous run whose teardown is under way (left
        # terminating by its stop, or ended at recovery): attach_part hands them to
        # weave_down, which then waits for each of those switches' resync. A switch no longer
        # in the topology is not waited for (it can never be resynced here).
        topology = self.weaver.topology
        saved = self.weaver.store.off_path_flows()
        self._off_path_saved = {w: frozenset(dpids) for w, dpids in saved.items()}
        for weave in [*self.weaver.live.values(), *self.weaver.inherited_teardowns()]:
            elsewhere = {d for d in saved.get(weave.id, ())
                         if switch_name(topology, d) is not None}
            self.placed[weave.id] = weave_switches(topology, weave) | elsewhere
        self.weaver.attach_part(self)
        # Records of weaves that ended since, or of switches that left the topology, go.
        self._off_path_changed.update(saved)
        self._off_path_save()
        timer = threading.Thread(target=self._refresh_timer, name="nwc-flows-refresh",
                                 daemon=True)
        timer.start()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            conns = list(self.switches.values())
            self.switches.clear()
        for conn in conns:
            _close(conn.datapath)

    def flush(self, timeout: float, only: Iterable[int] | None = None) -> bool:
        """Wait until what was queued for the connected switches (or those of `only`) was
        handed to their sockets. For tests and orderly shutdowns; the loop never waits."""
        with self.lock:
            boxes = [c.outbox for c in self.switches.values() if only is None or c.dpid in only]
        return all(box.wait_idle(timeout) for box in boxes)

    # -- desired state ----------------------------------------------------------------------

    def state(self) -> DesiredState:
        w = self.weaver
        return DesiredState(w.policy, w.topology, tuple(w.live.values()), w.clock.now(),
                            frozenset(w.fabric.down))

    def _want(self, weave: Weave) -> set[int]:
        dpids = weave_switches(self.weaver.topology, weave)
        self.generation[weave.id] = self.generation.get(weave.id, 0) + 1
        self.pending[weave.id] = set(dpids)
        return dpids

    # -- the Part protocol (loop thread) ------------------------------------------------------

    def weave_up(self, weave: Weave) -> None:
        self._program(weave)

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        topo = self.weaver.topology
        gone = weave_switches(topo, old) - weave_switches(topo, weave)
        self._program(weave)
        meters = self._own_meters(old)
        for dpid in gone:
            self._remove_from(dpid, old, meters)
        self._off_path_note(weave.id)  # until their barriers confirm, `gone` may hold it

    def weave_down(self, weave: Weave) -> None:
        self._forget_counts(weave.number)
        self.pending.pop(weave.id, None)
        self.generation.pop(weave.id, None)
        self.capped.pop(weave.id, None)
        # Removals the weaver stopped waiting for (its teardown timeout passed) are not kept
        # for a switch that may never come back; its resync removes their flows all the same.
        for weave_id in [w for w in self.removing if not self.weaver.tearing_down(w)]:
            del self.removing[weave_id]
            self._off_path_note(weave_id)
        placed = self.placed.pop(weave.id, set())
        meters = self._own_meters(weave)
        sent = {dpid for dpid in sorted(weave_switches(self.weaver.topology, weave) | placed)
                if self._remove_from(dpid, weave, meters, teardown=True)}
        # A switch that was sent the weave's flows but is away now still holds them: it
        # confirms with its resync when it is back.
        waiting = sent | placed
        self._off_path_note(weave.id)
        if waiting:
            self.removing[weave.id] = Removal(weave, waiting)
        else:  # never sent anywhere: nothing to wait for (posted: _end is still running)
            self.controller.loop.post(self.weaver.part_down, weave.id, self.name)

    def _removed(self, dpid: int, weave_ids: Iterable[str]) -> None:
        """On the loop: a barrier from `dpid` confirmed these weaves' flows gone there."""
        for weave_id in weave_ids:
            removal = self.removing.get(weave_id)
            if removal is None:
                continue
            removal.waiting.discard(dpid)
            self._off_path_note(weave_id)
            if not removal.waiting:
                del self.removing[weave_id]
                self.weaver.part_down(weave_id, self.name)

    def _unplaced(self, dpid: int, weaves: dict[str, int]) -> None:
        """On the loop: a barrier from `dpid` confirmed the flows of weaves that moved off it
        gone there, so their teardown need not wait for it (should it be away by then). Not
        for a weave changed since (its generation): it may have been sent there again after
        this removal."""
        for weave_id, generation in weaves.items():
            placed = self.placed.get(weave_id)
            if placed is not None and self.generation.get(weave_id) == generation:
                placed.discard(dpid)
                self._off_path_note(weave_id)

    def _off_path(self, weave_id: str) -> frozenset[int]:
        """The switches off the weave's current paths that may still hold its flows."""
        weave = self.weaver.live.get(weave_id)
        removal = self.removing.get(weave_id)
        if weave is not None:
            holders = self.placed.get(weave_id, set())
        elif removal is not None:
            weave, holders = removal.weave, removal.waiting
        else:
            return frozenset()
        return frozenset(holders - weave_switches(self.weaver.topology, weave))

    def _off_path_note(self, weave_id: str) -> None:
        """What may hold the weave off its paths may have changed: saved with the next burst."""
        self._off_path_changed.add(weave_id)
        if not self._off_path_save_posted:
            self._off_path_save_posted = True
            self.controller.loop.post(self._off_path_save)

    def _off_path_save(self) -> None:
        """On the loop: save what changed in `_off_path` since the last save, in one
        transaction. Written just after the change that caused it (a crash in between forgets
        only that change); one that fails is logged and retried with the next change."""
        self._off_path_save_posted = False
        changed, self._off_path_changed = self._off_path_changed, set()
        writes = {w: now for w in sorted(changed)
                  if (now := self._off_path(w)) != self._off_path_saved.get(w, frozenset())}
        if not writes:
            return
        store = self.weaver.store
        try:
            with store.transaction():
                for weave_id, dpids in writes.items():
                    store.save_off_path_flows(weave_id, dpids)
        except Exception:
            log.exception("could not save which switches off their paths may hold weaves "
                          "%s; retried with the next change", ", ".join(writes))
            self._off_path_changed.update(writes)
            return
        for weave_id, dpids in writes.items():
            if dpids:
                self._off_path_saved[weave_id] = dpids
            else:
                self._off_path_saved.pop(weave_id, None)

    def waiting_on(self, weave_id: str) -> str | None:
        """What the part still waits for with a weave, switch by switch, and why where known
        (the weaver puts it in its timeout details): a weave being built waits for the
        switches of its paths that have not confirmed its flows, one being torn down for
        those that have not confirmed them gone. None when it waits for nothing. On the loop
        (which alone changes `pending` and `removing`); the lock is held only to read the
        connections."""
        if weave_id in self.pending:
            dpids, what = set(self.pending[weave_id]), None
        elif weave_id in self.removing:
            dpids, what = set(self.removing[weave_id].waiting), "removal not confirmed"
        else:
            return None
        states = self._connections(dpids)
        said = []
        for dpid in dpids:
            kind_name = switch_name(self.weaver.topology, dpid)
            name = kind_name[1] if kind_name is not None else f"{dpid:#x}"
            connected, detail = states[dpid]
            if connected:  # resynced, yet still waited for: its batch's barrier is not back
                detail = "connected, barrier not back"
            said.append(f"{name}: {detail}{', ' + what if what else ''}")
        return "; ".join(sorted(said)) or None

    def switch_connections(self) -> dict[str, SwitchConnection]:
        """Every switch and host bridge of the topology, by name, with its connection (for
        metrics and the fabric view). Any thread: the lock is held only to read."""
        topology = self.weaver.topology  # replaced whole, never changed in place
        named = {h.dpid: ("host", h.name) for h in topology.hosts.values()}
        named.update({s.dpid: ("fabric", s.name) for s in topology.switches.values()})
        states = self._connections(named)
        return {name: SwitchConnection(kind, *states[dpid])
                for dpid, (kind, name) in sorted(named.items(), key=lambda i: i[1][1])}

    def _connections(self, dpids: Iterable[int]) -> dict[int, tuple[bool, str]]:
        """Each of these switches' `SwitchConnection.connected` and `detail`."""
        out = {}
        with self.lock:
            for dpid in dpids:
                conn = self.switches.get(dpid)
                if conn is not None:
                    out[dpid] = (conn.resynced, "connected" if conn.resynced
                                 else "connected, resync not confirmed")
                    continue
                # Not the certificate's problem itself: a timeout's detail goes to tenants,
                # and whose certificate was presented is for operators (the security event).
                out[dpid] = (False, "not connected: refused for its certificate"
                             if dpid in self._identity_refused else "not connected")
        return out

    def _removals_at(self, dpid: int) -> list[Removal]:
        return [r for _, r in sorted(self.removing.items()) if dpid in r.waiting]

    def _program(self, weave: Weave) -> None:
        state = self.state()
        keeper = meter_collisions(state.weaves).get(weave.id)
        if keeper is not None:
            self._refuse(weave, self._collision(weave, keeper))
            return
        for dpid in sorted(self._want(weave)):
            conn = self._conn(dpid)
            if conn is None or not conn.synced:
                continue  # confirmed by that switch's resync when it (re)connects
            self._install(conn, weave, compile_weave(state, weave, dpid, conn.ports), state.now)

    def _install(self, conn: SwitchConn, weave: Weave, program: Program, now: datetime) -> None:
        """One weave's flows and meters onto one switch, confirmed by the batch's barrier."""
        msgs = install_messages(conn.datapath, program, weave_cookie(weave.number), conn.meters,
                                next(conn.bundles))
        self.placed.setdefault(weave.id, set()).add(conn.dpid)  # even if it drops at once
        if self._send(conn, "weave", msgs, {weave.id: self.generation.get(weave.id, 0)},
                      conn.meters | {m.meter_id for m in program.meters},
                      restarts=(weave.number,)):
            self._installed(weave, conn.dpid, now)

    def _own_meters(self, weave: Weave) -> set[int]:
        """The weave's meter ids that no other live weave holds. Ids are shared by weave
        numbers METER_SPACE apart: never delete the meters of a live weave (OVS would delete
        its flows with them) for one that was refused."""
        if any(w.id != weave.id for w in self.weaver.live.values()
               if w.number % METER_SPACE == weave.number % METER_SPACE):
            return set()
        return {meter_id(weave.number, d) for d in DIRECTIONS}

    def _remove_from(self, dpid: int, weave: Weave, meters: set[int],
                     teardown: bool = False) -> bool:
        """Queue the removal of a weave's flows and of `meters` (its own) on one switch;
        whether a batch went out (its barrier will confirm it)."""
        conn = self._conn(dpid)
        if conn is None or not conn.synced:
            return False  # its resync will not bring the weave back
        self.capped.get(weave.id, {}).pop(dpid, None)
        ids = meters & conn.meters
        msgs = remove_messages(conn.datapath, weave_cookie(weave.number), ids,
                               next(conn.bundles))
        if teardown:
            return self._send(conn, "remove", msgs, {}, conn.meters - ids, removes=(weave.id,),
                              ends=(weave.number,))
        # The weave moved off this switch: once its barrier is back, the switch holds none of
        # its flows, and a teardown need not wait for it.
        return self._send(conn, "remove", msgs, {}, conn.meters - ids,
                          moved_off={weave.id: self.generation.get(weave.id, 0)})

    # -- leases longer than a hard timeout (loop thread) ---------------------------------------

    def _installed(self, weave: Weave, dpid: int, now: datetime) -> None:
        """Remember when a weave's flows on `dpid` run out if their timeout was capped."""
        if (weave.expires_at - now).total_seconds() > MAX_HARD_TIMEOUT_S:
            self.capped.setdefault(weave.id, {})[dpid] = now + timedelta(
                seconds=MAX_HARD_TIMEOUT_S)
        elif weave.id in self.capped:
            self.capped[weave.id].pop(dpid, None)  # these flows end with the lease

    def refresh_due(self) -> None:
        """Install again the flows of every weave whose capped hard timeout runs out within
        REFRESH_MARGIN_S somewhere, so flows last as long as the lease. Posted by the part's
        timer; the weaver's lease timer stays the authority on when a weave ends."""
        now = self.weaver.clock.now()
        soon = now + timedelta(seconds=REFRESH_MARGIN_S)
        for weave_id, ends in sorted(self.capped.items()):
            for dpid in [d for d in ends if self._conn(d) is None]:
                del ends[dpid]  # gone: its resync installs afresh when it is back
            if not ends or min(ends.values()) > soon:
                continue
            weave = self.weaver.live.get(weave_id)
            if weave is None:
                del self.capped[weave_id]
                continue
            log.info("weave %s: its flows' hard timeout (capped at %d s) runs out before its "
                     "lease; installing them again", weave_id, MAX_HARD_TIMEOUT_S)
            try:
                self._refresh(weave)
            except Exception:  # the other weaves are still refreshed; the next poll retries
                log.error("weave %s: refreshing its flows failed:\n%s", weave_id,
                          traceback.format_exc())

    def _refresh(self, weave: Weave) -> None:
        """Re-add a weave's flows where they are installed (counters kept, timeouts
        restarted). A switch that refuses gets dropped and resynced, like any refused batch."""
        state = self.state()
        for dpid in sorted(self.capped.get(weave.id, {})):
            conn = self._conn(dpid)
            if conn is None or not conn.synced:
                continue
            program = compile_weave(state, weave, dpid, conn.ports)
            msgs = refresh_messages(conn.datapath, program, next(conn.bundles))
            if self._send(conn, "refresh", msgs, {}, conn.meters):
                self._installed(weave, dpid, state.now)

    def _refresh_timer(self) -> None:
        while not self._stop.wait(REFRESH_POLL_S):
            self.controller.loop.post(self.refresh_due)

    def resync(self, dpid: int, base: Program | None = None) -> None:
        """Make a (re)connected switch equal to the desired state: one atomic bundle.

        A weave that cannot be compiled (its meter ids taken by an older live weave, or any
        error) is left out and failed; the switch still gets everything else. If even its base
        cannot be compiled, its base flows are kept and only its weave flows are replaced."""
        conn = self._conn(dpid)
        if conn is None or self._stop.is_set():
            return
        state = self.state()
        here = [w for w in state.weaves if dpid in weave_switches(state.topology, w)]
        collisions = meter_collisions(state.weaves)
        refused = {w.id: self._collision(w, collisions[w.id]) for w in here
                   if w.id in collisions}
        weaves: dict[str, Program] = {}
        for weave in here:
            if weave.id in refused:
                continue
            try:
                weaves[weave.id] = compile_weave(state, weave, dpid, conn.ports)
            except Exception as exc:
                log.error("switch %s (%#x): cannot compile weave %s; leaving it out:\n%s",
                          conn.name, dpid, weave.id, traceback.format_exc())
                refused[weave.id] = f"cannot compile its flows for switch {conn.name}: " \
                                    f"{type(exc).__name__}: {exc}"
        try:
            # `base`, when given, was just compiled from the same state by the caller.
            base = base if base is not None else compile_base(state, dpid, conn.ports)
        except Exception:
            log.error("switch %s (%#x): cannot compile its base flows; its table stays as it "
                      "is and only its weaves are installed:\n%s", conn.name, dpid,
                      traceback.format_exc())
            base = None
        conn.synced = True
        conn.base = None if base is None else _base_key(base)
        for weave in here:
            if weave.id in refused:
                self._refuse(weave, refused[weave.id])
        kept = [w for w in here if w.id in weaves]
        removals = self._removals_at(dpid)  # terminated weaves this switch may still hold
        # Without a base the table is kept (no delete-all with nothing to put back), but its
        # weave flows are replaced all the same: also those of weaves no longer live whose
        # removal nobody waits for any more (past the teardown timeout, or from before a
        # restart), which would otherwise stay until their hard timeout.
        program = base if base is not None else Program()
        for weave in kept:
            program.extend(weaves[weave.id])
            self.placed.setdefault(weave.id, set()).add(dpid)
        replace = sync_messages if base is not None else weaves_sync_messages
        msgs = replace(conn.datapath, program, conn.meters, next(conn.bundles))
        confirms = {w.id: self.generation.get(w.id, 0) for w in kept}
        # Live weaves the switch may hold but the sync leaves out (moved off it while it was
        # away): once its barrier is back they are not there, and their teardown need not
        # wait for this switch.
        left_out = {w: self.generation.get(w, 0) for w, dpids in self.placed.items()
                    if dpid in dpids and w not in confirms}
        # The sync replaces every weave flow with live weaves' only: its barrier confirms the
        # removal of every terminated weave still waiting on this switch.
        if self._send(conn, "sync", msgs, confirms, {m.meter_id for m in program.meters},
                      removes=tuple(r.weave.id for r in removals), moved_off=left_out,
                      restarts=tuple(w.number for w in kept),
                      ends=tuple(r.weave.number for r in removals), base=base is not None):
            for weave in kept:
                self._installed(weave, dpid, state.now)
        log.info("switch %s (%#x): resync with %d flows, %d meters%s", conn.name, dpid,
                 len(program.flows), len(program.meters),
                 "" if base is not None else " (weaves only: its base flows are kept)")

    def policy_changed(self) -> None:
        """Weaver hook after a policy reload: IVN gateways, VNIs and prefixes feed every
        host's base flows, so each connected host switch is made equal to the new desired
        state (one atomic bundle each, as on a reconnect)."""
        with self.lock:  # fabric switches' flows depend on the topology only
            dpids = sorted(d for d, c in self.switches.items() if c.kind == "host")
        for dpid in dpids:
            self.resync(dpid)

    @staticmethod
    def _collision(weave: Weave, keeper: Weave) -> str:
        ids = ", ".join(str(meter_id(weave.number, d)) for d in DIRECTIONS)
        return (f"its meter ids ({ids}) are those of live weave {keeper.id} (weave numbers "
                f"{METER_SPACE} apart share meters); refusing it rather than metering both "
                f"with one meter")

    def _refuse(self, weave: Weave, why: str) -> None:
        """Fail a weave the flows part cannot program (through the loop: the weaver may be
        in the middle of telling parts about it)."""
        log.error("weave %s: %s", weave.id, why)
        self.pending.pop(weave.id, None)
        self.controller.loop.post(self.weaver.part_failed, weave.id, self.name, why)

    def _conn(self, dpid: int) -> SwitchConn | None:
        with self.lock:
            return self.switches.get(dpid)

    def _send(self, conn: SwitchConn, kind: str, msgs: list[Any], weaves: dict[str, int],
              meters_after: set[int], removes: tuple[str, ...] = (),
              moved_off: dict[str, int] | None = None, restarts: tuple[int, ...] = (),
              ends: tuple[int, ...] = (), base: bool = False) -> bool:
        """Queue a batch and its barrier for one switch; never waits for the switch. False:
        the connection is gone (or was just dropped for not reading). A batch that restarts
        the counters of weaves counted here already (or, replacing the `base`, of its
        counting drops) is preceded by a reading of them, so what is carried over misses
        only what passes while the switch goes from answering it to applying the batch."""
        dp = conn.datapath
        xids = set()
        barrier = parser.OFPBarrierRequest(dp)
        with self.lock:
            counts = self.counters.get(conn.dpid)
            counted = {n for n in restarts
                       if counts is not None and (n, DIRECTIONS[0]) in counts.delivered}
            drops = self.drop_counters.get(conn.dpid)
            drops_counted = base and drops is not None and bool(drops.tracked())
            reads: list[Any] = []
            if counted or drops_counted:
                # A resync reads every weave on the switch (and its drops): it restarts
                # them all.
                reads = self._reading(conn, None if kind == "sync" else frozenset(counted))
            for msg in msgs:
                msg.set_xid(conn.next_xid())
                xids.add(msg.xid)
            barrier.set_xid(conn.next_xid())
            conn.batches[barrier.xid] = Batch(kind, xids, dict(weaves), removes=removes,
                                              moved_off=dict(moved_off or {}),
                                              restarts=restarts, ends=ends,
                                              reads=tuple(m.xid for m in reads), base=base)
            # The switch applies messages in order, so what it will hold after these is
            # known now; the next change (maybe sent before this barrier returns) builds on it.
            conn.meters = set(meters_after)
        if conn.outbox.put([*reads, *msgs, barrier]):
            return True
        log.warning("switch %s (%#x) went away while being programmed", conn.name, conn.dpid)
        self._forget(conn)
        return False

    # -- switch events (posted to the loop by FlowsApp) ---------------------------------------

    def switch_ready(self, datapath: Any, ports: dict[str, int], port_state: dict[int, bool],
                     meters: set[int]) -> None:
        what = switch_name(self.weaver.topology, datapath.id)
        if what is None:
            log.warning("switch %#x is not in topology %s: leaving it empty (fail_mode=secure "
                        "drops everything)", datapath.id, self.weaver.topology.name)
            return
        kind, name = what
        if not self._certificate_names(datapath, kind, name):
            return
        if kind == "host":
            pinned = self.weaver.topology.hosts[name].management_ip
            if pinned is not None and ofguard.peer_ip(datapath.address) != pinned:
                log.warning("refusing switch %s (%#x) from %s: the topology pins it to its "
                            "management address %s", name, datapath.id, _peer(datapath), pinned)
                _close(datapath)
                return
        conn = SwitchConn(datapath, datapath.id, kind, name, outbox_of(datapath), dict(ports),
                          set(meters))
        with self.lock:
            old = self.switches.get(datapath.id)
            other = old.datapath if old is not None and old.datapath is not datapath else None
            refuse = other is not None and _live(other)
            if not refuse:
                self.switches[datapath.id] = conn
        if refuse:
            # Over plain TCP (or --ofp-cert-names any) switches are not authenticated: a
            # newcomer claiming a connected switch's DPID would otherwise take over its program
            # and its port events. A dead old connection is dropped by the echo/idle checks;
            # the switch's retry then wins.
            log.warning("refusing a second connection for switch %s (%#x) from %s: the one "
                        "from %s is alive", name, datapath.id, _peer(datapath), _peer(other))
            _close(datapath)
            return
        if other is not None:
            log.warning("switch %s (%#x): replacing its silent connection from %s with the "
                        "one from %s", name, datapath.id, _peer(other), _peer(datapath))
            _close(other)
            # The old connection's end is not reported (its switch_gone finds it replaced):
            # removals that waited on its barriers are confirmed by the resync below instead.
        log.info("switch %s (%#x) connected from %s: %d ports, %d meters", name, datapath.id,
                 datapath.address, len(ports), len(meters))
        self.resync(datapath.id)
        if kind == "host":
            # From the port description: a VM port that changed while its switch was away
            # from NWC (or is down at a start) sends no port status until it changes again.
            for vm in self._vms_of(name):
                number = ports.get(vm.port)
                self.weaver.vm_port_changed(vm.name, number is not None and
                                            port_state.get(number, False))
        if kind == "fabric":
            # Every port, up ones too: a link that came back while the switch was away from
            # the controller is reported by nothing else.
            for port_no, up in sorted(port_state.items()):
                self.port_changed(datapath, "", port_no, up=up, present=True)

    def _certificate_names(self, datapath: Any, kind: str, name: str) -> bool:
        """Does this connection's TLS certificate name the switch whose dpid it announced?
        Checked before the connection can take the switch's place (or be refused as its
        second connection, which would lock the real one out once the impostor got there
        first), and before anything is sent. Plain TCP has no certificate: any peer may
        claim any dpid there (--ofp-allowed-peers and management_ip are all that holds)."""
        der = getattr(datapath.socket, "certificate", None)
        if der is None or not self.check_cert_names:
            return True
        why = switch_identity(self.weaver.topology, kind, name).problem(der)
        if why is None:
            with self.lock:
                self._identity_refused.pop(datapath.id, None)
            self._refusal_logged.pop(datapath.id, None)
            return True
        _close(datapath)
        with self.lock:
            repeated = self._identity_refused.get(datapath.id) == why
        now = self.weaver.clock.monotonic()
        logged = self._refusal_logged.get(datapath.id)
        if not repeated or logged is None or now - logged[0] >= REFUSAL_LOG_EVERY_S:
            unsaid = int(logged[1]) if logged is not None and repeated else 0
            log.warning("refusing switch %s (%#x) from %s: %s%s", name, datapath.id,
                        _peer(datapath), why,
                        f" ({unsaid} more refusals of it since the last line)" if unsaid else "")
            self._refusal_logged[datapath.id] = [now, 0]
        else:
            logged[1] += 1
        with self.lock:
            self._identity_refused[datapath.id] = why
        if not repeated:
            self.weaver.security_event(
                None, "switch_identity",
                f"a connection from {_peer(datapath)} claimed {kind} {name}'s datapath id "
                f"{datapath.id:#x} and was refused: {why}")
        return False

    def switch_gone(self, datapath: Any) -> None:
        with self.lock:
            conn = self.switches.get(datapath.id)
            if conn is None or conn.datapath is not datapath:
                return
            del self.switches[datapath.id]
            if conn.stats is not None:
                conn.stats.done.set()  # whoever waits for its statistics need not
        log.warning("switch %s (%#x) disconnected; its weaves (and the removal of terminated "
                    "ones) are not confirmed until it is back and resynced", conn.name,
                    conn.dpid)

    def port_changed(self, datapath: Any, port_name: str, port_no: int, *, up: bool,
                     present: bool) -> None:
        conn = self._conn(datapath.id)
        if conn is None or conn.datapath is not datapath:
            return
        if conn.kind == "host":
            vms = self._vms_of(conn.name)
            before = dict(conn.ports)
            # One number, one port: a status for it replaces whatever name had it (port
            # status is coalesced per number, so the deletion of the old name may be gone).
            for name in [n for n, p in conn.ports.items() if p == port_no]:
                del conn.ports[name]
            if present:
                conn.ports[port_name] = port_no
            else:
                conn.ports.pop(port_name, None)
            if any(before.get(vm.port) != conn.ports.get(vm.port) for vm in vms):
                self.resync(conn.dpid)  # a VM plugged or unplugged: its flows follow
            for vm in vms:
                if vm.port == port_name:
                    self.weaver.vm_port_changed(vm.name, up and present)
                elif before.get(vm.port) == port_no and vm.port not in conn.ports:
                    self.weaver.vm_port_changed(vm.name, False)  # its number went to another
            return
        link = fabric_link_of_port(self.weaver.topology, conn.name, port_no)
        if link is None:
            return
        down_before = frozenset(self.weaver.fabric.down)
        self.weaver.link_changed(link[0], link[1], up and present)
        if frozenset(self.weaver.fabric.down) != down_before:
            # Host routes follow the link; weaves were moved by the weaver (weave_moved). A
            # switch whose routes the change leaves as they were keeps its table: in a large
            # fabric a link touches the routes of a few switches, not of all of them.
            state = self.state()
            for dpid in sorted(self._fabric_dpids()):
                conn = self._conn(dpid)
                if conn is None:
                    continue
                try:
                    base = compile_base(state, dpid, conn.ports)
                except Exception:
                    self.resync(dpid)  # which says what is wrong
                    continue
                if _base_key(base) != conn.base:
                    self.resync(dpid, base)

    def _vms_of(self, host: str) -> list[Vm]:
        return [vm for vm in self.weaver.topology.vms.values() if vm.host == host]

    def _fabric_dpids(self) -> list[int]:
        with self.lock:
            return [c.dpid for c in self.switches.values() if c.kind == "fabric"]

    # -- replies (os-ken's thread) ---------------------------------------------------------------

    def on_barrier(self, datapath: Any, xid: int) -> None:
        with self.lock:
            conn = self.switches.get(datapath.id)
            if conn is None or conn.datapath is not datapath:
                return
            batch = conn.batches.pop(xid, None)
            if batch is not None:
                for read in batch.reads:
                    conn.reads.pop(read, None)  # answered before the barrier, or never
                if not batch.errors:
                    self._count_batch(conn, batch)
                    if batch.kind == "sync":
                        conn.resynced = True
        if batch is None:
            return
        if batch.errors:
            detail = "; ".join(batch.errors)
            log.error("switch %s refused a %s change (the bundle left its tables as they "
                      "were): %s", conn.name, batch.kind, detail)
            for weave_id in batch.weaves:
                self.controller.loop.post(self.weaver.part_failed, weave_id, self.name,
                                          f"switch {conn.name}: {detail}")
            # What the switch holds is no longer known for sure (meter mods sit outside the
            # bundle): drop the connection; the switch reconnects and gets a full resync.
            self._forget(conn)
            return
        if batch.weaves:
            self.controller.loop.post(self._confirmed, conn.dpid, batch.weaves)
        if batch.removes:
            self.controller.loop.post(self._removed, conn.dpid, batch.removes)
        if batch.moved_off:
            self.controller.loop.post(self._unplaced, conn.dpid, batch.moved_off)

    def _confirmed(self, dpid: int, weaves: dict[str, int]) -> None:
        for weave_id, generation in weaves.items():
            waiting = self.pending.get(weave_id)
            if waiting is None or self.generation.get(weave_id) != generation:
                continue  # changed since: the newer batch confirms it
            waiting.discard(dpid)
            if not waiting:
                self.weaver.part_ready(weave_id, self.name)

    def _forget(self, conn: SwitchConn) -> None:
        with self.lock:
            if self.switches.get(conn.dpid) is conn:
                del self.switches[conn.dpid]
        _close(conn.datapath)  # what it waited for is confirmed by its resync on reconnect

    def on_error(self, datapath: Any, msg: Any) -> None:
        with self.lock:
            conn = self.switches.get(datapath.id)
            batch = None
            if conn is not None and conn.datapath is datapath:  # not one claiming its DPID
                batch = next((b for b in conn.batches.values() if msg.xid in b.xids), None)
        text = f"OpenFlow error type {msg.type} code {msg.code}"
        if batch is None:
            log.error("switch %#x: %s (xid %#x, not from a pending change)", datapath.id,
                      text, msg.xid)
            return
        batch.errors.append(text)

    def on_stats_reply(self, datapath: Any, msg: Any) -> None:
        with self.lock:
            conn = self.switches.get(datapath.id)
            if conn is None or conn.datapath is not datapath:
                return
            stats = conn.stats
            if stats is None or msg.xid not in stats.xids:
                stats = conn.reads.get(msg.xid)  # a read before a batch
            kind = stats.xids.get(msg.xid) if stats is not None else None
            if stats is None or kind is None:
                return  # not asked for, or given up on
            stats.add(kind, msg.body)
            if msg.flags & ofp.OFPMPF_REPLY_MORE:
                return
            del stats.xids[msg.xid]
            conn.reads.pop(msg.xid, None)
            if not stats.xids:
                stats.complete = True
                self._observe(conn.dpid, stats)
                stats.fresh_until = self.weaver.clock.monotonic() + STATS_CACHE_S
                stats.done.set()

    # -- counters carried across re-installs (under `lock`) --------------------------------------

    def _reading(self, conn: SwitchConn, numbers: frozenset[int] | None) -> list[Any]:
        """Statistics requests (their xids set) for these weaves on one switch (None: every
        weave), registered so that their answer feeds the carried counters."""
        msgs, stats = self._stats_requests(conn, numbers)
        conn.reads.update({xid: stats for xid in stats.xids})
        return msgs

    @staticmethod
    def _stats_requests(conn: SwitchConn,
                        numbers: frozenset[int] | None) -> tuple[list[Any], SwitchStats]:
        """One flow-stats and the meter-stats requests (their xids set) that read these
        weaves on one switch (None: every weave, and then its counting drops too: one more
        flow-stats request), and the SwitchStats their answers fill. A fabric switch is
        asked for its drops only: nobody sums its weave counters."""
        dp = conn.datapath
        requests: list[tuple[str, Any]] = []
        if numbers is None:
            requests.append(("drops", _flow_stats_request(dp, ROLE_DROP, ROLE_DROP)))
        if conn.kind == "host" or numbers is not None:
            if numbers is not None and len(numbers) == 1:
                (number,) = numbers
                flows = _flow_stats_request(dp, weave_cookie(number), OWNER_MASK)
                # Only meters the switch holds: asking for a missing one is an OpenFlow error.
                ids = [mid for mid in (meter_id(number, d) for d in DIRECTIONS)
                       if mid in conn.meters]
            else:
                flows = _flow_stats_request(dp, KIND_WEAVE << KIND_SHIFT, 0xFF << KIND_SHIFT)
                ids = [ofp.OFPM_ALL]
            requests.append(("flows", flows))
            requests += [("meters", parser.OFPMeterStatsRequest(dp, 0, mid)) for mid in ids]
        kinds: dict[int, str] = {}
        for kind, msg in requests:
            msg.set_xid(conn.next_xid())
            kinds[msg.xid] = kind
        return ([msg for _, msg in requests],
                SwitchStats(kinds, numbers=numbers, reads_drops=numbers is None))

    def _observe(self, dpid: int, stats: SwitchStats) -> None:
        """A complete reading of one switch: every weave counted there that it covers, and
        its counting drops if it read them."""
        if stats.reads_drops:
            carried = self.drop_counters.setdefault(dpid, CarriedCounters(2))
            for key, values in stats.drops.items():
                carried.track(key)
                carried.observe(key, values)
        counts = self.counters.get(dpid)
        if counts is None:
            return
        keys: list[Any] = counts.delivered.tracked() if stats.numbers is None else \
            [(n, d) for n in stats.numbers for d in DIRECTIONS]
        for number, direction in keys:
            key = (number, direction)
            if counts.delivered.observe(key, stats.delivered.get(key, (0, 0))):
                counts.dropped.observe(key,
                                       (stats.dropped.get(meter_id(number, direction), 0),))

    def _count_batch(self, conn: SwitchConn, batch: Batch) -> None:
        """A batch's barrier is back: its weaves' flows on a host switch count from 0 again,
        and so do the switch's counting drops if it replaced the base."""
        drops = self.drop_counters.get(conn.dpid)
        if batch.base and drops is not None:
            for key in drops.tracked():
                drops.restart(key)
        if conn.kind != "host":
            return  # nobody asks for a fabric switch's counters
        counts = self.counters.setdefault(conn.dpid, HostCounters())
        for number in batch.restarts:
            # Its meters were added or modified too, and OVS 3.1 (userspace) starts a
            # modified meter's counters from 0 as well.
            counts.restart(number)
        for number in batch.ends:
            counts.discard(number)

    def _forget_counts(self, number: int) -> None:
        """A weave went down: nobody asks for its totals again, and its number may be reused."""
        with self.lock:
            for counts in self.counters.values():
                counts.discard(number)

    # -- statistics (any thread) -----------------------------------------------------------------

    def _switch_stats(self, dpids: Iterable[int]) -> dict[int, SwitchStats | None]:
        """Every weave's counters on these switches (None: not connected, or no answer in
        time), each switch asked at most once per STATS_CACHE_S, all waited for together."""
        deadline = time.monotonic() + STATS_TIMEOUT_S
        now = self.weaver.clock.monotonic()
        asked: list[tuple[SwitchConn, SwitchStats, list[Any]]] = []
        found: dict[int, tuple[SwitchConn, SwitchStats] | None] = {}
        with self.lock:
            for dpid in sorted(set(dpids)):
                conn = self.switches.get(dpid)
                if conn is None:
                    found[dpid] = None
                    continue
                stats = conn.stats
                if stats is None or (stats.fresh_until is not None and stats.fresh_until <= now):
                    msgs, stats = self._stats_requests(conn, None)
                    conn.stats = stats
                    asked.append((conn, stats, msgs))
                found[dpid] = (conn, stats)
        for conn, stats, msgs in asked:
            if not conn.outbox.put(msgs):
                stats.done.set()  # the connection is gone: no answer will come
        out: dict[int, SwitchStats | None] = {}
        for dpid, pair in found.items():
            if pair is None:
                out[dpid] = None
                continue
            conn, stats = pair
            stats.done.wait(max(0.0, deadline - time.monotonic()))
            with self.lock:
                if not stats.done.is_set():
                    # Given up: late parts are dropped, and nobody waits for this switch
                    # again until it is asked afresh.
                    log.warning("switch %s (%#x) did not answer a statistics request within "
                                "%g s", conn.name, conn.dpid, STATS_TIMEOUT_S)
                    stats.xids.clear()
                    stats.fresh_until = self.weaver.clock.monotonic() + STATS_CACHE_S
                    stats.done.set()
                elif stats.fresh_until is None:  # ended without an answer (gone, dropped)
                    stats.fresh_until = self.weaver.clock.monotonic() + STATS_CACHE_S
                out[dpid] = stats if stats.complete else None
        return out

    def drop_stats(self) -> list[DroppedTraffic]:
        """What the counting drops of every connected switch refused, carried across
        re-installs, from the same cached statistics round as `weave_stats`. A switch that
        is not connected, or did not answer in time, has no entry (not zeros); a drop flow
        a switch no longer holds (a VM unplugged) is not reported, its count kept in case
        it comes back."""
        with self.lock:
            dpids = list(self.switches)
        per_switch = self._switch_stats(dpids)
        topology, policy = self.weaver.topology, self.weaver.policy
        sums: dict[tuple[str, Any], list[int]] = {}
        with self.lock:
            for dpid, stats in per_switch.items():
                conn = self.switches.get(dpid)
                carried = self.drop_counters.get(dpid)
                if stats is None or conn is None or carried is None:
                    continue
                for key in stats.drops:
                    labels = drop_labels(policy, topology, conn.name, conn.ports, *key)
                    if labels is None:
                        continue
                    total = carried.total(key)
                    acc = sums.setdefault((conn.name, labels), [0, 0])
                    acc[0] += total[0]
                    acc[1] += total[1]
        return [DroppedTraffic(name, labels, b, p)
                for (name, labels), (b, p) in sorted(sums.items())]

    def weave_stats(self, weave: Weave) -> dict[str, Any]:
        """Bytes and packets each weave direction delivered (flow counters by cookie) and
        the bytes its meters dropped, summed over the hosts of its legs. Empty when a host
        cannot be measured: a partial sum would be a wrong number, not a smaller one."""
        topo = self.weaver.topology
        hosts = {topo.hosts[h].dpid for leg in weave.legs
                 for h in (leg.requester_host, leg.target_host)}
        per_switch = self._switch_stats(hosts)
        if not per_switch or any(stats is None for stats in per_switch.values()):
            return {}
        out: dict[str, Any] = {}
        with self.lock:  # totals carried across re-installs, fed by those readings
            counts = [self.counters.get(dpid, HostCounters()) for dpid in per_switch]
            for d in DIRECTIONS:
                key = (weave.number, d)
                delivered = [c.delivered.total(key) for c in counts]
                out[f"bytes_{d}"] = sum(c[0] for c in delivered)
                out[f"packets_{d}"] = sum(c[1] for c in delivered)
                out[f"meter_dropped_bytes_{d}"] = sum(c.dropped.total(key)[0] for c in counts)
        return out


def _base_key(base: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """What a switch's base program is compared by (SwitchConn.base): its flows and meters."""
    return tuple(base.flows), tuple(base.meters)


def _flow_stats_request(dp: Any, cookie: int, cookie_mask: int) -> Any:
    """A flow-stats request for every flow of every table whose cookie matches."""
    return parser.OFPFlowStatsRequest(dp, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                                      cookie, cookie_mask, parser.OFPMatch())


def _port_description(dp: Any) -> tuple[dict[str, int], dict[int, bool]]:
    """A connected switch's ports as os-ken knows them: number by name, and which are up."""
    ports, state = {}, {}
    # A copy in one call: os-ken's receive thread adds and removes ports meanwhile.
    for desc in list((dp.ports or {}).values()):
        if desc.port_no <= ofp.OFPP_MAX:
            ports[desc.name.decode(errors="replace")] = desc.port_no
            state[desc.port_no] = _port_up(desc)
    return ports, state


def _port_up(desc: Any) -> bool:
    """An OpenFlow port description: link up and not administratively down."""
    return not desc.state & ofp.OFPPS_LINK_DOWN and not desc.config & ofp.OFPPC_PORT_DOWN


def _live(datapath: Any) -> bool:
    """Is this connection a switch that is still talking to NWC?"""
    if not getattr(datapath, "is_active", True) or \
            getattr(datapath, "state", None) == DEAD_DISPATCHER or \
            getattr(datapath.socket, "ended", False):
        return False
    idle = getattr(datapath.socket, "idle_s", None)
    return idle is None or idle() < LIVE_PEER_S


def _close(datapath: Any) -> None:
    """End a connection without waiting on it: stop its outbox and shut its socket down.
    os-ken's own thread for the connection then sees the end of the stream and reports it
    dead (DEAD_DISPATCHER), so the loop never runs os-ken's event machinery itself."""
    with _outboxes_lock:
        box = _outboxes.get(datapath)
    if box is not None:
        box.close()
    try:
        datapath.socket.shutdown(socket.SHUT_RDWR)
    except Exception:  # already gone: nothing to release
        log.debug("closing %s", _peer(datapath), exc_info=True)


class FlowsApp(app_manager.OSKenApp):
    """The os-ken side: receives, converts to plain calls, posts them to the weaver loop."""

    OFP_VERSIONS: ClassVar[list[int]] = [ofp.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.part: FlowsPart | None = None
        self._meter_requests: dict[int, tuple[Any, int, set[int]]] = {}
        # Port status waiting for the loop, latest first-come: (connection, port) -> (the
        # connection, name, up, present). At most one loop call per port is ever queued, so
        # a flapping or lying switch cannot grow the weaver's queue.
        self._ports: dict[tuple[int, int], tuple[Any, str, bool, bool]] = {}
        self._ports_lock = threading.Lock()
        # Switches that finished connecting while no part was attached -> their meters. The
        # listener is up before `nwc run` attaches the part (and between two controllers in
        # one process): such a switch sends nothing more and would never be resynced, so the
        # next part to attach takes them. Guarded by _attach_lock, with `part`'s changes.
        self._unclaimed: dict[Any, set[int]] = {}
        self._attach_lock = threading.Lock()

    def attach(self, part: FlowsPart | None) -> None:
        """Hand switch events to `part` (None: to nobody, until the next one), starting with
        the switches that connected while none was attached."""
        with self._attach_lock:
            self.part = part
            if part is None:
                return
            waiting, self._unclaimed = self._unclaimed, {}
            for dp, meters in waiting.items():
                # Ports as they are now: their status messages meanwhile went to nobody.
                ports, state = _port_description(dp)
                log.info("switch %#x at %s connected before the flows part attached; "
                         "resyncing it now", dp.id, _peer(dp))
                part.controller.loop.post(part.switch_ready, dp, ports, state, meters)

    def _post(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        part = self.part
        if part is not None:
            part.controller.loop.post(fn, *args, **kwargs)

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    @_loud
    def state_change(self, ev: Any) -> None:
        dp = ev.datapath
        if ev.state == MAIN_DISPATCHER:
            # Ports are known (os-ken asked on connect); NWC still needs the meters present.
            req = parser.OFPMeterConfigStatsRequest(dp, 0, ofp.OFPM_ALL)
            dp.set_xid(req)
            self._meter_requests[id(dp)] = (dp, req.xid, set())
            outbox_of(dp).put([req])  # this thread serves every switch: it never waits on one
        elif ev.state == DEAD_DISPATCHER:
            with _outboxes_lock:
                box = _outboxes.pop(dp, None)
            if box is not None:
                box.close()
            with self._attach_lock:
                self._unclaimed.pop(dp, None)
        if ev.state == DEAD_DISPATCHER and dp.id is not None:
            self._meter_requests.pop(id(dp), None)
            if self.part is not None:
                self._post(self.part.switch_gone, dp)

    @set_ev_cls(ofp_event.EventOFPMeterConfigStatsReply, MAIN_DISPATCHER)
    @_loud
    def meter_config(self, ev: Any) -> None:
        dp = ev.msg.datapath
        pending = self._meter_requests.get(id(dp))
        if pending is None or pending[1] != ev.msg.xid:
            if self.part is not None:
                self.part.on_stats_reply(dp, ev.msg)
            return
        pending[2].update(c.meter_id for c in ev.msg.body)
        if len(pending[2]) > MAX_METERS:
            log.warning("switch %#x at %s reports more than %d meters; dropping it", dp.id,
                        _peer(dp), MAX_METERS)
            del self._meter_requests[id(dp)]
            _close(dp)
            return
        if ev.msg.flags & ofp.OFPMPF_REPLY_MORE:
            return
        del self._meter_requests[id(dp)]
        ports, state = _port_description(dp)
        with self._attach_lock:  # so that attach() neither misses it nor hands it on twice
            part = self.part
            if part is None:
                self._unclaimed[dp] = pending[2]
                return
            part.controller.loop.post(part.switch_ready, dp, ports, state, pending[2])

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    @_loud
    def port_status(self, ev: Any) -> None:
        msg = ev.msg
        desc = msg.desc
        present = msg.reason != ofp.OFPPR_DELETE
        up = _port_up(desc)
        key = (id(msg.datapath), desc.port_no)
        with self._ports_lock:
            queued = key in self._ports
            self._ports[key] = (msg.datapath, desc.name.decode(errors="replace"), up, present)
        if not queued:
            self._post(self._port_changed, key, desc.port_no)

    def _port_changed(self, key: tuple[int, int], port_no: int) -> None:
        """On the loop: the latest status of one port."""
        with self._ports_lock:
            latest = self._ports.pop(key, None)
        if latest is not None and self.part is not None:
            datapath, name, up, present = latest
            self.part.port_changed(datapath, name, port_no, up=up, present=present)

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    @_loud
    def barrier(self, ev: Any) -> None:
        if self.part is not None:
            self.part.on_barrier(ev.msg.datapath, ev.msg.xid)

    @set_ev_cls(ofp_event.EventOFPErrorMsg, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    @_loud
    def error(self, ev: Any) -> None:
        if self.part is not None:
            self.part.on_error(ev.msg.datapath, ev.msg)
        else:
            log.error("OpenFlow error from %s: type %s code %s", ev.msg.datapath.address,
                      ev.msg.type, ev.msg.code)

    @set_ev_cls([ofp_event.EventOFPFlowStatsReply, ofp_event.EventOFPMeterStatsReply],
                MAIN_DISPATCHER)
    @_loud
    def stats(self, ev: Any) -> None:
        if self.part is not None:
            self.part.on_stats_reply(ev.msg.datapath, ev.msg)


# -- starting os-ken inside `nwc run` (os-ken 4 has no ryu-manager) ------------------------------

_started: dict[str, Any] = {}
_start_lock = threading.Lock()
_connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
# `--ofp-allowed-peers`: None lets every address in (the listener is process-wide).
_allowed_peers: list[ofguard.IpNetwork] | None = None


def set_allowed_peers(networks: list[ofguard.IpNetwork] | None) -> None:
    global _allowed_peers
    _allowed_peers = list(networks) if networks is not None else None


# `--ctl-privkey/--ctl-cert/--ca-certs`: every OpenFlow connection must then be TLS with a
# client certificate from that CA (process-wide, like the listener).
_tls_context: ssl.SSLContext | None = None


def set_tls(files: oftls.TlsFiles | None) -> None:
    global _tls_context
    _tls_context = files.server_context() if files is not None else None


def _guarded_factory(original: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def factory(sock: Any, address: Any) -> None:
        if not ofguard.peer_allowed(address, _allowed_peers):
            # Before os-ken reads (or even greets) it: nothing of OpenFlow is parsed.
            log.warning("refusing OpenFlow connection from %s: not in --ofp-allowed-peers",
                        address)
            sock.close()
            return
        if not _connections.acquire(blocking=False):
            log.warning("refusing OpenFlow connection from %s: %d connections already",
                        address, MAX_CONNECTIONS)
            sock.close()
            return
        try:
            if _tls_context is not None:
                tls = oftls.TlsSocket(sock, _tls_context)
                try:
                    tls.handshake()
                    certificate = tls.peer_certificate_der()
                except (OSError, ssl.SSLError) as exc:
                    log.warning("refusing OpenFlow connection from %s: TLS handshake failed "
                                "(%s)", address, exc)
                    sock.close()
                    return
                if certificate is None:  # CERT_REQUIRED makes this unreachable; be sure
                    log.warning("refusing OpenFlow connection from %s: no certificate", address)
                    sock.close()
                    return
                original(ofguard.GuardedSocket(tls, address, certificate), address)
            else:
                original(ofguard.GuardedSocket(sock, address), address)
        except Exception:
            log.warning("OpenFlow connection from %s ended with an error", address,
                        exc_info=True)
        finally:
            _connections.release()
    return factory


def start_osken(listen_host: str, listen_port: int) -> FlowsApp:
    """Start os-ken's OpenFlow listener and FlowsApp in this process, once."""
    with _start_lock:
        if "app" in _started:
            return _started["app"]
        from os_ken import cfg
        from os_ken.controller import controller as osken_controller

        cfg.CONF(args=["--ofp-listen-host", listen_host,
                       "--ofp-tcp-listen-port", str(listen_port)], project="os_ken")
        # Not command-line options in os-ken; off by default there.
        cfg.CONF.set_override("echo_request_interval", ECHO_INTERVAL_S)
        cfg.CONF.set_override("maximum_unreplied_echo_requests", ECHO_UNANSWERED)
        osken_controller.datapath_connection_factory = _guarded_factory(
            osken_controller.datapath_connection_factory)
        # Threads inherit daemon-ness from their creator: starting os-ken from a daemon
        # thread makes its listener and connection threads daemons, so `nwc run` can exit.
        box: dict[str, Any] = {}

        def start() -> None:
            try:
                manager = app_manager.AppManager.get_instance()
                manager.load_apps([__name__])
                contexts = manager.create_contexts()
                manager.instantiate_apps(**contexts)
                box["app"] = next(a for a in manager.applications.values()
                                  if isinstance(a, FlowsApp))
            except BaseException as exc:
                box["error"] = exc
        starter = threading.Thread(target=start, name="nwc-osken-start", daemon=True)
        starter.start()
        starter.join()
        if "error" in box:
            raise box["error"]
        app = box["app"]
        _started["app"] = app
        return app


def serve(controller: Any, args: Any) -> FlowsPart:
    """`nwc run` hook: listen for switches and attach the "flows" part to the weaver."""
    peers = getattr(args, "ofp_allowed_peers", None)
    set_allowed_peers(ofguard.parse_networks(peers) if peers else None)
    key = getattr(args, "ctl_privkey", None)
    files = oftls.TlsFiles(Path(key), Path(args.ctl_cert), Path(args.ca_certs)) if key else None
    try:
        set_tls(files)
    except oftls.TlsConfigError as exc:
        from nwc.run import StartRefused
        raise StartRefused(str(exc)) from None
    app = start_osken(args.ofp_listen_host, args.ofp_tcp_listen_port)
    cert_names = getattr(args, "ofp_cert_names", None) or CERT_NAMES_MATCH
    part = FlowsPart(controller, cert_names)
    controller.loop.call(part.attach)
    app.attach(part)
    controller.stats_sources.append(part.weave_stats)
    controller.drop_sources.append(part.drop_stats)
    controller.switch_sources.append(part.switch_connections)

    def stop() -> None:
        if app.part is part:
            app.attach(None)
        part.stop()
    controller.on_stop(stop)
    if not files:
        mode = "plain TCP: any peer may claim any switch; see --ctl-privkey/--ctl-cert/--ca-certs"
    elif part.check_cert_names:
        mode = "TLS, switch certificates required, naming the switch they claim to be"
    else:
        mode = ("TLS, switch certificates required; --ofp-cert-names any: any of them may "
                "claim any switch")
    log.info("OpenFlow 1.3 listening on %s:%d (%s)", args.ofp_listen_host,
             args.ofp_tcp_listen_port, mode)
    return part


__all__ = ["FlowsApp", "FlowsPart", "Program", "SwitchConnection", "serve", "start_osken",
           "switch_identity"]
