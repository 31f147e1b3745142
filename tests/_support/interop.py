"""Brokers other than mosquitto, started by the tests on 127.0.0.1 and free ports: NATS (a
server, with its MQTT gateway, or a cluster of two joined by routes), amqtt (PyPI) and Aedes
(npm, with the tiny server in tests/_support/aedes/).

Each has the handles of :class:`tests._support.broker.Mosquitto` that the contract tests use:
``host``, ``port`` (the MQTT port; :attr:`NatsServer.nats_port` for NATS clients), ``start()``
(again on the same ports), ``kill()`` (SIGKILL), ``stop()`` and ``log_tail()``. Readiness is
polled on the sockets, never a fixed sleep. Nothing here imports paho or Tandem.

``*_missing()`` says why a broker cannot run here (None when it can); :func:`require_broker`
turns that into a skip, or into a failure where every broker must run (``TANDEM_REQUIRE_BROKERS=1``,
set by .ci/run, which installs them all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests._support.broker import BrokerError, Mosquitto, _port_open, free_port

__all__ = [
    "AEDES_DIR",
    "Aedes",
    "Amqtt",
    "BrokerProcess",
    "NatsCluster",
    "NatsServer",
    "aedes_missing",
    "amqtt_missing",
    "nats_missing",
    "require_broker",
]

AEDES_DIR = Path(__file__).resolve().parent / "aedes"


def require_broker(why: str | None) -> None:
    """Nothing when the broker can run (``why`` is None); else skip the test with ``why``, or
    fail it when ``TANDEM_REQUIRE_BROKERS=1`` (CI installs every broker: a missing one is a
    broken set-up, not a reason to skip)."""
    if why is None:
        return
    import pytest

    if os.environ.get("TANDEM_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{why} [TANDEM_REQUIRE_BROKERS=1: every interop broker must run here]",
                    pytrace=False)
    pytest.skip(why)


def nats_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def nats_missing() -> str | None:
    if nats_binary() is None:
        return "nats-server not found (Debian package 'nats-server'; .ci/run installs it)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py not installed (pip install 'tandem-rt[nats]')"
    return None


def amqtt_missing() -> str | None:
    if shutil.which("amqtt", path=os.path.dirname(sys.executable)) is None \
            and shutil.which("amqtt") is None:
        return "amqtt not installed (pip package 'amqtt', in the dev extra)"
    return None


def aedes_missing() -> str | None:
    if shutil.which("node") is None:
        return "node not found (Debian package 'nodejs'; .ci/run installs it)"
    if not (AEDES_DIR / "node_modules" / "aedes").is_dir():
        return ("aedes not installed: npm ci --prefix tests/_support/aedes (.ci/run does it)")
    return None


class BrokerProcess:
    """A broker process with a log file, started and restarted on fixed ports."""

    name = "broker"

    # the process lifecycle is the mosquitto helper's (same attributes: _proc, _log, log_path)
    running = Mosquitto.running
    pid = Mosquitto.pid
    kill = Mosquitto.kill
    stop = Mosquitto.stop
    _signal_and_wait = Mosquitto._signal_and_wait
    _reap = Mosquitto._reap
    log_tail = Mosquitto.log_tail

    def __init__(self, directory: Path, *, host: str = "127.0.0.1",
                 start_timeout_s: float = 20.0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.log_path = self.directory / f"{self.name}.log"
        self._proc: subprocess.Popen | None = None
        self._log = None

    # what a broker defines
    def command(self) -> list[str]:
        raise NotImplementedError

    def ports(self) -> list[int]:
        raise NotImplementedError

    def ready(self) -> bool:
        """Beyond the ports accepting: is the broker ready to serve?"""
        return True

    def start(self):
        if self.running:
            raise BrokerError(f"{self.name} is already running")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      cwd=self.directory)
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(self.ports())
        while pending or not self.ready():
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._reap()
                raise BrokerError(f"{self.name} exited with {rc} while starting:\n"
                                  f"{self.log_tail()}")
            if pending and _port_open(self.host, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"{self.name} was not ready within {self.start_timeout_s}s:"
                                  f"\n{self.log_tail()}")
            time.sleep(0.02)  # polling interval of the readiness probe
        return self

    __enter__ = Mosquitto.__enter__
    __exit__ = Mosquitto.__exit__

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"{type(self).__name__}({self.host}:{self.ports()}, {state})"


class NatsServer(BrokerProcess):
    """One nats-server. ``mqtt=True`` adds the MQTT gateway on :attr:`port` (it needs
    JetStream, turned on with it); ``max_payload`` sets the server's payload cap (what it
    announces to clients). :attr:`nats_port` is for NATS clients. ``routes`` (cluster ports of
    other servers) with ``cluster_port`` join a cluster named ``cluster``."""

    name = "nats"

    def __init__(self, directory: Path, *, mqtt: bool = False, jetstream: bool | None = None,
                 max_payload: int | None = None, server_name: str = "n1",
                 cluster: str | None = None, cluster_port: int | None = None,
                 routes: list[int] | None = None, **kw) -> None:
        super().__init__(directory, **kw)
        if nats_binary() is None:
            raise BrokerError("nats-server not found")
        self.nats_port = free_port(self.host)
        self.mqtt = mqtt
        self.port = free_port(self.host) if mqtt else self.nats_port
        self.cluster_port = cluster_port
        lines = [f"listen: {self.host}:{self.nats_port}", f"server_name: {server_name}",
                 "max_connections: 1000"]
        if max_payload is not None:
            lines.append(f"max_payload: {int(max_payload)}")
        if jetstream if jetstream is not None else mqtt:
            lines.append(f'jetstream {{ store_dir: "{self.directory / "js"}", '
                         "max_memory_store: 64MB, max_file_store: 256MB }")
        if mqtt:
            lines.append(f"mqtt {{ listen: {self.host}:{self.port} }}")
        if cluster is not None:
            assert cluster_port is not None
            route_urls = ", ".join(f'"nats-route://{self.host}:{p}"' for p in routes or [])
            lines.append(f"cluster {{ name: {cluster}, listen: {self.host}:{cluster_port}, "
                         f"routes: [{route_urls}] }}")
        self.config_path = self.directory / "nats.conf"
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"

    def command(self) -> list[str]:
        return [nats_binary() or "nats-server", "-c", str(self.config_path)]

    def ports(self) -> list[int]:
        return [self.nats_port] + ([self.port] if self.mqtt else [])


class NatsCluster:
    """Two (or more) nats-servers joined by routes, JetStream on each (the MQTT gateway needs
    it). ``mqtt_on`` lists the nodes (by index) that run the MQTT gateway."""

    def __init__(self, directory: Path, *, nodes: int = 2, mqtt_on: tuple[int, ...] = (0,),
                 name: str = "tandem-test") -> None:
        directory = Path(directory)
        cluster_ports = [free_port() for _ in range(nodes)]
        self.nodes = [
            NatsServer(directory / f"node{i}", mqtt=i in mqtt_on, jetstream=True,
                       server_name=f"node{i}", cluster=name, cluster_port=cluster_ports[i],
                       routes=[p for j, p in enumerate(cluster_ports) if j != i])
            for i in range(nodes)
        ]

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_routed()
        return self

    def wait_routed(self, timeout_s: float = 20.0) -> None:
        """Until every node logs its routes to all the others (interest then propagates) and
        knows the JetStream meta leader (the MQTT gateway needs JetStream)."""
        deadline = time.monotonic() + timeout_s
        want = len(self.nodes) - 1
        while True:
            logs = [n.log_tail(400) for n in self.nodes]
            if all(t.count("Route connection created") >= want and "metadata leader" in t
                   for t in logs):
                return
            if time.monotonic() > deadline:
                raise BrokerError("the NATS cluster did not form:\n" +
                                  "\n".join(n.log_tail() for n in self.nodes))
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Amqtt(BrokerProcess):
    """amqtt's broker (MQTT 3.1.1 only), anonymous, no $SYS reports."""

    name = "amqtt"

    def __init__(self, directory: Path, **kw) -> None:
        super().__init__(directory, **kw)
        self.port = free_port(self.host)
        self.config_path = self.directory / "amqtt.yaml"
        self.config_path.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n")

    def command(self) -> list[str]:
        exe = shutil.which("amqtt", path=os.path.dirname(sys.executable)) or "amqtt"
        return [exe, "-c", str(self.config_path)]

    def ports(self) -> list[int]:
        return [self.port]


class Aedes(BrokerProcess):
    """Aedes (MQTT 3.1.1) in node, from tests/_support/aedes/server.mjs: TCP_NODELAY on every
    socket unless ``no_delay=False`` (its stock server's setting: about 44 ms a round trip)."""

    name = "aedes"

    def __init__(self, directory: Path, *, no_delay: bool = True, **kw) -> None:
        super().__init__(directory, **kw)
        self.port = free_port(self.host)
        self.no_delay = no_delay

    def command(self) -> list[str]:
        return ["node", str(AEDES_DIR / "server.mjs"), self.host, str(self.port),
                "nodelay" if self.no_delay else "nagle"]

    def ports(self) -> list[int]:
        return [self.port]
