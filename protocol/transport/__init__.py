"""Transports of the split-execution protocol: one interface, several links.

* :class:`Transport` — the interface, an asyncio core with every semantic written once:
  ``publish`` / ``publish_message`` (→ :class:`PublishHandle`, awaitable for the broker's ack),
  ``subscribe`` / ``unsubscribe``, ``request`` (and its thread-safe entry
  ``request_threadsafe``), ``serve`` (handlers get the request and a :class:`RequestContext`),
  connection listeners, ``stats()`` (:class:`TransportStats`, :class:`ServeStats`);
* :class:`~tandem.protocol.mqtt.MqttTransport` — over MQTT (paho-mqtt; in
  :mod:`tandem.protocol.mqtt`, which imports paho);
* :class:`MemoryTransport` on a :class:`MemoryBroker` — in-process, for tests of the daemon
  and the endpoint without a broker process; the same contract tests hold it to the same
  semantics;
* :class:`SyncTransport` — the blocking shell over any of them.

:class:`TransportConfig` configures every transport. Topic names and filters are checked
against what brokers accept before anything is sent (:func:`check_topic`,
:func:`check_filter`). Nothing here imports paho.

Modules: :mod:`._config` (plain records), :mod:`._topics` (topic rules), :mod:`._serve`
(the answering side), :mod:`._share` (the shared-subscription self-check of ``serve``),
:mod:`._core` (the interface), :mod:`._sync`, :mod:`._memory`.
"""

from tandem.protocol.transport._config import (
    CONTENT_TYPE,
    DEFAULT_MAX_PAYLOAD_V5,
    DEFAULT_MAX_PAYLOAD_V311,
    MAX_EXPIRY_S,
    MAX_MQTT_PAYLOAD,
    TRANSPORT_LIMITS,
    IncomingMessage,
    PublishProperties,
    RequestContext,
    TlsConfig,
    TransportConfig,
    Will,
    expiry_for_budget,
    parse_protocol,
)
from tandem.protocol.transport._core import (
    OFFLOOP_DECODE_BYTES,
    Handler,
    PublishHandle,
    RefusalHandler,
    Transport,
    TransportStats,
)
from tandem.protocol.transport._memory import MemoryBroker, MemoryTransport
from tandem.protocol.transport._serve import RequestHandler, ServeStats
from tandem.protocol.transport._sync import SyncTransport
from tandem.protocol.transport._topics import check_filter, check_topic, topic_matches

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_PAYLOAD_V5",
    "DEFAULT_MAX_PAYLOAD_V311",
    "MAX_EXPIRY_S",
    "MAX_MQTT_PAYLOAD",
    "OFFLOOP_DECODE_BYTES",
    "TRANSPORT_LIMITS",
    "Handler",
    "IncomingMessage",
    "MemoryBroker",
    "MemoryTransport",
    "PublishHandle",
    "PublishProperties",
    "RefusalHandler",
    "RequestContext",
    "RequestHandler",
    "ServeStats",
    "SyncTransport",
    "TlsConfig",
    "Transport",
    "TransportConfig",
    "TransportStats",
    "Will",
    "check_filter",
    "check_topic",
    "expiry_for_budget",
    "parse_protocol",
    "topic_matches",
]
