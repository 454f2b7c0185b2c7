"""Fakes at the tunnel code's boundaries: a host's OVSDB, its IKE daemon and its kernel
networking, each keeping the state a real one would, plus one ordered log of every change so
tests can check what happened before what."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from nwc.bridgeguard import BridgeRows, Fix, RemoteRow
from nwc.config import SHIPPED_POLICIES
from nwc.ike import IkeError, IkeNoAnswer, IkeUnavailable, InitiateResult
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.pki import Secret
from nwc.policy import load_policy
from nwc.topology import parse_topology_text
from nwc.tunnel import RECORD_PREFIX, STATUS_PREFIX, SaInfo
from nwc.weave import Leg, Weave

# The world of the tunnel tests: shipped policy, two hosts joined by one switch.
POLICY = load_policy([SHIPPED_POLICIES])
TOPO = parse_topology_text(TWO_HOSTS, POLICY)
OVS_TOPO = parse_topology_text(  # the same, with the ovs-ipsec backend on both hosts
    TWO_HOSTS.replace("underlay_ip: 100.64.0.1}", "underlay_ip: 100.64.0.1, backend: ovs-ipsec}")
    .replace("underlay_ip: 100.64.0.2}", "underlay_ip: 100.64.0.2, backend: ovs-ipsec}"), POLICY)
T0 = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def one_leg_weave(number: int = 1, slot: int | None = 0, target: str = "globex-db",
                  profile: str = "gold", hosts: tuple[str, str] = ("h1", "h2"),
                  kbps: int = 1000) -> Weave:
    """acme-web woven with `target` over one leg between `hosts` (an hour from T0)."""
    return Weave(id=f"wv-{number:06d}", requester="acme-web", target=target,
                 requester_tenant="acme", target_tenant="globex",
                 legs=(Leg(hosts[0], hosts[1], (hosts[0], "s1", hosts[1]), slot),),
                 kbps=kbps, profile=profile,
                 requester_prefixes=(ipaddress.IPv4Network("192.0.2.0/26"),),
                 target_prefixes=(ipaddress.IPv4Network("192.0.2.64/26"),),
                 created_at=T0, expires_at=T0 + dt.timedelta(hours=1))


@dataclass
class Journal:
    entries: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, *entry: str) -> None:
        self.entries.append(entry)

    def index(self, *prefix: str) -> int:
        for i, entry in enumerate(self.entries):
            if entry[:len(prefix)] == prefix:
                return i
        raise AssertionError(f"{prefix} never happened: {self.entries}")

    def count(self, *prefix: str) -> int:
        return sum(1 for e in self.entries if e[:len(prefix)] == prefix)


@dataclass
class FakeHostDb:
    journal: Journal = field(default_factory=Journal)
    ids: dict[str, str] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: int = 0
    opened: bool = False
    failing: set[str] = field(default_factory=set)  # names of methods that raise
    datapath_types: dict[str, str] = field(default_factory=lambda: {"br-int": ""})
    # The integration bridge as the controller's bridge guard reads it: safe unless a test
    # says otherwise (nwc.bridgeguard).
    bridges: dict[str, BridgeRows] = field(default_factory=lambda: {
        "br-int": BridgeRows("br-int", "secure", (), ())})
    managers: tuple[RemoteRow, ...] = ()
    # Runs once, right after the next read has been answered: whatever it does happens
    # between that reader's read and what the reader does with it (another writer's turn).
    after_next_read: Callable[[], None] | None = None

    def open(self) -> FakeHostDb:
        self.opened = True
        return self

    def close(self) -> None:
        self.opened = False

    def external_ids(self, prefix: str = "nwc-") -> dict[str, str]:
        answer = {k: v for k, v in self.ids.items() if k.startswith(prefix)}
        meanwhile, self.after_next_read = self.after_next_read, None
        if meanwhile is not None:
            meanwhile()
        return answer

    def leg_keys(self) -> dict[str, str]:
        """The records and statuses of legs (the records version and the agent's ack stay
        on the host for good)."""
        return {k: v for k, v in self.ids.items() if k.startswith((RECORD_PREFIX, STATUS_PREFIX))}

    def update_external_ids(self, set_keys: Mapping[str, str] | None = None,
                            delete_keys: Iterable[str] = ()) -> None:
        self.writes += 1
        for key in delete_keys:
            self.ids.pop(key, None)
        self.ids.update(set_keys or {})

    def other_config(self) -> dict[str, str]:
        return dict(self.other)

    def update_other_config(self, set_keys: Mapping[str, str] | None = None,
                            delete_keys: Iterable[str] = ()) -> None:
        for key in delete_keys:
            self.other.pop(key, None)
        self.other.update(set_keys or {})

    def add_port(self, bridge: str, columns: Mapping[str, Any]) -> None:
        self.journal.add("add_port", columns["name"])
        self.ports[columns["name"]] = {**columns, "bridge": bridge,
                                       "ofport": columns.get("ofport_request")}

    def delete_port(self, name: str) -> None:
        if "delete_port" in self.failing:
            raise RuntimeError("OVSDB transaction timed out")
        self.journal.add("delete_port", name)
        self.ports.pop(name, None)

    def bridge_datapath_type(self, bridge: str) -> str | None:
        return self.datapath_types.get(bridge)

    def bridge_rows(self, bridge: str) -> BridgeRows:
        if "bridge_rows" in self.failing:
            raise TimeoutError("OVSDB h1: a transaction has not come back")
        rows = self.bridges.get(bridge)
        return dataclasses.replace(rows, managers=self.managers) if rows is not None else \
            BridgeRows(bridge, None, (), self.managers, exists=False)

    def apply_fixes(self, fixes: Iterable[Fix]) -> None:
        """As OVSDB would: each fix sets its column of its row."""
        for fix in fixes:
            self.journal.add("fix", fix.table, fix.record, fix.column, fix.new)
            if fix.table == "Bridge":
                self.bridges[fix.record] = dataclasses.replace(self.bridges[fix.record],
                                                               fail_mode=fix.new)
                continue
            def set_mode(rows: tuple[RemoteRow, ...], f: Fix = fix) -> tuple[RemoteRow, ...]:
                return tuple(dataclasses.replace(r, connection_mode=f.new) if r.uuid == f.record
                             else r for r in rows)
            self.managers = set_mode(self.managers)
            for name, rows in self.bridges.items():
                self.bridges[name] = dataclasses.replace(rows,
                                                         controllers=set_mode(rows.controllers))

    def interface(self, name: str) -> dict[str, Any] | None:
        port = self.ports.get(name)
        if port is None:
            return None
        return {"name": name, "type": port.get("type", ""), "ofport": port["ofport"],
                "ofport_request": port.get("ofport_request"),
                "options": dict(port.get("options", {})),
                "external_ids": dict(port.get("external_ids", {})), "error": None}


@dataclass
class FakeIke:
    journal: Journal = field(default_factory=Journal)
    conns: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared: dict[str, tuple[Secret, list[str]]] = field(default_factory=dict)
    keys: dict[str, Secret] = field(default_factory=dict)
    sa_table: dict[str, SaInfo] = field(default_factory=dict)
    up: bool = True
    busy: bool = False  # running, holding everything, but its VICI calls time out
    # What the peer does with an initiation: "ok", "auth" (wrong key) or "timeout".
    outcome: str = "ok"
    initiations: int = 0
    # With a peer, initiating negotiates with it instead: it must have the connection loaded
    # and, for PSK, the same key; success installs the SA on both, under the same unique ids
    # (charon's are each its own; one number for both ends stands for "the same SA").
    peer: FakeIke | None = None
    # IKE SAs of a connection besides the one sas() reports (charon reports the best).
    others: dict[str, list[SaInfo]] = field(default_factory=dict)
    # Whether a reauthentication deletes the old IKE SA once the new one is up, as charon's
    # does; False leaves it for whoever asked to terminate.
    reauth_deletes_old: bool = True
    # The connection each IKE SA was made with, by its id: charon's initiate reuses an IKE
    # SA only of the connection as loaded now.
    made_with: dict[str, dict[str, Any]] = field(default_factory=dict)
    _next_id: int = 0
    _run: int = 1  # which run of the daemon this is: a restart is another

    def _check(self) -> None:
        if not self.up:
            raise IkeUnavailable("fake charon is down")
        if self.busy:
            raise IkeNoAnswer("fake charon: timed out")

    def restart(self) -> None:
        """A charon that restarted: it remembers nothing, and counts unique ids anew."""
        self.conns.clear()
        self.shared.clear()
        self.keys.clear()
        self.sa_table.clear()
        self.others.clear()
        self.made_with.clear()
        self._next_id = 0
        self._run += 1

    def load_connection(self, conn: dict[str, Any]) -> None:
        self._check()
        (name, body), = conn.items()
        self.journal.add("load_conn", name)
        self.conns[name] = body

    def unload_connection(self, name: str) -> None:
        self._check()
        self.journal.add("unload_conn", name)
        self.conns.pop(name, None)

    def connections(self) -> set[str]:
        self._check()
        return set(self.conns)

    def load_shared(self, secret_id: str, secret: Secret, owners: list[str]) -> None:
        self._check()
        self.journal.add("load_shared", secret_id)
        self.shared[secret_id] = (secret, owners)

    def unload_shared(self, secret_id: str) -> None:
        self._check()
        self.journal.add("unload_shared", secret_id)
        self.shared.pop(secret_id, None)

    def load_key(self, der: Secret, kind: str = "ECDSA") -> str:
        self._check()
        key_id = "key-" + hashlib.sha1(der.reveal()).hexdigest()[:8]  # charon: a key hash
        self.journal.add("load_key", key_id)
        self.keys[key_id] = der
        return key_id

    def unload_key(self, key_id: str) -> None:
        self._check()
        self.journal.add("unload_key", key_id)
        self.keys.pop(key_id, None)

    def _sides(self) -> tuple[FakeIke, ...]:
        return (self, self.peer) if self.peer is not None else (self,)

    def _negotiated(self, name: str) -> str:
        """What the peer makes of a negotiation: "ok", "auth" or "timeout"."""
        outcome = self.outcome
        if self.peer is not None:
            if not self.peer.up or name not in self.peer.conns:
                outcome = "timeout"
            elif name in self.shared and self.shared[name][0] != self.peer.shared.get(
                    name, (None,))[0]:
                outcome = "auth"
        return outcome

    def _new_sa(self, name: str, keep_old: bool) -> str:
        """A new IKE SA with its CHILD SA at both ends; its unique id."""
        number = max(side._next_id for side in self._sides()) + 1
        for side in self._sides():
            side._next_id = number
            old = side.sa_table.get(name)
            if keep_old and old is not None:
                side.others.setdefault(name, []).append(old)
            side.sa_table[name] = SaInfo("ESTABLISHED", "INSTALLED", child_id=str(number),
                                         ike_id=str(number), encryption="AES_GCM_16")
            if name in side.conns:
                side.made_with[str(number)] = side.conns[name]
        return str(number)

    def initiate(self, name: str, timeout_s: float = 10.0) -> InitiateResult:
        self._check()
        self.initiations += 1
        self.journal.add("initiate", name)
        outcome = self._negotiated(name)
        if outcome == "auth":
            return InitiateResult(False, True, "received AUTHENTICATION_FAILED notify error")
        if outcome == "timeout":
            return InitiateResult(False, False, "establishing IKE_SA failed, peer not responding")
        # An IKE SA of a connection loaded again since (a new certificate) is another
        # connection's to charon: the new one comes up beside it, which stays until deleted.
        up = self.sa_table.get(name)
        beside = up is not None and up.ike_id in self.made_with \
            and self.made_with[up.ike_id] != self.conns.get(name)
        self._new_sa(name, keep_old=beside)
        return InitiateResult(True)

    def reauthenticate(self, name: str, ike_id: str, timeout_s: float = 10.0
                       ) -> InitiateResult:
        """charon's make-before-break reauthentication: a new IKE SA with the key held now;
        if the peer refuses it, the old one stays."""
        self._check()
        self.journal.add("reauth", ike_id)
        if name not in self.sa_table or self.sa_table[name].ike_id != ike_id:
            raise IkeError("rekeying IKE_SA failed: no matching IKE_SA")
        outcome = self._negotiated(name)
        if outcome == "auth":
            return InitiateResult(False, True, "received AUTHENTICATION_FAILED notify error")
        if outcome == "timeout":
            return InitiateResult(False, False, "no new IKE SA within 10 s")
        self._new_sa(name, keep_old=True)
        if self.reauth_deletes_old:
            self._drop(ike_id)
        return InitiateResult(True)

    def terminate_sa(self, ike_id: str, timeout_s: float = 0.5) -> None:
        self._check()
        self.journal.add("terminate_sa", ike_id)
        self._drop(ike_id)

    def _drop(self, ike_id: str) -> None:
        """Delete one IKE SA at both ends; a shadowed one takes its place in sas()."""
        for side in self._sides():
            for name in list(side.sa_table):
                side.others[name] = [sa for sa in side.others.get(name, [])
                                     if sa.ike_id != ike_id]
                if side.sa_table[name].ike_id == ike_id:
                    del side.sa_table[name]
                    if side.others[name]:
                        side.sa_table[name] = side.others[name].pop()

    def ike_sa_ids(self, name: str) -> set[str]:
        """The unique ids of every IKE SA charon holds for a connection."""
        self._check()
        return {sa.ike_id or "" for sa in [*self.others.get(name, []),
                                            *([self.sa_table[name]] if name in self.sa_table
                                              else [])]}

    def terminate(self, name: str, timeout_s: float = 0.5) -> None:
        self._check()
        self.journal.add("terminate", name)
        for side in self._sides():
            side.sa_table.pop(name, None)
            side.others.pop(name, None)

    def sas(self) -> dict[str, SaInfo]:
        self._check()
        return dict(self.sa_table)

    def daemon_id(self) -> str | None:
        self._check()
        return f"fake charon, run {self._run}"


@dataclass
class FakeNet:
    journal: Journal = field(default_factory=Journal)
    addresses: set[tuple[str, str]] = field(default_factory=set)
    blackholes: set[str] = field(default_factory=set)
    link_routes: set[tuple[str, str, str]] = field(default_factory=set)
    vxlans: dict[str, Any] = field(default_factory=dict)
    # "remove_link" raises; "remove_link_noop" returns but the device stays (as a device
    # held by another reference would); "ensure_blackhole" raises.
    failing: set[str] = field(default_factory=set)

    def one_pass(self) -> AbstractContextManager[object]:
        # Every read here is of the current state: a view that is never stale (the real
        # HostNetwork's view is tested against a fake kernel in test_hostnet.py).
        return nullcontext()

    def ensure_address(self, address: Any, device: str) -> None:
        if (str(address), device) not in self.addresses:
            self.journal.add("add_address", str(address), device)
            self.addresses.add((str(address), device))

    def remove_address(self, address: Any, device: str) -> None:
        self.journal.add("remove_address", str(address), device)
        self.addresses.discard((str(address), device))

    def ensure_blackhole(self, destination: Any) -> None:
        if "ensure_blackhole" in self.failing:
            raise RuntimeError("Operation not permitted")
        if str(destination) not in self.blackholes:
            self.journal.add("add_blackhole", str(destination))
            self.blackholes.add(str(destination))

    def remove_blackhole(self, destination: Any) -> None:
        self.journal.add("remove_blackhole", str(destination))
        self.blackholes.discard(str(destination))

    def ensure_link_route(self, destination: Any, device: str, source: Any) -> None:
        route = (str(destination), device, str(source))
        if route not in self.link_routes:
            self.journal.add("add_route", str(destination))
            self.link_routes.add(route)

    def remove_link_route(self, destination: Any, device: str) -> None:
        self.journal.add("remove_route", str(destination))
        self.link_routes = {r for r in self.link_routes if r[:2] != (str(destination), device)}

    def ensure_vxlan(self, want: Any) -> None:
        if self.vxlans.get(want.name) != want:
            self.journal.add("add_vxlan", want.name)
            self.vxlans[want.name] = want

    def remove_link(self, name: str) -> None:
        if "remove_link" in self.failing:
            raise RuntimeError("Device or resource busy")
        if "remove_link_noop" in self.failing:
            return
        self.journal.add("remove_vxlan", name)
        self.vxlans.pop(name, None)

    def link_exists(self, name: str) -> bool:
        return name in self.vxlans

    def empty(self) -> bool:
        return not (self.addresses or self.blackholes or self.link_routes or self.vxlans)


def run_now(fn: Callable[[], InitiateResult]) -> concurrent.futures.Future[InitiateResult]:
    """An executor that runs the job at once: tests see its outcome on the next step."""
    future: concurrent.futures.Future[InitiateResult] = concurrent.futures.Future()
    future.set_result(fn())
    return future


@dataclass
class FakeClock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
