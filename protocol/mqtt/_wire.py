"""MQTT packets on Tandem's hot path, built and parsed without paho's per-message overhead.

Private to :mod:`._client` (the other module that imports paho). paho-mqtt 2 spends most of
a large message's time copying: it packs properties through ``Properties`` objects, copies the
payload into every packet it builds, grows a bytearray while reading, and slices the packet once
per property. Here:

* :class:`Frame` / :func:`_build_frame`: an outgoing PUBLISH built in ONE buffer from the pieces
  :func:`tandem.protocol.codec.encode_parts` returns (one copy of the payload on send);
* :class:`_PahoClient`: paho's client with ``recv_into`` packet reads into one buffer per packet,
  a PUBLISH decoder that hands big payloads on as views (:func:`_decode_publish_v5`), cheap
  success PUBACKs, and a :class:`_BufferPool` that reuses big packet buffers once nothing
  references them (fresh 1 MB buffers cost more in page faults than in copying).

These override paho internals, so :data:`_FAST_PUBLISH` enables them only on the paho releases
they were tested with; elsewhere the stock client runs (same behaviour, slower).
"""

from __future__ import annotations

import math
import ssl
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tandem.protocol.errors import InvalidArgument, PayloadTooLarge
from tandem.protocol.transport import MAX_EXPIRY_S, MAX_MQTT_PAYLOAD, PublishProperties

__all__ = ["MAX_MQTT_PAYLOAD", "Frame"]



class _PackedProperties:
    """PUBLISH properties packed once by us: paho's ``Properties`` spends tens of µs per message
    in attribute bookkeeping; paho only calls ``pack()`` on what it is given."""

    __slots__ = ("_packed",)

    def __init__(self, p: PublishProperties) -> None:
        out = bytearray()
        if p.message_expiry_s is not None:  # 0x02, four byte integer
            seconds = min(MAX_EXPIRY_S, max(1, math.ceil(p.message_expiry_s)))
            out += b"\x02" + struct.pack(">I", seconds)
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


# the pool's "nothing references this buffer" test needs CPython's reference counts
_REFCOUNTS = sys.implementation.name == "cpython"


_B = TypeVar("_B", bound=bytearray)


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

    def take(self, cls: type[_B], n: int) -> _B:
        """A ``cls`` of ``n`` bytes: a free pooled one (old contents: overwrite every byte),
        else a new zero-filled one, pooled when it is big enough and fits the bounds."""
        if n < _VIEW_MIN or n > self.max_bytes or not _REFCOUNTS:
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
    :func:`tandem.protocol.codec.encode_parts` returns: no intermediate frame, no second copy into a
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


def _build_frame(topic: str, parts: Sequence[bytes | bytearray | memoryview],
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
    held = sum(len(part) for part in parts)
    if held != total:
        raise InvalidArgument(f"frame parts hold {held} bytes, not {total}")
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
    # through a memoryview: assigning a buffer to a bytearray slice copies it twice (CPython
    # first makes a bytearray of the value), a memoryview slice copies it once
    with memoryview(frame) as view:
        for part in parts:
            n = len(part)
            view[pos : pos + n] = part
            pos += n
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
    never resizes, and reuses only once no view of it is left: :class:`_BufferPool`), smaller
    ones are copied once to immutable bytes. Raises ValueError / IndexError / struct.error on a
    malformed packet."""
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

    def read_packets(self, limit: int = 256) -> MQTTErrorCode:
        """``loop_read`` that reads packets until the socket has no more, up to ``limit`` (a
        flood cannot hold the loop): a PUBACK and a reply that came in one segment are
        handled in one read event, not two loop iterations (stock ``loop_read`` reads as many
        packets as messages are in flight, often one)."""
        for _ in range(limit):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv_into(self, view: memoryview) -> int:
        """``_sock_recv`` (same error mapping) reading into ``view``."""
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        try:
            return self._sock.recv_into(view)  # type: ignore[attr-defined]  # checked by the caller
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
        # skip paho's ReasonCode + Properties objects for it (shared constants instead)
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
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
        message.payload = payload  # type: ignore[assignment]  # a view: read-only bytes
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
