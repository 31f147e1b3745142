"""Broker lifecycle benchmark: what the connection lifecycle of issue #15 costs and saves.

* **connect**: opening an MQTT transport with the default ``protocol="auto"`` against the version
  pinned to what the broker speaks (the baseline), interleaved, per broker: the price of
  negotiating (one refused MQTT 5 CONNECT on brokers without it);
* **serve**: ``serve`` on a shared group, which confirms delivery with a probe, against ``serve``
  on the unshared filter (the baseline) on mosquitto; and how long ``serve`` on a shared group
  takes to fail where the broker accepts ``$share`` and delivers nothing (by construction about
  ``share_check_timeout_s``);
* **flapping**: connections a client opens in a fixed 3 s window against a broker stand-in that
  drops every connection 50 ms after its CONNACK, with the backoff reset only after
  ``stable_after_s`` (the default, 5 s) against a reset on every ready connection (the
  baseline: ``stable_after_s=0``, the behaviour before); and against ejabberd's behaviour
  (the connection dropped on a ``$share`` SUBSCRIBE): how long ``serve`` takes to fail and how
  many connections the 3 s after its call see.

    python -m benchmarks.broker_lifecycle [--quick] [--json PATH]

Brokers that cannot run here are left out and named. Loopback, a shared 2-core machine:
indicative figures.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks._common import Result, parser, print_table, stats, write_json

NAME = "broker_lifecycle"
WINDOW_S = 3.0


def _echo(request, context):
    from tandem.protocol.messages import InferenceResponse

    return InferenceResponse(id=request.id)


async def _interleave(fns: dict[str, Callable[[], Awaitable[object]]], repeats: int,
                      warmup: int) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = loop.time()
            await fn()
            if i >= warmup:
                out[name].append(loop.time() - t0)
    return out


def _result(metric: str, samples: list[float], *, unit: str = "ms", scale: float = 1e3,
            baseline: tuple[str, list[float]] | None = None, notes: str = "") -> Result:
    st = stats(samples)
    base_name, base_value = None, None
    if baseline is not None:
        base_name, base_value = baseline[0], round(stats(baseline[1]).median * scale, 3)
    return Result(metric=metric, value=round(st.median * scale, 3), unit=unit,
                  baseline=base_name, baseline_value=base_value,
                  p99=round(st.p99 * scale, 3), min=round(st.min * scale, 3),
                  max=round(st.max * scale, 3), n=st.n, notes=notes or None)


async def _connects(brokers: list[tuple[str, object, int]], repeats: int) -> list[Result]:
    from tandem.protocol.mqtt import MqttTransport
    from tandem.protocol.transport import TransportConfig

    results = []
    for name, broker, pinned in brokers:
        async def connect(protocol, broker=broker) -> None:
            t = MqttTransport(TransportConfig(host=broker.host, port=broker.port,
                                              protocol=protocol))
            await t.connect()
            await t.close()

        samples = await _interleave({"auto": lambda: connect("auto"),
                                     "pinned": lambda p=pinned: connect(p)},
                                    repeats, warmup=3)
        version = "MQTT 5" if pinned == 5 else "MQTT 3.1.1"
        results.append(_result(f"connect_auto_{name}", samples["auto"],
                               baseline=(f"connect_pinned_{name}", samples["pinned"]),
                               notes=f"auto vs protocol={pinned} ({version}); connect + close"))
    return results


async def _serves(mosquitto: object | None, without: list[tuple[str, object]],
                  repeats: int) -> list[Result]:
    from tandem.protocol import topics
    from tandem.protocol.errors import FailedPrecondition
    from tandem.protocol.mqtt import MqttTransport
    from tandem.protocol.transport import TransportConfig

    results = []
    if mosquitto is not None:
        cfg = TransportConfig(host=mosquitto.host, port=mosquitto.port)
        async with MqttTransport(cfg) as t:
            async def serve(flt: str) -> None:
                await t.serve(flt, _echo)
                await t.unsubscribe(flt)

            samples = await _interleave(
                {"shared": lambda: serve(topics.request_filter("bench")),
                 "plain": lambda: serve(topics.request_filter())}, repeats, warmup=3)
        results.append(_result("serve_shared_mosquitto", samples["shared"],
                               baseline=("serve_unshared_mosquitto", samples["plain"]),
                               notes="serve($share/bench/…) with its probe, then unsubscribe; "
                                     "baseline the unshared filter"))
    for name, broker in without:
        cfg = TransportConfig(host=broker.host, port=broker.port)
        samples = []
        async with MqttTransport(cfg) as t:
            loop = asyncio.get_running_loop()
            for _ in range(3):
                t0 = loop.time()
                try:
                    await t.serve(topics.request_filter("bench"), _echo)
                except FailedPrecondition:
                    samples.append(loop.time() - t0)
                else:
                    raise SystemExit(f"error: serve on a shared group did not fail on {name}")
        results.append(_result(f"serve_shared_fails_{name}", samples, unit="s", scale=1.0,
                               notes=f"share_check_timeout_s={cfg.share_check_timeout_s:g}"))
    return results


async def _flapping(rounds: int) -> list[Result]:
    from tandem.protocol import topics
    from tandem.protocol.errors import FailedPrecondition
    from tandem.protocol.mqtt import MqttTransport
    from tandem.protocol.transport import TransportConfig
    from tests._support.mqtt_standin import StandIn

    loop = asyncio.get_running_loop()

    async def count(stable_after_s: float) -> float:
        async with StandIn(drop_after_s=0.05) as broker:
            cfg = TransportConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05,
                                  reconnect_max_s=10.0, stable_after_s=stable_after_s)
            async with MqttTransport(cfg):
                start = broker.connections[0]
                await asyncio.sleep(max(0.0, start + WINDOW_S - loop.time()))
                return float(broker.connections_between(start, start + WINDOW_S))

    ours: list[float] = []
    old: list[float] = []
    for _ in range(rounds):
        ours.append(await count(5.0))
        old.append(await count(0.0))
    results = [Result(metric="flapping_connections_in_3s", value=stats(ours).median,
                      unit="connections", baseline="flapping_connections_in_3s_reset_on_ready",
                      baseline_value=stats(old).median, min=min(ours), max=max(ours),
                      n=len(ours), notes="stand-in drops each connection 50 ms after CONNACK; "
                                         "reconnect_min_s 0.05; baseline stable_after_s=0")]
    fail_s, conns = [], []
    for _ in range(rounds):
        async with StandIn.ejabberd() as broker:
            cfg = TransportConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05)
            async with MqttTransport(cfg) as t:
                t0 = loop.time()
                try:
                    await t.serve(topics.request_filter("bench"), _echo)
                except FailedPrecondition:
                    fail_s.append(loop.time() - t0)
                await asyncio.sleep(max(0.0, t0 + WINDOW_S - loop.time()))
                conns.append(float(broker.connections_between(t0, t0 + WINDOW_S)))
    results.append(_result("ejabberd_serve_fails", fail_s,
                           notes="connection dropped on the $share SUBSCRIBE (stand-in)"))
    results.append(Result(metric="ejabberd_connections_in_3s", value=stats(conns).median,
                          unit="connections", min=min(conns), max=max(conns), n=len(conns),
                          notes="connections opened in the 3 s after serve was called"))
    return results


def _start_brokers(tmp: Path) -> tuple[list, list, list[str]]:
    from tests._support import interop
    from tests._support.broker import Mosquitto, mosquitto_binary

    started, named, left_out = [], [], []
    if mosquitto_binary():
        named.append(("mosquitto", Mosquitto(tmp / "mosquitto"), 5))
    else:
        left_out.append("mosquitto: not installed")
    for name, why, make in (
            ("amqtt", interop.amqtt_missing(), lambda: interop.Amqtt(tmp / "amqtt")),
            ("nats-mqtt", interop.nats_missing(),
             lambda: interop.NatsServer(tmp / "nats", mqtt=True)),
            ("aedes", interop.aedes_missing(), lambda: interop.Aedes(tmp / "aedes"))):
        if why is None:
            named.append((name, make(), 311))
        else:
            left_out.append(f"{name}: {why}")
    for _, broker, _ in named:
        broker.start()
        started.append(broker)
    return named, started, left_out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    args = p.parse_args(argv)
    repeats, rounds = (8, 1) if args.quick else (30, 3)
    logging.getLogger("tandem").setLevel(logging.ERROR)  # the flapping is on purpose
    with tempfile.TemporaryDirectory(prefix="tandem-bench-lifecycle-") as tmp:
        named, started, left_out = _start_brokers(Path(tmp))
        try:
            async def run() -> list[Result]:
                results = await _connects(named, repeats)
                mosquitto = next((b for n, b, _ in named if n == "mosquitto"), None)
                results += await _serves(mosquitto,
                                         [(n, b) for n, b, v in named if v == 311], repeats)
                results += await _flapping(rounds)
                return results

            results = asyncio.run(run())
        finally:
            for broker in started:
                broker.stop()
    print_table("broker lifecycle: negotiation, the shared-subscription check, reconnects",
                results)
    if left_out:
        print("left out: " + "; ".join(left_out))
    out = write_json(NAME, results, args.json_path,
                     notes=f"loopback; connect_timeout_s 5, share_check_timeout_s 3; "
                           f"left out: {'; '.join(left_out) or 'none'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
