"""A weave as NWC records it: who, where, how fast, until when, and in which state."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from nwc.admission import LiveWeave
from nwc.lease import iso, parse_iso


class State(StrEnum):
    PROVISIONING = "provisioning"  # admitted and reserved; data plane being built
    ACTIVE = "active"  # every part of the data plane reported ready
    TERMINATING = "terminating"  # being torn down
    TERMINATED = "terminated"  # ended (expired or on request); nothing held
    FAILED = "failed"  # could not be built or kept; nothing held; `reason` says why


# States in which a weave holds a reservation and a lease.
LIVE_STATES = frozenset({State.PROVISIONING, State.ACTIVE})
# States a weave passes through on its way to another: waiting (`?wait=true`, the CLI)
# waits them out.
TRANSIENT_STATES = frozenset({State.PROVISIONING, State.TERMINATING})


class EndReason(StrEnum):
    EXPIRED = "expired"
    REQUESTED = "requested"
    PROVISION_TIMEOUT = "provision_timeout"
    PROVISION_FAILED = "provision_failed"
    NO_PATH = "no_path"  # a link went down and no other path had the capacity
    POLICY_WITHDRAWN = "policy_withdrawn"  # a policy reload no longer allows it
    TOPOLOGY_CHANGED = "topology_changed"


# `ended_by` when no tenant ended a weave: an administrator's request, or the controller
# itself (a lease that ran out, a failure, a policy reload).
OPERATOR = "operator"
CONTROLLER = "nwc"


@dataclass(frozen=True)
class Leg:
    """One host pair of a weave, with its own tunnel (unless both ends share a host)."""

    requester_host: str
    target_host: str
    path: tuple[str, ...]
    # Small integer, reused after release; the leg's underlay addresses and VXLAN VNI derive
    # from it (Topology.weave_addresses). None for a leg inside one host: no tunnel.
    slot: int | None

    @property
    def local(self) -> bool:
        return self.requester_host == self.target_host

    def to_dict(self) -> dict[str, Any]:
        return {"requester_host": self.requester_host, "target_host": self.target_host,
                "path": list(self.path), "slot": self.slot}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Leg:
        return cls(d["requester_host"], d["target_host"], tuple(d["path"]), d["slot"])


@dataclass(frozen=True)
class Weave:
    id: str
    requester: str
    target: str
    requester_tenant: str
    target_tenant: str
    legs: tuple[Leg, ...]
    kbps: int  # reserved and metered per leg, each direction
    profile: str
    requester_prefixes: tuple[ipaddress.IPv4Network, ...]
    target_prefixes: tuple[ipaddress.IPv4Network, ...]
    created_at: datetime
    expires_at: datetime
    state: State = State.PROVISIONING
    reason: str | None = None
    ended_at: datetime | None = None
    # Who ended it, as both parties may read it: a party's tenant name, OPERATOR or
    # CONTROLLER; never a token (whose name is its owner's business alone).
    ended_by: str | None = None
    # Once ended: the sentence saying why (the end event's `detail`), as both parties may
    # read it. The operator's fuller one is in the audit record and the log.
    end_detail: str | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def number(self) -> int:
        """The sequence number in the id (wv-000042 -> 42); cookies derive from it."""
        return int(self.id.rsplit("-", 1)[-1])

    @property
    def bandwidth_mbps(self) -> float:
        return self.kbps / 1000

    @property
    def total_kbps(self) -> int:
        return self.kbps * len(self.legs)

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(leg.path for leg in self.legs)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset({self.requester_tenant, self.target_tenant})

    def with_(self, **changes: Any) -> Weave:
        return replace(self, **changes)

    def as_live(self) -> LiveWeave:
        return LiveWeave(self.id, self.requester, self.target, self.total_kbps,
                         self.requester_prefixes, self.target_prefixes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: stored in SQLite and (minus nothing secret: a weave holds no keys)
        shown by the API."""
        return {
            "id": self.id, "state": self.state.value, "reason": self.reason,
            "requester": self.requester, "target": self.target,
            "requester_tenant": self.requester_tenant, "target_tenant": self.target_tenant,
            # `path` is the first leg's; `legs` has every host pair.
            "path": list(self.legs[0].path), "legs": [leg.to_dict() for leg in self.legs],
            "bandwidth_mbps": self.bandwidth_mbps, "kbps": self.kbps,
            "security_profile": self.profile,
            "requester_prefixes": [str(p) for p in self.requester_prefixes],
            "target_prefixes": [str(p) for p in self.target_prefixes],
            "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
            "ended_at": iso(self.ended_at) if self.ended_at else None,
            "ended_by": self.ended_by, "end_detail": self.end_detail,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Weave:
        return cls(
            id=d["id"], requester=d["requester"], target=d["target"],
            requester_tenant=d["requester_tenant"], target_tenant=d["target_tenant"],
            legs=tuple(Leg.from_dict(leg) for leg in d["legs"]), kbps=d["kbps"],
            profile=d["security_profile"],
            requester_prefixes=tuple(ipaddress.IPv4Network(p) for p in d["requester_prefixes"]),
            target_prefixes=tuple(ipaddress.IPv4Network(p) for p in d["target_prefixes"]),
            created_at=parse_iso(d["created_at"]), expires_at=parse_iso(d["expires_at"]),
            state=State(d["state"]), reason=d.get("reason"),
            ended_at=parse_iso(d["ended_at"]) if d.get("ended_at") else None,
            ended_by=d.get("ended_by"), end_detail=d.get("end_detail"))
