"""The MQTT transport: :class:`MqttTransport`, the :class:`~tandem.protocol.transport.Transport`
interface over paho-mqtt 2 (wrap it in :class:`~tandem.protocol.transport.SyncTransport` for a
blocking API).

Modules, each importing only the ones below it:

* :mod:`.transport` — :class:`MqttTransport`: the link under the interface's semantics;
* :mod:`._client` — the paho client's lifecycle driven from an asyncio loop (connect, reconnect,
  resubscribe, acknowledgements, socket callbacks); paho's errors are translated here;
* :mod:`._wire` — the packet fast path (PUBLISH building and parsing, buffer pool).

Importing this package imports paho; ``import tandem.protocol`` does not (its transport names
load on first use).
"""

from tandem.protocol.mqtt.transport import MqttTransport

__all__ = ["MqttTransport"]
