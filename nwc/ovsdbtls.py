"""Whose OVSDB server is at the other end of an `ssl:` target.

python-ovs's ssl: stream checks that the server's certificate chains to the CA it was given
(`--ovsdb-ssl-ca`), never whose certificate it is (`check_hostname = False`). With one CA for
every host and switch, as `ovs-pki` has it, any certificate holder able to intercept the
management network could pose as any host's OVSDB server and be sent that host's tunnel
records, pre-shared keys included. So NWC also checks the name.

**The rule** (`ServerIdentity.problem`). The server's certificate must name the host:
- its subjectAltName DNS names and IP addresses, or, only when it has neither, its
  commonName(s);
- a name matches when it equals the expected name (the topology's host name, or
  `hosts.NAME.ovsdb_cert_name`), ignoring case; `ovs-pki req+sign NAME` writes
  "NAME id:<uuid>" (or a date instead of the uuid) as both CN and DNS name, and the part from
  " id:" on is ignored; no wildcards;
- an IP address (a SAN IP, or a name that is an address) matches when it is one of the host's
  own: `hosts.NAME.management_ip` or the address in its OVSDB target.

**The hook.** python-ovs opens every stream, including each reconnect of an IDL's session, by
looking up the class registered for the target's prefix (`Stream._SOCKET_METHODS`). NWC
registers a subclass of python-ovs's `SSLStream` for "ssl:" whose `connect()` checks the
certificate once the handshake has succeeded. python-ovs calls `connect()` before it hands
the stream to a JSON-RPC connection (jsonrpc.Session.run, and HostDb's own schema fetch), and
again at the start of every `send` and `recv`, so a refused stream never carries a byte of
OVSDB: it reports an error (EACCES) and python-ovs closes it and counts a failed connection
attempt. No python-ovs code is copied or changed. A target with no expected identity is
refused too: no check is never the default.

The expected identities live in a process-wide table keyed by the remote ("ssl:IP:PORT"), the
only thing python-ovs gives a stream; `HostDb` enters its target while it is open.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID
from ovs import socket_util, stream

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
OVS_PKI_SUFFIX = " id:"  # ovs-pki req+sign: CN and DNS name "NAME id:<uuid or date>"
REFUSED = errno.EACCES


def remote_address(remote: str) -> IpAddress | None:
    """The literal IP address of a tcp:/ssl: remote, else None (a unix: path, a DNS name)."""
    kind, _, rest = remote.strip().partition(":")
    if kind not in ("tcp", "ssl") or not rest:
        return None
    try:
        host, _port = socket_util.inet_parse_active(rest, 0, raises=False)
        return ipaddress.ip_address(host)
    except (ValueError, TypeError):
        return None


def _addresses(target: str) -> set[IpAddress]:
    return {a for r in target.split(",") if (a := remote_address(r)) is not None}


@dataclass(frozen=True)
class ServerIdentity:
    """Who an OVSDB server must be: a certificate naming one of `names` or `addresses`."""

    label: str  # for messages: the host (or "the agent's --ovsdb")
    names: frozenset[str] = frozenset()  # compared case-insensitively
    addresses: frozenset[IpAddress] = frozenset()
    hint: str = field(default="", compare=False)  # what to set when refused

    @classmethod
    def of_host(cls, host: str, target: str, *, management_ip: IpAddress | None = None,
                cert_name: str | None = None) -> ServerIdentity:
        """A topology host: its name (or its explicit certificate name) or its addresses."""
        addresses = _addresses(target)
        if management_ip is not None:
            addresses.add(management_ip)
        name = cert_name or host
        return cls(f"host {host}", frozenset({name.casefold()}), frozenset(addresses),
                   hint=("hosts.NAME.ovsdb_cert_name" if cert_name
                         else "the host's name, management_ip or OVSDB address"))

    @classmethod
    def of_target(cls, target: str, name: str | None = None) -> ServerIdentity:
        """The agent's own OVSDB: `name` (--ovsdb-server-name) or the target's address."""
        return cls("the agent's --ovsdb", frozenset({name.casefold()} if name else ()),
                   frozenset(_addresses(target)), hint="--ovsdb-server-name")

    def expected(self) -> str:
        shown = sorted(self.names) + sorted(str(a) for a in self.addresses)
        return " or ".join(shown) if shown else "(nothing: no name given)"

    def problem(self, der: bytes) -> str | None:
        """None if this DER certificate (already verified against the CA) names this
        server; else why not, naming what it presents."""
        try:
            cert = x509.load_der_x509_certificate(der)
            names, addresses, where = presented(cert)
        except Exception as exc:  # a certificate we cannot read names nobody
            return f"unreadable server certificate ({exc})"
        if any(self._name_matches(n) for n in names) or \
                any(a in self.addresses for a in addresses):
            return None
        shown = [f"DNS:{n}" if where == "subjectAltName" else f"CN={n}" for n in names]
        shown += [f"IP:{a}" for a in addresses]
        return (f"the server's certificate ({where} {', '.join(shown) or 'empty'}) is not "
                f"{self.label}'s: expected {self.expected()} ({self.hint})")

    def _name_matches(self, name: str) -> bool:
        base = name.split(OVS_PKI_SUFFIX, 1)[0]
        if base.casefold() in self.names:
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


# -- who is expected where, and what the last refusal was --------------------------------------

_lock = threading.Lock()
_expected: dict[str, tuple[ServerIdentity, int]] = {}  # remote -> (identity, users)
_refusals: dict[str, str] = {}  # remote -> why its last connection was refused


class IdentityConflict(ValueError):
    """Two users expect different servers at the same remote."""


def expect(remotes: Iterable[str], identity: ServerIdentity) -> None:
    """From now on, a server at these remotes must be `identity` (until `forget`)."""
    remotes = [r.strip() for r in remotes]
    with _lock:
        for remote in remotes:
            held = _expected.get(remote)
            if held is not None and held[0] != identity:
                raise IdentityConflict(f"{remote} is expected to be {held[0].label}'s OVSDB "
                                       f"and {identity.label}'s")
        for remote in remotes:
            held = _expected.get(remote)
            _expected[remote] = (identity, (held[1] if held else 0) + 1)


def forget(remotes: Iterable[str]) -> None:
    with _lock:
        for remote in (r.strip() for r in remotes):
            held = _expected.pop(remote, None)
            if held is not None and held[1] > 1:
                _expected[remote] = (held[0], held[1] - 1)


def last_refusal(remote: str) -> str | None:
    with _lock:
        return _refusals.get(remote.strip())


def _check(remote: str, der: bytes | None) -> str | None:
    with _lock:
        held = _expected.get(remote)
    if held is None:
        why = ("no identity is expected for this server, so NWC cannot tell whose it is "
               "(python-ovs checks the CA only)")
    elif der is None:
        why = "the server presented no certificate"
    else:
        why = held[0].problem(der)
    with _lock:
        if why is None:
            _refusals.pop(remote, None)
        else:
            _refusals[remote] = why
    return why


class IdentifiedSSLStream(stream.SSLStream):
    """python-ovs's ssl: stream, refusing a server whose certificate is not the expected
    one's. See the module's docstring for why the check sits in `connect()`."""

    _verdict: int | None = None  # None: not checked yet; 0: accepted; else the error
    refusal: str | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        with _lock:  # a new attempt: an earlier refusal no longer says why it is down
            _refusals.pop(self.name.strip(), None)

    def connect(self) -> int:
        if self._verdict:
            return self._verdict
        error = super().connect()
        if error or self._verdict == 0:
            return error
        try:
            der = self.socket.getpeercert(binary_form=True)
        except (OSError, ValueError):
            der = None
        self.refusal = _check(self.name.strip(), der)
        self._verdict = REFUSED if self.refusal else 0
        return self._verdict


def install() -> None:
    """Make "ssl:" streams IdentifiedSSLStream (idempotent; cheap enough to call before
    every open, so nothing that re-registered python-ovs's class can go unnoticed)."""
    if stream.Stream._find_method("ssl:") is not IdentifiedSSLStream:
        stream.Stream.register_method("ssl", IdentifiedSSLStream)


install()
