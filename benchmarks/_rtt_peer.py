"""One side of one request/response pair of :mod:`benchmarks._transport_bench`, in its own process.

    python -m benchmarks._rtt_peer ROLE VARIANT PORT SIZE

``ROLE`` is ``responder`` or ``requester``; ``VARIANT`` names the pair:

* ``raw_thread``: raw paho, the requester publishes from the caller's thread and paho's
  ``loop_start`` network thread reads the reply (handed over with a ``threading.Event``);
* ``raw_direct``: raw paho driven from the caller's thread, no network thread: ``publish``
  writes the packet at once, then the caller polls the socket and runs ``loop_read`` until the
  reply is there;
* ``async``: :meth:`Transport.request` awaited on the requester's own loop;
* ``sync``: :meth:`SyncTransport.request` from the main thread (the transport's loop runs in
  its own thread);
* ``blocking``: ``async`` requests answered by a plain (blocking) ``def`` handler, the path an
  inference server takes; every other ``ours`` responder answers with an ``async def`` echo.

Both raw responders are the same: paho driven from its own thread (poll + ``loop_read``, the
reply written straight after), MQTT 5, QoS 1, TCP_NODELAY, the reply carrying the request's
CorrelationData. Raw requests carry the same four MQTT 5 properties ours do (ResponseTopic,
CorrelationData, MessageExpiryInterval, ContentType) and the same bytes (the encoded request
frame); the echo sends them back.

A peer prints ``ready`` once connected and subscribed. A requester then reads commands on
stdin: ``run N`` (N round trips, each timed with ``perf_counter_ns`` from the caller; answers
``ok``), ``dump`` (prints the samples in ns and its CPU time after the warm-up as JSON, and
exits). A responder runs until stdin closes, then prints its CPU time since ``ready`` and the
requests it answered as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tandem.protocol import codec
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.tensors import Tensor
from tandem.protocol.transport import (
    CONTENT_TYPE,
    RequestContext,
    SyncTransport,
    TransportConfig,
)

RAW = ("raw_thread", "raw_direct")
TIMEOUT_S = 10.0


def _request(variant: str, size: int) -> InferenceRequest:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    return InferenceRequest(id=new_request_id(), device_id=f"bench-{variant}",
                            model_digest="0" * 64, cut_id=1, budget_ms=10_000,
                            tensors=(Tensor.from_array("x", payload),))


def _topics(variant: str) -> tuple[str, str]:
    return f"bench/{variant}/req", f"bench/{variant}/resp"


# -- raw paho ---------------------------------------------------------------------------------


def _nodelay(client, userdata, sock) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _raw_client(port: int) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_socket_open = _nodelay
    c.max_inflight_messages_set(1000)
    return c


_POLLERS: dict[int, select.poll] = {}


def _drive_until(c: paho.Client, done, timeout_s: float = TIMEOUT_S) -> None:
    """Run paho from this thread (poll + loop_read/loop_write) until ``done()``."""
    poller = _POLLERS.get(id(c))
    if poller is None:
        poller = _POLLERS[id(c)] = select.poll()
    sock = c.socket()
    deadline = time.monotonic() + timeout_s
    while not done():
        if c.want_write():
            c.loop_write()
        events = select.POLLIN | (select.POLLOUT if c.want_write() else 0)
        poller.register(sock, events)
        if poller.poll(max(0.0, deadline - time.monotonic()) * 1e3):
            c.loop_read()
        if time.monotonic() > deadline:
            raise RuntimeError("raw paho: nothing within the timeout")


def _raw_connect_direct(c: paho.Client, port: int) -> None:
    ok: list[bool] = []
    c.on_connect = lambda *a: ok.append(True)
    c.connect("127.0.0.1", port)
    _drive_until(c, lambda: bool(ok))


def _raw_subscribe_direct(c: paho.Client, topic: str) -> None:
    ok: list[bool] = []
    c.on_subscribe = lambda *a: ok.append(True)
    c.subscribe(topic, 1)
    _drive_until(c, lambda: bool(ok))


def raw_responder(variant: str, port: int) -> None:
    req_topic, _ = _topics(variant)
    c = _raw_client(port)
    props = Properties(PacketTypes.PUBLISH)

    served = [0]

    def echo(client, userdata, msg):
        props.CorrelationData = msg.properties.CorrelationData
        client.publish(msg.properties.ResponseTopic, msg.payload, 1, properties=props)
        served[0] += 1

    _raw_connect_direct(c, port)
    _raw_subscribe_direct(c, req_topic)
    c.on_message = echo
    print("ready", flush=True)
    cpu0 = time.process_time_ns()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    sock = c.socket()
    poller = select.poll()
    while not stop.is_set():
        poller.register(sock, select.POLLIN | (select.POLLOUT if c.want_write() else 0))
        ev = poller.poll(200)
        if ev and ev[0][1] & select.POLLIN:
            c.loop_read()
        if c.want_write():
            c.loop_write()
    print(json.dumps({"cpu_ns": time.process_time_ns() - cpu0, "served": served[0]}),
          flush=True)
    c.disconnect()


class RawRequester:
    def __init__(self, variant: str, port: int, payload: bytes) -> None:
        self.variant = variant
        self.payload = payload
        self.req_topic, self.resp_topic = _topics(variant)
        self.props = Properties(PacketTypes.PUBLISH)
        self.props.ResponseTopic = self.resp_topic
        self.props.MessageExpiryInterval = 10
        self.props.ContentType = CONTENT_TYPE
        self.reply: bytes | None = None
        self.got = threading.Event()
        c = self.c = _raw_client(port)

        def on_reply(client, userdata, msg):
            self.reply = msg.payload
            self.got.set()

        if variant == "raw_direct":
            _raw_connect_direct(c, port)
            _raw_subscribe_direct(c, self.resp_topic)
        else:
            connected, subscribed = threading.Event(), threading.Event()
            c.on_connect = lambda *a: connected.set()
            c.on_subscribe = lambda *a: subscribed.set()
            c.connect("127.0.0.1", port)
            c.loop_start()
            if not connected.wait(TIMEOUT_S):
                raise RuntimeError("raw paho: no CONNACK")
            c.subscribe(self.resp_topic, 1)
            if not subscribed.wait(TIMEOUT_S):
                raise RuntimeError("raw paho: no SUBACK")
        c.on_message = on_reply

    def round_trip(self) -> None:
        self.reply = None
        self.props.CorrelationData = os.urandom(16)
        if self.variant == "raw_direct":
            self.c.publish(self.req_topic, self.payload, 1, properties=self.props)
            _drive_until(self.c, lambda: self.reply is not None)
        else:
            self.got.clear()
            self.c.publish(self.req_topic, self.payload, 1, properties=self.props)
            if not self.got.wait(TIMEOUT_S):
                raise RuntimeError("raw paho: no reply")
        assert self.reply is not None and len(self.reply) == len(self.payload)


# -- ours -------------------------------------------------------------------------------------


async def _async_echo(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id="bench")


def _blocking_echo(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id="bench")


async def ours_responder(variant: str, port: int) -> None:
    t = MqttTransport(TransportConfig(port=port))
    await t.connect()
    handler = _blocking_echo if variant == "blocking" else _async_echo
    topic_filter = f"tandem/v1/req/bench-{variant}/+"
    await t.serve(topic_filter, handler)
    print("ready", flush=True)
    cpu0 = time.process_time_ns()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    served = t.stats().serving[topic_filter].answered
    print(json.dumps({"cpu_ns": time.process_time_ns() - cpu0, "served": served}), flush=True)
    await t.close()


# -- main -------------------------------------------------------------------------------------


def _serve_commands(block) -> None:
    """``block(n)`` runs n round trips and returns their times (ns). The first ``run`` is the
    warm-up: the CPU time this process spends (all threads) is counted from the second on."""
    samples: list[int] = []
    cpu_ns = counted = 0
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            cpu0 = time.process_time_ns()
            got = block(int(cmd[1]))
            if samples:
                cpu_ns += time.process_time_ns() - cpu0
                counted += len(got)
            samples.extend(got)
            print("ok", flush=True)
        elif cmd[0] == "dump":
            print(json.dumps({"samples": samples, "cpu_ns": cpu_ns, "counted": counted}),
                  flush=True)
            return


def requester(variant: str, port: int, size: int) -> None:
    request = _request(variant, size)
    topic = f"tandem/v1/req/bench-{variant}/m"
    if variant in RAW:
        raw = RawRequester(variant, port, codec.encode(request))

        def one_raw() -> int:
            t0 = time.perf_counter_ns()
            raw.round_trip()
            return time.perf_counter_ns() - t0

        _serve_commands(lambda n: [one_raw() for _ in range(n)])
        raw.c.disconnect()
        if variant == "raw_thread":
            raw.c.loop_stop()
        return
    if variant == "sync":
        st = SyncTransport(MqttTransport(TransportConfig(port=port)))
        st.connect()

        def one_sync() -> int:
            req = InferenceRequest(id=new_request_id(), device_id=request.device_id,
                                   model_digest=request.model_digest, cut_id=1,
                                   budget_ms=10_000, tensors=request.tensors)
            t0 = time.perf_counter_ns()
            resp = st.request(topic, req, timeout_s=TIMEOUT_S)
            dt = time.perf_counter_ns() - t0
            assert len(resp.outputs) == 1
            return dt

        one_sync()  # subscribes the reply topic
        _serve_commands(lambda n: [one_sync() for _ in range(n)])
        st.close()
        return
    loop = asyncio.new_event_loop()
    t = MqttTransport(TransportConfig(port=port))
    loop.run_until_complete(t.connect())

    async def one_async() -> int:
        req = InferenceRequest(id=new_request_id(), device_id=request.device_id,
                               model_digest=request.model_digest, cut_id=1,
                               budget_ms=10_000, tensors=request.tensors)
        t0 = time.perf_counter_ns()
        resp = await t.request(topic, req, timeout_s=TIMEOUT_S)
        dt = time.perf_counter_ns() - t0
        assert len(resp.outputs) == 1
        return dt

    async def block(n: int) -> list[int]:
        return [await one_async() for _ in range(n)]

    loop.run_until_complete(one_async())  # subscribes the reply topic
    _serve_commands(lambda n: loop.run_until_complete(block(n)))
    loop.run_until_complete(t.close())
    loop.close()


def main(argv: list[str]) -> int:
    role, variant, port, size = argv[0], argv[1], int(argv[2]), int(argv[3])
    if role == "responder":
        if variant in RAW:
            raw_responder(variant, port)
        else:
            asyncio.run(ours_responder(variant, port))
    else:
        requester(variant, port, size)
    return 0


if __name__ == "__main__":
    # diagnostics: TANDEM_BENCH_PROFILE=DIR dumps cProfile stats of each peer there;
    # TANDEM_BENCH_CPU=1 prints each peer's CPU seconds (user, system) to stderr at exit
    profile_dir = os.environ.get("TANDEM_BENCH_PROFILE")
    if profile_dir:
        import cProfile

        prof = cProfile.Profile()
        rc = prof.runcall(main, sys.argv[1:])
        name = "-".join(sys.argv[1:3] + sys.argv[4:5])
        prof.dump_stats(os.path.join(profile_dir, f"{name}.prof"))
        sys.exit(rc)
    rc = main(sys.argv[1:])
    if os.environ.get("TANDEM_BENCH_CPU"):
        t = os.times()
        print(f"cpu {sys.argv[1]} {sys.argv[2]}: user {t.user:.3f} s, system {t.system:.3f} s",
              file=sys.stderr)
    sys.exit(rc)
