"""The cloud endpoint's configuration: one layer over CLI options, ``TANDEM_*`` environment
variables, a TOML file and defaults.

Precedence (highest first): command-line option, environment variable ``TANDEM_<NAME>`` (the
option's name in upper case with ``_``, e.g. ``TANDEM_MAX_BATCH``), the TOML file
(``--config FILE`` or ``TANDEM_CONFIG``; keys in a ``[cloud]`` table, or at the top level of a
file that has no such table), the default. Unknown keys in the file and malformed values
anywhere are one-line :class:`~tandem.protocol.errors.InvalidArgument` errors naming where the
value came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.protocol.broker_url import parse_broker_url
from tandem.protocol.errors import InvalidArgument, NotFound
from tandem.protocol.nats import check_nats_id
from tandem.protocol.topics import validate_id

__all__ = ["BrokerAddress", "CloudConfig", "load_config", "parse_broker"]

ENV_PREFIX = "TANDEM_"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is: ``mqtt://host:port`` (TCP), ``mqtts://host:port`` (TLS), or
    ``nats://host:port[,host:port…]`` (``tls://`` with TLS; the first host is shown here, the
    transport gets them all: :func:`tandem.protocol.broker_url.transport_for_url`)."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "tls")

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"


def parse_broker(url: str) -> BrokerAddress:
    """``mqtt[s]://[user[:password]@]host[:port]`` (port 1883, 8883 for mqtts) or
    ``nats://…``/``tls://…`` (port 4222; see :mod:`tandem.protocol.broker_url`)."""
    b = parse_broker_url(url)
    return BrokerAddress(b.scheme, b.host, b.port, b.username, b.password)


def _default_worker_id() -> str:
    # no '.': an id NATS subjects can carry too
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "worker"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True)
class CloudConfig:
    """Everything ``tandem cloud serve`` takes (see ``tandem cloud serve --help``)."""

    repo: Path
    broker: str = "mqtt://127.0.0.1:1883"
    group: str = "tandem"
    worker_id: str = field(default_factory=_default_worker_id)
    max_batch: int = 8
    max_delay_ms: float = 2.0
    queue_limit: int = 256
    max_inflight: int = 0  # 0: 2 x max_batch (messages taken from the broker and not finished)
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    public_key: Path | None = None
    memory_budget_mb: int = 4096
    repo_poll_s: float = 2.0
    compute_threads: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    dedup_window_s: float = 60.0
    dedup_max_mb: int = 64
    load_interval_s: float = 1.0
    drain_timeout_s: float = 10.0
    mqtt_version: int = 5
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise InvalidArgument(f"{what}")

        check_id = check_nats_id if parse_broker_url(self.broker).kind == "nats" else validate_id
        check_id(self.group, "group")
        check_id(self.worker_id, "worker_id")
        need(1 <= self.max_batch <= 65536, f"max_batch must be in [1, 65536], not {self.max_batch}")
        need(0 <= self.max_delay_ms <= 60_000, "max_delay_ms must be in [0, 60000]")
        need(1 <= self.queue_limit <= 10_000_000, "queue_limit must be in [1, 10000000]")
        need(self.max_inflight >= 0, "max_inflight must be >= 0")
        need(self.http_port is None or 0 <= self.http_port <= 65535,
             "http_port must be in [0, 65535]")
        need(self.memory_budget_mb >= 1, "memory_budget_mb must be >= 1")
        need(self.repo_poll_s > 0, "repo_poll_s must be > 0")
        need(1 <= self.compute_threads <= 256, "compute_threads must be in [1, 256]")
        need(self.intra_op_threads >= 0, "intra_op_threads must be >= 0")
        need(self.dedup_window_s >= 0, "dedup_window_s must be >= 0")
        need(self.dedup_max_mb >= 0, "dedup_max_mb must be >= 0")
        need(self.load_interval_s > 0, "load_interval_s must be > 0")
        need(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        need(self.mqtt_version in (5, 311), "mqtt_version must be 5 or 311")
        need(self.log_level in ("debug", "info", "warning", "error"),
             "log_level must be debug, info, warning or error")

    @property
    def broker_address(self) -> BrokerAddress:
        return parse_broker(self.broker)

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight or 2 * self.max_batch


# -- the one layer ----------------------------------------------------------------------------


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
        return int(v)
    raise ValueError("expected an integer")


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return out


def _to_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _to_path(v: Any) -> Path:
    if isinstance(v, Path):
        return v
    return Path(_to_str(v)).expanduser()


def _optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "off")):
            return None
        return conv(v)

    return parse


_FIELD_TYPES: dict[str, Callable[[Any], Any]] = {
    "repo": _to_path,
    "broker": _to_str,
    "group": _to_str,
    "worker_id": _to_str,
    "max_batch": _to_int,
    "max_delay_ms": _to_float,
    "queue_limit": _to_int,
    "max_inflight": _to_int,
    "http_port": _optional(_to_int),
    "http_host": _to_str,
    "public_key": _optional(_to_path),
    "memory_budget_mb": _to_int,
    "repo_poll_s": _to_float,
    "compute_threads": _to_int,
    "intra_op_threads": _to_int,
    "dedup_window_s": _to_float,
    "dedup_max_mb": _to_int,
    "load_interval_s": _to_float,
    "drain_timeout_s": _to_float,
    "mqtt_version": _to_int,
    "username": _optional(_to_str),
    "password": _optional(_to_str),
    "ca_file": _optional(_to_path),
    "cert_file": _optional(_to_path),
    "key_file": _optional(_to_path),
    "log_level": lambda v: _to_str(v).lower(),
}
assert set(_FIELD_TYPES) == {f.name for f in dataclasses.fields(CloudConfig)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"config file {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"config file {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"config file {path}: not valid TOML: {exc}") from None
    section = doc.get("cloud", doc)
    if not isinstance(section, dict):
        raise InvalidArgument(f"config file {path}: [cloud] must be a table")
    if "cloud" in doc:
        others = sorted(k for k in doc if k != "cloud" and not isinstance(doc[k], dict))
        if others:
            raise InvalidArgument(f"config file {path}: keys outside [cloud]: {others}")
    unknown = sorted(set(section) - set(_FIELD_TYPES))
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown key(s) {unknown} "
                              f"(known: {', '.join(sorted(_FIELD_TYPES))})")
    return dict(section)


def load_config(options: Mapping[str, Any] | None = None, *,
                env: Mapping[str, str] | None = None,
                config_file: Path | str | None = None) -> CloudConfig:
    """Merge ``options`` (None values = not given), ``env`` (default ``os.environ``) and the
    TOML file (``config_file``, else ``TANDEM_CONFIG``) over the defaults."""
    env = os.environ if env is None else env
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(_FIELD_TYPES))
    if unknown:
        raise InvalidArgument(f"unknown option(s) {unknown}")
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = env[f"{ENV_PREFIX}CONFIG"]
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        path = Path(config_file).expanduser()
        layers.append((f"config file {path}", _read_toml(path)))
    env_values = {name: env[f"{ENV_PREFIX}{name.upper()}"] for name in _FIELD_TYPES
                  if f"{ENV_PREFIX}{name.upper()}" in env}
    layers.append(("environment", {f"{ENV_PREFIX}{k.upper()}": v for k, v in env_values.items()}))
    layers.append(("option", options))
    merged: dict[str, Any] = {}
    for where, values in layers:
        for key, raw in values.items():
            name = key[len(ENV_PREFIX):].lower() if where == "environment" else key
            try:
                merged[name] = _FIELD_TYPES[name](raw)
            except ValueError as exc:
                label = key if where == "environment" else f"--{name.replace('_', '-')}"
                if where.startswith("config file"):
                    label = f"{where}: {name}"
                raise InvalidArgument(f"{label}: {exc}, got {raw!r}") from None
    if "repo" not in merged:
        raise InvalidArgument("no model repository: give --repo DIR (or TANDEM_REPO, or repo "
                              "in the config file)")
    if config_file is not None and not Path(merged["repo"]).is_absolute() and \
            "repo" not in options and "repo" not in env_values:
        merged["repo"] = Path(config_file).expanduser().parent / merged["repo"]
    return CloudConfig(**merged)
