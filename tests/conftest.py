"""Shared fixtures: a real mosquitto per test, and leak checks (no paho or transport thread, no
broker process left behind)."""

from __future__ import annotations

import threading
import time

import pytest

from tests._support.broker import Mosquitto, mosquitto_binary
from tests._support.interop import NatsServer, nats_missing

# Threads that must not outlive a test: paho's network thread and the sync transport's loop.
_LEAK_PREFIXES = ("paho-mqtt-client-", "tandem-transport")


def _skip_without_mosquitto() -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin "
                    "(install the 'mosquitto' package)")


@pytest.fixture
def mosquitto_factory(tmp_path_factory):
    """Make brokers with options: ``mosquitto_factory(max_packet_size=1 << 20, users=...)``.

    Every broker made is started and is stopped (and waited for) when the test ends.
    """
    _skip_without_mosquitto()
    brokers: list[Mosquitto] = []

    def make(*, start: bool = True, **options) -> Mosquitto:
        broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), **options)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()
    assert not any(b.running for b in brokers), "a mosquitto process outlived its test"


@pytest.fixture
def nats_factory(tmp_path_factory):
    """Make nats-servers: ``nats_factory(max_payload=1 << 20, mqtt=True)``; each is started,
    and stopped when the test ends."""
    why = nats_missing()
    if why:
        pytest.skip(why)
    servers: list[NatsServer] = []

    def make(*, start: bool = True, **options) -> NatsServer:
        server = NatsServer(tmp_path_factory.mktemp("nats"), **options)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()
    assert not any(s.running for s in servers), "a nats-server outlived its test"


@pytest.fixture
def mosquitto(mosquitto_factory) -> Mosquitto:
    """A fresh mosquitto on 127.0.0.1 and a free port (set_tcp_nodelay true)."""
    return mosquitto_factory()


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Fail a test that leaves a paho network thread or a transport loop thread running."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    leaked: list[threading.Thread] = []
    while True:
        leaked = [
            t for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith(_LEAK_PREFIXES)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        leaked[0].join(timeout=0.05)
    assert not leaked, f"threads left behind: {[t.name for t in leaked]}"
