"""The MQTT transport: an asyncio core (:class:`AsyncTransport`) under a thin sync shell
(:class:`Transport`), built on paho-mqtt 2.

Modules, each importing only the ones below it:

* :mod:`.transport` — requests, responses, subscriptions, chunking, serving;
* :mod:`._client` — the paho client's lifecycle driven from an asyncio loop (connect, reconnect,
  resubscribe, socket callbacks); paho's errors are translated here;
* :mod:`._wire` — the packet fast path (PUBLISH building and parsing, buffer pool);
* :mod:`._config` — plain configuration and message records, no paho.

Importing this package imports paho; ``import tandem.protocol`` does not (its transport names
load on first use).
"""

from tandem.protocol.mqtt._config import IncomingMessage, PublishProperties, TlsConfig, Will
from tandem.protocol.mqtt.transport import (
    AsyncTransport,
    Handler,
    RequestHandler,
    Transport,
    TransportConfig,
    topic_matches,
)

__all__ = [
    "AsyncTransport",
    "Handler",
    "IncomingMessage",
    "PublishProperties",
    "RequestHandler",
    "TlsConfig",
    "Transport",
    "TransportConfig",
    "Will",
    "topic_matches",
]
