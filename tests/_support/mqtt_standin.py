"""A broker stand-in: an asyncio TCP server on 127.0.0.1 speaking just enough MQTT (3.1.1 and 5)
to accept connections and misbehave the ways real brokers do, counting what clients do.

It answers CONNECT, SUBSCRIBE, UNSUBSCRIBE, PUBLISH (QoS 0/1; nothing is routed), PINGREQ and
DISCONNECT, and can

* refuse a protocol version as amqtt, Aedes and NATS's gateway refuse MQTT 5 (a CONNACK with
  0x84, or 3.1.1's return code 1), close the socket before CONNACK as RabbitMQ 3.10 does, or
  never answer as amqtt does when an MQTT 5 CONNECT carries a will, a user name or properties
  (it reads them as 3.1.1 fields and waits for bytes that never come);
* drop the connection on a SUBSCRIBE, instead of a SUBACK, for the filters ``drop_on_subscribe``
  picks (ejabberd does it on every ``$share/`` filter: :meth:`StandIn.ejabberd`);
* answer a SUBSCRIBE with a failure code for the filters ``refuse_filter`` picks;
* drop every connection ``drop_after_s`` after its CONNACK (a flapping broker, or two clients
  with one client id kicking each other out), or only the first ``drops`` connections.

``connections`` holds the loop time of every accepted connection, ``levels`` the protocol level
of every CONNECT (4: 3.1.1, 5: MQTT 5), ``subscribes`` every filter received. Run it on the
test's event loop (``async with StandIn(...) as broker``). Nothing here imports Tandem or paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable

__all__ = ["StandIn"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + _varint(len(body)) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 21:
            raise ValueError("malformed remaining length")
    return header, await reader.readexactly(length)


def _str_at(body: bytes, i: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("!H", body, i)
    return body[i + 2:i + 2 + n].decode("utf-8"), i + 2 + n


def _skip_properties(body: bytes, i: int) -> int:
    length, shift = 0, 0
    while True:
        byte = body[i]
        i += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return i + length


class StandIn:
    """See the module docstring."""

    def __init__(self, *, versions: tuple[int, ...] = (4, 5), version_refusal: str = "connack",
                 drop_on_subscribe: Callable[[str], bool] | None = None,
                 refuse_filter: Callable[[str], bool] | None = None,
                 drop_after_s: float | None = None, drops: int | None = None) -> None:
        if version_refusal not in ("connack", "connack-311", "close", "silent"):
            raise ValueError(version_refusal)
        self.versions = versions
        self.version_refusal = version_refusal
        self.drop_on_subscribe = drop_on_subscribe
        self.refuse_filter = refuse_filter
        self.drop_after_s = drop_after_s
        self.drops = drops
        self.host = "127.0.0.1"
        self.port = 0
        self.connections: list[float] = []
        self.levels: list[int] = []
        self.subscribes: list[str] = []
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def ejabberd(cls, **kw) -> StandIn:
        """ejabberd 23.01's mod_mqtt: MQTT 5, and the connection dropped on a ``$share/``
        SUBSCRIBE ("Shared subscription not supported")."""
        return cls(drop_on_subscribe=lambda f: f.startswith("$share/"), **kw)

    async def start(self) -> StandIn:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def __aenter__(self) -> StandIn:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def kick_all(self) -> None:
        """Drop every open connection (a broker restart, seen from the clients)."""
        for writer in list(self._writers):
            writer.close()

    def connections_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.connections)

    # -- one connection ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.connections.append(loop.time())
        self._writers.add(writer)
        timer: asyncio.TimerHandle | None = None
        try:
            header, body = await _read_packet(reader)
            if header >> 4 != 1:
                return
            _, i = _str_at(body, 0)
            level = body[i]
            self.levels.append(level)
            if level not in self.versions:
                if self.version_refusal == "close":
                    return
                if self.version_refusal == "silent":
                    await reader.read()  # until the client gives up
                    return
                refusal = _packet(0x20, b"\x00\x84\x00") \
                    if level == 5 and self.version_refusal == "connack" \
                    else _packet(0x20, b"\x00\x01")
                writer.write(refusal)
                await writer.drain()
                return
            v5 = level == 5
            writer.write(_packet(0x20, b"\x00\x00\x00" if v5 else b"\x00\x00"))
            await writer.drain()
            if self.drop_after_s is not None and (self.drops is None or self.drops > 0):
                if self.drops is not None:
                    self.drops -= 1
                timer = loop.call_later(self.drop_after_s, writer.close)
            while True:
                header, body = await _read_packet(reader)
                kind = header >> 4
                if kind == 8:  # SUBSCRIBE
                    pid = body[:2]
                    i = _skip_properties(body, 2) if v5 else 2
                    codes = bytearray()
                    drop = False
                    while i < len(body):
                        flt, i = _str_at(body, i)
                        options = body[i]
                        i += 1
                        self.subscribes.append(flt)
                        if self.drop_on_subscribe is not None and self.drop_on_subscribe(flt):
                            drop = True
                        refused = self.refuse_filter is not None and self.refuse_filter(flt)
                        codes.append(0x80 if refused else options & 3)
                    if drop:
                        return
                    writer.write(_packet(0x90, pid + (b"\x00" if v5 else b"") + bytes(codes)))
                elif kind == 10:  # UNSUBSCRIBE
                    pid = body[:2]
                    i = _skip_properties(body, 2) if v5 else 2
                    n = 0
                    while i < len(body):
                        _, i = _str_at(body, i)
                        n += 1
                    writer.write(_packet(0xB0, pid + (b"\x00" + b"\x00" * n if v5 else b"")))
                elif kind == 3:  # PUBLISH: acknowledged, not routed
                    qos = (header >> 1) & 3
                    _, i = _str_at(body, 0)
                    if qos == 1:
                        writer.write(_packet(0x40, body[i:i + 2]))
                    elif qos == 2:
                        writer.write(_packet(0x50, body[i:i + 2]))
                elif kind == 6:  # PUBREL
                    writer.write(_packet(0x70, body[:2]))
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError,
                struct.error, UnicodeDecodeError):
            return
        finally:
            if timer is not None:
                timer.cancel()
            self._writers.discard(writer)
            writer.close()
