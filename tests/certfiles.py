"""Short-lived certificates made in the test, for the expiry checks: self-signed, P-256, with
exactly the validity window the test asks for (relative to its fake clock)."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def key_pem() -> bytes:
    """A private key (PEM), to check that it is never read out or shown."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def certificate_and_key_pem(common_name: str, not_before: dt.datetime,
                            not_after: dt.datetime, serial: int | None = None,
                            dns_name: str | None = None) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) and its private key (PEM), e.g. for a TLS listener."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(serial if serial is not None else x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    if dns_name:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def certificate_pem(common_name: str, not_before: dt.datetime, not_after: dt.datetime,
                    serial: int | None = None) -> bytes:
    return certificate_and_key_pem(common_name, not_before, not_after, serial)[0]


def valid_for(common_name: str, now: dt.datetime, days: float,
              serial: int | None = None) -> bytes:
    """A certificate that ends `days` after `now` (negative: ended that long ago), valid
    from a day before `now` or before its end, whichever is earlier."""
    not_after = now + dt.timedelta(days=days)
    return certificate_pem(common_name, min(now, not_after) - dt.timedelta(days=1), not_after,
                           serial)


def named_der(common_name: str | None, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = ()) -> bytes:
    """A certificate (DER) carrying these names, for the name rule (which reads names only,
    after the CA check): a commonName, subjectAltName DNS names and IP addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
                     if common_name else [])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=1)))
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                             for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
