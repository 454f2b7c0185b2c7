"""Whose OVSDB server is at the other end of an `ssl:` target.

python-ovs's ssl: stream checks that the server's certificate chains to the CA it was given
(`--ovsdb-ssl-ca`), never whose certificate it is (`check_hostname = False`). With one CA for
every host and switch, as `ovs-pki` has it, any certificate holder able to intercept the
management network could pose as any host's OVSDB server and be sent that host's tunnel
records, pre-shared keys included. So NWC also checks the name.

**The rule** (`ServerIdentity.problem`, from `nwc.certnames`, which OpenFlow switches share).
The server's certificate must name the host:
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
import threading
from collections.abc import Iterable

from ovs import stream

from nwc.certnames import CertIdentity, remote_address

# The OVSDB side's name for the shared identity (hostdb, tunnels and the agent use it).
ServerIdentity = CertIdentity
REFUSED = errno.EACCES

__all__ = ["REFUSED", "IdentifiedSSLStream", "IdentityConflict", "ServerIdentity", "expect",
           "forget", "install", "last_refusal", "remote_address"]


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
