"""nwc.oftls.TlsSocket: one TLS connection read by one thread and written by another at the
same time (as os-ken does), over a socketpair, against Python's own TLS client."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from nwc.lab.labpki import LabCa
from nwc.oftls import TlsConfigError, TlsFiles, TlsSocket

pytestmark = pytest.mark.unit


def _pki(directory: Path) -> dict[str, Path]:
    """A CA and two leaf certificates (controller, switch), as PEM files."""
    ca = LabCa(directory, "ca")
    ctl, sw = ca.issue("ctl"), ca.issue("sw")
    return {"ca": ca.certificate, "ctl.key": ctl.private_key, "ctl.crt": ctl.certificate,
            "sw.key": sw.private_key, "sw.crt": sw.certificate}


def _connected(tmp_path: Path) -> tuple[TlsSocket, ssl.SSLSocket]:
    """A TlsSocket (NWC's side) and Python's TLS client (the switch, with its certificate),
    handshaken over a socketpair."""
    pki = _pki(tmp_path)
    server_context = TlsFiles(pki["ctl.key"], pki["ctl.crt"], pki["ca"]).server_context()
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.load_verify_locations(str(pki["ca"]))
    client_context.load_cert_chain(str(pki["sw.crt"]), str(pki["sw.key"]))
    server_raw, client_raw = socket.socketpair()
    server_raw.settimeout(20)
    client_raw.settimeout(20)
    server = TlsSocket(server_raw, server_context)
    box: dict[str, ssl.SSLSocket] = {}
    connecting = threading.Thread(target=lambda: box.update(
        tls=client_context.wrap_socket(client_raw)))
    connecting.start()
    server.handshake(timeout_s=20)
    connecting.join(20)
    return server, box["tls"]


def test_concurrent_reads_and_writes_carry_every_byte_in_order(tmp_path: Path) -> None:
    server, client = _connected(tmp_path)
    assert server.peer_certificate()["subject"] == ((("commonName", "sw"),),)

    messages = [bytes([i % 251]) * (1 + (i * 37) % 3000) for i in range(400)]
    expected = b"".join(messages)
    got_by_server = bytearray()
    got_by_client = bytearray()

    def server_reader() -> None:
        while len(got_by_server) < len(expected):
            data = server.recv(65536)
            if not data:
                return
            got_by_server.extend(data)

    def server_writer() -> None:
        for message in messages:
            server.sendall(message)

    def client_side() -> None:  # the switch: writes everything, then reads what came back
        client.sendall(expected)
        while len(got_by_client) < len(expected):
            data = client.recv(65536)
            if not data:
                return
            got_by_client.extend(data)

    threads = [threading.Thread(target=f) for f in (server_reader, server_writer, client_side)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert bytes(got_by_server) == expected
    assert bytes(got_by_client) == expected
    # Nothing that could move bytes around TLS is reachable through the wrapper.
    for name in ("makefile", "recv_into", "sendmsg", "sendfile"):
        assert not hasattr(server, name)
    client.close()
    server.close()


def test_a_bad_file_is_a_clear_configuration_error(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    with pytest.raises(TlsConfigError, match="OpenFlow TLS files"):
        TlsFiles(pki["ctl.key"], pki["sw.crt"], pki["ca"]).server_context()  # key mismatch


def test_a_corrupted_record_ends_the_stream_instead_of_raising(tmp_path: Path) -> None:
    """os-ken treats an SSLError from recv as a timeout and reads again: a broken stream
    must end (b"") rather than raise on every read."""
    server, client = _connected(tmp_path)
    # An application-data record header followed by garbage: it cannot decrypt.
    os.write(client.fileno(), bytes([23, 3, 3, 0, 40]) + bytes(40))  # past TLS
    assert server.recv(100) == b""
    client.close()
    server.close()


def test_the_handshake_timeout_covers_the_whole_handshake(tmp_path: Path) -> None:
    """A peer dripping a ClientHello one byte at a time, each well within the timeout, is cut
    off once the handshake as a whole has taken the timeout (it used to reset per read)."""
    pki = _pki(tmp_path)
    context = TlsFiles(pki["ctl.key"], pki["ctl.crt"], pki["ca"]).server_context()
    server_raw, client_raw = socket.socketpair()
    server = TlsSocket(server_raw, context)
    outcome: dict[str, object] = {}

    def handshake() -> None:
        started = time.monotonic()
        try:
            server.handshake(timeout_s=0.5)
        except Exception as exc:  # the test inspects whatever it raised
            outcome["error"] = exc
        outcome["took_s"] = time.monotonic() - started

    handshaking = threading.Thread(target=handshake, daemon=True)
    handshaking.start()
    client_hello_start = b"\x16\x03\x01\x02\x00" + b"\x01" * 200  # 512 bytes announced
    dripping_until = time.monotonic() + 3.0
    for byte in client_hello_start:
        if not handshaking.is_alive() or time.monotonic() > dripping_until:
            break
        client_raw.send(bytes([byte]))
        time.sleep(0.1)
    handshaking.join(5)
    assert isinstance(outcome.get("error"), TimeoutError)
    assert outcome["took_s"] < 1.5
    assert server_raw.gettimeout() is None  # the socket's own timeout is put back
    client_raw.close()
    server.close()
