"""Throwaway certificate authorities for labs and tests: the management plane of a lab
(OpenFlow to the switches, OVSDB to the hosts) runs over TLS like production's should, with
certificates made fresh for each lab. Files are PEM, 0600, in the lab's own directory.

Not NWC's weave CA (`nwc.pki`), which issues IKE certificates to hosts: a management CA must
sign only management identities, or a host could pass its IKE certificate off as a switch.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nwc.pki import write_private

VALIDITY = datetime.timedelta(days=2)
OVS_OPTIONS = ("--private-key", "--certificate", "--ca-cert")


@dataclass(frozen=True)
class TlsFilePaths:
    """What a TLS endpoint needs: its key, its certificate, and the CA its peers chain to."""

    private_key: Path
    certificate: Path
    ca_certificate: Path

    def as_tuple(self) -> tuple[Path, Path, Path]:
        return self.private_key, self.certificate, self.ca_certificate

    def options(self, names: tuple[str, str, str] = OVS_OPTIONS) -> list[str]:
        """Command-line options naming the three files (OVS daemons' names by default)."""
        return [f"{name}={path}" for name, path in zip(names, self.as_tuple(), strict=True)]


class LabCa:
    """A CA whose key lives only in this process; it writes its certificate and the leaf
    keys and certificates it issues into `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = _name(name)
        self.certificate = self._write(f"{name}.crt", self._sign(
            self._subject, self._key.public_key(), ca=True).public_bytes(
                serialization.Encoding.PEM))

    def issue(self, common_name: str, addresses: tuple[str, ...] = ()) -> TlsFilePaths:
        """A leaf key and certificate; `addresses` become IP subject alternative names (for
        clients that check the server's address, such as https)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(_name(common_name), key.public_key(), ca=False, addresses=addresses)
        key_path = self._write(f"{common_name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_path = self._write(f"{common_name}.crt",
                                cert.public_bytes(serialization.Encoding.PEM))
        return TlsFilePaths(key_path, cert_path, self.certificate)

    def _sign(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *,
              ca: bool, addresses: tuple[str, ...] = ()) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self._subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if addresses:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        write_private(path, data)
        return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
