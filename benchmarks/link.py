"""How closely the link emulator (``tandem link``) achieves the rate and delay it is set to.

Three processes on 127.0.0.1, started and stopped here: the emulator (``tandem link run``, set
to each profile in turn through its control port), a measurement server (``--role server``:
echo, sink, source and request/reply modes on one port) and this client. Every figure is taken
through the link and, interleaved where it is a latency, straight to the server (the baseline
the link adds to). Profiles: ``100mbit`` (100 Mbit/s, 1 ms one-way, no jitter: the issue's
"at 100 Mbit/s") and the four link classes with their jitter (3g, lte, wifi, wired).

Figures per profile:

* ``<p>_uplink_rate`` / ``<p>_downlink_rate``: a bulk transfer of 2 s worth of bytes, rate
  from the first to the last byte's arrival, against the configured rate (target: ratio in
  [0.97, 1.01] — never faster, at most 3 % slower);
* ``<p>_rtt_p50``: 64-byte ping-pong round trips through the link (jitter off) against the
  direct round trip plus twice the configured one-way delay (target: within ±1 ms);
* ``<p>_rtt_jitter_stdev``: the same with the profile's jitter on: the round trips' stdev
  against the configured one (uniform ±j each way: stdev j·√(2/3)), reported;
* ``<p>_frontier_rtt_p50``: 12,800 bytes up (the demo model's bottleneck frontier) and one byte
  back, against direct + 2 × delay + the frontier's serialization time at the rate less the
  bucket depth (target: within ±max(1 ms, 3 %)).
* ``proxy_overhead_rtt_p50``: the emulator at ``unlimited`` (no delay, no rate) against direct.

    python -m benchmarks.link [--quick] [--json PATH]

Writes the JSON and ``link.png`` (configured against achieved rate and round trip) beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import Result, parser, print_table, stats, write_json

ROOT = Path(__file__).resolve().parents[1]
FRONTIER_BYTES = 12_800
PING_BYTES = 64


# -- the measurement server (its own process) ------------------------------------------------------


def _role_server() -> None:
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            mode = await reader.readexactly(1)
            if mode == b"E":  # echo
                while data := await reader.read(1 << 16):
                    writer.write(data)
            elif mode == b"S":  # sink: when did the bytes arrive?
                n = first_bytes = 0
                first_s = last_s = 0.0
                while data := await reader.read(1 << 20):
                    now = time.monotonic()
                    if not n:
                        first_s, first_bytes = now, len(data)
                    n += len(data)
                    last_s = now
                writer.write(json.dumps({"bytes": n, "first_s": first_s, "last_s": last_s,
                                         "first_bytes": first_bytes}).encode() + b"\n")
            elif mode == b"D":  # source: send N bytes
                (n,) = struct.unpack(">Q", await reader.readexactly(8))
                block = os.urandom(1 << 16)
                while n > 0:
                    writer.write(block[: min(n, len(block))])
                    n -= min(n, len(block))
                    await writer.drain()
            elif mode == b"R":  # request (length-prefixed) -> one byte
                while True:
                    (n,) = struct.unpack(">I", await reader.readexactly(4))
                    await reader.readexactly(n)
                    writer.write(b"k")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


# -- the client ------------------------------------------------------------------------------------


def _connect(port: int, mode: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(mode)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = s.recv(n - len(buf))
        if not data:
            raise ConnectionError("closed early")
        buf += data
    return bytes(buf)


def _round_trips(ports: dict[str, int], n: int, size: int) -> dict[str, list[float]]:
    """``n`` round trips of ``size`` bytes up (and 1 byte back for the request mode, an echo
    for pings), alternating direct and through the link; seconds each."""
    mode = b"E" if size == PING_BYTES else b"R"
    socks = {name: _connect(port, mode) for name, port in ports.items()}
    payload = os.urandom(size)
    message = payload if mode == b"E" else struct.pack(">I", size) + payload
    answer = size if mode == b"E" else 1
    out: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for i in range(n + 5):
            for name, s in socks.items():
                t0 = time.perf_counter()
                s.sendall(message)
                _recv_exactly(s, answer)
                if i >= 5:  # warm-up
                    out[name].append(time.perf_counter() - t0)
    finally:
        for s in socks.values():
            s.close()
    return out


def _upload(port: int, n: int) -> float:
    """Bits per second the link carried a bulk upload at (first to last byte's arrival)."""
    s = _connect(port, b"S")
    block = os.urandom(1 << 16)
    left = n
    while left:
        s.sendall(block[: min(left, len(block))])
        left -= min(left, len(block))
    s.shutdown(socket.SHUT_WR)
    report = json.loads(s.makefile().readline())
    s.close()
    return (report["bytes"] - report["first_bytes"]) * 8 / (report["last_s"] - report["first_s"])


def _download(port: int, n: int) -> float:
    s = _connect(port, b"D" + struct.pack(">Q", n))
    got = first_bytes = 0
    first_s = last_s = 0.0
    while got < n:
        data = s.recv(1 << 20)
        if not data:
            break
        now = time.monotonic()
        if not got:
            first_s, first_bytes = now, len(data)
        got += len(data)
        last_s = now
    s.close()
    return (got - first_bytes) * 8 / (last_s - first_s)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run(quick: bool = False) -> tuple[list[Result], str, dict]:
    from tandem.lab import PROFILES, LinkProfile
    from tandem.lab._control import control_request

    profiles = [LinkProfile("100mbit", 100e6, 100e6, 1.0, 0.0),
                *(PROFILES[n] for n in ("3g", "lte", "wifi", "wired"))]
    seconds = 0.75 if quick else 2.0
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.link", "--role", "server"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    link = None
    results: list[Result] = []
    plot: dict = {"profiles": []}
    try:
        target = int(server.stdout.readline())
        link = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "link", "run", "--to", f"127.0.0.1:{target}",
             "--control", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        port = int(re.match(r"link 127\.0\.0\.1:(\d+)", link.stdout.readline()).group(1))
        control = int(re.search(r"control on 127\.0\.0\.1:(\d+)",
                                link.stdout.readline()).group(1))
        ports = {"direct": target, "link": port}

        rt = _round_trips(ports, 50 if quick else 300, PING_BYTES)
        d, v = stats(rt["direct"]), stats(rt["link"])
        results.append(Result(
            "proxy_overhead_rtt_p50", v.median * 1e3, "ms", baseline="direct_rtt_p50",
            baseline_value=d.median * 1e3, p99=v.p99 * 1e3, min=v.min * 1e3, max=v.max * 1e3,
            n=v.n, notes=f"profile unlimited; direct p99 {d.p99 * 1e3:.3f} ms"))

        for p in profiles:
            control_request("127.0.0.1", control, {"op": "set", "changes": {
                "uplink_bps": p.uplink_bps, "downlink_bps": p.downlink_bps,
                "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms}})
            row = {"name": p.name, "rate": p.uplink_bps, "rtt": p.rtt_ms}
            n_bytes = int(p.uplink_bps / 8 * seconds)
            for direction, fn in (("uplink", _upload), ("downlink", _download)):
                rate = fn(port, n_bytes)
                ratio = rate / p.uplink_bps
                row[direction] = rate
                results.append(Result(
                    f"{p.name}_{direction}_rate", rate / 1e6, "Mbit/s", baseline="configured",
                    baseline_value=p.uplink_bps / 1e6, target="0.97 <= ratio <= 1.01",
                    met=0.97 <= ratio <= 1.01, notes=f"{n_bytes} bytes in one transfer"))
            n_pings = 30 if quick else max(60, min(300, int(3.0 / max(p.rtt_ms / 1e3, 1e-3))))
            # the delay with the jitter off (a jittered median carries the draw's own noise)
            control_request("127.0.0.1", control, {"op": "set", "changes": {"jitter_ms": 0}})
            rt = _round_trips(ports, n_pings, PING_BYTES)
            d, v = stats(rt["direct"]), stats(rt["link"])
            want_ms = d.median * 1e3 + p.rtt_ms
            row["rtt_measured"] = v.median * 1e3
            row["rtt_p99"] = v.p99 * 1e3
            results.append(Result(
                f"{p.name}_rtt_p50", v.median * 1e3, "ms",
                baseline="direct_rtt_p50+2*delay", baseline_value=want_ms,
                target="within ±1 ms", met=abs(v.median * 1e3 - want_ms) <= 1.0,
                p99=v.p99 * 1e3, min=v.min * 1e3, max=v.max * 1e3, n=v.n,
                notes=f"jitter off; direct p50 {d.median * 1e3:.3f} ms"))
            control_request("127.0.0.1", control,
                            {"op": "set", "changes": {"jitter_ms": p.jitter_ms}})
            if p.jitter_ms:
                rt = _round_trips(ports, n_pings, PING_BYTES)
                sd = _stdev(rt["link"]) * 1e3
                want_sd = p.jitter_ms * math.sqrt(2 / 3)
                mean_ms = sum(rt["link"]) / len(rt["link"]) * 1e3
                results.append(Result(
                    f"{p.name}_rtt_jitter_stdev", sd, "ms",
                    baseline="configured (uniform ±j each way: j*sqrt(2/3))",
                    baseline_value=want_sd, n=len(rt["link"]),
                    notes=f"mean RTT {mean_ms:.2f} ms against {p.rtt_ms:g} ms + direct"))
            rt = _round_trips(ports, max(30, n_pings // 2), FRONTIER_BYTES)
            d, v = stats(rt["direct"]), stats(rt["link"])
            depth = min(64 * 1024, max(1448, int(p.uplink_bps / 8 * 0.001)))
            serial_ms = max(0, FRONTIER_BYTES - depth) * 8 / p.uplink_bps * 1e3
            want_ms = d.median * 1e3 + p.rtt_ms + serial_ms
            results.append(Result(
                f"{p.name}_frontier_rtt_p50", v.median * 1e3, "ms",
                baseline="direct+2*delay+serialization", baseline_value=want_ms,
                target="within ±max(1 ms, 3 %)",
                met=abs(v.median * 1e3 - want_ms) <= max(1.0, 0.03 * want_ms),
                p99=v.p99 * 1e3, min=v.min * 1e3, max=v.max * 1e3, n=v.n,
                notes=f"{FRONTIER_BYTES} B up, 1 B back; serialization {serial_ms:.2f} ms "
                      f"(bucket depth {depth} B)"))
            plot["profiles"].append(row)
    finally:
        if link is not None:
            _stop(link)
        _stop(server)
    notes = (f"{os.cpu_count()} cores shared with other work (indicative figures); emulator "
             "(tandem link run), measurement server and client in separate processes on "
             "127.0.0.1; TCP_NODELAY everywhere; symmetric profiles; one-way delay = RTT/2")
    return results, notes, plot


def _stdev(xs: list[float]) -> float:
    import statistics

    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def _plot(plot: dict, path: Path, notes: str) -> Path:
    from benchmarks._plots import lines

    rows = plot["profiles"]
    names = [r["name"] for r in rows]
    configured = [r["rate"] / 1e6 for r in rows]
    return lines(
        path,
        {"uplink": (configured, [r["uplink"] / 1e6 for r in rows]),
         "downlink": (configured, [r["downlink"] / 1e6 for r in rows])},
        title="rate: configured vs achieved (" + ", ".join(names) + ")",
        xlabel="configured (Mbit/s)", ylabel="achieved (Mbit/s)", diagonal=True, log_x=True,
        log_y=True,
        panels=[{"series": {"ping p50 (p99 whisker)": ([r["rtt"] for r in rows],
                                                        [r["rtt_measured"] for r in rows])},
                 "errors": {"ping p50 (p99 whisker)": [r["rtt_p99"] for r in rows]},
                 "title": "round trip: configured vs measured",
                 "xlabel": "configured RTT (ms)", "ylabel": "measured RTT (ms)",
                 "diagonal": True, "log_x": True, "log_y": True}],
        footnote=notes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--role" in argv:
        p = argparse.ArgumentParser()
        p.add_argument("--role", choices=["server"])
        p.parse_args(argv)
        _role_server()
        return 0
    args = parser("The link emulator: configured vs achieved rate and delay").parse_args(argv)
    results, notes, plot = run(quick=args.quick)
    print_table("link emulator (tandem link): achieved vs configured", results)
    path = write_json("link", results, args.json_path, notes=notes)
    png = _plot(plot, path.with_suffix(".png"), notes)
    print(f"results: {path}\nfigure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
