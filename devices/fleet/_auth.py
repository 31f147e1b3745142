"""Mosquitto's own auth files: the password file, the ACL file and the listener configuration.

**Password hashes** are what mosquitto 2.0's ``mosquitto_passwd`` writes: PBKDF2-HMAC-SHA512,
101 iterations, a 12-byte random salt, as ``$7$<iterations>$<base64 salt>$<base64 hash>``
(standard base64 with padding). Mosquitto parses the iteration count from the hash. Tandem's
passwords are 192 random bits, so the low iteration count mosquitto chose (every CONNECT pays for
it on a single-threaded broker) costs nothing in strength.

**ACLs** (one ``user`` block per client, topics from :mod:`tandem.protocol.topics`)::

    device D   write tandem/v1/req/D/+        its own requests
               write tandem/v1/status/D       its heartbeat (and last will)
               read  tandem/v1/resp/D         its own replies
               read  tandem/v1/assign/D       its assignment
               read  tandem/v1/cloud/+/load   the workers' load reports (for its planner)
    worker W   read  tandem/v1/req/+/+        every device's requests ($share/<group>/… too)
               write tandem/v1/req/_probe/_probe  the probe of serve's shared-subscription check
               write tandem/v1/resp/+         replies
               write tandem/v1/cloud/W/load   its own load report
    admin      write tandem/v1/assign/+, readwrite tandem/v1/status/+ (to clear a removed
               device's), read tandem/v1/cloud/+/load, readwrite its own sync topic

A client absent from the ACL file can do nothing, and a client absent from the password file
cannot log in with a password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.protocol import topics
from tandem.protocol.errors import InvalidArgument

__all__ = [
    "HASH_ITERATIONS",
    "AclEntry",
    "BrokerLayout",
    "acl_rules",
    "hash_password",
    "new_password",
    "render_acl",
    "render_broker_conf",
    "render_passwd",
    "sync_topic",
    "verify_password",
]

HASH_ITERATIONS = 101  # mosquitto_passwd 2.0's default
_SALT_BYTES = 12
_HASH_ID = "7"  # mosquitto's id for PBKDF2-SHA512


def new_password() -> str:
    """A fresh random password: 192 bits, URL-safe base64 (32 characters)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = HASH_ITERATIONS) -> str:
    """The mosquitto ``$7$`` hash of ``password`` (what ``mosquitto_passwd`` writes)."""
    if not password:
        raise InvalidArgument("a password must not be empty")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    derived = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return (f"${_HASH_ID}${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(derived).decode()}")


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches the ``$7$`` hash ``hashed``."""
    try:
        _, kind, iterations, salt, derived = hashed.split("$")
        if kind != _HASH_ID:
            return False
        expected = base64.b64decode(derived, validate=True)
        got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"),
                                  base64.b64decode(salt, validate=True), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, got)


def sync_topic(admin: str) -> str:
    """The admin client's own topic, used to know when the broker has delivered everything
    before it (the fleet tools publish a marker there and wait for it to come back)."""
    return f"{topics.PREFIX}/fleet/sync/{topics.validate_id(admin, 'admin name')}"


@dataclass(frozen=True)
class AclEntry:
    """One client as the auth files need it."""

    name: str
    kind: str  # "device" | "worker" | "admin"
    password_hash: str


def acl_rules(name: str, kind: str) -> list[tuple[str, str]]:
    """``(access, topic)`` pairs for one client (access: read, write or readwrite)."""
    p = topics.PREFIX
    if kind == "device":
        return [
            ("write", f"{p}/req/{name}/+"),
            ("write", topics.status_topic(name)),
            ("read", topics.response_topic(name)),
            ("read", topics.assign_topic(name)),
            ("read", f"{p}/cloud/+/load"),
        ]
    if kind == "worker":
        return [
            ("read", topics.request_filter()),
            ("write", topics.probe_topic()),  # serve's shared-subscription self-check
            ("write", f"{p}/resp/+"),
            ("write", topics.load_topic(name)),
        ]
    if kind == "admin":
        return [
            ("write", f"{p}/assign/+"),
            ("readwrite", f"{p}/status/+"),
            ("read", f"{p}/cloud/+/load"),
            ("readwrite", sync_topic(name)),
        ]
    raise InvalidArgument(f"unknown client kind {kind!r}")


def render_passwd(entries: Iterable[AclEntry]) -> str:
    """The password file: ``name:hash`` lines, sorted by name."""
    lines = [f"{e.name}:{e.password_hash}" for e in sorted(entries, key=lambda e: e.name)]
    return "".join(line + "\n" for line in lines)


def render_acl(entries: Iterable[AclEntry], *, header: str = "") -> str:
    """The ACL file: one ``user`` block per client, sorted by name."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    for e in sorted(entries, key=lambda e: e.name):
        out += ["", f"# {e.kind}", f"user {e.name}"]
        out += [f"topic {access} {topic}" for access, topic in acl_rules(e.name, e.kind)]
    return "\n".join(out).lstrip("\n") + "\n"


@dataclass(frozen=True)
class BrokerLayout:
    """Where the broker finds what the fleet generates, and how it listens."""

    password_file: str
    acl_file: str
    crl_file: str
    ca_file: str
    cert_file: str
    key_file: str
    bind: str
    tls_port: int  # client-certificate listener
    password_port: int  # TLS listener with username/password
    plain_port: int | None = None  # plain-text username/password listener (trusted networks)


def render_broker_conf(layout: BrokerLayout, *, fleet_name: str,
                       extra_notes: Sequence[str] = ()) -> str:
    """The mosquitto configuration snippet for the fleet's listeners."""
    bind = f" {layout.bind}" if layout.bind else ""
    lines = [
        f"# Tandem fleet {fleet_name!r}: broker listeners and auth (written by tandem fleet init;",
        "# the files it names are rewritten by fleet commands: edit the fleet, not them).",
        "# Use it whole (mosquitto -c THIS_FILE) or from your mosquitto.conf with",
        "#   include_dir <this directory>",
        "# Reload after fleet changes: SIGHUP re-reads the password, ACL and CRL files.",
        *[f"# {note}" for note in extra_notes],
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {layout.password_file}",
        f"acl_file {layout.acl_file}",
        "set_tcp_nodelay true",
        "",
        "# TLS with client certificates: the certificate's CN is the MQTT username",
        f"listener {layout.tls_port}{bind}",
        f"cafile {layout.ca_file}",
        f"certfile {layout.cert_file}",
        f"keyfile {layout.key_file}",
        "require_certificate true",
        "use_identity_as_username true",
        f"crlfile {layout.crl_file}",
        "tls_version tlsv1.2",
        "",
        "# TLS with username and password (server certificate only)",
        f"listener {layout.password_port}{bind}",
        f"cafile {layout.ca_file}",
        f"certfile {layout.cert_file}",
        f"keyfile {layout.key_file}",
        "require_certificate false",
        "tls_version tlsv1.2",
    ]
    if layout.plain_port is not None:
        lines += [
            "",
            "# plain TCP with username and password: passwords travel in clear text here",
            f"listener {layout.plain_port}{bind}",
        ]
    return "\n".join(lines) + "\n"
