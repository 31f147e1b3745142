"""The fleet directory: its layout and its settings file ``fleet.toml``.

    fleet/
      fleet.toml                  settings (this module)
      registry.db                 the SQLite registry (unless --db names another database)
      ca/ca.pem, ca/ca.key        the fleet's certificate authority
      broker/server.pem, .key     the broker's TLS certificate
      signing/bundle.key, .pub    the ed25519 bundle-signing key pair
      enroll/<name>.toml          enrollment files (secret; install them and delete them here)
      mosquitto/conf.d/tandem.conf   the broker's listeners (include_dir mosquitto/conf.d)
      mosquitto/auth -> auth.<n>  the current password file, ACL and CRL (swapped atomically)
      bundles/<digest>.tar.zst    signed bundle archives, served to devices over HTTP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tandem.devices.fleet import _toml
from tandem.devices.fleet._ids import check_name
from tandem.protocol.errors import InvalidArgument, NotFound

__all__ = ["DEFAULT_DIR", "FleetSettings", "Layout", "read_settings"]

DEFAULT_DIR = "fleet"
SETTINGS_FORMAT = 1


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def settings(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "broker" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "broker" / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing" / "bundle.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing" / "bundle.pub"

    @property
    def enroll_dir(self) -> Path:
        return self.root / "enroll"

    def enrollment(self, name: str) -> Path:
        return self.enroll_dir / f"{name}.toml"

    @property
    def mosquitto_dir(self) -> Path:
        return self.root / "mosquitto"

    @property
    def broker_conf(self) -> Path:
        return self.mosquitto_dir / "conf.d" / "tandem.conf"

    @property
    def auth_link(self) -> Path:
        return self.mosquitto_dir / "auth"

    @property
    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class FleetSettings:
    """What ``tandem fleet init`` decided; edit fleet.toml to change the reload method or the
    bundle URL (changing broker hosts needs a new server certificate: run init elsewhere)."""

    name: str
    broker_hosts: tuple[str, ...] = ("localhost",)
    bind: str = ""
    tls_port: int = 8883
    password_port: int = 8884
    plain_port: int = 0  # 0 = no plain-text listener
    db_url: str = ""  # "" = registry.db in the fleet directory
    pid_file: str = ""  # the broker's pid file: SIGHUP reloads it
    reload_command: tuple[str, ...] = ()  # or a command that reloads it (no shell)
    bundle_base_url: str = ""  # where fleet/bundles/ is served (tandem fleet dashboard does)

    def __post_init__(self) -> None:
        check_name(self.name, "fleet name")
        if not self.broker_hosts:
            raise InvalidArgument("at least one broker host is needed")
        for host in self.broker_hosts:
            if not host or any(c in host for c in "/ \t\n#?@"):
                raise InvalidArgument(f"bad broker host {host!r}")
        ports = [("tls_port", self.tls_port), ("password_port", self.password_port)]
        if self.plain_port:
            ports.append(("plain_port", self.plain_port))
        for what, port in ports:
            if type(port) is not int or not 0 < port < 65536:
                raise InvalidArgument(f"{what} must be a port number (1-65535), not {port!r}")
        if len({p for _, p in ports}) != len(ports):
            raise InvalidArgument("the broker listeners need distinct ports")
        if self.bundle_base_url:
            parts = urlsplit(self.bundle_base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise InvalidArgument(
                    f"bundle base URL must be http(s)://host[:port][/path], not "
                    f"{self.bundle_base_url!r}")

    @property
    def certificate_urls(self) -> tuple[str, ...]:
        return (f"mqtts://{_url_host(self.broker_hosts[0])}:{self.tls_port}",)

    @property
    def password_urls(self) -> tuple[str, ...]:
        urls = [f"mqtts://{_url_host(self.broker_hosts[0])}:{self.password_port}"]
        if self.plain_port:
            urls.append(f"mqtt://{_url_host(self.broker_hosts[0])}:{self.plain_port}")
        return tuple(urls)

    def to_toml(self) -> str:
        doc: dict[str, Any] = {
            "format": SETTINGS_FORMAT,
            "name": self.name,
            "db": self.db_url or None,
            "broker": {
                "hosts": list(self.broker_hosts),
                "bind": self.bind,
                "tls_port": self.tls_port,
                "password_port": self.password_port,
                "plain_port": self.plain_port,
                "pid_file": self.pid_file,
                "reload_command": list(self.reload_command),
            },
            "bundles": {"base_url": self.bundle_base_url},
        }
        return _toml.dumps(doc, header=(
            "Tandem fleet settings (written by tandem fleet init).\n"
            "broker.pid_file or broker.reload_command: how fleet commands reload the broker.\n"
            "bundles.base_url: where this directory's bundles/ is served over HTTP."))


def read_settings(layout: Layout) -> FleetSettings:
    if not layout.settings.exists():
        raise NotFound(f"{layout.root} is not a fleet directory (no fleet.toml): run "
                       "'tandem fleet init' or pass --fleet-dir")
    doc = _toml.read(layout.settings, what="fleet settings")
    where = f"fleet settings {layout.settings}"
    if doc.get("format") != SETTINGS_FORMAT:
        raise InvalidArgument(f"{where}: format {doc.get('format')!r} is not supported")
    broker = doc.get("broker", {})
    bundles = doc.get("bundles", {})
    if not isinstance(broker, dict) or not isinstance(bundles, dict):
        raise InvalidArgument(f"{where}: [broker] and [bundles] must be tables")
    fields = {
        "name": doc.get("name"),
        "db_url": doc.get("db", ""),
        "broker_hosts": broker.get("hosts", ["localhost"]),
        "bind": broker.get("bind", ""),
        "tls_port": broker.get("tls_port", 8883),
        "password_port": broker.get("password_port", 8884),
        "plain_port": broker.get("plain_port", 0),
        "pid_file": broker.get("pid_file", ""),
        "reload_command": broker.get("reload_command", []),
        "bundle_base_url": bundles.get("base_url", ""),
    }
    for key in ("broker_hosts", "reload_command"):
        value = fields[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{where}: {key} must be a list of strings")
        fields[key] = tuple(value)
    for key in ("name", "db_url", "bind", "pid_file", "bundle_base_url"):
        if not isinstance(fields[key], str):
            raise InvalidArgument(f"{where}: {key} must be a string")
    try:
        return FleetSettings(**fields)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
