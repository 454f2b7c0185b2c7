"""Admission: may these two IVNs be woven, with this profile, rate and duration, and on which path?

`evaluate` is pure: it reads the policy, the topology, the fabric ledger and the live weaves,
takes the time as an argument, and returns either an `Admission` (what to reserve and build) or a
`Denial` (a machine-readable reason plus a precise sentence). It changes nothing; the weaver
applies an Admission. This is the seed's `initiateWeave`, with "Policy Violation" and
"Insufficient Bandwidth" made exact.

The checks run in a fixed order, so a request that is wrong in several ways always gets the
same answer: invalid_request, unknown_ivn, policy_violation (requester side first),
cidr_overlap, insufficient_bandwidth.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from nwc.fabric import Arc, Fabric, mbps_to_kbps, path_arcs
from nwc.lease import iso
from nwc.policy import MAX_LEASE_S, Ivn, Policy
from nwc.topology import Topology

Side = Literal["requester", "target"]


class Reason(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_IVN = "unknown_ivn"
    POLICY_VIOLATION = "policy_violation"
    CIDR_OVERLAP = "cidr_overlap"
    INSUFFICIENT_BANDWIDTH = "insufficient_bandwidth"
    # Never admission's: the API's, for a tenant naming another tenant's IVN as requester
    # (the true reason the audit keeps, when that tenant is told the IVN does not exist).
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class WeaveRequest:
    requester: str
    target: str
    duration_s: int
    bandwidth_mbps: float
    security_profile: str | None = None  # None: the best profile both sides allow


@dataclass(frozen=True)
class Denial:
    reason: Reason
    detail: str
    side: Side | None = None  # which IVN's policy refused (policy_violation)
    rule: str | None = None  # partner, profile, duration, bandwidth, total_bandwidth, ...
    link: tuple[str, str] | None = None  # the bottleneck (insufficient_bandwidth)
    # What the asking tenant may read, where `detail` would reveal the other tenant's policy
    # (partners, profiles, caps, usage) or weaves the asker is not party to. Operators and
    # the audit trail get `detail`.
    tenant_detail: str | None = None
    # The whole refusal the asking tenant gets instead, when this one is about an IVN that
    # tenant may not know exists (Policy.visible_to): the very refusal for an IVN that does
    # not exist, so its answers cannot tell the two apart. Operators and the audit get this.
    tenant_view: Denial | None = None

    def seen_by(self, operator: bool) -> Denial:
        """The refusal as the operator, or else the asking tenant, may read it."""
        return self if operator or self.tenant_view is None else self.tenant_view

    def detail_for(self, operator: bool) -> str:
        if not operator and self.tenant_view is not None:
            return self.tenant_view.detail_for(operator)
        return self.detail if operator or self.tenant_detail is None else self.tenant_detail

    @property
    def admitted(self) -> bool:
        return False

    def as_dict(self, operator: bool = True) -> dict[str, object]:
        if not operator and self.tenant_view is not None:
            return self.tenant_view.as_dict(operator)
        out: dict[str, object] = {"error": self.reason.value,
                                  "detail": self.detail_for(operator)}
        if self.side:
            out["side"] = self.side
        if self.rule:
            out["rule"] = self.rule
        if self.link:
            out["link"] = list(self.link)
        return out


@dataclass(frozen=True)
class LiveWeave:
    """What admission needs to know about a weave already holding resources."""

    id: str
    requester: str
    target: str
    kbps: int  # in total, over all its legs
    requester_prefixes: tuple[ipaddress.IPv4Network, ...]
    target_prefixes: tuple[ipaddress.IPv4Network, ...]

    def ivns(self) -> tuple[str, str]:
        return self.requester, self.target

    def remote_prefixes(self, ivn: str) -> tuple[ipaddress.IPv4Network, ...]:
        """The prefixes `ivn` reaches through this weave."""
        return self.target_prefixes if ivn == self.requester else self.requester_prefixes


@dataclass(frozen=True)
class LegPlan:
    """One host pair of a weave: a compute host with VMs of the requester, one with VMs of the
    target, and the fabric path between them (just the host when both are the same)."""

    requester_host: str
    target_host: str
    path: tuple[str, ...]


@dataclass(frozen=True)
class Admission:
    requester: str
    target: str
    profile: str
    kbps: int  # per leg
    legs: tuple[LegPlan, ...]
    requester_prefixes: tuple[ipaddress.IPv4Network, ...]  # of the requester, reachable by target
    target_prefixes: tuple[ipaddress.IPv4Network, ...]  # of the target, reachable by requester
    expires_at: datetime
    notes: tuple[str, ...] = field(default=())

    @property
    def admitted(self) -> bool:
        return True


Decision = Admission | Denial


def _deny(reason: Reason, detail: str, **kw: object) -> Denial:
    return Denial(reason, detail, **kw)  # type: ignore[arg-type]


def check_request(request: WeaveRequest, policy: Policy,
                  unseen: Collection[str] = ()) -> Denial | None:
    """Shape checks that need no fabric: types, ranges, names. IVNs named in `unseen` are
    taken for ones that do not exist (how a tenant that may not see them is answered)."""
    if not isinstance(request.duration_s, int) or isinstance(request.duration_s, bool) \
            or request.duration_s < 1:
        return _deny(Reason.INVALID_REQUEST, "duration_s must be a whole number of seconds >= 1")
    bw = request.bandwidth_mbps
    if isinstance(bw, bool) or not isinstance(bw, int | float) or not math.isfinite(bw) \
            or bw <= 0:
        return _deny(Reason.INVALID_REQUEST, "bandwidth_mbps must be a positive number")
    if mbps_to_kbps(bw) < 1:
        return _deny(Reason.INVALID_REQUEST, "bandwidth_mbps must be at least 0.001 (1 kbit/s)")
    if request.requester == request.target:
        return _deny(Reason.INVALID_REQUEST, "an IVN cannot be woven with itself")
    if request.security_profile is not None and request.security_profile not in policy.profiles:
        return _deny(Reason.INVALID_REQUEST,
                     f"no security profile named {request.security_profile!r}")
    for role in ("requester", "target"):
        name = getattr(request, role)
        if name not in policy.ivns or name in unseen:
            return _deny(Reason.UNKNOWN_IVN, f"{role} IVN {name!r} does not exist")
    return None


def _partner_check(side: Side, me: Ivn, other: Ivn) -> tuple[Denial | None,
                                                            tuple[ipaddress.IPv4Network, ...]]:
    rule = me.weaving.partner_rule(other)
    if rule is None:
        allowed = ", ".join(r.describe() for r in me.weaving.partners) or "nobody"
        return _partner_denial(side, f"{side} IVN {me.name} (tenant {me.tenant}) does not "
                               f"allow weaving with IVN {other.name} of tenant {other.tenant}",
                               allowed), ()
    if not rule.prefixes:
        return None, other.cidrs
    # A tenant-wide rule's prefixes may lie in any of that tenant's IVNs: this weave may reach
    # only those inside the partner IVN (the rest belong to its other IVNs).
    inside = tuple(p for p in rule.prefixes if other.covers(p))
    if not inside:
        return _partner_denial(side, f"{side} IVN {me.name} (tenant {me.tenant}) allows "
                               f"none of IVN {other.name}'s prefixes", rule.describe()), ()
    return None, inside


def _partner_denial(side: Side, refusal: str, allowed: str) -> Denial:
    """A partner rule's refusal; the target's own partners are not shown to the requester."""
    return _deny(Reason.POLICY_VIOLATION, f"{refusal}; it allows: {allowed}", side=side,
                 rule="partner", tenant_detail=refusal if side == "target" else None)


def negotiate_profile(requested: str | None, requester: Ivn, target: Ivn,
                      policy: Policy) -> str | Denial:
    mine, theirs = requester.weaving.profiles, target.weaving.profiles
    if requested is not None:
        for side, ivn in (("requester", requester), ("target", target)):
            if requested not in ivn.weaving.profiles:
                refusal = f"security profile {requested!r} is not allowed by {side} IVN {ivn.name}"
                return _deny(Reason.POLICY_VIOLATION,
                             f"{refusal} (it allows: {', '.join(ivn.weaving.profiles) or 'none'})",
                             side=side, rule="profile",
                             tenant_detail=refusal if side == "target" else None)
        return requested
    common = [p for p in mine if p in theirs and p in policy.profiles]
    if not common:
        return _deny(Reason.POLICY_VIOLATION,
                     f"no security profile is allowed by both sides ({requester.name}: "
                     f"{', '.join(mine) or 'none'}; {target.name}: {', '.join(theirs) or 'none'})",
                     side="target", rule="profile",
                     tenant_detail=f"target IVN {target.name} allows none of the security "
                                   f"profiles {requester.name} allows")
    return common[0]


def policy_check(policy: Policy, requester: Ivn, target: Ivn, *, remaining_s: float,
                 kbps: int, live: Iterable[LiveWeave], profile: str,
                 exclude: str | None = None, legs: int = 1,
                 extension_s: int | None = None) -> Denial | None:
    """The caps of both IVNs: duration, rate per weave, total rate over live weaves. A weave
    is charged its rate once per leg (host pair), as that is what it reserves and may carry.
    `exclude` leaves one weave out of the totals (an extension re-checks itself), and
    `extension_s` is what that extension asked for (part of `remaining_s`)."""
    # Whole seconds, rounded up: a lease 0.3 s over the cap must not read as equal to it.
    ends_in = math.ceil(remaining_s)
    asked = f"duration {ends_in} s" if extension_s is None else \
        (f"the lease would end in {ends_in} s ({extension_s} s requested on top of the "
         f"{ends_in - extension_s} s left), which")
    what = f"{kbps / 1000:g} Mbit/s" if legs == 1 else \
        f"{legs} host pairs x {kbps / 1000:g} Mbit/s = {legs * kbps / 1000:g} Mbit/s"
    kbps *= legs
    live = [w for w in live if w.id != exclude]
    for side, ivn in (("requester", requester), ("target", target)):
        rules = ivn.weaving
        if profile not in rules.profiles:
            return _deny(Reason.POLICY_VIOLATION,
                         f"security profile {profile!r} is no longer allowed by {side} IVN "
                         f"{ivn.name}", side=side, rule="profile")
        private = side == "target"
        if remaining_s > rules.max_duration_s:
            # The target's cap itself is the other tenant's: its tenant text leaves it out.
            return _deny(Reason.POLICY_VIOLATION,
                         f"{asked} exceeds {side} IVN {ivn.name}'s maximum "
                         f"of {rules.max_duration_s} s", side=side, rule="duration",
                         tenant_detail=f"{asked} exceeds target IVN "
                                       f"{ivn.name}'s maximum" if private else None)
        cap = mbps_to_kbps(rules.max_weave_mbps)
        if kbps > cap:
            return _deny(Reason.POLICY_VIOLATION,
                         f"{what} exceeds {side} IVN {ivn.name}'s per-weave "
                         f"maximum of {rules.max_weave_mbps:g} Mbit/s", side=side,
                         rule="bandwidth",
                         tenant_detail=f"{what} exceeds target IVN {ivn.name}'s per-weave "
                                       "maximum" if private else None)
        in_use = sum(w.kbps for w in live if ivn.name in w.ivns())
        total_cap = mbps_to_kbps(rules.max_total_mbps)
        if in_use + kbps > total_cap:
            return _deny(Reason.POLICY_VIOLATION,
                         f"{side} IVN {ivn.name} already has {in_use / 1000:g} Mbit/s in live "
                         f"weaves; {what} more exceeds its total of "
                         f"{rules.max_total_mbps:g} Mbit/s", side=side, rule="total_bandwidth",
                         tenant_detail=f"{what} more exceeds target IVN {ivn.name}'s total "
                                       "bandwidth cap" if private else None)
    return None


def _overlap_check(requester: Ivn, target: Ivn,
                   requester_prefixes: tuple[ipaddress.IPv4Network, ...],
                   target_prefixes: tuple[ipaddress.IPv4Network, ...],
                   live: Iterable[LiveWeave]) -> Denial | None:
    """Routing inside each IVN must stay unambiguous: what it reaches through the weave must
    not overlap its own prefixes, nor what it already reaches through another live weave."""
    for me, remote in ((requester, target_prefixes), (target, requester_prefixes)):
        for net in remote:
            for own in me.cidrs:
                if net.overlaps(own):
                    return _deny(Reason.CIDR_OVERLAP,
                                 f"{net} (of the partner) overlaps {own} of IVN {me.name}; "
                                 "traffic between them could not be routed")
    for weave in live:
        if set(weave.ivns()) == {requester.name, target.name}:
            return _deny(Reason.CIDR_OVERLAP,
                         f"{requester.name} and {target.name} are already woven by {weave.id}; "
                         "extend that weave instead of weaving them twice")
        for me, remote in ((requester, target_prefixes), (target, requester_prefixes)):
            if me.name not in weave.ivns():
                continue
            for net in remote:
                for taken in weave.remote_prefixes(me.name):
                    if net.overlaps(taken):
                        # The target's other weaves are not the requester's business.
                        return _deny(Reason.CIDR_OVERLAP,
                                     f"IVN {me.name} already reaches {taken} through weave "
                                     f"{weave.id}, which overlaps {net}",
                                     tenant_detail=None if me is requester else
                                     f"target IVN {me.name} already reaches a prefix "
                                     f"overlapping {net} through another weave")
    return None


def plan_legs(fabric: Fabric, pairs: Iterable[tuple[str, str]], kbps: int,
              keep: Mapping[tuple[str, str], tuple[str, ...]] | None = None
              ) -> tuple[LegPlan, ...] | Denial:
    """A path for every host pair, all fitting together (legs may share links). `keep` gives
    paths to reuse as they are (a reroute keeps the legs that did not break)."""
    pairs = list(pairs)
    keep = {pair: path for pair, path in (keep or {}).items() if pair in pairs}
    pending: dict[Arc, int] = {}
    # Kept paths hold their capacity first, so a leg routed afresh never takes it from them.
    for path in keep.values():
        for arc in path_arcs(path):
            pending[arc] = pending.get(arc, 0) + kbps
    legs = []
    for a, b in pairs:
        if (a, b) in keep:
            legs.append(LegPlan(a, b, keep[(a, b)]))
            continue
        path = fabric.find_path(a, b, kbps, pending)
        if path is None:
            neck = fabric.bottleneck(a, b, kbps, pending)
            detail = neck.describe(kbps, a, b)
            if len(pairs) > 1:
                detail += f" (host pair {a}-{b}, one of {len(pairs)} legs)"
            return _deny(Reason.INSUFFICIENT_BANDWIDTH, detail, link=neck.link)
        for arc in path_arcs(path):
            pending[arc] = pending.get(arc, 0) + kbps
        legs.append(LegPlan(a, b, path))
    return tuple(legs)


Prefixes = tuple[ipaddress.IPv4Network, ...]


def _mutual_partners(requester: Ivn, target: Ivn) -> Denial | tuple[Prefixes, Prefixes]:
    """Both sides must allow each other; each side's rule may narrow the prefixes of the
    other it may reach. (requester prefixes, target prefixes), or the first refusal."""
    denial, target_prefixes = _partner_check("requester", requester, target)
    if denial:
        return denial
    denial, requester_prefixes = _partner_check("target", target, requester)
    if denial:
        return denial
    return requester_prefixes, target_prefixes


def evaluate(request: WeaveRequest, *, policy: Policy, topology: Topology, fabric: Fabric,
             live: Iterable[LiveWeave], now: datetime, asker: str | None = None) -> Decision:
    """Decide a weave request. Pure: nothing is reserved until the caller applies the result.
    `live` needs to hold at least the live weaves of the two IVNs (others are ignored).
    `asker`: the tenant asking (None: an operator). A refusal of a request naming an IVN it
    may not see carries, as its `tenant_view`, the refusal for an IVN that does not exist:
    otherwise its precise reasons (policy_violation naming the IVN and its tenant) would let
    a tenant learn which IVNs exist."""
    decision = _decide(request, policy=policy, topology=topology, fabric=fabric,
                       live=list(live), now=now)
    if isinstance(decision, Denial) and asker is not None:
        return worded_for(decision, request, policy, asker)
    return decision


def worded_for(denial: Denial, request: WeaveRequest, policy: Policy, asker: str) -> Denial:
    """`denial` with, as its `tenant_view`, the refusal for an IVN that does not exist when
    `request` names one tenant `asker` may not see (`evaluate`'s `asker`). Only a refusal
    needs it: callers on the admission path call this once they hold a Denial."""
    unseen = {n for n in (request.requester, request.target)
              if n in policy.ivns and not policy.visible_to(asker, n)}
    seen_as = check_request(request, policy, unseen) if unseen else None
    if seen_as is not None and seen_as != denial:  # not already refused as invalid
        return replace(denial, tenant_view=seen_as)
    return denial


def _decide(request: WeaveRequest, *, policy: Policy, topology: Topology, fabric: Fabric,
            live: list[LiveWeave], now: datetime) -> Decision:
    denial = check_request(request, policy)
    if denial:
        return denial
    requester, target = policy.ivns[request.requester], policy.ivns[request.target]
    allowed = _mutual_partners(requester, target)
    if isinstance(allowed, Denial):
        return allowed
    requester_prefixes, target_prefixes = allowed
    profile = negotiate_profile(request.security_profile, requester, target, policy)
    if isinstance(profile, Denial):
        return profile
    # A weave has one leg per pair of hosts that carry VMs of the two IVNs, so that every
    # packet between them is encrypted from the host it starts on.
    pairs = [(a, b) for a in topology.hosts_of_ivn(requester.name)
             for b in topology.hosts_of_ivn(target.name)]
    for ivn in (requester, target):
        if not topology.hosts_of_ivn(ivn.name):
            return _deny(Reason.INVALID_REQUEST,
                         f"IVN {ivn.name} has no VMs on any compute host of the fabric")
    kbps = mbps_to_kbps(request.bandwidth_mbps)
    denial = policy_check(policy, requester, target, remaining_s=request.duration_s,
                          kbps=kbps, live=live, profile=profile, legs=len(pairs))
    if denial:
        return denial
    denial = _overlap_check(requester, target, requester_prefixes, target_prefixes, live)
    if denial:
        return denial
    legs = plan_legs(fabric, pairs, kbps)
    if isinstance(legs, Denial):
        return legs
    return Admission(
        requester=requester.name, target=target.name, profile=profile, kbps=kbps, legs=legs,
        requester_prefixes=tuple(requester_prefixes), target_prefixes=tuple(target_prefixes),
        expires_at=now + timedelta(seconds=request.duration_s))


def prefixes_withdrawn(weave: LiveWeave, policy: Policy) -> Denial | None:
    """A weave keeps only what both policies allow now: if either side narrowed what the
    other may reach (or dropped the partner), the weave's stored prefixes no longer fit."""
    requester, target = policy.ivns[weave.requester], policy.ivns[weave.target]
    allowed = _mutual_partners(requester, target)
    if isinstance(allowed, Denial):
        return allowed
    requester_allowed, target_allowed = allowed
    for side, held, allowed in (("requester", weave.target_prefixes, target_allowed),
                                ("target", weave.requester_prefixes, requester_allowed)):
        for net in held:
            if not any(net.subnet_of(a) for a in allowed):
                ivn = requester if side == "requester" else target
                return _deny(Reason.POLICY_VIOLATION,
                             f"{side} IVN {ivn.name} no longer lets the weave reach {net} "
                             f"(it allows {', '.join(map(str, allowed))})",
                             side=side, rule="partner",  # type: ignore[arg-type]
                             tenant_detail=f"{side} IVN {ivn.name} no longer allows the "
                                           "prefixes this weave reaches")
    return None


def life_ends_at(created_at: datetime) -> datetime:
    """The latest a weave created at `created_at` may live, extensions included: its x509 leaf
    certificates are signed to last until then (`nwc.tunnels`), so no lease may outrun them."""
    return created_at + timedelta(seconds=MAX_LEASE_S)


def evaluate_extension(weave: LiveWeave, *, profile: str, new_expires_at: datetime,
                       created_at: datetime, paths: Iterable[tuple[str, ...]],
                       policy: Policy, fabric: Fabric, live: Iterable[LiveWeave],
                       now: datetime, extension_s: int | None = None) -> Denial | None:
    """An extension is admitted again: both policies as they are now, and the fabric, within
    the weave's whole-life cap (`life_ends_at(created_at)`). `extension_s` (what the tenant
    asked for) only words a duration refusal."""
    if new_expires_at <= now:
        return _deny(Reason.INVALID_REQUEST, "the new expiry is not in the future")
    cap = life_ends_at(created_at)
    if new_expires_at > cap:
        # Not an IVN's policy but a limit of every weave, so no side or rule: the same text
        # for both tenants, as it reveals nothing of either policy.
        return _deny(Reason.INVALID_REQUEST,
                     f"a weave lives at most {MAX_LEASE_S} s ({MAX_LEASE_S // 86400} days) "
                     f"from its creation, extensions included: this one must end by "
                     f"{iso(cap)}, and the extension would end it at {iso(new_expires_at)}; "
                     "create a new weave to go on")
    for role in ("requester", "target"):
        name = getattr(weave, role)
        if name not in policy.ivns:
            return _deny(Reason.UNKNOWN_IVN, f"{role} IVN {name!r} no longer exists")
    requester, target = policy.ivns[weave.requester], policy.ivns[weave.target]
    denial = prefixes_withdrawn(weave, policy)
    if denial:
        return denial
    denial = policy_check(policy, requester, target,
                          remaining_s=(new_expires_at - now).total_seconds(), kbps=weave.kbps,
                          live=live, profile=profile, exclude=weave.id,
                          extension_s=extension_s)
    if denial:
        return denial
    for path in paths:
        for a, b in itertools.pairwise(path):
            key = (a, b) if a <= b else (b, a)
            if key in fabric.down:
                return _deny(Reason.INSUFFICIENT_BANDWIDTH,
                             f"link {key[0]}-{key[1]} on the weave's path is down", link=key)
            for arc in ((a, b), (b, a)):
                if fabric.reserved[arc] > fabric.reservable[arc]:
                    return _deny(Reason.INSUFFICIENT_BANDWIDTH,
                                 f"link {key[0]}-{key[1]} is over-reserved after a topology "
                                 "change", link=key)
    return None
