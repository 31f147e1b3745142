"""Transport benchmark: request/response through mosquitto, ours vs the fastest raw paho, timed
the same way from the caller, requester and responder in separate fresh processes.

For each run and each payload size (1 KB, 100 KB, 1 MB) this module starts a fresh mosquitto
(127.0.0.1, a free port, ``set_tcp_nodelay true``) and five fresh requester/responder process
pairs (:mod:`benchmarks._rtt_peer` says what each variant does):

* ``raw_thread`` and ``raw_direct``: raw paho-mqtt 2 (MQTT 5, QoS 1, TCP_NODELAY, the same four
  MQTT 5 properties and the same bytes as ours), with paho's ``loop_start`` network thread, or
  driven from the caller's thread. The faster of the two in that run is the baseline
  (``raw_paho``);
* ``async``: ``MqttTransport.request`` awaited on the requester's loop;
* ``sync``: ``SyncTransport.request`` from a plain thread;
* ``blocking``: ``async`` requests answered by a blocking ``def`` handler (the path an inference
  server takes) instead of the ``async def`` echo the others use.

Every round trip is timed by its requester with ``perf_counter_ns`` around the call. The
orchestrator runs them interleaved: blocks of ``BLOCK`` round trips, one variant after another,
the order rotating every block, after a warm-up. Nothing in a peer process ran any other
benchmark before (each figure comes from fresh processes, a fresh broker). No ``MALLOC_*``
variable is set unless ``malloc=True`` (then every process, the broker too, gets
:data:`MALLOC_ENV`).

    python -m benchmarks._transport_bench [--quick] [--runs N] [--malloc]
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import Result, print_table, stats

__all__ = ["MALLOC_ENV", "NOTES", "SIZES", "allocator_effect", "measure", "results", "run"]

SIZES = {"1KB": 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}
VARIANTS = ("raw_thread", "raw_direct", "async", "sync", "blocking")
TARGETS = {"1KB": 1.25, "100KB": 1.25, "1MB": 1.15}
BLOCKING_OVER_ASYNC_MS = 0.1
BLOCK = 20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}
ROOT = Path(__file__).resolve().parents[1]


def _broker_module():
    """tests/_support/broker.py (the same mosquitto helper the tests use), loaded by path."""
    path = ROOT / "tests" / "_support" / "broker.py"
    spec = importlib.util.spec_from_file_location("_tandem_bench_broker", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "mosquitto (version unknown)"


NOTES = (
    "request/response: requester and responder in separate fresh processes per figure "
    "(benchmarks/_rtt_peer.py), a fresh mosquitto per size and run (127.0.0.1, "
    "set_tcp_nodelay true, persistence off); MQTT 5, QoS 1, TCP_NODELAY on every client "
    "socket; every round trip timed by its requester from the call to its return "
    f"(perf_counter_ns), variants interleaved in blocks of {BLOCK} in rotating order; baseline "
    "raw_paho = the faster (by median, per run) of raw paho-mqtt 2 with loop_start and raw paho "
    "driven from the caller's thread, both carrying the same four MQTT 5 properties "
    "(ResponseTopic, CorrelationData, MessageExpiry, ContentType) and the same bytes as ours; "
    "async/sync/blocking = MqttTransport.request on its loop / SyncTransport.request from a "
    "thread / async requests answered by a blocking def handler (others: async def echo)."
)


class _Peer:
    def __init__(self, role: str, variant: str, port: int, size: int, env: dict) -> None:
        self.variant = variant
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._rtt_peer", role, variant, str(port), str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"{self.variant}: expected {word!r}, got {line!r} "
                               f"(exit {self.proc.poll()})")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def dump(self) -> dict:
        self.send("dump")
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> dict | None:
        """Close its stdin and wait; a responder's last line (its CPU time) is returned."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        last = None
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdout is not None:
                line = self.proc.stdout.readline()
                last = json.loads(line) if line.strip() else None
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return last


def measure(size: int, repeats: int, warmup: int, env: dict,
            broker_env: dict | None = None) -> Measured:
    """One size, fresh broker and processes: seconds per round trip for every variant. The
    broker gets the ``MALLOC_*`` variables of ``broker_env`` (default: of ``env``)."""
    broker_mod = _broker_module()
    saved = dict(os.environ)
    for k in MALLOC_ENV:
        os.environ.pop(k, None)
    os.environ.update({k: v for k, v in (env if broker_env is None else broker_env).items()
                       if k.startswith("MALLOC_")})
    try:
        tmp = tempfile.TemporaryDirectory(prefix="tandem-bench-")
        broker = broker_mod.Mosquitto(Path(tmp.name))
        broker.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    peers: list[_Peer] = []
    try:
        responders = [_Peer("responder", v, broker.port, size, env) for v in VARIANTS]
        peers += responders
        for p in responders:
            p.expect("ready")
        requesters = {v: _Peer("requester", v, broker.port, size, env) for v in VARIANTS}
        peers += requesters.values()
        for p in requesters.values():
            p.expect("ready")
        for p in requesters.values():
            p.send(f"run {warmup}")
            p.expect("ok")
        order = list(VARIANTS)
        blocks = max(1, -(-repeats // BLOCK))
        for i in range(blocks):
            for v in order[i % len(order):] + order[:i % len(order)]:
                requesters[v].send(f"run {BLOCK}")
                requesters[v].expect("ok")
        dumps = {v: p.dump() for v, p in requesters.items()}
        for p in requesters.values():
            p.stop()
        served = {p.variant: p.stop() for p in responders}
        peers.clear()
        cpu = {}
        for v, d in dumps.items():
            r = served.get(v) or {}
            cpu[v] = (d["cpu_ns"] / max(1, d["counted"]) / 1e3,
                      r.get("cpu_ns", 0) / max(1, r.get("served", 0)) / 1e3)
        return Measured({v: [ns / 1e9 for ns in d["samples"][warmup:]] for v, d in dumps.items()},
                        cpu)
    finally:
        for p in peers:
            p.stop()
        broker.stop()
        tmp.cleanup()


@dataclass
class Measured:
    """Seconds per round trip per variant, and CPU µs per round trip (requester process,
    responder process; all threads, after the warm-up for the requester, since ready for the
    responder, which also answered the warm-up)."""

    samples: dict[str, list[float]]
    cpu_us: dict[str, tuple[float, float]]


@dataclass
class SizeRun:
    """One run of one size: per-variant medians and p99 (seconds)."""

    median: dict[str, float]
    p99: dict[str, float]
    n: int
    cpu_us: dict[str, tuple[float, float]]

    @property
    def baseline(self) -> str:
        return min(("raw_thread", "raw_direct"), key=lambda v: self.median[v])


def run_once(repeats: int, warmup: int, env: dict) -> dict[str, SizeRun]:
    out: dict[str, SizeRun] = {}
    for label, size in SIZES.items():
        m = measure(size, repeats, warmup, env)
        st = {v: stats(s) for v, s in m.samples.items()}
        out[label] = SizeRun({v: s.median for v, s in st.items()},
                             {v: s.p99 for v, s in st.items()}, min(s.n for s in st.values()),
                             m.cpu_us)
    return out


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return (f"min {fmt.format(min(values))} / median {fmt.format(statistics.median(values))} / "
            f"max {fmt.format(max(values))}")


def results(runs: list[dict[str, SizeRun]]) -> list[Result]:
    """Results over ``runs``: each figure is the median over runs of that run's median; a
    target is met when every run meets it (the notes give each run's ratio)."""
    out: list[Result] = []
    for label in SIZES:
        per = [r[label] for r in runs]
        base = [p.median[p.baseline] for p in per]
        winners = [p.baseline for p in per]
        cpu = {v: (statistics.median(p.cpu_us[v][0] for p in per),
                   statistics.median(p.cpu_us[v][1] for p in per)) for v in VARIANTS}
        cpu_note = "CPU µs per round trip, requester/responder process (median of runs): " + \
            ", ".join(f"{v} {cpu[v][0]:.0f}/{cpu[v][1]:.0f}" for v in VARIANTS)
        for kind in ("async", "sync"):
            ratios = [p.median[kind] / p.median[p.baseline] for p in per]
            target = TARGETS[label]
            out.append(Result(
                metric=f"rtt_{kind}_{label}" if kind == "sync" else f"rtt_{label}",
                value=statistics.median(p.median[kind] for p in per) * 1e3, unit="ms",
                baseline=f"raw_paho_{label}", baseline_value=statistics.median(base) * 1e3,
                target=f"ratio <= {target} in every run",
                met=all(r <= target for r in ratios),
                p99=statistics.median(p.p99[kind] for p in per) * 1e3,
                min=min(p.median[kind] for p in per) * 1e3,
                max=max(p.median[kind] for p in per) * 1e3, n=per[0].n,
                notes=(f"{'SyncTransport.request from a thread' if kind == 'sync' else 'MqttTransport.request on its loop'}; "  # noqa: E501
                       f"ratio per run {[round(r, 3) for r in ratios]} ({_spread(ratios)}); "
                       f"baseline p99 median {statistics.median(p.p99[p.baseline] for p in per) * 1e3:.3f} ms; "  # noqa: E501
                       f"baseline variant per run {winners}; value/min/max = median/min/max of "
                       f"the runs' medians, p99 = median of the runs' p99; {cpu_note}"),
            ))
        over = [(p.median["blocking"] - p.median["async"]) * 1e3 for p in per]
        out.append(Result(
            metric=f"rtt_blocking_over_async_{label}", value=statistics.median(over), unit="ms",
            target=f"<= {BLOCKING_OVER_ASYNC_MS} ms in every run",
            met=all(o <= BLOCKING_OVER_ASYNC_MS for o in over),
            min=min(over), max=max(over), n=per[0].n,
            notes=(f"median round trip answered by a blocking def handler minus the same with "
                   f"an async def echo, per run {[round(o, 3) for o in over]}; blocking "
                   f"median {statistics.median(p.median['blocking'] for p in per) * 1e3:.3f} ms, "
                   f"p99 {statistics.median(p.p99['blocking'] for p in per) * 1e3:.3f} ms; ratio "
                   f"to raw_paho per run "
                   f"{[round(p.median['blocking'] / p.median[p.baseline], 3) for p in per]}"),
        ))
        thread_over_direct = [p.median["raw_thread"] / p.median["raw_direct"] for p in per]
        out.append(Result(
            metric=f"raw_paho_thread_{label}",
            value=statistics.median(p.median["raw_thread"] for p in per) * 1e3, unit="ms",
            baseline=f"raw_paho_direct_{label}",
            baseline_value=statistics.median(p.median["raw_direct"] for p in per) * 1e3,
            p99=statistics.median(p.p99["raw_thread"] for p in per) * 1e3, n=per[0].n,
            notes=(f"raw paho with loop_start vs driven from the caller's thread (p99 "
                   f"{statistics.median(p.p99['raw_direct'] for p in per) * 1e3:.3f} ms), "
                   f"per run {[round(r, 3) for r in thread_over_direct]}"),
        ))
    return out


def _env(malloc: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for k in MALLOC_ENV:
        env.pop(k, None)
    if malloc:
        env.update(MALLOC_ENV)
    return env


def allocator_effect(*, quick: bool = False) -> list[Result]:
    """1 MB round trips of every variant with glibc's default allocator settings in every
    process, and with :data:`MALLOC_ENV` in the clients but not in mosquitto (fresh processes,
    one run each): what the ``MALLOC_*`` variables change, compared with the main runs, which
    set them everywhere."""
    repeats, warmup = (60, 10) if quick else (300, 30)
    out: list[Result] = []
    for label, env, broker_env, why in (
            ("glibc_default", _env(False), None, "no MALLOC_* variable in any process"),
            ("malloc_clients_only", _env(True), _env(False),
             "MALLOC_* in the requester and responder, not in mosquitto")):
        st = {v: stats(s) for v, s in
              measure(SIZES["1MB"], repeats, warmup, env, broker_env).samples.items()}
        best = min(("raw_thread", "raw_direct"), key=lambda v: st[v].median)
        out += [Result(
            metric=f"rtt_1MB_{label}_{v}", value=st[v].median * 1e3, unit="ms",
            baseline=f"raw_paho_1MB_{label} ({best})",
            baseline_value=st[best].median * 1e3, p99=st[v].p99 * 1e3, n=st[v].n,
            notes=f"{why}; one run; reported, no target",
        ) for v in VARIANTS]
    return out


def run(*, quick: bool = False, runs: int = 3, malloc: bool = False) -> list[Result]:
    repeats, warmup = (60, 10) if quick else (300, 30)
    env = _env(malloc)
    all_runs = []
    for i in range(runs):
        one = run_once(repeats, warmup, env)
        all_runs.append(one)
        print(f"transport run {i + 1}/{runs} (median ms; CPU µs requester/responder): " +
              "; ".join(f"{label} " + " ".join(
                  f"{v}={r.median[v] * 1e3:.3f} ({r.cpu_us[v][0]:.0f}/{r.cpu_us[v][1]:.0f})"
                  for v in VARIANTS) for label, r in one.items()), flush=True)
    return results(all_runs)


def broker_notes() -> str:
    binary = _broker_module().mosquitto_binary()
    return f" Broker: {_mosquitto_version(binary) if binary else 'mosquitto (not found)'}."


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--malloc", action="store_true")
    args = ap.parse_args()
    print_table("transport: request/response vs raw paho (QoS 1, mosquitto)",
                run(quick=args.quick, runs=args.runs, malloc=args.malloc))
