"""The weaver: the one place that changes weave state.

It applies admission decisions to the fabric ledger, the lease book and the store, and tells the
data-plane parts (OpenFlow flows, IPsec tunnels) what to build or tear down. It is driven by a
single loop thread (`WeaverLoop`): REST calls, lease expiries, provisioning reports and switch
events all become calls on that thread, so nothing here needs a lock and no two changes
interleave.

Order of effects, so a crash at any point leaves a state the next start repairs: the durable
record is committed first, then the data plane is told. A controller that restarts rebuilds the
ledger and leases from the store, releases what expired while it was down, and hands every live
weave to the parts again (they make the switches equal to it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

from nwc.admission import (
    Admission,
    Denial,
    LiveWeave,
    Reason,
    WeaveRequest,
    evaluate,
    evaluate_extension,
    plan_legs,
    prefixes_withdrawn,
    worded_for,
)
from nwc.fabric import CapacityError, Fabric
from nwc.lease import Clock, LeaseBook, iso
from nwc.pipeline import METER_SPACE
from nwc.policy import Policy
from nwc.store import Store
from nwc.topology import Topology
from nwc.weave import CONTROLLER, LIVE_STATES, OPERATOR, EndReason, Leg, State, Weave

log = logging.getLogger(__name__)
T = TypeVar("T")
_Entry = TypeVar("_Entry")

DEFAULT_PROVISION_TIMEOUT_S = 30.0
# How long a terminated weave may stay `terminating` while parts confirm the data plane is
# gone; past it the weave is recorded `terminated` anyway (the release itself is durable and a
# switch or host that lags is resynced to the live set), with an event saying who did not say.
DEFAULT_TEARDOWN_TIMEOUT_S = 10.0
# A refused policy reload's audit record and event carry its problems, but a policy set with a
# thousand errors must not make one record (and every event client's queue) that large: the
# log has them all.
MAX_RECORDED_PROBLEMS = 20
MAX_PROBLEM_CHARS = 300


@dataclass(frozen=True)
class Actor:
    """Who asked: a tenant, or an operator (tenant None). Recorded in the audit trail."""

    name: str
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


SYSTEM = Actor("nwc")


class Part(Protocol):
    """A piece of the data plane. Calls come from the weaver's loop and must not block for
    long; a part reports a built weave with `Weaver.part_ready` (posted to the loop). A part
    whose `confirms_teardown` is true also reports, with `Weaver.part_down` (posted to the
    loop), when a terminated weave is gone from everything it programs; until every such part
    has, the weave is `terminating`. A part may also say what it still waits for with a
    weave (`waiting_on(weave_id) -> str | None`, optional, called on the loop: it must not
    block), which the weaver puts in the details of a provision timeout and of a teardown
    nobody confirmed."""

    name: str

    def weave_up(self, weave: Weave) -> None: ...

    def weave_down(self, weave: Weave) -> None: ...

    def weave_moved(self, weave: Weave, old: Weave) -> None: ...


class MeterResidues:
    """How many weaves hold each meter-id residue (weave number modulo METER_SPACE), so that
    picking the next free number is a lookup, not a scan of every weave (a scan was half of
    an admission's cost with a thousand live weaves). A count, not a set: a store written
    before numbers were chosen this way may hold two weaves on one residue."""

    def __init__(self) -> None:
        self._count: Counter[int] = Counter()

    def add(self, weave: Weave) -> None:
        self._count[weave.number % METER_SPACE] += 1

    def remove(self, weave: Weave) -> None:
        residue = weave.number % METER_SPACE
        self._count[residue] -= 1
        if self._count[residue] <= 0:
            del self._count[residue]

    def holds(self, number: int) -> bool:
        """Whether a counted weave shares `number`'s meter ids."""
        return self._count[number % METER_SPACE] > 0


class _IndexedDict(dict[str, _Entry]):
    """A dict that keeps indexes of its entries as they are set, replaced and removed
    (`_index` and `_unindex`, in subclasses)."""

    def __setitem__(self, key: str, entry: _Entry) -> None:
        if key in self:
            self._unindex(self[key])
        super().__setitem__(key, entry)
        self._index(entry)

    def __delitem__(self, key: str) -> None:
        self.pop(key)

    def pop(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            return default
        entry = super().pop(key)
        self._unindex(entry)
        return entry

    def _index(self, entry: _Entry) -> None:
        raise NotImplementedError

    def _unindex(self, entry: _Entry) -> None:
        raise NotImplementedError


class LiveWeaves(_IndexedDict[Weave]):
    """The live weaves by id, indexed by IVN, so that admission reads only the weaves of the
    two IVNs it decides about (with a thousand live weaves, rebuilding the whole view per
    request was most of an admission's cost)."""

    def __init__(self) -> None:
        super().__init__()
        self._by_ivn: dict[str, set[str]] = {}
        self._view: dict[str, LiveWeave] = {}
        self.residues = MeterResidues()
        self._requested_by: Counter[str] = Counter()  # live weaves per requesting tenant

    def _index(self, weave: Weave) -> None:
        for ivn in (weave.requester, weave.target):
            self._by_ivn.setdefault(ivn, set()).add(weave.id)
        self._view[weave.id] = weave.as_live()
        self.residues.add(weave)
        self._requested_by[weave.requester_tenant] += 1

    def _unindex(self, weave: Weave) -> None:
        for ivn in (weave.requester, weave.target):
            self._by_ivn.get(ivn, set()).discard(weave.id)
        self._view.pop(weave.id, None)
        self.residues.remove(weave)
        self._requested_by[weave.requester_tenant] -= 1
        if self._requested_by[weave.requester_tenant] <= 0:
            del self._requested_by[weave.requester_tenant]

    def requested_by(self, tenant: str) -> int:
        """How many live weaves `tenant` asked for (its quota counts these)."""
        return self._requested_by[tenant]

    def involving(self, *ivns: str) -> list[LiveWeave]:
        ids = set().union(*(self._by_ivn.get(ivn, ()) for ivn in ivns))
        return [self._view[i] for i in sorted(ids)]


class Teardowns(_IndexedDict[tuple[Weave, set[str], float]]):
    """Ended weaves whose data plane is being torn down: weave id -> the record (state
    terminating, or failed), the parts yet to confirm, and the deadline (monotonic) after
    which it is recorded terminated anyway. Their meter-id residues are counted, as the live
    weaves' are: a burst of releases can leave many waiting on a switch that is away."""

    def __init__(self) -> None:
        super().__init__()
        self.residues = MeterResidues()

    def _index(self, entry: tuple[Weave, set[str], float]) -> None:
        self.residues.add(entry[0])

    def _unindex(self, entry: tuple[Weave, set[str], float]) -> None:
        self.residues.remove(entry[0])


@dataclass
class _AdmissionBatch:
    """Admissions that commit together (see `Weaver.admission_batch`), and the counters as
    they were before the batch, to undo it."""

    next_number: int
    next_slot: int
    admitted: list[Weave] = field(default_factory=list)


class Weaver:
    def __init__(self, *, policy: Policy, topology: Topology, store: Store, clock: Clock,
                 parts: Iterable[Part] = (),
                 provision_timeout_s: float = DEFAULT_PROVISION_TIMEOUT_S,
                 teardown_timeout_s: float = DEFAULT_TEARDOWN_TIMEOUT_S) -> None:
        self.policy = policy
        self.topology = topology
        self.store = store
        self.clock = clock
        self.parts: list[Part] = list(parts)
        self.provision_timeout = timedelta(seconds=provision_timeout_s)
        self.fabric = Fabric(topology)
        # VMs whose port on their host's br-int is down or not there, as the flows part last
        # reported; the others are taken to be up, so a start reports only the down ones.
        self.vm_ports_down: set[str] = set()
        self.leases = LeaseBook()
        self.live = LiveWeaves()
        self._waiting: dict[str, set[str]] = {}  # weave id -> parts not yet ready
        # Deadlines are durations: kept on the monotonic clock, so that a wall-clock step (NTP)
        # neither fails a weave at once nor keeps a stuck one for an hour (found in review).
        self._provision_deadline: dict[str, float] = {}
        self.teardown_timeout = timedelta(seconds=teardown_timeout_s)
        self._tearing = Teardowns()
        # Weaves a previous run may have built (recovered from the store, live or left
        # terminating): switches and hosts not back since the restart may still hold them, so
        # their teardown waits also for parts that attach after they ended (`nwc run`
        # attaches its parts after recovery).
        self._inherited: set[str] = set()
        # Parts will attach after recovery (`recover(parts_to_attach=True)`, until
        # `parts_attached`): an inherited weave ending before a part that confirms teardowns
        # is there waits for those to come.
        self._parts_to_attach = False
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._next_number = store.next_weave_number()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._batch: _AdmissionBatch | None = None

    # -- observers ------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Called with every event (weave state changes, denials, security events)."""
        self._listeners.append(listener)

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("ts", iso(self.clock.now()))
        # Nobody hears of a change before it is durable: inside a transaction (an admission
        # batch), the event waits for its commit.
        self.store.after_commit(partial(self._deliver, event))

    def _deliver(self, event: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event.get("type"))

    def add_part(self, part: Part) -> None:
        self.parts.append(part)

    def attach_part(self, part: Part) -> None:
        """Add a part to a weaver that already started: weaves still provisioning now wait
        for it too, and it is handed every live weave (as `start_parts` would have). It is
        also told to take down the weaves of a previous run whose teardown is under way (what
        it drives may still hold them); one that confirms teardowns is then waited for, up to
        the teardown timeout from now, as if it had been attached when they ended."""
        self.parts.append(part)
        for weave in list(self.live.values()):
            if weave.id in self._waiting:
                self._waiting[weave.id].add(part.name)
            self._tell(weave, "weave_up", [part])
        confirms = getattr(part, "confirms_teardown", False)
        for weave_id, (record, waiting, deadline) in list(self._tearing.items()):
            if weave_id not in self._inherited:
                continue  # ended in this run: this part never had it
            if confirms:
                waiting.add(part.name)
                self._tearing[weave_id] = (record, waiting,
                                           max(deadline, self._after(self.teardown_timeout)))
            self._tell(record, "weave_down", [part])

    def inherited_teardowns(self) -> list[Weave]:
        """Weaves a previous run may have built whose teardown is under way (their records,
        terminating or failed): a part attaching now may find them on what it drives."""
        return [record for weave_id, (record, _, _) in sorted(self._tearing.items())
                if weave_id in self._inherited]

    # -- slots ----------------------------------------------------------------------------

    def _take_slot(self) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        if self._next_slot >= self.topology.underlay.weave_slots:
            raise CapacityError("the underlay address pools have no free weave slot")
        self._next_slot += 1
        return self._next_slot - 1

    def _give_slot(self, slot: int) -> None:
        # A weave recovered with a slot outside pools that shrank while the controller was
        # down gives it back too: it must not be handed out again.
        if slot < self.topology.underlay.weave_slots:
            heapq.heappush(self._free_slots, slot)

    def _rebuild_slots(self) -> None:
        # Live weaves' slots, and those of teardowns under way: a switch or host that may
        # still hold such a weave would forward a new weave's traffic into its old tunnel.
        holders = [*self.live.values(), *(record for record, _, _ in self._tearing.values())]
        pool = self.topology.underlay.weave_slots
        used = {leg.slot for w in holders for leg in w.legs
                if leg.slot is not None and leg.slot < pool}
        self._next_slot = max(used, default=-1) + 1
        self._free_slots = [s for s in range(self._next_slot) if s not in used]
        heapq.heapify(self._free_slots)

    # -- start ----------------------------------------------------------------------------

    def recover(self, parts_to_attach: bool = False) -> list[Weave]:
        """Load live weaves from the store; release those that expired or no longer fit.
        `parts_to_attach`: data-plane parts attach after this (with `attach_part`, as in
        `nwc run`; call `parts_attached` once they all have), so the teardown of a weave the
        previous run may have built waits for them even if it ends before they attach."""
        self._parts_to_attach = parts_to_attach
        reservations = self.store.reservations()
        confirming = self._confirming()
        # Left terminating, or failed with its teardown not confirmed (the store keeps that
        # apart: the state alone would have the failed weave's slots reused at once).
        for weave in self.store.unconfirmed_teardowns():
            if not (confirming or parts_to_attach):  # no data plane to wait for
                self._finish_at_restart(weave)
                continue
            # Released before the stop, but a switch or host that has not come back since
            # may still hold it (fail_mode=secure keeps flows): its teardown goes on as it
            # would have, terminating (or failed) until the parts confirm (those attached
            # now, and those that attach later) or the teardown timeout, its slots held
            # until then.
            self._inherited.add(weave.id)
            self._tearing[weave.id] = (weave, set(confirming),
                                       self._after(self.teardown_timeout))
            self._tell(weave, "weave_down")
            log.info("weave %s: its teardown was under way at the stop; waiting for the data "
                     "plane again", weave.id)
        now = self.clock.now()
        # Leases that ran out while NWC was down: those weaves ended then, whatever else
        # changed since (they reserve nothing, and no policy withdraws them).
        lapsed = []
        for weave in self.store.weaves(states=LIVE_STATES):
            self._inherited.add(weave.id)
            self.live[weave.id] = weave
            if weave.expires_at <= now:
                lapsed.append(weave)
                continue
            held = reservations.get(weave.id)
            try:
                pool = self.topology.underlay.weave_slots
                outside = sorted(leg.slot for leg in weave.legs
                                 if leg.slot is not None and leg.slot >= pool)
                if outside:  # the underlay pools shrank while the controller was down
                    raise CapacityError(f"its slot {outside[0]} is outside the underlay's "
                                        f"weave address pools ({pool} slots)")
                self.fabric.reserve(weave.id, held.paths if held else weave.paths, weave.kbps)
            except (CapacityError, KeyError) as exc:
                log.warning("weave %s no longer fits the fabric: %s", weave.id, exc)
                # Torn down like any ending: the previous run may have built it.
                self._end(weave, State.FAILED, EndReason.TOPOLOGY_CHANGED.value, SYSTEM,
                          detail=str(exc))
                continue
            self.leases.set(weave.id, weave.expires_at)
            if weave.state is State.PROVISIONING:
                self._waiting[weave.id] = {p.name for p in self.parts}
                self._provision_deadline[weave.id] = self._after(self.provision_timeout)
        # The policy may have changed while the controller was down: a weave it no longer
        # allows ends now, as a reload would have ended it (and is torn down as it would be).
        for weave in list(self.live.values()):
            if weave.expires_at > now:
                self._end_if_withdrawn(weave, SYSTEM)
        for weave in lapsed:
            self._expire_at_restart(weave, now)
        self._rebuild_slots()
        self.tick()
        log.info("recovered %d live weaves", len(self.live))
        return list(self.live.values())

    def _expire_at_restart(self, weave: Weave, now: datetime) -> None:
        """End a weave whose lease ran out while the controller was down. It ended at its
        lease end, not now: the flows' hard timeouts stopped its traffic then (what is left,
        tunnels and records, is torn down now, as any ending's)."""
        self._end(weave, State.TERMINATED, EndReason.EXPIRED.value, SYSTEM,
                  ended_at=weave.expires_at,
                  detail=f"the lease ran out at {iso(weave.expires_at)} while the controller "
                         f"was down; NWC noticed at its restart, at {iso(now)}, and tears "
                         "the rest down now (the flows had stopped at the lease end)")

    def _finish_at_restart(self, weave: Weave) -> None:
        if weave.state is not State.TERMINATING:  # failed: already final, only the flag goes
            with self.store.transaction():
                self.store.save_weave(weave)
            return
        done = weave.with_(state=State.TERMINATED)
        with self.store.transaction():
            self.store.save_weave(done)
            self._audit("weave.state", "terminated", weave=done, actor=SYSTEM,
                        detail="teardown finished at restart (no part confirms teardowns)")

    def parts_attached(self) -> None:
        """Every part that will attach has: from now on a weave's teardown waits only for
        the parts that are there, and an inherited teardown every attached part confirmed
        (kept open for the parts still to come) finishes now."""
        self._parts_to_attach = False
        for weave_id, (_, waiting, _) in list(self._tearing.items()):
            if weave_id in self._inherited and not waiting:
                try:
                    self._finish_teardown(weave_id)
                except Exception:  # it stays in _tearing: its deadline finishes it
                    log.exception("finishing the teardown of %s failed", weave_id)

    def start_parts(self) -> None:
        """Hand every live weave to the parts (after a restart, or when parts attach)."""
        for weave in list(self.live.values()):
            self._tell(weave, "weave_up")

    # -- tenant requests ------------------------------------------------------------------

    def live_view(self, *ivns: str) -> list[LiveWeave]:
        """Live weaves involving any of `ivns`: all admission needs to see."""
        return self.live.involving(*ivns)

    def create(self, request: WeaveRequest, actor: Actor = SYSTEM,
               request_id: str | None = None) -> Weave | Denial:
        now = self.clock.now()
        decision = evaluate(request, policy=self.policy, topology=self.topology,
                            fabric=self.fabric,
                            live=self.live_view(request.requester, request.target), now=now)
        if isinstance(decision, Denial):
            # A refusal is worded for each tenant told of it: the one asking, or, when an
            # operator asks, the one whose event stream hears of it. Worked out here, on a
            # refusal only, not on the admission path.
            told = self._told(request, actor)
            asker = actor.tenant if actor.tenant is not None else told
            if asker is not None:
                decision = worded_for(decision, request, self.policy, asker)
            self._record_denial("weave.create", request, decision, actor, request_id, told)
            return decision
        return self._admit(decision, now, actor, request_id)

    def refuse(self, request: WeaveRequest, denial: Denial, actor: Actor = SYSTEM,
               request_id: str | None = None) -> Denial:
        """Refuse a create request decided before admission (the API's: a tenant naming
        another tenant's IVN it may not see as requester), recorded and announced exactly as
        `create` records its own refusals, so that such a probe leaves the same durable
        record as one naming a missing IVN, and takes the same path to its answer."""
        self._record_denial("weave.create", request, denial, actor, request_id,
                            self._told(request, actor))
        return denial

    def _told(self, request: WeaveRequest, actor: Actor) -> str | None:
        """The tenant whose event stream hears of a refusal of `request`: the requester
        IVN's, when that tenant asked or an operator did (on its behalf). None (operators
        only) when no such IVN exists, or when another tenant asked: it asked for no weave
        of that tenant's, and its own stream must hear of it as of a missing IVN (nothing)."""
        owner = self.policy.ivns.get(request.requester)
        if owner is None or actor.tenant not in (None, owner.tenant):
            return None
        return owner.tenant

    @contextmanager
    def admission_batch(self) -> Iterator[None]:
        """Admissions made inside commit together: one durable commit (one fsync) for the
        lot, which is what lets a burst of requests be admitted faster than one fsync each
        (group commit). Each admission is still all or nothing on its own (a savepoint), and
        events and the parts hear of the batch's weaves only once the commit is on disk. If
        the commit fails, every admission of the batch is undone in memory as well (ledger,
        leases, slots, numbers) and the error is raised: no caller was told yes.
        Only `create` may run inside: an ended weave could not be undone."""
        if self._batch is not None:
            raise RuntimeError("admission batches do not nest")
        batch = _AdmissionBatch(self._next_number, self._next_slot)
        self._batch = batch
        try:
            # Events and parts are told from the store's after-commit callbacks.
            with self.store.transaction():
                yield
        except BaseException:
            self._batch = None
            for weave in reversed(batch.admitted):
                self._forget(weave)
            self._next_number, self._next_slot = batch.next_number, batch.next_slot
            # Slots above the old counter were never free, whoever gave them back (a failed
            # admission of the batch returns its own on the spot).
            self._free_slots = [s for s in self._free_slots if s < batch.next_slot]
            heapq.heapify(self._free_slots)
            raise
        self._batch = None

    def _forget(self, weave: Weave) -> None:
        """Undo an admission whose commit failed (the caller restores the slot counter)."""
        self._give_slots(weave)
        self.live.pop(weave.id)
        self.leases.remove(weave.id)
        self.fabric.release(weave.id)
        self._waiting.pop(weave.id, None)
        self._provision_deadline.pop(weave.id, None)

    def _admit(self, admission: Admission, now: datetime, actor: Actor,
               request_id: str | None) -> Weave:
        policy = self.policy
        slots: list[int] = []
        try:  # all or nothing: any failure gives back the slots taken so far
            legs = []
            for p in admission.legs:
                slot = None
                if p.requester_host != p.target_host:
                    slot = self._take_slot()
                    slots.append(slot)
                legs.append(Leg(p.requester_host, p.target_host, p.path, slot))
            self._next_number = self._free_number(self._next_number)
            weave = Weave(
                id=f"wv-{self._next_number:06d}", requester=admission.requester,
                target=admission.target,
                requester_tenant=policy.ivns[admission.requester].tenant,
                target_tenant=policy.ivns[admission.target].tenant,
                legs=tuple(legs), kbps=admission.kbps, profile=admission.profile,
                requester_prefixes=admission.requester_prefixes,
                target_prefixes=admission.target_prefixes, created_at=now,
                expires_at=admission.expires_at,
                state=State.PROVISIONING if self.parts else State.ACTIVE)
            reservation = self.fabric.reserve(weave.id, weave.paths, weave.kbps)
            record = weave.to_dict()
            try:
                with self.store.transaction():
                    self.store.save_weave(weave, record)
                    self.store.save_reservation(reservation)
                    self._audit("weave.create", "admitted", weave=weave, actor=actor,
                                request_id=request_id, detail=self._describe(weave))
            except BaseException:
                self.fabric.release(weave.id)
                raise
        except BaseException:
            for slot in slots:
                self._give_slot(slot)
            raise
        self._next_number += 1
        self.live[weave.id] = weave
        self.leases.set(weave.id, weave.expires_at)
        if self._batch is not None:
            self._batch.admitted.append(weave)
        # The admission hot path: one call, formatted only if INFO is on, and only once the
        # batch it belongs to is durable (an undone admission was never created).
        if log.isEnabledFor(logging.INFO):  # else not even the callback is built
            self.store.after_commit(partial(
                log.info, "weave %s created for tenant %s: %s > %s, %s Mbit/s, profile %s, "
                "until %s, %s", weave.id, weave.requester_tenant, weave.requester, weave.target,
                weave.bandwidth_mbps, weave.profile, weave.expires_at, weave.state.value))
        self.emit({"type": "weave.state", "weave": record})
        if self.parts:
            self._waiting[weave.id] = {p.name for p in self.parts}
            self._provision_deadline[weave.id] = self._after(self.provision_timeout)
            self._tell(weave, "weave_up")
        return weave

    def _free_number(self, number: int) -> int:
        """The first weave number from `number` on whose meter ids (derived from the number
        modulo METER_SPACE) no live weave holds: a switch cannot have two meters of one id.
        Nor a weave being torn down: a switch that still holds it (away, or not back since a
        restart) would have its meters, and its flows using them, for the new weave's."""
        while self.live.residues.holds(number) or self._tearing.residues.holds(number):
            number += 1
        return number

    @staticmethod
    def _describe(weave: Weave) -> str:
        paths = "; ".join(" > ".join(leg.path) for leg in weave.legs)
        return (f"{weave.bandwidth_mbps:g} Mbit/s per leg, profile {weave.profile}, until "
                f"{iso(weave.expires_at)}, path {paths}")

    def terminate(self, weave_id: str, actor: Actor = SYSTEM,
                  request_id: str | None = None) -> Weave | None:
        """End a weave now and release everything; None if it is not live."""
        weave = self.live.get(weave_id)
        if weave is None:
            return None
        return self._end(weave, State.TERMINATED, EndReason.REQUESTED.value, actor,
                         request_id=request_id)

    def extend(self, weave_id: str, duration_s: int, actor: Actor = SYSTEM,
               request_id: str | None = None) -> Weave | Denial | None:
        """Push the lease end back by `duration_s`, re-checked against both policies now."""
        weave = self.live.get(weave_id)
        if weave is None:
            return None
        now = self.clock.now()
        if weave.expires_at <= now:  # its lease is over: it ends, it is not revived
            self.tick()
            return None
        if isinstance(duration_s, bool) or not isinstance(duration_s, int) or duration_s < 1:
            denial: Denial | None = Denial(Reason.INVALID_REQUEST,
                                           "duration_s must be a whole number of seconds >= 1")
        else:
            new_expiry = max(weave.expires_at, now) + timedelta(seconds=duration_s)
            denial = evaluate_extension(weave.as_live(), profile=weave.profile,
                                        new_expires_at=new_expiry,
                                        created_at=weave.created_at, paths=weave.paths,
                                        policy=self.policy, fabric=self.fabric,
                                        live=self.live_view(weave.requester, weave.target),
                                        now=now, extension_s=duration_s)
        if denial is not None:
            with self.store.transaction():
                self._audit("weave.extend", "denied", weave=weave, actor=actor,
                            request_id=request_id, reason=denial.reason.value,
                            detail=denial.detail)
            self.emit({"type": "weave.denied", "action": "extend", "weave_id": weave.id,
                       "requester": weave.requester,
                       "audience": [weave.requester_tenant],  # the only one that may extend
                       **_denial_event(denial)})
            return denial
        extended = weave.with_(expires_at=new_expiry)
        with self.store.transaction():
            self.store.save_weave(extended)
            self._audit("weave.extend", "extended", weave=extended, actor=actor,
                        request_id=request_id, detail=f"until {iso(new_expiry)}")
        self.live[weave.id] = extended
        self.leases.set(weave.id, new_expiry)
        self.emit({"type": "weave.extended", "weave": extended.to_dict()})
        self._tell_moved(extended, weave)  # flows carry the lease as a hard timeout
        return extended

    # -- reports from the data plane ------------------------------------------------------

    def part_ready(self, weave_id: str, part: str) -> None:
        waiting = self._waiting.get(weave_id)
        weave = self.live.get(weave_id)
        if waiting is None or weave is None:
            return
        waiting.discard(part)
        if waiting:
            return
        active = None
        if weave.state is State.PROVISIONING:
            active = weave.with_(state=State.ACTIVE)
            try:
                with self.store.transaction():
                    self.store.save_weave(active)
                    self._audit("weave.state", "active", weave=active, actor=SYSTEM)
            except BaseException:
                # Still waiting for this part: its next report, or the provision deadline,
                # decides again (found in review: the weave stayed provisioning for ever).
                waiting.add(part)
                raise
        del self._waiting[weave_id]
        self._provision_deadline.pop(weave_id, None)
        if active is not None:
            log.info("weave %s active: every part built it", weave_id)
            self.live[weave_id] = active
            self.emit({"type": "weave.state", "weave": active.to_dict()})

    def part_failed(self, weave_id: str, part: str, detail: str) -> None:
        weave = self.live.get(weave_id)
        if weave is None:
            return
        log.warning("weave %s: %s failed: %s", weave_id, part, detail)
        # A security failure (IKE authentication) is also reported by its part as a
        # `security` event with its kind; this one says which part failed the weave.
        self.emit({"type": "weave.part_failed", "weave_id": weave_id, "part": part,
                   "detail": detail})
        self._end(weave, State.FAILED, EndReason.PROVISION_FAILED.value, SYSTEM,
                  detail=f"{part}: {detail}")

    def security_event(self, weave_id: str | None, kind: str, detail: str) -> None:
        """Something a tenant's security team wants to know (IKE failure, SA down...)."""
        with self.store.transaction():
            self._audit("security", kind, weave=self.live.get(weave_id or ""), actor=SYSTEM,
                        detail=detail, weave_id=weave_id)
        self.emit({"type": "security", "kind": kind, "weave_id": weave_id, "detail": detail})

    # -- time -----------------------------------------------------------------------------

    def tick(self) -> list[Weave]:
        """Release expired leases and weaves that took too long to build."""
        now = self.clock.now()
        ended = []
        for weave_id in self.leases.due(now):
            weave = self.live.get(weave_id)
            if weave is None:
                continue
            try:
                ended.append(self._end(weave, State.TERMINATED, EndReason.EXPIRED.value,
                                       SYSTEM))
            except Exception:
                # due() took the lease out of the book: put it back so the next tick tries
                # again, and let the other expiries of this batch proceed.
                log.exception("expiring %s failed; retrying on the next tick", weave_id)
                if weave_id in self.live:
                    self.leases.set(weave_id, weave.expires_at)
        mono = self.clock.monotonic()
        for weave_id, deadline in list(self._provision_deadline.items()):
            weave = self.live.get(weave_id)
            if weave is not None and deadline <= mono:
                missing = self._waiting_on(weave_id, self._waiting.get(weave_id, ()))
                try:
                    ended.append(self._end(
                        weave, State.FAILED, EndReason.PROVISION_TIMEOUT.value, SYSTEM,
                        detail=f"not ready after {self.provision_timeout.total_seconds():g} s: "
                               f"{missing}"))
                except Exception:  # the deadline stays: the next tick tries again
                    log.exception("failing %s after its provision timeout failed", weave_id)
        for weave_id, (_, _, deadline) in list(self._tearing.items()):
            if deadline <= mono:
                try:
                    finished = self._finish_teardown(weave_id)
                    if finished is not None:
                        ended.append(finished)
                except Exception:
                    log.exception("finishing the teardown of %s failed", weave_id)
        return ended

    def seconds_to_next_deadline(self) -> float:
        now = self.clock.now()
        wait = self.leases.wait_seconds(now)
        soonest = min(itertools.chain(self._provision_deadline.values(),
                                      (deadline for _, _, deadline in self._tearing.values())),
                      default=None)
        if soonest is not None:
            wait = min(wait, max(0.0, soonest - self.clock.monotonic()))
        return wait

    # -- fabric events --------------------------------------------------------------------

    def link_changed(self, a: str, b: str, up: bool) -> list[Weave]:
        """A fabric link went down (or came back). Weaves on a dead link move to another path
        with the capacity, or fail with a reason. Returns the weaves that moved or failed."""
        if not self.fabric.set_link(a, b, up):
            return []
        self.emit({"type": "fabric.link", "link": [a, b], "up": up})
        with self.store.transaction():
            self._audit("fabric.link", "up" if up else "down", actor=SYSTEM,
                        detail=f"link {a}-{b} {'up' if up else 'down'}")
        if up:
            return []
        changed = []
        for weave_id in self.fabric.weaves_on(a, b):
            changed.append(self._reroute(self.live[weave_id]))
        return changed

    def vm_port_changed(self, vm: str, up: bool) -> None:
        """A VM's port went down (link or admin down, or unplugged) or came back. Nothing
        moves or ends (the VM may come back at any time; its flows wait for it): operators
        hear of a change, once (`vm.port`, like `fabric.link`, an admins' event: it names
        the VM's host)."""
        if vm not in self.topology.vms or (vm not in self.vm_ports_down) == up:
            return
        if up:
            self.vm_ports_down.discard(vm)
        else:
            self.vm_ports_down.add(vm)
        host = self.topology.vms[vm].host
        log.info("VM %s: its port on %s is %s", vm, host, "up" if up else "down")
        self.emit({"type": "vm.port", "vm": vm, "host": host, "up": up})

    def _reroute(self, weave: Weave) -> Weave:
        """Re-plan a weave whose path lost a link: legs that still work keep their path."""
        held = self.fabric.release(weave.id)
        try:
            return self._replan(weave)
        except BaseException:
            # Nothing was recorded (the weave is as it was, still live): it holds what it
            # held, or the ledger would let the next admission over-book its links.
            if self.live.get(weave.id) is weave:
                self.fabric.release(weave.id)
                if held is not None:
                    self.fabric.restore(held)
            raise

    def _replan(self, weave: Weave) -> Weave:
        keep = {(leg.requester_host, leg.target_host): leg.path for leg in weave.legs
                if not any(((a, b) if a <= b else (b, a)) in self.fabric.down
                           for a, b in zip(leg.path, leg.path[1:], strict=False))}
        planned = plan_legs(self.fabric, [(leg.requester_host, leg.target_host)
                                          for leg in weave.legs], weave.kbps, keep)
        if isinstance(planned, Denial):
            # Already released above; _end records it and tears the data plane down.
            return self._end(weave, State.FAILED, EndReason.NO_PATH.value, SYSTEM,
                             detail=planned.detail)
        legs = tuple(Leg(leg.requester_host, leg.target_host, plan.path, leg.slot)
                     for leg, plan in zip(weave.legs, planned, strict=True))
        moved = weave.with_(legs=legs)
        try:
            reservation = self.fabric.reserve(weave.id, moved.paths, weave.kbps)
        except CapacityError as exc:  # plan_legs said it fits; never let a link event raise
            log.error("weave %s: re-planned paths do not fit: %s", weave.id, exc)
            return self._end(weave, State.FAILED, EndReason.NO_PATH.value, SYSTEM,
                             detail=str(exc))
        with self.store.transaction():
            self.store.save_weave(moved)
            self.store.save_reservation(reservation)
            self._audit("weave.reroute", "rerouted", weave=moved, actor=SYSTEM,
                        detail=self._describe(moved))
        self.live[weave.id] = moved
        log.info("weave %s rerouted: %s (was %s)", weave.id, moved.paths, weave.paths)
        self.emit({"type": "weave.rerouted", "weave": moved.to_dict(),
                   "old_paths": [list(p) for p in weave.paths]})
        self._tell_moved(moved, weave)
        return moved

    # -- policy ---------------------------------------------------------------------------

    def reload_policy(self, policy: Policy, actor: Actor = SYSTEM) -> list[Weave]:
        """Switch to a new (already validated) policy. Weaves that either side no longer
        allows end now (policy_withdrawn); caps apply from the next request or extension.
        If its record cannot be committed (a full disk, a lock), this raises and the running
        policy stays in force: nothing is applied that the audit does not say."""
        loaded = f"{len(policy.ivns)} IVNs from {', '.join(policy.sources)}"
        with self.store.transaction():
            self._audit("policy.reload", "applied", actor=actor, detail=loaded)
        self.policy = policy
        ended = []
        for weave in list(self.live.values()):
            try:
                withdrawn = self._end_if_withdrawn(weave, actor)
            except Exception:
                # The policy is in force now: one weave whose end could not be recorded
                # must not keep the others it disallows, or the parts, from hearing of it.
                log.exception("withdrawing weave %s after the policy reload failed", weave.id)
                continue
            if withdrawn is not None:
                ended.append(withdrawn)
            else:
                # A profile's ACL or a QoS class may have changed: the parts recompile.
                self._tell_moved(weave, weave)
        for part in self.parts:
            # IVN gateways, VNIs and prefixes feed every host's base flows, not just weaves'.
            changed = getattr(part, "policy_changed", None)
            if changed is not None:
                try:
                    changed()
                except Exception:
                    log.exception("part %s.policy_changed() raised", part.name)
        withdrawn = [w.id for w in ended]
        log.info("policy reload applied: %s; %s", loaded,
                 f"withdrew {', '.join(withdrawn)}" if withdrawn else "no weave withdrawn")
        self.emit({"type": "policy.reload", "outcome": "applied", "detail": loaded,
                   "withdrawn": withdrawn})
        return ended

    def policy_refused(self, problems: list[str], actor: Actor = SYSTEM) -> None:
        """Record a policy reload that was refused (the running policy stays): an audit
        record and an event with its problems, at most MAX_RECORDED_PROBLEMS of them, each
        cut to MAX_PROBLEM_CHARS (the caller logs them all)."""
        kept = recorded_problems(problems)
        detail = (f"{len(problems)} problem{'' if len(problems) == 1 else 's'}, the running "
                  "policy stays" + (f" (the first {len(kept)} recorded)"
                                    if len(kept) < len(problems) else ""))
        with self.store.transaction():
            self._audit("policy.reload", "refused", actor=actor, detail=detail,
                        problems=kept)
        self.emit({"type": "policy.reload", "outcome": "refused", "detail": detail,
                   "problems": kept})

    def _end_if_withdrawn(self, weave: Weave, actor: Actor) -> Weave | None:
        """End a live weave the policy no longer allows (policy_withdrawn); None if allowed."""
        why = self._still_allowed(weave)
        if why is None:
            return None
        detail, both_may_read = why
        return self._end(weave, State.FAILED, EndReason.POLICY_WITHDRAWN.value, actor,
                         detail=detail, tenant_detail=both_may_read)

    def _still_allowed(self, weave: Weave) -> tuple[str, str] | None:
        """Why the policy no longer allows a live weave: (the operator's detail, a detail both
        parties may read: not the other side's partners or prefixes), or None."""
        ivns = self.policy.ivns
        if weave.requester not in ivns or weave.target not in ivns:
            gone = "an IVN of the weave was removed from the policy"
            return gone, gone
        for name, tenant in ((weave.requester, weave.requester_tenant),
                             (weave.target, weave.target_tenant)):
            if ivns[name].tenant != tenant:  # the weave's owners would no longer be its parties
                moved = f"IVN {name} now belongs to tenant {ivns[name].tenant}, not {tenant}"
                return moved, moved
        withdrawn = prefixes_withdrawn(weave.as_live(), self.policy)
        if withdrawn is not None:
            name = weave.requester if withdrawn.side == "requester" else weave.target
            return withdrawn.detail, (f"{withdrawn.side} IVN {name} no longer allows this "
                                      f"weave ({withdrawn.rule})")
        for ivn in (ivns[weave.requester], ivns[weave.target]):
            if weave.profile not in ivn.weaving.profiles:
                why = f"IVN {ivn.name} no longer allows profile {weave.profile}"
                return why, why
        return None

    # -- internals ------------------------------------------------------------------------

    def _end(self, weave: Weave, state: State, reason: str, actor: Actor, *,
             detail: str | None = None, request_id: str | None = None,
             tell_parts: bool = True, tenant_detail: str | None = None,
             ended_at: datetime | None = None) -> Weave:
        """Release everything a weave holds: durable record first, then the data plane. A
        terminated weave stays `terminating` until the parts that confirm teardown have; a
        failed one is failed at once, but its slots too wait for those confirmations.
        `ended_at`: when it ended, if not now (a lease that ran out while NWC was down)."""
        if self._batch is not None:
            raise RuntimeError("a weave cannot end inside an admission batch (it could not "
                               "be undone if the batch's commit failed)")
        now = self.clock.now()
        # Events go to both parties: they read `tenant_detail` where `detail` says more than
        # one of them may know (the hub swaps it in).
        shown = {} if tenant_detail is None else {"tenant_detail": tenant_detail}
        confirming = self._confirming() if tell_parts else set()
        # A weave a previous run may have built that ends before any part confirming
        # teardowns attached (at a start, parts attach after recovery) waits for the parts
        # that attach later (attach_part), or the teardown timeout.
        unattended = (tell_parts and not confirming and self._parts_to_attach
                      and weave.id in self._inherited)
        # Slots (addresses, VNI, port) go back only once the tunnels using them are gone, so
        # that a new weave never gets those of a tunnel still being removed (found in review:
        # a failed weave gave them back at once).
        holding = bool(confirming) or unattended
        tearing = state is State.TERMINATED and holding
        ended = weave.with_(state=State.TERMINATING if tearing else state, reason=reason,
                            ended_at=now if ended_at is None else ended_at,
                            ended_by=_ended_by(actor),
                            end_detail=detail if tenant_detail is None else tenant_detail)
        with self.store.transaction():
            # Recorded, so that a restart before the parts confirm goes on holding its slots
            # (a failed weave's state cannot say so, a terminating one's already does).
            self.store.save_weave(ended, teardown_pending=holding)
            self.store.delete_reservation(weave.id)
            outcome = {EndReason.EXPIRED.value: "expired",
                       EndReason.REQUESTED.value: "released"}.get(reason, "failed")
            self._audit("weave.expire" if outcome == "expired" else
                        "weave.terminate" if outcome == "released" else "weave.fail",
                        outcome, weave=ended, actor=actor, request_id=request_id,
                        reason=reason, detail=detail)
        # Who ended it as its parties may read it (never the name of a token).
        log.info("weave %s %s (%s) by %s%s%s", weave.id, ended.state.value, reason,
                 ended.ended_by, ": " if detail else "", detail or "")
        self.fabric.release(weave.id)
        self.leases.remove(weave.id)
        self._waiting.pop(weave.id, None)
        self._provision_deadline.pop(weave.id, None)
        if self.live.pop(weave.id, None) is not None and not holding:
            self._give_slots(weave)
        if holding:
            self._tearing[weave.id] = (ended, confirming, self._after(self.teardown_timeout))
        else:
            self._inherited.discard(weave.id)  # nothing left to hand a later part
        if not (tell_parts and self.parts):
            self.emit({"type": "weave.state", "weave": ended.to_dict(), "detail": detail,
                       **shown})
            return ended
        # The release is already durable (a crash from here leaves nothing to undo: switches
        # and hosts are resynced to the live weaves, and recover() hands a weave left
        # terminating to the parts again); watchers see the data plane being torn down, then
        # the end.
        if state is State.TERMINATED:
            self.emit({"type": "weave.state",
                       "weave": ended.with_(state=State.TERMINATING).to_dict(),
                       "detail": detail, **shown})
        self._tell(weave, "weave_down")  # confirmations come later, posted to the loop
        if not tearing:
            self.emit({"type": "weave.state", "weave": ended.to_dict(), "detail": detail,
                       **shown})
        return ended

    def _after(self, delay: timedelta) -> float:
        """A deadline `delay` from now, on the monotonic clock."""
        return self.clock.monotonic() + delay.total_seconds()

    def _give_slots(self, weave: Weave) -> None:
        for leg in weave.legs:
            if leg.slot is not None:
                self._give_slot(leg.slot)

    def tearing_down(self, weave_id: str) -> bool:
        """Whether the weaver still waits for parts to confirm this weave's teardown."""
        return weave_id in self._tearing

    def part_down(self, weave_id: str, part: str) -> None:
        """A part reports a terminated weave gone from everything it programs."""
        entry = self._tearing.get(weave_id)
        if entry is None:
            return
        entry[1].discard(part)
        # A teardown inherited from the previous run stays open while parts are still to
        # attach, even once those attached have confirmed: one attaching later (tunnels
        # attaches after flows in `nwc run`) must still be told, and the weave's slots held
        # until it confirms (found in review: a new weave got the slot of a leg an
        # unreachable host still held). parts_attached() finishes it if nobody else comes.
        if not entry[1] and not (self._parts_to_attach and weave_id in self._inherited):
            self._finish_teardown(weave_id)

    def _finish_teardown(self, weave_id: str) -> Weave | None:
        """The parts confirmed (or the deadline passed): a terminating weave is recorded
        terminated and returned; a failed one, already final, just gives back its slots."""
        record, waiting, _ = self._tearing[weave_id]  # left in place until the commit holds,
        done = record.with_(state=State.TERMINATED)  # so that tick() retries a failed one
        detail = None
        timeout = self.teardown_timeout.total_seconds()
        if waiting:
            detail = (f"teardown not confirmed within {timeout:g} s by: "
                      f"{self._waiting_on(weave_id, waiting)} (resynced when they answer)")
            log.warning("weave %s: %s", weave_id, detail)
        elif not self._confirming():  # an inherited teardown no such part was told of
            detail = (f"teardown not confirmed: no part that confirms teardowns attached "
                      f"within {timeout:g} s")
            log.warning("weave %s: %s", weave_id, detail)
        elif self._parts_to_attach and weave_id in self._inherited:
            detail = (f"teardown confirmed only by the parts that attached within "
                      f"{timeout:g} s (others were still to attach)")
            log.warning("weave %s: %s", weave_id, detail)
        terminating = record.state is State.TERMINATING  # else failed: already final
        with self.store.transaction():
            if terminating:
                self.store.save_weave(done)
                self._audit("weave.state", "terminated", weave=done, actor=SYSTEM,
                            detail=detail)
            else:  # only the flag: a restart from now on has nothing to wait for
                self.store.save_weave(record)
        del self._tearing[weave_id]
        self._inherited.discard(weave_id)
        self._give_slots(record)
        if terminating:
            log.info("weave %s terminated: its data plane is gone%s", weave_id,
                     " (not confirmed by every part)" if detail else "")
            self.emit({"type": "weave.state", "weave": done.to_dict(), "detail": detail})
        if waiting:
            self.emit({"type": "weave.teardown_unconfirmed", "weave_id": weave_id,
                       "parts": sorted(waiting), "detail": detail})
        return done if terminating else None

    def _confirming(self) -> set[str]:
        """The names of the attached parts that confirm teardowns."""
        return {p.name for p in self.parts if getattr(p, "confirms_teardown", False)}

    def _waiting_on(self, weave_id: str, names: Iterable[str]) -> str:
        """The parts named, each with what it says it still waits for (`waiting_on`), so a
        timeout names the host or switch at fault, not only the part."""
        said = []
        for name in sorted(names):
            part = next((p for p in self.parts if p.name == name), None)
            describe = getattr(part, "waiting_on", None)
            what = None
            if describe is not None:
                try:
                    what = describe(weave_id)
                except Exception:  # the timeout goes on, less precise
                    log.exception("part %s could not say what it waits for", name)
            said.append(f"{name} ({what})" if what else name)
        return ", ".join(said)

    def _tell(self, weave: Weave, method: str, parts: Iterable[Part] | None = None) -> None:
        # The data plane follows the durable record: inside a transaction, after its commit.
        self.store.after_commit(partial(self._tell_now, weave, method,
                                        None if parts is None else list(parts)))

    def _tell_now(self, weave: Weave, method: str, parts: list[Part] | None) -> None:
        for part in self.parts if parts is None else parts:
            try:
                getattr(part, method)(weave)
            except Exception as exc:
                log.error("part %s.%s(%s) raised:\n%s", part.name, method, weave.id,
                          traceback.format_exc())
                if method == "weave_up" and weave.id in self.live:
                    self.part_failed(weave.id, part.name, f"{type(exc).__name__}: {exc}")
                    return

    def _tell_moved(self, weave: Weave, old: Weave) -> None:
        for part in self.parts:
            try:
                part.weave_moved(weave, old)
            except Exception:
                log.exception("part %s.weave_moved(%s) raised", part.name, weave.id)

    def _record_denial(self, action: str, request: WeaveRequest, denial: Denial, actor: Actor,
                       request_id: str | None, told: str | None) -> None:
        """`told`: the tenant whose event stream hears of it (`_told`)."""
        with self.store.transaction():
            # The true reason, and what the tenant was told when that differs.
            shown = denial.seen_by(operator=False)
            self._audit(action, "denied", actor=actor, request_id=request_id,
                        reason=denial.reason.value, detail=denial.detail,
                        requester=request.requester, target=request.target,
                        tenant_told=shown.reason.value if shown is not denial else None)
        # The audience is named here, where the refusal was worded for it (`create`).
        self.emit({"type": "weave.denied", "action": action, "requester": request.requester,
                   "target": request.target, "audience": [told] if told else [],
                   **_denial_event(denial)})

    def _audit(self, action: str, outcome: str, *, weave: Weave | None = None,
               actor: Actor = SYSTEM, request_id: str | None = None,
               reason: str | None = None, detail: str | None = None, **extra: Any) -> None:
        body: dict[str, Any] = {"ts": iso(self.clock.now()), "action": action,
                                "outcome": outcome, "actor": actor.name,
                                "tenant": actor.tenant}
        if weave is not None:
            body.update(weave_id=weave.id, requester=weave.requester, target=weave.target,
                        state=weave.state.value)
        for key, value in (("request_id", request_id), ("reason", reason),
                           ("detail", detail), *extra.items()):
            if value is not None:
                body[key] = value
        self.store.audit(body)


def recorded_problems(problems: list[str]) -> list[str]:
    """The problems of a refused reload as recorded: the first MAX_RECORDED_PROBLEMS, each
    cut to MAX_PROBLEM_CHARS."""
    return [p if len(p) <= MAX_PROBLEM_CHARS else p[:MAX_PROBLEM_CHARS - 1] + "…"
            for p in problems[:MAX_RECORDED_PROBLEMS]]


def _ended_by(actor: Actor) -> str:
    """Who ended a weave, as both of its parties may read it: the tenant that asked (always
    one of the parties: no other may), else an operator or NWC itself. Not `actor.name`,
    which names an operator's or a tenant's token."""
    if actor.tenant is not None:
        return actor.tenant
    return CONTROLLER if actor == SYSTEM else OPERATOR


def _denial_event(denial: Denial) -> dict[str, Any]:
    """A denial as an event: the operator's detail, plus what a tenant may read (the event
    hub gives tenants that instead)."""
    out = denial.as_dict()
    if denial.tenant_view is not None:
        out["tenant_view"] = denial.as_dict(operator=False)
    elif denial.tenant_detail is not None:
        out["tenant_detail"] = denial.tenant_detail
    return out


# How many queued admissions one group commit takes at most: enough to amortise the fsync
# (about 0.1 ms here) over a burst, few enough that the first caller of a batch is not kept
# waiting for long behind the others.
MAX_ADMISSION_BATCH = 64

_Item = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "Future[Any] | None", bool]


class AdmissionNotCommitted(RuntimeError):
    """The group commit an admission was part of failed: nothing of it was kept."""


def _not_committed(cause: BaseException) -> AdmissionNotCommitted:
    error = AdmissionNotCommitted(f"the admission was not committed: {cause}")
    error.__cause__ = cause
    return error


class WeaverLoop:
    """Runs a Weaver on one thread: every change to weave state happens here, in order.
    Other threads `call` (and wait for the result), `admit` (the same, for admissions) or
    `post` (fire and forget). Admissions that are waiting in the queue together run as one
    `Weaver.admission_batch` (one durable commit for all of them); everything else runs on
    its own, in the order it was queued."""

    def __init__(self, weaver: Weaver) -> None:
        self.weaver = weaver
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._backlog: list[_Item | None] = []  # taken from the queue, not yet run
        self._thread = threading.Thread(target=self._run, name="nwc-weaver", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = 30.0,
             **kwargs: Any) -> T:
        return self._wait(fn, args, kwargs, timeout, batchable=False)

    def admit(self, fn: Callable[..., T], *args: Any, timeout: float | None = 30.0,
              **kwargs: Any) -> T:
        """`call` for a function that only admits or denies weaves (`Weaver.create`, or a
        wrapper that checks something first and then calls it)."""
        return self._wait(fn, args, kwargs, timeout, batchable=True)

    def _wait(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
              timeout: float | None, *, batchable: bool) -> T:
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future[T] = Future()
        self._queue.put((fn, args, kwargs, future, batchable))
        return future.result(timeout)

    def post(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._queue.put((fn, args, kwargs, None, False))

    def _next(self) -> _Item | tuple[()] | None:
        if self._backlog:
            return self._backlog.pop(0)
        try:
            return self._queue.get(timeout=self.weaver.seconds_to_next_deadline())
        except queue.Empty:
            return ()

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                break
            # Leases that ended before this call are released before it runs: a request
            # never sees (nor extends) a weave whose time is up (found in review).
            try:
                self.weaver.tick()
            except Exception:
                log.exception("weaver tick failed")
            if item and item[4]:
                self._run_admissions(item)
            elif item:
                fn, args, kwargs, future, _ = item
                if future is None or future.set_running_or_notify_cancel():
                    ok, result = self._apply(fn, args, kwargs)
                    self._settle(future, ok, result)
        self._stopped.set()

    def _run_admissions(self, first: _Item) -> None:
        """Run `first` and the admissions queued right behind it as one batch."""
        items = [first]
        while len(items) < MAX_ADMISSION_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None or not item[4]:
                self._backlog.append(item)  # runs next, after this batch: order is kept
                break
            items.append(item)
        running = [i for i in items if i[3] is None or i[3].set_running_or_notify_cancel()]
        outcomes = []
        try:
            with self.weaver.admission_batch():
                for fn, args, kwargs, _, _ in running:
                    outcomes.append(self._apply(fn, args, kwargs))
        except Exception as exc:
            log.exception("a batch of %d admissions could not be committed; all are undone",
                          len(running))
            # One exception per caller: each is raised in its own thread.
            outcomes = [(False, _not_committed(exc)) for _ in running]
        for item, (ok, result) in zip(running, outcomes, strict=True):
            self._settle(item[3], ok, result)

    @staticmethod
    def _apply(fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[bool, Any]:
        try:
            return True, fn(*args, **kwargs)
        except BaseException as exc:
            log.exception("weaver call %s failed", getattr(fn, "__name__", fn))
            return False, exc

    @staticmethod
    def _settle(future: Future[Any] | None, ok: bool, result: Any) -> None:
        if future is None:
            return
        if ok:
            future.set_result(result)
        else:
            future.set_exception(result)
