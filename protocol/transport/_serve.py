"""The answering side of requests: one :class:`Server` per ``Transport.serve()`` call.

A request goes through these steps, each bounded, before the handler sees it:

1. **Topic**: it must be ``tandem/v1/req/<device>/<model>``; the answer goes to
   ``tandem/v1/resp/<device>`` and nowhere else. A request whose ``reply_topic`` (payload or
   MQTT 5 ResponseTopic) names anything else is refused and counted, never answered: a server
   never publishes to a topic a peer chose freely.
2. **Envelope** (:func:`tandem.protocol.codec.open_frame`, parsed once for this step and
   decoding): type, id and declared tensor sizes, read
   before any tensor byte is touched or decompressed. A frame whose envelope is unreadable is
   answered by id when the MQTT 5 correlation data carries one, else dropped and counted; a
   shared-subscription probe (:mod:`._share`; never a frame) is dropped and counted as one.
3. **Admission**: a duplicate of a request in progress (QoS 1 redelivery) is dropped; one whose
   declared tensors exceed the handler's limits, or whose bytes (payload + what compressed
   tensors inflate to) exceed ``max_queued_bytes`` on their own, is answered PAYLOAD_TOO_LARGE;
   when ``max_queued`` requests already wait, or the bytes of all admitted requests would pass
   ``max_queued_bytes``, it is answered RESOURCE_EXHAUSTED (retryable).
4. **Decode** under the handler's ``limits`` (so decompression never exceeds what the handler
   accepts); compressed tensors inflating to ``offloop_decode_bytes`` or more are decoded in a
   thread, not on the event loop. An undecodable request is answered with its error.
5. **Queue** by priority (higher first), then **start** when fewer than ``max_concurrency``
   handlers run, unless its deadline has passed (answered DEADLINE_EXCEEDED, not run).

A handler is ``handler(request, context) -> InferenceResponse`` (or a coroutine function). An
async handler runs on the loop — one that awaits a future completed elsewhere is how a batcher
collects requests; a sync one runs in ``executor`` when one is given, else on up to
``max_concurrency`` handler threads owned by the server. A handler thread answers by itself: it
runs the handler, encodes the answer into its packets and hands them to the loop with one
batched ``call_soon_threadsafe`` — no executor future, no task resumed on the loop (the
executor round trip cost ~0.1-0.2 ms a request on a 2-core machine). Whatever a handler raises
is answered: a TandemError with its own code, anything else (``SystemExit`` included)
HANDLER_FAILED; the loop always survives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import inspect
import itertools
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tandem.protocol import codec, topics
from tandem.protocol.errors import (
    DeadlineExceeded,
    HandlerFailed,
    InvalidArgument,
    MalformedMessage,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from tandem.protocol.messages import ErrorInfo, InferenceRequest, InferenceResponse, Timings
from tandem.protocol.transport._config import IncomingMessage, RequestContext
from tandem.protocol.transport._log import Throttled, log
from tandem.protocol.transport._share import is_probe

__all__ = ["RequestHandler", "ServeStats", "Server", "is_async_callable"]

RequestHandler = Callable[[InferenceRequest, RequestContext],
                          "Awaitable[InferenceResponse] | InferenceResponse"]

# a deadline further away than this is no deadline (a budget near 2**63 ms)
_NO_DEADLINE_S = 10 * 365 * 86400.0


@dataclass(frozen=True, slots=True)
class ServeStats:
    """Counters of one ``serve()`` (snapshot). ``held_bytes`` are the bytes admitted requests
    hold (queued and running); ``refused`` counts requests never answered because their topic
    or reply topic was not acceptable; ``undecodable`` those whose frame did not decode
    (answered when their id was readable)."""

    queued: int = 0
    running: int = 0
    held_bytes: int = 0
    answered: int = 0
    failed: int = 0  # handlers that raised something other than a TandemError
    busy: int = 0  # answered RESOURCE_EXHAUSTED (queue or byte budget full)
    expired: int = 0  # answered DEADLINE_EXCEEDED without running (deadline passed first)
    refused: int = 0
    undecodable: int = 0
    duplicates: int = 0
    replies_lost: int = 0  # answers that could not be published (connection lost)
    probes: int = 0  # shared-subscription probes (of any worker) dropped before decoding


class Host(Protocol):
    """What a server needs from its transport."""

    def _send_reply(self, topic: str, response: InferenceResponse,
                    correlation_data: bytes | None) -> bool: ...

    def _reply_packets(self, topic: str, response: InferenceResponse,
                       correlation_data: bytes | None) -> tuple[list[Any], Any]: ...

    def _send_reply_packets(self, topic: str, packets: list[Any], props: Any) -> bool: ...

    def _spawn(self, coro: Any) -> asyncio.Task: ...

    async def _decode_in_thread(self, payload: Any, limits: codec.Limits) -> Any: ...


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine (a coroutine function, or an object whose
    ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__))


class _ExpiredBeforeStart(DeadlineExceeded):
    """The deadline passed while the request waited for a worker thread."""


def _call_sync(handler: RequestHandler, request: InferenceRequest,
               ctx: RequestContext) -> InferenceResponse:
    """Runs in the executor: the deadline is checked again when a thread actually starts it."""
    if ctx.deadline_s is not None and time.monotonic() >= ctx.deadline_s:
        raise _ExpiredBeforeStart("the request's deadline passed before a worker was free")
    return handler(request, ctx)  # type: ignore[return-value]


_OK, _EXPIRED, _FAILED = 0, 1, 2


class _Stub:
    """What a finished job keeps of its request: the id."""

    __slots__ = ("id",)

    def __init__(self, rid: bytes) -> None:
        self.id = rid


def _with_timings(response: InferenceResponse, started: float,
                  ctx: RequestContext) -> InferenceResponse:
    """A successful response the handler left without timings gets queue and compute time."""
    if response.ok and response.timings.queue_ms == 0.0 and response.timings.compute_ms == 0.0:
        return InferenceResponse(
            id=response.id, outputs=response.outputs, error=None, worker_id=response.worker_id,
            timings=Timings(queue_ms=(started - ctx.received_at_s) * 1e3,
                            compute_ms=(time.monotonic() - started) * 1e3))
    return response



def _checked(response: Any, rid: bytes) -> InferenceResponse:
    """A handler's answer, if it is an InferenceResponse to request ``rid``; HandlerFailed
    otherwise."""
    if not isinstance(response, InferenceResponse):
        raise HandlerFailed(f"request handler returned {type(response).__name__}, "
                            "not an InferenceResponse")
    if response.id != rid:
        raise HandlerFailed(f"request handler answered request {rid.hex()} with "
                            f"the id {response.id.hex()}")
    return response

def _error(request_id: bytes, exc: TandemError) -> InferenceResponse:
    return InferenceResponse(id=request_id, error=ErrorInfo(exc.code, exc.message, exc.retryable))


class _Job:
    __slots__ = ("corr", "cost", "ctx", "key", "request")

    def __init__(self, request: InferenceRequest, ctx: RequestContext, corr: bytes | None,
                 cost: int, key: tuple[str, bytes]) -> None:
        self.request = request
        self.ctx = ctx
        self.corr = corr
        self.cost = cost
        self.key = key


def _ack(ack: Callable[[], None] | None) -> None:
    """Acknowledge a request's message (manual_ack; idempotent), if it has an ack."""
    if ack is not None:
        ack()


class Server:
    """State of one ``serve()``: admission, queue, running handlers, counters. Loop thread only."""

    def __init__(
        self,
        host: Host,
        topic_filter: str,
        handler: RequestHandler,
        *,
        executor: concurrent.futures.Executor | None,
        limits: codec.Limits,
        max_concurrency: int | None,
        max_queued: int,
        max_queued_bytes: int,
        offloop_decode_bytes: int,
    ) -> None:
        if not callable(handler):
            raise InvalidArgument(f"handler must be callable, not {type(handler).__name__}")
        self.is_async = is_async_callable(handler)
        if executor is not None and self.is_async:
            raise InvalidArgument("an async handler runs on the event loop: give no executor")
        if max_concurrency is None:
            max_concurrency = 256 if self.is_async else 4
        if max_concurrency < 1 or max_queued < 0 or max_queued_bytes < 1:
            raise InvalidArgument("need max_concurrency >= 1, max_queued >= 0, "
                                  "max_queued_bytes >= 1")
        self.host = host
        self.topic_filter = topic_filter
        self.handler = handler
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.offloop_decode_bytes = offloop_decode_bytes
        self.executor = executor
        # a sync handler without an executor runs on this server's own handler threads
        self._threaded = executor is None and not self.is_async
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._done: list[tuple[_Job, InferenceResponse, Any, int]] = []
        self._done_lock = threading.Lock()
        self._heap: list[tuple[int, int, _Job]] = []
        self._seq = itertools.count()
        self._inflight: set[tuple[str, bytes]] = set()
        self._running: set[Any] = set()  # tasks, and jobs on handler threads
        self._admitted = 0  # admitted and not started yet (decoding or queued)
        self._held = 0
        self._stopped = False
        self._warn = Throttled()
        self.answered = self.failed = self.busy = self.expired = 0
        self.refused = self.undecodable = self.duplicates = self.replies_lost = 0
        self.probes = 0

    # -- counters ------------------------------------------------------------------------------

    def stats(self) -> ServeStats:
        return ServeStats(
            queued=self._admitted, running=len(self._running), held_bytes=self._held,
            answered=self.answered, failed=self.failed, busy=self.busy, expired=self.expired,
            refused=self.refused, undecodable=self.undecodable, duplicates=self.duplicates,
            replies_lost=self.replies_lost, probes=self.probes)

    # -- arrival (on the loop) -----------------------------------------------------------------

    def on_message(self, msg: IncomingMessage) -> None:
        ack = msg.ack  # manual_ack: the request's ack is ours (see TransportConfig)
        taken = False
        try:
            taken = self._take(msg)
        finally:
            if not taken and ack is not None:  # refused, answered or dropped: done with it
                ack()

    def _take(self, msg: IncomingMessage) -> bool:
        """Admit a request (True: its ack now travels with it) or answer/drop it (False)."""
        if self._stopped:
            return False
        received = time.monotonic()
        try:
            device, model = topics.parse_request_topic(msg.topic)
        except InvalidArgument:
            if is_probe(msg.payload):  # a shared-subscription probe (see _share): never served
                self.probes += 1
                return False
            self._refuse("topic", "refused a request on %r: not a request topic "
                         "(tandem/v1/req/<device>/<model>)", msg.topic)
            return False
        reply = topics.response_topic(device)
        corr = msg.correlation_data
        payload = msg.payload
        try:
            opened = codec.open_frame(payload, self.limits)  # the envelope, parsed once
            info = opened.info
        except ProtocolError as exc:
            if is_probe(payload):  # a shared-subscription probe (see _share): never served
                self.probes += 1
                return False
            self.undecodable += 1
            if corr is not None and len(corr) == 16:  # MQTT 5: the request id, readable
                self._answer(reply, _error(corr, exc), corr)
            else:
                self._warn.warning("undecodable", "dropped an undecodable request on %s: %s",
                                   msg.topic, exc)
            return False
        if info.type is not codec.MessageType.INFERENCE_REQUEST or info.id is None:
            self.undecodable += 1
            self._warn.warning("type", "dropped a %s on request topic %s", info.type.name,
                               msg.topic)
            return False
        rid = info.id
        if msg.response_topic and msg.response_topic != reply:
            self._refuse("reply", "refused request %s on %s: its ResponseTopic %r is not %r",
                         rid.hex(), msg.topic, msg.response_topic, reply)
            return False
        key = (device, rid)
        if key in self._inflight:
            self.duplicates += 1
            return False
        cost = len(payload) + (info.tensor_bytes if info.compressed else 0)
        too_large = None
        if info.tensor_bytes > self.limits.max_message_bytes:
            too_large = (f"tensors decode to {info.tensor_bytes} bytes "
                         f"(limit {self.limits.max_message_bytes})")
        elif cost > self.max_queued_bytes:
            too_large = (f"request needs {cost} bytes, more than this server holds for all "
                         f"its requests ({self.max_queued_bytes})")
        if too_large is not None:  # refused on the declared sizes: nothing is inflated
            self.undecodable += 1
            self._answer(reply, _error(rid, PayloadTooLarge(too_large)), corr)
            return False
        full = self._admitted >= self.max_queued and len(self._running) >= self.max_concurrency
        if full or self._held + cost > self.max_queued_bytes:
            self.busy += 1
            self._answer(reply, _error(rid, ResourceExhausted(
                f"server busy: {self._admitted} requests queued, {self._held} bytes held "
                f"(limits {self.max_queued}, {self.max_queued_bytes})")), corr)
            return False
        self._admitted += 1
        self._held += cost
        self._inflight.add(key)
        base = (msg.topic, device, model, reply, received, msg.message_expiry_s, corr, cost, key,
                msg.ack)
        if info.compressed and info.tensor_bytes >= self.offloop_decode_bytes:
            self.host._spawn(self._decode_in_thread(payload, rid, base))
            return True
        try:
            request = opened.decode()
            if not isinstance(request, InferenceRequest):  # peek said it was one
                raise MalformedMessage(f"a {type(request).__name__}, not a request")
        except ProtocolError as exc:
            self._undecodable(rid, base, exc)
            return True  # answered (and acknowledged) by _undecodable
        del payload, msg, opened
        self._admit(request, base)
        return True

    async def _decode_in_thread(self, payload: Any, rid: bytes, base: tuple) -> None:
        try:
            request = await self.host._decode_in_thread(payload, self.limits)
            if not isinstance(request, InferenceRequest):  # peek said it was one
                raise MalformedMessage(f"a {type(request).__name__}, not a request")
        except ProtocolError as exc:
            self._undecodable(rid, base, exc)
            return
        except BaseException:
            self._release(base[7], base[8])
            _ack(base[9])
            raise
        del payload
        if self._stopped:
            self._release(base[7], base[8])
            _ack(base[9])
            return
        self._admit(request, base)

    def _undecodable(self, rid: bytes, base: tuple, exc: ProtocolError) -> None:
        self._release(base[7], base[8])
        self.undecodable += 1
        self._answer(base[3], _error(rid, exc), base[6])
        _ack(base[9])

    def _admit(self, request: InferenceRequest, base: tuple) -> None:
        topic, device, model, reply, received, expiry_s, corr, cost, key, ack = base
        if request.reply_topic and request.reply_topic != reply:
            self._release(cost, key)
            _ack(ack)
            self._refuse("reply", "refused request %s on %s: its reply_topic %r is not %r",
                         request.id.hex(), topic, request.reply_topic, reply)
            return
        if request.device_id != device:
            self._release(cost, key)
            _ack(ack)
            self.refused += 1
            self._answer(reply, _error(request.id, PermissionDenied(
                f"request says device {request.device_id!r} but came on {topic!r}")), corr)
            return
        life_s = request.budget_ms / 1000
        if expiry_s is not None:
            life_s = min(life_s, float(expiry_s))
        deadline = None if life_s >= _NO_DEADLINE_S else received + life_s
        ctx = RequestContext(topic=topic, device_id=device, model=model, reply_topic=reply,
                             received_at_s=received, deadline_s=deadline,
                             message_expiry_s=expiry_s, correlation_data=corr,
                             payload_bytes=cost, ack=ack)
        job = _Job(request, ctx, corr, cost, key)
        heapq.heappush(self._heap, (-request.priority, next(self._seq), job))
        self._pump()

    # -- running -------------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._heap and len(self._running) < self.max_concurrency and not self._stopped:
            job = heapq.heappop(self._heap)[2]
            self._admitted -= 1
            if job.ctx.expired:
                self.expired += 1
                self._release(job.cost, job.key)
                self._answer(job.ctx.reply_topic, _error(job.request.id, DeadlineExceeded(
                    "the request's deadline passed before it could start")), job.corr)
                _ack(job.ctx.ack)
                continue
            if self._threaded:
                self._running.add(job)
                self._jobs.put(job)
                if len(self._threads) < len(self._running):
                    thread = threading.Thread(target=self._thread_main, daemon=True,
                                              name="tandem-transport-serve")
                    self._threads.append(thread)
                    thread.start()
                continue
            task = self.host._spawn(self._run(job))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._pump()

    # -- handler threads (a sync handler, no executor) -----------------------------------------

    def _thread_main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._stopped:  # answered UNAVAILABLE by stop()
                continue
            try:
                self._run_in_thread(job)
            except BaseException as exc:  # never lose a job: the loop answers it
                log.error("handler thread failed on request %s", job.request.id.hex(),
                          exc_info=exc)
                self._post(job, _error(job.request.id, HandlerFailed(
                    f"{type(exc).__name__}: {exc}")), None, _FAILED)

    def _run_in_thread(self, job: _Job) -> None:
        """Run the handler and encode its answer, in this handler thread."""
        request, ctx = job.request, job.ctx
        rid = request.id
        started = time.monotonic()
        outcome = _OK
        try:
            if ctx.deadline_s is not None and started >= ctx.deadline_s:
                outcome = _EXPIRED
                raise _ExpiredBeforeStart("the request's deadline passed before a worker was "
                                          "free")
            response = _checked(self.handler(request, ctx), rid)
        except TandemError as exc:
            response = _error(rid, exc)
        except BaseException as exc:  # SystemExit too: answered, the thread survives
            outcome = _FAILED
            log.error("request handler failed on request %s from %s", rid.hex(),
                      ctx.device_id, exc_info=exc)
            response = _error(rid, HandlerFailed(f"{type(exc).__name__}: {exc}"))
        response = _with_timings(response, started, ctx)
        # drop the request (and the packet buffer its RAW tensors view) before encoding
        del request
        job.request = _Stub(rid)  # type: ignore[assignment]
        packets = None
        with contextlib.suppress(TandemError):  # else the loop tries again with _send_reply
            packets = self.host._reply_packets(ctx.reply_topic, response, job.corr)
        self._post(job, response, packets, outcome)

    def _post(self, job: _Job, response: InferenceResponse, packets: Any,
              outcome: int) -> None:
        """Hand a finished job to the loop: one wake-up for all jobs finished meanwhile."""
        with self._done_lock:
            self._done.append((job, response, packets, outcome))
            first = len(self._done) == 1
        if first:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to answer
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for job, response, packets, outcome in done:
            if job not in self._running:  # stop() answered it already
                continue
            self._running.discard(job)
            self._release(job.cost, job.key)
            if outcome == _EXPIRED:
                self.expired += 1
            elif outcome == _FAILED:
                self.failed += 1
            if packets is None:
                self._answer(job.ctx.reply_topic, response, job.corr)
            elif self.host._send_reply_packets(job.ctx.reply_topic, packets[0], packets[1]):
                self.answered += 1
            else:
                self.replies_lost += 1
            _ack(job.ctx.ack)
        self._pump()

    async def _run(self, job: _Job) -> None:
        request, ctx = job.request, job.ctx
        rid = request.id
        started = time.monotonic()
        try:
            try:
                if self.is_async:
                    response = await self.handler(request, ctx)  # type: ignore[misc]
                else:
                    response = await asyncio.get_running_loop().run_in_executor(
                        self.executor, _call_sync, self.handler, request, ctx)
                response = _checked(response, rid)
            except _ExpiredBeforeStart as exc:
                self.expired += 1
                response = _error(rid, exc)
            except asyncio.CancelledError:
                # close(): the request is answered, retryably, rather than left to time out
                self._answer(ctx.reply_topic, _error(rid, Unavailable(
                    "the server closed while the request was running", retryable=True)),
                    job.corr)
                _ack(ctx.ack)
                raise
            except TandemError as exc:
                response = _error(rid, exc)
            except BaseException as exc:  # SystemExit too: answered, the loop survives
                self.failed += 1
                log.error("request handler failed on request %s from %s", rid.hex(),
                          ctx.device_id, exc_info=exc)
                response = _error(rid, HandlerFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            self._release(job.cost, job.key)
        response = _with_timings(response, started, ctx)
        # drop our references to the request (and so to the packet buffer its RAW tensors
        # view) before the response packet is built
        del job, request
        self._answer(ctx.reply_topic, response, ctx.correlation_data)
        _ack(ctx.ack)

    # -- helpers -------------------------------------------------------------------------------

    def _answer(self, reply: str, response: InferenceResponse, corr: bytes | None) -> None:
        if self.host._send_reply(reply, response, corr):
            self.answered += 1
        else:
            self.replies_lost += 1

    def _release(self, cost: int, key: tuple[str, bytes]) -> None:
        self._held -= cost
        self._inflight.discard(key)

    def _refuse(self, kind: str, msg: str, *args: object) -> None:
        self.refused += 1
        self._warn.warning(kind, msg, *args)

    def stop(self) -> None:
        """On close: answer what waits with a retryable UNAVAILABLE, cancel what runs (each is
        answered the same way), shut down the executor this server owns (without waiting for
        a handler that is stuck in it)."""
        if self._stopped:
            return
        self._stopped = True
        while self._heap:
            job = heapq.heappop(self._heap)[2]
            self._admitted -= 1
            self._release(job.cost, job.key)
            self._answer(job.ctx.reply_topic, _error(job.request.id, Unavailable(
                "the server closed before the request could start", retryable=True)), job.corr)
            _ack(job.ctx.ack)
        for running in list(self._running):
            if isinstance(running, _Job):  # on a handler thread: answered now, result dropped
                self._running.discard(running)
                self._release(running.cost, running.key)
                self._answer(running.ctx.reply_topic, _error(running.request.id, Unavailable(
                    "the server closed while the request was running", retryable=True)),
                    running.corr)
                _ack(running.ctx.ack)
            else:
                running.cancel()
        for _ in self._threads:  # threads stuck in a handler leave when it returns
            self._jobs.put(None)
