"""The MQTT transport of the split-execution protocol: paho wrapped behind our own interface.

Two layers, written once in asyncio (``AsyncTransport``) with a thin synchronous shell
(``Transport``, which runs its own event loop in a thread and waits with timeouts):

* **bytes**: ``publish(topic, payload)`` / ``subscribe(filter, handler)``. Payloads over the chunk
  size are split with :func:`tandem.protocol.chunking.split`; everything received passes through one
  :class:`tandem.protocol.chunking.Reassembler` before a handler sees it. Handlers may be sync
  or async;
  they run on the transport's event loop (paho is driven by that loop, no network thread), so a sync
  handler must not block.
* **requests**: ``request(topic, InferenceRequest, timeout)`` → ``InferenceResponse`` and
  ``serve(filter, handler)`` for the answering side.

Behaviour the rest of Tandem relies on:

* **Connection.** MQTT 5 by default, 3.1.1 as an option. TCP_NODELAY on every socket. A lost
  connection is re-established in the background with exponential backoff
  (``reconnect_min_s`` … ``reconnect_max_s``) and every subscription in our own table is sent
  again on each CONNACK — we never rely on the broker's session alone.
* **Publishing while disconnected** raises :class:`Unavailable` at once (no local queue: the
  caller, e.g. the edge daemon, decides between retry, spool and local fallback).
* **A request never hangs past its timeout**: it fails with :class:`DeadlineExceeded` when the
  timeout passes, and with ``Unavailable(retryable=True)`` at once when the connection is lost
  while it is pending (its reply could have been lost with the connection).
* **Error responses raise.** A response whose ``error`` is set is raised as the matching
  :mod:`tandem.protocol.errors` class (``error_from_wire``); ``request`` returns only successful
  responses. Duplicate and late responses (unknown or finished ids) are ignored.
* **Undecodable payloads** (bad chunks, bad msgpack, wrong message type) are logged and dropped;
  they never stop the loop or a server.
* **Persistent sessions.** With a fixed ``client_id`` and ``clean_start=False`` the broker keeps
  the subscriptions and queues QoS 1 messages while the client is away, and delivers them right
  after the next CONNACK, before the application can subscribe again. A message that matches no
  handler is therefore held (at most ``UNCLAIMED_MAX`` messages, ``UNCLAIMED_TTL_S`` seconds) and
  handed to the first handler subscribed for it.
* On MQTT 5 a request also carries ResponseTopic, CorrelationData (= request id),
  MessageExpiryInterval (= ceil(budget_ms / 1000) s) and ContentType
  ``application/x-tandem+msgpack``; ``serve`` replies to the request's ``reply_topic`` (or the
  ResponseTopic property) with the correlation data copied back.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import inspect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from tandem.protocol import chunking, codec, topics
from tandem.protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    ProtocolError,
    TandemError,
    Unavailable,
    error_from_wire,
)
from tandem.protocol.messages import ErrorInfo, InferenceRequest, InferenceResponse, Message
from tandem.protocol.mqtt._client import Frame, MqttClient
from tandem.protocol.mqtt._config import (
    CONTENT_TYPE,
    DEFAULT_MAX_PAYLOAD_V311,
    IncomingMessage,
    PublishProperties,
    TlsConfig,
    TransportConfig,
    Will,
)

__all__ = [
    "CONTENT_TYPE",
    "AsyncTransport",
    "Handler",
    "IncomingMessage",
    "PublishProperties",
    "RequestHandler",
    "TlsConfig",
    "Transport",
    "TransportConfig",
    "Will",
    "topic_matches",
]

log = logging.getLogger("tandem.protocol.mqtt.transport")

Handler = Callable[[IncomingMessage], "Awaitable[None] | None"]
RequestHandler = Callable[[InferenceRequest], "Awaitable[InferenceResponse] | InferenceResponse"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

# Room left in a packet for the fixed header, topic and properties when the broker announces a
# Maximum Packet Size (MQTT 5): the chunk size is capped at that size minus this.
_PACKET_OVERHEAD = 1024


def _takes_views(fn: _F) -> _F:
    """Mark one of our own handlers as accepting a payload that is a view (see _dispatch)."""
    fn._tandem_takes_views = True  # type: ignore[attr-defined]
    return fn


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+``, ``#``, ``$share/<group>/`` prefix, ``$`` topics)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        topic_filter = parts[2] if len(parts) == 3 else ""
    f = topic_filter.split("/")
    t = topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


UNCLAIMED_MAX = 1024  # messages held for a handler not subscribed yet
UNCLAIMED_TTL_S = 60.0


class AsyncTransport:
    """The asyncio core. Create it anywhere; :meth:`connect` binds it to the running loop.

    ``reply_topic`` is where this transport receives responses; by default
    ``topics.response_topic(request.device_id)`` of the first request that leaves it empty.
    """

    def __init__(self, config: TransportConfig, *, reply_topic: str | None = None) -> None:
        self.config = config
        self.reply_topic = reply_topic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mqtt: MqttClient | None = None
        self._handlers: dict[str, Handler] = {}
        # (arrival time, message) that matched no handler: a persistent session's backlog
        self._unclaimed: collections.deque[tuple[float, IncomingMessage]] = collections.deque(
            maxlen=UNCLAIMED_MAX)
        self._pending: dict[bytes, asyncio.Future[InferenceResponse]] = {}
        self._reply_subscribed: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._ready = asyncio.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._reassembler = chunking.Reassembler(
            timeout_s=config.reassembly_timeout_s, max_total_bytes=config.max_message_bytes
        )
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is up (it may be lost at any moment)."""
        return self._mqtt is not None and self._mqtt.connected

    @property
    def client_id(self) -> str:
        return self._mqtt.client_id if self._mqtt else self.config.client_id

    async def connect(self) -> None:
        """Connect and wait for the broker (at most ``connect_timeout_s``).

        Raises Unavailable (unreachable, refused, timed out) or PermissionDenied (credentials,
        TLS certificate). After this, connection losses are repaired in the background."""
        if self._mqtt is not None:
            raise FailedPrecondition("transport already connected (or closed)")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._mqtt = MqttClient(self.config, self._loop, on_message=self._on_raw_message,
                                on_connection=self._connection_changed)
        await self._mqtt.connect()

    async def close(self) -> None:
        """Disconnect, fail pending requests with Unavailable, stop every thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending(Unavailable("transport closed", retryable=True))
        if self._mqtt is not None:
            await self._mqtt.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> AsyncTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(True)`` on this loop whenever a connection is ready (connected and
        re-subscribed) and ``listener(False)`` whenever it is lost."""
        self._listeners.append(listener)

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected and re-subscribed, or raise DeadlineExceeded."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"not connected to the broker within {timeout:g}s") from None

    # -- bytes ---------------------------------------------------------------------------------

    def _client(self) -> MqttClient:
        if self._mqtt is None or self._closed:
            raise FailedPrecondition("transport is not connected (call connect()) or is closed")
        return self._mqtt

    def chunk_size(self) -> int:
        """Largest payload sent as one PUBLISH (config, capped by the broker's packet limit)."""
        mqtt = self._mqtt
        if mqtt is None:
            return self.config.max_payload_bytes or DEFAULT_MAX_PAYLOAD_V311
        size = mqtt.max_payload_bytes
        broker_max = mqtt.broker_max_packet
        if broker_max:
            size = min(size, max(1024, broker_max - _PACKET_OVERHEAD))
        return size

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int | None = None,
        retain: bool = False,
        properties: PublishProperties | None = None,
    ) -> None:
        """Send ``payload`` (chunked when larger than :meth:`chunk_size`). Returns once handed
        to the MQTT client; raises Unavailable at once while disconnected."""
        self._publish_now(topic, payload, qos, retain, properties)

    def _publish_now(self, topic, payload, qos, retain, properties) -> None:
        mqtt = self._client()
        qos = self.config.qos if qos is None else qos
        if len(payload) > self.config.max_message_bytes:
            raise InvalidArgument(f"payload of {len(payload)} bytes exceeds max_message_bytes "
                                  f"({self.config.max_message_bytes})")
        # a fresh chunk-set id per publish: a retried request (same request id) must not look
        # like a duplicate of a set the receiver already completed
        pieces = chunking.split(payload, self.chunk_size())
        if len(pieces) > 1 and retain:
            raise InvalidArgument("a retained message must fit in one chunk")
        for piece in pieces:
            mqtt.publish(topic, piece, qos, retain, properties)

    def _frame(self, topic: str, message: Message, qos: int | None,
               properties: PublishProperties | None) -> Frame | bytes:
        """``message`` encoded for :meth:`_send`: a :class:`Frame` (the PUBLISH packet built
        around the encoded message, each tensor copied once, straight into it) when it travels
        as one PUBLISH, else the encoded bytes (to be chunked). Raises InvalidArgument (the
        codec's checks) and FailedPrecondition. Safe from any thread."""
        parts, total = codec.encode_parts(message)
        mqtt = self._client()
        if total > self.chunk_size() or total > self.config.max_message_bytes:
            return b"".join(parts)
        return mqtt.frame(topic, parts, total, self.config.qos if qos is None else qos,
                          properties)

    def _send(self, topic: str, payload: Frame | bytes, qos: int | None, retain: bool,
              properties: PublishProperties | None) -> None:
        """Publish what :meth:`_frame` built (on the loop)."""
        if type(payload) is Frame:
            self._client().publish_frame(payload, retain)
        else:
            self._publish_now(topic, payload, qos, retain, properties)

    async def subscribe(self, topic_filter: str, handler: Handler, *,
                        qos: int | None = None) -> None:
        """Call ``handler(IncomingMessage)`` (sync or async, on this loop) for every message
        matching ``topic_filter``; waits for the SUBACK. The subscription survives reconnects.
        A second subscribe to the same filter replaces its handler. A message matching several
        filters goes to each of their handlers."""
        mqtt = self._client()
        self._handlers[topic_filter] = handler
        loop = asyncio.get_running_loop()
        done: asyncio.Future[TandemError | None] = loop.create_future()

        mqtt.subscribe(topic_filter, self.config.qos if qos is None else qos,
                       lambda err: _set_result_if_pending(done, err))
        try:
            err = await asyncio.wait_for(done, self.config.connect_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no SUBACK for {topic_filter!r} within "
                                   f"{self.config.connect_timeout_s:g}s") from None
        if err is not None:
            self._handlers.pop(topic_filter, None)
            with contextlib.suppress(TandemError):
                mqtt.unsubscribe(topic_filter, lambda: None)
            raise err
        self._claim(topic_filter)

    def _claim(self, topic_filter: str) -> None:
        """Hand the held messages that match ``topic_filter`` to its (new) handler, in order."""
        if not self._unclaimed:
            return
        horizon = time.monotonic() - UNCLAIMED_TTL_S
        keep: list[tuple[float, IncomingMessage]] = []
        claimed: list[IncomingMessage] = []
        for at, msg in self._unclaimed:
            if at < horizon:
                continue
            if topic_matches(topic_filter, msg.topic):
                claimed.append(msg)
            else:
                keep.append((at, msg))
        self._unclaimed.clear()
        self._unclaimed.extend(keep)
        for msg in claimed:
            self._dispatch(msg)

    async def unsubscribe(self, topic_filter: str) -> None:
        mqtt = self._client()
        self._handlers.pop(topic_filter, None)
        self._reply_subscribed.discard(topic_filter)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        mqtt.unsubscribe(topic_filter, lambda: _set_result_if_pending(done, None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done, self.config.connect_timeout_s)

    # -- typed messages ------------------------------------------------------------------------

    async def publish_message(self, topic: str, message: Message, *, qos: int | None = None,
                              retain: bool = False) -> None:
        """Encode a protocol message (``tandem.protocol.codec``) and publish it."""
        props = PublishProperties()
        self._send(topic, self._frame(topic, message, qos, props), qos, retain, props)

    async def request(self, topic: str, request: InferenceRequest,
                      timeout: float | None = None) -> InferenceResponse:
        """Publish ``request`` to ``topic`` and wait for its response.

        ``timeout`` defaults to the request's budget. Empty ``request.reply_topic`` is filled
        with this transport's reply topic. Returns a successful response; raises the peer's
        error (``error_from_wire``), DeadlineExceeded when the timeout passes, Unavailable when
        not connected or when the connection is lost while waiting."""
        if timeout is None:
            timeout = request.budget_ms / 1000
        if timeout <= 0:
            raise DeadlineExceeded("request budget already spent")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reply = request.reply_topic or self.reply_topic or topics.response_topic(
            request.device_id)
        if reply != request.reply_topic:
            request = dataclasses.replace(request, reply_topic=reply)
        if reply not in self._reply_subscribed:
            try:
                await asyncio.wait_for(self.subscribe(reply, self._on_response), timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"could not subscribe to {reply!r} within "
                                       f"{timeout:g}s") from None
            self._reply_subscribed.add(reply)
        if request.id in self._pending:
            raise InvalidArgument(f"request {request.id.hex()} is already pending")
        props = PublishProperties(response_topic=reply, correlation_data=request.id,
                                  message_expiry_s=max(1, math.ceil(request.budget_ms / 1000)))
        payload = self._frame(topic, request, None, props)
        future: asyncio.Future[InferenceResponse] = loop.create_future()
        self._pending[request.id] = future
        # a timer on the future itself (no wait_for task per request: this is the hot path)
        timer = loop.call_at(deadline, _expire, future, DeadlineExceeded(
            f"no response to request {request.id.hex()} on {topic!r} within {timeout:g}s"))
        try:
            self._send(topic, payload, None, False, props)
            del payload  # paho holds the packet until its PUBACK; we need it no longer
            response = await future
        finally:
            timer.cancel()
            if self._pending.get(request.id) is future:
                del self._pending[request.id]
        if response.error is not None:
            e = response.error
            raise error_from_wire(int(e.code), e.message, e.retryable)
        return response

    def _start_request(self, topic: str, request_id: bytes, payload: Frame | bytes,
                       props: PublishProperties, waiter: _SyncWaiter) -> None:
        """On the loop, for :meth:`Transport.request`'s fast path: register and publish."""
        try:
            if request_id in self._pending:
                raise InvalidArgument(f"request {request_id.hex()} is already pending")
            self._client()
            self._pending[request_id] = waiter  # type: ignore[assignment]
            try:
                self._send(topic, payload, None, False, props)
            except BaseException:
                self._forget_pending(request_id, waiter)
                raise
        except TandemError as exc:
            waiter.set_exception(exc)
        except Exception as exc:
            waiter.set_exception(InternalError(f"{type(exc).__name__}: {exc}"))

    def _forget_pending(self, request_id: bytes, waiter: object) -> None:
        if self._pending.get(request_id) is waiter:
            del self._pending[request_id]

    @_takes_views
    def _on_response(self, msg: IncomingMessage) -> None:
        response = _decode_as(msg, InferenceResponse, "reply")
        if response is None:
            return
        # popped here: the sync fast path's waiter has no ``finally`` of its own to do it
        future = self._pending.pop(response.id, None)
        if future is None or future.done():
            log.debug("ignored late or duplicate response %s", response.id.hex())
            return
        future.set_result(response)

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, topic_filter: str, handler: RequestHandler, *,
                    qos: int | None = None) -> None:
        """Answer every InferenceRequest on ``topic_filter`` with ``handler(request)``.

        An async handler runs on this loop; a sync one in this transport's worker threads
        (blocking inference never runs on the loop). The response goes to the request's
        ``reply_topic`` (or its MQTT 5 ResponseTopic) with the correlation data copied back. A
        handler raising a TandemError answers with that error; any other exception answers
        INTERNAL. Undecodable requests are logged and dropped."""
        is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            type(handler).__call__)

        @_takes_views
        def on_request(msg: IncomingMessage) -> None:
            request = _decode_as(msg, InferenceRequest, "request")
            if request is not None:
                self._run_inline(self._answer(msg, request, handler, is_async))

        await self.subscribe(topic_filter, on_request, qos=qos)

    async def _answer(self, msg: IncomingMessage, request: InferenceRequest,
                      handler: RequestHandler, is_async: bool) -> None:
        reply = request.reply_topic or msg.response_topic
        if not reply:
            log.warning("request %s on %s has no reply topic; dropped", request.id.hex(),
                        msg.topic)
            return
        try:
            if is_async:
                response = await handler(request)  # type: ignore[misc]
            else:
                response = await asyncio.get_running_loop().run_in_executor(
                    self._worker_pool(), handler, request)
            if not isinstance(response, InferenceResponse):
                raise InternalError(f"request handler returned {type(response).__name__}, "
                                    "not InferenceResponse")
        except TandemError as exc:
            response = _error_response(request, exc)
        except Exception as exc:
            log.exception("request handler failed on %s", request.id.hex())
            response = _error_response(request, InternalError(f"{type(exc).__name__}: {exc}"))
        # only the correlation data: each MQTT 5 property costs the receiver's paho time
        props = PublishProperties(correlation_data=msg.correlation_data or request.id,
                                  content_type=None)
        request_id = request.id
        # drop our references to the request (and so to the packet buffer its RAW tensors
        # view) before the response packet is built; a handler that ran inline is still
        # referenced up the stack, one that suspended is not
        del msg, request
        try:
            frame = self._frame(reply, response, None, props)
            del response  # the frame holds a copy of its tensors
            self._send(reply, frame, None, False, props)
        except TandemError as exc:
            log.warning("could not send the response to %s: %s", request_id.hex(), exc)

    def _worker_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="tandem-transport-worker")
        return self._executor

    # -- from the MQTT client (on the loop) -----------------------------------------------------

    def _on_raw_message(self, msg: IncomingMessage) -> None:
        try:
            payload = self._reassembler.feed(msg.payload, origin=msg.topic)
        except ProtocolError as exc:
            log.warning("dropped a bad chunk on %s: %s", msg.topic, exc)
            return
        if payload is None:
            return
        if payload is not msg.payload:
            msg = dataclasses.replace(msg, payload=payload)
        self._dispatch(msg)

    def _dispatch(self, msg: IncomingMessage) -> None:
        """Hand ``msg`` to every matching handler. A big payload arrives as a view of its
        packet buffer (or a reassembled bytearray): our own request/response handlers decode
        it in place (RAW tensors stay views of that buffer, which is never reused), every
        other handler gets immutable bytes, as documented."""
        as_bytes: IncomingMessage | None = msg if type(msg.payload) is bytes else None
        matched = False
        for topic_filter, handler in list(self._handlers.items()):
            if not topic_matches(topic_filter, msg.topic):
                continue
            matched = True
            given = msg
            if not getattr(handler, "_tandem_takes_views", False):
                if as_bytes is None:
                    as_bytes = dataclasses.replace(msg, payload=bytes(msg.payload))
                given = as_bytes
            try:
                result = handler(given)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                log.exception("handler for %r failed on a message from %s", topic_filter,
                              msg.topic)
        if not matched:  # e.g. a persistent session's backlog, delivered before subscribe()
            if as_bytes is None:
                as_bytes = dataclasses.replace(msg, payload=bytes(msg.payload))
            self._unclaimed.append((time.monotonic(), as_bytes))

    def _connection_changed(self, connected: bool, reason: str) -> None:
        if connected:
            self._ready.set()
        else:
            self._ready.clear()
            self._fail_pending(Unavailable(f"broker {reason}; the response may be lost",
                                           retryable=True))
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:
                log.exception("connection listener %r failed", listener)

    def _fail_pending(self, error: TandemError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _run_inline(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` now, on this loop, up to its first real suspension; only a coroutine
        that does suspend (a sync handler in the worker pool, an async handler that awaits
        I/O) costs a task, which takes over from where it stopped. An async handler that
        answers without suspending costs no task and no extra loop iteration."""
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        except Exception:
            log.exception("transport task failed")
            return
        self._spawn(_resume(coro, yielded))

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("transport task failed", exc_info=task.exception())


class _Suspend:
    """Awaiting it yields ``value`` (what a coroutine yielded to its task) to the current task,
    and returns what the task sends back."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):  # type: ignore[no-untyped-def]
        return (yield self.value)


async def _resume(coro: Coroutine[Any, Any, _T], yielded: Any) -> _T:
    """Drive ``coro`` (already started by :meth:`AsyncTransport._run_inline`, suspended on
    ``yielded``) to its end inside the current task: sent values and thrown exceptions
    (cancellation included) are forwarded to it."""
    while True:
        try:
            sent = await _Suspend(yielded)
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(sent)
        except StopIteration as stop:
            return stop.value


def _decode_as(msg: IncomingMessage, cls: type[_T], what: str) -> _T | None:
    """The ``cls`` message in ``msg``, or None (logged) for anything else: bad bytes never
    stop a handler."""
    try:
        decoded = codec.decode(msg.payload)
    except ProtocolError as exc:
        log.warning("dropped undecodable message on %s topic %s: %s", what, msg.topic, exc)
        return None
    if not isinstance(decoded, cls):
        log.warning("dropped %s on %s topic %s", type(decoded).__name__, what, msg.topic)
        return None
    return decoded


class _SyncWaiter:
    """A pending request's slot for a thread that is not the loop's: the part of the
    ``asyncio.Future`` interface ``_on_response`` / ``_fail_pending`` use, on a bare lock."""

    __slots__ = ("_lock", "error", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.value: InferenceResponse | None = None
        self.error: TandemError | None = None

    def done(self) -> bool:
        return self.value is not None or self.error is not None

    def set_result(self, value: InferenceResponse) -> None:
        if not self.done():
            self.value = value
            self._lock.release()

    def set_exception(self, error: TandemError) -> None:
        if not self.done():
            self.error = error
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)


def _expire(future: asyncio.Future, error: TandemError) -> None:
    if not future.done():
        future.set_exception(error)


def _set_result_if_pending(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _error_response(request: InferenceRequest, exc: TandemError) -> InferenceResponse:
    return InferenceResponse(
        id=request.id, error=ErrorInfo(exc.code, exc.message, exc.retryable))


class Transport:
    """Synchronous shell over :class:`AsyncTransport`: runs its own event loop in a thread
    (``tandem-transport-loop``) and waits for each call with a timeout, raising
    DeadlineExceeded when it passes. Handlers run on that loop thread."""

    def __init__(self, config: TransportConfig, *, reply_topic: str | None = None,
                 call_timeout_s: float = 10.0) -> None:
        self.config = config
        self.call_timeout_s = call_timeout_s
        self._async = AsyncTransport(config, reply_topic=reply_topic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def async_transport(self) -> AsyncTransport:
        return self._async

    @property
    def connected(self) -> bool:
        return self._async.connected

    def connect(self) -> None:
        if self._thread is not None:
            raise FailedPrecondition("transport already connected (or closed)")
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="tandem-transport-loop", daemon=True)
        self._thread.start()
        started.wait()
        try:
            self._call(self._async.connect(), self.config.connect_timeout_s + 1.0, "connect")
        except BaseException:
            self.close()
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect and stop the loop thread (waits for it). Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        try:
            if thread.is_alive():
                self._call(self._async.close(), timeout, "close")
                # the connect/reconnect executor threads end with the transport
                self._call(loop.shutdown_default_executor(), timeout, "close")
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
                if not thread.is_alive():
                    loop.close()

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise FailedPrecondition("transport is not connected (call connect()) or is closed")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"transport {what} did not finish within {timeout:g}s") \
                from None

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(connected)`` runs on the transport's loop thread: it must not block."""
        self._async.add_connection_listener(listener)

    def wait_connected(self, timeout: float) -> None:
        self._call(self._async.wait_connected(timeout), timeout + 1.0, "wait_connected")

    def publish(self, topic: str, payload: bytes, *, qos: int | None = None,
                retain: bool = False, properties: PublishProperties | None = None) -> None:
        self._call(self._async.publish(topic, payload, qos=qos, retain=retain,
                                       properties=properties), self.call_timeout_s, "publish")

    def publish_message(self, topic: str, message: Message, *, qos: int | None = None,
                        retain: bool = False) -> None:
        self._call(self._async.publish_message(topic, message, qos=qos, retain=retain),
                   self.call_timeout_s, "publish")

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int | None = None) -> None:
        """``handler`` runs on the transport's loop thread: it must not block."""
        self._call(self._async.subscribe(topic_filter, handler, qos=qos),
                   self.config.connect_timeout_s + 1.0, "subscribe")

    def unsubscribe(self, topic_filter: str) -> None:
        self._call(self._async.unsubscribe(topic_filter), self.config.connect_timeout_s + 1.0,
                   "unsubscribe")

    def request(self, topic: str, request: InferenceRequest,
                timeout: float | None = None) -> InferenceResponse:
        """Same contract as :meth:`AsyncTransport.request`.

        Once the reply topic is subscribed, a request takes a fast path: it is encoded in the
        caller's thread, handed to the loop with one ``call_soon_threadsafe`` (register + publish,
        no task, no coroutine) and the caller waits on a lock that the response releases — one
        wake-up each way, like a raw paho client with its network thread."""
        if timeout is None:
            timeout = request.budget_ms / 1000
        core, loop = self._async, self._loop
        reply = request.reply_topic or core.reply_topic or topics.response_topic(
            request.device_id)
        if timeout <= 0 or loop is None or reply not in core._reply_subscribed:
            # the core enforces ``timeout``; the extra second only guards against a stuck loop
            return self._call(core.request(topic, request, timeout), max(timeout, 0) + 1.0,
                              "request")
        if reply != request.reply_topic:
            request = dataclasses.replace(request, reply_topic=reply)
        props = PublishProperties(response_topic=reply, correlation_data=request.id,
                                  message_expiry_s=max(1, math.ceil(request.budget_ms / 1000)))
        payload = core._frame(topic, request, None, props)  # the copy, in the caller's thread
        waiter = _SyncWaiter()
        try:
            loop.call_soon_threadsafe(core._start_request, topic, request.id, payload, props,
                                      waiter)
        except RuntimeError:  # loop closed
            raise FailedPrecondition("transport is not connected (call connect()) or is "
                                     "closed") from None
        del payload  # paho holds the packet until its PUBACK
        if not waiter.wait(timeout):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(core._forget_pending, request.id, waiter)
            raise DeadlineExceeded(
                f"no response to request {request.id.hex()} on {topic!r} within {timeout:g}s")
        if waiter.error is not None:
            raise waiter.error
        response = waiter.value
        assert response is not None
        if response.error is not None:
            e = response.error
            raise error_from_wire(int(e.code), e.message, e.retryable)
        return response

    def serve(self, topic_filter: str, handler: RequestHandler, *,
              qos: int | None = None) -> None:
        self._call(self._async.serve(topic_filter, handler, qos=qos),
                   self.config.connect_timeout_s + 1.0, "serve")
