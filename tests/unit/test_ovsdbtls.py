"""Whose OVSDB server it is: the naming rule on certificates shaped as the lab, `ovs-pki` and
common PKIs write them, and the check in python-ovs's ssl: stream, against a TLS server on
loopback that records every byte it receives after the handshake. A refused server gets none,
on NWC's own schema fetch and on the JSON-RPC session an IDL reconnects with."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import ovs.jsonrpc
import ovs.poller
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nwc import ovsdbtls
from nwc.hostdb import HostDb, ServerIdentityError, configure_ssl, fetch_schema, ssl_files
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.ovsdbtls import ServerIdentity
from nwc.policy import Policy
from nwc.topology import parse_topology_text
from nwc.tunnels import Tunnels, _HostLink
from nwc.yamlsource import ConfigError

pytestmark = pytest.mark.unit

OVS_PKI_ID = "9cc2ac8c-59e2-45cb-a830-53e2beaca16c"
H1 = ServerIdentity.of_host("h1", "ssl:198.51.100.11:6640",
                            management_ip=ipaddress.ip_address("198.51.100.21"))


class Ca:
    """A throwaway CA issuing leaves with any subject and subjectAltName."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        self.cert = self._sign(self.name, self.key.public_key(), ca=True)

    def _sign(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *, ca: bool,
              san: list[x509.GeneralName] | None = None) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
        return builder.sign(self.key, hashes.SHA256())

    def leaf(self, cn: str | None, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Open vSwitch")]
                            + ([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
        san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                                for i in ips]
        return key, self._sign(subject, key.public_key(), ca=False, san=san)

    def files(self, directory: Path, name: str, cn: str | None, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
        key, cert = self.leaf(cn, dns, ips)
        paths = directory / f"{name}.key", directory / f"{name}.crt", directory / "ca.crt"
        paths[0].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[2].write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return paths


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


def der(ca: Ca, cn: str | None, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> bytes:
    return ca.leaf(cn, dns, ips)[1].public_bytes(serialization.Encoding.DER)


# -- the rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("cn", "dns", "ips"), [
    ("h1", (), ()),  # the lab: CN only
    (f"h1 id:{OVS_PKI_ID}", (f"h1 id:{OVS_PKI_ID}",), ()),  # ovs-pki req+sign h1
    ("h1 id:2026 Nov 25 07:32:16", ("h1 id:2026 Nov 25 07:32:16",), ()),  # ovs-pki, no uuidgen
    ("whatever", ("H1",), ()),  # DNS names ignore case; the CN does not count beside a SAN
    (None, ("other.example", "h1"), ()),
    (None, (), ("198.51.100.11",)),  # the address NWC connects to
    ("h1-mgmt", (), ("198.51.100.21",)),  # its management_ip
    ("198.51.100.11", (), ()),  # an address as CN
])
def test_a_certificate_naming_the_host_is_its_servers(ca: Ca, cn: str | None,
                                                      dns: tuple[str, ...],
                                                      ips: tuple[str, ...]) -> None:
    assert H1.problem(der(ca, cn, dns, ips)) is None


@pytest.mark.parametrize(("cn", "dns", "ips"), [
    ("h2", (), ()),  # another host's
    (f"h2 id:{OVS_PKI_ID}", (f"h2 id:{OVS_PKI_ID}",), ()),
    (f"fabric id:{OVS_PKI_ID}", (f"fabric id:{OVS_PKI_ID}",), ()),  # a fabric switch's
    ("h1-ovsdb", (), ()),  # close is not equal
    (f"h10 id:{OVS_PKI_ID}", (), ()),
    ("xh1 id:h1", (), ()),
    ("h1", ("h2",), ()),  # a SAN is there: the CN is not looked at
    ("h1", (), ("198.51.100.12",)),
    (None, ("*",), ()),  # no wildcards
    (None, (), ()),  # names nobody
])
def test_a_certificate_naming_anyone_else_is_refused(ca: Ca, cn: str | None,
                                                    dns: tuple[str, ...],
                                                    ips: tuple[str, ...]) -> None:
    problem = H1.problem(der(ca, cn, dns, ips))
    assert problem is not None and "host h1" in problem
    assert "expected h1 or 198.51.100.11 or 198.51.100.21" in problem


def test_an_explicit_certificate_name_replaces_the_host_name(ca: Ca) -> None:
    named = ServerIdentity.of_host("h1", "ssl:198.51.100.11:6640",
                                   cert_name="ovsdb1.mgmt.example")
    assert named.problem(der(ca, None, ("OVSDB1.mgmt.example",))) is None
    assert named.problem(der(ca, "h1")) is not None
    assert "ovsdb_cert_name" in (named.problem(der(ca, "h2")) or "")


def test_the_problem_says_what_the_certificate_names(ca: Ca) -> None:
    problem = H1.problem(der(ca, "ignored", (f"fabric id:{OVS_PKI_ID}",), ("192.0.2.7",)))
    assert problem is not None
    assert f"DNS:fabric id:{OVS_PKI_ID}" in problem and "IP:192.0.2.7" in problem
    assert H1.problem(b"not a certificate") is not None


# -- the check in python-ovs's stream ---------------------------------------------------------

class TlsServer:
    """A TLS server on loopback requiring a client certificate; it answers a first JSON-RPC
    request with an empty result and records what each connection sent after the
    handshake."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(str(cert), str(key))
        self.context.load_verify_locations(str(ca))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.target = f"ssl:127.0.0.1:{self.listener.getsockname()[1]}"
        self.handshakes = 0
        self.ended = 0  # connections the server has seen end
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                    self.received.append(chunk)
                    try:
                        request = json.loads(data)
                    except ValueError:
                        continue
                    tls.sendall(json.dumps({"id": request["id"], "result": {},
                                            "error": None}).encode())
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.ended += 1

    def settled(self, connections: int = 1) -> None:
        """Wait until this many connections have ended (what they sent is all recorded)."""
        deadline = time.monotonic() + 5
        while self.ended < connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.ended >= connections

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.fixture
def tls(ca: Ca, tmp_path: Path) -> Iterator[tuple[Ca, Path]]:
    """This process as NWC: its client key and certificate, and the CA."""
    key, cert, ca_file = ca.files(tmp_path, "nwc", "nwc id:x")
    configure_ssl(ssl_files(key, cert, ca_file))
    yield ca, tmp_path
    configure_ssl(None)


@contextlib.contextmanager
def server(ca: Ca, directory: Path, cn: str, dns: tuple[str, ...] = ()) -> Iterator[TlsServer]:
    key, cert, ca_file = ca.files(directory, f"server-{cn.split()[0]}", cn, dns)
    srv = TlsServer(cert, key, ca_file)
    try:
        yield srv
    finally:
        srv.close()


def assert_got_nothing(srv: TlsServer) -> None:
    """One connection, handshaken and ended without a byte of OVSDB."""
    srv.settled()
    assert srv.handshakes == 1 and srv.received == []


@contextlib.contextmanager
def expecting(target: str, identity: ServerIdentity) -> Iterator[None]:
    ovsdbtls.expect([target], identity)
    try:
        yield
    finally:
        ovsdbtls.forget([target])


def test_the_right_servers_certificate_is_accepted(tls: tuple[Ca, Path]) -> None:
    ca, directory = tls
    with server(ca, directory, f"h1 id:{OVS_PKI_ID}", (f"h1 id:{OVS_PKI_ID}",)) as srv:
        with expecting(srv.target, ServerIdentity.of_host("h1", srv.target)):
            assert fetch_schema(srv.target, "Open_vSwitch", 5) == {}
        assert b"get_schema" in b"".join(srv.received)


def test_another_hosts_certificate_gets_no_byte(tls: tuple[Ca, Path]) -> None:
    ca, directory = tls
    with server(ca, directory, f"h2 id:{OVS_PKI_ID}", (f"h2 id:{OVS_PKI_ID}",)) as srv:
        with expecting(srv.target, ServerIdentity.of_host("h1", srv.target)), \
                pytest.raises(ServerIdentityError, match=r"h2 id:.*not host h1"):
            fetch_schema(srv.target, "Open_vSwitch", 5)
        assert_got_nothing(srv)


def test_a_server_nobody_expects_is_refused(tls: tuple[Ca, Path]) -> None:
    ca, directory = tls
    with server(ca, directory, "h1") as srv:
        with pytest.raises(ServerIdentityError, match="no identity is expected"):
            fetch_schema(srv.target, "Open_vSwitch", 5)
        assert_got_nothing(srv)


def test_an_idl_session_reconnecting_to_an_impostor_sends_nothing(
        tls: tuple[Ca, Path]) -> None:
    """The path of every IDL (re)connection: jsonrpc.Session opens a new stream each time."""
    ca, directory = tls
    with server(ca, directory, "fabric") as srv:
        with expecting(srv.target, ServerIdentity.of_host("h1", srv.target)):
            session = ovs.jsonrpc.Session.open(srv.target)
            try:
                deadline = time.monotonic() + 5
                while srv.handshakes < 2 and time.monotonic() < deadline:
                    session.run()
                    session.send(ovs.jsonrpc.Message.create_request("echo", []))
                    poller = ovs.poller.Poller()
                    session.wait(poller)
                    poller.timer_wait(50)
                    poller.block()
                assert srv.handshakes >= 1 and not session.is_connected()
                assert "CN=fabric" in (ovsdbtls.last_refusal(srv.target) or "")
            finally:
                session.close()
        srv.settled(srv.handshakes)
        assert srv.received == []


def test_hostdb_enters_its_identity_while_open_and_refuses_clearly(
        tls: tuple[Ca, Path]) -> None:
    ca, directory = tls
    with server(ca, directory, "h2") as srv:
        db = HostDb(srv.target, timeout=5,
                    server_identity=ServerIdentity.of_host("h1", srv.target))
        with pytest.raises(ServerIdentityError, match=r"CN=h2\) is not host h1's"):
            db.open()
        assert ovsdbtls._expected == {}  # a failed open leaves nothing expected behind
        assert_got_nothing(srv)


# -- the controller: identities from the topology, one log line per state ----------------------

def test_the_topology_names_each_hosts_server(shipped_policy: Policy) -> None:
    text = TWO_HOSTS.replace(
        "underlay_ip: 100.64.0.1}", "underlay_ip: 100.64.0.1, management_ip: 198.51.100.21, "
        "ovsdb: 'ssl:198.51.100.11:6640'}").replace(
        "underlay_ip: 100.64.0.2}", "underlay_ip: 100.64.0.2, ovsdb: 'ssl:h2.mgmt:6640', "
        "ovsdb_cert_name: ovsdb-h2.mgmt.example}")
    topo = parse_topology_text(text, shipped_policy)
    part = Tunnels(topology=topo, policy=lambda: shipped_policy,
                   ca=mock.Mock(), reports=mock.Mock(),
                   ovsdb_targets={h.name: h.ovsdb for h in topo.hosts.values() if h.ovsdb})
    h1 = part._open_hostdb("ssl:198.51.100.11:6640")
    assert h1.server_identity == H1
    h2 = part._open_hostdb("ssl:h2.mgmt:6640")
    assert h2.server_identity == ServerIdentity("host h2", frozenset({"ovsdb-h2.mgmt.example"}))
    with pytest.raises(ConfigError, match="no wildcards"):
        parse_topology_text(text.replace("ovsdb-h2.mgmt.example", "'*.mgmt.example'"),
                            shipped_policy)


def test_a_refused_server_is_logged_once_per_state(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[Exception | None] = []

    class Db:
        def open(self) -> Db:
            if outcomes[0] is not None:
                raise outcomes[0]
            return self

        def close(self) -> None:
            pass

        def external_ids(self, prefix: str = "nwc-") -> dict[str, str]:
            return {}

    link = _HostLink("h1", "ssl:198.51.100.11:6640", lambda _target: Db())
    refused = ServerIdentityError("the server's certificate (commonName CN=h2) is not h1's")

    def attempt(outcome: Exception | None) -> None:
        outcomes[:] = [outcome]
        link.retry_at = 0
        link.read()
        link._drop()

    with caplog.at_level(logging.DEBUG, logger="nwc.tunnels"):
        for outcome in (refused, refused, refused, None, refused, ConnectionError("down")):
            attempt(outcome)
    link.close().result(5)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in said] == [logging.ERROR, logging.INFO, logging.ERROR,
                                            logging.WARNING]
    assert "refusing the OVSDB server of h1" in said[0][1] and "CN=h2" in said[0][1]
    assert "reached again" in said[1][1]


def test_the_agent_expects_its_server_name_or_the_targets_address(ca: Ca) -> None:
    only_address = ServerIdentity.of_target("ssl:198.51.100.11:6640")
    assert only_address.problem(der(ca, None, (), ("198.51.100.11",))) is None
    assert "--ovsdb-server-name" in (only_address.problem(der(ca, "h1")) or "")
    named = ServerIdentity.of_target("ssl:198.51.100.11:6640", "h1")
    assert named.problem(der(ca, f"h1 id:{OVS_PKI_ID}")) is None
    assert named.problem(der(ca, "h2")) is not None
