"""Tunnel specs: for one leg of a weave and one of its two hosts, everything that host builds.

Pure: no root, no daemons. The controller computes a `TunnelSpec` per leg end from the weave,
the topology and the security profile, wraps it with the leg's key material in a `LegRecord`
and writes that into the host's OVSDB; the host agent reads it back and builds exactly what it
says. The agent answers with a `LegStatus`. Both records are JSON in the external_ids of the
host's Open_vSwitch row (see docs/design.md, "Tunnels").

What a leg end is, for the `strongswan` backend (the one these machines can run):
- its endpoint address (/32 on the underlay device) and a link route to the peer's endpoint:
  IKE and ESP use these outer addresses, which the fabric steers along the leg's path;
- its VTEP address (/32 on lo) and a blackhole route for the peer's VTEP, so VXLAN for the
  peer is dropped, never sent in clear, whenever no CHILD SA routes it into IPsec;
- a kernel VXLAN device `nwv<slot>` (VNI, local/remote VTEP, destination port 4789) attached to
  the integration bridge with ofport 10000 + slot;
- an IKEv2 connection between the endpoints whose tunnel-mode CHILD SA covers UDP between
  the two VTEPs, with the profile's proposals, authentication and rekeying.

For the `ovs-ipsec` backend the leg end is an OVS vxlan Interface between the endpoints whose
IPsec options ovs-monitor-ipsec turns into a transport-mode SA.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from nwc.mtu import MtuPlan, mtu_plan

# The leg's port on br-int (name, ofport) is a contract with the flows: one definition.
from nwc.pipeline import INTEGRATION_BRIDGE, LEG_OFPORT_BASE, leg_ofport, leg_port_name
from nwc.pki import Secret
from nwc.policy import SecurityProfile
from nwc.topology import Topology
from nwc.weave import Leg, Weave

RECORD_VERSION = 1
VXLAN_UDP_PORT = 4789
# Keys in the host's Open_vSwitch row external_ids: the controller writes RECORD_PREFIX + key,
# the agent answers with STATUS_PREFIX + key.
RECORD_PREFIX = "nwc-tunnel-"
STATUS_PREFIX = "nwc-status-"
# A deleted record leaves nothing behind to acknowledge, so removal is proved host-wide: the
# controller raises RECORDS_VERSION_KEY in every transaction that changes the host's records,
# and the agent writes the version its pass read into AGENT_ACK_KEY in the transaction that
# ends that pass (with its status writes and deletes). A leg is gone once its record and status
# are absent and the ack has reached a version that no longer held the record. An agent writes
# NO_ACK_YET before its first pass acts, so the controller never mistakes it for an older agent
# (one that never acknowledges, whose status alone has to do).
RECORDS_VERSION_KEY = "nwc-records-version"
AGENT_ACK_KEY = "nwc-agent-ack"
NO_ACK_YET = -1
# The agent proves it is alive: it raises the counter under AGENT_ALIVE_KEY every
# AGENT_HEARTBEAT_S, in the transaction of the pass that is then under way (one small write
# per interval, not per pass). The controller judges only whether the value changes, on its
# own clock (nwc.hostwatch): the host's clock is never compared with the controller's.
AGENT_ALIVE_KEY = "nwc-agent-alive"
AGENT_HEARTBEAT_S = 3.0
# Records and statuses come from another machine's OVSDB. A real one is a few kB (a CSR or two
# certificates at most); anything far larger is refused before parsing.
MAX_JSON_CHARS = 65536
# Stands for the agent's own underlay device (the controller does not know its name).
UNDERLAY = "@underlay"

def parse_version(text: str | None) -> int | None:
    """A records version, an agent's ack or its heartbeat counter as written in OVSDB (None:
    absent or not one)."""
    if text is None or not re.fullmatch(r"-?\d{1,18}", text):
        return None
    value = int(text)
    return value if value >= NO_ACK_YET else None


def _digest(tag: bytes, *parts: bytes) -> str:
    """A truncated SHA-256 over `tag` and length-prefixed `parts` (no two part lists collide)."""
    digest = hashlib.sha256(tag + b"\0")
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.hexdigest()[:16]


# -- names ------------------------------------------------------------------------------------

def leg_key(weave_id: str, slot: int) -> str:
    """Names everything of one leg: OVSDB keys, the IKE connection, the secret."""
    return f"{weave_id}-s{slot}"


def ike_identity(host: str, weave_id: str, slot: int, backend: str) -> str:
    """The IKE identity (FQDN, and the certificate's name) of one leg end. The strongswan
    backend gives every leg end its own; ovs-monitor-ipsec knows one certificate per host."""
    if backend == "ovs-ipsec":
        return f"{host}.host.nwc"
    return f"{host}.s{slot}.{weave_id}.nwc"


Side = Literal["requester", "target"]
Backend = Literal["strongswan", "ovs-ipsec"]
AuthMethod = Literal["psk", "x509"]


class TunnelError(ValueError):
    """A leg that cannot be built as asked (bad record, incompatible hosts...)."""


@dataclass(frozen=True)
class HostAddress:
    address: ipaddress.IPv4Address  # always a /32
    device: str  # "lo" or UNDERLAY


@dataclass(frozen=True)
class HostRoute:
    destination: ipaddress.IPv4Address  # always a /32
    kind: Literal["link", "blackhole"]
    device: str | None = None  # UNDERLAY for link routes
    source: ipaddress.IPv4Address | None = None


# -- the spec ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelSpec:
    """One leg end: what one host builds for one leg of one weave. Holds no secret."""

    weave_id: str
    slot: int
    side: Side
    host: str
    peer_host: str
    backend: Backend
    vni: int
    local_endpoint: ipaddress.IPv4Address
    remote_endpoint: ipaddress.IPv4Address
    local_vtep: ipaddress.IPv4Address
    remote_vtep: ipaddress.IPv4Address
    auth: AuthMethod
    local_id: str
    remote_id: str
    ike_proposals: tuple[str, ...]
    esp_proposals: tuple[str, ...]
    rekey_s: int
    underlay_mtu: int
    bridge: str = INTEGRATION_BRIDGE

    @property
    def key(self) -> str:
        return leg_key(self.weave_id, self.slot)

    @property
    def device(self) -> str:
        return leg_port_name(self.slot)

    @property
    def ofport(self) -> int:
        return leg_ofport(self.slot)

    @property
    def connection_name(self) -> str:
        return f"nwc-{self.key}"

    @property
    def initiator(self) -> bool:
        """The requester's host starts IKE; the target's host answers. One initiator means
        no duplicate SAs from both ends starting at once."""
        return self.side == "requester"

    @property
    def mtu(self) -> MtuPlan:
        return mtu_plan(self.esp_proposals, self.underlay_mtu)

    def addresses(self) -> tuple[HostAddress, ...]:
        if self.backend == "ovs-ipsec":
            return (HostAddress(self.local_endpoint, UNDERLAY),)
        return (HostAddress(self.local_endpoint, UNDERLAY), HostAddress(self.local_vtep, "lo"))

    def routes(self) -> tuple[HostRoute, ...]:
        """The peer endpoint is on-link: the fabric answers ARP for it along the leg's path.
        The blackhole is what keeps VXLAN from ever leaving in clear (kernel-libipsec's own
        route in table 220 wins over it while a CHILD SA exists)."""
        link = HostRoute(self.remote_endpoint, "link", UNDERLAY, self.local_endpoint)
        if self.backend == "ovs-ipsec":
            return (link,)
        return (link, HostRoute(self.remote_vtep, "blackhole"))

    def traffic_selectors(self) -> tuple[str, str]:
        """UDP between the two VTEPs, any port: a full-size VXLAN packet is fragmented
        inside the tunnel (kernel-libipsec), and a non-first fragment has no UDP header, so
        a selector naming port 4789 would drop it. The VTEPs are this leg's own addresses
        and carry nothing but its VXLAN."""
        return f"{self.local_vtep}/32[udp]", f"{self.remote_vtep}/32[udp]"

    def vici_connection(self, *, cert_pem: bytes | None = None,
                        ca_pem: bytes | None = None) -> dict[str, Any]:
        """The message VICI `load-conn` takes for this leg end. No secret is in it: the PSK
        goes in with `load-shared`, the private key with `load-key`."""
        if self.auth == "x509" and not (cert_pem and ca_pem):
            raise TunnelError("an x509 leg needs its certificate and the CA certificate")
        local: dict[str, Any] = {"auth": "psk" if self.auth == "psk" else "pubkey",
                                 "id": self.local_id}
        remote: dict[str, Any] = {"auth": local["auth"], "id": self.remote_id}
        if self.auth == "x509":
            local["certs"] = [cert_pem]
            remote["cacerts"] = [ca_pem]
        local_ts, remote_ts = self.traffic_selectors()
        child: dict[str, Any] = {
            "mode": "tunnel",
            "local_ts": [local_ts], "remote_ts": [remote_ts],
            "esp_proposals": list(self.esp_proposals),
            "rekey_time": f"{self.rekey_s}s",
            # The initiator keeps a trap policy: traffic re-negotiates a lost SA, and until
            # then the packets are dropped (never sent in clear). The responder just answers.
            "start_action": "trap" if self.initiator else "none",
            "dpd_action": "trap" if self.initiator else "clear",
            "close_action": "trap" if self.initiator else "none",
        }
        conn: dict[str, Any] = {
            "version": "2",
            "local_addrs": [str(self.local_endpoint)],
            "remote_addrs": [str(self.remote_endpoint)],
            "proposals": list(self.ike_proposals),
            "rekey_time": f"{self.rekey_s}s",
            "reauth_time": "0s",
            "dpd_delay": "10s",
            "mobike": "no",  # the endpoint addresses never move
            "keyingtries": "1",  # the agent decides about retries: auth failures are final
            "unique": "replace",
            "local-nwc": local,
            "remote-nwc": remote,
            "children": {self.connection_name: child},
        }
        if self.auth == "x509":
            conn["send_cert"] = "always"
        return {self.connection_name: conn}

    def ovs_interface(self, *, psk: Secret | None = None) -> dict[str, Any]:
        """The Interface row (columns) of an `ovs-ipsec` leg end, as ovs-monitor-ipsec reads
        it: a vxlan tunnel between the endpoint addresses, authenticated with `options:psk`,
        or with the host certificate configured in Open_vSwitch other_config and
        `options:remote_name` naming the peer's. `options:ipsec_*` carry the profile's
        proposals and rekeying to the IKE daemon (ovs-monitor-ipsec passes them through;
        versions that do not use their built-in AES-256-GCM proposals)."""
        if self.auth == "psk" and not psk:
            raise TunnelError("a psk leg needs its pre-shared key")
        life = self.rekey_s + self.rekey_s // 10
        options = {
            "local_ip": str(self.local_endpoint), "remote_ip": str(self.remote_endpoint),
            "key": str(self.vni), "dst_port": str(VXLAN_UDP_PORT),
            "ipsec_ike": ",".join(self.ike_proposals) + "!",
            "ipsec_esp": ",".join(self.esp_proposals) + "!",
            "ipsec_ikelifetime": f"{life}s", "ipsec_lifetime": f"{life}s",
            "ipsec_margintime": f"{life - self.rekey_s}s",
        }
        if self.auth == "psk":
            assert psk is not None
            options["psk"] = psk.reveal().hex()  # ovs-monitor-ipsec writes it into a "..."
        else:
            options["remote_name"] = self.remote_id
        return {"name": self.device, "type": "vxlan", "ofport_request": self.ofport,
                "options": options, "external_ids": self.owner_tags()}

    def owner_tags(self) -> dict[str, str]:
        """external_ids on the OVS rows NWC's agent creates: who owns them, and why."""
        return {"nwc-weave": self.weave_id, "nwc-slot": str(self.slot), "nwc-owner": "nwc-agent"}

    # -- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"weave": self.weave_id, "slot": self.slot, "side": self.side,
                "host": self.host, "peer": self.peer_host, "backend": self.backend,
                "vni": self.vni, "local_endpoint": str(self.local_endpoint),
                "remote_endpoint": str(self.remote_endpoint),
                "local_vtep": str(self.local_vtep), "remote_vtep": str(self.remote_vtep),
                "auth": self.auth, "local_id": self.local_id, "remote_id": self.remote_id,
                "ike": list(self.ike_proposals), "esp": list(self.esp_proposals),
                "rekey_s": self.rekey_s, "underlay_mtu": self.underlay_mtu,
                "bridge": self.bridge}

    @classmethod
    def from_dict(cls, d: Any) -> TunnelSpec:
        """Parse and check a spec read from OVSDB: a garbled record must become an error
        status, not a half-built tunnel."""
        if not isinstance(d, dict):
            raise TunnelError("a tunnel spec is a JSON object")
        try:
            spec = cls(
                weave_id=_text(d, "weave", r"wv-\d{1,12}"), slot=_int(d, "slot", 0, 65535),
                side=_choice(d, "side", ("requester", "target")),  # type: ignore[arg-type]
                host=_text(d, "host", r"[a-z][a-z0-9-]{0,31}"),
                peer_host=_text(d, "peer", r"[a-z][a-z0-9-]{0,31}"),
                backend=_choice(d, "backend", ("strongswan", "ovs-ipsec")),  # type: ignore
                vni=_int(d, "vni", 1, 2**24 - 1),
                local_endpoint=_ip(d, "local_endpoint"),
                remote_endpoint=_ip(d, "remote_endpoint"),
                local_vtep=_ip(d, "local_vtep"), remote_vtep=_ip(d, "remote_vtep"),
                auth=_choice(d, "auth", ("psk", "x509")),  # type: ignore[arg-type]
                local_id=_text(d, "local_id", r"[a-z0-9.-]{1,253}"),
                remote_id=_text(d, "remote_id", r"[a-z0-9.-]{1,253}"),
                ike_proposals=_proposals(d, "ike"), esp_proposals=_proposals(d, "esp"),
                rekey_s=_int(d, "rekey_s", 60, 86_400),
                underlay_mtu=_int(d, "underlay_mtu", 1280, 65535),
                bridge=_text(d, "bridge", r"[A-Za-z0-9_.-]{1,15}"))
        except KeyError as exc:
            raise TunnelError(f"tunnel spec lacks {exc.args[0]!r}") from None
        if spec.slot > 65535 - LEG_OFPORT_BASE:
            raise TunnelError(f"slot {spec.slot} has no ofport")
        return spec


def _load_json(text: Any, what: str) -> Any:
    """json.loads that fails only with TunnelError: the text comes from a host's OVSDB, and
    json raises RecursionError for deep nesting, which no caller expects."""
    if not isinstance(text, str):
        raise TunnelError(f"{what} is not text")
    if len(text) > MAX_JSON_CHARS:
        raise TunnelError(f"{what} is too large ({len(text)} characters)")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise TunnelError(f"{what} is not JSON: {getattr(exc, 'msg', exc)}") from None
    except RecursionError:
        raise TunnelError(f"{what} is nested too deeply") from None


def _short(value: Any) -> str:
    """A value quoted in an error message, cut short (it came from another machine)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(d: dict[str, Any], key: str, pattern: str) -> str:
    value = d[key]
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise TunnelError(f"tunnel spec field {key!r} is not valid: {_short(value)}")
    return value


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TunnelError(f"tunnel spec field {key!r} must be an integer in {lo}..{hi}")
    return value


def _choice(d: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = d[key]
    if value not in choices:
        raise TunnelError(f"tunnel spec field {key!r} must be one of {', '.join(choices)}")
    return str(value)


def _ip(d: dict[str, Any], key: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(d[key])
    except (ValueError, TypeError) as exc:
        raise TunnelError(f"tunnel spec field {key!r} is not an IPv4 address") from exc


def _proposals(d: dict[str, Any], key: str) -> tuple[str, ...]:
    value = d[key]
    if not (isinstance(value, list) and value and all(
            isinstance(p, str) and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", p) for p in value)):
        raise TunnelError(f"tunnel spec field {key!r} must list strongSwan proposals")
    return tuple(value)


# -- what the controller writes: the spec plus the leg's key material --------------------------

@dataclass(frozen=True)
class LegRecord:
    """The desired state of one leg end, as written into the host's OVSDB. `start` tells the
    initiator that its peer is listening (the controller sets it once the responder says so),
    so IKE's first attempt succeeds instead of retransmitting into the void."""

    spec: TunnelSpec
    psk: Secret | None = None
    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    start: bool = False

    def to_json(self) -> str:
        d: dict[str, Any] = {"v": RECORD_VERSION, "spec": self.spec.to_dict(),
                             "start": self.start}
        if self.psk is not None:
            d["psk"] = self.psk.to_text()
        if self.ca_pem is not None:
            d["ca"] = self.ca_pem.decode("ascii")
        if self.cert_pem is not None:
            d["cert"] = self.cert_pem.decode("ascii")
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LegRecord:
        d = _load_json(text, "tunnel record")
        if not isinstance(d, dict) or d.get("v") != RECORD_VERSION:
            raise TunnelError(f"tunnel record is not version {RECORD_VERSION}")
        spec = TunnelSpec.from_dict(d.get("spec"))
        try:
            psk = Secret.from_text(d["psk"]) if "psk" in d else None
        except (ValueError, TypeError, AttributeError):
            raise TunnelError("tunnel record's psk is not base64") from None
        if spec.auth == "psk" and not psk:
            raise TunnelError("psk leg without a pre-shared key")
        ca = d.get("ca")
        cert = d.get("cert")
        for name, value in (("ca", ca), ("cert", cert)):
            if value is not None and not (isinstance(value, str)
                                          and value.startswith("-----BEGIN CERTIFICATE-----")):
                raise TunnelError(f"tunnel record's {name} is not a PEM certificate")
        return cls(spec, psk, ca.encode() if ca else None, cert.encode() if cert else None,
                   bool(d.get("start")))

    def same_material(self, other: LegRecord) -> bool:
        return (self.psk == other.psk and self.ca_pem == other.ca_pem
                and self.cert_pem == other.cert_pem)

    def fingerprint(self) -> str:
        """Which key material this is, safe to show: a truncated SHA-256 over it (a 256-bit
        random key cannot be recovered from it). The agent reports the fingerprint of what it
        loaded, so the controller can tell a status about the current key from a stale one."""
        return _digest(b"nwc-leg-material", self.psk.reveal() if self.psk else b"",
                       self.ca_pem or b"", self.cert_pem or b"")

    def tunnel_id(self) -> str:
        """Which tunnel this record asks for: its spec (weave, slot, endpoints, identities)
        and its key material, hashed like fingerprint(). An agent reports it with an
        installed SA (`sa_of`): a reused slot repeats the endpoints and the port name, so only
        this tells the controller the SA is of the tunnel it wants now. `start` is left out:
        no SA is bound to it."""
        spec = json.dumps(self.spec.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return _digest(b"nwc-leg-tunnel", spec, self.fingerprint().encode())


# -- what the agent answers -------------------------------------------------------------------

class Phase(StrEnum):
    BUILDING = "building"  # addresses, routes, device, port being made
    WAITING_CERT = "waiting_cert"  # CSR published, waiting for the controller's signature
    LISTENING = "listening"  # built and loaded into the IKE daemon; no SA yet
    CONNECTING = "connecting"  # IKE under way
    INSTALLED = "installed"  # the CHILD SA is installed: traffic flows, encrypted
    DELEGATED = "delegated"  # ovs-ipsec: handed to ovs-monitor-ipsec, SA not yet seen
    AUTH_FAILED = "auth_failed"  # wrong key or certificate: final until the record changes
    IKE_DOWN = "ike_down"  # the IKE daemon does not answer: traffic is dropped
    ERROR = "error"  # could not build (detail says why)


# strongSwan's CHILD SA states whose SA is in the kernel and carries traffic: INSTALLED, and
# during a rekey the old SA (REKEYING while CREATE_CHILD_SA runs, REKEYED until it is deleted)
# and during a MOBIKE address update (UPDATING). A rekey's new SA is INSTALLING before it
# carries anything; CREATED, ROUTED (trap only), RETRYING, DELETING and DELETED carry nothing.
CHILD_CARRYING_STATES = frozenset({"INSTALLED", "UPDATING", "REKEYING", "REKEYED"})

# What an agent reports reaches the API (both tenants' stats), Prometheus, the log, events and
# the audit trail, and one host's agent may be compromised or broken: every number has a
# bound and every text is cleaned where a status is parsed. charon's byte and packet counters
# are 64-bit; counts and ages fit 32 bits (2**32 s is 136 years, a rekey a second for as
# long). A number past its bound makes the status unreadable, like any other malformed one.
MAX_COUNTER = 2**64 - 1
MAX_COUNT = 2**32 - 1
_SA_COUNTS = {"key_bits": MAX_COUNT, "bytes_in": MAX_COUNTER, "bytes_out": MAX_COUNTER,
              "packets_in": MAX_COUNTER, "packets_out": MAX_COUNTER, "installed_s": MAX_COUNT}
# Text is never refused (a newer charon may name a state or an algorithm this controller does
# not know): it is cleaned (`host_text`) and cut. A detail is a sentence or an error message;
# an SA state, id or algorithm name is a word.
MAX_DETAIL_CHARS = 512
MAX_NAME_CHARS = 64
# Control characters (newlines, ESC and the rest of C0/C1), format characters (bidi overrides
# and isolates, zero-width ones), line and paragraph separators and lone surrogates: each can
# forge a log line, drive a terminal, reorder what a reader sees, or fail an encoder.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class SaInfo:
    """What the IKE daemon reports about a leg's SAs (no key material)."""

    ike_state: str
    child_state: str | None = None
    child_id: str | None = None  # CHILD SA unique id: changes on every rekey
    ike_id: str | None = None
    encryption: str | None = None
    key_bits: int | None = None
    integrity: str | None = None
    dh_group: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    installed_s: int = 0
    rekeying: bool = False  # an IKE or CHILD SA rekey is under way (traffic still flows)

    @property
    def installed(self) -> bool:
        """The CHILD SA carries traffic (also while it or its IKE SA is being rekeyed)."""
        return (self.ike_state in ("ESTABLISHED", "REKEYING", "REKEYED")
                and self.child_state in CHILD_CARRYING_STATES)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> SaInfo:
        """Parse and check what an agent reported: these values reach the API and metrics,
        so a wrong type is an error here, not later. Unknown keys are ignored (a newer agent
        may report more)."""
        if not isinstance(d, dict):
            raise TunnelError("a tunnel status's sa is a JSON object")
        if not isinstance(d.get("ike_state"), str):
            raise TunnelError("a tunnel status's sa lacks its ike_state")
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name not in d or d[name] is None:
                continue
            value = d[name]
            if name == "rekeying":
                ok = isinstance(value, bool)
            elif name in _SA_COUNTS:
                ok = isinstance(value, int) and not isinstance(value, bool)
                if ok and not 0 <= value <= _SA_COUNTS[name]:
                    raise TunnelError(f"a tunnel status's sa field {name!r} is out of range")
            else:
                ok = isinstance(value, str)
                value = host_text(value, MAX_NAME_CHARS) if ok else value
            if not ok:
                raise TunnelError(f"a tunnel status's sa field {name!r} has the wrong type")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class LegStatus:
    """One agent's report on one leg end. `applied` is the spec it built (so it can tear the
    leg down even once the controller's record is gone); `csr` asks for a certificate."""

    phase: Phase
    detail: str = ""
    sa: SaInfo | None = None
    rekeys: int = 0
    csr_pem: bytes | None = None
    applied: TunnelSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. which OVS keys NWC set

    @property
    def carrying(self) -> bool:
        """The leg's traffic goes, encrypted, through the SA reported, though the end is not
        `installed` for its record: an SA built from earlier key material, being replaced
        (or kept because the peer refused the new material)."""
        return self.extra.get("carrying") is True and self.sa is not None \
            and self.sa.installed

    def to_json(self) -> str:
        d: dict[str, Any] = {"v": RECORD_VERSION, "phase": self.phase.value,
                             "detail": self.detail, "rekeys": self.rekeys}
        if self.sa is not None:
            d["sa"] = self.sa.to_dict()
        if self.csr_pem is not None:
            d["csr"] = self.csr_pem.decode("ascii")
        if self.applied is not None:
            d["applied"] = self.applied.to_dict()
        if self.extra:
            d["extra"] = self.extra
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LegStatus:
        """Parse an agent's report. Total: anything malformed is a TunnelError (never a
        ValueError, TypeError or RecursionError), so the caller can treat it as that one
        leg's problem."""
        d = _load_json(text, "tunnel status")
        if not isinstance(d, dict):
            raise TunnelError("a tunnel status is a JSON object")
        try:
            phase = Phase(d.get("phase"))
        except (ValueError, TypeError):
            raise TunnelError(f"tunnel status has no known phase: {_short(d.get('phase'))}"
                              ) from None
        detail, csr, rekeys = d.get("detail", ""), d.get("csr"), d.get("rekeys", 0)
        if not isinstance(detail, str):
            raise TunnelError("a tunnel status's detail is not text")
        if isinstance(rekeys, bool) or not isinstance(rekeys, int) \
                or not 0 <= rekeys <= MAX_COUNT:
            raise TunnelError("a tunnel status's rekeys is not a count")
        if csr is not None and not isinstance(csr, str):
            raise TunnelError("a tunnel status's csr is not text")
        sa = SaInfo.from_dict(d["sa"]) if d.get("sa") is not None else None
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise TunnelError("a tunnel status's extra is not a JSON object")
        if "key_id" in extra and not isinstance(extra["key_id"], str):
            raise TunnelError("a tunnel status's key_id is not text")
        for name in ("material", "sa_material", "sa_of"):
            if name in extra and not isinstance(extra[name], str):
                raise TunnelError(f"a tunnel status's {name} is not text")
        if "carrying" in extra and not isinstance(extra["carrying"], bool):
            raise TunnelError("a tunnel status's carrying is not true or false")
        if "ovs_keys" in extra and not (isinstance(extra["ovs_keys"], list) and all(
                isinstance(k, str) for k in extra["ovs_keys"])):
            raise TunnelError("a tunnel status's ovs_keys is not a list of names")
        applied = None
        if isinstance(d.get("applied"), dict):
            # A spec this version cannot read (an older agent's) only loses the check that
            # the status is about the current build; the status itself still counts.
            try:
                applied = TunnelSpec.from_dict(d["applied"])
            except TunnelError:
                applied = None
        return cls(phase, host_text(detail, MAX_DETAIL_CHARS), sa, rekeys,
                   csr.encode() if csr is not None else None, applied, extra)


def host_text(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Text a host wrote, safe to log, audit and show: every unsafe character (see
    `_UNSAFE_CATEGORIES`) replaced by its escape (a newline by `\\x0a`, ESC by `\\x1b`, a
    right-to-left override by `\\u202e`) and the backslash itself by `\\\\`, and at most
    `limit` characters, a cut one ending with a marker that says how long it was.

    Escaping the backslash is what makes an escape mean what it says: without it a host
    could write the four characters `\\x1b` and a reader could not tell them from a real ESC
    NWC escaped. The price: cleaning is not idempotent (a second pass doubles every
    backslash), so text is cleaned once, where it comes in from the host."""
    out: list[str] = []
    size = 0
    for ch in text:
        if ch == "\\":
            ch = "\\\\"
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            code = ord(ch)
            ch = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
                else f"\\U{code:08x}"
        out.append(ch)
        size += len(ch)
        if size > limit:
            marker = f"... [cut, {len(text)} characters]"
            while out and size + len(marker) > limit:
                size -= len(out.pop())  # whole escapes only: the cut text stays unambiguous
            return "".join(out) + marker
    return "".join(out)


# -- from a weave to its leg ends -------------------------------------------------------------

def leg_specs(weave: Weave, leg: Leg, profile: SecurityProfile, topology: Topology,
              bridge: str = INTEGRATION_BRIDGE) -> tuple[TunnelSpec, TunnelSpec]:
    """The requester's and the target's end of one remote leg."""
    if leg.slot is None or leg.local:
        raise TunnelError("a leg inside one host has no tunnel")
    hosts = topology.hosts
    requester, target = hosts[leg.requester_host], hosts[leg.target_host]
    if requester.backend != target.backend:
        raise TunnelError(f"hosts {requester.name} ({requester.backend}) and {target.name} "
                          f"({target.backend}) use different tunnel backends")
    backend = requester.backend
    addrs = topology.weave_addresses(leg.slot)
    ids = {h.name: ike_identity(h.name, weave.id, leg.slot, backend) for h in (requester, target)}
    common = dict(weave_id=weave.id, slot=leg.slot, backend=backend, vni=addrs.vni,
                  auth=profile.auth, ike_proposals=profile.ike_proposals,
                  esp_proposals=profile.esp_proposals, rekey_s=profile.rekey_s,
                  underlay_mtu=topology.underlay.mtu, bridge=bridge)
    req = TunnelSpec(side="requester", host=requester.name, peer_host=target.name,
                     local_endpoint=addrs.requester_endpoint,
                     remote_endpoint=addrs.target_endpoint,
                     local_vtep=addrs.requester_vtep, remote_vtep=addrs.target_vtep,
                     local_id=ids[requester.name], remote_id=ids[target.name],
                     **common)  # type: ignore[arg-type]
    tgt = TunnelSpec(side="target", host=target.name, peer_host=requester.name,
                     local_endpoint=addrs.target_endpoint,
                     remote_endpoint=addrs.requester_endpoint,
                     local_vtep=addrs.target_vtep, remote_vtep=addrs.requester_vtep,
                     local_id=ids[target.name], remote_id=ids[requester.name],
                     **common)  # type: ignore[arg-type]
    return req, tgt


def weave_specs(weave: Weave, profile: SecurityProfile, topology: Topology,
                bridge: str = INTEGRATION_BRIDGE) -> list[tuple[TunnelSpec, TunnelSpec]]:
    """Both ends of every remote leg of a weave (legs inside one host have no tunnel)."""
    return [leg_specs(weave, leg, profile, topology, bridge)
            for leg in weave.legs if not leg.local and leg.slot is not None]
