"""The OVSDB client's limits, against plain sockets on loopback (no ovsdb-server): opening a
host's OVSDB ends with an error when the other end never answers or is not there; ssl:
targets need keys (refused clearly without), tcp: ones are said to be in clear."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from nwc.cli import EXIT_ERROR, main
from nwc.hostdb import HostDb, OvsdbConfigError, SslFiles, configure_ssl, ssl_files
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.pki import CertificateAuthority, LegKey
from nwc.policy import Policy
from nwc.run import StartRefused, add_run_options, apply_config_file
from nwc.topology import parse_topology_text
from nwc.tunnels import serve

pytestmark = pytest.mark.unit


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that never accepts nor answers; the kernel completes the handshake from
    its backlog, so a client sees an open connection that stays silent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def open_in_thread(db: HostDb) -> BaseException | None:
    """Open on a thread, so code that would wait for ever fails this test instead of
    hanging it (the join is a watchdog far beyond the open deadline, not a measurement)."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            db.open()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    assert outcome, "opening the OVSDB never ended"
    return outcome[0]


def test_a_server_that_accepts_and_never_answers_is_given_up(silent_server: str) -> None:
    error = open_in_thread(HostDb(silent_server, timeout=0.3))
    assert isinstance(error, ConnectionError) and "no answer" in str(error)


def test_a_tls_handshake_that_never_comes_is_given_up(silent_server: str,
                                                     tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    key = LegKey.generate("controller.nwc.test")
    now = dt.datetime.now(dt.UTC)
    files = {"key.pem": key.private_pem().reveal(), "ca.pem": ca.cert_pem,
             "cert.pem": ca.sign_request(key.csr_pem(), key.identity, now=now,
                                         not_after=now + dt.timedelta(days=1))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    configure_ssl(ssl_files(tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"))
    try:
        error = open_in_thread(HostDb(silent_server.replace("tcp:", "ssl:"), timeout=0.3))
    finally:
        configure_ssl(None)
    assert isinstance(error, ConnectionError) and "no connection within" in str(error)


def test_a_port_nobody_listens_on_is_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    error = open_in_thread(HostDb(f"tcp:127.0.0.1:{port}", timeout=5))
    assert isinstance(error, ConnectionError) and "refused" in str(error).lower()


@pytest.fixture
def no_ssl() -> Iterator[None]:
    """python-ovs keeps its TLS files process-wide: each test starts and ends without any."""
    configure_ssl(None)
    yield
    configure_ssl(None)


def test_an_ssl_target_without_keys_is_refused_clearly(no_ssl: None) -> None:
    with pytest.raises(OvsdbConfigError, match="--ovsdb-ssl-key"):
        HostDb("ssl:192.0.2.1:6640").open()  # refused before any connection is tried


def test_a_tcp_target_is_said_to_be_in_clear_once(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    for _ in range(3):
        with pytest.raises(ConnectionError):
            HostDb(target, timeout=5).open()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "pre-shared keys" in r.getMessage() and target in r.getMessage()]
    assert len(warnings) == 1


def test_the_ssl_options_go_together_and_must_be_readable(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    assert ssl_files(None, None, None) is None
    with pytest.raises(OvsdbConfigError, match="--ovsdb-ssl-ca missing"):
        ssl_files(pem, pem, None)
    with pytest.raises(OvsdbConfigError, match="--ovsdb-ssl-cert"):
        ssl_files(pem, tmp_path / "nothing.pem", pem)
    assert ssl_files(pem, pem, pem) == SslFiles(pem, pem, pem)


def test_nwc_agent_refuses_an_ssl_ovsdb_without_keys(
        no_ssl: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["agent", "--ovsdb", "ssl:192.0.2.1:6640", "--underlay-dev", "eth1"])
    assert code == EXIT_ERROR
    assert "--ovsdb-ssl-key" in capsys.readouterr().err


def test_nwc_run_takes_the_ssl_options_from_its_config_file(tmp_path: Path) -> None:
    ini = tmp_path / "nwc.ini"
    ini.write_text("[nwc]\novsdb-ssl-key = /etc/nwc/key.pem\novsdb-ssl-cert = /etc/nwc/c.pem\n"
                   "ovsdb-ssl-ca = /etc/nwc/ca.pem\n")
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    args = parser.parse_args(["--config-file", str(ini), "--ovsdb-ssl-ca", "/srv/ca.pem"])
    apply_config_file(args, parser)
    assert (args.ovsdb_ssl_key, args.ovsdb_ssl_cert, args.ovsdb_ssl_ca) == (
        "/etc/nwc/key.pem", "/etc/nwc/c.pem", "/srv/ca.pem")  # the command line wins


def test_nwc_run_refuses_ssl_hosts_without_keys(no_ssl: None, shipped_policy: Policy) -> None:
    topo = parse_topology_text(TWO_HOSTS.replace(
        "underlay_ip: 100.64.0.1}", "underlay_ip: 100.64.0.1, ovsdb: 'ssl:192.0.2.1:6640'}"),
        shipped_policy)
    controller = SimpleNamespace(config=SimpleNamespace(topology=topo))
    options = argparse.Namespace(ovsdb_ssl_key=None, ovsdb_ssl_cert=None, ovsdb_ssl_ca=None)
    with pytest.raises(StartRefused, match=r"ssl:192\.0\.2\.1:6640.*--ovsdb-ssl-key"):
        serve(controller, options)
