"""NWC's CA and per-leg keys: created private, refusing what it must not sign, never printed."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from nwc.pki import (
    CertificateAuthority,
    CsrRejected,
    LegKey,
    PkiError,
    Secret,
    certificate_identity,
    new_psk,
)

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
IDENTITY = "h1.s0.wv-000001.nwc"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_created_private_and_reloaded_unchanged(tmp_path: Path) -> None:
    pki = tmp_path / "state" / "pki"
    ca = CertificateAuthority.load_or_create(pki, now=NOW)
    assert mode(pki) == 0o700
    assert {p.name: mode(p) for p in pki.iterdir()} == {"ca.key": 0o600, "ca.crt": 0o600}
    again = CertificateAuthority.load_or_create(pki, now=NOW + dt.timedelta(days=1))
    assert again.cert_pem == ca.cert_pem
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0


def test_a_ca_key_readable_by_others_is_refused_not_repaired(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    CertificateAuthority.load_or_create(pki, now=NOW)
    (pki / "ca.key").chmod(0o644)
    with pytest.raises(PkiError, match="compromised"):
        CertificateAuthority.load_or_create(pki)
    assert mode(pki / "ca.key") == 0o644


def test_a_half_present_ca_is_refused_rather_than_replaced(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    CertificateAuthority.load_or_create(pki, now=NOW)
    (pki / "ca.crt").unlink()
    with pytest.raises(PkiError, match="missing"):
        CertificateAuthority.load_or_create(pki)


def test_a_leg_csr_is_signed_for_its_identity_only(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=NOW)
    key = LegKey.generate(IDENTITY)
    pem = ca.sign_request(key.csr_pem(), IDENTITY, now=NOW,
                          not_after=NOW + dt.timedelta(hours=2))
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.issuer == ca.cert.subject
    ca.cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                ec.ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [IDENTITY]
    assert certificate_identity(pem) == IDENTITY
    assert cert.not_valid_after_utc == NOW + dt.timedelta(hours=2)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key.matches(pem)
    assert not LegKey.generate(IDENTITY).matches(pem)  # same name, other key


def test_leaf_lifetime_is_capped(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=NOW)
    pem = ca.sign_request(LegKey.generate(IDENTITY).csr_pem(), IDENTITY, now=NOW,
                          not_after=NOW + dt.timedelta(days=5000))
    assert x509.load_pem_x509_certificate(pem).not_valid_after_utc <= NOW + dt.timedelta(days=367)


def _csr(key: object, names: list[str], san: list[str] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]))
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("make, why", [
    (lambda: _csr(ec.generate_private_key(ec.SECP256R1()), ["h2.s0.wv-000001.nwc"]),
     "expected"),
    (lambda: _csr(ec.generate_private_key(ec.SECP256R1()), [IDENTITY],
                  [IDENTITY, "evil.example"]), "subjectAltName"),
    (lambda: _csr(rsa.generate_private_key(65537, 1024), [IDENTITY]), "too weak"),
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n", "not a PEM"),
])
def test_requests_nwc_must_not_sign_are_rejected(tmp_path: Path, make, why: str) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=NOW)
    with pytest.raises(CsrRejected, match=why):
        ca.sign_request(make(), IDENTITY, now=NOW, not_after=NOW + dt.timedelta(days=1))


def test_a_tampered_request_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=NOW)
    genuine = x509.load_pem_x509_csr(LegKey.generate(IDENTITY).csr_pem())
    der = bytearray(genuine.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected):
        ca.sign_request(tampered, IDENTITY, now=NOW, not_after=NOW + dt.timedelta(days=1))


def test_every_leg_gets_its_own_random_psk_that_never_prints() -> None:
    keys = [new_psk() for _ in range(50)]
    assert len({k.reveal() for k in keys}) == 50
    assert all(len(k.reveal()) == 32 for k in keys)
    psk = keys[0]
    for shown in (repr(psk), str(psk), f"{psk}", f"{[psk]}", f"{ {'psk': psk} }"):
        assert psk.to_text() not in shown and psk.reveal().hex() not in shown
        assert "redacted" in shown
    assert Secret.from_text(psk.to_text()) == psk
    assert Secret.from_text(keys[1].to_text()) != psk


def test_leg_private_key_leaves_only_as_a_secret() -> None:
    key = LegKey.generate(IDENTITY)
    der = key.private_der()
    assert isinstance(der, Secret) and "redacted" in repr(der)
    loaded = serialization.load_der_private_key(der.reveal(), password=None)
    assert loaded.public_key().public_numbers() == key.key.public_key().public_numbers()


def test_a_leaf_ends_no_later_than_its_ca(tmp_path: Path) -> None:
    # The CA is ten years old minus an hour: a two-hour leaf would outlive it.
    ca = CertificateAuthority.load_or_create(tmp_path / "pki",
                                             now=NOW - dt.timedelta(days=3650, hours=-1))
    pem = ca.sign_request(LegKey.generate(IDENTITY).csr_pem(), IDENTITY, now=NOW,
                          not_after=NOW + dt.timedelta(hours=2))
    assert x509.load_pem_x509_certificate(pem).not_valid_after_utc == ca.cert.not_valid_after_utc
    assert ca.cert.not_valid_after_utc == NOW + dt.timedelta(hours=1)
