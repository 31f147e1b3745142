"""Attacks on a serving transport through a real mosquitto: chunks injected from another device,
handlers that raise BaseException or get stuck, budgets past what MQTT can carry.

Before the fixes: a chunk set was shared across topics, so a device publishing only on its own
request topic could put data into another device's chunked request and the server computed on
the mix; a handler raising ``SystemExit`` stopped the server's event loop while ``connected``
still said True; four stuck handlers filled a hard-coded pool, everything else queued without
bound, requests whose budget had long expired ran afterwards and ``close(timeout=3)`` took 6 s
and raised; ``budget_ms`` above ~4.29e12 raised ``struct.error`` (MessageExpiryInterval is 32
bits).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tandem.protocol import codec, topics
from tandem.protocol.chunking import split
from tandem.protocol.errors import (
    DeadlineExceeded,
    HandlerFailed,
    ResourceExhausted,
    Unavailable,
)
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.tensors import Tensor
from tandem.protocol.transport import IncomingMessage, SyncTransport, TransportConfig

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

REQ_FILTER = "tandem/v1/req/+/+"
SLACK_S = 1.0


def sync(broker, **kw) -> SyncTransport:
    return SyncTransport(MqttTransport(TransportConfig(host=broker.host, port=broker.port, **kw)))


def request(device: str = "cam-01", budget_ms: int = 5000, arr=None) -> InferenceRequest:
    arr = np.ones(4, np.float32) if arr is None else arr
    return InferenceRequest(new_request_id(), device, "ab" * 32, 1, budget_ms,
                            (Tensor.from_array("x", arr),))


def total(req: InferenceRequest, ctx) -> InferenceResponse:
    s = np.array([req.tensors[0].to_array().sum()], np.float32)
    return InferenceResponse(id=req.id, outputs=(Tensor.from_array("sum", s),),
                             worker_id=ctx.device_id)


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- chunks from another device ------------------------------------------------------------------


def test_chunks_injected_from_another_device_never_reach_its_request(mosquitto):
    """The attacker, on its own request topic, sends chunks carrying the victim's set id with
    other data, before and between the victim's chunks. The server computes on the victim's
    data only and answers the victim (and nobody else) with the right sum."""
    victim = request(arr=np.ones(64 * 1024, np.float32))  # 256 KiB: chunked at 64 KiB
    evil = request("evil", arr=np.full(64 * 1024, -666.0, np.float32))
    set_id = b"\x07" * 16
    victim_chunks = split(codec.encode(victim), 64 * 1024, set_id)
    evil_chunks = split(codec.encode(evil), 64 * 1024, set_id)  # the same set id
    assert len(victim_chunks) == len(evil_chunks) > 2
    clients = {}
    for name in ("cam-01", "evil"):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        c.connect(mosquitto.host, mosquitto.port)
        c.loop_start()
        clients[name] = c
    try:
        with sync(mosquitto) as server, sync(mosquitto) as listener:
            answers: list[IncomingMessage] = []
            listener.subscribe("tandem/v1/resp/+", answers.append)
            server.serve(REQ_FILTER, total)
            v_topic = topics.request_topic("cam-01", "m")
            e_topic = topics.request_topic("evil", "m")
            for i, (v, e) in enumerate(zip(victim_chunks, evil_chunks, strict=True)):
                first = e if i else evil_chunks[-1]  # the last piece first: its set never ends
                clients["evil"].publish(e_topic, first, 1).wait_for_publish(5)
                clients["cam-01"].publish(v_topic, v, 1).wait_for_publish(5)
            wait_until(lambda: answers)
            time.sleep(0.3)
            assert [m.topic for m in answers] == ["tandem/v1/resp/cam-01"]
            response = codec.decode(answers[0].payload)
            assert response.id == victim.id and response.ok
            assert float(response.outputs[0].to_array()[0]) == 64 * 1024  # only ones
    finally:
        for c in clients.values():
            c.disconnect()
            c.loop_stop()


# -- handlers that raise BaseException -----------------------------------------------------------


@pytest.mark.parametrize("exc", [SystemExit(2), KeyboardInterrupt(), GeneratorExit()],
                         ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_handler_raising_base_exception_is_answered_and_the_loop_survives(mosquitto, exc,
                                                                            kind):
    def handler(req, ctx):
        if req.cut_id == 9:
            raise exc
        return total(req, ctx)

    async def ahandler(req, ctx):
        return handler(req, ctx)

    with sync(mosquitto) as server, sync(mosquitto) as client:
        server.serve(REQ_FILTER, handler if kind == "sync" else ahandler)
        bad = InferenceRequest(new_request_id(), "cam-01", "ab" * 32, 9, 5000, ())
        for _ in range(3):
            bad = InferenceRequest(new_request_id(), "cam-01", "ab" * 32, 9, 5000, ())
            with pytest.raises(HandlerFailed, match=type(exc).__name__):
                client.request("tandem/v1/req/cam-01/m", bad)
        assert server.connected  # truthful: its loop still runs ...
        assert client.request("tandem/v1/req/cam-01/m", request()).ok  # ... and serves
        assert server.stats().serving[REQ_FILTER].failed == 3


def test_a_subscribers_handler_raising_system_exit_does_not_stop_the_loop(mosquitto):
    got: list[bytes] = []

    def handler(msg: IncomingMessage) -> None:
        if msg.payload == b"die":
            raise SystemExit(1)
        got.append(msg.payload)

    with sync(mosquitto) as t:
        t.subscribe("s/t", handler)
        t.publish("s/t", b"die").wait(5)
        t.publish("s/t", b"alive").wait(5)
        wait_until(lambda: got == [b"alive"])
        assert t.connected


def test_connected_turns_false_when_the_loop_thread_is_gone(mosquitto):
    t = sync(mosquitto)
    t.connect()
    assert t.connected
    t.close()
    assert not t.connected


# -- stuck handlers ------------------------------------------------------------------------------


def test_stuck_handlers_do_not_starve_the_server(mosquitto):
    """Four handlers stuck, a flood of requests: the queue stays bounded (RESOURCE_EXHAUSTED
    at once beyond it), requests whose deadline passed while they waited are never run, and
    close honours its timeout."""
    release = threading.Event()
    ran: list[bytes] = []

    def stuck(req, ctx):
        ran.append(req.id)
        release.wait(30)
        return total(req, ctx)

    server = sync(mosquitto)
    server.connect()
    try:
        with sync(mosquitto) as client:
            server.serve(REQ_FILTER, stuck, max_concurrency=4, max_queued=8)
            topic = "tandem/v1/req/cam-01/m"
            outcomes: list[BaseException | str] = []
            lock = threading.Lock()

            def call(budget_ms: int) -> None:
                try:
                    client.request(topic, request(budget_ms=budget_ms))
                    result: BaseException | str = "ok"
                except BaseException as exc:
                    result = exc
                with lock:
                    outcomes.append(result)

            threads = [threading.Thread(target=call, args=(20_000,)) for _ in range(4)]
            threads += [threading.Thread(target=call, args=(400,)) for _ in range(8)]
            threads += [threading.Thread(target=call, args=(20_000,)) for _ in range(20)]
            for th in threads[:4]:
                th.start()
            wait_until(lambda: server.stats().serving[REQ_FILTER].running == 4)
            for th in threads[4:12]:  # these wait, and their deadline passes while they do
                th.start()
            wait_until(lambda: server.stats().serving[REQ_FILTER].queued == 8)
            t0 = time.monotonic()
            for th in threads[12:]:  # no room: refused at once
                th.start()
            wait_until(lambda: sum(isinstance(o, ResourceExhausted) for o in outcomes) == 20)
            assert time.monotonic() - t0 < 5
            wait_until(lambda: sum(isinstance(o, DeadlineExceeded) for o in outcomes) == 8)
            time.sleep(0.4)  # on the server their deadlines count from arrival, a bit later
            release.set()
            for th in threads:
                th.join(10)
            assert outcomes.count("ok") == 4 and len(ran) == 4  # the expired 8 never ran
            stats = server.stats().serving[REQ_FILTER]
            assert stats.expired == 8 and stats.busy == 20 and stats.held_bytes == 0
            # and once more with a stuck handler in place: close within its timeout, quietly
            release.clear()
            straggler = threading.Thread(target=call, args=(20_000,))
            straggler.start()
            wait_until(lambda: server.stats().serving[REQ_FILTER].running == 1)
            t0 = time.monotonic()
            server.close(timeout_s=3)
            assert time.monotonic() - t0 <= 3 + SLACK_S
            straggler.join(5)
            assert isinstance(outcomes[-1], Unavailable) and outcomes[-1].retryable
    finally:
        release.set()
        server.close()


# -- budgets MQTT cannot carry -------------------------------------------------------------------


@pytest.mark.parametrize(("budget_ms", "expiry_s"), [
    ((2**32 - 1) * 1000, 2**32 - 1),  # the largest expiry MQTT 5 can carry
    ((2**32 - 1) * 1000 + 1, None),  # past it: no expiry at all
    (2**63 - 1, None),  # the largest budget the protocol allows
])
def test_huge_budgets_mean_no_expiry(mosquitto, budget_ms, expiry_s):
    sniffed: list[paho.MQTTMessage] = []
    raw = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    subscribed = threading.Event()
    raw.on_subscribe = lambda *a: subscribed.set()
    raw.on_message = lambda c, u, m: sniffed.append(m)
    raw.connect(mosquitto.host, mosquitto.port)
    raw.loop_start()
    try:
        raw.subscribe("tandem/v1/req/#", 1)
        assert subscribed.wait(5)
        with sync(mosquitto) as server, sync(mosquitto) as client:
            server.serve(REQ_FILTER, total)
            req = request(budget_ms=budget_ms)
            assert client.request("tandem/v1/req/cam-01/m", req).id == req.id
            wait_until(lambda: sniffed)
        expiry = getattr(sniffed[0].properties, "MessageExpiryInterval", None)
        if expiry_s is None:
            assert expiry is None
        else:  # the broker forwards what is left of it
            assert expiry_s - 2 <= expiry <= expiry_s
    finally:
        raw.disconnect()
        raw.loop_stop()
