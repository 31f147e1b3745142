"""Transport benchmark: our request/response vs a raw paho echo, and small-message throughput.

Both sides run through one mosquitto that this module starts itself (127.0.0.1, a free port,
``set_tcp_nodelay true``, no packet limit) and stops at the end:

* ``rtt_<size>``: :meth:`tandem.protocol.transport.Transport.request` of an
  :class:`~tandem.protocol.mqtt.MqttTransport` awaited on the client's own event loop (timed on
  that loop, from the call to its return), answered by a transport's ``serve`` (our codec and
  our transport on both ends; the async echo returns the request's tensor) vs
  ``raw_paho_echo_<size>``: a raw paho client (``loop_start`` network thread) publishes the same
  number of bytes from the caller's thread and a raw paho echo client publishes them back from
  its ``on_message``. MQTT 5, QoS 1, TCP_NODELAY on every socket, transports' default config
  (one PUBLISH per message at every size here), interleaved A B A B. Target: ratio <= 1.25.
* ``rtt_sync_<size>``: the same with :class:`tandem.protocol.transport.SyncTransport`
  ``request`` called from a plain thread (it hands the request to its loop thread and waits for
  the reply: one thread hop each way), timed from that thread like the raw baseline. Reported,
  no target.
* ``rtt_vs_rpc_<size>``: the same figure against ``raw_paho_rpc_echo_<size>``, a raw paho echo
  that sets the MQTT 5 properties our protocol requires (paho parses each received property in
  Python, which costs the raw echo itself ~20 % at 1 KB). Reported, no target.
* Page faults: each ``rtt_`` row's notes give the process's minor page faults per round trip
  (median; both ends run in this process) for ours and for the raw echo. At 1 MB they are most
  of the time on both sides: glibc hands freed 1 MB buffers back to the kernel and the next
  round trip faults fresh ones in. Ours used to fault ~2.5x as many pages as raw (~2400 vs
  ~900: the encoded frame + paho's packet per send, paho's growing receive buffer + a payload
  copy per receive) and was ~1.5x raw at 1 MB. Now a request is encoded as pieces
  (``codec.encode_parts``) copied once, straight into the PUBLISH packet (``_mqtt_wire.Frame``); a
  packet is read with ``recv_into`` into one buffer that the decoded RAW tensors view; and each
  client reuses its big packet buffers once nothing references them (``_mqtt_wire._BufferPool``),
  so steady same-size traffic faults in (almost) nothing new: ~250 faults per 1 MB round trip
  vs raw's ~250-990. The benchmark sets no ``MALLOC_*`` variables and calls no ``mallopt``.
* ``throughput_200B``: 200-byte QoS 1 publishes from one client to another, our MqttTransport vs
  raw paho, messages/s from the first publish to the last delivery (bounded in time; reported).

    python -m benchmarks._transport_bench [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks._common import Result, interleaved, print_table, stats
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.tensors import Tensor
from tandem.protocol.transport import RequestContext, SyncTransport, TransportConfig

__all__ = ["NOTES", "run"]

SIZES = {"1KB": 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}
TARGET_RATIO = 1.25
THROUGHPUT_MSG_BYTES = 200
THROUGHPUT_TIME_LIMIT_S = 30.0


def _broker_module():
    """tests/_support/broker.py (the same mosquitto helper the tests use), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "tests" / "_support" / "broker.py"
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
    "mosquitto on 127.0.0.1 started by the benchmark (set_tcp_nodelay true, persistence off, "
    "max_queued_messages 100000); "
    "MQTT 5, QoS 1, TCP_NODELAY on all client sockets; ours (rtt_) = MqttTransport.request "
    "awaited on its loop (timed there) + MqttTransport.serve (async echo handler) with the "
    "msgpack codec, default config (16 MiB chunk size on MQTT 5: every size is one PUBLISH); "
    "rtt_sync_ = SyncTransport.request from a plain thread; baseline = raw paho-mqtt 2.x "
    "publish from "
    "the caller's thread (loop_start) + raw paho echo client; interleaved A/B."
)


# -- raw paho ---------------------------------------------------------------------------------


def _nodelay(client, userdata, sock) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _raw_client(port: int, on_message=None) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_socket_open = _nodelay
    c.max_inflight_messages_set(100)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    if on_message is not None:
        c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not connected.wait(10):
        raise RuntimeError("raw paho client could not connect")
    return c


def _raw_subscribe(c: paho.Client, topic: str) -> None:
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(topic, 1)
    if not done.wait(10):
        raise RuntimeError("no SUBACK")


def _close_raw(c: paho.Client) -> None:
    c.disconnect()
    c.loop_stop()


class RawEcho:
    """Raw paho on both ends: requester publishes, echo client republishes from on_message.

    ``rpc=True`` sets the MQTT 5 properties our protocol sets (ResponseTopic, CorrelationData,
    MessageExpiryInterval, ContentType on the request; CorrelationData on the reply), as a paho
    RPC client would (paho's examples/server_rpc_math.py)."""

    def __init__(self, port: int, *, rpc: bool = False) -> None:
        self.rpc = rpc
        self.topic = f"bench/{'rpc' if rpc else 'raw'}"

        def echo(client, userdata, msg):
            props = None
            if rpc:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = msg.properties.CorrelationData
            client.publish(f"{self.topic}/resp", msg.payload, 1, properties=props)

        self._got = threading.Event()
        self._reply: bytes | None = None

        def on_reply(client, userdata, msg):
            self._reply = msg.payload
            self._got.set()

        self.echo = _raw_client(port, echo)
        _raw_subscribe(self.echo, f"{self.topic}/req")
        self.req = _raw_client(port, on_reply)
        _raw_subscribe(self.req, f"{self.topic}/resp")

    def round_trip(self, payload: bytes) -> None:
        self._got.clear()
        props = None
        if self.rpc:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{self.topic}/resp"
            props.CorrelationData = os.urandom(16)
            props.MessageExpiryInterval = 10
            props.ContentType = "application/x-tandem+msgpack"
        self.req.publish(f"{self.topic}/req", payload, 1, properties=props)
        if not self._got.wait(10):
            raise RuntimeError("raw paho echo: no reply within 10 s")
        assert self._reply is not None and len(self._reply) == len(payload)

    def close(self) -> None:
        _close_raw(self.req)
        _close_raw(self.echo)


# -- ours -------------------------------------------------------------------------------------


async def _echo(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id="bench")


class OursEcho:
    def __init__(self, port: int) -> None:
        cfg = TransportConfig(port=port)
        self.server = SyncTransport(MqttTransport(cfg))
        self.client = SyncTransport(MqttTransport(cfg))
        self.server.connect()
        self.client.connect()
        self.server.serve("tandem/v1/req/+/+", _echo)

    def round_trip(self, tensor: Tensor) -> None:
        req = InferenceRequest(id=new_request_id(), device_id="bench", model_digest="0" * 64,
                               cut_id=1, budget_ms=10_000, tensors=(tensor,))
        resp = self.client.request("tandem/v1/req/bench/m", req, timeout_s=10)
        assert len(resp.outputs) == 1

    def close(self) -> None:
        self.client.close()
        self.server.close()


class OursAsyncClient:
    """An MqttTransport on its own loop thread; each request is timed on that loop."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = MqttTransport(TransportConfig(port=port))
        self._run(self.client.connect())
        self.samples: list[float] = []

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _one(self, tensor: Tensor) -> float:
        req = InferenceRequest(id=new_request_id(), device_id="bench", model_digest="0" * 64,
                               cut_id=1, budget_ms=10_000, tensors=(tensor,))
        t0 = time.perf_counter()
        resp = await self.client.request("tandem/v1/req/bench/m", req, timeout_s=10)
        dt = time.perf_counter() - t0
        assert len(resp.outputs) == 1
        return dt

    def round_trip(self, tensor: Tensor) -> None:
        self.samples.append(self._run(self._one(tensor)))

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _counting_faults(out: list[int], fn):
    """``fn`` that also appends the process's minor page faults during each call to ``out``."""

    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    return run


def _rtt(port: int, quick: bool) -> list[Result]:
    results: list[Result] = []
    raw = RawEcho(port)
    rpc = RawEcho(port, rpc=True)
    ours = OursEcho(port)  # its server answers both our clients
    ours_async = OursAsyncClient(port)
    try:
        for label, size in SIZES.items():
            payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
            tensor = Tensor.from_array("x", payload)
            raw_bytes = payload.tobytes()
            repeats = 30 if quick else (300 if size <= 100 * 1024 else 60)
            ours_async.samples.clear()
            faults: dict[str, list[int]] = {"ours": [], "raw": []}
            samples = interleaved({
                "ours": _counting_faults(faults["ours"], lambda t=tensor: ours_async.round_trip(t)),
                "sync": lambda t=tensor: ours.round_trip(t),
                "raw": _counting_faults(faults["raw"], lambda b=raw_bytes: raw.round_trip(b)),
                "rpc": lambda b=raw_bytes: rpc.round_trip(b),
            }, repeats=repeats, warmup=10)
            f_ours, f_raw = (stats(faults[k][-repeats:]).median for k in ("ours", "raw"))
            samples["ours"] = ours_async.samples[-repeats:]  # timed on the client's loop
            s_ours, s_sync, s_raw, s_rpc = (
                stats(samples[k]) for k in ("ours", "sync", "raw", "rpc"))
            ratio = s_ours.median / s_raw.median
            results.append(Result(
                metric=f"rtt_{label}", value=s_ours.median * 1e3, unit="ms",
                baseline=f"raw_paho_echo_{label}", baseline_value=s_raw.median * 1e3,
                target=f"ratio <= {TARGET_RATIO}", met=ratio <= TARGET_RATIO,
                p99=s_ours.p99 * 1e3, min=s_ours.min * 1e3, max=s_ours.max * 1e3, n=s_ours.n,
                notes=(f"raw p99 {s_raw.p99 * 1e3:.3f} ms, min {s_raw.min * 1e3:.3f}, "
                       f"max {s_raw.max * 1e3:.3f}; minor page faults per round trip "
                       f"(whole process, both ends): ours {f_ours:.0f}, raw {f_raw:.0f}"),
            ))
            results.append(Result(
                metric=f"rtt_sync_{label}", value=s_sync.median * 1e3, unit="ms",
                baseline=f"raw_paho_echo_{label}", baseline_value=s_raw.median * 1e3,
                p99=s_sync.p99 * 1e3, min=s_sync.min * 1e3, max=s_sync.max * 1e3, n=s_sync.n,
                notes="sync Transport.request from a plain thread (no target)",
            ))
            results.append(Result(
                metric=f"rtt_vs_rpc_{label}", value=s_ours.median * 1e3, unit="ms",
                baseline=f"raw_paho_rpc_echo_{label}", baseline_value=s_rpc.median * 1e3,
                p99=s_ours.p99 * 1e3, min=s_ours.min * 1e3, max=s_ours.max * 1e3, n=s_ours.n,
                notes=("baseline sets the same MQTT 5 properties as ours (ResponseTopic, "
                       "CorrelationData, MessageExpiry, ContentType; CorrelationData on the "
                       f"reply); its p99 {s_rpc.p99 * 1e3:.3f} ms"),
            ))
    finally:
        ours_async.close()
        ours.close()
        rpc.close()
        raw.close()
    return results


# -- throughput -------------------------------------------------------------------------------


def _raw_throughput(port: int, n: int) -> tuple[int, float]:
    done = threading.Event()
    count = [0]

    def on_message(client, userdata, msg):
        count[0] += 1
        if count[0] >= n:
            done.set()

    sub = _raw_client(port, on_message)
    pub = _raw_client(port)
    try:
        _raw_subscribe(sub, "bench/tp/raw")
        payload = b"\x5a" * THROUGHPUT_MSG_BYTES
        t0 = time.perf_counter()
        for _ in range(n):
            pub.publish("bench/tp/raw", payload, 1)
        done.wait(THROUGHPUT_TIME_LIMIT_S)
        return count[0], time.perf_counter() - t0
    finally:
        _close_raw(pub)
        _close_raw(sub)


async def _ours_throughput_async(port: int, n: int) -> tuple[int, float]:
    cfg = TransportConfig(port=port)
    done = asyncio.Event()
    count = [0]

    def on_message(msg) -> None:
        count[0] += 1
        if count[0] >= n:
            done.set()

    async with MqttTransport(cfg) as sub, MqttTransport(cfg) as pub:
        await sub.subscribe("bench/tp/ours", on_message)
        payload = b"\x5a" * THROUGHPUT_MSG_BYTES
        t0 = time.perf_counter()
        for i in range(n):
            await pub.publish("bench/tp/ours", payload)
            if i % 256 == 0:
                await asyncio.sleep(0)  # let deliveries in while publishing
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), THROUGHPUT_TIME_LIMIT_S)
        return count[0], time.perf_counter() - t0


def _throughput(port: int, quick: bool) -> list[Result]:
    n = 2000 if quick else 5000
    ours_rates, raw_rates = [], []
    for _ in range(2 if quick else 3):  # interleaved rounds
        got, secs = asyncio.run(_ours_throughput_async(port, n))
        ours_rates.append(got / secs)
        got, secs = _raw_throughput(port, n)
        raw_rates.append(got / secs)
    ours_s, raw_s = stats(ours_rates), stats(raw_rates)
    return [Result(
        metric=f"throughput_{THROUGHPUT_MSG_BYTES}B", value=ours_s.median, unit="msg/s",
        baseline=f"raw_paho_throughput_{THROUGHPUT_MSG_BYTES}B", baseline_value=raw_s.median,
        min=ours_s.min, max=ours_s.max, n=ours_s.n,
        notes=f"{n} QoS 1 publishes per round, publisher to subscriber through mosquitto",
    )]


def run(quick: bool = False) -> list[Result]:
    """Start a mosquitto, measure, stop it. Returns the results (see the module docstring)."""
    broker_mod = _broker_module()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        # a deep broker queue: the throughput runs measure the clients, not mosquitto dropping
        # QoS 1 messages past its default 1000 queued per client
        broker = broker_mod.Mosquitto(Path(tmp), extra_config="max_queued_messages 100000")
        global NOTES
        NOTES = f"{NOTES} Broker: {_mosquitto_version(broker.binary)}."
        with broker:
            return [*_rtt(broker.port, quick), *_throughput(broker.port, quick)]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print_table("transport: request/response vs raw paho echo (QoS 1, mosquitto)",
                run(quick=args.quick))
    print(NOTES)
