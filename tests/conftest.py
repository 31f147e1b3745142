"""Shared fixtures: a real mosquitto per test, and leak checks (no paho or transport thread, no
broker process left behind)."""

from __future__ import annotations

import threading
import time

import pytest

from tests._support.broker import Mosquitto, mosquitto_binary
from tests._support.interop import (
    Aedes,
    Amqtt,
    NatsServer,
    aedes_missing,
    amqtt_missing,
    nats_missing,
    require_broker,
)

# Threads that must not outlive a test: paho's network thread and the sync transport's loop.
_LEAK_PREFIXES = ("paho-mqtt-client-", "tandem-transport")


def _skip_without_mosquitto() -> None:
    require_broker(None if mosquitto_binary() else "mosquitto binary not found on PATH or in "
                   "/usr/sbin (install the 'mosquitto' package)")


def _process_factory(tmp_path_factory, cls, name: str):
    """The body of a ``*_factory`` fixture: ``make(start=True, **options)`` builds ``cls`` in a
    fresh directory; every process made is stopped (and waited for) when the test ends."""
    made: list = []

    def make(*, start: bool = True, **options):
        broker = cls(tmp_path_factory.mktemp(name), **options)
        made.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop()
    assert not any(b.running for b in made), f"a {name} process outlived its test"


def _skip_if(why: str | None) -> None:
    require_broker(why)  # a failure instead under TANDEM_REQUIRE_BROKERS=1


@pytest.fixture
def mosquitto_factory(tmp_path_factory):
    """Make brokers with options: ``mosquitto_factory(max_packet_size=1 << 20, users=...)``.

    Every broker made is started and is stopped (and waited for) when the test ends.
    """
    _skip_without_mosquitto()
    yield from _process_factory(tmp_path_factory, Mosquitto, "mosquitto")


@pytest.fixture
def nats_factory(tmp_path_factory):
    """Make nats-servers: ``nats_factory(max_payload=1 << 20, mqtt=True)``."""
    _skip_if(nats_missing())
    yield from _process_factory(tmp_path_factory, NatsServer, "nats")


@pytest.fixture
def amqtt_factory(tmp_path_factory):
    """Make amqtt brokers (MQTT 3.1.1)."""
    _skip_if(amqtt_missing())
    yield from _process_factory(tmp_path_factory, Amqtt, "amqtt")


@pytest.fixture
def aedes_factory(tmp_path_factory):
    """Make Aedes brokers: ``aedes_factory(no_delay=False)`` for node's stock socket setting."""
    _skip_if(aedes_missing())
    yield from _process_factory(tmp_path_factory, Aedes, "aedes")


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
