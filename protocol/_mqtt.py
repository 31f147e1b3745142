"""Private wrapper around paho-mqtt v2: the ONE place paho is imported and its errors translated.

:class:`MqttClient` drives a paho client from an asyncio event loop — no paho network thread.
paho's external-loop interface is used: the socket is registered with ``loop.add_reader`` /
``add_writer`` (``loop_read`` / ``loop_write``), a timer runs ``loop_misc`` (keepalive), and only
the blocking TCP/TLS connect runs in an executor thread. Every callback therefore runs on the
loop thread, and a message costs no thread hop between the socket and its handler (a network
thread handing messages over with ``call_soon_threadsafe`` doubled the round-trip time on a
2-core machine).

The client keeps its own subscription table and re-subscribes on every CONNACK (it does not rely
on the broker session), reconnects with exponential backoff, turns TCP_NODELAY on for every
socket paho opens, and reports through callbacks (all on the loop thread):

* ``on_message(IncomingMessage)`` for every PUBLISH received;
* ``on_connection(connected: bool, reason: str)``: True once a connection is *ready* (CONNACK
  received and the subscription table re-subscribed), False when it is lost;
* a SUBACK completion per :meth:`MqttClient.subscribe` call.

Nothing of paho — classes, return codes, exceptions — leaves this module: failures are
:mod:`protocol.errors` exceptions, chained with ``from`` to the paho/OS error that caused them.
Not thread-safe: call it from its loop's thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
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
    "Frame",
    "IncomingMessage",
    "MqttClient",
    "PublishProperties",
    "TlsConfig",
    "TransportConfig",
    "Will",
]

log = logging.getLogger("protocol.transport")

MAX_MQTT_PAYLOAD = 268_435_455  # protocol limit of a packet's remaining length
DEFAULT_MAX_PAYLOAD_V5 = 16 * 1024 * 1024  # capped by the broker's announced Maximum Packet Size
DEFAULT_MAX_PAYLOAD_V311 = 1024 * 1024 - 1024  # no announcement on 3.1.1: fits a 1 MB broker cap
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


class _PackedProperties:
    """PUBLISH properties packed once by us: paho's ``Properties`` spends tens of µs per message
    in attribute bookkeeping; paho only calls ``pack()`` on what it is given."""

    __slots__ = ("_packed",)

    def __init__(self, p: PublishProperties) -> None:
        out = bytearray()
        if p.message_expiry_s is not None:  # 0x02, four byte integer
            out += b"\x02" + struct.pack(">I", max(1, math.ceil(p.message_expiry_s)))
        if p.content_type:  # 0x03, UTF-8 string
            out += b"\x03" + _str16(p.content_type.encode())
        if p.response_topic:  # 0x08, UTF-8 string
            out += b"\x08" + _str16(p.response_topic.encode())
        if p.correlation_data is not None:  # 0x09, binary data
            out += b"\x09" + _str16(bytes(p.correlation_data))
        self._packed = _varint(len(out)) + bytes(out)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:
        return f"[packed properties, {len(self._packed)} bytes]"


def _str16(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise InvalidArgument(f"MQTT property value of {len(b)} bytes (limit 65535)")
    return struct.pack(">H", len(b)) + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _InProps:
    """The PUBLISH properties Tandem reads, decoded by :func:`_decode_publish_v5`."""

    __slots__ = ("ContentType", "CorrelationData", "MessageExpiryInterval", "ResponseTopic")

    def __init__(self) -> None:
        self.ContentType: str | None = None
        self.CorrelationData: bytes | None = None
        self.MessageExpiryInterval: int | None = None
        self.ResponseTopic: str | None = None


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# received payloads this large are handed on as views of their packet, not copied (see
# _decode_publish_v5); smaller ones become bytes (a copy costs less than a view's bookkeeping)
_VIEW_MIN = 64 * 1024
_PUBLISH = 0x30


class _BufferPool:
    """Recent big packet buffers, handed out again for a packet of the same size once nothing
    else holds them.

    A fresh 1 MB buffer per packet costs more in page faults than in copying: glibc gives freed
    buffers of that size back to the kernel, and the next one is faulted in page by page. Same
    sized traffic (the same tensor shapes, request after request) is the common case, so each
    client keeps its last few big buffers and reuses one when no reference to it is left
    outside the pool: not paho (a Frame waiting for its PUBACK), not a view (a decoded RAW
    tensor, a payload a handler kept). The check is the buffer's reference count: every view
    holds a reference to the buffer it views, so a buffer is reused only when no view of it
    exists, and a tensor never sees its bytes change. Bounded: ``max_buffers`` buffers and
    ``max_bytes`` bytes (a buffer over that is never kept). Thread-safe."""

    __slots__ = ("_bufs", "_lock", "max_buffers", "max_bytes")

    # references to a buffer nobody else holds, as counted in take(): the pool's list, the
    # local name, getrefcount's argument
    _FREE_REFS = 3

    def __init__(self, max_buffers: int = 4, max_bytes: int = 8 * 1024 * 1024) -> None:
        self._bufs: list[bytearray] = []
        self._lock = threading.Lock()
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes

    def take(self, cls: type[bytearray], n: int) -> bytearray:
        """A ``cls`` of ``n`` bytes: a free pooled one (old contents: overwrite every byte),
        else a new zero-filled one, pooled when it is big enough and fits the bounds."""
        if n < _VIEW_MIN or n > self.max_bytes:
            return cls(n)
        with self._lock:
            bufs = self._bufs
            for i in range(len(bufs)):
                buf = bufs[i]
                if len(buf) == n and type(buf) is cls \
                        and sys.getrefcount(buf) == self._FREE_REFS:
                    del bufs[i]
                    bufs.append(buf)  # most recently used last
                    return buf
            buf = cls(n)
            bufs.append(buf)
            total = sum(len(b) for b in bufs)
            while len(bufs) > self.max_buffers or total > self.max_bytes:
                total -= len(bufs.pop(0))  # the least recently used; its holders keep it
            return buf

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


class Frame(bytearray):
    """An outgoing PUBLISH built in place: the fixed header, topic, room for the packet id and
    the MQTT 5 properties, then the payload, in ONE buffer that paho queues and writes as it is
    (see :meth:`MqttClient.frame`). The payload is copied into it once, from the pieces
    :func:`protocol.codec.encode_parts` returns: no intermediate frame, no second copy into a
    packet. Only the command byte (DUP flag) and the packet id are written later, by
    :meth:`_PahoClient._send_publish` (again on a resend after a reconnect)."""

    __slots__ = ("head", "mid_at", "props", "qos", "topic")

    head: int  # bytes before the payload
    mid_at: int  # where the packet id goes (-1: QoS 0, none)
    props: PublishProperties | None
    qos: int
    topic: str

    def payload(self) -> memoryview:
        """The payload part (a view; for the stock paho client's fallback)."""
        return memoryview(self)[self.head:]


def _build_frame(topic: str, parts: list[bytes | memoryview] | tuple[bytes | memoryview, ...],
                 total: int, qos: int, props: PublishProperties | None, v5: bool,
                 pool: _BufferPool | None = None) -> Frame:
    topic_bytes = topic.encode()
    packed = (_PackedProperties(props).pack() if props else b"\x00") if v5 else b""
    var = 2 + len(topic_bytes) + (2 if qos else 0) + len(packed)
    remaining = var + total
    if remaining > MAX_MQTT_PAYLOAD:
        raise PayloadTooLarge(f"{total} bytes exceed the MQTT limit")
    if len(topic_bytes) > 0xFFFF:
        raise InvalidArgument(f"topic of {len(topic_bytes)} bytes (limit 65535)")
    fixed = bytes((_PUBLISH,)) + _varint(remaining)
    head = len(fixed) + var
    # fresh or reused (old contents): every byte is written below or in _send_publish
    frame = pool.take(Frame, head + total) if pool is not None else Frame(head + total)
    frame.head, frame.qos, frame.props, frame.topic = head, qos, props, topic
    pos = len(fixed) + 2 + len(topic_bytes)
    frame[: pos] = fixed + _U16.pack(len(topic_bytes)) + topic_bytes
    frame.mid_at = pos if qos else -1
    if qos:
        pos += 2
    frame[pos:head] = packed
    pos = head
    for part in parts:
        n = len(part)
        frame[pos : pos + n] = part
        pos += n
    if pos != head + total:
        raise InvalidArgument(f"frame parts hold {pos - head} bytes, not {total}")
    return frame


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("variable byte integer longer than 4 bytes")


def _decode_publish_v5(packet: bytes | bytearray, qos: int
                       ) -> tuple[bytes, int, _InProps, bytes | memoryview]:
    """(topic, packet id, properties, payload) of an MQTT 5 PUBLISH variable header + payload.

    paho's own decoding builds a ``Properties`` object (tens of µs) and slices the remaining
    packet once per property and twice more for topic and packet id: five properties on a 1 MB
    request cost ~7 copies of the payload. Here a payload of :data:`_VIEW_MIN` bytes or more is
    not copied at all: it is a read-only view of ``packet`` (which :meth:`_PahoClient._packet_read`
    allocates afresh for every packet and never reuses or resizes), smaller ones are copied once
    to immutable bytes. Raises ValueError / IndexError / struct.error on a malformed packet."""
    buf = memoryview(packet).toreadonly()
    (tlen,) = _U16.unpack_from(buf, 0)
    pos = 2 + tlen
    topic = bytes(buf[2:pos])
    mid = 0
    if qos:
        (mid,) = _U16.unpack_from(buf, pos)
        pos += 2
    plen, pos = _read_varint(buf, pos)
    end = pos + plen
    if end > len(buf):
        raise ValueError("properties run past the packet")
    props = _InProps()
    while pos < end:
        ident = buf[pos]
        pos += 1
        if ident in (0x03, 0x08, 0x09):  # content type, response topic, correlation data
            (n,) = _U16.unpack_from(buf, pos)
            value = bytes(buf[pos + 2 : pos + 2 + n])
            pos += 2 + n
            if ident == 0x03:
                props.ContentType = value.decode()
            elif ident == 0x08:
                props.ResponseTopic = value.decode()
            else:
                props.CorrelationData = value
        elif ident == 0x02:  # message expiry interval
            (props.MessageExpiryInterval,) = _U32.unpack_from(buf, pos)
            pos += 4
        elif ident == 0x01:  # payload format indicator
            pos += 1
        elif ident == 0x23:  # topic alias
            pos += 2
        elif ident == 0x0B:  # subscription identifier
            _, pos = _read_varint(buf, pos)
        elif ident == 0x26:  # user property: two strings
            for _ in range(2):
                (n,) = _U16.unpack_from(buf, pos)
                pos += 2 + n
        else:
            raise ValueError(f"property 0x{ident:02x} not allowed on PUBLISH")
    if pos != end:
        raise ValueError("properties length mismatch")
    if len(buf) - end >= _VIEW_MIN:
        return topic, mid, props, buf[end:]
    return topic, mid, props, bytes(buf[end:])


_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_PUBACK_NO_PROPS = Properties(PacketTypes.PUBACK)


class _PahoClient(paho.Client):
    """paho's client with a cheaper MQTT 5 PUBLISH decoder (see :func:`_decode_publish_v5`).

    Only QoS 0/1 PUBLISHes on MQTT 5 with a topic take this path; everything else (QoS 2,
    MQTT 3.1.1, topic aliases, anything that fails to parse) goes to paho's own handler,
    which raises its own errors for malformed packets."""

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: Any = None) -> MQTTErrorCode:
        # paho sends ``packet[pos:]`` after every partial write: a copy of the rest of the
        # packet each time; a memoryview slices without copying (large packets only)
        if len(packet) > 65536:
            packet = memoryview(packet)  # type: ignore[assignment]
        return super()._packet_queue(command, packet, mid, qos, info)

    _rx_pool: _BufferPool  # set by MqttClient

    def _send_publish(self, mid: int, topic: bytes, payload: Any = b"", qos: int = 0,
                      retain: bool = False, dup: bool = False, info: Any = None,
                      properties: Any = None) -> MQTTErrorCode:
        if type(payload) is not Frame:
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        # a Frame already holds topic, properties and payload: fill in flags and packet id and
        # queue the buffer itself (paho keeps it as the message's payload until the PUBACK, and
        # calls this again with dup=True to resend it after a reconnect)
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if qos != payload.qos:
            raise ValueError(f"frame built for QoS {payload.qos}, published with QoS {qos}")
        payload[0] = _PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | (1 if retain else 0)
        if payload.mid_at >= 0:
            _U16.pack_into(payload, payload.mid_at, mid)
        return self._packet_queue(_PUBLISH, payload, mid, qos, info)

    def _sock_recv_into(self, view: memoryview) -> int:
        """``_sock_recv`` (same error mapping) reading into ``view``."""
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        try:
            return self._sock.recv_into(view)
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            self._call_socket_register_write()
            raise BlockingIOError() from err
        except AttributeError as err:
            raise ConnectionError() from err

    def _packet_read(self) -> MQTTErrorCode:
        """paho's ``_packet_read`` (same states, same errors), except that a packet's body is
        read with ``recv_into`` straight into ONE bytearray of its remaining length, allocated
        afresh per packet. paho reads it with ``recv(remaining)`` (a buffer of the whole
        remaining size per call, shrunk to what arrived) and appends each piece to a growing
        bytearray: for a 1 MB PUBLISH, several 1 MB allocations, reallocations and copies.
        The buffer is fresh or one of this client's pooled buffers that nothing references
        any more (see :class:`_BufferPool`), and it is never resized: a payload handed on as a
        view of it (see :func:`_decode_publish_v5`) keeps its bytes as long as the view lives."""
        if not hasattr(self._sock, "recv_into"):  # e.g. paho's websocket wrapper
            return super()._packet_read()
        p = self._in_packet
        if p["command"] == 0:
            try:
                command = self._sock_recv(1)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if len(command) == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            p["command"] = command[0]
        if p["have_remaining"] == 0:
            while True:
                try:
                    byte = self._sock_recv(1)
                except BlockingIOError:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except OSError:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                if len(byte) == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                value = byte[0]
                p["remaining_count"].append(value)
                if len(p["remaining_count"]) > 4:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
                p["remaining_length"] += (value & 127) * p["remaining_mult"]
                p["remaining_mult"] *= 128
                if (value & 128) == 0:
                    break
            p["have_remaining"] = 1
            p["to_process"] = p["remaining_length"]
            p["packet"] = self._rx_pool.take(bytearray, p["remaining_length"])
        count = 100  # as paho: do not get stuck on one huge packet
        while p["to_process"] > 0:
            start = p["remaining_length"] - p["to_process"]
            try:
                with memoryview(p["packet"]) as view:
                    n = self._sock_recv_into(view[start:])
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if n == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            p["to_process"] -= n
            with self._msgtime_mutex:
                self._last_bytes_received = paho.time_func()
            count -= 1
            if count == 0:
                return MQTTErrorCode.MQTT_ERR_AGAIN
        p["pos"] = 0
        try:
            rc = self._packet_handle()
        except MalformedPacket:
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return rc

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        # a plain success PUBACK (just the packet id) is what a broker sends almost always:
        # skip paho's ReasonCode + Properties objects for it (we set no on_publish callback)
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2 or self.on_publish is not None:
            return super()._handle_pubackcomp(cmd)
        (mid,) = _U16.unpack_from(packet, 0)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _PUBACK_NO_PROPS)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        packet = self._in_packet
        header = packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol != paho.MQTTv5 or qos == 2:
            return super()._handle_publish()
        try:
            topic, mid, props, payload = _decode_publish_v5(packet["packet"], qos)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            return super()._handle_publish()
        if not topic:  # a topic alias only: let paho deal with it
            return super()._handle_publish()
        message = paho.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = props  # type: ignore[assignment]
        message.payload = payload
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)


def _paho_version() -> tuple[int, ...]:
    import paho.mqtt

    try:
        return tuple(int(x) for x in paho.mqtt.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return ()


# The fast path overrides paho internals: only on the paho releases it was tested with (2.1,
# 2.2) and only when those internals are there; anything else gets the stock client (slower,
# same behaviour: tests/protocol/test_transport.py runs both).
_FAST_PUBLISH = _paho_version() in {(2, 1), (2, 2)} and all(hasattr(paho.Client, name) for name in (
    "_handle_publish", "_handle_on_message", "_send_puback", "_packet_queue",
    "_handle_pubackcomp", "_do_on_publish", "_send_publish", "_packet_read", "_packet_handle",
    "_sock_recv", "_call_socket_register_write")) \
    and hasattr(paho, "time_func") and hasattr(paho, "MQTTMessage")


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
    """A paho client driven by an asyncio loop, with our subscription table and our errors."""

    def __init__(
        self,
        config: TransportConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        on_message: Callable[[IncomingMessage], None],
        on_connection: Callable[[bool, str], None],
    ) -> None:
        self.config = config
        self.client_id = config.client_id or f"tandem-{uuid.uuid4().hex[:16]}"
        self._loop = loop
        self._on_message_cb = on_message
        self._on_connection_cb = on_connection
        self._subscriptions: dict[str, int] = {}  # filter → qos, replayed on every CONNACK
        self._suback: dict[int, SubackCallback] = {}
        self._unsuback: dict[int, Callable[[], None]] = {}
        self._connected = False
        self._closing = False
        self._first: asyncio.Future[TandemError | None] | None = None
        self._resub_mid: int | None = None
        self._sock: Any = None  # the socket registered with the loop
        self._writer = False
        self._flush_pending = False
        self._in_paho = False  # inside paho's loop_read/loop_write/loop_misc: never re-enter
        self._misc_timer: asyncio.TimerHandle | None = None
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Future | None = None
        self._reconnect_delay = config.reconnect_min_s
        self._socket_closed = asyncio.Event()
        self.broker_max_packet: int | None = None  # from CONNACK (MQTT 5)
        self.v5 = config.protocol == 5
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
        return client

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_payload_bytes(self) -> int:
        """The configured chunk size, or the protocol's default (see :class:`TransportConfig`)."""
        if self.config.max_payload_bytes is not None:
            return self.config.max_payload_bytes
        return DEFAULT_MAX_PAYLOAD_V5 if self.v5 else DEFAULT_MAX_PAYLOAD_V311

    async def connect(self) -> None:
        """Open the connection and wait until it is ready: CONNACK received and every filter
        already in the table re-subscribed (at most ``connect_timeout_s``).

        Raises Unavailable (unreachable, timed out), PermissionDenied (credentials, TLS
        certificate) or InvalidArgument. After success, lost connections are re-established in
        the background with exponential backoff until :meth:`close`.
        """
        c = self.config
        self._first = self._loop.create_future()
        try:
            await asyncio.wait_for(self._open(first=True), c.connect_timeout_s)
            err = await asyncio.wait_for(asyncio.shield(self._first), c.connect_timeout_s)
        except asyncio.TimeoutError:
            await self.close()
            raise Unavailable(
                f"no CONNACK from {c.host}:{c.port} within {c.connect_timeout_s:g}s") from None
        except BaseException:
            await self.close()
            raise
        if err is not None:
            await self.close()
            raise err
        self._schedule_misc()

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
            kwargs = {"clean_start": self.clean_start, "properties": props} if self.v5 else {}
            call = lambda: self._client.connect(c.host, c.port, c.keepalive, **kwargs)  # noqa: E731
        else:
            call = self._client.reconnect
        try:
            await self._loop.run_in_executor(None, call)
        except Exception as exc:
            raise translate(exc, f"connect to {c.host}:{c.port}") from exc
        if self._closing:
            self._drop_socket()
            raise Unavailable("transport closed while connecting")
        self._attach()

    async def close(self) -> None:
        """DISCONNECT (when connected), unregister the socket, stop the timers. Idempotent."""
        if self._closing and self._sock is None:
            return
        self._closing = True
        for timer in (self._misc_timer, self._reconnect_timer):
            if timer is not None:
                timer.cancel()
        if self._reconnect_task is not None and not self._reconnect_task.done():
            with contextlib.suppress(BaseException):
                await self._reconnect_task
        if self._sock is not None and self._connected:
            self._socket_closed.clear()
            self._client.disconnect()  # paho closes the socket once DISCONNECT is written
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._socket_closed.wait(), 2.0)
        self._drop_socket()
        self._connected = False

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
        self._in_paho = True
        try:
            client.loop_read()
            sock = client.socket()
            # TLS: records already decrypted wait in the SSL object, invisible to the selector
            while sock is not None and sock is self._sock and hasattr(sock, "pending") \
                    and sock.pending() > 0:
                client.loop_read()
                sock = client.socket()
        finally:
            self._in_paho = False

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
                props: PublishProperties | None = None) -> None:
        """Queue a PUBLISH (non-blocking; written when the socket is writable). Raises
        Unavailable at once while disconnected.

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
        self._published(info.rc, topic)

    def frame(self, topic: str, parts: list[bytes | memoryview] | tuple[bytes | memoryview, ...],
              total: int, qos: int, props: PublishProperties | None = None) -> Frame:
        """Build the PUBLISH for a payload given as pieces (``total`` bytes in all, e.g. from
        :func:`protocol.codec.encode_parts`), copying each piece once, into the packet itself;
        send it with :meth:`publish_frame`. Touches no client state: any thread may call it
        (the sync transport builds frames in the caller's thread). Raises PayloadTooLarge /
        InvalidArgument."""
        return _build_frame(topic, parts, total, qos, props, self.v5, self._tx_pool)

    def publish_frame(self, frame: Frame, retain: bool = False) -> None:
        """:meth:`publish` for a :class:`Frame` (its topic, QoS and properties); paho keeps it,
        as the message's payload, until its PUBACK and writes it without another copy."""
        if type(self._client) is not _PahoClient:  # the stock client: it builds the packet
            self.publish(frame.topic, bytes(frame.payload()), frame.qos, retain, frame.props)
            return
        if not self._connected:
            raise Unavailable(f"not connected to the broker; cannot publish to {frame.topic!r}")
        try:
            info = self._client.publish(frame.topic, frame, frame.qos, retain)
        except ValueError as exc:
            raise InvalidArgument(f"cannot publish to {frame.topic!r}: {exc}") from exc
        self._published(info.rc, frame.topic)

    def _published(self, rc: MQTTErrorCode, topic: str) -> None:
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise Unavailable(f"connection lost while publishing to {topic!r}")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise Unavailable(f"publish to {topic!r} failed: {paho.error_string(rc)}")
        if not self._in_paho:
            self._flush()  # write now rather than one loop iteration later

    def subscribe(self, topic_filter: str, qos: int, on_done: SubackCallback) -> None:
        """Add to the table (kept across reconnects) and, when connected, send SUBSCRIBE;
        ``on_done(None | error)`` runs when the SUBACK arrives. While disconnected
        ``on_done(None)`` runs at once: the filter is sent on the next CONNACK."""
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
        """paho queued a packet: write it on the next loop iteration (batching whatever else is
        queued until then), unless a flush or the writer is already on it."""
        if sock is not self._sock or self._writer or self._flush_pending:
            return
        self._flush_pending = True
        self._loop.call_soon(self._flush)

    def _on_unregister_write(self, client, userdata, sock) -> None:
        pass  # _flush and _writable decide from want_write() themselves

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            err = _connect_error(reason_code)
            log.warning("MQTT connect to %s:%s refused: %s", self.config.host,
                        self.config.port, err)
            self._resolve_first(err)
            return
        self._reconnect_delay = self.config.reconnect_min_s
        if self.v5 and properties is not None:
            self.broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        self._connected = True
        # Our table, not the broker session, decides what we are subscribed to: replay it in
        # one SUBSCRIBE; "ready" is reported when its SUBACK arrives.
        self._resub_mid = None
        if self._subscriptions:
            _rc, mid = client.subscribe(list(self._subscriptions.items()))
            self._resub_mid = mid
        pending = list(self._suback.values())
        self._suback.clear()
        for cb in pending:  # SUBSCRIBEs lost with the old connection were just re-sent
            self._safe(cb, None)
        if self._resub_mid is None:
            self._ready()

    def _ready(self) -> None:
        self._resolve_first(None)
        self._safe(self._on_connection_cb, True, "connected")

    def _resolve_first(self, err: TandemError | None) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(err)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected
        self._connected = False
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
        cb = self._suback.pop(mid, None)
        resubscribed = self._resub_mid is not None and mid == self._resub_mid
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
