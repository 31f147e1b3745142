"""The fleet's certificate authority, the broker's server certificate, per-client certificates
and the certificate revocation list, with the ``cryptography`` package (imported on use).

Keys are ECDSA P-256 (what every TLS stack, mosquitto's OpenSSL and Python's ``ssl`` included,
accepts), written as unencrypted PKCS#8 PEM; the files holding them are 0600. A client
certificate's subject CN is the client's name: the TLS listener maps it to the MQTT username
(``use_identity_as_username``), so the broker's ACL applies to it as to a password login.

cryptography's exceptions end here: unreadable key or certificate material raises
:class:`InvalidArgument` naming the file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.protocol.errors import InvalidArgument
from tandem.protocol.lazy import require

__all__ = [
    "CA_DAYS",
    "CLIENT_DAYS",
    "CRL_DAYS",
    "Authority",
    "Issued",
    "load_authority",
    "new_authority",
]

CA_DAYS = 3650
CLIENT_DAYS = 825
SERVER_DAYS = 825
CRL_DAYS = 365
_BACKDATE = dt.timedelta(minutes=5)  # clock skew between the operator and the devices


def _x509():
    return require("cryptography.x509")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _name(cn: str, org: str) -> Any:
    x509 = _x509()
    oid = x509.oid.NameOID
    return x509.Name([x509.NameAttribute(oid.ORGANIZATION_NAME, org),
                      x509.NameAttribute(oid.COMMON_NAME, cn)])


def _new_key() -> Any:
    ec = require("cryptography.hazmat.primitives.asymmetric.ec")
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    ser = require("cryptography.hazmat.primitives.serialization")
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _cert_pem(cert: Any) -> bytes:
    ser = require("cryptography.hazmat.primitives.serialization")
    return cert.public_bytes(ser.Encoding.PEM)


def _sha256() -> Any:
    return require("cryptography.hazmat.primitives.hashes").SHA256()


@dataclass(frozen=True)
class Issued:
    """A freshly issued certificate: PEMs, its serial (hex) and expiry (ms since the epoch)."""

    key_pem: bytes
    cert_pem: bytes
    serial: str
    not_after_ms: int


class Authority:
    """The fleet CA: issues server and client certificates and signs the CRL."""

    def __init__(self, key: Any, cert: Any) -> None:
        self._key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self._key)

    @property
    def organization(self) -> str:
        x509 = _x509()
        attrs = self.cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
        return str(attrs[0].value) if attrs else "Tandem fleet"

    def _leaf(self, cn: str, *, days: int, server_names: Sequence[str] = ()) -> Issued:
        x509 = _x509()
        key = _new_key()
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = (x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server_names
                 else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, self.organization))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(n) for n in server_names]), critical=False)
        cert = builder.sign(self._key, _sha256())
        return Issued(_key_pem(key), _cert_pem(cert), format(cert.serial_number, "x"),
                      int(not_after.timestamp() * 1000))

    def issue_client(self, name: str, *, days: int = CLIENT_DAYS) -> Issued:
        """A client certificate whose CN is ``name`` (TLS client authentication only)."""
        return self._leaf(name, days=days)

    def issue_server(self, names: Sequence[str], *, days: int = SERVER_DAYS) -> Issued:
        """The broker's certificate for ``names`` (host names and IP addresses)."""
        if not names:
            raise InvalidArgument("the broker certificate needs at least one host name")
        return self._leaf(names[0], days=days, server_names=names)

    def crl(self, revoked: Iterable[tuple[str, int]], *, days: int = CRL_DAYS) -> bytes:
        """The CRL (PEM) listing ``(serial hex, revoked at ms)``; valid for ``days``."""
        x509 = _x509()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        for serial, at_ms in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromtimestamp(at_ms / 1000, dt.timezone.utc))
                .build())
        return _cert_pem(builder.sign(self._key, _sha256()))


def _san(name: str) -> Any:
    x509 = _x509()
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def new_authority(fleet_name: str, *, days: int = CA_DAYS) -> Authority:
    """A fresh self-signed CA for the fleet ``fleet_name``."""
    x509 = _x509()
    key = _new_key()
    now = _now()
    subject = _name(f"Tandem fleet {fleet_name} CA", f"Tandem fleet {fleet_name}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, _sha256())
    )
    return Authority(key, cert)


def load_authority(key_file: Path, cert_file: Path) -> Authority:
    """The CA from its PEM files; unreadable material raises InvalidArgument."""
    x509 = _x509()
    ser = require("cryptography.hazmat.primitives.serialization")
    try:
        key = ser.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except OSError as exc:
        raise InvalidArgument(f"cannot read the CA key {key_file}: {exc.strerror or exc}") \
            from exc
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{key_file} is not a readable PEM private key") from exc
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except OSError as exc:
        raise InvalidArgument(f"cannot read the CA certificate {cert_file}: "
                              f"{exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidArgument(f"{cert_file} is not a readable PEM certificate") from exc
    return Authority(key, cert)
