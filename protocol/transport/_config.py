"""What configures a transport and what it hands to handlers: plain data, no paho, no asyncio.

Shared by every transport (MQTT, in-memory, and later NATS) and by the MQTT client internals;
importing it costs nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.protocol.codec import Limits
from tandem.protocol.errors import InvalidArgument

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_PAYLOAD_V5",
    "DEFAULT_MAX_PAYLOAD_V311",
    "MAX_EXPIRY_S",
    "MAX_MQTT_PAYLOAD",
    "TRANSPORT_LIMITS",
    "IncomingMessage",
    "PublishProperties",
    "RequestContext",
    "TlsConfig",
    "TransportConfig",
    "Will",
    "expiry_for_budget",
    "parse_protocol",
]

MAX_MQTT_PAYLOAD = 268_435_455  # protocol limit of a packet's remaining length
DEFAULT_MAX_PAYLOAD_V5 = 16 * 1024 * 1024  # capped by the broker's announced Maximum Packet Size
DEFAULT_MAX_PAYLOAD_V311 = 1024 * 1024 - 1024  # no announcement on 3.1.1: fits a 1 MB broker cap
MAX_EXPIRY_S = 2**32 - 1  # MessageExpiryInterval is a four byte integer (MQTT 5 §3.3.2.3.3)
CONTENT_TYPE = "application/x-tandem+msgpack"

TRANSPORT_LIMITS = Limits(max_message_bytes=64 * 2**20, max_tensor_bytes=64 * 2**20)
"""What a transport decodes by default: the codec's defaults with 64 MiB per message (also the
largest message it sends or reassembles)."""


def parse_protocol(value: object) -> str | int:
    """An MQTT protocol setting as :class:`TransportConfig` takes it: ``"auto"``, ``5`` or
    ``311`` (also from the strings ``"5"``/``"311"``, any case and spacing, as a command line,
    an environment variable or a TOML file gives them). InvalidArgument otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("5", "311"):
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value in (5, 311):
        return value
    raise InvalidArgument(f"MQTT protocol must be 'auto', 5 or 311, not {value!r}")


def expiry_for_budget(budget_ms: int) -> int | None:
    """The MessageExpiryInterval (s) for a request with ``budget_ms``: the budget rounded up,
    at least 1 s; None (no expiry) for a budget the 32-bit property cannot hold."""
    seconds = max(1, math.ceil(budget_ms / 1000))
    return None if seconds > MAX_EXPIRY_S else seconds


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
    """How to reach the broker and behave on it. One record for every transport: the MQTT
    transport uses all of it; :class:`~tandem.protocol.transport.MemoryTransport` ignores what
    only a network needs (host, port, credentials, TLS, protocol, keepalive, reconnect delays).

    ``protocol`` is ``"auto"`` (default), 5 (MQTT 5) or 311 (MQTT 3.1.1; everything Tandem needs
    also travels in the payload). ``"auto"`` tries MQTT 5 and falls back to 3.1.1 when the
    broker refuses 5 (CONNACK 0x84, or 3.1.1's return code 1) or closes the socket before its
    CONNACK (RabbitMQ before 3.13); the version that worked is kept for every reconnect and
    logged once. An explicit version is used as it is: a broker refusing it is a one-line error
    naming the version. ``clean_start=False`` with ``session_expiry_s > 0`` and a stable
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

    Reconnects: a lost connection is opened again after ``reconnect_min_s``, doubling up to
    ``reconnect_max_s`` while attempts fail; the delay starts over only once a connection has
    stayed up (CONNACK received, every filter re-subscribed) for ``stable_after_s``, so a broker
    that accepts connections and drops them again (a duplicate client id, a filter it kicks
    clients for) meets a growing delay, not a reconnect storm.

    Inbound flow control (what a server takes from the broker before it can start it):

    * ``receive_maximum`` (MQTT 5): the CONNECT Receive Maximum, how many QoS 1/2 messages the
      broker may have sent this client and not had acknowledged (None: the protocol's 65535).
      Only bounds anything together with ``manual_ack``.
    * ``manual_ack``: QoS 1/2 messages are acknowledged when the application is done taking
      them, not on arrival: a request handed to :meth:`serve` when its handler calls
      :attr:`RequestContext.ack` (a handler that queues requests: when it starts one), at the
      latest when it is answered; every other message (chunks, refused or undecodable
      requests, other subscriptions) on arrival. PUBACKs go out in the order the messages came
      (MQTT §4.6): an acknowledgement waits for those of earlier messages. So a busy client holds
      at most ``receive_maximum`` messages it has not started (on MQTT 3.1.1: the broker's own
      in-flight limit, mosquitto's ``max_inflight_messages``), and what it never acknowledged
      is the broker's to deliver again (to a persistent session) when the client dies.

    Shared subscriptions: a broker may accept a ``$share/<group>/…`` SUBSCRIBE and deliver
    nothing through it (amqtt, Aedes, NATS's MQTT gateway, RabbitMQ). ``serve`` on such a filter
    therefore sends a probe through it and fails (FailedPrecondition) when none arrives within
    ``share_check_timeout_s`` (0 turns the check off); see :mod:`._share`.

    Limits on what peers send (SPEC.md §6):

    * ``limits``: the codec :class:`~tandem.protocol.codec.Limits` for everything this transport
      decodes and encodes; ``limits.max_message_bytes`` is also the largest message it sends or
      reassembles. ``serve`` may set tighter limits per handler.
    * ``max_reassembly_bytes``: memory all incomplete chunk sets may hold together (None: room
      for two messages of the limit); one topic (device) may hold one message's worth, so one
      sender never evicts another's sets (:class:`tandem.protocol.chunking.Reassembler`
      quotas); a set missing a piece ``reassembly_timeout_s`` after its first chunk is dropped
      (checked on a timer).
    * Messages that match no handler (a persistent session's backlog, delivered before the
      application subscribes again) are held for the first handler that subscribes for them:
      at most ``max_unclaimed_messages`` messages, ``max_unclaimed_bytes`` bytes, each for
      ``unclaimed_ttl_s``.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # "" = a fresh random id ("tandem-<hex>")
    protocol: str | int = "auto"
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = 30
    clean_start: bool = False
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 10.0
    stable_after_s: float = 5.0
    max_payload_bytes: int | None = None  # None: by protocol, see above
    connect_timeout_s: float = 5.0
    share_check_timeout_s: float = 3.0
    qos: int = 1
    receive_maximum: int | None = None  # MQTT 5 CONNECT Receive Maximum; see above
    manual_ack: bool = False  # acknowledge when started, not on arrival; see above
    will: Will | None = None
    limits: Limits = TRANSPORT_LIMITS
    max_reassembly_bytes: int | None = None
    reassembly_timeout_s: float = 30.0
    max_unclaimed_messages: int = 1024
    max_unclaimed_bytes: int = 16 * 2**20
    unclaimed_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", parse_protocol(self.protocol))
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65535:
            raise InvalidArgument(f"receive_maximum must be in [1, 65535], not "
                                  f"{self.receive_maximum}")
        if self.qos not in (0, 1, 2):
            raise InvalidArgument(f"qos must be 0, 1 or 2, not {self.qos!r}")
        if self.max_payload_bytes is not None and \
                not 1024 <= self.max_payload_bytes <= MAX_MQTT_PAYLOAD:
            raise InvalidArgument(f"max_payload_bytes out of range: {self.max_payload_bytes}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise InvalidArgument("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.connect_timeout_s <= 0:
            raise InvalidArgument("connect_timeout_s must be > 0")
        if not self.stable_after_s >= 0 or not self.share_check_timeout_s >= 0:
            raise InvalidArgument("stable_after_s and share_check_timeout_s must be >= 0")
        if self.password is not None and self.username is None:
            raise InvalidArgument("a password needs a username")
        if not isinstance(self.limits, Limits):
            raise InvalidArgument(f"limits must be a codec Limits, not {type(self.limits)}")
        if self.max_reassembly_bytes is not None and self.max_reassembly_bytes < 1:
            raise InvalidArgument("max_reassembly_bytes must be >= 1")
        if self.reassembly_timeout_s <= 0 or self.unclaimed_ttl_s <= 0:
            raise InvalidArgument("reassembly_timeout_s and unclaimed_ttl_s must be > 0")
        if self.max_unclaimed_messages < 0 or self.max_unclaimed_bytes < 0:
            raise InvalidArgument("max_unclaimed_messages and max_unclaimed_bytes must be >= 0")


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

    The MQTT 5 fields are None on MQTT 3.1.1 or when the sender did not set them. Handlers of
    :meth:`~tandem.protocol.transport.Transport.subscribe` get ``payload`` as immutable bytes."""

    topic: str
    payload: bytes | bytearray | memoryview
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    message_expiry_s: int | None = None
    ack: Callable[[], None] | None = None  # with manual_ack: acknowledge (once; idempotent)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a served request arrived with, handed to the handler next to the request.

    ``device_id`` and ``model`` come from the request topic (``tandem/v1/req/<device>/<model>``,
    which broker ACLs bind to the sender), not from the payload; ``reply_topic`` is where the
    answer goes (always that device's response topic). Times are ``time.monotonic()`` seconds:
    ``received_at_s`` when the (reassembled) request arrived, ``deadline_s`` when an answer
    stops being useful — the request's ``budget_ms`` and the MQTT 5 message expiry, whichever
    ends first, counted from arrival — or None when neither bounds it."""

    topic: str
    device_id: str
    model: str
    reply_topic: str
    received_at_s: float
    deadline_s: float | None
    message_expiry_s: int | None = None
    correlation_data: bytes | None = None
    payload_bytes: int = 0
    ack: Callable[[], None] | None = None

    def started(self) -> None:
        """Tell the transport the request is started (a queueing handler calls it when its
        compute begins): with ``TransportConfig.manual_ack`` its PUBACK goes out now rather
        than when it is answered. Idempotent; a no-op on other transports."""
        if self.ack is not None:
            self.ack()

    def remaining_s(self) -> float | None:
        """Seconds left before :attr:`deadline_s` (negative once passed), or None."""
        return None if self.deadline_s is None else self.deadline_s - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.deadline_s is not None and time.monotonic() >= self.deadline_s
