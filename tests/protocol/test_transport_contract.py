"""The Transport contract: every test runs against the MQTT transport (a real mosquitto per test),
the in-memory transport and the NATS transport (a real nats-server per test), and all must behave
the same, except where core NATS has no such feature (retained messages, last wills, persistent
sessions: skipped there, saying so).

What only MQTT has (properties on the wire, packets, auth, TLS) is in test_transport.py; attacks
replayed against a real mosquitto are in tests/security/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from tandem.protocol import codec, topics
from tandem.protocol.chunking import split
from tandem.protocol.codec import Limits
from tandem.protocol.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    HandlerFailed,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.nats import NatsTransport
from tandem.protocol.tensors import DType, Tensor
from tandem.protocol.transport import (
    IncomingMessage,
    MemoryBroker,
    MemoryTransport,
    PublishProperties,
    RequestContext,
    SyncTransport,
    Transport,
    TransportConfig,
    Will,
)

pytestmark = [pytest.mark.timeout(60)]

DEVICE = "cam-01"
REQ = topics.request_topic(DEVICE, "model-a")
RESP = topics.response_topic(DEVICE)
REQ_FILTER = topics.request_filter()
SLACK_S = 0.75  # scheduling slack on a loaded 2-core machine


class Net:
    """One kind of transport and its broker, with the same handles for both kinds."""

    def __init__(self, kind: str, factory: Callable[..., object] | None) -> None:
        self.kind = kind
        self._factory = factory
        self.memory: MemoryBroker | None = None
        self.mosquitto = None
        self.reset()

    def reset(self, max_packet_bytes: int | None = None) -> Net:
        if self.kind == "mqtt":
            assert self._factory is not None
            opts = {} if max_packet_bytes is None else {"max_packet_size": max_packet_bytes}
            self.mosquitto = self._factory(**opts)
        elif self.kind == "nats":
            assert self._factory is not None
            self.nats = self._factory(max_payload=max_packet_bytes)
        else:
            self.memory = MemoryBroker(max_packet_bytes=max_packet_bytes)
        return self

    def config(self, **kw) -> TransportConfig:
        kw.setdefault("reconnect_min_s", 0.05)
        kw.setdefault("reconnect_max_s", 0.5)
        if self.kind == "mqtt":
            return TransportConfig(host=self.mosquitto.host, port=self.mosquitto.port, **kw)
        if self.kind == "nats":
            return TransportConfig(host=self.nats.host, port=self.nats.nats_port, **kw)
        return TransportConfig(**kw)

    def transport(self, **kw) -> Transport:
        cfg = self.config(**kw)
        if self.kind == "mqtt":
            return MqttTransport(cfg)
        if self.kind == "nats":
            return NatsTransport(cfg)
        assert self.memory is not None
        return MemoryTransport(self.memory, cfg)

    def outage(self) -> None:
        if self.kind == "mqtt":
            self.mosquitto.kill()
        elif self.kind == "nats":
            self.nats.kill()
        else:
            self.memory.stop()

    def recover(self) -> None:
        if self.kind == "mqtt":
            self.mosquitto.start()
        elif self.kind == "nats":
            self.nats.start()
        else:
            self.memory.start()

    def lacks(self, feature: str) -> None:
        """Skip a test of what core NATS does not have."""
        if self.kind == "nats":
            pytest.skip(f"core NATS has no {feature} (docs/deployment.md)")


@pytest.fixture(params=["mqtt", "memory", "nats"])
def net(request) -> Net:
    if request.param == "mqtt":
        return Net("mqtt", request.getfixturevalue("mosquitto_factory"))
    if request.param == "nats":
        return Net("nats", request.getfixturevalue("nats_factory"))
    return Net("memory", None)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 50))


def make_request(budget_ms: int = 3000, payload: np.ndarray | None = None, **kw
                 ) -> InferenceRequest:
    arr = np.arange(12, dtype=np.float32) if payload is None else payload
    kw.setdefault("device_id", DEVICE)
    return InferenceRequest(id=new_request_id(), model_digest="ab" * 32, cut_id=1,
                            budget_ms=budget_ms, tensors=(Tensor.from_array("x", arr),), **kw)


def echo(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id="echo")


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Inbox:
    """A subscriber handler that keeps what arrives."""

    def __init__(self) -> None:
        self.messages: list[IncomingMessage] = []

    def __call__(self, msg: IncomingMessage) -> None:
        self.messages.append(msg)

    def responses(self) -> list[InferenceResponse]:
        return [codec.decode(m.payload) for m in self.messages]  # type: ignore[misc]


# -- requests ------------------------------------------------------------------------------------


def test_request_response_and_the_handlers_context(net):
    seen: list[tuple[InferenceRequest, RequestContext, str]] = []

    def handler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        seen.append((request, ctx, threading.current_thread().name))
        return InferenceResponse(id=request.id, outputs=(Tensor.from_array(
            "y", request.tensors[0].to_array() * 2),), worker_id="w1")

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, handler)
            t0 = time.monotonic()
            for _ in range(3):
                req = make_request(budget_ms=2000)
                resp = await client.request(REQ, req)
                assert resp.id == req.id and resp.worker_id == "w1"
                np.testing.assert_array_equal(resp.outputs[0].to_array(),
                                              np.arange(12, dtype=np.float32) * 2)
                assert resp.timings.compute_ms > 0
            request, ctx, thread = seen[-1]
            assert (ctx.topic, ctx.device_id, ctx.model, ctx.reply_topic) == (
                REQ, DEVICE, "model-a", RESP)
            assert t0 <= ctx.received_at_s <= time.monotonic()
            assert ctx.deadline_s is not None
            assert 0 < ctx.deadline_s - ctx.received_at_s <= 2.0  # the budget (and expiry)
            assert not ctx.expired and request.reply_topic == RESP
            assert thread.startswith("tandem-transport-serve")  # a sync handler: not the loop
            stats = server.stats().serving[REQ_FILTER]
            assert stats.answered == 3 and stats.held_bytes == 0 and stats.running == 0

    run(main())


def test_the_sync_shell_over_each_transport(net):
    with SyncTransport(net.transport()) as server, SyncTransport(net.transport()) as client:
        server.serve(REQ_FILTER, echo)
        for _ in range(3):
            req = make_request()
            assert client.request(REQ, req, timeout_s=5).id == req.id
        handle = client.publish("plain/topic", b"payload")
        handle.wait(5)
        assert handle.done()
        assert client.stats().pending_requests == 0
    assert not client.connected
    with pytest.raises(FailedPrecondition):
        client.request(REQ, make_request())


def test_error_responses_raise_typed_errors_and_the_server_survives(net):
    def handler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        if request.cut_id == 2:
            raise NotFound("no such model")
        if request.cut_id == 3:
            raise RuntimeError("boom")
        if request.cut_id == 4:
            raise SystemExit(3)  # a BaseException: answered, the loop lives on
        if request.cut_id == 5:
            return "not a response"  # type: ignore[return-value]
        return echo(request, ctx)

    async def ahandler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        if request.cut_id == 4:
            raise SystemExit(4)  # on the loop itself
        return handler(request, ctx)

    def with_cut(cut: int) -> InferenceRequest:
        req = make_request()
        return InferenceRequest(req.id, DEVICE, req.model_digest, cut, 3000, req.tensors)

    async def main() -> None:
        for h, flt in ((handler, REQ_FILTER), (ahandler, "tandem/v1/req/+/async")):
            async with net.transport() as server, net.transport() as client:
                await server.serve(flt, h)
                topic = REQ if flt == REQ_FILTER else topics.request_topic(DEVICE, "async")
                with pytest.raises(NotFound, match="no such model"):
                    await client.request(topic, with_cut(2), timeout_s=5)
                with pytest.raises(HandlerFailed, match="RuntimeError: boom"):
                    await client.request(topic, with_cut(3), timeout_s=5)
                with pytest.raises(HandlerFailed, match="SystemExit"):
                    await client.request(topic, with_cut(4), timeout_s=5)
                with pytest.raises(HandlerFailed, match="str"):
                    await client.request(topic, with_cut(5), timeout_s=5)
                assert server.connected and (await client.request(topic, with_cut(1))).ok
                assert server.stats().serving[flt].failed == 2

    run(main())


def test_a_request_without_responder_times_out(net):
    async def main() -> None:
        async with net.transport() as client:
            for timeout_s in (0.2, 0.5):
                t0 = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await client.request(REQ, make_request(), timeout_s=timeout_s)
                assert timeout_s - 0.05 <= time.monotonic() - t0 <= timeout_s + SLACK_S
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await client.request(REQ, make_request(budget_ms=300))  # the budget
            assert 0.25 <= time.monotonic() - t0 <= 0.3 + SLACK_S
            with pytest.raises(DeadlineExceeded):
                await client.request(REQ, make_request(budget_ms=0))  # spent: at once
            assert client.stats().pending_requests == 0

    run(main())


def test_a_huge_budget_means_no_expiry(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            contexts: list[RequestContext] = []

            async def handler(request: InferenceRequest, ctx: RequestContext):
                contexts.append(ctx)
                return echo(request, ctx)

            await server.serve(REQ_FILTER, handler)
            for budget in (2**32 * 1000, 2**63 - 1):
                req = make_request(budget_ms=budget)
                assert (await client.request(REQ, req)).id == req.id
                assert contexts[-1].deadline_s is None and contexts[-1].message_expiry_s is None
        with SyncTransport(net.transport()) as server, SyncTransport(net.transport()) as client:
            server.serve(REQ_FILTER, echo)
            req = make_request(budget_ms=2**63 - 1)
            assert client.request(REQ, req).id == req.id

    run(main())


def test_the_caller_cancelling_a_request_leaves_nothing_pending(net):
    async def main() -> None:
        async with net.transport() as client:
            task = asyncio.create_task(client.request(REQ, make_request(), timeout_s=5))
            await until(lambda: client.stats().pending_requests == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client.stats().pending_requests == 0

    run(main())


# -- replies go only to the sender's response topic ----------------------------------------------


@pytest.mark.parametrize("reply_topic", [
    "tandem/v1/resp/cam-02",  # another device's replies
    "some/where/else",
    "tandem/v1/resp/cam-01/extra",
])
def test_a_reply_topic_other_than_the_senders_is_refused(net, reply_topic):
    async def main() -> None:
        async with net.transport() as server, net.transport() as peer:
            await server.serve(REQ_FILTER, echo)
            sniffer = Inbox()
            await peer.subscribe("#", sniffer)
            req = make_request(reply_topic=reply_topic)
            await peer.publish(REQ, codec.encode(req))
            good = make_request()
            await peer.publish(REQ, codec.encode(good),
                               properties=PublishProperties(response_topic=RESP))
            await until(lambda: any(m.topic == RESP for m in sniffer.messages))
            replies = [m for m in sniffer.messages if m.topic != REQ]
            assert [m.topic for m in replies] == [RESP]  # nothing anywhere else
            assert codec.decode(replies[0].payload).id == good.id
            stats = server.stats().serving[REQ_FILTER]
            assert stats.refused == 1 and stats.answered == 1

    run(main())


def test_a_response_topic_property_other_than_the_senders_is_refused(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as peer:
            await server.serve(REQ_FILTER, echo)
            sniffer = Inbox()
            await peer.subscribe("#", sniffer)
            req = make_request()  # the payload leaves reply_topic empty
            await peer.publish(REQ, codec.encode(req), properties=PublishProperties(
                response_topic="tandem/v1/resp/cam-02", correlation_data=req.id))
            await until(lambda: server.stats().serving[REQ_FILTER].refused == 1)
            await asyncio.sleep(0.1)
            # on MQTT 3.1.1 there are no properties; on 5 and in memory: refused, no reply
            assert [m.topic for m in sniffer.messages] == [REQ]

    run(main())


def test_a_request_naming_another_device_is_answered_permission_denied(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, echo)
            req = make_request(device_id="cam-02", reply_topic=RESP)  # sent on cam-01's topic
            with pytest.raises(PermissionDenied, match="cam-02"):
                await client.request(REQ, req, timeout_s=5)
            assert server.stats().serving[REQ_FILTER].refused == 1

    run(main())


def test_requests_on_a_topic_that_is_not_a_request_topic_are_refused(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as peer:
            await server.serve("rpc/+", echo)
            await peer.publish("rpc/x", codec.encode(make_request()))
            await until(lambda: server.stats().serving["rpc/+"].refused == 1)

    run(main())


# -- bad input is answered or counted, never fatal -----------------------------------------------


def _bool_request() -> tuple[InferenceRequest, bytes]:
    """A request whose frame peeks fine but does not decode (a bool byte of 2)."""
    req = InferenceRequest(id=new_request_id(), device_id=DEVICE, model_digest="ab" * 32,
                           cut_id=1, budget_ms=3000, tensors=(Tensor.from_array(
                               "m", np.array([True, False, True])),))
    frame = bytearray(codec.encode(req))
    frame[-1] = 2
    return req, bytes(frame)


def test_a_request_that_does_not_decode_is_answered_with_its_error(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as peer:
            await server.serve(REQ_FILTER, echo)
            inbox = Inbox()
            await peer.subscribe(RESP, inbox)
            req, frame = _bool_request()
            await peer.publish(REQ, frame)
            await until(lambda: inbox.messages)
            (answer,) = inbox.responses()
            assert answer.id == req.id and answer.error is not None
            assert answer.error.code == Code.INVALID_ARGUMENT and "bool" in answer.error.message
            # an envelope nobody can read: answered by the MQTT 5 correlation data when it
            # carries an id, else dropped and counted
            rid = new_request_id()
            await peer.publish(REQ, b"\x93\x01\x01garbage", properties=PublishProperties(
                correlation_data=rid))
            await peer.publish(REQ, b"\xc1not msgpack")
            await until(lambda: server.stats().serving[REQ_FILTER].undecodable == 3)
            await until(lambda: len(inbox.messages) == 2)
            assert inbox.responses()[1].id == rid
            assert server.connected

    run(main())


def test_garbage_on_every_topic_never_stops_server_or_client(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client, \
                net.transport() as peer:
            await server.serve(REQ_FILTER, echo)
            assert (await client.request(REQ, make_request())).ok
            for junk in (b"", b"\x00garbage", b"\xc1" * 100, os.urandom(4096),
                         codec.encode(InferenceResponse(id=b"\x01" * 16)),
                         codec.encode(make_request())[:-3]):
                await peer.publish(REQ, junk)
                await peer.publish(RESP, junk)
            await peer.publish(RESP, codec.encode(InferenceResponse(id=new_request_id())))
            for _ in range(3):
                req = make_request()
                assert (await client.request(REQ, req, timeout_s=5)).id == req.id
            await until(lambda: client.stats().late_responses >= 2)
            assert client.stats().dropped_messages >= 4

    run(main())


def test_a_handler_gets_at_most_its_limits(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, echo, limits=Limits(max_message_bytes=64 * 1024,
                                                               max_tensor_bytes=64 * 1024))
            with pytest.raises(PayloadTooLarge):
                await client.request(REQ, make_request(payload=np.zeros(32 * 1024, np.float32)))
            # compressed: refused on its declared size, before anything is inflated
            bomb = Tensor.from_array("x", np.zeros(1 << 20, np.float32), compress=True)
            req = InferenceRequest(new_request_id(), DEVICE, "ab" * 32, 1, 3000, (bomb,))
            assert len(codec.encode(req)) < 2048
            with pytest.raises(PayloadTooLarge, match="limit 65536"):
                await client.request(REQ, req)
            assert (await client.request(REQ, make_request())).ok

    run(main())


def test_large_compressed_payloads_are_decoded_off_the_event_loop(net, monkeypatch):
    decoded_in: list[str] = []
    real = codec.decode

    def recording(data, limits=codec.DEFAULT_LIMITS):
        decoded_in.append(threading.current_thread().name)
        return real(data, limits)

    real_opened = codec.OpenFrame.decode

    def recording_opened(self):  # a frame whose envelope was parsed once (codec.open_frame)
        decoded_in.append(threading.current_thread().name)
        return real_opened(self)

    monkeypatch.setattr(codec, "decode", recording)
    monkeypatch.setattr(codec.OpenFrame, "decode", recording_opened)

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, _async_echo)
            loop_thread = threading.current_thread().name
            assert (await client.request(REQ, make_request())).ok  # small: on the loop
            assert decoded_in == [loop_thread, loop_thread]  # the request, the response
            decoded_in.clear()
            big = Tensor.from_array("x", np.zeros(1 << 20, np.float32), compress=True)
            req = InferenceRequest(new_request_id(), DEVICE, "ab" * 32, 1, 5000, (big,))
            assert (await client.request(REQ, req)).ok  # inflates to 4 MiB: in a thread
            assert len(decoded_in) == 2
            assert all(name.startswith("tandem-transport-decode") for name in decoded_in)

    run(main())


def test_the_transport_refuses_to_send_over_its_limits(net):
    async def main() -> None:
        limits = Limits(max_message_bytes=100_000, max_tensor_bytes=100_000)
        async with net.transport(limits=limits) as client:
            with pytest.raises(PayloadTooLarge):
                await client.publish("a/b", b"x" * 100_001)
            with pytest.raises(PayloadTooLarge):
                await client.request(REQ, make_request(payload=np.zeros(30_000, np.float32)))
            assert client.stats().pending_requests == 0

    run(main())


# -- serving: executor, queue, deadlines, batching -----------------------------------------------


def test_a_sync_handler_runs_in_the_given_executor(net):
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="inference")
    threads: list[str] = []

    def handler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        threads.append(threading.current_thread().name)
        return echo(request, ctx)

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, handler, executor=pool)
            await asyncio.gather(*(client.request(REQ, make_request()) for _ in range(4)))
            with pytest.raises(InvalidArgument):  # an async handler takes no executor
                await server.serve("x/+", _async_echo, executor=pool)

    try:
        run(main())
    finally:
        pool.shutdown()
    assert len(threads) == 4 and all(t.startswith("inference") for t in threads)


async def _async_echo(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
    return echo(request, ctx)


def test_an_async_handler_awaiting_a_future_is_the_batching_hook(net):
    async def main() -> None:
        waiting: list[tuple[InferenceRequest, asyncio.Future]] = []
        batches: list[int] = []
        full = asyncio.Event()

        async def handler(request: InferenceRequest, ctx: RequestContext):
            done = asyncio.get_running_loop().create_future()
            waiting.append((request, done))
            if len(waiting) == 4:
                full.set()
            return await done  # answered later, by the batcher

        async def batcher() -> None:
            await full.wait()
            batch = waiting[:]
            waiting.clear()
            batches.append(len(batch))
            stacked = np.stack([r.tensors[0].to_array() for r, _ in batch]) + 1  # one "run"
            for (request, done), row in zip(batch, stacked, strict=True):
                done.set_result(InferenceResponse(id=request.id, outputs=(
                    Tensor.from_array("y", row),), worker_id="batched"))

        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, handler)
            job = asyncio.create_task(batcher())
            reqs = [make_request(payload=np.full(3, i, np.float32)) for i in range(4)]
            resps = await asyncio.gather(*(client.request(REQ, r, timeout_s=5) for r in reqs))
            await job
            assert batches == [4]
            for i, (req, resp) in enumerate(zip(reqs, resps, strict=True)):
                assert resp.id == req.id and resp.worker_id == "batched"
                np.testing.assert_array_equal(resp.outputs[0].to_array(),
                                              np.full(3, i + 1, np.float32))

    run(main())


def test_a_full_queue_answers_resource_exhausted(net):
    release = threading.Event()
    calls: list[int] = []

    def stuck(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        calls.append(request.cut_id)
        release.wait(10)
        return echo(request, ctx)

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, stuck, max_concurrency=1, max_queued=1)
            first = asyncio.create_task(client.request(REQ, make_request(), timeout_s=10))
            await until(lambda: server.stats().serving[REQ_FILTER].running == 1)
            second = asyncio.create_task(client.request(REQ, make_request(), timeout_s=10))
            await until(lambda: server.stats().serving[REQ_FILTER].queued == 1)
            t0 = time.monotonic()
            with pytest.raises(ResourceExhausted) as info:
                await client.request(REQ, make_request(), timeout_s=10)
            assert info.value.retryable and time.monotonic() - t0 < 2  # at once, not queued
            release.set()
            assert (await first).ok and (await second).ok
            assert server.stats().serving[REQ_FILTER].busy == 1 and len(calls) == 2

    try:
        run(main())
    finally:
        release.set()


def test_a_byte_budget_bounds_what_waits(net):
    release = threading.Event()

    def stuck(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        release.wait(10)
        return echo(request, ctx)

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, stuck, max_concurrency=1,
                               max_queued_bytes=300_000)
            big = np.zeros(50_000, np.float32)  # 200 KB each
            first = asyncio.create_task(client.request(REQ, make_request(payload=big)))
            await until(lambda: server.stats().serving[REQ_FILTER].running == 1)
            with pytest.raises(ResourceExhausted, match="bytes held"):
                await client.request(REQ, make_request(payload=big))
            assert server.stats().serving[REQ_FILTER].held_bytes <= 300_000
            release.set()
            assert (await first).ok
            assert server.stats().serving[REQ_FILTER].held_bytes == 0

    try:
        run(main())
    finally:
        release.set()


def test_a_request_whose_deadline_passed_while_queued_is_not_run(net):
    release = threading.Event()
    ran: list[bytes] = []

    def stuck(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        ran.append(request.id)
        release.wait(10)
        return echo(request, ctx)

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, stuck, max_concurrency=1)
            first = asyncio.create_task(client.request(REQ, make_request(budget_ms=10_000)))
            await until(lambda: server.stats().serving[REQ_FILTER].running == 1)
            late = make_request(budget_ms=300)
            with pytest.raises(DeadlineExceeded):
                await client.request(REQ, late)  # waits behind the stuck one, times out
            # its deadline on the server counts from its arrival, a little after it was sent
            await asyncio.sleep(0.3)
            release.set()
            assert (await first).ok
            await until(lambda: server.stats().serving[REQ_FILTER].expired == 1)
            assert late.id not in ran  # its deadline passed: answered, never run

    try:
        run(main())
    finally:
        release.set()


def test_requests_wait_by_priority(net):
    release = threading.Event()
    order: list[int] = []

    def stuck(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        order.append(request.priority)
        release.wait(10)
        return echo(request, ctx)

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, stuck, max_concurrency=1)
            tasks = [asyncio.create_task(client.request(REQ, make_request(priority=0)))]
            await until(lambda: server.stats().serving[REQ_FILTER].running == 1)
            for p in (1, 5, -3, 2):
                tasks.append(asyncio.create_task(client.request(REQ, make_request(priority=p))))
            await until(lambda: server.stats().serving[REQ_FILTER].queued == 4)
            release.set()
            await asyncio.gather(*tasks)
            assert order == [0, 5, 2, 1, -3]

    try:
        run(main())
    finally:
        release.set()


def test_a_duplicate_of_a_request_in_progress_runs_once(net):
    release = threading.Event()
    ran: list[bytes] = []

    def stuck(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        ran.append(request.id)
        release.wait(10)
        return echo(request, ctx)

    async def main() -> None:
        async with net.transport() as server, net.transport() as peer:
            await server.serve(REQ_FILTER, stuck)
            frame = codec.encode(make_request())
            await peer.publish(REQ, frame)
            await until(lambda: server.stats().serving[REQ_FILTER].running == 1)
            await peer.publish(REQ, frame)  # QoS 1 may deliver a request twice
            await until(lambda: server.stats().serving[REQ_FILTER].duplicates == 1)
            release.set()
            await until(lambda: server.stats().serving[REQ_FILTER].answered == 1)
            assert len(ran) == 1

    try:
        run(main())
    finally:
        release.set()


def test_close_answers_what_is_served_and_honours_its_timeout(net):
    release = threading.Event()

    def stuck(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        release.wait(20)  # a handler that never returns in time
        return echo(request, ctx)

    try:
        server = SyncTransport(net.transport())
        server.connect()
        with SyncTransport(net.transport()) as client:
            server.serve(REQ_FILTER, stuck, max_concurrency=1)
            outcomes: list[BaseException] = []

            def call() -> None:
                try:
                    client.request(REQ, make_request(budget_ms=10_000))
                except BaseException as exc:
                    outcomes.append(exc)

            callers = [threading.Thread(target=call) for _ in range(2)]  # one runs, one waits
            for c in callers:
                c.start()
            deadline = time.monotonic() + 5
            while server.stats().serving[REQ_FILTER].queued < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            t0 = time.monotonic()
            server.close(timeout_s=1.0)  # must not wait for the stuck handler
            assert time.monotonic() - t0 < 1.0 + SLACK_S
            for c in callers:
                c.join(5)
            # both answered UNAVAILABLE (retryable) before the server left
            assert len(outcomes) == 2 and all(isinstance(e, Unavailable) and e.retryable
                                              for e in outcomes), outcomes
    finally:
        release.set()


# -- bytes: publish handles, retained, chunking, unsubscribe -------------------------------------


def test_publish_returns_a_handle_for_the_brokers_acknowledgement(net):
    async def main() -> None:
        async with net.transport() as a, net.transport() as b:
            inbox = Inbox()
            await b.subscribe("t/#", inbox)
            for qos in (0, 1):
                handle = await a.publish("t/x", b"hello", qos=qos)
                await handle
                assert handle.done()
            handle = await a.publish_message("t/status", make_request())
            await handle
            await until(lambda: len(inbox.messages) == 3)
            assert inbox.messages[0].payload == b"hello" and type(inbox.messages[0].payload) \
                is bytes

    run(main())


def test_retained_messages_reach_later_subscribers(net):
    net.lacks("retained messages")
    async def main() -> None:
        async with net.transport() as a:
            await (await a.publish("tandem/v1/assign/cam-01", b"bundle-1", retain=True))
        async with net.transport() as b:
            inbox = Inbox()
            await b.subscribe("tandem/v1/assign/+", inbox)
            await until(lambda: inbox.messages)
            msg = inbox.messages[0]
            assert msg.payload == b"bundle-1" and msg.retain

    run(main())


def test_big_messages_travel_in_chunks_through_a_capped_broker(net):
    net.reset(max_packet_bytes=1 << 20)
    payload = os.urandom(5 * 1024 * 1024)
    arr = np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32)  # 4 MiB

    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            assert client.chunk_size() < 1 << 20
            inbox = Inbox()
            await server.subscribe("bulk/data", inbox)
            await server.serve(REQ_FILTER, echo)
            await (await client.publish("bulk/data", payload))
            await until(lambda: inbox.messages, 20)
            assert inbox.messages[0].payload == payload
            resp = await client.request(REQ, make_request(budget_ms=20_000, payload=arr))
            np.testing.assert_array_equal(resp.outputs[0].to_array(), arr)
            with pytest.raises(InvalidArgument, match="retained"):
                await client.publish("bulk/data", payload, retain=True)

    run(main())


def test_a_chunked_message_near_the_limit_reassembles(net):
    # the reassembly quotas leave one sender room for a whole message of the limit
    net.reset(max_packet_bytes=1 << 20)
    limits = Limits(max_message_bytes=8 * 2**20, max_tensor_bytes=8 * 2**20)
    payload = os.urandom(7 * 2**20)

    async def main() -> None:
        async with net.transport(limits=limits) as receiver, \
                net.transport(limits=limits) as sender:
            inbox = Inbox()
            await receiver.subscribe("bulk/+", inbox)
            await (await sender.publish("bulk/a", payload))
            await until(lambda: inbox.messages, 20)
            assert inbox.messages[0].payload == payload
            assert receiver.stats().reassembly_sets == 0

    run(main())


def test_incomplete_chunk_sets_expire_on_a_timer(net):
    async def main() -> None:
        async with net.transport(reassembly_timeout_s=0.2) as receiver, \
                net.transport() as peer:
            await receiver.subscribe("bulk/+", Inbox())
            chunks = split(os.urandom(10_000), 4096)
            await peer.publish("bulk/a", chunks[0])  # the rest never comes
            await until(lambda: receiver.stats().reassembly_sets == 1)
            # nothing else arrives; the timer alone frees it
            await until(lambda: receiver.stats().reassembly_sets == 0, 3)
            stats = receiver.stats()
            assert stats.reassembly_bytes == 0 and stats.chunk_sets_expired == 1

    run(main())


def test_unsubscribe_stops_delivery_and_subscribe_replaces_a_handler(net):
    async def main() -> None:
        async with net.transport() as a, net.transport() as b:
            first, second = Inbox(), Inbox()
            await b.subscribe("u/+", first)
            await b.subscribe("u/+", second)  # replaces
            await a.publish("u/1", b"1")
            await until(lambda: second.messages)
            await b.unsubscribe("u/+")
            await a.publish("u/2", b"2")
            await b.subscribe("marker", Inbox())
            await a.publish("marker", b"m")
            await asyncio.sleep(0.2)
            assert not first.messages and [m.payload for m in second.messages] == [b"1"]

    run(main())


@pytest.mark.parametrize("bad", ["a/+/b", "a/#", "", "cam\u0085/x", "cam\ufdd0", "x\uffff",
                                 "nul\x00", "tab\t"])
def test_topics_a_broker_would_refuse_are_refused_before_sending(net, bad):
    async def main() -> None:
        async with net.transport() as t:
            drops: list[bool] = []
            t.add_connection_listener(drops.append)
            with pytest.raises(InvalidArgument):
                await t.publish(bad, b"x")
            if bad not in ("a/+/b", "a/#"):
                with pytest.raises(InvalidArgument):
                    await t.subscribe(bad, Inbox())
            await asyncio.sleep(0.2)
            assert t.connected and drops == []  # the connection never dropped

    run(main())


@pytest.mark.parametrize("device", ["cam\u0085", "cam\ufdd0", "cam\uffff", "cam\x01"])
def test_a_request_for_an_id_the_broker_refuses_fails_that_call_only(net, device):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, echo)
            drops: list[bool] = []
            client.add_connection_listener(drops.append)
            with pytest.raises(InvalidArgument):
                await client.request(REQ, make_request(device_id=device))
            assert (await client.request(REQ, make_request())).ok
            await asyncio.sleep(0.3)
            assert drops == [] and client.connected

    run(main())


@pytest.mark.parametrize("bad", ["$share//a", "$share/g", "$share/g+/a/b", "a/b#", "+a"])
def test_malformed_filters_are_refused(net, bad):
    async def main() -> None:
        async with net.transport() as t:
            with pytest.raises(InvalidArgument):
                await t.subscribe(bad, Inbox())
            assert t.connected

    run(main())


# -- scale-out, outages, sessions, wills ---------------------------------------------------------


def test_a_shared_subscription_answers_each_request_once(net):
    async def main() -> None:
        group = topics.request_filter("workers")
        counts = {"a": 0, "b": 0}

        def worker(name: str):
            async def handler(request: InferenceRequest, ctx: RequestContext):
                counts[name] += 1
                return InferenceResponse(id=request.id, worker_id=name)
            return handler

        async with net.transport() as w1, net.transport() as w2, net.transport() as client:
            await w1.serve(group, worker("a"))
            await w2.serve(group, worker("b"))
            inbox = Inbox()
            await client.subscribe(RESP, inbox)
            reqs = [make_request() for _ in range(40)]
            for r in reqs:
                await client.publish(REQ, codec.encode(r))
            await until(lambda: len(inbox.messages) >= 40, 10)
            await asyncio.sleep(0.2)
            assert sorted(r.id for r in inbox.responses()) == sorted(r.id for r in reqs)
            assert counts["a"] > 0 and counts["b"] > 0 and sum(counts.values()) == 40

    run(main())


def test_an_outage_fails_fast_and_everything_comes_back(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, echo)
            events: list[bool] = []
            client.add_connection_listener(events.append)
            assert (await client.request(REQ, make_request())).ok
            silent = asyncio.create_task(client.request("nobody/answers", make_request(),
                                                        timeout_s=10))
            await until(lambda: client.stats().pending_requests == 1)
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, net.outage)
            with pytest.raises(Unavailable) as info:
                await silent
            assert info.value.retryable and time.monotonic() - t0 < 3  # not after 10 s
            await until(lambda: events == [False])
            assert not client.connected
            with pytest.raises(Unavailable):
                await client.publish("a/b", b"x")
            with pytest.raises(Unavailable):
                await client.request(REQ, make_request())
            await asyncio.get_running_loop().run_in_executor(None, net.recover)
            await client.wait_connected(10)
            await server.wait_connected(10)
            assert events == [False, True]
            req = make_request()
            assert (await client.request(REQ, req)).id == req.id  # re-subscribed both sides

    run(main())


def test_a_persistent_sessions_backlog_is_held_for_its_handler_within_bounds(net):
    net.lacks("persistent sessions")
    async def main() -> None:
        cid = f"cam-persist-{net.kind}"
        cfg = dict(client_id=cid, clean_start=False, session_expiry_s=300,
                   max_unclaimed_bytes=350_000, max_unclaimed_messages=100)
        topic = "tandem/v1/assign/cam-persist"
        async with net.transport(**cfg) as device:
            await device.subscribe(topic, Inbox())
        async with net.transport() as fleet:  # published while the device is away
            for i in range(10):
                await (await fleet.publish(topic, bytes([i]) * 100_000))
        async with net.transport(**cfg) as device:
            # the broker delivers the backlog before the application subscribes again: held,
            # at most 350 KB of it (the oldest dropped first)
            await until(lambda: device.stats().dropped_messages >= 7)
            stats = device.stats()
            assert stats.unclaimed_bytes <= 350_000 and stats.unclaimed_messages == 3
            inbox = Inbox()
            await device.subscribe(topic, inbox)
            assert [m.payload[0] for m in inbox.messages] == [7, 8, 9]
            assert device.stats().unclaimed_messages == 0

    run(main())


def test_the_last_will_is_published_when_a_client_is_lost(net):
    net.lacks("last wills")
    status = topics.status_topic(DEVICE)

    async def main() -> None:
        async with net.transport() as watcher:
            inbox = Inbox()
            await watcher.subscribe(status, inbox)
            will = Will(status, b"offline", qos=1, retain=True)
            if net.kind == "memory":
                async with net.transport(will=will) as device:
                    await device.close()  # a clean close: no will
                device = net.transport(will=will)
                await device.connect()
                device.break_connection()  # the network fails
                assert not device.connected
                with pytest.raises(Unavailable):
                    await device.publish("a/b", b"x")
                device.restore_connection()
                assert device.connected
                await device.close()
            else:
                await _crash_a_process_with_a_will(net, status)
            await until(lambda: inbox.messages)
            await asyncio.sleep(0.2)
            assert [m.payload for m in inbox.messages] == [b"offline"]

    run(main())


async def _crash_a_process_with_a_will(net: Net, status: str) -> None:
    """An MQTT client process that connects with a will, then dies (SIGKILL: no DISCONNECT)."""
    code = (
        "import asyncio, sys\n"
        "from tandem.protocol.mqtt import MqttTransport\n"
        "from tandem.protocol.transport import TransportConfig, Will\n"
        "async def main():\n"
        f"    t = MqttTransport(TransportConfig(host={net.mosquitto.host!r}, "
        f"port={net.mosquitto.port}, protocol={net.config().protocol!r}, keepalive_s=60, "
        f"will=Will({status!r}, b'offline')))\n"
        "    await t.connect()\n"
        "    print('up', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        assert line.strip() == b"up"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_a_closed_transport_refuses_calls(net):
    async def main() -> None:
        t = net.transport()
        with pytest.raises(FailedPrecondition):
            await t.publish("a", b"x")  # not connected yet
        await t.connect()
        await t.close()
        await t.close()  # idempotent
        for call in (t.publish("a", b"x"), t.subscribe("a", Inbox()),
                     t.request(REQ, make_request()), t.serve(REQ_FILTER, echo)):
            with pytest.raises(FailedPrecondition):
                await call
        with pytest.raises(FailedPrecondition):
            await t.connect()

    run(main())


def test_connect_to_a_broker_that_is_down_raises_unavailable(net):
    net.outage()
    t0 = time.monotonic()

    async def main() -> None:
        with pytest.raises(Unavailable):
            await net.transport(connect_timeout_s=2.0).connect()

    run(main())
    assert time.monotonic() - t0 < 5


def test_dtypes_travel_unchanged(net):
    async def main() -> None:
        async with net.transport() as server, net.transport() as client:
            await server.serve(REQ_FILTER, echo)
            for dtype in DType:
                arr = np.arange(6).reshape(2, 3).astype(dtype.numpy_dtype) if dtype \
                    is not DType.BOOL else np.array([[True, False, True]])
                t = Tensor.from_array("x", arr, dtype=dtype)
                req = InferenceRequest(new_request_id(), DEVICE, "ab" * 32, 1, 3000, (t,))
                out = (await client.request(REQ, req)).outputs[0]
                assert out.dtype is dtype and bytes(out.data) == bytes(t.data)

    run(main())
