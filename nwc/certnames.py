"""Whose certificate is it: the name rule NWC applies to management-plane peers.

A CA says a certificate is one of yours, not whose. With one switch CA for every host and
fabric switch, as `ovs-pki` has it (docs/deploy.md section 4), every certificate holder passes
the CA check as any of them. So where NWC knows who a peer must be, it also checks the name:
a host's OVSDB server (`nwc.ovsdbtls`) and an OpenFlow switch claiming a topology datapath id
(`nwc.ofapp`). One rule for both, here, pure:

- the names a certificate presents are its subjectAltName DNS names and IP addresses, or, only
  when it has neither, its commonName(s) (as RFC 6125 has it);
- a name matches when it equals an expected name, ignoring ASCII case (a name with any other
  character matches nothing: Unicode case folding maps some letters onto ASCII ones, the
  long s onto `s`, the Kelvin sign onto `k`, so `CN=ſ1` would pass for `s1`); `ovs-pki
  req+sign NAME` writes
  "NAME id:<uuid>" (or a date instead of the uuid) as both CN and DNS name, and the part from
  " id:" on is ignored; no wildcards;
- an IP address (a SAN IP, or a name that is an address) matches when it is one of the
  expected addresses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
OVS_PKI_SUFFIX = " id:"  # ovs-pki req+sign: CN and DNS name "NAME id:<uuid or date>"


def remote_address(remote: str) -> IpAddress | None:
    """The literal IP address of a tcp:/ssl: remote, else None (a unix: path, a DNS name)."""
    kind, _, rest = remote.strip().partition(":")
    if kind not in ("tcp", "ssl") or not rest:
        return None
    # Here, not at the top: the topology check (`nwc check-policy`) uses this, and importing
    # python-ovs imports eventlet, whose deprecation warning would print before the CLI can
    # quiet it (nwc.cli.quiet_dependency_warnings).
    from ovs import socket_util

    try:
        host, _port = socket_util.inet_parse_active(rest, 0, raises=False)
        return ipaddress.ip_address(host)
    except (ValueError, TypeError):
        return None


def _addresses(target: str) -> set[IpAddress]:
    return {a for r in target.split(",") if (a := remote_address(r)) is not None}


@dataclass(frozen=True)
class CertIdentity:
    """Who a peer must be: a certificate naming one of `names` or `addresses`."""

    label: str  # for messages: whose it must be ("host h1", "switch s1")
    names: frozenset[str] = frozenset()  # lower case; compared ignoring ASCII case
    addresses: frozenset[IpAddress] = frozenset()
    hint: str = field(default="", compare=False)  # what to set when refused
    peer: str = field(default="server", compare=False)  # what the peer is, for messages

    @classmethod
    def of_host(cls, host: str, target: str, *, management_ip: IpAddress | None = None,
                cert_name: str | None = None, peer: str = "server") -> CertIdentity:
        """A topology host: its name (or its explicit certificate name) or its addresses
        (`management_ip`, the address of its OVSDB `target`). One key pair serves a host's
        OVSDB server and its switch (`ovs-vsctl set-ssl`), so both planes use this."""
        addresses = _addresses(target)
        if management_ip is not None:
            addresses.add(management_ip)
        name = cert_name or host
        return cls(f"host {host}", frozenset({name.lower()}), frozenset(addresses),
                   hint=("hosts.NAME.ovsdb_cert_name" if cert_name
                         else "the host's name, management_ip or OVSDB address"), peer=peer)

    @classmethod
    def of_switch(cls, switch: str, cert_name: str | None = None,
                  peer: str = "switch") -> CertIdentity:
        """A topology fabric switch: its name, or the name its OVS's certificate carries
        (`switches.NAME.cert_name`: several bridges of one OVS share one certificate)."""
        return cls(f"switch {switch}", frozenset({(cert_name or switch).lower()}),
                   hint=("switches.NAME.cert_name" if cert_name else
                         "the switch's name, or switches.NAME.cert_name"), peer=peer)

    @classmethod
    def of_target(cls, target: str, name: str | None = None) -> CertIdentity:
        """The agent's own OVSDB: `name` (--ovsdb-server-name) or the target's address."""
        return cls("the agent's --ovsdb", frozenset({name.lower()} if name else ()),
                   frozenset(_addresses(target)), hint="--ovsdb-server-name")

    def expected(self) -> str:
        shown = sorted(self.names) + sorted(str(a) for a in self.addresses)
        return " or ".join(shown) if shown else "(nothing: no name given)"

    def problem(self, der: bytes) -> str | None:
        """None if this DER certificate (already verified against the CA) names this
        peer; else why not, naming what it presents and what was expected."""
        try:
            cert = x509.load_der_x509_certificate(der)
            names, addresses, where = presented(cert)
        except Exception as exc:  # a certificate we cannot read names nobody
            return f"unreadable {self.peer} certificate ({exc})"
        if any(self._name_matches(n) for n in names) or \
                any(a in self.addresses for a in addresses):
            return None
        shown = [f"DNS:{n}" if where == "subjectAltName" else f"CN={n}" for n in names]
        shown += [f"IP:{a}" for a in addresses]
        return (f"the {self.peer}'s certificate ({where} {', '.join(shown) or 'empty'}) is not "
                f"{self.label}'s: expected {self.expected()} ({self.hint})")

    def _name_matches(self, name: str) -> bool:
        if not name.isascii():
            return False
        base = name.split(OVS_PKI_SUFFIX, 1)[0]
        if base.lower() in self.names:
            return True
        try:
            return ipaddress.ip_address(base) in self.addresses
        except ValueError:
            return False


def presented(cert: x509.Certificate) -> tuple[list[str], list[IpAddress], str]:
    """The names a certificate claims: its subjectAltName DNS names and addresses, or, when
    it has neither, its commonNames (as RFC 6125 has it)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        ips = list(san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = [], []
    if dns or ips:
        return dns, ips, "subjectAltName"
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return cns, [], "commonName"
