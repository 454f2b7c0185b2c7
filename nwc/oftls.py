"""TLS for OpenFlow connections, safe for os-ken's two threads per connection.

os-ken 4 reads each switch connection in one native thread and writes it from another. One
OpenSSL connection must not be driven by two threads at once, and a plain `ssl.SSLSocket`
would let a reader blocked in `recv` hold up every write if it were locked. So the TLS state
is an `ssl.SSLObject` over memory buffers, touched only under a lock and only for the moment
it takes to encrypt or decrypt; the socket itself is read and written outside that lock. A
reader waiting for the switch never stops the controller from writing to it.

Switches authenticate with certificates from the CA given to `nwc run` (`--ca-certs`); NWC
presents `--ctl-cert`. Whose certificate it is (it must name the switch whose datapath id the
connection announces) is checked later, by `nwc.ofapp`, once the switch said which it is.
OVS configures its side with `ovs-vsctl set-ssl` and an `ssl:` target.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
READ_CHUNK = 65536


class TlsConfigError(ValueError):
    """The key, certificate or CA files cannot make a TLS server."""


@dataclass(frozen=True)
class TlsFiles:
    private_key: Path
    certificate: Path
    ca_certificates: Path

    def server_context(self) -> ssl.SSLContext:
        """Server side, client certificates required, TLS 1.2 or newer, no renegotiation
        (which would make a write need a read)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_RENEGOTIATION
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(str(self.certificate), str(self.private_key))
            context.load_verify_locations(str(self.ca_certificates))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"OpenFlow TLS files: {exc}") from None
        return context


class TlsSocket:
    """An accepted socket speaking TLS, with the socket methods os-ken and NWC use (recv,
    sendall, settimeout, setsockopt, shutdown, close, getpeername...)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        try:
            self._peer = sock.getpeername()
        except OSError:
            self._peer = None
        self._state = threading.Lock()  # the SSLObject and its buffers
        self._writing = threading.Lock()  # keeps TLS records in order on the wire

    def handshake(self, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Complete the TLS handshake (before os-ken sees the connection). Raises OSError or
        ssl.SSLError when the peer is not a switch with a certificate NWC trusts, TimeoutError
        when the whole handshake takes longer than `timeout_s`.

        One deadline for the whole handshake, not a timeout per read: a peer sending a byte
        now and then would otherwise hold the handshake, and a connection slot, forever."""
        previous = self._sock.gettimeout()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    with self._state:
                        self._tls.do_handshake()
                    self._limit_to(deadline, timeout_s)
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._limit_to(deadline, timeout_s)
                    self._flush()
                    self._limit_to(deadline, timeout_s)
                    if not self._pull():
                        raise ConnectionError("peer closed during the TLS handshake") from None
        finally:
            self._sock.settimeout(previous)

    def _limit_to(self, deadline: float, timeout_s: float) -> None:
        """Let the next socket operation wait only for the time left before `deadline`."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"TLS handshake not done within {timeout_s:g} s")
        self._sock.settimeout(left)

    def peer_certificate(self) -> dict[str, Any] | None:
        with self._state:
            return self._tls.getpeercert()

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate as DER (after the handshake), for the name check."""
        with self._state:
            return self._tls.getpeercert(binary_form=True)

    def recv(self, size: int, *flags: int) -> bytes:
        while True:
            with self._state:
                try:
                    data = self._tls.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:  # the peer's close_notify
                    return b""
                except ssl.SSLError as exc:
                    # A record that does not decrypt or verify: the stream is unusable. End
                    # it (os-ken would take an SSLError for a read timeout and spin on it).
                    log.warning("TLS stream from %s broken (%s): closing it", self._peer, exc)
                    return b""
                pending = self._outgoing.pending
            if pending:  # reading can produce records to send (TLS 1.3 key updates)
                self._flush()
            if data is not None:
                return data
            if not self._pull():  # timeouts propagate: os-ken retries on them
                return b""

    def _pull(self) -> bool:
        raw = self._sock.recv(READ_CHUNK)
        if not raw:
            return False
        with self._state:
            self._incoming.write(raw)
        return True

    def sendall(self, data: bytes, *flags: int) -> None:
        with self._writing:
            with self._state:
                self._tls.write(data)
                records = self._outgoing.read()
            self._sock.sendall(records)

    def send(self, data: bytes, *flags: int) -> int:
        self.sendall(data)
        return len(data)

    def _flush(self) -> None:
        with self._writing:
            with self._state:
                records = self._outgoing.read()
            if records:
                self._sock.sendall(records)

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        # Only what carries no payload goes to the socket itself: anything that could write
        # or read bytes past TLS (makefile, sendmsg, recv_into...) is not there at all.
        if name in PASSED_THROUGH:
            return getattr(self._sock, name)
        raise AttributeError(f"{type(self).__name__} has no {name!r}")


PASSED_THROUGH = frozenset({"settimeout", "gettimeout", "setsockopt", "getsockopt", "shutdown",
                            "getpeername", "getsockname", "fileno", "setblocking"})
