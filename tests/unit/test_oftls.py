"""nwc.oftls.TlsSocket: one TLS connection read by one thread and written by another at the
same time (as os-ken does), over a socketpair, against Python's own TLS client."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nwc.oftls import TlsConfigError, TlsFiles, TlsSocket

pytestmark = pytest.mark.unit


def _pki(directory: Path) -> dict[str, Path]:
    """A CA and two leaf certificates (controller, switch), as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])

    def sign(name: x509.Name, public_key: object, ca: bool) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))

    files = {"ca": directory / "ca.crt"}
    files["ca"].write_bytes(sign(ca_name, ca_key.public_key(), True).public_bytes(
        serialization.Encoding.PEM))
    for who in ("ctl", "sw"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who)]),
                    key.public_key(), False)
        files[f"{who}.key"] = directory / f"{who}.key"
        files[f"{who}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        files[f"{who}.crt"] = directory / f"{who}.crt"
        files[f"{who}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def test_concurrent_reads_and_writes_carry_every_byte_in_order(tmp_path: Path) -> None:
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
    client_box: dict[str, ssl.SSLSocket] = {}
    connecting = threading.Thread(target=lambda: client_box.update(
        tls=client_context.wrap_socket(client_raw)))
    connecting.start()
    server.handshake(timeout_s=20)
    connecting.join(20)
    client = client_box["tls"]
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
