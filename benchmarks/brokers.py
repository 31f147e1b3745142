"""Broker benchmark: the round trip of a small request (a 48-byte tensor) through each broker
setup of the deployment guide, against mosquitto over MQTT 5 as the baseline, interleaved (one
request per setup in turn).

Every setup has a Tandem server (a blocking echo handler, as production's) in its own process
and the requester here, both through the transports users get: MQTT 5 / 3.1.1 to mosquitto,
3.1.1 to amqtt, NATS's MQTT gateway and Aedes (with and without TCP_NODELAY on its sockets),
NATS-native on both sides, and an MQTT device with a NATS-native worker (the scale-out setup).

    python -m benchmarks.brokers [--quick] [--only NAME,NAME] [--json PATH]

Brokers that cannot run here are left out and named. Figures on a shared 2-core machine are
indicative.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import Result, parser, print_table, stats, write_json

NAME = "brokers"
ROOT = Path(__file__).resolve().parents[1]

_SERVER = """
import asyncio, sys
from tandem.protocol import topics
from tandem.protocol.messages import InferenceResponse
from tandem.protocol.transport import TransportConfig

kind, host, port, protocol = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def echo(request, ctx):
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id="bench")

async def main():
    cfg = TransportConfig(host=host, port=port, protocol=protocol)
    if kind == "nats":
        from tandem.protocol.nats import NatsTransport as T
    else:
        from tandem.protocol.mqtt import MqttTransport as T
    async with T(cfg) as t:
        await t.serve(topics.request_filter(), echo)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@dataclass
class Setup:
    name: str
    broker: object
    client_kind: str  # "mqtt" | "nats"
    client_port: int
    server_kind: str
    server_port: int
    protocol: int
    notes: str


def _brokers(tmp: Path) -> tuple[list[Setup], list[object], list[str]]:
    from tests._support import interop
    from tests._support.broker import Mosquitto, mosquitto_binary

    setups: list[Setup] = []
    started: list[object] = []
    left_out: list[str] = []

    def start(broker):
        broker.start()
        started.append(broker)
        return broker

    if mosquitto_binary():
        m = start(Mosquitto(tmp / "mosquitto"))
        setups += [Setup("mosquitto-5", m, "mqtt", m.port, "mqtt", m.port, 5,
                         "set_tcp_nodelay true"),
                   Setup("mosquitto-311", m, "mqtt", m.port, "mqtt", m.port, 311,
                         "set_tcp_nodelay true")]
    else:
        left_out.append("mosquitto: not installed")
    why = interop.amqtt_missing()
    if why is None:
        a = start(interop.Amqtt(tmp / "amqtt"))
        setups.append(Setup("amqtt-311", a, "mqtt", a.port, "mqtt", a.port, 311, ""))
    else:
        left_out.append(f"amqtt: {why}")
    why = interop.nats_missing()
    if why is None:
        n = start(interop.NatsServer(tmp / "nats", mqtt=True))
        setups += [
            Setup("nats-mqtt-gateway-311", n, "mqtt", n.port, "mqtt", n.port, 311,
                  "both sides MQTT through the gateway"),
            Setup("nats-native", n, "nats", n.nats_port, "nats", n.nats_port, 311,
                  "both sides NatsTransport"),
            Setup("mqtt-device-nats-worker", n, "mqtt", n.port, "nats", n.nats_port, 311,
                  "device MQTT 3.1.1 via the gateway, worker NATS-native"),
        ]
    else:
        left_out.append(f"nats: {why}")
    why = interop.aedes_missing()
    if why is None:
        a1 = start(interop.Aedes(tmp / "aedes", no_delay=True))
        a2 = start(interop.Aedes(tmp / "aedes-nagle", no_delay=False))
        setups += [Setup("aedes-nodelay-311", a1, "mqtt", a1.port, "mqtt", a1.port, 311,
                         "server sockets noDelay"),
                   Setup("aedes-stock-311", a2, "mqtt", a2.port, "mqtt", a2.port, 311,
                         "stock net server: Nagle on")]
    else:
        left_out.append(f"aedes: {why}")
    return setups, started, left_out


async def _measure(setups: list[Setup], repeats: int, warmup: int) -> dict[str, list[float]]:
    from tandem.protocol import topics
    from tandem.protocol.messages import InferenceRequest, new_request_id
    from tandem.protocol.mqtt import MqttTransport
    from tandem.protocol.nats import NatsTransport
    from tandem.protocol.tensors import Tensor
    from tandem.protocol.transport import TransportConfig

    tensor = Tensor.from_array("x", np.arange(12, dtype=np.float32))
    topic = topics.request_topic("bench-01", "m")
    clients = []
    for s in setups:
        cfg = TransportConfig(host="127.0.0.1", port=s.client_port, protocol=s.protocol)
        t = NatsTransport(cfg) if s.client_kind == "nats" else MqttTransport(cfg)
        await t.connect()
        clients.append(t)
    loop = asyncio.get_running_loop()
    out: dict[str, list[float]] = {s.name: [] for s in setups}
    try:
        for i in range(warmup + repeats):
            for s, t in zip(setups, clients, strict=True):
                req = InferenceRequest(new_request_id(), "bench-01", "ab" * 32, 1, 10_000,
                                       (tensor,))
                t0 = loop.time()
                await t.request(topic, req)
                if i >= warmup:
                    out[s.name].append(loop.time() - t0)
    finally:
        for t in clients:
            await t.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    p.add_argument("--only", help="comma-separated setup names (default: all that run here)")
    args = p.parse_args(argv)
    repeats, warmup = (30, 5) if args.quick else (200, 20)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="tandem-bench-brokers-") as tmp:
        setups, started, left_out = _brokers(Path(tmp))
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {s.name for s in setups}
            if unknown:
                for broker in started:
                    broker.stop()
                raise SystemExit(f"error: unknown or unavailable setups: {sorted(unknown)}")
            setups = [s for s in setups if s.name in wanted]
        servers: list[subprocess.Popen] = []
        try:
            for s in setups:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _SERVER, s.server_kind, "127.0.0.1",
                     str(s.server_port), str(s.protocol)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                servers.append(proc)
                if proc.stdout.readline().strip() != b"ready":
                    raise SystemExit(f"the server for {s.name} did not start")
            samples = asyncio.run(_measure(setups, repeats, warmup))
        finally:
            for proc in servers:
                proc.stdin.close()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                proc.stdout.close()
            for broker in started:
                broker.stop()
    base = "mosquitto-5"
    base_ms = stats(samples[base]).median * 1e3 if base in samples else None
    results = []
    for s in setups:
        st = stats(samples[s.name])
        results.append(Result(
            metric=f"rtt_small_{s.name}", value=round(st.median * 1e3, 3), unit="ms",
            baseline=f"rtt_small_{base}" if base_ms else None,
            baseline_value=round(base_ms, 3) if base_ms else None,
            p99=round(st.p99 * 1e3, 3), min=round(st.min * 1e3, 3),
            max=round(st.max * 1e3, 3), n=st.n, notes=s.notes))
    print_table("small request round trip by broker (median ms; baseline mosquitto MQTT 5)",
                results)
    if left_out:
        print("left out: " + "; ".join(left_out))
    versions = _versions()
    out = write_json(NAME, results, args.json_path,
                     notes=f"loopback, sequential requests, 48-byte tensor; {versions}; "
                           f"left out: {'; '.join(left_out) or 'none'}")
    print(f"wrote {out}")
    return 0


def _versions() -> str:
    parts = []
    for cmd in (["mosquitto", "-h"], ["nats-server", "--version"], ["node", "--version"]):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                                  env=dict(os.environ, PATH=os.environ.get("PATH", "") +
                                           ":/usr/sbin")).stdout
            parts.append(text.splitlines()[0].strip() if text else cmd[0])
        except (OSError, subprocess.TimeoutExpired):
            continue
    try:
        from importlib.metadata import version

        parts += [f"amqtt {version('amqtt')}", f"nats-py {version('nats-py')}"]
    except Exception:
        pass
    aedes = ROOT / "tests" / "_support" / "aedes" / "node_modules" / "aedes" / "package.json"
    if aedes.exists():
        import json

        parts.append(f"aedes {json.loads(aedes.read_text())['version']}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
