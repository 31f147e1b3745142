"""Persistent sessions: a device that goes away keeps its subscriptions and QoS 1 messages on the
broker, and gets them when it comes back with the same client id (real mosquitto)."""

from __future__ import annotations

import queue

import pytest

from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import SyncTransport, TransportConfig

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

TOPIC = "tandem/v1/assign/cam-persist"


def Transport(cfg: TransportConfig) -> SyncTransport:
    return SyncTransport(MqttTransport(cfg))


@pytest.mark.parametrize("protocol", [5, 311])
def test_messages_published_while_away_arrive_on_return(mosquitto, protocol):
    persistent = TransportConfig(host=mosquitto.host, port=mosquitto.port, protocol=protocol,
                                 client_id=f"cam-persist-{protocol}", clean_start=False,
                                 session_expiry_s=300)
    got: queue.Queue[bytes] = queue.Queue()
    with Transport(persistent) as device:
        device.subscribe(TOPIC, lambda msg: got.put(bytes(msg.payload)))
    # the device is away; the fleet publishes an assignment (QoS 1, not retained)
    with Transport(TransportConfig(host=mosquitto.host, port=mosquitto.port)) as fleet:
        fleet.publish(TOPIC, b"while-away", qos=1)
    with Transport(persistent) as device:
        # queued messages may arrive before the application subscribes again: the transport
        # holds them for the handler instead of dropping them
        device.subscribe(TOPIC, lambda msg: got.put(bytes(msg.payload)))
        assert got.get(timeout=10) == b"while-away"
        fleet_again = Transport(TransportConfig(host=mosquitto.host, port=mosquitto.port))
        with fleet_again:
            fleet_again.publish(TOPIC, b"while-here", qos=1)
        assert got.get(timeout=10) == b"while-here"
    assert got.empty()


def test_clean_session_forgets(mosquitto):
    cfg = TransportConfig(host=mosquitto.host, port=mosquitto.port, client_id="cam-clean",
                          clean_start=True)
    got: queue.Queue[bytes] = queue.Queue()
    with Transport(cfg) as device:
        device.subscribe(TOPIC, lambda msg: got.put(bytes(msg.payload)))
    with Transport(TransportConfig(host=mosquitto.host, port=mosquitto.port)) as fleet:
        fleet.publish(TOPIC, b"lost", qos=1)
    with Transport(cfg) as device:
        device.subscribe(TOPIC, lambda msg: got.put(bytes(msg.payload)))
        with Transport(TransportConfig(host=mosquitto.host, port=mosquitto.port)) as fleet:
            fleet.publish(TOPIC, b"fresh", qos=1)
        assert got.get(timeout=10) == b"fresh"
    assert got.empty()
