"""A small MQTT 3.1.1 broker in asyncio, for ``tandem demo`` and tests on a machine without
mosquitto. Not for production: use mosquitto, EMQX or HiveMQ there.

Why our own and not amqtt: the cloud workers take requests through a shared subscription
(``$share/<group>/...``), and amqtt accepts such a subscription but never delivers to it
(measured, see docs/deployment.md's broker table; tests/protocol/test_broker_interop.py asserts
it). What Tandem needs of a broker is small, and this is it:

* MQTT 3.1.1 (protocol level 4). A client asking for MQTT 5 (level 5) gets the 3.1.1 refusal
  "unacceptable protocol version" (CONNACK return code 1), as mosquitto answers a level it does
  not speak, so a client that negotiates falls back to 3.1.1.
* QoS 0 and 1 (QoS 2 is accepted inbound with its full handshake and delivered at QoS 1: a
  SUBACK grants at most 1); retained messages (an empty payload clears one); last wills
  (published when a connection ends without DISCONNECT, also on a keep-alive timeout or a
  takeover by the same client id).
* Topic filters with ``+`` and ``#``; topics starting with ``$`` match no filter that starts
  with a wildcard. **Shared subscriptions** ``$share/<group>/<filter>`` (as mosquitto offers
  them to 3.1.1 clients too): each message goes to one connected member of the group, round
  robin; retained messages are not sent to shared subscriptions.
* Sessions: ``clean session = 0`` keeps the session (subscriptions, QoS 1 messages not yet
  acknowledged, and up to ``max_queued_messages`` arriving while the client is away) for as
  long as the broker runs; nothing survives a broker restart.
* Limits, checked before anything is allocated: ``max_packet_bytes`` per packet (a larger one
  closes the connection, as mosquitto does); per client ``max_queued_messages`` and
  ``max_queued_bytes`` waiting to be written (past either, new messages for it are dropped and
  counted — a slow reader cannot make the broker hold unbounded memory); a malformed packet
  closes that connection and nothing else.
* Optional ``users`` ({name: password}); without it anonymous clients are allowed, so by default
  it listens on 127.0.0.1 only. TCP_NODELAY on every connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import socket
import struct
from dataclasses import dataclass, field

from tandem.lab._loop import SyncShell, Tasks, listen
from tandem.protocol.errors import InvalidArgument

__all__ = ["BrokerStats", "EmbeddedBroker", "SyncBroker", "topic_matches"]

log = logging.getLogger("tandem.lab.broker")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3)
ACCEPTED, BAD_VERSION, BAD_CLIENT_ID, _UNAVAILABLE, BAD_CREDENTIALS, NOT_AUTHORIZED = range(6)

_MAX_FILTERS_PER_SUBSCRIBE = 1024
_MAX_SUBSCRIPTIONS_PER_CLIENT = 10_000
_MAX_CLIENT_ID = 256
_CONNECT_TIMEOUT_S = 10.0  # a connection that sends no CONNECT in this long is closed
_MAX_QOS2_PENDING = 1024


class _Malformed(Exception):
    """A packet that breaks the protocol: the connection is closed (MQTT 3.1.1 §4.8)."""


@dataclass
class BrokerStats:
    connections: int = 0  # open now
    connections_total: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # messages not queued for a client over its limits
    malformed: int = 0  # connections closed for breaking the protocol
    retained: int = 0
    sessions: int = 0


def _valid_topic(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic


def _valid_filter(flt: str) -> bool:
    if not flt or "\0" in flt:
        return False
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(flt: str, topic: str) -> bool:
    """Whether ``topic`` matches the filter ``flt`` (MQTT 3.1.1 §4.7)."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    f_levels = flt.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def _shared(flt: str) -> tuple[str, str] | None:
    """(group, filter) of ``$share/<group>/<filter>``, else None."""
    if not flt.startswith("$share/"):
        return None
    parts = flt.split("/", 2)
    if len(parts) != 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not parts[2]:
        raise _Malformed(f"bad shared subscription {flt!r}")
    return parts[1], parts[2]


class _Reader:
    """Fields of one packet's body, each read with its bounds checked."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise _Malformed("packet shorter than its fields")
        out = self.body[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("a string is not UTF-8") from None

    def rest(self) -> bytes:
        out = self.body[self.pos:]
        self.pos = len(self.body)
        return out

    @property
    def left(self) -> int:
        return len(self.body) - self.pos


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _remaining_length(len(body)) + body


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class _Session:
    client_id: str
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS
    conn: _Connection | None = None
    offline: collections.deque[_Message] = field(default_factory=collections.deque)
    unacked: dict[int, _Message] = field(default_factory=dict)  # QoS 1 sent, no PUBACK yet
    ids: itertools.cycle = field(default_factory=lambda: itertools.cycle(range(1, 65536)))

    def next_id(self) -> int:
        for _ in range(65535):
            pid = next(self.ids)
            if pid not in self.unacked:
                return pid
        raise _Malformed("65535 messages unacknowledged")


class _Connection:
    def __init__(self, broker: EmbeddedBroker, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.keepalive_s = 0
        self.qos2: set[int] = set()
        self.queued_messages = 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.broker._stats.bytes_out += len(data)

    def buffered_bytes(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def abort(self) -> None:
        self.writer.transport.abort()


class EmbeddedBroker:
    """The broker on ``host:port`` (0: a free port, see :attr:`port`), on the running loop::

        async with EmbeddedBroker() as broker:
            ... MqttTransport(TransportConfig(port=broker.port, protocol=311)) ...
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_packet_bytes: int = 64 * 1024 * 1024, max_queued_messages: int = 1000,
                 max_queued_bytes: int = 64 * 1024 * 1024,
                 users: dict[str, str] | None = None) -> None:
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise InvalidArgument(f"port must be in [0, 65535], not {port!r}")
        for name, value in (("max_packet_bytes", max_packet_bytes),
                            ("max_queued_messages", max_queued_messages),
                            ("max_queued_bytes", max_queued_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, not {value!r}")
        self.host = host
        self.port = port
        self.max_packet_bytes = min(max_packet_bytes, 268_435_455 + 5)
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.users = dict(users) if users else None
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Message] = {}
        self._shared_next: dict[tuple[str, str], int] = {}
        self._tasks = Tasks()
        self._stats = BrokerStats()

    async def start(self) -> EmbeddedBroker:
        self._server = await listen(self._accept, self.host, self.port,
                                    what="the embedded broker")
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("embedded MQTT 3.1.1 broker on %s:%d", self.host, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in self._sessions.values():
            if session.conn is not None:
                session.conn.abort()
        await self._tasks.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> BrokerStats:
        s = BrokerStats(**vars(self._stats))
        s.retained = len(self._retained)
        s.sessions = len(self._sessions)
        return s

    # -- connections --------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.spawn(self._serve(_Connection(self, reader, writer)))

    async def _read_packet(self, conn: _Connection, timeout_s: float | None):
        async def read() -> tuple[int, int, bytes]:
            first = await conn.reader.readexactly(1)
            length, shift = 0, 0
            for _ in range(4):
                byte = (await conn.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            else:
                raise _Malformed("remaining length longer than 4 bytes")
            if length + 5 > self.max_packet_bytes:
                raise _Malformed(f"packet of {length} bytes over the broker's limit "
                                 f"({self.max_packet_bytes})")
            body = await conn.reader.readexactly(length) if length else b""
            self._stats.bytes_in += 1 + length
            return first[0] >> 4, first[0] & 0x0F, body

        if timeout_s is None:
            return await read()
        return await asyncio.wait_for(read(), timeout_s)

    async def _serve(self, conn: _Connection) -> None:
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stats.connections += 1
        self._stats.connections_total += 1
        clean_end = False
        try:
            kind, flags, body = await self._read_packet(conn, _CONNECT_TIMEOUT_S)
            if kind != CONNECT or not self._connect(conn, flags, _Reader(body)):
                return
            while True:
                timeout_s = conn.keepalive_s * 1.5 if conn.keepalive_s else None
                kind, flags, body = await self._read_packet(conn, timeout_s)
                if kind == DISCONNECT:
                    clean_end = True
                    return
                self._handle(conn, kind, flags, _Reader(body))
                if conn.writer.transport.is_closing():
                    return
        except _Malformed as exc:
            self._stats.malformed += 1
            log.info("closing %s: %s", conn.session.client_id if conn.session else "a client",
                     exc)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self._stats.connections -= 1
            self._disconnected(conn, clean_end)
            conn.writer.close()

    def _connect(self, conn: _Connection, flags: int, r: _Reader) -> bool:
        if flags:
            raise _Malformed("CONNECT with reserved flags set")
        name = r.string()
        level = r.u8()
        if name != "MQTT" or level != 4:
            if name in ("MQTT", "MQIsdp"):  # a version we do not speak: say so (rc 1)
                conn.write(_packet(CONNACK, 0, bytes([0, BAD_VERSION])))
                return False
            raise _Malformed(f"unknown protocol {name!r}")
        cflags = r.u8()
        conn.keepalive_s = r.u16()
        if cflags & 0x01:
            raise _Malformed("CONNECT reserved flag set")
        clean = bool(cflags & 0x02)
        client_id = r.string()
        will = None
        if cflags & 0x04:
            will_qos = (cflags >> 3) & 0x03
            if will_qos > 2:
                raise _Malformed("will QoS 3")
            topic = r.string()
            payload = r.binary()
            if not _valid_topic(topic):
                raise _Malformed(f"bad will topic {topic!r}")
            will = _Message(topic, payload, min(will_qos, 1), bool(cflags & 0x20))
        elif cflags & 0x38:
            raise _Malformed("will QoS or retain without a will")
        username = r.string() if cflags & 0x80 else None
        password = r.binary() if cflags & 0x40 else None
        if r.left:
            raise _Malformed("bytes after the CONNECT payload")
        if not client_id:
            if not clean:
                conn.write(_packet(CONNACK, 0, bytes([0, BAD_CLIENT_ID])))
                return False
            client_id = "auto-" + secrets.token_hex(8)
        if len(client_id) > _MAX_CLIENT_ID:
            conn.write(_packet(CONNACK, 0, bytes([0, BAD_CLIENT_ID])))
            return False
        if self.users is not None:
            known = self.users.get(username or "")
            if username is None or password is None:
                conn.write(_packet(CONNACK, 0, bytes([0, NOT_AUTHORIZED])))
                return False
            if known is None or not secrets.compare_digest(known.encode(), password):
                conn.write(_packet(CONNACK, 0, bytes([0, BAD_CREDENTIALS])))
                return False
        session = self._sessions.get(client_id)
        if session is not None and session.conn is not None:  # takeover: the old one goes
            old = session.conn
            session.conn = None
            old.session = None
            self._publish_will(old)
            old.abort()
        present = session is not None and not clean
        if session is None or clean:
            session = _Session(client_id, clean)
            self._sessions[client_id] = session
        session.clean = clean
        session.conn = conn
        conn.session = session
        conn.will = will
        conn.write(_packet(CONNACK, 0, bytes([1 if present else 0, ACCEPTED])))
        # a resumed session: unacknowledged QoS 1 messages again (DUP), then what waited
        for pid, msg in list(session.unacked.items()):
            self._write_publish(conn, msg, pid, dup=True)
        while session.offline:
            self._deliver(session, session.offline.popleft())
        return True

    def _disconnected(self, conn: _Connection, clean_end: bool) -> None:
        session = conn.session
        if not clean_end:
            self._publish_will(conn)
        if session is None or session.conn is not conn:
            return
        session.conn = None
        if session.clean:
            del self._sessions[session.client_id]

    def _publish_will(self, conn: _Connection) -> None:
        will, conn.will = conn.will, None
        if will is not None:
            self._route(will)

    # -- packets ------------------------------------------------------------------------------

    def _handle(self, conn: _Connection, kind: int, flags: int, r: _Reader) -> None:
        session = conn.session
        assert session is not None
        if kind == PUBLISH:
            qos = (flags >> 1) & 0x03
            if qos > 2:
                raise _Malformed("PUBLISH with QoS 3")
            topic = r.string()
            pid = r.u16() if qos else None
            if pid == 0:
                raise _Malformed("packet id 0")
            if not _valid_topic(topic):
                raise _Malformed(f"bad topic name {topic!r}")
            msg = _Message(topic, r.rest(), min(qos, 1), bool(flags & 0x01))
            self._stats.messages_in += 1
            if qos == 2:
                assert pid is not None  # a QoS 2 PUBLISH always has one
                if pid not in conn.qos2:  # a QoS 2 duplicate is delivered once
                    if len(conn.qos2) >= _MAX_QOS2_PENDING:
                        raise _Malformed("too many QoS 2 messages without PUBREL")
                    conn.qos2.add(pid)
                    self._route(msg)
                conn.write(_packet(PUBREC, 0, struct.pack(">H", pid)))
                return
            self._route(msg)
            if qos == 1:
                conn.write(_packet(PUBACK, 0, struct.pack(">H", pid)))
        elif kind == PUBACK:
            session.unacked.pop(r.u16(), None)
        elif kind == PUBREL:
            pid = r.u16()
            conn.qos2.discard(pid)
            conn.write(_packet(PUBCOMP, 0, struct.pack(">H", pid)))
        elif kind in (PUBREC, PUBCOMP):  # we never send QoS 2: nothing to complete
            r.u16()
        elif kind == SUBSCRIBE:
            if flags != 0x02:
                raise _Malformed("SUBSCRIBE with wrong flags")
            pid = r.u16()
            wanted: list[tuple[str, int]] = []
            while r.left:
                flt, qos = r.string(), r.u8()
                if qos & 0xFC:
                    raise _Malformed("SUBSCRIBE with reserved bits set")
                wanted.append((flt, qos))
                if len(wanted) > _MAX_FILTERS_PER_SUBSCRIBE:
                    raise _Malformed("too many filters in one SUBSCRIBE")
            if not wanted:
                raise _Malformed("SUBSCRIBE without a filter")
            codes = []
            for flt, qos in wanted:
                shared = _shared(flt)
                inner = shared[1] if shared else flt
                if not _valid_filter(inner) or (flt not in session.subscriptions and len(
                        session.subscriptions) >= _MAX_SUBSCRIPTIONS_PER_CLIENT):
                    codes.append(0x80)
                    continue
                granted = min(qos, 1)
                session.subscriptions[flt] = granted
                codes.append(granted)
            conn.write(_packet(SUBACK, 0, struct.pack(">H", pid) + bytes(codes)))
            for (flt, _), code in zip(wanted, codes, strict=True):
                if code != 0x80 and _shared(flt) is None:
                    for msg in list(self._retained.values()):
                        if topic_matches(flt, msg.topic):
                            self._send(session, msg, min(msg.qos, code), retain=True)
        elif kind == UNSUBSCRIBE:
            if flags != 0x02:
                raise _Malformed("UNSUBSCRIBE with wrong flags")
            pid = r.u16()
            if not r.left:
                raise _Malformed("UNSUBSCRIBE without a filter")
            while r.left:
                session.subscriptions.pop(r.string(), None)
            conn.write(_packet(UNSUBACK, 0, struct.pack(">H", pid)))
        elif kind == PINGREQ:
            conn.write(_packet(PINGRESP, 0, b""))
        else:
            raise _Malformed(f"unexpected packet type {kind}")

    # -- routing ------------------------------------------------------------------------------

    def _route(self, msg: _Message) -> None:
        if msg.retain:
            if msg.payload:
                self._retained[msg.topic] = _Message(msg.topic, msg.payload, msg.qos, True)
            else:
                self._retained.pop(msg.topic, None)
        groups: dict[tuple[str, str], list[tuple[_Session, int]]] = {}
        for session in list(self._sessions.values()):
            best = -1
            for flt, granted in session.subscriptions.items():
                shared = _shared(flt)
                if shared is not None:
                    if topic_matches(shared[1], msg.topic):
                        groups.setdefault(shared, []).append((session, granted))
                elif topic_matches(flt, msg.topic):
                    best = max(best, granted)
            if best >= 0:  # one copy per client, at its highest matching QoS
                self._send(session, msg, min(msg.qos, best), retain=False)
        for key, members in groups.items():
            online = [m for m in members if m[0].conn is not None] or members
            i = self._shared_next.get(key, 0) % len(online)
            self._shared_next[key] = i + 1
            session, granted = online[i]
            self._send(session, msg, min(msg.qos, granted), retain=False)

    def _send(self, session: _Session, msg: _Message, qos: int, retain: bool) -> None:
        out = _Message(msg.topic, msg.payload, qos, retain)
        if session.conn is None:
            if qos == 0 or session.clean:
                return
            if len(session.offline) >= self.max_queued_messages:
                self._stats.dropped += 1
                return
            session.offline.append(out)
            return
        self._deliver(session, out)

    def _deliver(self, session: _Session, msg: _Message) -> None:
        conn = session.conn
        assert conn is not None
        if conn.writer.transport.is_closing():  # lost, and its task has not noticed yet
            if msg.qos and not session.clean and len(session.offline) < self.max_queued_messages:
                session.offline.append(msg)
            else:
                self._stats.dropped += 1
            return
        if conn.buffered_bytes() + len(msg.payload) > self.max_queued_bytes \
                or len(session.unacked) >= self.max_queued_messages:
            self._stats.dropped += 1
            return
        pid = None
        if msg.qos:
            pid = session.next_id()
            session.unacked[pid] = msg
        self._write_publish(conn, msg, pid, dup=False)

    def _write_publish(self, conn: _Connection, msg: _Message, pid: int | None,
                       dup: bool) -> None:
        flags = (0x08 if dup else 0) | (msg.qos << 1) | (0x01 if msg.retain else 0)
        head = _string(msg.topic) + (struct.pack(">H", pid) if pid is not None else b"")
        n = len(head) + len(msg.payload)
        conn.write(bytes([PUBLISH << 4 | flags]) + _remaining_length(n) + head)
        conn.write(msg.payload)
        self._stats.messages_out += 1


class SyncBroker(SyncShell):
    """An :class:`EmbeddedBroker` on its own thread, for blocking code::

        with SyncBroker() as broker:
            ... broker.port ...
    """

    def __init__(self, broker: EmbeddedBroker | None = None, *,
                 call_timeout_s: float = 10.0) -> None:
        self.broker = broker or EmbeddedBroker()
        super().__init__(self.broker, "tandem-broker-loop", call_timeout_s)

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def host(self) -> str:
        return self.broker.host

    def stats(self) -> BrokerStats:
        return self._thread.run(self.broker.stats)
