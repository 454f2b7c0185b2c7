"""Key material for weave tunnels: NWC's certificate authority and per-leg pre-shared keys.

The CA lives only on the controller, in `<state-dir>/pki/` (directory 0700, files 0600), created
on first start. Hosts never see its private key: for an `x509` profile the host agent makes a
key pair of its own, publishes a certificate signing request (CSR) for the identity the
controller told it to use, and the controller signs it after checking that the CSR asks for
exactly that identity. The leaf's private key never leaves the host (the agent hands it to the
IKE daemon's memory over VICI). For a `psk` profile the controller draws a fresh random key
per leg; two weaves between the same two hosts never share one.

Secrets travel inside `Secret`, whose repr and str never show the value, so a secret that ends
up in a log line, an exception or an f-string shows as `Secret(<redacted>)`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

PSK_BYTES = 32  # 256 bits: as strong as the strongest cipher a profile may pick
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
# A leaf need not outlive 366 days: a weave lives at most policy.MAX_LEASE_S from its creation
# (extensions included: admission.life_ends_at), and a leaf is only ever used by one leg of
# one weave.
MAX_LEAF_DAYS = 367
CLOCK_SKEW = dt.timedelta(minutes=5)  # hosts' clocks may trail the controller's


class Secret:
    """Bytes that must not be printed. `reveal()` is the one way to get them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError("a Secret holds bytes")
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def to_text(self) -> str:
        """Base64, for carrying the secret inside a JSON record."""
        return base64.b64encode(self._value).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> Secret:
        return cls(base64.b64decode(text.encode("ascii"), validate=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def new_psk() -> Secret:
    """A fresh pre-shared key for one leg of one weave."""
    return Secret(secrets.token_bytes(PSK_BYTES))


class PkiError(Exception):
    """The CA cannot be used as it is on disk (never silently replaced)."""


class CsrRejected(ValueError):
    """A certificate signing request that NWC will not sign."""


class CaExpired(CsrRejected):
    """NWC's weave CA is past its end: it signs no request, however good."""


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, pki_dir: Path, *, now: dt.datetime | None = None,
                       name: str = "NWC weave CA") -> CertificateAuthority:
        """The CA in `pki_dir`, created there (0700 dir, 0600 files) if it does not exist.
        A CA whose key is readable by anyone but its owner is refused, not repaired: it has to
        be assumed stolen."""
        pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(pki_dir, 0o700)
        key_path, cert_path = pki_dir / CA_KEY_FILE, pki_dir / CA_CERT_FILE
        if key_path.exists() or cert_path.exists():
            return cls._load(key_path, cert_path)
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NWC"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW)
                .not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(cert_sign=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # Certificate first, key last: a crash in between leaves a CA that _load refuses
        # loudly instead of a key without its certificate being replaced by a new CA.
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        write_private(key_path, key_pem)
        log.info("created the NWC certificate authority in %s", pki_dir)
        return cls(key, cert)

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        for path in (key_path, cert_path):
            if not path.exists():
                raise PkiError(f"{path} is missing while {key_path.parent} holds a CA; "
                               "restore it from backup or move the directory away to start "
                               "a new CA (every x509 weave then needs re-issuing)")
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise PkiError(f"{key_path} is readable by others (mode {mode:04o}); the CA key "
                           f"must be treated as compromised. Move {key_path.parent} away to "
                           "start a new CA")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path} is not an EC private key")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise PkiError(f"{cert_path} does not belong to {key_path}")
        return cls(key, cert)

    def sign_request(self, csr_pem: bytes, identity: str, *, now: dt.datetime,
                     not_after: dt.datetime) -> bytes:
        """Sign a host's CSR for `identity` (a DNS-style name NWC chose for one leg end).
        The CSR comes from a host and is checked, not trusted: its signature, that it asks
        for `identity` and nothing else, and that its key is strong enough."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRejected(f"not a PEM certificate signing request: {exc}") from exc
        try:
            valid = csr.is_signature_valid
        except InvalidSignature:
            valid = False
        if not valid:
            raise CsrRejected("the request's signature does not verify")
        names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [identity]:
            raise CsrRejected(f"the request asks for {names or 'no name'}, expected {identity}")
        with contextlib.suppress(x509.ExtensionNotFound):
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            if san.value.get_values_for_type(x509.DNSName) != [identity] or len(san.value) != 1:
                raise CsrRejected("the request's subjectAltName asks for more than "
                                  f"{identity}")
        public = csr.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if public.curve.key_size < 256:
                raise CsrRejected(f"{public.curve.name} is too weak")
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise CsrRejected(f"RSA-{public.key_size} is too weak")
        elif not isinstance(public, ed25519.Ed25519PublicKey):
            raise CsrRejected(f"unsupported key type {type(public).__name__}")
        # A leaf is worth nothing past its issuer's end (peers refuse the chain), so it ends
        # no later; an expired CA signs nothing (the weave fails with this reason).
        ca_end = self.cert.not_valid_after_utc
        if ca_end <= now:
            raise CaExpired(f"NWC's weave CA expired at {ca_end:%Y-%m-%d %H:%M:%S} UTC: move "
                            "<state-dir>/pki away and restart NWC to make a new one")
        not_after = min(not_after, now + dt.timedelta(days=MAX_LEAF_DAYS), ca_end)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
                .issuer_name(self.cert.subject).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(cert_sign=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the first byte on (never briefly world-readable),
    durably, replacing any file of that name in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- the host side ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LegKey:
    """A host's key pair for one leg end; the private half only ever goes to the local IKE
    daemon (as DER, inside a Secret)."""

    key: ec.EllipticCurvePrivateKey
    identity: str

    @classmethod
    def generate(cls, identity: str) -> LegKey:
        return cls(ec.generate_private_key(ec.SECP256R1()), identity)

    def csr_pem(self) -> bytes:
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.identity)]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(self.identity)]),
                              critical=False)
               .sign(self.key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM)

    def private_der(self) -> Secret:
        return Secret(self.key.private_bytes(serialization.Encoding.DER,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))

    def private_pem(self) -> Secret:
        return Secret(self.key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))

    def matches(self, cert_pem: bytes) -> bool:
        """Whether a certificate the controller sent is for this key and identity."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return False
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return (public.public_numbers() == self.key.public_key().public_numbers()
                and names == [self.identity])


def certificate_identity(cert_pem: bytes) -> str | None:
    """The common name of a PEM certificate (None if it is not one)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
