"""Private wrapper around paho-mqtt v2: with _mqtt_wire, the only place paho is imported; errors
are translated here.

:class:`MqttClient` drives a paho client from an asyncio event loop — no paho network thread.
paho's external-loop interface is used: the socket is registered with ``loop.add_reader`` /
``add_writer`` (``loop_read`` / ``loop_write``), a timer runs ``loop_misc`` (keepalive), and only
the blocking TCP/TLS connect runs in an executor thread. Every callback therefore runs on the
loop thread, and a message costs no thread hop between the socket and its handler (a network
thread handing messages over with ``call_soon_threadsafe`` doubled the round-trip time on a
2-core machine).

The MQTT version is negotiated on the first connect when the configuration says ``"auto"``: MQTT
5 first, MQTT 3.1.1 when the broker refuses 5 (CONNACK 0x84; paho reads 3.1.1's return code 1 the
same way), closes the socket before its CONNACK, or leaves the CONNECT unanswered for
``connect_timeout_s``; the version that worked is kept for every reconnect (a new paho client is
made for the fallback: paho fixes the version per client) and logged once.

The client keeps its own subscription table and re-subscribes on every CONNACK (it does not rely
on the broker session), reconnects with exponential backoff — the delay starts over only once a
connection has stayed ready for ``stable_after_s``, never on a bare CONNACK — turns TCP_NODELAY
on for every socket paho opens, and reports through callbacks (all on the loop thread):

* ``on_message(IncomingMessage)`` for every PUBLISH received;
* ``on_connection(connected: bool, reason: str)``: True once a connection is *ready* (CONNACK
  received and the subscription table re-subscribed), False when it is lost;
* a SUBACK completion per :meth:`MqttClient.subscribe` call: None, or the error when the broker
  refused the filter — by a SUBACK failure code, or by closing the connection before it answered
  (what mosquitto does with a filter it calls malformed); a refused filter leaves the table;
* ``on_refused(filter, error)`` when a filter of the table is refused on a re-subscribe (each
  filter is re-sent in its own SUBSCRIBE so the broker's answer names it; a filter that was the
  first unanswered one when the connection closed, twice in a row, counts as refused): it is
  dropped from the table, so a filter the broker rejects is never replayed in a loop;
* an acknowledgement future per :meth:`MqttClient.publish_frame` that asks for one.

Nothing of paho — classes, return codes, exceptions — leaves this module: failures are
:mod:`tandem.protocol.errors` exceptions, chained with ``from`` to the paho/OS error that
caused them.
Not thread-safe: call it from its loop's thread only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tandem.protocol.errors import (
    InvalidArgument,
    PayloadTooLarge,
    PermissionDenied,
    TandemError,
    Unavailable,
)
from tandem.protocol.mqtt._wire import (
    _FAST_PUBLISH,
    MAX_MQTT_PAYLOAD,
    Frame,
    _BufferPool,
    _build_frame,
    _PackedProperties,
    _PahoClient,
)
from tandem.protocol.transport import (
    DEFAULT_MAX_PAYLOAD_V5,
    DEFAULT_MAX_PAYLOAD_V311,
    IncomingMessage,
    PublishProperties,
    TransportConfig,
)

__all__ = ["MAX_MQTT_PAYLOAD", "Frame", "MqttClient"]

log = logging.getLogger("tandem.protocol.mqtt")

# a filter that was the first unanswered one when the connection closed this many times in a
# row (on re-subscribes) counts as refused by the broker and is dropped
_REFUSAL_STRIKES = 2
_READ_PACKETS_PER_EVENT = 256  # packets read per socket read event before the loop runs others


# CONNACK / SUBACK reason codes that mean "your credentials or ACL say no" (MQTT 5 values;
# paho maps MQTT 3.1.1 return codes 4/5 onto 0x86/0x87).
_AUTH_FAILURES = {0x86, 0x87, 0x8C}  # bad user name or password, not authorized, bad auth method


def _reason_value(rc: object) -> int:
    if isinstance(rc, ReasonCode):
        return rc.value
    return int(rc)  # type: ignore[call-overload]


_VERSION_REFUSED = 0x84  # CONNACK "Unsupported Protocol Version" (3.1.1's return code 1)


_FALLBACK_WHY = {"version": "refused", "closed": "connection closed before CONNACK",
                 "timeout": "CONNECT unanswered"}


def _version_name(v5: bool) -> str:
    return "MQTT 5" if v5 else "MQTT 3.1.1"


def _why(err: TandemError) -> str:
    """The broker's reason in a connect error, without our prefix."""
    for prefix in ("broker refused the connection: ", "connection closed before CONNACK: "):
        if err.message.startswith(prefix):
            return err.message[len(prefix):]
    return err.message


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


def _refusal(rc: object, topic_filter: str) -> TandemError:
    value = _reason_value(rc)
    cls = PermissionDenied if value in (0x80, 0x87) else InvalidArgument if value in (
        0x8F, 0x9E, 0xA1, 0xA2) else Unavailable
    return cls(f"broker refused the subscription {topic_filter!r}: {rc} (0x{value:02x})")


class MqttClient:
    """A paho client driven by an asyncio loop, with our subscription table and our errors."""

    def __init__(
        self,
        config: TransportConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        on_message: Callable[[IncomingMessage], None],
        on_connection: Callable[[bool, str], None],
        on_refused: Callable[[str, TandemError], None] = lambda f, e: None,
    ) -> None:
        self.config = config
        self.client_id = config.client_id or f"tandem-{uuid.uuid4().hex[:16]}"
        self._loop = loop
        self._on_message_cb = on_message
        self._on_connection_cb = on_connection
        self._on_refused_cb = on_refused
        self._subscriptions: dict[str, int] = {}  # filter → qos, replayed on every CONNACK
        self._suback: dict[int, tuple[str, SubackCallback]] = {}
        self._unsuback: dict[int, Callable[[], None]] = {}
        self._resub: dict[int, str] = {}  # re-subscribe SUBACKs still awaited: mid → filter
        self._strikes: dict[str, int] = {}
        self._acks: dict[int, asyncio.Future] = {}  # QoS > 0 publishes waiting for their ack
        self._ack_queue: collections.deque[list] = collections.deque()  # manual_ack, in order
        self._ack_generation = 0  # one per connection: see _acker
        self._connected = False
        self._closing = False
        self._first: asyncio.Future[TandemError | None] | None = None
        self._first_kind: str | None = None  # "version" (0x84), "closed" (before CONNACK)
        self._connect_sent = 0.0
        self.connect_rtt_s: float | None = None  # CONNECT → CONNACK, the fastest seen
        self._sock: Any = None  # the socket registered with the loop
        self._writer = False
        self._flush_pending = False
        self._in_paho = False  # inside paho's loop_read/loop_write/loop_misc: never re-enter
        self._in_read = False  # inside a socket read event (_readable)
        self._misc_timer: asyncio.TimerHandle | None = None
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Future | None = None
        self._reconnect_delay = config.reconnect_min_s
        self._stable_timer: asyncio.TimerHandle | None = None
        self._socket_closed = asyncio.Event()
        self.broker_max_packet: int | None = None  # from CONNACK (MQTT 5)
        self.auto = config.protocol == "auto"  # negotiate: MQTT 5, else 3.1.1
        self.v5 = config.protocol != 311  # the version of the current paho client
        # a random client id can never resume a session: start clean rather than leak one
        self.clean_start = config.clean_start or not config.client_id
        self._tx_pool = _BufferPool()  # outgoing Frames (see _BufferPool)
        self._client = self._make_client()

    # -- construction ------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        c = self.config
        kwargs: dict = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": paho.MQTTv5 if self.v5 else paho.MQTTv311,
            "reconnect_on_failure": False,  # we reconnect ourselves, with backoff
        }
        if not self.v5:
            kwargs["clean_session"] = self.clean_start
        if c.manual_ack:
            kwargs["manual_ack"] = True
        client = (_PahoClient if _FAST_PUBLISH else paho.Client)(**kwargs)
        if isinstance(client, _PahoClient):
            client._rx_pool = _BufferPool()  # received packets (see _BufferPool)
        client.connect_timeout = c.connect_timeout_s
        client.max_inflight_messages_set(100)
        client.suppress_exceptions = True  # a bug in a callback must not unwind paho's reader
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
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        return client

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def unacked(self) -> int:
        """QoS > 0 publishes the broker has not acknowledged yet (paho keeps them to resend)."""
        return len(self._client._out_messages)

    @property
    def max_payload_bytes(self) -> int:
        """The configured chunk size, or the protocol's default (see :class:`TransportConfig`)."""
        if self.config.max_payload_bytes is not None:
            return self.config.max_payload_bytes
        return DEFAULT_MAX_PAYLOAD_V5 if self.v5 else DEFAULT_MAX_PAYLOAD_V311

    @property
    def protocol_version(self) -> int:
        """5 or 311: the MQTT version this client speaks (after :meth:`connect`, the one the
        broker took)."""
        return 5 if self.v5 else 311

    async def connect(self) -> None:
        """Open the connection and wait until it is ready: CONNACK received and every filter
        already in the table re-subscribed (at most ``connect_timeout_s`` per attempt).

        With protocol ``"auto"``, a broker that refuses MQTT 5, closes the socket before its
        CONNACK, or leaves the MQTT 5 CONNECT unanswered (amqtt misreads one that carries a will,
        a user name or properties and waits for bytes that never come) is tried again with MQTT
        3.1.1, and that version is kept. Raises Unavailable (unreachable, timed out, a version
        refused: the message names it), PermissionDenied (credentials, TLS certificate) or
        InvalidArgument. After success, lost connections are re-established in the background
        with exponential backoff until :meth:`close`.
        """
        c = self.config
        err, kind = await self._connect_once()
        if err is not None and kind is not None and self.auto and self.v5:
            first = err
            log.info("MQTT 5 %s by %s:%s; trying MQTT 3.1.1", _FALLBACK_WHY[kind], c.host, c.port)
            self._drop_socket()
            self.v5 = False
            self._client = self._make_client()  # paho fixes the version per client
            err, kind = await self._connect_once()
            if err is not None and kind is not None:
                err = Unavailable(
                    f"the broker at {c.host}:{c.port} took neither MQTT 5 ({_why(first)}) nor "
                    f"MQTT 3.1.1 ({_why(err)})", retryable=kind != "version")
        elif err is not None and kind is not None:
            err = self._version_error(err, kind)
        if err is not None:
            await self.close()
            raise err
        log.info("MQTT connected to %s:%s with %s%s", c.host, c.port, _version_name(self.v5),
                 " (MQTT 5 not taken; kept for reconnects)" if self.auto and not self.v5 else "")
        self._schedule_misc()

    async def _connect_once(self) -> tuple[TandemError | None, str | None]:
        """One connect with the current paho client: (None, None) once ready, or the error and
        its kind ("version": CONNACK 0x84; "closed": the socket closed before CONNACK;
        "timeout": no CONNACK in time, reported only while "auto" may still fall back; None:
        anything else). Raises (after :meth:`close`) when the broker cannot be reached or does
        not answer in time."""
        c = self.config
        self._first = self._loop.create_future()
        self._first_kind = None
        try:
            await asyncio.wait_for(self._open(first=True), c.connect_timeout_s)
        except BaseException:
            await self.close()
            raise
        try:
            err = await asyncio.wait_for(asyncio.shield(self._first), c.connect_timeout_s)
        except asyncio.TimeoutError:
            hint = ""
            if self.v5 and self._sock is not None and not self._connected:
                if self.auto:
                    return Unavailable(f"no CONNACK within {c.connect_timeout_s:g}s"), "timeout"
                hint = (" (a broker that does not speak MQTT 5 may leave the CONNECT unanswered, "
                        "as amqtt does: use protocol 'auto', the default, or 311)")
            timeout = Unavailable(
                f"no CONNACK from {c.host}:{c.port} within {c.connect_timeout_s:g}s{hint}")
            await self.close()
            raise timeout from None
        except BaseException:
            await self.close()
            raise
        return err, (self._first_kind if err is not None else None)

    def _version_error(self, err: TandemError, kind: str) -> TandemError:
        """A refusal of an explicitly configured version, as one line naming it and the
        alternatives."""
        c = self.config
        version, other = ("MQTT 5", "311") if self.v5 else ("MQTT 3.1.1", "5")
        if kind == "version":
            return Unavailable(f"the broker at {c.host}:{c.port} refused {version}: "
                               f"{_why(err)}; use protocol 'auto' (the default) or {other}",
                               retryable=False)
        rabbit = " (RabbitMQ before 3.13 closes MQTT 5 connections this way)" if self.v5 else ""
        return Unavailable(f"the broker at {c.host}:{c.port} closed the {version} connection "
                           f"before accepting it ({_why(err)}); if it does not speak {version}"
                           f"{rabbit}, use protocol 'auto' (the default) or {other}")

    async def _open(self, *, first: bool) -> None:
        """TCP (+TLS) connect and CONNECT in an executor thread, then hand the socket to the
        loop. Raises our errors."""
        c = self.config
        if first:
            props = None
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                if c.session_expiry_s:
                    props.SessionExpiryInterval = int(c.session_expiry_s)
                if c.receive_maximum is not None:
                    props.ReceiveMaximum = int(c.receive_maximum)
            kwargs = {"clean_start": self.clean_start, "properties": props} if self.v5 else {}
            call = lambda: self._client.connect(  # noqa: E731
                c.host, c.port, c.keepalive_s, **kwargs)  # type: ignore[arg-type]
        else:
            call = self._client.reconnect
        try:
            await self._loop.run_in_executor(None, call)
        except Exception as exc:
            raise translate(exc, f"connect to {c.host}:{c.port}") from exc
        if self._closing:
            self._drop_socket()
            raise Unavailable("transport closed while connecting")
        self._connect_sent = self._loop.time()
        self._attach()

    async def close(self, timeout_s: float = 2.0) -> None:
        """DISCONNECT (when connected), unregister the socket, stop the timers, within
        ``timeout_s`` (then the socket is closed without waiting further). Idempotent."""
        if self._closing and self._sock is None:
            return
        self._closing = True
        deadline = self._loop.time() + timeout_s
        for timer in (self._misc_timer, self._reconnect_timer, self._stable_timer):
            if timer is not None:
                timer.cancel()
        if self._reconnect_task is not None and not self._reconnect_task.done():
            with contextlib.suppress(BaseException):  # a TCP connect in a thread: bounded
                await asyncio.wait_for(asyncio.shield(self._reconnect_task),
                                       max(0.0, deadline - self._loop.time()))
        if self._sock is not None and self._connected:
            self._socket_closed.clear()
            self._client.disconnect()  # paho closes the socket once DISCONNECT is written
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._socket_closed.wait(),
                                       max(0.0, min(2.0, deadline - self._loop.time())))
        self._drop_socket()
        self._connected = False
        self._fail_acks(Unavailable("transport closed before the broker acknowledged"))

    def _drop_socket(self) -> None:
        sock = self._client.socket()
        self._detach()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- the socket on the loop ----------------------------------------------------------------

    def _attach(self) -> None:
        sock = self._client.socket()
        if sock is None:
            return
        self._sock = sock
        self._loop.add_reader(sock, self._readable)
        if self._client.want_write():
            self._flush()

    def _detach(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(ValueError, OSError):  # fd already closed
            self._loop.remove_reader(sock)
            if self._writer:
                self._loop.remove_writer(sock)
        self._writer = False
        self._socket_closed.set()

    def _add_writer(self) -> None:
        if self._sock is not None and not self._writer:
            self._writer = True
            self._loop.add_writer(self._sock, self._writable)

    def _remove_writer(self) -> None:
        if self._writer:
            self._writer = False
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(self._sock)

    def _readable(self) -> None:
        client = self._client
        self._in_paho = self._in_read = True
        try:
            if type(client) is _PahoClient:
                client.read_packets(_READ_PACKETS_PER_EVENT)
            else:
                client.loop_read()
            sock = client.socket()
            # TLS: records already decrypted wait in the SSL object, invisible to the selector
            while sock is not None and sock is self._sock and hasattr(sock, "pending") \
                    and sock.pending() > 0:
                client.loop_read()
                sock = client.socket()
        finally:
            self._in_paho = self._in_read = False
        if self._flush_pending:  # what this read event queued (PUBACKs, answers): now
            self._flush()

    def _flush(self) -> None:
        """Write what paho has queued; only a socket that is full waits for ``add_writer``."""
        self._flush_pending = False
        if self._sock is None or self._writer:
            return
        self._in_paho = True
        try:
            self._client.loop_write()
        finally:
            self._in_paho = False
        if self._sock is not None and self._client.want_write():
            self._add_writer()

    def _writable(self) -> None:
        self._in_paho = True
        try:
            self._client.loop_write()
        finally:
            self._in_paho = False
        if not self._client.want_write():
            self._remove_writer()

    def _schedule_misc(self) -> None:
        if not self._closing:
            self._misc_timer = self._loop.call_later(1.0, self._misc)

    def _misc(self) -> None:
        if self._sock is not None:
            self._in_paho = True
            try:
                self._client.loop_misc()  # PINGREQ, keepalive timeout → on_disconnect
            finally:
                self._in_paho = False
        self._schedule_misc()

    def _schedule_reconnect(self) -> None:
        if self._closing or self._reconnect_timer is not None:
            return
        delay = self._reconnect_delay
        self._reconnect_delay = min(delay * 2, self.config.reconnect_max_s)
        self._reconnect_timer = self._loop.call_later(delay, self._start_reconnect)

    def _start_reconnect(self) -> None:
        self._reconnect_timer = None
        if self._closing or self._sock is not None:
            return
        self._reconnect_task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._open(first=False)
        except TandemError as exc:
            log.info("MQTT reconnect to %s:%s failed: %s", self.config.host, self.config.port,
                     exc)
            self._schedule_reconnect()

    # -- operations ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                props: PublishProperties | None = None,
                want_ack: bool = False) -> asyncio.Future | None:
        """Queue a PUBLISH (non-blocking; written when the socket is writable). Raises
        Unavailable at once while disconnected. With ``want_ack``, returns a future whose
        result is None once the broker acknowledged it (at once for QoS 0) or the error.

        A QoS 1 publish queued just before a connection loss is re-sent by paho after the
        reconnect (at-least-once), so the peer may still see it."""
        if not self._connected:
            raise Unavailable(f"not connected to the broker; cannot publish to {topic!r}")
        properties = _PackedProperties(props) if (self.v5 and props) else None
        try:
            info = self._client.publish(topic, payload, qos, retain, properties)  # type: ignore[arg-type]
        except ValueError as exc:
            if len(payload) > MAX_MQTT_PAYLOAD:
                raise PayloadTooLarge(f"{len(payload)} bytes exceed the MQTT limit") from exc
            raise InvalidArgument(f"cannot publish to {topic!r}: {exc}") from exc
        return self._published(info.rc, info.mid, topic, qos, want_ack)

    def frame(self, topic: str, parts: Sequence[bytes | bytearray | memoryview],
              total: int, qos: int, props: PublishProperties | None = None) -> Frame:
        """Build the PUBLISH for a payload given as pieces (``total`` bytes in all, e.g. from
        :func:`tandem.protocol.codec.encode_parts`), copying each piece once, into the packet
        itself;
        send it with :meth:`publish_frame`. Touches no client state: any thread may call it
        (the sync transport builds frames in the caller's thread). Raises PayloadTooLarge /
        InvalidArgument."""
        return _build_frame(topic, parts, total, qos, props, self.v5, self._tx_pool)

    def publish_frame(self, frame: Frame, retain: bool = False,
                      want_ack: bool = False) -> asyncio.Future | None:
        """:meth:`publish` for a :class:`Frame` (its topic, QoS and properties); paho keeps it,
        as the message's payload, until its PUBACK and writes it without another copy."""
        if type(self._client) is not _PahoClient:  # the stock client: it builds the packet
            return self.publish(frame.topic, bytes(frame.payload()), frame.qos, retain,
                                frame.props, want_ack)
        if not self._connected:
            raise Unavailable(f"not connected to the broker; cannot publish to {frame.topic!r}")
        try:
            info = self._client.publish(frame.topic, frame, frame.qos, retain)
        except ValueError as exc:
            raise InvalidArgument(f"cannot publish to {frame.topic!r}: {exc}") from exc
        return self._published(info.rc, info.mid, frame.topic, frame.qos, want_ack)

    def _published(self, rc: MQTTErrorCode, mid: int, topic: str, qos: int,
                   want_ack: bool) -> asyncio.Future | None:
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise Unavailable(f"connection lost while publishing to {topic!r}")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise Unavailable(f"publish to {topic!r} failed: {paho.error_string(rc)}")
        ack = None
        if want_ack:
            ack = self._loop.create_future()
            if qos == 0:
                ack.set_result(None)
            else:
                self._acks[mid] = ack
        if not self._in_paho:
            self._flush()  # write now rather than one loop iteration later
        return ack

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        ack = self._acks.pop(mid, None)
        if ack is None or ack.done():
            return
        err = None
        if reason_code is not None and reason_code.is_failure:
            value = _reason_value(reason_code)
            cls = PermissionDenied if value in (0x87, 0x86) else Unavailable
            err = cls(f"broker refused the publish: {reason_code} (0x{value:02x})")
        ack.set_result(err)

    def _fail_acks(self, err: TandemError) -> None:
        acks, self._acks = self._acks, {}
        for ack in acks.values():
            if not ack.done():
                ack.set_result(err)

    def subscribe(self, topic_filter: str, qos: int, on_done: SubackCallback) -> None:
        """Add to the table (kept across reconnects) and, when connected, send SUBSCRIBE;
        ``on_done(None | error)`` runs when the broker answers (an error: the filter left the
        table). While disconnected ``on_done(None)`` runs at once: the filter is sent on the
        next CONNACK."""
        self._subscriptions[topic_filter] = qos
        self._strikes.pop(topic_filter, None)
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
        self._suback[mid] = (topic_filter, on_done)

    def unsubscribe(self, topic_filter: str, on_done: Callable[[], None]) -> None:
        if self._subscriptions.pop(topic_filter, None) is None or not self._connected:
            on_done()
            return
        rc, mid = self._client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            on_done()
            return
        self._unsuback[mid] = on_done

    # -- paho callbacks ----------------------------------------------------------------------------

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the loop thread (paho calls some socket callbacks from the connect
        executor thread)."""
        if _running_loop() is self._loop:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client, userdata, sock) -> None:
        _set_nodelay(sock)

    def _on_socket_close(self, client, userdata, sock) -> None:
        self._in_loop(self._detach_if, sock)

    def _detach_if(self, sock) -> None:
        if sock is self._sock:
            self._detach()

    def _on_register_write(self, client, userdata, sock) -> None:
        self._in_loop(self._want_write, sock)

    def _want_write(self, sock) -> None:
        """paho queued a packet: write it now (paho's own behaviour without a network thread),
        or, inside a socket read event, when that event ends (with the PUBACKs and answers it
        queued), or inside paho's write/keepalive calls on the next loop iteration; unless a
        flush or the writer is already on it. Writing at once rather than on the next
        iteration saves a request an event-loop iteration (an ``epoll`` call) each way."""
        if sock is not self._sock or self._writer or self._flush_pending:
            return
        self._flush_pending = True
        if self._in_read:
            return
        if self._in_paho:
            self._loop.call_soon(self._flush)
            return
        self._flush()

    def _on_unregister_write(self, client, userdata, sock) -> None:
        pass  # _flush and _writable decide from want_write() themselves

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            err = _connect_error(reason_code)
            if self._first is not None and not self._first.done():
                if _reason_value(reason_code) == _VERSION_REFUSED:
                    self._first_kind = "version"
            else:  # a reconnect refused (the first connect reports its own error)
                log.warning("MQTT connect to %s:%s refused: %s", self.config.host,
                            self.config.port, err)
            self._resolve_first(err)
            return
        rtt = self._loop.time() - self._connect_sent
        if self.connect_rtt_s is None or rtt < self.connect_rtt_s:
            self.connect_rtt_s = rtt
        if self.v5 and properties is not None:
            self.broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        self._connected = True
        # Our table, not the broker session, decides what we are subscribed to: replay it,
        # one SUBSCRIBE per filter so that a refusal names its filter; "ready" is reported
        # when every SUBACK has arrived.
        self._resub.clear()
        for topic_filter, qos in list(self._subscriptions.items()):
            rc, mid = client.subscribe(topic_filter, qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return  # the connection is already gone again
            self._resub[mid] = topic_filter
        if not self._resub:
            self._ready()

    def _ready(self) -> None:
        # the backoff starts over only once a connection is usable (re-subscribed) and has
        # stayed up for stable_after_s: a broker that takes connections and drops them again
        # meets a growing delay, not a reconnect storm
        if self._stable_timer is not None:
            self._stable_timer.cancel()
            self._stable_timer = None
        if self.config.stable_after_s <= 0:
            self._reconnect_delay = self.config.reconnect_min_s
        else:
            self._stable_timer = self._loop.call_later(self.config.stable_after_s, self._stable)
        self._resolve_first(None)
        self._safe(self._on_connection_cb, True, "connected")

    def _stable(self) -> None:
        self._stable_timer = None
        if self._connected:
            self._reconnect_delay = self.config.reconnect_min_s

    def _resolve_first(self, err: TandemError | None) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(err)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected
        self._connected = False
        self._ack_generation += 1  # manual acks of this connection's messages: never sent
        self._ack_queue.clear()
        if self._stable_timer is not None:  # not up long enough: the backoff keeps growing
            self._stable_timer.cancel()
            self._stable_timer = None
        self._fail_acks(Unavailable(f"connection lost before the broker acknowledged "
                                    f"({reason_code}); the message may still be delivered "
                                    "after the reconnect"))
        self._subscriptions_unanswered(reason_code)
        if self._first is not None and not self._first.done():
            if not was_connected:
                self._first_kind = "closed"
            self._resolve_first(Unavailable(f"connection closed before CONNACK: {reason_code}"))
        if self._closing:
            if was_connected:
                self._safe(self._on_connection_cb, False, "closed")
            return
        if was_connected:
            reason = f"connection lost: {reason_code}"
            log.warning("MQTT %s:%s %s; reconnecting", self.config.host, self.config.port,
                        reason)
            self._safe(self._on_connection_cb, False, reason)
        if self._first is not None and self._first.done() and self._first.result() is None:
            self._schedule_reconnect()  # only once the first connect has succeeded

    def _acker(self, mid: int, qos: int) -> Callable[[], None]:
        """A one-shot acknowledgement of message ``mid`` (manual_ack): PUBACKs leave in arrival
        order, each once every earlier message was acknowledged too; one from before a
        reconnect is never sent on the new connection."""
        generation = self._ack_generation
        entry = [mid, qos, False]
        self._ack_queue.append(entry)

        def ack() -> None:
            try:
                on_loop = asyncio.get_running_loop() is self._loop
            except RuntimeError:
                on_loop = False
            if not on_loop:  # a handler thread: paho is the loop's alone
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to ack
                    self._loop.call_soon_threadsafe(ack)
                return
            if entry[2]:
                return
            entry[2] = True
            if generation != self._ack_generation:
                return
            queue = self._ack_queue
            while queue and queue[0][2]:
                m, q, _ = queue.popleft()
                self._client.ack(m, q)

        return ack

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
            ack=self._acker(msg.mid, msg.qos) if self.config.manual_ack and msg.qos else None,
        )
        self._safe(self._on_message_cb, incoming)

    def _subscriptions_unanswered(self, reason_code: object) -> None:
        """The connection closed while SUBSCRIBEs waited for their SUBACK. A broker closes the
        connection on a filter it will not take (mosquitto on malformed UTF-8, brokers without
        shared subscriptions on ``$share/``): a direct subscribe fails for its caller and its
        filter leaves the table; on a re-subscribe, the first unanswered filter gets a strike
        and is dropped at the second in a row. Never a reconnect loop replaying it."""
        pending, self._suback = self._suback, {}
        for topic_filter, cb in pending.values():
            if self._subscriptions.pop(topic_filter, None) is not None:
                self._strikes.pop(topic_filter, None)
            self._safe(cb, Unavailable(
                f"the connection closed before the broker answered the subscription to "
                f"{topic_filter!r} ({reason_code}); a broker closes it on a filter it refuses. "
                "Not re-subscribed", retryable=True))
        if self._resub:
            first = next(iter(self._resub.values()))  # the earliest unanswered
            self._resub.clear()
            strikes = self._strikes.get(first, 0) + 1
            if strikes < _REFUSAL_STRIKES:
                self._strikes[first] = strikes
            else:
                self._strikes.pop(first, None)
                if self._subscriptions.pop(first, None) is not None:
                    self._safe(self._on_refused_cb, first, Unavailable(
                        f"the broker closed the connection in answer to the subscription "
                        f"{first!r}, {strikes} times in a row"))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = next((rc for rc in reason_codes if _reason_value(rc) >= 0x80), None)
        direct = self._suback.pop(mid, None)
        if direct is not None:
            topic_filter, cb = direct
            err = None
            if failed is not None:
                err = _refusal(failed, topic_filter)
                self._subscriptions.pop(topic_filter, None)
            self._safe(cb, err)
            return
        if mid not in self._resub:
            return
        topic_filter = self._resub.pop(mid)
        self._strikes.pop(topic_filter, None)
        if failed is not None:
            self._subscriptions.pop(topic_filter, None)
            self._safe(self._on_refused_cb, topic_filter, _refusal(failed, topic_filter))
        if not self._resub:
            self._ready()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        cb = self._unsuback.pop(mid, None)
        if cb is not None:
            self._safe(cb)

    @staticmethod
    def _safe(fn, *args) -> None:
        """Never let a callback's exception unwind into paho's packet handling."""
        try:
            fn(*args)
        except Exception:
            log.exception("transport callback %r failed", fn)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
