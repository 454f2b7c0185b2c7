"""The policy model: tenants, IVNs and their weaving policies, security profiles, QoS classes.

Pure data plus a loader that validates everything a human can get wrong in the YAML (see
`policies/README.md` for the schema, with examples). Loading never half-succeeds: it returns a
complete, cross-checked `Policy` or raises `ConfigError` listing every problem, so a controller
that fails to reload keeps running on its last good policy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nwc.yamlsource import ConfigError, Cursor, Document, Problem, read_yaml, shown

NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
NAME_WHAT = "a name: lowercase letters, digits and '-', starting with a letter, at most 32 long"

# IVN VNIs live below this value; weaves take theirs from above it (see topology.weave_vni).
MAX_IVN_VNI = 2**23 - 1
MAX_LEASE_S = 366 * 24 * 3600
# Bandwidth caps and link capacities stop at 1 Pbit/s: far beyond any real link, and small
# enough that their kbit/s integers (and sums of them) stay exact in a float. A cap of 1e306
# passed validation and then made every admission overflow converting it to kbit/s.
MAX_BANDWIDTH_MBPS = 1_000_000_000

Initiator = Literal["requester", "target", "either"]
Protocol = Literal["tcp", "udp", "icmp", "any"]
AuthMethod = Literal["psk", "x509"]

# strongSwan proposal keywords NWC accepts. Deliberately only algorithms that are still
# considered strong: a tenant cannot ask for 3DES, MD5, SHA-1 or 1024-bit MODP groups.
AEAD_CIPHERS = {
    "aes128gcm16", "aes192gcm16", "aes256gcm16", "aes128gcm12", "aes256gcm12",
    "aes128ccm16", "aes256ccm16", "chacha20poly1305",
}
PLAIN_CIPHERS = {"aes128", "aes192", "aes256", "aes128ctr", "aes256ctr"}
INTEGRITY = {"sha256", "sha384", "sha512"}
PRF = {"prfsha256", "prfsha384", "prfsha512"}
DH_GROUPS = {"x25519", "x448", "ecp256", "ecp384", "ecp521", "modp2048", "modp3072", "modp4096"}
ESP_EXTRAS = {"esn", "noesn"}


@dataclass(frozen=True)
class Tenant:
    name: str
    description: str = ""


@dataclass(frozen=True)
class AclRule:
    """Which traffic may cross a weave. `initiator` is the side that may open a flow: for tcp and
    udp, `ports` are destination ports on the other side, and replies are allowed back."""

    initiator: Initiator
    protocol: Protocol
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; () means every port

    def allows(self, initiator: Literal["requester", "target"], protocol: str,
               port: int | None = None) -> bool:
        if self.initiator not in ("either", initiator):
            return False
        if self.protocol not in ("any", protocol):
            return False
        if not self.ports or port is None:
            return not self.ports
        return any(lo <= port <= hi for lo, hi in self.ports)


@dataclass(frozen=True)
class SecurityProfile:
    name: str
    ike_proposals: tuple[str, ...]
    esp_proposals: tuple[str, ...]
    auth: AuthMethod
    rekey_s: int
    acl: tuple[AclRule, ...]
    description: str = ""


@dataclass(frozen=True)
class QosClass:
    name: str
    dscp: int  # DSCP written on weave traffic in the provider fabric
    burst_ms: int  # meter burst = reserved rate x burst_ms

    def burst_kbits(self, rate_kbps: int) -> int:
        return max(64, rate_kbps * self.burst_ms // 1000)


@dataclass(frozen=True)
class PartnerRule:
    """One entry of an IVN's allowed-partners list: an IVN or a whole tenant, optionally
    narrowed to some prefixes of the partner."""

    ivn: str | None = None
    tenant: str | None = None
    prefixes: tuple[ipaddress.IPv4Network, ...] = ()
    # Where the entry stands in the YAML list, for naming it in a problem: entries dropped
    # as invalid shift the others, and a name may be listed twice. Not part of the rule.
    yaml_index: int = field(default=0, compare=False, repr=False)

    def matches(self, partner: Ivn) -> bool:
        return partner.name == self.ivn or (self.ivn is None and partner.tenant == self.tenant)

    def describe(self) -> str:
        who = f"IVN {self.ivn}" if self.ivn else f"tenant {self.tenant}"
        if self.prefixes:
            who += " (only " + ", ".join(map(str, self.prefixes)) + ")"
        return who


@dataclass(frozen=True)
class WeavingPolicy:
    partners: tuple[PartnerRule, ...] = ()
    max_weave_mbps: float = 0.0
    max_total_mbps: float = 0.0
    max_duration_s: int = 0
    profiles: tuple[str, ...] = ()  # allowed security profiles, most preferred first
    qos_class: str = "standard"

    def partner_rule(self, partner: Ivn) -> PartnerRule | None:
        """The first rule that admits `partner`; an exact IVN rule wins over a tenant rule."""
        exact = [r for r in self.partners if r.ivn == partner.name]
        if exact:
            return exact[0]
        return next((r for r in self.partners if r.matches(partner)), None)


@dataclass(frozen=True)
class Ivn:
    name: str
    tenant: str
    vni: int
    cidrs: tuple[ipaddress.IPv4Network, ...]
    gateway: ipaddress.IPv4Address
    weaving: WeavingPolicy = field(default_factory=WeavingPolicy)

    def contains(self, address: ipaddress.IPv4Address) -> bool:
        return any(address in net for net in self.cidrs)

    def covers(self, prefix: ipaddress.IPv4Network) -> bool:
        """Whether `prefix` lies inside one of this IVN's prefixes."""
        return any(prefix.subnet_of(net) for net in self.cidrs)

    def mutual(self, other: Ivn) -> bool:
        """Whether this IVN and `other` may weave: each side's partners admit the other."""
        return self.weaving.partner_rule(other) is not None and \
            other.weaving.partner_rule(self) is not None


@dataclass(frozen=True)
class Policy:
    tenants: Mapping[str, Tenant]
    ivns: Mapping[str, Ivn]
    profiles: Mapping[str, SecurityProfile]
    qos_classes: Mapping[str, QosClass]
    sources: tuple[str, ...] = ()

    def visible_to(self, tenant: str, name: str) -> bool:
        """Whether `tenant` may know that IVN `name` exists: its own IVNs, and other tenants'
        that one of its own may weave with (both sides allow it). GET /v1/ivns lists exactly
        these; about any other IVN a tenant is answered as if it did not exist."""
        ivn = self.ivns.get(name)
        if ivn is None:
            return False
        return ivn.tenant == tenant or any(own.tenant == tenant and own.mutual(ivn)
                                           for own in self.ivns.values())


# ------------------------------------------------------------------------------------------
# Loading

TOP_KEYS = {"version", "tenants", "ivns", "security_profiles", "qos_classes"}
IVN_KEYS = {"tenant", "vni", "cidrs", "gateway", "weaving", "description"}
WEAVING_KEYS = {"partners", "max_weave_mbps", "max_total_mbps", "max_duration_s", "profiles",
                "qos_class"}
PROFILE_KEYS = {"ike", "esp", "auth", "rekey_s", "acl", "description"}
ACL_KEYS = {"from", "protocol", "ports"}
QOS_KEYS = {"dscp", "burst_ms", "description"}

DEFAULT_QOS = {"standard": QosClass("standard", dscp=0, burst_ms=200)}


def policy_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories to their *.yaml / *.yml files, sorted, so the order is stable."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            out.append(path)
    return out


def load_policy(paths: Iterable[Path]) -> Policy:
    """Load and validate a policy set spread over one or more files (or directories)."""
    paths = list(paths)  # read twice: an iterator would be empty the second time
    files = policy_files(paths)
    problems: list[Problem] = []
    docs: list[Document] = []
    if not files:
        empty = [p for p in paths if p.is_dir()]
        raise ConfigError([Problem(str(d), 0, "(directory)", "holds no *.yaml or *.yml files")
                           for d in empty] or
                          [Problem("(policy)", 0, "", "no policy files given")])
    for path in files:
        doc, parse_problems = read_yaml(path)
        problems += parse_problems
        docs.append(doc)
    # Keep validating after a duplicate key (the first value stands) so one run reports
    # everything; a syntax error leaves an empty document that adds nothing.
    try:
        policy = build_policy(docs)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return policy


def parse_policy_text(text: str, file: str = "<policy>") -> Policy:
    """Validate a policy given as YAML text (tests and the API feed it this way)."""
    from nwc.yamlsource import parse_yaml

    doc, problems = parse_yaml(text, file)
    try:
        policy = build_policy([doc])
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return policy


def build_policy(docs: list[Document]) -> Policy:
    problems: list[Problem] = []
    seen: dict[tuple[str, str], Cursor] = {}
    sections: dict[str, list[tuple[str, Cursor]]] = {k: [] for k in TOP_KEYS - {"version"}}
    for doc in docs:
        root = Cursor.root(doc, problems)
        if doc.root is None:
            continue
        top = root.mapping(TOP_KEYS)
        if top is None:
            continue
        # integer() first: `true` and `1.0` equal 1 in Python but are not version 1.
        if "version" in top and top["version"].integer() not in (None, 1):
            top["version"].problem("only version 1 of the policy schema exists")
        for section, cursor in top.items():
            if section == "version":
                continue
            entries = cursor.mapping(what=section)
            for name, entry in (entries or {}).items():
                if (section, name) in seen:
                    first = seen[(section, name)]
                    entry.problem(f"{section[:-1] if section != 'qos_classes' else 'qos class'} "
                                  f"{name!r} is already defined at {first.doc.file}:{first.line}")
                    continue
                if not NAME.fullmatch(name):
                    entry.problem(f"{name!r} is not {NAME_WHAT}")
                    continue
                seen[(section, name)] = entry
                sections[section].append((name, entry))

    tenants = {name: _tenant(name, c) for name, c in sections["tenants"]}
    qos = dict(DEFAULT_QOS)
    for name, c in sections["qos_classes"]:
        parsed = _qos(name, c)
        if parsed:
            qos[name] = parsed
    profiles = {}
    for name, c in sections["security_profiles"]:
        parsed = _profile(name, c)
        if parsed:
            profiles[name] = parsed
    raw_ivns = [(name, c, *_ivn(name, c, tenants)) for name, c in sections["ivns"]]
    ivns = {name: ivn for name, _, ivn, _ in raw_ivns if ivn}
    # Names defined but invalid: their own problems are already reported, so a reference to
    # one is not "unknown" too (one bad field must not add a line per reference to it).
    defined = Defined(
        ivns={name for name, _ in sections["ivns"]},
        profiles={name for name, _ in sections["security_profiles"]},
        qos_classes=set(qos) | {name for name, _ in sections["qos_classes"]},
        ivn_tenants={name: _raw_tenant(c) for name, c in sections["ivns"]})

    by_vni: dict[int, str] = {}
    for name, cursor, ivn, weaving in raw_ivns:
        if ivn is not None:
            if ivn.vni in by_vni:
                cursor.child("vni", ivn.vni).problem(
                    f"VNI {ivn.vni} is already used by IVN {by_vni[ivn.vni]!r}")
            by_vni.setdefault(ivn.vni, name)
        # An IVN invalid elsewhere still has its references checked, so one run lists all.
        if weaving is not None:
            _check_weaving_refs(name, weaving, cursor, ivns, tenants, defined)

    if problems:
        raise ConfigError(problems)
    return Policy(tenants=tenants, ivns=ivns, profiles=profiles, qos_classes=qos,
                  sources=tuple(d.file for d in docs))


def _tenant(name: str, c: Cursor) -> Tenant:
    fields = c.mapping({"description"}) or {}
    desc = fields["description"].string(what="a description") if "description" in fields else ""
    return Tenant(name, desc or "")


def _qos(name: str, c: Cursor) -> QosClass | None:
    fields = c.mapping(QOS_KEYS, {"dscp"})
    if fields is None or "dscp" not in fields:
        return None
    dscp = fields["dscp"].integer(minimum=0, maximum=63)
    burst = fields["burst_ms"].integer(minimum=1, maximum=10_000, unit="ms") \
        if "burst_ms" in fields else 200
    if dscp is None or burst is None:
        return None
    return QosClass(name, dscp=dscp, burst_ms=burst)


def _proposal(c: Cursor, kind: Literal["ike", "esp"]) -> str | None:
    text = c.string(what=f"a strongSwan {kind.upper()} proposal")
    if text is None:
        return None
    tokens = text.lower().split("-")
    aead = [t for t in tokens if t in AEAD_CIPHERS]
    plain = [t for t in tokens if t in PLAIN_CIPHERS]
    integ = [t for t in tokens if t in INTEGRITY]
    prf = [t for t in tokens if t in PRF]
    dh = [t for t in tokens if t in DH_GROUPS]
    extras = [t for t in tokens if t in ESP_EXTRAS]
    known = AEAD_CIPHERS | PLAIN_CIPHERS | INTEGRITY | DH_GROUPS
    known |= PRF if kind == "ike" else ESP_EXTRAS
    unknown = [t for t in tokens if t not in known]
    if unknown:
        c.problem(f"{text!r}: unknown or disallowed algorithm {unknown[0]!r} "
                  f"(allowed ciphers: {', '.join(sorted(AEAD_CIPHERS | PLAIN_CIPHERS))}; "
                  f"integrity: {', '.join(sorted(INTEGRITY))}; DH groups: "
                  f"{', '.join(sorted(DH_GROUPS))})")
        return None
    if len(aead) + len(plain) != 1:
        c.problem(f"{text!r}: needs exactly one cipher")
        return None
    if plain and not integ:
        c.problem(f"{text!r}: a non-AEAD cipher ({plain[0]}) needs an integrity algorithm")
        return None
    if aead and integ:
        c.problem(f"{text!r}: an AEAD cipher ({aead[0]}) takes no integrity algorithm")
        return None
    if kind == "ike":
        if aead and not prf:
            c.problem(f"{text!r}: an IKE proposal with an AEAD cipher needs a PRF (e.g. prfsha256)")
            return None
        if not dh:
            c.problem(f"{text!r}: an IKE proposal needs a Diffie-Hellman group (e.g. x25519)")
            return None
    if len(dh) > 1 or len(prf) > 1 or len(extras) > 1:
        c.problem(f"{text!r}: repeats an algorithm kind")
        return None
    return text.lower()


def _profile(name: str, c: Cursor) -> SecurityProfile | None:
    fields = c.mapping(PROFILE_KEYS, {"ike", "esp", "auth", "acl"})
    if fields is None:
        return None
    ike = tuple(p for p in (_proposal(i, "ike") for i in fields["ike"].items()) if p) \
        if "ike" in fields else ()
    esp = tuple(p for p in (_proposal(i, "esp") for i in fields["esp"].items()) if p) \
        if "esp" in fields else ()
    for key, got in (("ike", ike), ("esp", esp)):
        if key in fields and not got and isinstance(fields[key].value, list) \
                and not fields[key].value:
            fields[key].problem("needs at least one proposal")
    auth = None
    if "auth" in fields:
        auth = fields["auth"].value
        if auth not in ("psk", "x509"):
            fields["auth"].problem(f"authentication must be 'psk' or 'x509', got {auth!r}")
            auth = None
    rekey = fields["rekey_s"].integer(minimum=60, maximum=86_400, unit="s") \
        if "rekey_s" in fields else 3600
    acl: list[AclRule] = []
    if "acl" in fields:
        for rc in fields["acl"].items():
            rule = _acl_rule(rc)
            if rule:
                acl.append(rule)
        if isinstance(fields["acl"].value, list) and not fields["acl"].value:
            fields["acl"].problem("an empty ACL lets nothing cross the weave; "
                                  "write `- {from: either, protocol: any}` to allow everything")
    desc = fields["description"].string(what="a description") if "description" in fields else ""
    if not ike or not esp or auth is None or rekey is None or not acl:
        return None
    return SecurityProfile(name, ike, esp, auth, rekey, tuple(acl), desc or "")


def _acl_rule(c: Cursor) -> AclRule | None:
    fields = c.mapping(ACL_KEYS, {"from", "protocol"})
    if fields is None or "from" not in fields or "protocol" not in fields:
        return None
    initiator = fields["from"].value
    if initiator not in ("requester", "target", "either"):
        fields["from"].problem(f"must be requester, target or either, got {initiator!r}")
        return None
    protocol = fields["protocol"].value
    if protocol not in ("tcp", "udp", "icmp", "any"):
        fields["protocol"].problem(f"must be tcp, udp, icmp or any, got {protocol!r}")
        return None
    ranges: list[tuple[int, int]] = []
    if "ports" in fields:
        if protocol not in ("tcp", "udp"):
            fields["ports"].problem(f"ports only apply to tcp and udp, not {protocol}")
            return None
        for pc in fields["ports"].items():
            rng = _port_range(pc)
            if rng is None:
                return None
            ranges.append(rng)
        if not ranges:
            fields["ports"].problem("an empty port list matches nothing; omit `ports` for all")
            return None
    return AclRule(initiator, protocol, tuple(ranges))


def _port_range(c: Cursor) -> tuple[int, int] | None:
    value = c.value
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,5}-\d{1,5}", value):
        lo, hi = (int(x) for x in value.split("-"))
    else:
        c.problem(f"expected a port (443) or a range ('8000-8080'), got {shown(value)}")
        return None
    if not (1 <= lo <= hi <= 65535):
        c.problem(f"port range {shown(value)} must lie within 1-65535, low end first")
        return None
    return lo, hi


def _network(c: Cursor) -> ipaddress.IPv4Network | None:
    if not isinstance(c.value, str):
        c.problem(f"expected an IPv4 prefix like 192.0.2.0/26, got {shown(c.value)}")
        return None
    try:
        net = ipaddress.IPv4Network(c.value, strict=True)
    except ValueError as exc:
        c.problem(f"{shown(c.value)} is not an IPv4 prefix: {exc}")
        return None
    if net.prefixlen == 0:
        c.problem("0.0.0.0/0 is not a tenant prefix")
        return None
    return net


def _networks(c: Cursor) -> tuple[ipaddress.IPv4Network, ...]:
    nets = [(n, item) for item in c.items() if (n := _network(item)) is not None]
    for i, (a, ca) in enumerate(nets):
        for b, _ in nets[:i]:
            if a.overlaps(b):
                ca.problem(f"{a} overlaps {b} in the same list")
    return tuple(n for n, _ in nets)


def _raw_tenant(c: Cursor) -> str | None:
    """The tenant an IVN entry names, read without validating (for IVNs that are invalid)."""
    value = c.value.get("tenant") if isinstance(c.value, dict) else None
    return value if isinstance(value, str) else None


def _ivn(name: str, c: Cursor, tenants: Mapping[str, Tenant]
         ) -> tuple[Ivn | None, WeavingPolicy | None]:
    """The IVN if it is valid, and its weaving policy if that part is valid on its own."""
    fields = c.mapping(IVN_KEYS, {"tenant", "vni", "cidrs", "gateway"})
    if fields is None:
        return None, None
    weaving = _weaving(fields["weaving"]) if "weaving" in fields else WeavingPolicy()
    if not {"tenant", "vni", "cidrs", "gateway"} <= set(fields):
        return None, weaving
    tenant = fields["tenant"].string(what="a tenant name")
    if tenant is not None and tenant not in tenants:
        fields["tenant"].problem(f"unknown tenant {tenant!r}")
        tenant = None
    vni = fields["vni"].integer(minimum=1, maximum=MAX_IVN_VNI)
    cidrs = _networks(fields["cidrs"])
    if isinstance(fields["cidrs"].value, list) and not fields["cidrs"].value:
        fields["cidrs"].problem("an IVN needs at least one prefix")
    gateway = None
    gc = fields["gateway"]
    try:
        gateway = ipaddress.IPv4Address(gc.value) if isinstance(gc.value, str) else None
    except ValueError:
        gateway = None
    if gateway is None:
        gc.problem(f"expected an IPv4 address, got {shown(gc.value)}")
    elif cidrs and not any(gateway in n and gateway not in (n.network_address,
                                                           n.broadcast_address) for n in cidrs):
        gc.problem(f"gateway {gateway} is not a usable address of the IVN's prefixes")
        gateway = None
    if tenant is None or vni is None or not cidrs or gateway is None or weaving is None:
        return None, weaving
    return Ivn(name, tenant, vni, cidrs, gateway, weaving), weaving


def _weaving(c: Cursor) -> WeavingPolicy | None:
    fields = c.mapping(WEAVING_KEYS, {"partners", "max_weave_mbps", "max_total_mbps",
                                      "max_duration_s", "profiles"})
    if fields is None or not {"partners", "max_weave_mbps", "max_total_mbps", "max_duration_s",
                              "profiles"} <= set(fields):
        return None
    partners: list[PartnerRule] = []
    listed: dict[tuple[str, str], int] = {}
    for i, pc in enumerate(fields["partners"].items()):
        pf = pc.mapping({"ivn", "tenant", "prefixes"})
        if pf is None:
            continue
        if ("ivn" in pf) == ("tenant" in pf):
            pc.problem("a partner names exactly one of `ivn` or `tenant`")
            continue
        key = "ivn" if "ivn" in pf else "tenant"
        target = pf[key].string(what=f"an {key} name")
        prefixes = _networks(pf["prefixes"]) if "prefixes" in pf else ()
        if target and (key, target) in listed:
            # The first entry for a partner decides (partner_rule): a second one is dead text
            # that a reader may take for a rule.
            pc.problem(f"{key} {target} is already listed at partners[{listed[key, target]}]; "
                       "put all its prefixes in one entry")
        elif target:
            listed[key, target] = i
            partners.append(PartnerRule(**{key: target}, prefixes=prefixes, yaml_index=i))
    per_weave = fields["max_weave_mbps"].number(minimum=0, exclusive_minimum=True,
                                                maximum=MAX_BANDWIDTH_MBPS, unit="Mbit/s")
    total = fields["max_total_mbps"].number(minimum=0, exclusive_minimum=True,
                                            maximum=MAX_BANDWIDTH_MBPS, unit="Mbit/s")
    if per_weave is not None and total is not None and per_weave > total:
        fields["max_weave_mbps"].problem(
            f"{per_weave:g} Mbit/s per weave exceeds the total cap of {total:g} Mbit/s")
        per_weave = None
    duration = fields["max_duration_s"].integer(minimum=1, maximum=MAX_LEASE_S, unit="s")
    profiles = tuple(p for p in (pc.string(what="a security profile name")
                                 for pc in fields["profiles"].items()) if p)
    if len(set(profiles)) != len(profiles):
        fields["profiles"].problem("lists a profile twice")
    qos = fields["qos_class"].string(what="a QoS class name") if "qos_class" in fields \
        else "standard"
    if per_weave is None or total is None or duration is None or qos is None:
        return None
    return WeavingPolicy(tuple(partners), per_weave, total, duration, profiles, qos)


@dataclass(frozen=True)
class Defined:
    """Every name a policy set defines, valid or not, for telling a dangling reference from a
    reference to a definition whose own problems are reported elsewhere."""

    ivns: set[str]
    profiles: set[str]
    qos_classes: set[str]
    ivn_tenants: Mapping[str, str | None]


def _check_weaving_refs(name: str, weaving: WeavingPolicy, c: Cursor, ivns: Mapping[str, Ivn],
                        tenants: Mapping[str, Tenant], defined: Defined) -> None:
    """Dangling references: partners, profiles and QoS classes that are not defined."""
    wc = c.child("weaving", None)
    for rule in weaving.partners:
        rc = wc.child("partners", None).child(rule.yaml_index, None)
        if rule.ivn is not None:
            partner = ivns.get(rule.ivn)
            if rule.ivn == name:
                rc.problem("an IVN cannot list itself as a weaving partner")
            elif rule.ivn not in defined.ivns:
                rc.problem(f"unknown partner IVN {rule.ivn!r}")
            elif partner is not None:
                for prefix in rule.prefixes:
                    if not partner.covers(prefix):
                        rc.problem(f"prefix {prefix} is not inside partner {rule.ivn}'s prefixes "
                                   f"({', '.join(map(str, partner.cidrs))})")
        elif rule.tenant not in tenants:
            rc.problem(f"unknown partner tenant {rule.tenant!r}")
        elif not any(ivn_name not in ivns and tenant in (rule.tenant, None)
                     for ivn_name, tenant in defined.ivn_tenants.items()):
            # Only when every IVN that may be this tenant's is valid: a prefix inside an
            # invalid one would otherwise be reported as outside the tenant.
            nets = [n for other in ivns.values() if other.tenant == rule.tenant
                    for n in other.cidrs]
            for prefix in rule.prefixes:
                if not any(prefix.subnet_of(n) for n in nets):
                    rc.problem(f"prefix {prefix} is not inside any IVN of tenant {rule.tenant}")
    for i, profile in enumerate(weaving.profiles):
        if profile not in defined.profiles:
            wc.child("profiles", None).child(i, None).problem(
                f"unknown security profile {profile!r}")
    if weaving.qos_class not in defined.qos_classes:
        wc.child("qos_class", None).problem(f"unknown QoS class {weaving.qos_class!r}")
