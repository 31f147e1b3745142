"""Small TCP servers for tests that put something between two ends (the link emulator): a sink
that records what arrives and when, and an echo server. Plus ``run``: a scenario on a fresh
event loop, bounded in time."""

from __future__ import annotations

import asyncio
import time

__all__ = ["Echo", "Sink", "run"]


class _Server:
    """A TCP server on 127.0.0.1 and a free port; ``close`` aborts every connection."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self):
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class Sink(_Server):
    """A TCP server that records what each connection sent, and when its last byte came."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytearray] = []
        self.ended = asyncio.Event()
        self.got_bytes = asyncio.Event()
        self.last_byte_at = 0.0
        self.read = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.received.append(buf)
        try:
            while True:
                while not self.read:
                    await asyncio.sleep(0.01)
                data = await reader.read(1 << 16)
                if not data:
                    break
                buf += data
                self.last_byte_at = time.monotonic()
                self.got_bytes.set()
        except ConnectionError:
            pass
        finally:
            self.ended.set()
            writer.close()


class Echo(_Server):
    """A TCP server that sends back what it receives; half-closes when the client does."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass


def run(coro, timeout_s: float = 60.0):
    """Run one test scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))
