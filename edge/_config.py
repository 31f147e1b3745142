"""The edge daemon's configuration: one layer over command-line options, ``TANDEM_*`` environment
variables, a TOML file and defaults (:mod:`tandem.protocol.settings`, shared with the cloud
endpoint).

Precedence (highest first): command-line option; environment variable ``TANDEM_<NAME>`` (the
option's name in upper case, ``-`` as ``_``: ``TANDEM_API_PORT``, ``TANDEM_DEVICE_ID``); the TOML
file (``--config FILE`` or ``TANDEM_CONFIG``; keys in an ``[edge]`` table, or at the top level
of a file without one); an enrollment file (``--enroll FILE``: device id and profile, below
every explicit setting; its broker, credentials, TLS files and bundle-signing key reach the
daemon as the enrollment itself); the defaults below. Unknown keys in the file and malformed
values anywhere are one-line :class:`~tandem.protocol.errors.InvalidArgument` errors naming
where the value came from.

Relative paths in the TOML file are relative to the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.protocol.broker_url import parse_broker_url
from tandem.protocol.errors import InvalidArgument
from tandem.protocol.settings import field_parsers, merge_settings, to_mqtt_version, to_str
from tandem.protocol.topics import validate_id
from tandem.protocol.transport import parse_protocol

__all__ = ["MODES", "EdgeConfig", "load_config", "parse_mode"]

MODES = ("auto", "local", "cloud", "cascade")  # and "split:<cut id>"
_MODE_SPLIT = re.compile(r"split:(\d{1,9})")


def parse_mode(value: object) -> tuple[str, int | None]:
    """``("auto"|"local"|"cloud"|"cascade", None)`` or ``("split", cut_id)``; InvalidArgument
    otherwise."""
    if isinstance(value, str):
        if value in MODES:
            return value, None
        m = _MODE_SPLIT.fullmatch(value)
        if m:
            return "split", int(m.group(1))
    shown = repr(value)[:64]
    raise InvalidArgument(f"mode must be auto, local, cloud, cascade or split:<cut id>, not "
                          f"{shown}")


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
    broker: str | None = None  # mqtt[s]:// or nats:// / tls:// (tandem.protocol.broker_url);
    # None: a broker advertised over mDNS, else mqtt://127.0.0.1:1883
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
    deadline_margin_ms: float = 5.0  # kept for answering after a fallback (hand-offs, HTTP)
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
    mqtt_version: str | int = "auto"  # "auto" (MQTT 5, else 3.1.1), 5 or 311
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
            parse_broker_url(self.broker)
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
        try:
            object.__setattr__(self, "mqtt_version", parse_protocol(self.mqtt_version))
        except InvalidArgument:
            need(False, "mqtt_version must be auto, 5 or 311")
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


# -- the one layer (tandem.protocol.settings) -------------------------------------------------



_PARSERS = field_parsers(EdgeConfig, {"log_level": lambda v: to_str(v).lower(),
                                      "mqtt_version": to_mqtt_version})
_PATH_FIELDS = {f.name for f in dataclasses.fields(EdgeConfig) if str(f.type).startswith("Path")}


def load_config(options: Mapping[str, Any] | None = None, *,
                env: Mapping[str, str] | None = None,
                config_file: Path | str | None = None,
                enrollment: Mapping[str, Any] | None = None) -> EdgeConfig:
    """Merge ``options`` (None values = not given), ``env`` (default ``os.environ``), the TOML
    file (``config_file``, else ``TANDEM_CONFIG``) and ``enrollment`` (values an enrollment file
    supplies) over the defaults. ``enrollment`` is below everything given explicitly."""
    below = [("enrollment file", enrollment)] if enrollment else []
    merged = merge_settings(_PARSERS, options, table="edge", env=env, config_file=config_file,
                            below=below, file_relative=_PATH_FIELDS)
    if not merged.get("device_id"):
        raise InvalidArgument("no device id: give --device-id ID (or TANDEM_DEVICE_ID, "
                              "device_id in the config file, or --enroll FILE)")
    return EdgeConfig(**merged)
