"""The link emulator: bytes arrive intact and in order, never sooner than the configured rate
and delay allow, outages stall or reset as asked, buffers stay bounded, changes apply while it
runs. How *closely* it meets the configured rate and delay is measured by a benchmark
(``python -m benchmarks.link``), never asserted here: only the bounds the emulator must never
break are (a byte cannot cross faster than the token bucket lets it)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from tandem.lab import (
    PROFILES,
    LinkEmulator,
    LinkProfile,
    LinkStep,
    SyncLinkEmulator,
    format_rate,
    parse_rate,
)
from tandem.lab._link import _WAKE_EARLY_MAX_S
from tandem.protocol.errors import InvalidArgument
from tests._support.tcp import Echo, Sink, run

# A delivery may come this much before its time: the emulator asks its timers to fire early by
# about how late they run (see tandem.lab._link), at most this much, per crossing.
EARLY = _WAKE_EARLY_MAX_S

# -- parsing and profiles --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bps"), [
    ("6mbit", 6e6), ("6 Mbit/s", 6e6), ("500kbit", 5e5), ("1.5gbit", 1.5e9), ("2mbps", 2e6),
    ("100000", 1e5), (20e6, 20e6), ("unlimited", None), (None, None), ("none", None),
])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "6 MB/s", "-1mbit", "0", "1bit", "nan", True, "6tbit",
                                  "1e9999mbit"])
def test_parse_rate_refuses_nonsense(text):
    with pytest.raises(InvalidArgument):
        parse_rate(text)


def test_format_rate():
    assert format_rate(6e6) == "6 Mbit/s"
    assert format_rate(500e3) == "500 kbit/s"
    assert format_rate(None) == "unlimited"


def test_profiles_are_the_issues_link_classes():
    assert PROFILES["3g"].uplink_bps == 1e6 and PROFILES["3g"].rtt_ms == 100
    assert PROFILES["lte"].uplink_bps == 6e6 and PROFILES["lte"].rtt_ms == 50
    assert PROFILES["wifi"].uplink_bps == 20e6 and PROFILES["wifi"].rtt_ms == 10
    assert PROFILES["wired"].uplink_bps == 100e6 and PROFILES["wired"].rtt_ms == 2
    assert "6 Mbit/s up" in PROFILES["lte"].describe()


@pytest.mark.parametrize("kwargs", [
    {"delay_ms": -1}, {"delay_ms": float("nan")}, {"delay_ms": 1e9}, {"delay_ms": True},
    {"delay_ms": 5, "jitter_ms": 6}, {"uplink_bps": "fast"}, {"burst_bytes": 0},
    {"burst_bytes": 1.5},
])
def test_profile_refuses_what_no_link_does(kwargs):
    with pytest.raises(InvalidArgument):
        LinkProfile(**kwargs)


def test_profile_rates_may_be_text_and_changes_make_a_custom_profile():
    p = LinkProfile("x", "6mbit", "12mbit", 25)
    assert (p.uplink_bps, p.downlink_bps) == (6e6, 12e6)
    q = p.with_changes(uplink_bps="1mbit")
    assert q.uplink_bps == 1e6 and q.name == "custom" and q.delay_ms == 25


@pytest.mark.parametrize("kwargs", [
    {"at_s": -1, "outage_s": 1}, {"at_s": 0}, {"at_s": 0, "outage_s": 0},
    {"at_s": 0, "outage_s": 1, "mode": "drop"},
])
def test_step_refuses_what_cannot_happen(kwargs):
    with pytest.raises(InvalidArgument):
        LinkStep(**kwargs)


def test_bad_ports_are_refused():
    with pytest.raises(InvalidArgument):
        LinkEmulator("127.0.0.1", 0)
    with pytest.raises(InvalidArgument):
        LinkEmulator("127.0.0.1", 1883, listen_port=70000)


# -- bytes through the link ------------------------------------------------------------------------


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closed the connection (an EOF or a reset)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    data = await reader.read()  # until the echo's half-close crossed back
    writer.close()
    return data


def test_bytes_cross_intact_and_in_order_under_jitter_on_many_connections():
    async def scenario():
        echo = await Echo().start()
        # jitter far above the gap between chunks: order must hold anyway
        profile = LinkProfile("j", "50mbit", "50mbit", 5, 5)
        async with LinkEmulator("127.0.0.1", echo.port, profile, seed=1) as link:
            payloads = [os.urandom(n) for n in (1, 1000, 300_000, 2_000_000)]
            results = await asyncio.gather(*(_roundtrip(link.port, p) for p in payloads))
            stats = link.stats()
        await echo.close()
        return payloads, results, stats

    payloads, results, stats = run(scenario())
    assert results == payloads
    total = sum(map(len, payloads))
    assert stats.uplink.bytes == stats.downlink.bytes == total
    assert stats.connections_total == 4 and stats.connections_open == 0


def test_a_transfer_is_never_faster_than_the_rate_and_delay():
    n = 200_000  # 1.6 Mbit: 0.4 s at 4 Mbit/s
    profile = LinkProfile("slow", "4mbit", None, 20)

    async def scenario():
        sink = await Sink().start()
        async with LinkEmulator("127.0.0.1", sink.port, profile) as link:
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            t0 = time.monotonic()
            writer.write(os.urandom(n))
            await writer.drain()
            writer.write_eof()
            await sink.ended.wait()
            elapsed = sink.last_byte_at - t0
            writer.close()
        await sink.close()
        return elapsed, len(sink.received[0])

    elapsed, got = run(scenario())
    assert got == n
    depth_s = 4000 * 8 / 4e6  # what a full bucket (one chunk at most 1 ms) lets through early
    assert elapsed >= n * 8 / 4e6 + 0.020 - depth_s - EARLY


def test_round_trip_is_never_shorter_than_both_delays():
    async def scenario():
        echo = await Echo().start()
        async with LinkEmulator("127.0.0.1", echo.port, LinkProfile("d", delay_ms=30)) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            rtts = []
            for _ in range(5):
                t0 = time.monotonic()
                writer.write(b"ping")
                await reader.readexactly(4)
                rtts.append(time.monotonic() - t0)
            writer.close()
        await echo.close()
        return rtts

    assert min(run(scenario())) >= 0.060 - 2 * EARLY


def test_directions_have_their_own_rates():
    async def scenario():
        echo = await Echo().start()
        # uplink unlimited, downlink 2 Mbit/s: an echo of 100 KB takes >= 0.4 s
        async with LinkEmulator("127.0.0.1", echo.port, LinkProfile("a", None, "2mbit")) as link:
            t0 = time.monotonic()
            data = await _roundtrip(link.port, os.urandom(100_000))
            return len(data), time.monotonic() - t0

    got, elapsed = run(scenario())
    assert got == 100_000
    assert elapsed >= 100_000 * 8 / 2e6 - 0.01


def test_connections_share_the_link():
    async def scenario():
        sink = await Sink().start()
        async with LinkEmulator("127.0.0.1", sink.port, LinkProfile("s", "4mbit")) as link:
            writers = [(await asyncio.open_connection("127.0.0.1", link.port))[1]
                        for _ in range(2)]
            t0 = time.monotonic()
            for w in writers:
                w.write(os.urandom(100_000))
                w.write_eof()
            while len(sink.received) < 2 or sum(map(len, sink.received)) < 200_000:
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - t0
            for w in writers:
                w.close()
        await sink.close()
        return elapsed

    # two 100 KB transfers on one 4 Mbit/s link: together >= 0.4 s, not 0.2 s each in parallel
    assert run(scenario()) >= 200_000 * 8 / 4e6 - 0.01


def test_a_rate_change_applies_while_running():
    async def scenario():
        sink = await Sink().start()
        async with LinkEmulator("127.0.0.1", sink.port) as link:  # unlimited at first
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"a" * 10_000)
            await sink.got_bytes.wait()
            link.set_profile(LinkProfile("slow", "1mbit"))
            t0 = time.monotonic()
            writer.write(b"b" * 50_000)
            writer.write_eof()
            await sink.ended.wait()
            elapsed = sink.last_byte_at - t0
            writer.close()
        await sink.close()
        return elapsed, bytes(sink.received[0])

    elapsed, data = run(scenario())
    assert data == b"a" * 10_000 + b"b" * 50_000
    assert elapsed >= 50_000 * 8 / 1e6 - 0.02


# -- outages ---------------------------------------------------------------------------------------


def test_a_stall_holds_bytes_and_delivers_them_when_the_link_is_back():
    async def scenario():
        echo = await Echo().start()
        async with LinkEmulator("127.0.0.1", echo.port, LinkProfile("d", delay_ms=5)) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            link.set_down(True)
            writer.write(b"during")
            with pytest.raises(asyncio.TimeoutError):  # nothing crosses while down
                await asyncio.wait_for(reader.readexactly(6), 0.3)
            # a new connection waits too, instead of failing
            opened = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", link.port))
            link.set_down(False)
            assert await reader.readexactly(6) == b"during"
            r2, w2 = await opened
            w2.write(b"new")
            assert await r2.readexactly(3) == b"new"
            stats = link.stats()
            writer.close()
            w2.close()
        await echo.close()
        return stats

    stats = run(scenario())
    assert not stats.is_down and stats.connections_total == 2


def test_a_timed_outage_ends_by_itself():
    async def scenario():
        echo = await Echo().start()
        async with LinkEmulator("127.0.0.1", echo.port) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"x")
            await reader.readexactly(1)
            link.outage(0.3)
            t0 = time.monotonic()
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
            writer.close()
        await echo.close()
        return time.monotonic() - t0

    assert run(scenario()) >= 0.3 - 2 * EARLY


def test_a_reset_closes_connections_and_refuses_new_ones_until_the_link_is_back():
    async def scenario():
        echo = await Echo().start()
        async with LinkEmulator("127.0.0.1", echo.port) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"x")
            await reader.readexactly(1)
            link.set_down(True, mode="reset")
            assert await _closed(reader)  # closed under us
            r2, w2 = await asyncio.open_connection("127.0.0.1", link.port)
            assert await _closed(r2)  # accepted and dropped at once
            link.set_down(False)
            r3, w3 = await asyncio.open_connection("127.0.0.1", link.port)
            w3.write(b"back")
            assert await r3.readexactly(4) == b"back"
            stats = link.stats()
            for w in (writer, w2, w3):
                w.close()
        await echo.close()
        return stats

    stats = run(scenario())
    assert stats.connections_refused == 1


def test_a_schedule_changes_the_link_at_its_times():
    async def scenario():
        echo = await Echo().start()
        async with LinkEmulator("127.0.0.1", echo.port, PROFILES["wired"]) as link:
            link.run_schedule([LinkStep(0.2, profile=PROFILES["3g"]),
                               LinkStep(0.6, outage_s=0.4)])
            seen = []
            while len(seen) < 3:
                state = (link.profile.name, link.stats().is_down)
                if not seen or seen[-1] != state:
                    seen.append(state)
                await asyncio.sleep(0.005)
        await echo.close()
        return seen

    assert run(scenario()) == [("wired", False), ("3g", False), ("3g", True)]


# -- limits and failures ---------------------------------------------------------------------------


def test_a_receiver_that_does_not_read_meets_a_bounded_queue():
    async def scenario():
        sink = await Sink().start()
        sink.read = False
        profile = LinkProfile("q", "80mbit", "80mbit", 1)
        async with LinkEmulator("127.0.0.1", sink.port, profile) as link:
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            blob = os.urandom(1 << 20)
            with pytest.raises(asyncio.TimeoutError):  # 64 MiB cannot all be taken
                async def push():
                    for _ in range(64):
                        writer.write(blob)
                        await writer.drain()
                await asyncio.wait_for(push(), 1.5)
            stats = link.stats()
            writer.transport.abort()
        await sink.close()
        return stats

    stats = run(scenario())
    # the proxy's queue: 200 ms of the link + one delay, plus one read of up to 8 chunks
    limit = 80e6 / 8 * 0.201 + 8 * 10_000
    assert stats.uplink.max_queued_bytes <= limit


def test_an_unreachable_target_closes_the_client_and_is_counted():
    async def scenario():
        sink = await Sink().start()
        port = sink.port
        await sink.close()  # nothing listens there now
        async with LinkEmulator("127.0.0.1", port) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            assert await _closed(reader)
            writer.close()
            return link.stats()

    assert run(scenario()).connections_refused == 1


def test_a_client_reset_ends_both_sides():
    async def scenario():
        sink = await Sink().start()
        async with LinkEmulator("127.0.0.1", sink.port) as link:
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"hello")
            await sink.got_bytes.wait()
            writer.transport.abort()
            await sink.ended.wait()  # the target's side was closed too
            while link.stats().connections_open:
                await asyncio.sleep(0.01)
        await sink.close()

    run(scenario())


def test_close_ends_every_connection_and_task():
    async def scenario():
        echo = await Echo().start()
        link = await LinkEmulator("127.0.0.1", echo.port, PROFILES["3g"]).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(os.urandom(500_000))  # seconds of backlog at 1 Mbit/s
        link.run_schedule([LinkStep(60, outage_s=1)])
        await link.close()
        assert await _closed(reader)
        writer.close()
        await echo.close()
        return [t for t in asyncio.all_tasks()
                if "tandem/lab" in t.get_coro().cr_code.co_filename.replace(os.sep, "/")]

    assert run(scenario()) == []


# -- the blocking shell ----------------------------------------------------------------------------


def test_sync_emulator_from_other_threads():
    import socket

    async def serve_echo(ready: threading.Event, stop: threading.Event, box: list):
        echo = await Echo().start()
        box.append(echo.port)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await echo.close()

    ready, stop, box = threading.Event(), threading.Event(), []
    server = threading.Thread(target=lambda: asyncio.run(serve_echo(ready, stop, box)))
    server.start()
    try:
        ready.wait(10)
        with SyncLinkEmulator(LinkEmulator("127.0.0.1", box[0],
                                           LinkProfile("d", delay_ms=10))) as link:
            with socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
                t0 = time.monotonic()
                s.sendall(b"abc")
                assert s.recv(3) == b"abc"
                assert time.monotonic() - t0 >= 0.020 - 2 * EARLY
                link.set_profile(PROFILES["wired"])
                link.outage(0.05)
                s.sendall(b"d")
                assert s.recv(1) == b"d"
            assert link.stats().profile.name == "wired"
        with pytest.raises(Exception, match="not running"):
            link.stats()
    finally:
        stop.set()
        server.join(10)
