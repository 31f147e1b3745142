"""The edge daemon's configuration: one layer over command-line options, ``TANDEM_*`` environment
variables, a TOML file and defaults.

Precedence (highest first): command-line option; environment variable ``TANDEM_<NAME>`` (the
option's name in upper case, ``-`` as ``_``: ``TANDEM_API_PORT``, ``TANDEM_DEVICE_ID``); the TOML
file (``--config FILE`` or ``TANDEM_CONFIG``; keys in an ``[edge]`` table, or at the top level
of a file without one); an enrollment file (``--enroll FILE``: device id, broker, TLS and the
bundle-signing key, below every explicit setting); the defaults below. Unknown keys in the file
and malformed values anywhere are one-line
:class:`~tandem.protocol.errors.InvalidArgument` errors naming where the value came from.

Relative paths in the TOML file are relative to the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tandem.protocol.errors import InvalidArgument, NotFound
from tandem.protocol.topics import validate_id

__all__ = ["MODES", "BrokerAddress", "EdgeConfig", "load_config", "parse_broker", "parse_mode"]

ENV_PREFIX = "TANDEM_"
MODES = ("auto", "local", "cloud")  # and "split:<cut id>"
_MODE_SPLIT = re.compile(r"split:(\d{1,9})")


def parse_mode(value: object) -> tuple[str, int | None]:
    """``("auto"|"local"|"cloud", None)`` or ``("split", cut_id)``; InvalidArgument otherwise."""
    if isinstance(value, str):
        if value in MODES:
            return value, None
        m = _MODE_SPLIT.fullmatch(value)
        if m:
            return "split", int(m.group(1))
    shown = repr(value)[:64]
    raise InvalidArgument(f"mode must be auto, local, cloud or split:<cut id>, not {shown}")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is: ``mqtt://host:port`` (TCP) or ``mqtts://host:port`` (TLS)."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:  # never shows the password
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"


def parse_broker(url: str) -> BrokerAddress:
    """``mqtt[s]://[user[:password]@]host[:port]``; the port defaults to 1883 (8883 for mqtts)."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument(f"broker must be a URL like mqtt://HOST:PORT, not {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise InvalidArgument(f"broker URL scheme must be mqtt or mqtts, not {scheme!r} ({url})")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"broker URL takes no path or query: {url}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgument(f"broker URL has a bad port: {url}") from None
    if not parts.hostname:
        raise InvalidArgument(f"broker URL has no host: {url}")
    return BrokerAddress(
        scheme, parts.hostname, port or (8883 if scheme == "mqtts" else 1883),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None)


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "tandem" / "edge"


@dataclass(frozen=True)
class EdgeConfig:
    """Everything ``tandem edge run`` takes (see ``tandem edge run --help``).

    Durations end in ``_s`` or ``_ms``; sizes in ``_mb`` are MiB.
    """

    bundle: Path | None = None  # None: wait for an assignment (needs --enroll or a broker)
    device_id: str = ""
    broker: str | None = None  # None: a broker advertised over mDNS, else mqtt://127.0.0.1:1883
    api_port: int = 8000
    api_host: str = "127.0.0.1"
    profile: str | None = None  # device profile id; None: detect
    enroll: Path | None = None
    public_key: Path | None = None  # bundles must be signed by this key (from --enroll too)
    state_dir: Path | None = None  # None: $XDG_STATE_HOME/tandem/edge/<device id>
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    engine_cache: Path | None = None  # None: <state_dir>/engines
    # requests
    mode: str = "auto"  # default mode of a request that names none
    deadline_ms: float = 1000.0  # default deadline of a request that names none
    max_body_mb: int = 64
    compute_threads: int = 2
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    max_queued: int = 256  # requests waiting for local compute before 429s
    # planner and link
    hysteresis: float = 0.1  # switch plans only for a gain of at least this fraction
    cloud_speedup: float = 1.0  # prior: cloud tail time = local tail time / this, until measured
    prior_uplink_mbps: float = 10.0
    prior_rtt_ms: float = 20.0
    probe_interval_s: float = 2.0
    explore_interval_s: float = 10.0  # re-measure a plan that has not run for this long
    failures_to_degrade: int = 3
    cloud_budget_floor_ms: float = 5.0  # never offload with less time than this for the cloud
    deadline_margin_ms: float = 2.0  # kept for answering after a fallback (hand-offs, HTTP)
    # profiling
    profile_warmup: int = 3
    profile_runs: int = 20
    profile_shapes: str = ""  # "input=1x3x64x64,other=1x4": shapes to profile open dims at
    # spool
    spool_max_items: int = 10_000
    spool_max_mb: int = 512
    spool_budget_ms: float = 30_000.0  # the time a spooled request gives the cloud per try
    spool_retention_s: float = 86_400.0  # how long a delivered result's id answers 410
    # presence
    heartbeat_s: float = 5.0
    advertise: bool = True  # zeroconf _tandem._tcp
    interfaces: str = ""  # zeroconf interfaces, comma-separated addresses; "" = all
    discovery_timeout_s: float = 2.0  # mDNS browse for a broker when none is given
    # rollout
    allow_downgrade: bool = False
    # MQTT
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
                raise InvalidArgument(what)

        if self.device_id:
            validate_id(self.device_id, "device_id")
        if self.broker is not None:
            parse_broker(self.broker)
        parse_mode(self.mode)
        need(0 <= self.api_port <= 65535, f"api_port must be in [0, 65535], not {self.api_port}")
        need(self.backend in ("auto", "onnxruntime", "tensorrt"),
             f"backend must be auto, onnxruntime or tensorrt, not {self.backend!r}")
        need(0 < self.deadline_ms <= 86_400_000, "deadline_ms must be in (0, 86400000]")
        need(1 <= self.max_body_mb <= 4096, "max_body_mb must be in [1, 4096]")
        need(1 <= self.compute_threads <= 256, "compute_threads must be in [1, 256]")
        need(self.intra_op_threads >= 0, "intra_op_threads must be >= 0")
        need(self.max_queued >= 1, "max_queued must be >= 1")
        need(0 <= self.hysteresis < 1, "hysteresis must be in [0, 1)")
        need(self.cloud_speedup > 0, "cloud_speedup must be > 0")
        need(self.prior_uplink_mbps > 0, "prior_uplink_mbps must be > 0")
        need(self.prior_rtt_ms >= 0, "prior_rtt_ms must be >= 0")
        need(self.probe_interval_s > 0, "probe_interval_s must be > 0")
        need(self.explore_interval_s > 0, "explore_interval_s must be > 0")
        need(self.failures_to_degrade >= 1, "failures_to_degrade must be >= 1")
        need(self.cloud_budget_floor_ms >= 0, "cloud_budget_floor_ms must be >= 0")
        need(self.deadline_margin_ms >= 0, "deadline_margin_ms must be >= 0")
        need(0 <= self.profile_warmup <= 1000, "profile_warmup must be in [0, 1000]")
        need(1 <= self.profile_runs <= 10_000, "profile_runs must be in [1, 10000]")
        parse_shapes(self.profile_shapes)
        need(self.spool_max_items >= 0, "spool_max_items must be >= 0")
        need(self.spool_max_mb >= 0, "spool_max_mb must be >= 0")
        need(self.spool_budget_ms > 0, "spool_budget_ms must be > 0")
        need(self.spool_retention_s >= 0, "spool_retention_s must be >= 0")
        need(self.heartbeat_s > 0, "heartbeat_s must be > 0")
        need(self.discovery_timeout_s >= 0, "discovery_timeout_s must be >= 0")
        need(self.mqtt_version in (5, 311), "mqtt_version must be 5 or 311")
        need(self.log_level in ("debug", "info", "warning", "error"),
             "log_level must be debug, info, warning or error")

    @property
    def interface_list(self) -> list[str] | None:
        found = [s.strip() for s in self.interfaces.split(",") if s.strip()]
        return found or None

    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        return _default_state_dir() / (self.device_id or "default")


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """``"a=1x3x64x64,b=1x4"`` -> ``{"a": (1, 3, 64, 64), "b": (1, 4)}``."""
    out: dict[str, tuple[int, ...]] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, dims = item.partition("=")
        if not sep or not name.strip() or not re.fullmatch(r"\d{1,9}(x\d{1,9})*", dims.strip()):
            raise InvalidArgument(f"profile_shapes: {item!r} is not NAME=DxDx...")
        out[name.strip()] = tuple(int(d) for d in dims.strip().split("x"))
    return out


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


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


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
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none")):
            return None
        return conv(v)

    return parse


_CONVERTERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str, Path: _to_path}


def _field_types() -> dict[str, Callable[[Any], Any]]:
    out: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(EdgeConfig):
        text = str(f.type)
        base = text.split("|")[0].strip()
        conv = {"int": _to_int, "float": _to_float, "bool": _to_bool, "str": _to_str,
                "Path": _to_path}[base]
        out[f.name] = _optional(conv) if "None" in text else conv
    out["log_level"] = lambda v: _to_str(v).lower()
    return out


_FIELD_TYPES = _field_types()
_PATH_FIELDS = {f.name for f in dataclasses.fields(EdgeConfig) if str(f.type).startswith("Path")}


def read_toml(path: Path, section: str) -> dict[str, Any]:
    """The ``[section]`` table of a TOML file (or its top level when it has no such table)."""
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
    table = doc.get(section, doc)
    if not isinstance(table, dict):
        raise InvalidArgument(f"config file {path}: [{section}] must be a table")
    if section in doc:
        others = sorted(k for k in doc if k != section and not isinstance(doc[k], dict))
        if others:
            raise InvalidArgument(f"config file {path}: keys outside [{section}]: {others}")
    return dict(table)


def load_config(options: Mapping[str, Any] | None = None, *,
                env: Mapping[str, str] | None = None,
                config_file: Path | str | None = None,
                enrollment: Mapping[str, Any] | None = None) -> EdgeConfig:
    """Merge ``options`` (None values = not given), ``env`` (default ``os.environ``), the TOML
    file (``config_file``, else ``TANDEM_CONFIG``) and ``enrollment`` (values an enrollment file
    supplies) over the defaults. ``enrollment`` is below everything given explicitly."""
    env = os.environ if env is None else env
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(_FIELD_TYPES))
    if unknown:
        raise InvalidArgument(f"unknown option(s) {unknown}")
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = env[f"{ENV_PREFIX}CONFIG"]
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if enrollment:
        layers.append(("enrollment file", enrollment))
    file_dir: Path | None = None
    if config_file is not None:
        path = Path(config_file).expanduser()
        file_dir = path.parent
        table = read_toml(path, "edge")
        unknown = sorted(set(table) - set(_FIELD_TYPES))
        if unknown:
            raise InvalidArgument(f"config file {path}: unknown key(s) {unknown} "
                                  f"(known: {', '.join(sorted(_FIELD_TYPES))})")
        layers.append((f"config file {path}", table))
    env_values = {f"{ENV_PREFIX}{name.upper()}": env[f"{ENV_PREFIX}{name.upper()}"]
                  for name in _FIELD_TYPES if f"{ENV_PREFIX}{name.upper()}" in env}
    layers.append(("environment", env_values))
    layers.append(("option", options))
    merged: dict[str, Any] = {}
    for where, values in layers:
        for key, raw in values.items():
            name = key[len(ENV_PREFIX):].lower() if where == "environment" else key
            try:
                value = _FIELD_TYPES[name](raw)
            except ValueError as exc:
                label = {"environment": key, "option": f"--{name.replace('_', '-')}"}.get(
                    where, f"{where}: {name}")
                raise InvalidArgument(f"{label}: {exc}, got {str(raw)[:80]!r}") from None
            if where.startswith("config file") and name in _PATH_FIELDS and value is not None \
                    and not value.is_absolute() and file_dir is not None:
                value = file_dir / value
            merged[name] = value
    if not merged.get("device_id"):
        raise InvalidArgument("no device id: give --device-id ID (or TANDEM_DEVICE_ID, "
                              "device_id in the config file, or --enroll FILE)")
    return EdgeConfig(**merged)
