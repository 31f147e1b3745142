"""Enrollment files: everything a device, a cloud worker or the operator's tools need to join the
fleet's broker, in one TOML file (format 1)::

    format = 1
    kind = "device"                       # "device" | "worker" | "admin"
    id = "cam-01"                         # MQTT username, client id and certificate CN
    fleet = "acme"
    profile = "jetson-orin-nano-8gb"      # devices only
    group = "lobby"                       # devices only, optional
    issued_at = "2025-01-01T00:00:00Z"

    [mqtt]
    urls = ["mqtts://broker.example:8883"]           # TLS + client certificate, in order
    password_urls = ["mqtts://broker.example:8884"]  # TLS + username/password, in order
    username = "cam-01"
    password = "…"

    [tls]
    ca = '''-----BEGIN CERTIFICATE-----…'''          # the fleet CA (verifies the broker)
    cert = '''-----BEGIN CERTIFICATE-----…'''        # this client's certificate
    key = '''-----BEGIN PRIVATE KEY-----…'''         # and its private key

    [bundles]
    public_key = '''-----BEGIN PUBLIC KEY-----…'''   # ed25519: bundles must verify with it

``mqtts://`` is TLS (default port 8883), ``mqtt://`` plain TCP (default port 1883). The file is a
secret (mode 0600): it holds the password and the private key.

:func:`load_enrollment` reads and checks one; :meth:`Enrollment.transport_config` turns it into
a :class:`~tandem.protocol.TransportConfig` (writing the PEMs where ``ssl`` can read them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tandem.devices.fleet import _toml
from tandem.devices.fleet._ids import check_name
from tandem.protocol.errors import InvalidArgument, TandemError

__all__ = ["ENROLLMENT_FORMAT", "KINDS", "Enrollment", "load_enrollment", "parse_broker_url"]

ENROLLMENT_FORMAT = 1
KINDS = ("device", "worker", "admin")
_SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """``(tls, host, port)`` of ``mqtt://host[:port]`` or ``mqtts://host[:port]``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad broker URL {url!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise InvalidArgument(f"bad broker URL {url!r}: the scheme must be mqtt or mqtts")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise InvalidArgument(f"bad broker URL {url!r}: expected mqtt[s]://host[:port]")
    tls, default_port = _SCHEMES[parts.scheme]
    return tls, parts.hostname, port or default_port


@dataclass(frozen=True)
class Enrollment:
    """One enrollment file, checked. PEM fields are text."""

    kind: str
    id: str
    fleet: str
    urls: tuple[str, ...]
    password_urls: tuple[str, ...]
    username: str
    password: str
    ca_pem: str
    cert_pem: str
    key_pem: str
    bundle_public_key_pem: str
    profile: str = ""
    group: str = ""
    issued_at: str = ""

    def to_toml(self) -> str:
        doc: dict[str, Any] = {
            "format": ENROLLMENT_FORMAT,
            "kind": self.kind,
            "id": self.id,
            "fleet": self.fleet,
            "profile": self.profile or None,
            "group": self.group or None,
            "issued_at": self.issued_at or None,
            "mqtt": {"urls": list(self.urls), "password_urls": list(self.password_urls),
                     "username": self.username, "password": self.password},
            "tls": {"ca": self.ca_pem, "cert": self.cert_pem, "key": self.key_pem},
            "bundles": {"public_key": self.bundle_public_key_pem},
        }
        header = (f"Tandem enrollment: {self.kind} {self.id!r} of fleet {self.fleet!r}.\n"
                  "SECRET: this file holds a password and a private key. Install it on the\n"
                  "machine it names (tandem edge run --enroll FILE, tandem cloud serve --enroll "
                  "FILE)\nand delete this copy.")
        return _toml.dumps(doc, header=header)

    def transport_config(self, secrets_dir: Path | str, *, auth: str = "certificate",
                         url_index: int = 0, **overrides: Any):
        """A :class:`~tandem.protocol.TransportConfig` for the broker at ``url_index`` of
        ``urls`` (``auth="certificate"``) or ``password_urls`` (``auth="password"``).

        The CA, certificate and key are written into ``secrets_dir`` (created 0700, files 0600)
        for ``ssl`` to read. ``overrides`` go to TransportConfig (e.g. ``will=``)."""
        from tandem.protocol import TlsConfig, TransportConfig

        if auth not in ("certificate", "password"):
            raise InvalidArgument(f"auth must be 'certificate' or 'password', not {auth!r}")
        urls = self.urls if auth == "certificate" else self.password_urls
        if not urls:
            raise InvalidArgument(f"enrollment {self.id!r} has no {auth} broker URL")
        if not 0 <= url_index < len(urls):
            raise InvalidArgument(f"url_index {url_index} out of range (0..{len(urls) - 1})")
        tls, host, port = parse_broker_url(urls[url_index])
        tls_config = None
        if tls:
            directory = Path(secrets_dir)
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            ca = _write_secret(directory / f"{self.id}.ca.pem", self.ca_pem)
            cert = key = None
            if auth == "certificate":
                cert = _write_secret(directory / f"{self.id}.cert.pem", self.cert_pem)
                key = _write_secret(directory / f"{self.id}.key.pem", self.key_pem)
            tls_config = TlsConfig(ca_file=str(ca), cert_file=cert and str(cert),
                                   key_file=key and str(key))
        elif auth == "certificate":
            raise InvalidArgument(f"{urls[url_index]}: a client certificate needs mqtts://")
        options: dict[str, Any] = {"host": host, "port": port, "client_id": self.id,
                                   "tls": tls_config}
        if auth == "password":
            options.update(username=self.username, password=self.password)
        options.update(overrides)
        return TransportConfig(**options)


def _write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def _get(doc: Mapping[str, Any], key: str, kind: type, where: str, *, required: bool = True,
         default: Any = None) -> Any:
    if key not in doc:
        if required:
            raise InvalidArgument(f"{where}: missing {key!r}")
        return default
    value = doc[key]
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{where}: {key!r} must be a list of strings")
        return tuple(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise InvalidArgument(f"{where}: {key!r} must be a {kind.__name__}")
    return value


def _pem(doc: Mapping[str, Any], key: str, marker: str, where: str) -> str:
    text = _get(doc, key, str, where)
    if f"-----BEGIN {marker}" not in text:
        raise InvalidArgument(f"{where}: {key!r} is not a PEM {marker.lower()}")
    return text


def enrollment_from_mapping(doc: Mapping[str, Any], where: str) -> Enrollment:
    fmt = _get(doc, "format", int, where)
    if fmt != ENROLLMENT_FORMAT:
        raise InvalidArgument(f"{where}: enrollment format {fmt} is not supported "
                              f"(this Tandem reads {ENROLLMENT_FORMAT})")
    kind = _get(doc, "kind", str, where)
    if kind not in KINDS:
        raise InvalidArgument(f"{where}: kind must be one of {', '.join(KINDS)}")
    try:
        ident = check_name(_get(doc, "id", str, where), f"{kind} id")
    except TandemError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    mqtt = _get(doc, "mqtt", dict, where)
    tls = _get(doc, "tls", dict, where)
    bundles = _get(doc, "bundles", dict, where)
    urls = _get(mqtt, "urls", list, f"{where} [mqtt]", required=False, default=())
    password_urls = _get(mqtt, "password_urls", list, f"{where} [mqtt]", required=False,
                         default=())
    if not urls and not password_urls:
        raise InvalidArgument(f"{where}: [mqtt] names no broker URL")
    for url in urls + password_urls:
        try:
            parse_broker_url(url)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
    return Enrollment(
        kind=kind,
        id=ident,
        fleet=_get(doc, "fleet", str, where),
        profile=_get(doc, "profile", str, where, required=False, default=""),
        group=_get(doc, "group", str, where, required=False, default=""),
        issued_at=_get(doc, "issued_at", str, where, required=False, default=""),
        urls=urls,
        password_urls=password_urls,
        username=_get(mqtt, "username", str, f"{where} [mqtt]"),
        password=_get(mqtt, "password", str, f"{where} [mqtt]"),
        ca_pem=_pem(tls, "ca", "CERTIFICATE", f"{where} [tls]"),
        cert_pem=_pem(tls, "cert", "CERTIFICATE", f"{where} [tls]"),
        key_pem=_pem(tls, "key", "PRIVATE KEY", f"{where} [tls]"),
        bundle_public_key_pem=_pem(bundles, "public_key", "PUBLIC KEY", f"{where} [bundles]"),
    )


def load_enrollment(path: Path | str) -> Enrollment:
    """Read and check an enrollment file; a bad one raises InvalidArgument naming it."""
    path = Path(path)
    return enrollment_from_mapping(_toml.read(path, what="enrollment file"),
                                   f"enrollment file {path}")
