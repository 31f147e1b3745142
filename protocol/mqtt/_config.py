"""What configures the MQTT transport and what it hands to handlers: plain data, no paho.

Shared by the client lifecycle (:mod:`._client`), the packet fast path (:mod:`._wire`) and the
transport; importing it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.protocol.errors import InvalidArgument

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_PAYLOAD_V5",
    "DEFAULT_MAX_PAYLOAD_V311",
    "MAX_MQTT_PAYLOAD",
    "IncomingMessage",
    "PublishProperties",
    "TlsConfig",
    "TransportConfig",
    "Will",
]

MAX_MQTT_PAYLOAD = 268_435_455  # protocol limit of a packet's remaining length
DEFAULT_MAX_PAYLOAD_V5 = 16 * 1024 * 1024  # capped by the broker's announced Maximum Packet Size
DEFAULT_MAX_PAYLOAD_V311 = 1024 * 1024 - 1024  # no announcement on 3.1.1: fits a 1 MB broker cap
CONTENT_TYPE = "application/x-tandem+msgpack"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to the broker. ``ca_file`` None = the system trust store; ``cert_file``/``key_file``
    for client certificates; ``insecure`` skips the host name check (never in production)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class Will:
    """Last will, published by the broker when the connection is lost without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """How to reach the broker and behave on it.

    ``protocol`` is 5 (MQTT 5, default) or 311 (MQTT 3.1.1; everything Tandem needs also travels
    in the payload). ``clean_start=False`` with ``session_expiry_s > 0`` and a stable
    ``client_id`` asks the broker for a persistent session (MQTT 3.1.1: ``clean_session``).
    Payloads larger than ``max_payload_bytes`` are chunked (also capped by the broker's Maximum
    Packet Size when it announces one). ``None`` (default) picks by protocol:

    * MQTT 5: :data:`DEFAULT_MAX_PAYLOAD_V5` (16 MiB). Brokers with a smaller cap announce it in
      CONNACK (Maximum Packet Size: EMQX's default ``max_packet_size`` is 1 MB; mosquitto's
      default is the protocol maximum, 256 MB) and chunks are capped to it, so a 1 MB tensor
      travels as one PUBLISH wherever the broker allows it (chunking costs copies and packets).
    * MQTT 3.1.1: :data:`DEFAULT_MAX_PAYLOAD_V311` (1 MiB - 1 KiB): 3.1.1 has no way to announce
      a cap, and a broker drops the connection on a packet over its cap; this fits EMQX's default.
      Set it lower for brokers with smaller caps (e.g. AWS IoT Core: 128 KB).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # "" = a fresh random id ("tandem-<hex>")
    protocol: int = 5
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive: int = 30
    clean_start: bool = False
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 10.0
    max_payload_bytes: int | None = None  # None: by protocol, see above
    connect_timeout_s: float = 5.0
    qos: int = 1
    will: Will | None = None
    max_message_bytes: int = 64 * 1024 * 1024  # largest reassembled message accepted
    reassembly_timeout_s: float = 30.0  # a chunk set missing a piece this long is dropped

    def __post_init__(self) -> None:
        if self.protocol not in (5, 311):
            raise InvalidArgument(f"protocol must be 5 or 311, not {self.protocol!r}")
        if self.qos not in (0, 1, 2):
            raise InvalidArgument(f"qos must be 0, 1 or 2, not {self.qos!r}")
        if self.max_payload_bytes is not None and \
                not 1024 <= self.max_payload_bytes <= MAX_MQTT_PAYLOAD:
            raise InvalidArgument(f"max_payload_bytes out of range: {self.max_payload_bytes}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise InvalidArgument("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.connect_timeout_s <= 0:
            raise InvalidArgument("connect_timeout_s must be > 0")
        if self.password is not None and self.username is None:
            raise InvalidArgument("a password needs a username")


@dataclass(frozen=True, slots=True)
class PublishProperties:
    """MQTT 5 properties Tandem sets on a PUBLISH (ignored on MQTT 3.1.1)."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry_s: int | None = None
    content_type: str | None = CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A PUBLISH as received (after chunk reassembly when it reaches a handler).

    The MQTT 5 fields are None on MQTT 3.1.1 or when the sender did not set them. From the
    MQTT client, a payload of 64 KiB or more is a read-only memoryview of its own packet buffer
    (not copied); the transport hands its subscribers' handlers bytes (see
    ``protocol.transport``)."""

    topic: str
    payload: bytes | memoryview
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    message_expiry_s: int | None = None
