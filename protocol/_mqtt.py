"""Private wrapper around paho-mqtt v2: the ONE place paho is imported and its errors translated.

:class:`MqttClient` owns a paho client and its network thread (``loop_start``). It keeps its own
subscription table and re-subscribes on every CONNACK (it does not rely on the broker session),
turns TCP_NODELAY on for every socket paho opens, and reports through three callbacks, all called
on paho's network thread:

* ``on_message(IncomingMessage)`` for every PUBLISH received;
* ``on_connection(connected: bool, reason: str)``: True once a connection is *ready* (CONNACK
  received and the subscription table re-subscribed), False when it is lost;
* a SUBACK completion per :meth:`MqttClient.subscribe` call.

Callers (``protocol.transport``) hand these over to their event loop. Nothing of paho — classes,
return codes, exceptions — leaves this module: failures are :mod:`protocol.errors` exceptions,
chained with ``from`` to the paho/OS error that caused them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.errors import (
    InvalidArgument,
    PayloadTooLarge,
    PermissionDenied,
    TandemError,
    Unavailable,
)

__all__ = [
    "MAX_MQTT_PAYLOAD",
    "IncomingMessage",
    "MqttClient",
    "PublishProperties",
    "TlsConfig",
    "TransportConfig",
    "Will",
]

log = logging.getLogger("protocol.transport")

MAX_MQTT_PAYLOAD = 268_435_455  # protocol limit of a packet's remaining length
CONTENT_TYPE = "application/x-tandem+msgpack"

# CONNACK / SUBACK reason codes that mean "your credentials or ACL say no" (MQTT 5 values;
# paho maps MQTT 3.1.1 return codes 4/5 onto 0x86/0x87).
_AUTH_FAILURES = {0x86, 0x87, 0x8C}  # bad user name or password, not authorized, bad auth method


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
    Packet Size when it announces one).
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
    max_payload_bytes: int = 256 * 1024
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
        if not 1024 <= self.max_payload_bytes <= MAX_MQTT_PAYLOAD:
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

    The MQTT 5 fields are None on MQTT 3.1.1 or when the sender did not set them."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    message_expiry_s: int | None = None


def _reason_value(rc: object) -> int:
    if isinstance(rc, ReasonCode):
        return rc.value
    return int(rc)  # type: ignore[call-overload]


def _connect_error(rc: object) -> TandemError:
    value = _reason_value(rc)
    text = f"broker refused the connection: {rc} (0x{value:02x})"
    if value in _AUTH_FAILURES:
        return PermissionDenied(text)
    return Unavailable(text, retryable=value in (0x88, 0x89, 0x97, 0x9F))  # busy/unavailable


def translate(exc: BaseException, what: str) -> TandemError:
    """The boundary: a paho, socket or TLS exception → our error (the caller chains ``from``)."""
    if isinstance(exc, TandemError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermissionDenied(f"{what}: TLS certificate rejected: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return Unavailable(f"{what}: TLS failure: {exc}", retryable=False)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Unavailable(f"{what}: timed out")
    if isinstance(exc, OSError):
        return Unavailable(f"{what}: {exc.strerror or exc}")
    if isinstance(exc, ValueError):
        return InvalidArgument(f"{what}: {exc}")
    return Unavailable(f"{what}: {type(exc).__name__}: {exc}")


def _set_nodelay(sock: object) -> None:
    raw = getattr(sock, "setsockopt", None)
    if raw is None:  # paho may hand over a wrapper (websockets); nothing to tune there
        return
    with contextlib.suppress(OSError):
        raw(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


SubackCallback = Callable[["TandemError | None"], None]


class MqttClient:
    """A paho client on its own network thread, with our subscription table and our errors."""

    def __init__(
        self,
        config: TransportConfig,
        *,
        on_message: Callable[[IncomingMessage], None],
        on_connection: Callable[[bool, str], None],
    ) -> None:
        self.config = config
        self.client_id = config.client_id or f"tandem-{uuid.uuid4().hex[:16]}"
        self._on_message_cb = on_message
        self._on_connection_cb = on_connection
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}  # filter → qos, replayed on every CONNACK
        self._suback: dict[int, SubackCallback] = {}
        self._unsuback: dict[int, Callable[[], None]] = {}
        self._connected = False
        self._closing = False
        self._first_connack = threading.Event()
        self._first_error: TandemError | None = None
        self._resub_mid: int | None = None
        self.broker_max_packet: int | None = None  # from CONNACK (MQTT 5)
        self.v5 = config.protocol == 5
        # a random client id can never resume a session: start clean rather than leak one
        self.clean_start = config.clean_start or not config.client_id
        self._client = self._make_client()

    # -- construction ------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        c = self.config
        kwargs: dict = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": paho.MQTTv5 if self.v5 else paho.MQTTv311,
            "reconnect_on_failure": True,
        }
        if not self.v5:
            kwargs["clean_session"] = self.clean_start
        client = paho.Client(**kwargs)
        client.connect_timeout = c.connect_timeout_s
        client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(100)
        if c.username is not None:
            client.username_pw_set(c.username, c.password)
        if c.tls is not None:
            try:
                client.tls_set(
                    ca_certs=c.tls.ca_file,
                    certfile=c.tls.cert_file,
                    keyfile=c.tls.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
                client.tls_insecure_set(c.tls.insecure)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise InvalidArgument(f"bad TLS configuration: {exc}") from exc
        if c.will is not None:
            client.will_set(c.will.topic, c.will.payload, c.will.qos, c.will.retain)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    # -- lifecycle (called from any thread except paho's) --------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the connection and wait until it is ready: CONNACK received and every filter
        already in the table re-subscribed (blocking, at most ``connect_timeout_s``).

        Raises Unavailable (unreachable, timed out), PermissionDenied (credentials, TLS
        certificate) or InvalidArgument. After success, lost connections are re-established in
        the background with exponential backoff until :meth:`close`.
        """
        c = self.config
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if c.session_expiry_s:
                props.SessionExpiryInterval = int(c.session_expiry_s)
        deadline = time.monotonic() + c.connect_timeout_s
        try:
            if self.v5:
                self._client.connect(c.host, c.port, c.keepalive, clean_start=self.clean_start,
                                     properties=props)
            else:
                self._client.connect(c.host, c.port, c.keepalive)
        except Exception as exc:
            raise translate(exc, f"connect to {c.host}:{c.port}") from exc
        self._client.loop_start()
        if not self._first_connack.wait(max(0.0, deadline - time.monotonic())):
            self.close()
            raise Unavailable(f"no CONNACK from {c.host}:{c.port} within {c.connect_timeout_s}s")
        if self._first_error is not None:
            self.close()
            raise self._first_error

    def close(self) -> None:
        """DISCONNECT, stop the network thread and wait for it. Idempotent."""
        self._closing = True
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
        self._connected = False
        sock = self._client.socket()
        if sock is not None:  # loop_stop leaves the socket when the thread never ran it
            with contextlib.suppress(OSError):
                sock.close()

    # -- operations ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                props: PublishProperties | None = None) -> None:
        """Queue a PUBLISH (non-blocking). Raises Unavailable at once while disconnected.

        A publish that races a connection loss may still be delivered after the reconnect
        (QoS 1 is at-least-once anyway)."""
        if not self._connected:
            raise Unavailable(f"not connected to the broker; cannot publish to {topic!r}")
        properties = self._publish_properties(props) if (self.v5 and props) else None
        try:
            info = self._client.publish(topic, payload, qos, retain, properties)
        except ValueError as exc:
            if len(payload) > MAX_MQTT_PAYLOAD:
                raise PayloadTooLarge(f"{len(payload)} bytes exceed the MQTT limit") from exc
            raise InvalidArgument(f"cannot publish to {topic!r}: {exc}") from exc
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise Unavailable(f"connection lost while publishing to {topic!r}")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise Unavailable(f"publish to {topic!r} failed: {paho.error_string(rc)}")

    @staticmethod
    def _publish_properties(p: PublishProperties) -> Properties:
        props = Properties(PacketTypes.PUBLISH)
        if p.response_topic:
            props.ResponseTopic = p.response_topic
        if p.correlation_data is not None:
            props.CorrelationData = p.correlation_data
        if p.message_expiry_s is not None:
            props.MessageExpiryInterval = max(1, math.ceil(p.message_expiry_s))
        if p.content_type:
            props.ContentType = p.content_type
        return props

    def subscribe(self, topic_filter: str, qos: int, on_done: SubackCallback) -> None:
        """Add to the table (kept across reconnects) and, when connected, send SUBSCRIBE;
        ``on_done(None | error)`` runs on paho's thread when the SUBACK arrives. While
        disconnected ``on_done(None)`` runs at once: the filter is sent on the next CONNACK."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
            if not self._connected:
                on_done(None)
                return
            try:
                rc, mid = self._client.subscribe(topic_filter, qos)
            except ValueError as exc:
                del self._subscriptions[topic_filter]
                raise InvalidArgument(f"bad topic filter {topic_filter!r}: {exc}") from exc
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                on_done(None)  # lost the connection just now: replayed on the next CONNACK
                return
            self._suback[mid] = on_done

    def unsubscribe(self, topic_filter: str, on_done: Callable[[], None]) -> None:
        with self._lock:
            if self._subscriptions.pop(topic_filter, None) is None or not self._connected:
                on_done()
                return
            rc, mid = self._client.unsubscribe(topic_filter)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                on_done()
                return
            self._unsuback[mid] = on_done

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_socket_open(self, client, userdata, sock) -> None:
        _set_nodelay(sock)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            err = _connect_error(reason_code)
            log.warning("MQTT connect to %s:%s refused: %s", self.config.host,
                        self.config.port, err)
            if not self._first_connack.is_set():
                self._first_error = err
                self._first_connack.set()
            return
        if self.v5 and properties is not None:
            self.broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        with self._lock:
            self._connected = True
            # Our table, not the broker session, decides what we are subscribed to: replay it
            # in one SUBSCRIBE; "ready" is reported when its SUBACK arrives.
            self._resub_mid = None
            if self._subscriptions:
                _rc, mid = client.subscribe(list(self._subscriptions.items()))
                self._resub_mid = mid
            pending = list(self._suback.values())
            self._suback.clear()
        for cb in pending:  # SUBSCRIBEs lost with the old connection were just re-sent
            cb(None)
        if self._resub_mid is None:
            self._ready()

    def _ready(self) -> None:
        self._first_connack.set()
        self._safe(self._on_connection_cb, True, "connected")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected
        self._connected = False
        if not self._first_connack.is_set():
            self._first_error = Unavailable(f"connection closed before CONNACK: {reason_code}")
            self._first_connack.set()
        if was_connected:
            reason = "closed" if self._closing else f"connection lost: {reason_code}"
            if not self._closing:
                log.warning("MQTT %s:%s %s; reconnecting", self.config.host, self.config.port,
                            reason)
            self._safe(self._on_connection_cb, False, reason)

    def _on_message(self, client, userdata, msg) -> None:
        props = msg.properties if self.v5 else None
        incoming = IncomingMessage(
            topic=msg.topic,
            payload=msg.payload,
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            content_type=getattr(props, "ContentType", None),
            message_expiry_s=getattr(props, "MessageExpiryInterval", None),
        )
        self._safe(self._on_message_cb, incoming)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            cb = self._suback.pop(mid, None)
            resubscribed = mid == self._resub_mid and self._resub_mid is not None
            if resubscribed:
                self._resub_mid = None
        err = None
        for rc in reason_codes:
            value = _reason_value(rc)
            if value >= 0x80:
                err = (PermissionDenied if value in (0x80, 0x87) else Unavailable)(
                    f"broker refused the subscription: {rc} (0x{value:02x})")
                log.warning("%s", err)
        if cb is not None:
            self._safe(cb, err)
        if resubscribed:
            self._ready()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            cb = self._unsuback.pop(mid, None)
        if cb is not None:
            self._safe(cb)

    @staticmethod
    def _safe(fn, *args) -> None:
        """Never let a callback's exception into paho's thread (it would stop the loop)."""
        try:
            fn(*args)
        except Exception:
            log.exception("transport callback %r failed", fn)

