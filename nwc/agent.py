"""`nwc agent`: the per-host tunnel agent (what ovs-monitor-ipsec is to OVS's own IPsec).

It watches the host's OVSDB for leg ends the controller wants (`nwc-tunnel-*` keys in the
Open_vSwitch row's external_ids), builds each one on this host, hands its connection and key
material to the local IKE daemon over VICI, starts IKE where this host initiates, and reports
back (`nwc-status-*`): the phase, SA state and counters, and for x509 legs a certificate
signing request. When a key disappears it removes everything the leg had on the host.

It holds nothing on disk for the `strongswan` backend: pre-shared keys and private keys live
only in charon's memory and in this process. A restarted agent finds its legs again from its
own status keys (each carries the spec it built) and replays them; every step is idempotent.

Order matters for "never in clear": the blackhole route for the peer's VTEP exists before the
VXLAN device does and goes only after the device is gone, so whenever no CHILD SA routes VXLAN
into IPsec (not yet negotiated, charon stopped, rekeying failed) it is dropped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from nwc.hostnet import VxlanDevice
from nwc.ike import IkeError, IkeNoAnswer, IkeUnavailable, InitiateResult, is_handed_over
from nwc.pki import LegKey, Secret, write_private
from nwc.tunnel import (
    AGENT_ACK_KEY,
    AGENT_ALIVE_KEY,
    AGENT_HEARTBEAT_S,
    NO_ACK_YET,
    RECORD_PREFIX,
    RECORDS_VERSION_KEY,
    STATUS_PREFIX,
    UNDERLAY,
    VXLAN_UDP_PORT,
    LegRecord,
    LegStatus,
    Phase,
    SaInfo,
    TunnelError,
    TunnelSpec,
    parse_version,
)

log = logging.getLogger(__name__)

DEFAULT_OVSDB = "unix:/var/run/openvswitch/db.sock"
DEFAULT_VICI = "/var/run/charon.vici"
DEFAULT_STATE_DIR = Path("/var/lib/nwc-agent")
PORT_GRACE_S = 5.0  # how long ovs-vswitchd may take to give the leg port its ofport
COUNTERS_EVERY_S = 2.0  # byte counters are reported this often; state changes at once
MAX_BACKOFF_S = 10.0
# New legs built per pass, at most: with many legs on a host a build costs tens of
# milliseconds (kernel reads after each change), and the legs already built, whose blackholes
# are checked every pass, must not wait seconds behind a burst of new ones.
MAX_BUILDS_PER_PASS = 4
# The charon identity (IkePort.daemon_id) of a pass where no charon runs: a later one is
# another run, which holds none of the SAs of before.
CHARON_NOT_RUNNING = "not running"


# -- the boundaries (real ones: nwc.hostdb, nwc.ike, nwc.hostnet; fakes in the unit tests) ----

class HostDbPort(Protocol):
    def external_ids(self, prefix: str = ...) -> dict[str, str]: ...
    def update_external_ids(self, set_keys: Mapping[str, str] | None = ...,
                            delete_keys: Iterable[str] = ...) -> None: ...
    def other_config(self) -> dict[str, str]: ...
    def update_other_config(self, set_keys: Mapping[str, str] | None = ...,
                            delete_keys: Iterable[str] = ...) -> None: ...
    def add_port(self, bridge: str, columns: Mapping[str, Any]) -> None: ...
    def delete_port(self, name: str) -> None: ...
    def interface(self, name: str) -> dict[str, Any] | None: ...
    def bridge_datapath_type(self, bridge: str) -> str | None: ...


class IkePort(Protocol):
    def load_connection(self, conn: dict[str, Any]) -> None: ...
    def unload_connection(self, name: str) -> None: ...
    def connections(self) -> set[str]: ...
    def load_shared(self, secret_id: str, secret: Secret, owners: list[str]) -> None: ...
    def unload_shared(self, secret_id: str) -> None: ...
    def load_key(self, der: Secret, kind: str = ...) -> str: ...
    def unload_key(self, key_id: str) -> None: ...
    def initiate(self, name: str, timeout_s: float = ...) -> InitiateResult: ...
    def terminate(self, name: str, timeout_s: float = ...) -> None: ...
    def terminate_sa(self, ike_id: str, timeout_s: float = ...) -> None: ...
    def reauthenticate(self, name: str, ike_id: str, timeout_s: float = ...
                       ) -> InitiateResult: ...
    def sas(self) -> dict[str, SaInfo]: ...
    def ike_sa_ids(self, name: str) -> set[str]: ...
    def daemon_id(self) -> str | None: ...


class NetPort(Protocol):
    # Reads inside share one view of the kernel, dropped by any change made through this
    # port and at the end; outside changes are seen from the next pass on.
    def one_pass(self) -> AbstractContextManager[object]: ...
    def ensure_address(self, address: Any, device: str) -> None: ...
    def remove_address(self, address: Any, device: str) -> None: ...
    def ensure_blackhole(self, destination: Any) -> None: ...
    def remove_blackhole(self, destination: Any) -> None: ...
    def ensure_link_route(self, destination: Any, device: str, source: Any) -> None: ...
    def remove_link_route(self, destination: Any, device: str) -> None: ...
    def ensure_vxlan(self, want: Any) -> None: ...
    def remove_link(self, name: str) -> None: ...
    def link_exists(self, name: str) -> bool: ...


Submit = Callable[[Callable[[], InitiateResult]], "concurrent.futures.Future[InitiateResult]"]


@dataclass
class _OldSas:
    """SAs a leg must not count as its own, by charon's unique ids: IKE and CHILD SA ids
    apart, since charon numbers each on its own (a new IKE SA may have an old CHILD SA's
    number). Rekeys need no authentication, so a rekey of such an SA is one too; it keeps
    one of the two ids. The ids are of one charon run (`charon`, its identity as
    `IkePort.daemon_id` gives it, when known): a restarted charon holds none of these SAs
    and numbers from 1 again, so its new SAs would repeat old ids."""

    ike_ids: set[str] = field(default_factory=set)
    child_ids: set[str] = field(default_factory=set)
    charon: str | None = None

    def holds(self, sa: SaInfo) -> bool:
        return sa.ike_id in self.ike_ids or sa.child_id in self.child_ids

    def holds_any(self) -> bool:
        return bool(self.ike_ids or self.child_ids)

    def take(self, sa: SaInfo) -> None:
        self.ike_ids.update(i for i in (sa.ike_id,) if i)
        self.child_ids.update(i for i in (sa.child_id,) if i)

    def claims(self, sa: SaInfo) -> bool:
        """Whether `sa` is one of these SAs or a rekey of one, which keeps one of the two
        ids: as old as it, so its new id is taken too."""
        if not self.holds(sa):
            return False
        self.take(sa)
        return True

    def keep_listed(self, listed: Iterable[SaInfo]) -> None:
        """Forget the ids no SA in `listed` has: those SAs are gone (charon never reuses an
        id while it runs)."""
        listed = list(listed)
        self.ike_ids &= {sa.ike_id for sa in listed if sa.ike_id}
        self.child_ids &= {sa.child_id for sa in listed if sa.child_id}

    def to_json(self) -> dict[str, Any]:
        return {"ike": sorted(self.ike_ids), "child": sorted(self.child_ids),
                "charon": self.charon}

    @classmethod
    def from_json(cls, value: object) -> _OldSas | None:
        """What `to_json` wrote; None for anything else (a status is the agent's own, but
        it comes back through OVSDB)."""
        if not isinstance(value, dict):
            return None
        ike, child, charon = value.get("ike"), value.get("child"), value.get("charon")
        if not (isinstance(ike, list) and isinstance(child, list)
                and all(isinstance(i, str) for i in [*ike, *child])
                and (charon is None or isinstance(charon, str))):
            return None
        return cls(set(ike), set(child), charon)


@dataclass
class _Swap(_OldSas):
    """SAs of a leg built from key material it no longer has (a restarted controller drew a
    new key, or signed new certificates), while they are replaced."""

    next_ask: float = 0.0  # when to ask charon again if no new SA came of it
    # The responder's end: when it stops waiting for the peer to delete the old IKE SAs
    # (see Agent._replacing) and deletes them itself; None until the new SA is up here.
    peer_deletes_by: float | None = None
    asked: int = 0
    refused: str = ""  # what charon said when the peer refused the new material


@dataclass
class _Leg:
    """What the agent knows about one leg end it holds."""

    spec: TunnelSpec
    record: LegRecord | None = None
    built: bool = False
    loaded: LegRecord | None = None  # the material now in the IKE daemon
    loaded_tunnel: str | None = None  # loaded.tunnel_id(), reported as an installed SA's sa_of
    # The fingerprint of the material last loaded: the SAs charon holds were built from it.
    # Unlike `loaded`, kept while charon does not answer (a busy one still holds them), and
    # in the status as `sa_material`, which is never dropped either: a restarted agent
    # must know it to see that new material has to replace those SAs.
    sa_material: str | None = None
    swap: _Swap | None = None
    key: LegKey | None = None
    csr: bytes | None = None  # made once per key (signing again would change it every step)
    phase: Phase = Phase.BUILDING
    detail: str = ""
    sa: SaInfo | None = None
    rekeys: int = 0
    sa_ids: tuple[str | None, str | None] | None = None  # (CHILD SA, IKE SA) last seen
    auth_failed_for: LegRecord | None = None
    # ovs-ipsec: the SAs on the leg's port that were there before this leg's interface was
    # written; None until it has been looked at (see _own_sas).
    old_sas: _OldSas | None = None
    # The local IKE daemon came back from a restart: this end starts IKE even as responder,
    # since the peer still holds the dead SA until its DPD notices (tens of seconds).
    restarted: bool = False
    pending: concurrent.futures.Future[InitiateResult] | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    port_since: float = 0.0
    written: LegStatus | None = None  # the last status written
    written_core: LegStatus | None = None  # the same without its counters
    written_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _csr_key: LegKey | None = None

    def status(self) -> LegStatus:
        if self.key is not None and (self.csr is None or self._csr_key is not self.key):
            self.csr, self._csr_key = self.key.csr_pem(), self.key
        csr = self.csr if self.phase is Phase.WAITING_CERT else None
        return LegStatus(self.phase, self.detail, self.sa, self.rekeys, csr, self.spec,
                         dict(self.extra))


def _adopted_material(extra: Mapping[str, Any]) -> str | None:
    """What a status says the leg's SAs were built from. `material` goes whenever charon
    does not answer (it says what charon listens with, and a restarted charon holds
    nothing), so only `sa_material` outlives a timeout; statuses of agents older than it
    have `material` alone. (LegStatus.from_json checked both are text.)"""
    return extra.get("sa_material", extra.get("material"))


class Agent:
    def __init__(self, *, db: HostDbPort, ike: IkePort, net: NetPort, backend: str,
                 underlay_device: str, state_dir: Path | None = None,
                 submit: Submit | None = None, clock: Callable[[], float] = time.monotonic,
                 initiate_timeout_s: float = 10.0,
                 compact_db: Callable[[], None] | None = None,
                 heartbeat_s: float = AGENT_HEARTBEAT_S) -> None:
        if backend not in ("strongswan", "ovs-ipsec"):
            raise ValueError(f"unknown backend {backend!r}")
        self.db, self.ike, self.net = db, ike, net
        self.backend = backend
        self.underlay = underlay_device
        self.state_dir = state_dir
        self.clock = clock
        self.initiate_timeout_s = initiate_timeout_s
        # OVSDB keeps deleted values in its on-disk log until it compacts; after a leg (and
        # its key) is gone the agent asks for that, so no old key stays on the host's disk.
        self.compact_db = compact_db
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._submit = submit or self._thread_submit
        self.legs: dict[str, _Leg] = {}
        self._adopted = False
        # Each record's text and what it parsed to: records are read every pass and change
        # rarely, and parsing them was most of a quiet pass (about 58 us per leg).
        self._parsed: dict[str, tuple[str, LegRecord]] = {}
        self._host_key: LegKey | None = None  # ovs-ipsec x509: one key per host
        self._host_files: tuple[bytes, bytes, bytes] | None = None  # what is on disk for it
        self._ovs_keys_set: set[str] = set()  # other_config keys this agent added
        self.heartbeat_s = heartbeat_s
        self._beat = 0  # the heartbeat counter last written
        self._next_beat = float("-inf")  # when (self.clock) the next one is due

    def _thread_submit(self, fn: Callable[[], InitiateResult]
                       ) -> concurrent.futures.Future[InitiateResult]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(4, "nwc-initiate")
        return self._pool.submit(fn)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 0.1) -> None:
        """Reconcile until `stop` is set. Stopping the agent leaves the tunnels as they are:
        traffic keeps flowing while the agent restarts."""
        while not stop.is_set():
            started = self.clock()
            try:
                self.step()
            except Exception:
                log.exception("agent step failed; retrying")
            stop.wait(max(0.0, interval - (self.clock() - started)))

    def step(self) -> None:
        """One reconciliation: make this host's leg ends equal to the controller's records.
        The kernel's links, addresses and routes are read once for the pass, and again after
        each change the pass makes (`NetPort.one_pass`)."""
        with self.net.one_pass():
            self._reconcile()

    def _reconcile(self) -> None:
        # One snapshot: the version acknowledged below must be the one these records came with.
        ids = self.db.external_ids("nwc-")
        if AGENT_ACK_KEY not in ids:
            # Until a host shows an ack, the controller takes statuses alone as proof that a
            # leg is gone (agents older than acks write none). So the key goes in before this
            # agent acts, and what it acts on is read after.
            self.db.update_external_ids({AGENT_ACK_KEY: str(NO_ACK_YET)})
            ids = self.db.external_ids("nwc-")
        version = parse_version(ids.get(RECORDS_VERSION_KEY)) or 0
        records = {k: v for k, v in ids.items() if k.startswith(RECORD_PREFIX)}
        statuses = {k: v for k, v in ids.items() if k.startswith(STATUS_PREFIX)}
        if not self._adopted:
            self._adopt(statuses)
        writes: dict[str, str] = {}
        deletes: list[str] = []
        wanted: dict[str, LegRecord] = {}
        self._parsed = {k: v for k, v in self._parsed.items() if records.get(k) == v[0]}
        for raw_key, text in records.items():
            key = raw_key[len(RECORD_PREFIX):]
            try:
                parsed = self._parsed.get(raw_key)
                record = parsed[1] if parsed is not None else LegRecord.from_json(text)
                self._parsed[raw_key] = (text, record)
                if record.spec.backend != self.backend:
                    raise TunnelError(f"this host runs the {self.backend} backend, the record "
                                      f"asks for {record.spec.backend}")
            except TunnelError as exc:
                if key in self.legs and not self._teardown(self.legs[key]):
                    continue
                self.legs.pop(key, None)
                status = LegStatus(Phase.ERROR, f"unusable tunnel record: {exc}").to_json()
                if statuses.get(STATUS_PREFIX + key) != status:
                    writes[STATUS_PREFIX + key] = status
                    log.error("leg %s: unusable tunnel record: %s", key, exc)
                continue
            wanted[key] = record
        removed = False
        for key in [k for k in self.legs if k not in wanted]:
            if self._teardown(self.legs[key]):
                del self.legs[key]
                deletes.append(STATUS_PREFIX + key)
                removed = True
            else:
                writes.update(self._report(self.legs[key]))
        for key in [k[len(STATUS_PREFIX):] for k in statuses]:
            if key not in self.legs and RECORD_PREFIX + key not in records:
                deletes.append(STATUS_PREFIX + key)  # left by a leg torn down before a crash
        for key, record in wanted.items():
            leg = self.legs.get(key)
            if leg is not None and leg.spec != record.spec:
                log.info("leg %s: spec changed, rebuilding", key)
                if not self._teardown(leg):
                    continue
                leg = None
            if leg is None:
                leg = self.legs[key] = _Leg(record.spec, port_since=self.clock())
                log.info("leg %s: building (%s to %s, %s)", key, record.spec.host,
                         record.spec.peer_host, record.spec.auth)
            leg.record = record
        sas: dict[str, SaInfo] | None = None
        conns: set[str] = set()
        charon: str | None = None  # which run of charon the SA ids are of (ovs-ipsec)
        if wanted:  # two VICI round trips per pass, only when there is a leg to look at
            try:
                if self.backend == "ovs-ipsec":
                    # Before the listing: a charon restarted between the two then lists new
                    # SAs under the identity of before, which holds them back one pass at
                    # most; the other order would judge the old run's SAs as the new run's.
                    charon = self._charon_id()
                sas = self.ike.sas()
                if self.backend == "strongswan":  # ovs-ipsec's connections are not ours
                    conns = self.ike.connections()
            except IkeUnavailable:  # nothing to go by this pass, and nothing is held
                sas, conns, charon = None, set(), CHARON_NOT_RUNNING
            except IkeNoAnswer:  # nothing to go by this pass
                sas, conns = None, set()
        builds = 0
        # Built legs first (a stable sort keeps the rest in order): their checks never wait.
        for key, leg in sorted(self.legs.items(), key=lambda item: not item[1].built):
            if key not in wanted:
                continue
            if self.backend == "strongswan" and not leg.built:  # ovs-ipsec builds no device
                if builds >= MAX_BUILDS_PER_PASS:
                    leg.phase, leg.detail = Phase.BUILDING, "waiting to be built (at most " \
                        f"{MAX_BUILDS_PER_PASS} legs are built per pass)"
                    writes.update(self._report(leg))
                    continue
                builds += 1
            before = leg.phase
            # One leg's surprise must not stop the others from being built or reported.
            try:
                if self.backend == "strongswan":
                    self._ensure_strongswan(leg, sas, conns)
                else:
                    self._ensure_ovs_ipsec(leg, sas, charon)
            except Exception as exc:
                log.exception("leg %s: unexpected failure", key)
                self._fail(leg, f"unexpected failure: {exc!r}")
            if leg.phase != before:
                log.info("leg %s: %s -> %s%s", key, before, leg.phase,
                         f" ({leg.detail})" if leg.detail else "")
            writes.update(self._report(leg))
        if ids.get(AGENT_ACK_KEY) != str(version):
            # In the same transaction as this pass's statuses: the controller reads "acted on
            # this version, and here is what came of it" at once, never the ack alone.
            writes[AGENT_ACK_KEY] = str(version)
        writes.update(self._heartbeat(ids))
        if writes or deletes:
            self.db.update_external_ids(writes, [d for d in deletes if d not in writes])
        if removed and self.compact_db is not None:
            try:
                self.compact_db()
            except Exception as exc:
                log.warning("could not compact the OVSDB log: %s", exc)

    def _heartbeat(self, ids: Mapping[str, str]) -> dict[str, str]:
        """The heartbeat to write with this pass, when one is due: written at the end of a
        pass, it says the passes go on (one stuck on charon or the kernel stops it too). The
        count goes on from what the host holds, so a restarted agent's first beat is a change
        as well."""
        now = self.clock()
        if now < self._next_beat:
            return {}
        self._next_beat = now + self.heartbeat_s
        self._beat = max(self._beat, parse_version(ids.get(AGENT_ALIVE_KEY)) or 0) + 1
        return {AGENT_ALIVE_KEY: str(self._beat)}

    def _adopt(self, statuses: Mapping[str, str]) -> None:
        """After a restart: take back the legs this agent had built (their status keys carry
        the spec), so they can be checked or torn down."""
        self._adopted = True
        for raw_key, text in statuses.items():
            try:
                status = LegStatus.from_json(text)
            except TunnelError:
                continue
            if status.applied is None or status.applied.backend != self.backend:
                continue
            # The SAs the status noted as not the leg's own (`old_sas`; in memory only, a
            # restart would trust them). strongswan: those built from earlier key material,
            # still to be replaced. ovs-ipsec: an earlier tunnel's; a status that notes none
            # and says `installed` (an agent older than the note) had judged the SAs, any
            # other has not, and every SA up is taken as old until one negotiated after
            # this comes (as when the interface is written).
            noted = status.extra.get("old_sas")
            swap, old_sas = None, None
            if self.backend == "strongswan":
                swap = _Swap.from_json(noted)
            else:
                old_sas = _OldSas.from_json(noted)
                if old_sas is None and status.phase is Phase.INSTALLED:
                    old_sas = _OldSas()
            leg = _Leg(status.applied, phase=status.phase, rekeys=status.rekeys,
                       port_since=self.clock(), extra=dict(status.extra), old_sas=old_sas,
                       swap=swap, sa_material=_adopted_material(status.extra))
            self.legs[raw_key[len(STATUS_PREFIX):]] = leg
            self._ovs_keys_set.update(status.extra.get("ovs_keys", []))

    def _report(self, leg: _Leg) -> dict[str, str]:
        """The status to write, if it changed: state changes at once, counters every few
        seconds (each write is an OVSDB transaction on disk)."""
        status = leg.status()
        if status == leg.written:
            return {}  # compared as objects: encoding every leg's status every pass cost more
        # What must reach the controller at once: the state, not the counters and timers.
        core = replace(status, sa=SaInfo(status.sa.ike_state, status.sa.child_state,
                                         status.sa.child_id, rekeying=status.sa.rekeying)
                       if status.sa else None)
        now = self.clock()
        if core == leg.written_core and now - leg.written_at < COUNTERS_EVERY_S:
            return {}
        text = status.to_json()
        leg.written, leg.written_core, leg.written_at = status, core, now
        return {STATUS_PREFIX + leg.spec.key: text}

    # -- strongswan backend -----------------------------------------------------------------

    def _device(self, name: str) -> str:
        return self.underlay if name == UNDERLAY else name

    def _ensure_blackholes(self, spec: TunnelSpec) -> None:
        for route in spec.routes():
            if route.kind == "blackhole":
                self.net.ensure_blackhole(route.destination)

    def _build_network(self, spec: TunnelSpec, with_vxlan: bool) -> None:
        """Make (or put back) the leg's addresses, link route and device; each step is
        idempotent, so this runs every pass and repairs what something else removed. The
        caller has put the blackholes in place first: nothing may leave before them."""
        for address in spec.addresses():
            self.net.ensure_address(address.address, self._device(address.device))
        for route in spec.routes():
            if route.kind == "link":
                self.net.ensure_link_route(route.destination, self._device(route.device or ""),
                                           route.source)
        if with_vxlan:
            self.net.ensure_vxlan(VxlanDevice(spec.device, spec.vni, spec.local_vtep,
                                              spec.remote_vtep, VXLAN_UDP_PORT,
                                              spec.mtu.vm_mtu))

    def _ensure_strongswan(self, leg: _Leg, sas: dict[str, SaInfo] | None,
                           conns: set[str]) -> None:
        spec, record = leg.spec, leg.record
        assert record is not None
        now = self.clock()
        leg.extra.pop("carrying", None)  # said again by _observe while it holds
        try:
            # Every pass, not only when building: anything may remove the blackhole
            # (systemd-networkd, `ip route flush`), and without it, whenever no CHILD SA
            # routes the peer's VTEP into IPsec, VXLAN follows the main table in clear.
            self._ensure_blackholes(spec)
        except Exception as exc:
            self._withdraw_device(leg, f"the blackhole route for {spec.remote_vtep} could not "
                                       f"be put in place ({exc})")
            return
        try:
            if leg.built and not self.net.link_exists(spec.device):
                log.warning("leg %s: %s disappeared; rebuilding", spec.key, spec.device)
                leg.built = False
            # The addresses and the link route too (idempotent); the device only when
            # building, since a device that exists is checked above and its OVS port with it.
            self._build_network(spec, with_vxlan=not leg.built)
            if not leg.built:
                self.db.add_port(spec.bridge, {"name": spec.device,
                                               "ofport_request": spec.ofport,
                                               "external_ids": spec.owner_tags()})
                leg.built, leg.port_since = True, now
        except Exception as exc:
            self._fail(leg, f"building failed: {exc}")
            return
        port_problem = self._port_problem(spec, now - leg.port_since)
        if port_problem:
            self._fail(leg, port_problem)
            return
        if sas is None:
            leg.phase, leg.detail, leg.sa = Phase.IKE_DOWN, "the IKE daemon does not answer; " \
                "the leg's traffic is dropped", None
            leg.loaded = None  # a restarted daemon has forgotten everything
            leg.extra.pop("material", None)
            leg.pending = None
            leg.restarted = True
            return
        if leg.phase is Phase.IKE_DOWN:
            # What follows may not say anything new (an initiation under way): the reason
            # it went down must not be read as the state it is in now.
            leg.detail = "the IKE daemon answers again: setting the leg up again"
        if spec.auth == "x509":
            if leg.key is None:
                leg.key = LegKey.generate(spec.local_id)
            if not (record.cert_pem and record.ca_pem and leg.key.matches(record.cert_pem)):
                sa = sas.get(spec.connection_name)
                if leg.loaded is None and sa is not None and sa.installed:
                    # Adopted after this agent restarted: charon still holds the key from
                    # before, and the SA it authenticated carries traffic (rekeys need no
                    # new authentication). The new key's certificate is asked for only once
                    # that SA is gone, so the tenant hears of no outage that is not one.
                    self._observe(leg, sa, now)
                    return
                leg.phase, leg.detail = Phase.WAITING_CERT, "certificate requested"
                return
        try:
            if (leg.loaded is None or not record.same_material(leg.loaded)
                    or spec.connection_name not in conns):
                self._load(leg, record, sas.get(spec.connection_name))
        except (IkeUnavailable, IkeNoAnswer):
            leg.phase, leg.loaded = Phase.IKE_DOWN, None
            leg.extra.pop("material", None)
            return
        except Exception as exc:
            self._fail(leg, f"loading into the IKE daemon failed: {exc}")
            return
        self._observe(leg, sas.get(spec.connection_name), now)

    def _withdraw_device(self, leg: _Leg, why: str) -> None:
        """Without its blackhole the leg's VXLAN device may send in clear (whenever no CHILD
        SA takes its packets): remove the device until the blackhole is back."""
        spec = leg.spec
        try:
            self.net.remove_link(spec.device)
            outcome = f"{spec.device} removed until it is back"
        except Exception as exc:
            outcome = f"removing {spec.device} failed too: {exc}"
        leg.built = False  # the next pass builds it again, blackhole first
        self._fail(leg, f"{why}; {outcome}")

    def _load(self, leg: _Leg, record: LegRecord, sa: SaInfo | None) -> None:
        """Hand the record's key material and connection to charon. `sa` is what charon held
        for the leg before: if it was built from other material, it is to be replaced."""
        spec = leg.spec
        key_id: str | None = None
        if spec.auth == "psk":
            assert record.psk is not None
            self.ike.load_shared(spec.connection_name, record.psk,
                                 [spec.local_id, spec.remote_id])
            conn = spec.vici_connection()
        else:
            assert leg.key is not None
            # A public key hash, reported in the status: lets a restarted agent unload it.
            key_id = self.ike.load_key(leg.key.private_der())
            conn = spec.vici_connection(cert_pem=record.cert_pem, ca_pem=record.ca_pem)
        self.ike.load_connection(conn)
        if key_id is not None:
            previous = leg.extra.get("key_id")
            if previous and previous != key_id:
                # The key loaded before this agent restarted: no connection uses it any more,
                # and nothing else would ever take it out of charon's memory. Recorded as the
                # leg's key only once it is gone, so a failure here is retried.
                self.ike.unload_key(previous)
            leg.extra["key_id"] = key_id
        leg.loaded, leg.loaded_tunnel = record, record.tunnel_id()
        # Reported with the status: a status about older material (a restarted controller
        # drew a new key) must not tell the controller this end is listening with the new one.
        material = leg.extra["material"] = record.fingerprint()
        if sa is not None and leg.sa_material not in (None, material):
            # New material does not reach an SA that is up: charon reauthenticates nothing
            # (reauth_time 0), and a rekey keeps the authentication it was built with. So
            # the old SA would go on encrypting for as long as the weave lives.
            log.info("leg %s: key material changed; replacing the SA built from the earlier "
                     "one (IKE SA %s)", spec.key, sa.ike_id)
            leg.swap = leg.swap or _Swap()
            leg.swap.take(sa)
        leg.sa_material = leg.extra["sa_material"] = material

    def _observe(self, leg: _Leg, sa: SaInfo | None, now: float) -> None:
        spec, record = leg.spec, leg.record
        assert record is not None
        leg.sa = sa
        if leg.pending is not None and leg.pending.done():
            result = leg.pending.result()
            leg.pending = None
            if result.ok:
                leg.attempts = 0
            elif result.auth_failed:
                leg.auth_failed_for = record
                leg.detail = f"authentication failed: {result.detail}"
                if leg.swap is not None:
                    leg.swap.refused = result.detail
            else:
                leg.attempts += 1
                leg.next_attempt = now + min(MAX_BACKOFF_S, 0.5 * 2 ** (leg.attempts - 1))
                leg.detail = f"IKE attempt {leg.attempts} failed: {result.detail}"
        if leg.swap is not None and self._replacing(leg, sa, now):
            leg.extra.pop("sa_of", None)
            leg.extra["old_sas"] = leg.swap.to_json()  # read back by a restarted agent
            if sa is not None and sa.installed:
                # Not `installed` for the record (the SA is not built from its material),
                # but the leg's traffic goes through it, encrypted: the controller counts
                # its bytes and takes the end as up (found in review: bytes stopped and
                # the weave read `connecting` for the whole lease when a key was refused).
                leg.extra["carrying"] = True
            return
        leg.extra.pop("old_sas", None)
        if sa is not None and sa.installed:
            before = leg.sa_ids
            if leg.phase is Phase.INSTALLED and before is not None:
                # A CHILD_SA rekey keeps the IKE_SA; an IKE_SA rekey keeps the CHILD_SA. Both
                # new means the SA was negotiated afresh, which is not a rekey.
                child_new, ike_new = sa.child_id != before[0], sa.ike_id != before[1]
                if child_new != ike_new:
                    leg.rekeys += 1
            leg.sa_ids = (sa.child_id, sa.ike_id)
            leg.phase, leg.detail, leg.attempts = Phase.INSTALLED, "", 0
            leg.auth_failed_for = None
            leg.restarted = False
            if leg.loaded_tunnel is not None:  # else adopted: keeps what it said before
                # Which record the SA is of: the controller counts it only for that one.
                leg.extra["sa_of"] = leg.loaded_tunnel
            return
        leg.extra.pop("sa_of", None)
        if leg.auth_failed_for is not None and leg.auth_failed_for.same_material(record):
            leg.phase = Phase.AUTH_FAILED  # no retry with the same key: it would fail again
            return
        leg.auth_failed_for = None
        starts = (spec.initiator and record.start) or leg.restarted
        if leg.pending is None and starts and now >= leg.next_attempt:
            name, timeout = spec.connection_name, self.initiate_timeout_s
            leg.pending = self._submit(lambda: self.ike.initiate(name, timeout))
        if leg.pending is not None or sa is not None:
            leg.phase = Phase.CONNECTING
        else:
            leg.phase = Phase.LISTENING
            if not leg.attempts:
                leg.detail = ""

    def _replacing(self, leg: _Leg, sa: SaInfo | None, now: float) -> bool:
        """Replace the SAs built from earlier key material (`leg.swap`) with one built from
        the material loaded now: True while that is under way, the phase set. Make before
        break: the old SA carries the traffic until the new one is installed at both ends,
        and then goes, terminated by its unique id (by the initiator; see
        _peer_deleted_old). The leg is `installed` again only then."""
        swap, spec, record = leg.swap, leg.spec, leg.record
        assert swap is not None and record is not None
        if sa is None:
            # charon holds no SA for the leg: none of the old ones is left (a restarted one,
            # counting unique ids from 1 again, would give a new SA an old one's id).
            leg.swap = None
            return False
        if swap.claims(sa):
            if leg.auth_failed_for is not None and leg.auth_failed_for.same_material(record):
                # The peer refused the new key. The old SA stays (it still encrypts), and
                # this key is not tried again: it would fail again, each time an
                # authentication failure at the peer. A new record (new material) is.
                leg.detail = "replacing the SA built from the earlier key material failed " \
                             f"authentication: {swap.refused}; that SA still carries the traffic"
                if leg.phase is not Phase.AUTH_FAILED:
                    log.error("leg %s: %s", spec.key, leg.detail)
                leg.phase = Phase.AUTH_FAILED
                return True
            leg.phase = Phase.CONNECTING
            if not spec.initiator:
                # One end replaces the SA, as one end starts it: both at once would race.
                leg.detail = "key material changed: waiting for the peer to replace the SA " \
                             "built from the earlier one (it carries the traffic until then)"
            elif not record.start:
                # The controller sets `start` again once the peer has the new material too.
                leg.detail = "key material changed: waiting for the peer to load it (the " \
                             "SA built from the earlier one carries the traffic until then)"
            elif leg.pending is None and now >= swap.next_ask:
                self._ask_replacement(leg, sa, now)
            return True
        leg.phase = Phase.CONNECTING
        if not sa.installed:
            leg.detail = "key material changed: negotiating the SA built from it"
            return True
        if not spec.initiator and not self._peer_deleted_old(leg, swap, now):
            return True
        for ike_id in sorted(swap.ike_ids):
            try:
                self.ike.terminate_sa(ike_id)
            except IkeUnavailable:
                pass  # a daemon that does not run holds no SA
            except (IkeNoAnswer, IkeError) as exc:
                leg.detail = f"the SA built from the new key material is up; terminating " \
                             f"IKE SA {ike_id}, built from the earlier one, failed: {exc}"
                return True
            swap.ike_ids.discard(ike_id)
        log.info("leg %s: the SA built from the earlier key material is replaced (now IKE SA "
                 "%s)", spec.key, sa.ike_id)
        leg.swap = None
        return False

    def _peer_deleted_old(self, leg: _Leg, swap: _Swap, now: float) -> bool:
        """The responder's end, once the new SA is installed here: whether the old IKE SAs
        are gone, or it is time to delete them from this end. Its CHILD SA is installed
        before the initiator has the answer that installs the other end's, so a DELETE
        from here could reach the initiator first and leave it without an SA for that
        moment (its trap would even start another). The initiator deletes them once its
        end is installed; this end only if that does not happen within a timeout."""
        if swap.peer_deletes_by is None:
            swap.peer_deletes_by = now + self.initiate_timeout_s
        # The deadline first: a charon that keeps failing the listing must not keep both
        # SAs for ever. Past it, the remembered ids are terminated (one already gone is no
        # error to charon's terminate).
        if now >= swap.peer_deletes_by:
            return True
        try:
            swap.ike_ids &= self.ike.ike_sa_ids(leg.spec.connection_name)
        except (IkeUnavailable, IkeNoAnswer, IkeError) as exc:
            leg.detail = f"the SA built from the new key material is up; listing the IKE " \
                         f"SAs built from the earlier one failed: {exc}"
            return False
        if not swap.ike_ids:
            return True
        leg.detail = "the SA built from the new key material is up; waiting for the peer " \
                     "to delete the one built from the earlier material"
        return False

    def _ask_replacement(self, leg: _Leg, sa: SaInfo, now: float) -> None:
        """Have charon negotiate an SA from the material loaded now beside the old one,
        which carries the traffic until then (deleted by _replacing once the new one is
        installed). Waited for elsewhere, like an initiation: it takes a round trip to the
        peer or a timeout, and its outcome tells refused material from a transient failure.
        A refused one leaves the old SA as it was."""
        swap = leg.swap
        assert swap is not None and sa.ike_id is not None
        swap.asked += 1
        swap.next_ask = now + self.initiate_timeout_s  # asked again if nothing came of it
        name, ike_id, timeout = leg.spec.connection_name, sa.ike_id, self.initiate_timeout_s
        if leg.spec.auth == "psk":
            # The connection is as it was, so an initiation would reuse the old IKE SA. A
            # reauthentication makes a new one with the key charon holds now and (with
            # make_before_break) its CHILD SA, then deletes the old one.
            def make() -> InitiateResult:
                return self.ike.reauthenticate(name, ike_id, timeout)
            how = "reauthenticating the SA built from the earlier one"
        else:
            # A reauthentication would present the certificate the old IKE SA was made with
            # (it keeps its connection as loaded then). The connection loaded now, with the
            # new certificates, is another one to charon: an initiation makes a new IKE SA
            # and CHILD SA beside the old ones (`unique = replace` deletes only a duplicate
            # of the same connection; seen with 5.9.8 in test_rekey_charon).
            def make() -> InitiateResult:
                return self.ike.initiate(name, timeout)
            how = "negotiating an SA with the new certificates beside the one built from " \
                  "the earlier ones"

        def replacement() -> InitiateResult:
            try:
                return make()
            except (IkeUnavailable, IkeNoAnswer, IkeError) as exc:
                return InitiateResult(False, False, str(exc))

        leg.pending = self._submit(replacement)
        leg.detail = f"key material changed: {how} (attempt {swap.asked})"

    def _port_problem(self, spec: TunnelSpec, age_s: float) -> str | None:
        iface = self.db.interface(spec.device)
        if iface is None:
            return f"port {spec.device} is missing from {spec.bridge}" \
                if age_s > PORT_GRACE_S else None
        ofport = iface.get("ofport")
        if ofport == -1:
            return f"OVS could not add {spec.device}: {iface.get('error') or 'ofport -1'}"
        if ofport is not None and ofport != spec.ofport:
            return f"{spec.device} got ofport {ofport}, not {spec.ofport} (already taken?)"
        return None

    def _fail(self, leg: _Leg, detail: str) -> None:
        if leg.phase is not Phase.ERROR or leg.detail != detail:
            log.error("leg %s: %s", leg.spec.key, detail)
        leg.phase, leg.detail = Phase.ERROR, detail

    # -- ovs-ipsec backend -------------------------------------------------------------------

    def _charon_id(self) -> str | None:
        try:
            return self.ike.daemon_id()
        except IkeError:  # a charon that will not say: SA ids are judged as before
            return None

    def _ensure_ovs_ipsec(self, leg: _Leg, sas: dict[str, SaInfo] | None,
                          charon: str | None) -> None:
        """Write the leg as an OVS vxlan Interface with IPsec options: ovs-monitor-ipsec
        (on hosts with the kernel datapath) does the rest. Its skb-mark drop policy is what
        keeps the tunnel's traffic from leaving in clear, so the agent makes sure it is set."""
        spec, record = leg.spec, leg.record
        assert record is not None
        try:
            if self.db.bridge_datapath_type(spec.bridge) == "netdev":
                # The userspace datapath sends tunnel packets itself, past kernel XFRM: the
                # skb-mark drop policy never sees them, so nothing would stop them leaving in
                # clear. Refused before anything is built.
                self._fail(leg, f"bridge {spec.bridge} uses the userspace datapath (netdev), "
                                "which bypasses kernel IPsec: the ovs-ipsec backend needs the "
                                "kernel datapath (use the strongswan backend here)")
                return
            self._ensure_blackholes(spec)
            self._build_network(spec, with_vxlan=False)
            config = self.db.other_config()
            if "ipsec_skb_mark" not in config:
                self.db.update_other_config({"ipsec_skb_mark": "0/1"})
                self._ovs_keys_set.add("ipsec_skb_mark")
            if spec.auth == "x509" and not self._ensure_host_certificate(leg, record, config):
                return
            want = spec.ovs_interface(psk=record.psk)
            have = self.db.interface(spec.device)
            if have is None or have["options"] != want["options"] \
                    or have["ofport_request"] != want["ofport_request"]:
                if sas is None and charon != CHARON_NOT_RUNNING:
                    # A charon that does not answer may still hold the earlier tunnel's
                    # SAs: written now, the first listing after would be taken as all old,
                    # and with it the SA ovs-monitor-ipsec negotiates for this interface
                    # meanwhile (found in review: held back for good). Written once they
                    # can be noted.
                    leg.phase = Phase.BUILDING
                    leg.detail = "waiting for the IKE daemon: the SAs up on the port are " \
                                 "noted before the interface is written"
                    leg.extra.pop("sa_of", None)
                    leg.extra["ovs_keys"] = sorted(self._ovs_keys_set)
                    return
                # What is up now was negotiated for other options: noted, and in this
                # leg's status, before the interface is written, so that an agent that
                # stops right after writing it still knows them when it is back.
                leg.old_sas = None
                self._own_sas(leg, sas, charon)
                leg.phase, leg.detail = Phase.DELEGATED, "handed to ovs-monitor-ipsec"
                leg.extra.pop("sa_of", None)
                leg.extra["ovs_keys"] = sorted(self._ovs_keys_set)
                self._note_old_sas(leg)
                noted = self._report(leg)
                if noted:
                    self.db.update_external_ids(noted)
                self.db.add_port(spec.bridge, want)
        except Exception as exc:
            detail = str(exc)
            if record.psk is not None:  # an error may quote the row it refused
                for form in (record.psk.reveal().hex(), record.psk.to_text()):
                    detail = detail.replace(form, "<redacted>")
            self._fail(leg, f"writing the OVS IPsec interface failed: {detail}")
            return
        leg.extra["ovs_keys"] = sorted(self._ovs_keys_set)
        mine = self._own_sas(leg, sas, charon)
        self._note_old_sas(leg)
        leg.sa = next((sa for sa in mine if sa.installed), mine[0] if mine else None)
        if mine and all(sa.installed for sa in mine):
            leg.phase, leg.detail = Phase.INSTALLED, ""
            leg.extra["sa_of"] = record.tunnel_id()
        else:
            leg.phase, leg.detail = Phase.DELEGATED, "handed to ovs-monitor-ipsec"
            if leg.old_sas is not None and leg.old_sas.holds_any():
                leg.detail += "; an earlier tunnel's SA on this port is still up"
            leg.extra.pop("sa_of", None)

    @staticmethod
    def _note_old_sas(leg: _Leg) -> None:
        """Keep the earlier tunnel's SAs in the leg's status (`old_sas`), which a restarted
        agent reads back: in memory only, a restart would trust them (found in review)."""
        if leg.old_sas is None:
            leg.extra.pop("old_sas", None)  # not looked at yet
        else:
            leg.extra["old_sas"] = leg.old_sas.to_json()

    def _own_sas(self, leg: _Leg, sas: dict[str, SaInfo] | None,
                 charon: str | None) -> list[SaInfo]:
        """The SAs ovs-monitor-ipsec negotiated for this leg. It names them after the port
        (<interface>-in-<n> / -out-<n>), and a slot reused after its weave ended repeats the
        port and the endpoints: an SA of the earlier tunnel, not yet taken down, would look
        like this one's (found in review: a new weave was ready on its predecessor's SA). So
        the SAs present when this leg's interface is written are an earlier tunnel's, and so
        are their rekeys, which keep one of the two ids; charon never reuses an id while it
        runs, and a forgotten id is one that is gone. A charon of another run (`charon`)
        holds none of them, and numbers its SAs from 1 again: its SAs are all new."""
        old = leg.old_sas
        if charon == CHARON_NOT_RUNNING:
            # No charon, no SA: none of the earlier tunnel's is left, and any to come is new.
            leg.old_sas = _OldSas(charon=charon)
        elif old is not None and charon is not None and old.charon != charon:
            if old.charon is None:  # noted when charon did not say: taken as this run's
                old.charon = charon
            else:
                if old.holds_any():
                    log.info("leg %s: charon is another run (%s); the earlier tunnel's SAs "
                             "went with the one before", leg.spec.key, charon)
                leg.old_sas = _OldSas(charon=charon)
        if sas is None:
            return []  # nothing to go by this pass
        on_port = [sa for name, sa in sas.items() if name.startswith(f"{leg.spec.device}-")]
        if leg.old_sas is None:
            leg.old_sas = _OldSas(charon=charon)
            for sa in on_port:
                leg.old_sas.take(sa)
        old, own = leg.old_sas, []
        for sa in on_port:
            if not old.claims(sa):  # an earlier tunnel's SA, or a rekey of one
                own.append(sa)
        # A listing caught mid IKE SA rekey shows an old IKE SA without the CHILD SAs it
        # handed on: those are not gone, so their ids must not be forgotten (the successor
        # that holds them would then pass for this leg's).
        if not any(is_handed_over(sa) for sa in on_port):
            old.keep_listed(on_port)
        return own

    def _ensure_host_certificate(self, leg: _Leg, record: LegRecord,
                                 config: Mapping[str, str]) -> bool:
        """ovs-monitor-ipsec authenticates with one certificate per host, configured as
        files in Open_vSwitch other_config. The agent makes that key pair (files 0600 in its
        state directory) and has the controller sign it like a leg's."""
        if self.state_dir is None:
            self._fail(leg, "x509 on ovs-ipsec needs the agent's --state-dir")
            return False
        directory = self.state_dir / "ovs-ipsec"
        paths = {"private_key": directory / "host.key", "certificate": directory / "host.crt",
                 "ca_cert": directory / "ca.crt"}
        foreign = [k for k, p in paths.items() if k in config and config[k] != str(p)]
        if foreign:
            self._fail(leg, f"this host's OVS already uses an IPsec {foreign[0]} NWC does not "
                            f"manage ({config[foreign[0]]})")
            return False
        if self._host_key is None or self._host_key.identity != leg.spec.local_id:
            self._host_key = LegKey.generate(leg.spec.local_id)
        leg.key = self._host_key
        if not (record.cert_pem and record.ca_pem and self._host_key.matches(record.cert_pem)):
            leg.phase, leg.detail = Phase.WAITING_CERT, "host certificate requested"
            return False
        files = (self._host_key.private_pem().reveal(), record.cert_pem, record.ca_pem)
        if files != self._host_files:  # written once per key and certificate, not per pass
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name, data in zip(paths, files, strict=True):
                write_private(paths[name], data)
            self._host_files = files
        wanted = {k: str(p) for k, p in paths.items()}
        if any(config.get(k) != v for k, v in wanted.items()):
            self.db.update_other_config(wanted)
            self._ovs_keys_set.update(wanted)
        return True

    # -- teardown ------------------------------------------------------------------------------

    def _teardown(self, leg: _Leg) -> bool:
        """Remove everything the leg had on this host; True when all of it is gone. The VXLAN
        device goes first and the blackhole last, so no VXLAN packet can leave in clear
        while the SA is being removed. If the port or the device may still be there, the
        blackhole stays (the SA is gone by then, so it is all that keeps their VXLAN off the
        underlay) and the next pass tries again."""
        spec = leg.spec
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], object], ike: bool = False) -> bool:
            try:
                action()
                return True
            except IkeUnavailable:
                if not ike:
                    problems.append(f"{what}: IKE daemon unavailable")
                # A daemon that does not run holds no SA, connection or key.
            except IkeNoAnswer as exc:
                # A busy daemon still holds them: not removed, so the next pass tries again.
                problems.append(f"{what}: IKE daemon did not answer ({exc})")
            except Exception as exc:
                problems.append(f"{what}: {exc}")
            return False

        def device_gone() -> None:
            if self.net.link_exists(spec.device):
                raise RuntimeError(f"{spec.device} still exists")

        if leg.pending is not None:
            leg.pending.cancel()
            leg.pending = None
        sender_gone = attempt("OVS port", lambda: self.db.delete_port(spec.device))
        if self.backend == "strongswan":
            removed = attempt("VXLAN device", lambda: self.net.remove_link(spec.device))
            sender_gone &= removed and attempt("VXLAN device", device_gone)
            attempt("IKE SA", lambda: self.ike.terminate(spec.connection_name), ike=True)
            attempt("IKE connection", lambda: self.ike.unload_connection(spec.connection_name),
                    ike=True)
            if spec.auth == "psk":
                attempt("pre-shared key", lambda: self.ike.unload_shared(spec.connection_name),
                        ike=True)
            key_id = leg.extra.get("key_id")
            if key_id:
                attempt("private key", lambda: self.ike.unload_key(key_id), ike=True)
        for route in spec.routes():
            if route.kind == "link":
                attempt("route", lambda r=route: self.net.remove_link_route(
                    r.destination, self._device(r.device or "")))
        for address in spec.addresses():
            attempt("address", lambda a=address: self.net.remove_address(
                a.address, self._device(a.device)))
        if self.backend == "ovs-ipsec":
            others = [k for k, other in self.legs.items() if other is not leg]
            if not others:
                attempt("OVS IPsec settings", self._remove_ovs_settings)
        for route in spec.routes():
            if route.kind == "blackhole" and sender_gone:
                attempt("blackhole", lambda r=route: self.net.remove_blackhole(r.destination))
        leg.key = None
        if problems:
            self._fail(leg, "teardown incomplete: " + "; ".join(problems))
            return False
        log.info("leg %s: removed", spec.key)
        return True

    def _remove_ovs_settings(self) -> None:
        if self._ovs_keys_set:
            self.db.update_other_config(delete_keys=sorted(self._ovs_keys_set))
            self._ovs_keys_set.clear()
        if self.state_dir is not None:
            for name in ("host.key", "host.crt", "ca.crt"):
                (self.state_dir / "ovs-ipsec" / name).unlink(missing_ok=True)
            directory = self.state_dir / "ovs-ipsec"
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        self._host_key = None
        self._host_files = None


# -- the command ------------------------------------------------------------------------------

def positive_seconds(text: str) -> float:
    """An argparse type: a duration in seconds, finite and above 0. nan or inf would never
    beat, reconcile or give up an IKE attempt; 0 or less would spin (or time out at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, not "
                                         f"{text}")
    return value


def cmd_agent(args: argparse.Namespace) -> int:
    from nwc.cli import EXIT_ERROR, EXIT_OK
    from nwc.hostdb import (
        AGENT_TABLES,
        HostDb,
        OvsdbConfigError,
        configure_targets,
    )
    from nwc.hostnet import HostNetwork
    from nwc.hostwatch import AGENT_SILENT_S
    from nwc.ike import IkeDaemon
    from nwc.ovsdbtls import ServerIdentity

    try:
        configure_targets(args.ovsdb_ssl_key, args.ovsdb_ssl_cert, args.ovsdb_ssl_ca,
                          [args.ovsdb])  # refused now, not retried for ever below
    except OvsdbConfigError as exc:
        print(f"nwc agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    os.umask(0o077)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # An ssl: --ovsdb must present a certificate for --ovsdb-server-name or the target's
    # address (the controller's rule, nwc.ovsdbtls); the records it serves hold keys.
    db = HostDb(args.ovsdb, AGENT_TABLES, server_identity=ServerIdentity.of_target(
        args.ovsdb, args.ovsdb_server_name))
    delay = 0.5
    while not stop.is_set():
        try:
            db.open()
            break
        except Exception as exc:
            log.warning("OVSDB %s not reachable (%s); retrying", args.ovsdb, exc)
            stop.wait(delay)
            delay = min(delay * 2, 10.0)
    if stop.is_set():
        return EXIT_OK
    net = HostNetwork()
    compact = None
    if args.ovsdb_server_ctl:
        def compact() -> None:
            subprocess.run(["ovs-appctl", "-t", str(args.ovsdb_server_ctl),
                            "ovsdb-server/compact"], check=True, capture_output=True,
                           timeout=10)
    agent = Agent(db=db, ike=IkeDaemon(args.vici), net=net, backend=args.backend,
                  underlay_device=args.underlay_dev, state_dir=args.state_dir,
                  initiate_timeout_s=args.initiate_timeout, compact_db=compact,
                  heartbeat_s=args.heartbeat_interval)
    log.info("nwc agent up: backend %s, OVSDB %s, VICI %s, underlay %s, heartbeat every %g s",
             args.backend, args.ovsdb, args.vici, args.underlay_dev, args.heartbeat_interval)
    if args.heartbeat_interval * 3 > AGENT_SILENT_S:
        # The controller cannot learn this interval; its own bound has to be raised to match.
        log.warning("a heartbeat every %g s needs `nwc run --agent-unresponsive-after %g` (3 "
                    "beats) or more; with the default %g s this agent would be called "
                    "unresponsive", args.heartbeat_interval, 3 * args.heartbeat_interval,
                    AGENT_SILENT_S)
    try:
        agent.run(stop, args.interval)
    finally:
        agent.close()
        net.close()
        db.close()
        log.info("nwc agent stopped (tunnels left as they are)")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the per-host tunnel agent",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ovsdb", default=DEFAULT_OVSDB,
                   help=f"this host's OVSDB (default {DEFAULT_OVSDB})")
    p.add_argument("--ovsdb-ssl-key", default=None,
                   help="private key (PEM) for an ssl: --ovsdb")
    p.add_argument("--ovsdb-ssl-cert", default=None,
                   help="certificate (PEM) for --ovsdb-ssl-key")
    p.add_argument("--ovsdb-ssl-ca", default=None,
                   help="CA certificate (PEM) the OVSDB server's certificate must chain to")
    p.add_argument("--ovsdb-server-name", default=None,
                   help="the name an ssl: --ovsdb server's certificate must carry (its "
                        "subjectAltName, or CN; ovs-pki's 'NAME id:...' matches NAME); without "
                        "it only the target's IP address is accepted")
    p.add_argument("--vici", default=DEFAULT_VICI,
                   help=f"the local charon's VICI socket (default {DEFAULT_VICI})")
    p.add_argument("--underlay-dev", required=True,
                   help="the device holding this host's underlay address")
    p.add_argument("--backend", choices=("strongswan", "ovs-ipsec"), default="strongswan",
                   help="how this host encrypts weaves (as in the topology's hosts.NAME."
                        "backend)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="where the ovs-ipsec backend keeps its host key and certificates "
                        f"(0700; default {DEFAULT_STATE_DIR})")
    p.add_argument("--ovsdb-server-ctl", type=Path, default=None,
                   help="ovsdb-server's control socket: compact the database after a leg is "
                        "removed, so its key leaves the on-disk log too")
    p.add_argument("--interval", type=positive_seconds, default=0.1, metavar="SECONDS",
                   help="seconds between reconciliations")
    p.add_argument("--heartbeat-interval", type=positive_seconds, default=AGENT_HEARTBEAT_S,
                   metavar="SECONDS",
                   help=f"seconds between heartbeats (default {AGENT_HEARTBEAT_S:g}); the "
                        "controller's --agent-unresponsive-after must be at least 3 times this")
    p.add_argument("--initiate-timeout", type=positive_seconds, default=10.0,
                   metavar="SECONDS",
                   help="seconds one IKE attempt may take")
    p.set_defaults(func=cmd_agent)
