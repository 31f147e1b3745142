"""The MQTT transport: :class:`MqttTransport`, the :class:`~tandem.protocol.transport.Transport`
interface over paho-mqtt 2 (the semantics are the interface's; this module is only the link).

* **Connection.** ``protocol="auto"`` (the default) negotiates: MQTT 5, or 3.1.1 when the
  broker refuses 5 or closes the socket before its CONNACK; the answer is kept for reconnects
  (:attr:`MqttTransport.protocol_version`). An explicit 5 or 311 is used as it is. TCP_NODELAY
  on every socket. A lost connection is re-established in the background with exponential
  backoff (``reconnect_min_s`` … ``reconnect_max_s``; the delay starts over once a connection
  has stayed up and re-subscribed for ``stable_after_s``) and every filter of our own table is
  sent again — we never rely on the broker's session alone. A filter the broker refuses leaves
  the table and its owner hears why (``on_refused``; see :mod:`._client`).
* **Shared subscriptions** are checked: ``serve`` on a ``$share/…`` filter sends a probe
  through it and fails at once on a broker that accepts such filters and delivers nothing
  (:mod:`tandem.protocol.transport._share`).
* **Persistent sessions.** With a fixed ``client_id``, ``clean_start=False`` and
  ``session_expiry_s > 0`` the broker keeps the subscriptions and queues QoS 1 messages while the
  client is away, and delivers them right after the next CONNACK, before the application can
  subscribe again: the interface holds them (bounded) for the first handler that subscribes.
* On MQTT 5 a request also carries ResponseTopic, CorrelationData (= request id),
  MessageExpiryInterval (= ceil(budget_ms / 1000) s, none for a budget past 2³²−1 s) and
  ContentType ``application/x-tandem+msgpack``; a reply carries the correlation data back.
* ``publish`` returns a handle completed by the broker's PUBACK.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tandem.protocol.errors import TandemError
from tandem.protocol.mqtt._client import Frame, MqttClient
from tandem.protocol.transport import (
    DEFAULT_MAX_PAYLOAD_V311,
    PublishProperties,
    Transport,
    TransportConfig,
)

__all__ = ["MqttTransport"]

# Room left in a packet for the fixed header, topic and properties when the broker announces a
# Maximum Packet Size (MQTT 5): the chunk size is capped at that size minus this.
_PACKET_OVERHEAD = 1024

Buffer = bytes | bytearray | memoryview


class MqttTransport(Transport):
    """:class:`~tandem.protocol.transport.Transport` over MQTT (paho-mqtt 2, driven by the
    event loop: no network thread). Create it anywhere; :meth:`connect` binds it to the
    running loop."""

    _checks_shared_subscriptions = True  # brokers may accept $share/ and deliver nothing

    def __init__(self, config: TransportConfig | None = None) -> None:
        super().__init__(TransportConfig() if config is None else config)
        self._mqtt: MqttClient | None = None

    @property
    def protocol_version(self) -> int | None:
        """The MQTT version in use: 5 or 311 (with ``protocol="auto"``, the one the broker
        took on the first connect); None before :meth:`connect`."""
        return self._mqtt.protocol_version if self._mqtt is not None else None

    @property
    def connected(self) -> bool:
        return self._mqtt is not None and self._mqtt.connected

    @property
    def client_id(self) -> str:
        return self._mqtt.client_id if self._mqtt else self.config.client_id

    def chunk_size(self) -> int:
        mqtt = self._mqtt
        if mqtt is None:
            return self.config.max_payload_bytes or DEFAULT_MAX_PAYLOAD_V311
        size = mqtt.max_payload_bytes
        broker_max = mqtt.broker_max_packet
        if broker_max:
            size = min(size, max(1024, broker_max - _PACKET_OVERHEAD))
        return size

    # -- the link ------------------------------------------------------------------------------

    async def _connect_impl(self) -> None:
        assert self._loop is not None
        self._mqtt = MqttClient(self.config, self._loop, on_message=self._deliver,
                                on_connection=self._link_changed,
                                on_refused=self._subscription_refused)
        await self._mqtt.connect()

    async def _close_impl(self, timeout_s: float) -> None:
        if self._mqtt is not None:
            await self._mqtt.close(timeout_s)

    def _packet(self, topic: str, parts: Sequence[Buffer], total: int, qos: int,
                props: PublishProperties | None) -> Frame:
        # the PUBLISH packet built around the payload: each part copied once, into it
        assert self._mqtt is not None
        return self._mqtt.frame(topic, parts, total, qos, props)

    def _send_packet(self, packet: Any, topic: str, qos: int, retain: bool,
                     props: PublishProperties | None,
                     want_ack: bool) -> asyncio.Future | None:
        assert self._mqtt is not None
        return self._mqtt.publish_frame(packet, retain, want_ack)

    def _subscribe_impl(self, topic_filter: str, qos: int) -> asyncio.Future:
        assert self._mqtt is not None and self._loop is not None
        answer: asyncio.Future[TandemError | None] = self._loop.create_future()
        self._mqtt.subscribe(topic_filter, qos, lambda err: _settle(answer, err))
        return answer

    def _unsubscribe_impl(self, topic_filter: str) -> asyncio.Future:
        assert self._mqtt is not None and self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        self._mqtt.unsubscribe(topic_filter, lambda: _settle(done, None))
        return done

    def _unacked_count(self) -> int:
        return self._mqtt.unacked if self._mqtt is not None else 0

    def _link_rtt_s(self) -> float | None:
        return self._mqtt.connect_rtt_s if self._mqtt is not None else None


def _settle(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)
