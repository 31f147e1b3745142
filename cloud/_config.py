"""The cloud endpoint's configuration: one layer over CLI options, ``TANDEM_*`` environment
variables, a TOML file and defaults.

Precedence (highest first): command-line option, environment variable ``TANDEM_<NAME>`` (the
option's name in upper case with ``_``, e.g. ``TANDEM_MAX_BATCH``), the TOML file
(``--config FILE`` or ``TANDEM_CONFIG``; keys in a ``[cloud]`` table, or at the top level of a
file that has no such table), the default. Unknown keys in the file and malformed values
anywhere are one-line :class:`~tandem.protocol.errors.InvalidArgument` errors naming where the
value came from.

A fleet enrollment file (``--enroll FILE``, ``TANDEM_ENROLL``, ``enroll`` in the file; written by
``tandem fleet add-worker NAME``) supplies settings below every explicit one: the worker id (the
enrollment's), the broker (its first client-certificate URL, else its first password URL), the
credentials for that URL (client certificate and key, or username and password), the fleet CA
for a TLS broker, and the fleet's bundle-signing key as ``public_key`` (an enrolled worker serves
only bundles the fleet signed). The PEMs are written, 0600, into ``secrets_dir``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.protocol.broker_url import parse_broker_url
from tandem.protocol.errors import InvalidArgument, MissingDependency
from tandem.protocol.files import atomic_write
from tandem.protocol.nats import check_nats_id
from tandem.protocol.settings import field_parsers, merge_settings, to_mqtt_version, to_str
from tandem.protocol.topics import validate_id
from tandem.protocol.transport import parse_protocol

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
    group: str = "tandem"  # "": no shared subscription (one worker alone on the requests)
    worker_id: str = field(default_factory=_default_worker_id)
    max_batch: int = 8
    max_delay_ms: float = 2.0
    queue_limit: int = 256
    max_inflight: int = 0  # 0: see inflight_limit (taken from the broker, not started yet)
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    public_key: Path | None = None
    memory_budget_mb: int = 4096
    repo_poll_s: float = 2.0
    compute_threads: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    profile: str | None = None  # device profile id; None: detected
    engine_cache: Path | None = None  # None: ~/.cache/tandem/engines
    dedup_window_s: float = 60.0
    dedup_max_mb: int = 64
    load_interval_s: float = 1.0
    drain_timeout_s: float = 10.0
    mqtt_version: str | int = "auto"  # "auto" (MQTT 5, else 3.1.1), 5 or 311
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    enroll: Path | None = None  # a worker's fleet enrollment file (module docstring)
    log_level: str = "info"

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise InvalidArgument(f"{what}")

        check_id = check_nats_id if parse_broker_url(self.broker).kind == "nats" else validate_id
        if self.group:
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
        need(self.backend in ("auto", "onnxruntime", "tensorrt"),
             f"backend must be auto, onnxruntime or tensorrt, not {self.backend!r}")
        need(self.dedup_window_s >= 0, "dedup_window_s must be >= 0")
        need(self.dedup_max_mb >= 0, "dedup_max_mb must be >= 0")
        need(self.load_interval_s > 0, "load_interval_s must be > 0")
        need(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        object.__setattr__(self, "mqtt_version", parse_protocol(self.mqtt_version))
        need(self.log_level in ("debug", "info", "warning", "error"),
             "log_level must be debug, info, warning or error")

    @property
    def broker_address(self) -> BrokerAddress:
        return parse_broker(self.broker)

    @property
    def inflight_limit(self) -> int:
        """Requests this worker may hold from the broker without having started them: the
        MQTT 5 Receive Maximum it connects with (a request's PUBACK goes out when its batch
        starts). ``max_inflight``, else 2 x max_batch x compute_threads — enough to form the
        next full batch of every compute thread while the current ones run — and at least 8, so
        the PUBACK -> next PUBLISH round trip through the broker never starves a worker with
        small batches."""
        return min(self.max_inflight or max(2 * self.max_batch * self.compute_threads, 8),
                   65535)


# -- the one layer (tandem.protocol.settings) -------------------------------------------------



_FIELD_TYPES = field_parsers(CloudConfig, {"log_level": lambda v: to_str(v).lower(),
                                           "mqtt_version": to_mqtt_version})


def load_config(options: Mapping[str, Any] | None = None, *,
                env: Mapping[str, str] | None = None,
                config_file: Path | str | None = None,
                secrets_dir: Path | None = None) -> CloudConfig:
    """Merge ``options`` (None values = not given), ``env`` (default ``os.environ``), the TOML
    file (``config_file``, else ``TANDEM_CONFIG``) and an enrollment file (``enroll``; its PEMs
    go to ``secrets_dir``, else to a private temporary directory removed at exit) over the
    defaults."""
    merged = merge_settings(_FIELD_TYPES, options, table="cloud", env=env,
                            config_file=config_file,
                            file_relative=("repo", "enroll", "engine_cache"))
    if "repo" not in merged:
        raise InvalidArgument("no model repository: give --repo DIR (or TANDEM_REPO, or repo "
                              "in the config file)")
    if merged.get("enroll") is not None:
        merged = {**_enrollment_settings(merged["enroll"], merged, secrets_dir), **merged}
    return CloudConfig(**merged)


def _enrollment_settings(path: Path, given: Mapping[str, Any],
                         secrets_dir: Path | None) -> dict[str, Any]:
    """The settings a worker's enrollment file supplies (module docstring), for those not in
    ``given``."""
    try:
        from tandem.devices.fleet import load_enrollment
    except ImportError as exc:
        raise MissingDependency(f"--enroll needs tandem.devices.fleet ({exc})") from exc
    e = load_enrollment(path)
    if e.kind != "worker":
        raise InvalidArgument(f"{path} enrolls a {e.kind}, not a cloud worker (tandem fleet "
                              "add-worker NAME writes a worker's)")
    out: dict[str, Any] = {"worker_id": e.id}
    broker = given.get("broker")
    by_certificate = broker is None and bool(e.urls)
    if broker is None:
        broker = e.urls[0] if e.urls else e.password_urls[0]
        out["broker"] = broker
    if not by_certificate:
        out.update(username=e.username, password=e.password)
    pems = {"public_key": ("bundles.pub.pem", e.bundle_public_key_pem)}
    if parse_broker(broker).tls:
        pems["ca_file"] = ("ca.pem", e.ca_pem)
        if by_certificate:
            pems.update(cert_file=("cert.pem", e.cert_pem), key_file=("key.pem", e.key_pem))
    directory = secrets_dir if secrets_dir is not None else _private_dir()
    for key, (name, text) in pems.items():
        if given.get(key) is None:
            out[key] = directory / f"{e.id}.{name}"
            atomic_write(out[key], text, mode=0o600)
    return out


def _private_dir() -> Path:
    """A directory only this user can read, removed when the process exits."""
    directory = Path(tempfile.mkdtemp(prefix="tandem-cloud-"))  # mode 0700
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory
