"""The link emulator: a TCP proxy that makes a loopback connection behave like a network link.

Put it between an edge daemon and its broker (``edge → 127.0.0.1:P (proxy) → broker``) and
every byte in each direction goes through the same model:

* **bandwidth**: a token bucket per direction, shared by every connection through the link (as a
  real link is shared). A chunk of *n* bytes finishes crossing the link *n*/rate after the link
  was free (less what the bucket's depth, ``burst_bytes``, has saved up while idle), so a
  message's last byte arrives after its whole serialization time, as on a real link. The time is
  kept on a virtual clock: a late wake-up of the event loop never slows the rate down.
* **one-way delay and jitter**: each chunk is delivered ``delay_ms`` plus a uniform draw in
  ``±jitter_ms`` after it crossed, never before the chunk sent ahead of it on the same
  connection (TCP does not reorder, so jitter never does either; it only ever adds delay when
  two chunks are closer than the jitter).
* **outages**: while the link is down nothing crosses in either direction. ``stall`` (the
  default) holds the bytes — connections stay open and resume when the link is back, as TCP
  does after a short radio loss (what was in flight arrives one delay after the link returns);
  new connections wait. ``reset`` closes every connection at once and refuses new ones until the
  link is back, as when a NAT or a modem forgets them.
* **bounded buffers**: each direction of each connection holds at most ``max_queue_bytes``
  (default: what the link carries in 200 ms plus one delay, at least 64 KiB); past that the proxy
  stops reading, and TCP's flow control pushes back on the sender — a router queue of that size.

Everything can change while it runs (:meth:`LinkEmulator.set_profile`, :meth:`~LinkEmulator.
outage`, :meth:`~LinkEmulator.set_down`, a timed :meth:`~LinkEmulator.run_schedule`); a change
applies to bytes that reach the link afterwards. TCP_NODELAY is set on both sides.

What it does not model: packet loss and its retransmissions (except as an outage), TCP slow
start and congestion windows, asymmetric routing, MTU fragmentation. Timers are the event
loop's: epoll wakes in whole milliseconds and a loaded machine adds latency, so the emulator
learns how late its wake-ups run and asks to be woken that much early; a chunk is delivered
within about a millisecond of its time either way (``python -m benchmarks.link`` measures it).

``LinkEmulator`` is the asyncio core; :class:`SyncLinkEmulator` runs one on its own thread for
blocking code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tandem.lab._loop import SyncShell, Tasks, listen
from tandem.protocol.errors import InvalidArgument

__all__ = [
    "PROFILES",
    "DirectionStats",
    "LinkEmulator",
    "LinkProfile",
    "LinkStats",
    "LinkStep",
    "SyncLinkEmulator",
    "format_rate",
    "parse_rate",
]

log = logging.getLogger("tandem.lab.link")

_MIN_CHUNK = 1448  # one Ethernet TCP segment's payload: the finest grain a chunk gets
_MAX_CHUNK = 64 * 1024
_CHUNK_S = 0.001  # a chunk is at most what the link carries in this long (finer timing)
_READ_CHUNKS = 8  # one read takes up to this many chunks (each keeps its own timing)
_CATCH_UP_S = 0.05  # how far a backlogged sender's bytes may lag the link's virtual clock
# The event loop wakes late: epoll sleeps whole milliseconds, rounded up, and a busy machine
# adds its own latency (measured here: 0.4-1.9 ms, median 0.9). The emulator feeds back how
# late (or early) each timed delivery came and asks to be woken that much earlier, so
# deliveries centre on their time instead of always coming after it.
_WAKE_EARLY_INIT_S = 0.0005
_WAKE_EARLY_MAX_S = 0.002
_WAKE_EARLY_GAIN = 0.1
_MIN_QUEUE = 64 * 1024
_UNLIMITED_QUEUE = 4 * 1024 * 1024
_QUEUE_S = 0.2  # a direction's queue holds what the link carries in this long (+ one delay)
_LATENESS_SAMPLES = 4096


def parse_rate(text: str | float | int | None) -> float | None:
    """Bits per second from ``"6mbit"``, ``"6 Mbit/s"``, ``"500kbit"``, ``"1.5gbit"``,
    ``"2mbps"`` (``bps`` = bits, as tc says it) or a number of bits per second; ``None``,
    ``"none"``, ``"unlimited"`` or ``"inf"`` mean no limit."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise InvalidArgument(f"not a rate: {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        if s in ("none", "unlimited", "inf", "off", ""):
            return None
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([kmg]?)(bit|bits|bps|bit/s)?", s)
        if not m:
            raise InvalidArgument(f"not a rate: {text!r} (say e.g. 6mbit, 500kbit, 1gbit)")
        value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"a rate must be a positive number of bits per second: {text!r}")
    if value < 8_000:
        raise InvalidArgument(f"rate {text!r} is below 8 kbit/s (1 KB/s), too slow to emulate")
    return value


def format_rate(bps: float | None) -> str:
    """``6 Mbit/s``, ``500 kbit/s``; ``unlimited`` for None."""
    if bps is None:
        return "unlimited"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.4g} {unit}"
    return f"{bps:.4g} bit/s"


@dataclass(frozen=True)
class LinkProfile:
    """What a link does to the bytes crossing it, per direction.

    ``uplink_bps``: client → target (edge → broker), bits per second, None = unlimited;
    ``downlink_bps`` the other way. ``delay_ms``: one-way delay, each direction (so the round
    trip adds twice it); ``jitter_ms``: each chunk's delay varies uniformly within ±jitter
    (never reordering). ``burst_bytes``: the token bucket's depth (None: one chunk, i.e. a
    message is serialized at the rate from its first byte).
    """

    name: str = "custom"
    uplink_bps: float | None = None
    downlink_bps: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    burst_bytes: int | None = None

    def __post_init__(self) -> None:
        for what in ("uplink_bps", "downlink_bps"):
            value = getattr(self, what)
            if value is not None:
                object.__setattr__(self, what, parse_rate(value))
        for what in ("delay_ms", "jitter_ms"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or not 0 <= value <= 60_000:
                raise InvalidArgument(f"{what} must be a number of ms in [0, 60000], not "
                                      f"{value!r}")
        if self.jitter_ms > self.delay_ms:
            raise InvalidArgument(f"jitter_ms ({self.jitter_ms}) cannot exceed delay_ms "
                                  f"({self.delay_ms}): a delay is never negative")
        if self.burst_bytes is not None and (
                isinstance(self.burst_bytes, bool) or not isinstance(self.burst_bytes, int)
                or not 1 <= self.burst_bytes <= 1 << 30):
            raise InvalidArgument(f"burst_bytes must be an integer in [1, 2**30], not "
                                  f"{self.burst_bytes!r}")

    @property
    def rtt_ms(self) -> float:
        """The round trip the link adds (both one-way delays)."""
        return 2 * self.delay_ms

    def describe(self) -> str:
        """``lte: 6 Mbit/s up, 6 Mbit/s down, 25 ms one-way (±3 ms)``."""
        jitter = f" (±{self.jitter_ms:g} ms)" if self.jitter_ms else ""
        return (f"{self.name}: {format_rate(self.uplink_bps)} up, "
                f"{format_rate(self.downlink_bps)} down, {self.delay_ms:g} ms one-way{jitter}")

    def with_changes(self, **changes: Any) -> LinkProfile:
        """A copy with some fields changed (rates may be given as text); named ``custom``
        unless a name is given."""
        changes.setdefault("name", "custom")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


#: The link classes of the benchmarks (issue #13): symmetric rates, one-way delay = RTT / 2.
PROFILES: dict[str, LinkProfile] = {
    p.name: p for p in (
        LinkProfile("3g", 1e6, 1e6, 50.0, 5.0),
        LinkProfile("lte", 6e6, 6e6, 25.0, 3.0),
        LinkProfile("wifi", 20e6, 20e6, 5.0, 1.0),
        LinkProfile("wired", 100e6, 100e6, 1.0, 0.0),
        LinkProfile("unlimited"),
    )
}


@dataclass(frozen=True)
class LinkStep:
    """One change of a schedule, ``at_s`` seconds after the schedule starts: a new profile,
    and/or an outage of ``outage_s`` seconds (``mode`` ``stall`` or ``reset``)."""

    at_s: float
    profile: LinkProfile | None = None
    outage_s: float | None = None
    mode: str = "stall"

    def __post_init__(self) -> None:
        if isinstance(self.at_s, bool) or not isinstance(self.at_s, int | float) \
                or not math.isfinite(self.at_s) or self.at_s < 0:
            raise InvalidArgument(f"a step's at_s must be a time >= 0, not {self.at_s!r}")
        if self.outage_s is not None and (
                isinstance(self.outage_s, bool) or not isinstance(self.outage_s, int | float)
                or not math.isfinite(self.outage_s) or self.outage_s <= 0):
            raise InvalidArgument(f"outage_s must be a duration > 0, not {self.outage_s!r}")
        if self.mode not in ("stall", "reset"):
            raise InvalidArgument(f"outage mode must be stall or reset, not {self.mode!r}")
        if self.profile is None and self.outage_s is None:
            raise InvalidArgument("a step changes the profile, starts an outage, or both")


@dataclass
class DirectionStats:
    """One direction of the link, over every connection since it started."""

    bytes: int = 0  # delivered
    chunks: int = 0
    queued_bytes: int = 0  # read and not yet delivered, now
    max_queued_bytes: int = 0
    lateness_ms_p50: float | None = None  # delivery after its scheduled time
    lateness_ms_p99: float | None = None
    lateness_ms_max: float | None = None


@dataclass
class LinkStats:
    """The link now: its profile, whether it is down, connections, and per direction what
    crossed and how late the emulator delivered it."""

    profile: LinkProfile
    is_down: bool
    connections_open: int
    connections_total: int
    connections_refused: int
    uplink: DirectionStats = field(default_factory=DirectionStats)
    downlink: DirectionStats = field(default_factory=DirectionStats)

    def to_dict(self) -> dict:
        return asdict(self)


class _Direction:
    """The shared half of one direction: the token bucket's virtual clock and the counters."""

    def __init__(self) -> None:
        self.rate_bps: float | None = None
        self.burst_bytes: int | None = None
        self.free_at = 0.0  # virtual time the link finishes what it has accepted so far
        self.stats = DirectionStats()
        self.lateness_s: collections.deque[float] = collections.deque(maxlen=_LATENESS_SAMPLES)

    def configure(self, rate_bps: float | None, burst_bytes: int | None) -> None:
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes

    @property
    def chunk_bytes(self) -> int:
        if self.rate_bps is None:
            return _MAX_CHUNK
        return int(min(_MAX_CHUNK, max(_MIN_CHUNK, self.rate_bps / 8 * _CHUNK_S)))

    def depth_bytes(self) -> int:
        return self.burst_bytes if self.burst_bytes is not None else self.chunk_bytes

    def cross(self, n: int, now: float, backlogged: bool) -> float:
        """The time the last of ``n`` bytes handed over at ``now`` has crossed the link.

        The bucket saves up at most its depth while the link idles, so the bytes may start that
        far in the past (a full bucket), never further. ``backlogged``: the sender had more
        bytes waiting than the last read took, so these were ready while the link was busy and
        only the event loop was late reading them: they continue from the link's clock (up to
        ``_CATCH_UP_S`` behind), and a busy loop does not lower the rate."""
        if self.rate_bps is None:
            return now
        bytes_s = self.rate_bps / 8
        credit_s = _CATCH_UP_S if backlogged else self.depth_bytes() / bytes_s
        start = max(self.free_at, now - credit_s)
        self.free_at = start + n / bytes_s
        return max(now, self.free_at)

    def queue_limit(self, delay_ms: float) -> int:
        if self.rate_bps is None:
            return _UNLIMITED_QUEUE
        return int(max(_MIN_QUEUE, self.rate_bps / 8 * (_QUEUE_S + delay_ms / 1000)))

    def snapshot(self) -> DirectionStats:
        s = replace(self.stats)
        if self.lateness_s:
            ordered = sorted(self.lateness_s)
            s.lateness_ms_p50 = ordered[len(ordered) // 2] * 1000
            s.lateness_ms_p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] \
                * 1000
            s.lateness_ms_max = ordered[-1] * 1000
        return s


class _Pipe:
    """One direction of one connection: reads from ``src``, queues each chunk with its delivery
    time, and writes it to ``dst`` when that time comes."""

    def __init__(self, link: LinkEmulator, direction: _Direction, src: asyncio.StreamReader,
                 dst: asyncio.StreamWriter, broken: Callable[[], None]) -> None:
        self.link = link
        self.direction = direction
        self.src = src
        self.dst = dst
        self.broken = broken  # aborts both sockets of the connection
        self.done = False
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.last_delivery = 0.0
        self.eof = False
        self.wake_writer = asyncio.Event()
        self.wake_reader = asyncio.Event()

    async def read_loop(self) -> None:
        link, d = self.link, self.direction
        backlogged = False
        try:
            while True:
                limit = d.queue_limit(link.profile.delay_ms)
                while self.queued >= limit and not self.done:
                    self.wake_reader.clear()
                    await self.wake_reader.wait()
                await link.wait_up()
                if self.done:
                    break
                chunk = d.chunk_bytes
                want = chunk * _READ_CHUNKS
                data = await self.src.read(want)
                if not data:
                    break
                now = link.clock()
                for i in range(0, len(data), chunk):
                    piece = data[i:i + chunk] if len(data) > chunk else data
                    crossed = d.cross(len(piece), now, backlogged or i > 0)
                    delay_ms = link.profile.delay_ms
                    jitter_ms = link.profile.jitter_ms
                    if jitter_ms:
                        delay_ms += link.rng.uniform(-jitter_ms, jitter_ms)
                    at = max(self.last_delivery, crossed + delay_ms / 1000)
                    self.last_delivery = at
                    self.queue.append((at, piece))
                backlogged = len(data) == want
                self.queued += len(data)
                d.stats.queued_bytes += len(data)
                d.stats.max_queued_bytes = max(d.stats.max_queued_bytes, d.stats.queued_bytes)
                self.wake_writer.set()
        except (ConnectionError, OSError):  # a reset: the connection is gone both ways
            self.broken()
        finally:
            self.eof = True
            self.wake_writer.set()

    async def write_loop(self) -> None:
        link, d = self.link, self.direction
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.wake_writer.clear()
                    await self.wake_writer.wait()
                    continue
                if link.down:
                    await link.wait_up()
                    # what was in flight arrives one delay after the link is back
                    back = link.clock() + link.profile.delay_ms / 1000
                    self.queue = collections.deque((max(at, back), b) for at, b in self.queue)
                    self.last_delivery = max(self.last_delivery, back)
                    continue
                at = self.queue[0][0]
                early = link.wake_early_s
                now = link.clock()
                if at > now:  # a timed delivery: wake early by what the timers run late
                    if at - early > now:
                        await asyncio.sleep(at - early - now)
                        if link.down:
                            continue
                    now = link.clock()
                    link.delivered(now - at)
                d.lateness_s.append(now - at)
                parts = []
                while self.queue and self.queue[0][0] <= now + early:
                    parts.append(self.queue.popleft()[1])
                n = sum(map(len, parts))
                self.dst.write(b"".join(parts) if len(parts) > 1 else parts[0])
                await self.dst.drain()
                self.queued -= n
                d.stats.queued_bytes -= n
                d.stats.bytes += n
                d.stats.chunks += len(parts)
                self.wake_reader.set()
            if self.dst.can_write_eof():
                self.dst.write_eof()  # a half-close crosses the link like the data before it
        except (ConnectionError, OSError):  # the receiver is gone: so is the connection
            self.broken()
        finally:
            self.done = True
            d.stats.queued_bytes -= self.queued
            self.queued = 0
            self.queue.clear()
            self.wake_reader.set()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LinkEmulator:
    """A TCP proxy on ``listen_host:listen_port`` (0: a free port, see :attr:`port`) to
    ``target_host:target_port`` that behaves like ``profile``. Use it on its event loop::

        async with LinkEmulator("127.0.0.1", 1883, PROFILES["lte"]) as link:
            ... connect to ("127.0.0.1", link.port) ...
            link.set_profile(PROFILES["3g"])
            link.outage(5.0)

    ``seed`` makes the jitter reproducible. ``clock`` is ``time.monotonic`` unless given.
    """

    def __init__(self, target_host: str, target_port: int,
                 profile: LinkProfile | None = None, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, seed: int = 0, connect_timeout_s: float = 10.0) -> None:
        if not isinstance(target_port, int) or not 0 < target_port < 65536:
            raise InvalidArgument(f"target port must be in [1, 65535], not {target_port!r}")
        if not isinstance(listen_port, int) or not 0 <= listen_port < 65536:
            raise InvalidArgument(f"listen port must be in [0, 65535], not {listen_port!r}")
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.connect_timeout_s = connect_timeout_s
        self.rng = random.Random(seed)
        self.clock = time.monotonic
        self.wake_early_s = _WAKE_EARLY_INIT_S
        self._up = _Direction()
        self._down = _Direction()
        self._server: asyncio.Server | None = None
        self.profile = LinkProfile("unlimited")
        self.set_profile(profile or PROFILES["unlimited"])
        self._link_up = asyncio.Event()
        self._link_up.set()
        self.down = False
        self._mode = "stall"
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks = Tasks()
        self._timers: list[asyncio.TimerHandle] = []
        self._total = 0
        self._refused = 0
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> LinkEmulator:
        self._server = await listen(self._accept, *self.listen, what="the link emulator")
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening, close every connection, cancel pending schedule steps."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._server is not None:
            self._server.close()
        self._drop_all()
        self._link_up.set()  # release whoever waits, so their tasks end
        await self._tasks.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- control (call on the loop's thread) -------------------------------------------------

    def set_profile(self, profile: LinkProfile) -> None:
        """Change the link; bytes that reach it from now on see the new one."""
        if not isinstance(profile, LinkProfile):
            raise InvalidArgument(f"expected a LinkProfile, not {type(profile).__name__}")
        self.profile = profile
        self._up.configure(profile.uplink_bps, profile.burst_bytes)
        self._down.configure(profile.downlink_bps, profile.burst_bytes)
        if self._server is not None:
            log.info("link now %s", profile.describe())

    def set_down(self, down: bool, mode: str = "stall") -> None:
        """Take the link down (``stall`` holds bytes and new connections; ``reset`` also closes
        every connection and refuses new ones) or bring it back up."""
        if mode not in ("stall", "reset"):
            raise InvalidArgument(f"outage mode must be stall or reset, not {mode!r}")
        if down:
            self.down, self._mode = True, mode
            self._link_up.clear()
            if mode == "reset":
                self._drop_all()
            log.info("link down (%s)", mode)
        elif self.down:
            self.down = False
            now = self.clock()
            for d in (self._up, self._down):
                d.free_at = max(d.free_at, now)
            self._link_up.set()
            log.info("link up")

    def outage(self, duration_s: float, mode: str = "stall") -> None:
        """Down now, up again after ``duration_s``."""
        if not duration_s > 0:
            raise InvalidArgument(f"an outage lasts > 0 s, not {duration_s!r}")
        self.set_down(True, mode)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(duration_s, self.set_down, False))

    def run_schedule(self, steps: Iterable[LinkStep]) -> None:
        """Apply each step ``at_s`` seconds from now (pending steps end with :meth:`close`)."""
        loop = asyncio.get_running_loop()
        for step in sorted(steps, key=lambda s: s.at_s):
            self._timers.append(loop.call_later(step.at_s, self._apply, step))

    def _apply(self, step: LinkStep) -> None:
        if step.profile is not None:
            self.set_profile(step.profile)
        if step.outage_s is not None:
            self.outage(step.outage_s, step.mode)

    def stats(self) -> LinkStats:
        return LinkStats(self.profile, self.down, len(self._conns), self._total, self._refused,
                         self._up.snapshot(), self._down.snapshot())

    async def wait_up(self) -> None:
        if self.down:
            await self._link_up.wait()

    def delivered(self, late_s: float) -> None:
        """A timed delivery came ``late_s`` after its time (negative: before it): wake up
        earlier (or later) next time, so that deliveries centre on their time."""
        early = self.wake_early_s + _WAKE_EARLY_GAIN * late_s
        self.wake_early_s = min(max(early, 0.0), _WAKE_EARLY_MAX_S)

    # -- connections --------------------------------------------------------------------------

    def _drop_all(self) -> None:
        for client, upstream in list(self._conns):
            for w in (client, upstream):
                if w is not None:
                    w.transport.abort()
        self._conns.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the connection runs in a task of ours (cancelled by close()): asyncio's own task for
        # a client_connected_cb logs a traceback when it is cancelled
        self._tasks.spawn(self._connection(reader, writer))

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self.down and self._mode == "reset":
            self._refused += 1
            writer.transport.abort()
            return
        _nodelay(writer)
        entry: list = [writer, None]
        key: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._conns.add(key)
        try:
            await self.wait_up()  # a stalled link holds new connections too
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), self.connect_timeout_s)
            except (OSError, asyncio.TimeoutError) as exc:
                log.info("link: cannot reach %s:%d (%s)", *self.target, exc)
                self._refused += 1
                writer.transport.abort()
                return
            if key not in self._conns:  # reset while connecting
                up_writer.transport.abort()
                writer.transport.abort()
                return
            self._conns.discard(key)
            entry[1] = up_writer
            key = (writer, up_writer)
            self._conns.add(key)
            self._total += 1
            _nodelay(up_writer)
            def broken() -> None:
                writer.transport.abort()
                up_writer.transport.abort()

            pipes = (_Pipe(self, self._up, reader, up_writer, broken),
                     _Pipe(self, self._down, up_reader, writer, broken))
            await asyncio.gather(*(p.read_loop() for p in pipes),
                                 *(p.write_loop() for p in pipes))
        finally:
            self._conns.discard(key)
            for w in entry:
                if w is not None:
                    w.close()


class SyncLinkEmulator(SyncShell):
    """A :class:`LinkEmulator` on its own thread and event loop, for blocking code (tests,
    benchmarks, ``tandem demo``)::

        with SyncLinkEmulator(LinkEmulator("127.0.0.1", broker_port, PROFILES["lte"])) as link:
            ... connect to ("127.0.0.1", link.port) ...
            link.set_profile(PROFILES["3g"])

    Each call runs on the emulator's loop and waits at most ``call_timeout_s``.
    """

    def __init__(self, link: LinkEmulator, *, call_timeout_s: float = 10.0) -> None:
        super().__init__(link, "tandem-link-loop", call_timeout_s)
        self.link = link

    @property
    def port(self) -> int:
        return self.link.port

    def set_profile(self, profile: LinkProfile) -> None:
        self._thread.run(self.link.set_profile, profile)

    def set_down(self, down: bool, mode: str = "stall") -> None:
        self._thread.run(self.link.set_down, down, mode)

    def outage(self, duration_s: float, mode: str = "stall") -> None:
        self._thread.run(self.link.outage, duration_s, mode)

    def run_schedule(self, steps: Iterable[LinkStep]) -> None:
        self._thread.run(self.link.run_schedule, list(steps))

    def stats(self) -> LinkStats:
        return self._thread.run(self.link.stats)
