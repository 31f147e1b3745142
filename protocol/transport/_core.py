"""The :class:`Transport` interface and everything every transport does the same way.

A transport implementation (MQTT in :mod:`tandem.protocol.mqtt`, in-memory in
:mod:`._memory`, NATS later) provides only the link: connect and close, build and send one
packet, subscribe and unsubscribe a filter, and report what arrives (``_deliver``) and when the
link comes and goes (``_link_changed``). Requests, replies, serving, chunking, limits, the
persistent-session backlog and the statistics are written once, here, so every transport keeps
the same semantics and one contract test suite holds them all to it.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import inspect
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from tandem.protocol import chunking, codec, topics
from tandem.protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    PayloadTooLarge,
    ProtocolError,
    TandemError,
    Unavailable,
    error_from_wire,
)
from tandem.protocol.messages import ErrorInfo, InferenceRequest, InferenceResponse, Message
from tandem.protocol.transport._config import (
    IncomingMessage,
    PublishProperties,
    TransportConfig,
    expiry_for_budget,
)
from tandem.protocol.transport._log import Throttled, log
from tandem.protocol.transport._serve import (
    RequestHandler,
    Server,
    ServeStats,
    is_async_callable,
)
from tandem.protocol.transport._share import confirm_delivery, explain_refusal, is_shared
from tandem.protocol.transport._topics import check_filter, check_topic, topic_matches

__all__ = ["Handler", "PublishHandle", "RefusalHandler", "Transport", "TransportStats"]

Handler = Callable[[IncomingMessage], "Awaitable[None] | None"]
RefusalHandler = Callable[[TandemError], None]
Buffer = bytes | bytearray | memoryview

OFFLOOP_DECODE_BYTES = 1 << 20
"""Compressed tensors that inflate to this many bytes or more are decoded in a thread."""

_NAGLE_SMALL_BYTES = 16 * 1024  # requests this small should take about one network round trip
_NAGLE_WINDOW = 16
_NAGLE_MIN_S = 0.035  # Linux's delayed ACK is 40 ms: Nagle + delayed ACK look like 40-50 ms
_NAGLE_MAX_S = 0.25


@dataclasses.dataclass(frozen=True, slots=True)
class TransportStats:
    """A snapshot of what a transport holds and has counted (see :meth:`Transport.stats`)."""

    connected: bool
    pending_requests: int  # requests waiting for their response
    unacked_publishes: int  # QoS > 0 publishes the broker has not acknowledged yet
    unclaimed_messages: int  # held for a handler not subscribed yet (persistent sessions)
    unclaimed_bytes: int
    reassembly_sets: int  # incomplete chunk sets
    reassembly_bytes: int
    chunk_sets_expired: int
    dropped_messages: int  # undecodable, malformed chunks, wrong type, over a limit
    late_responses: int  # responses for no pending request (duplicates, after a timeout)
    refused_subscriptions: int  # filters the broker refused on a re-subscribe (dropped)
    serving: Mapping[str, ServeStats]  # by the filter given to serve()


class PublishHandle:
    """What :meth:`Transport.publish` returns once the message is handed to the link.

    ``await handle`` (on the transport's loop) or ``handle.wait(timeout_s)`` (from any other
    thread) returns when the broker has acknowledged every packet of the message (PUBACK for
    QoS 1, PUBCOMP for QoS 2; at once for QoS 0) and raises the error otherwise: Unavailable
    when the connection was lost first (the client may still deliver it after reconnecting),
    PermissionDenied when the broker refused it. Not awaiting it is fine."""

    __slots__ = ("_future", "_loop", "topic")

    def __init__(self, loop: asyncio.AbstractEventLoop, topic: str,
                 acks: Sequence[asyncio.Future | None]) -> None:
        self._loop = loop
        self.topic = topic
        pending = [a for a in acks if a is not None]
        self._future: asyncio.Future | None = None
        if len(pending) == 1:
            self._future = pending[0]
        elif pending:
            self._future = asyncio.gather(*pending)

    def done(self) -> bool:
        return self._future is None or self._future.done()

    async def _result(self) -> None:
        if self._future is None:
            return
        outcome = await asyncio.shield(self._future)
        for err in outcome if isinstance(outcome, list) else [outcome]:
            if err is not None:
                raise err

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._result().__await__()

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until acknowledged (from a thread that is not the loop's); DeadlineExceeded
        after ``timeout_s``."""
        if self._future is None:
            return
        if _running_loop() is self._loop:
            raise FailedPrecondition("PublishHandle.wait() on the transport's loop: await it")
        future = asyncio.run_coroutine_threadsafe(self._result(), self._loop)
        try:
            future.result(_wait_timeout(timeout_s))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no acknowledgement for the publish to {self.topic!r} "
                                   f"within {timeout_s:g}s") from None


class _Subscription:
    __slots__ = ("handler", "is_async", "on_refused", "takes_acks", "takes_views")

    def __init__(self, handler: Callable[[IncomingMessage], Any], takes_views: bool,
                 on_refused: RefusalHandler | None = None, takes_acks: bool = False) -> None:
        self.handler = handler
        self.takes_views = takes_views  # our own handlers decode views in place
        self.takes_acks = takes_acks  # serve(): acknowledges (manual_ack) when it starts one
        self.is_async = is_async_callable(handler)
        self.on_refused = on_refused  # told when the broker refuses it on a re-subscribe


class _Pending:
    __slots__ = ("future", "small", "started_s", "timer")

    def __init__(self, future: Any, timer: asyncio.TimerHandle, started_s: float,
                 small: bool) -> None:
        self.future = future  # asyncio.Future or concurrent.futures.Future
        self.timer = timer
        self.started_s = started_s
        self.small = small


@dataclasses.dataclass(slots=True)
class _Prepared:
    """A request encoded and ready to start (built in the caller's thread if need be)."""

    request_id: bytes
    topic: str
    reply: str
    packets: list[Any]
    props: PublishProperties
    qos: int
    deadline_s: float  # time.monotonic()
    timeout_s: float
    small: bool


class Transport(abc.ABC):
    """The transport interface: publish/subscribe bytes and protocol messages, make requests,
    serve them. Every method is a coroutine (or plain function) for the transport's own event
    loop, the one :meth:`connect` ran on, except where it says *thread-safe*; from other threads
    use :class:`~tandem.protocol.transport.SyncTransport` or :meth:`request_threadsafe`.

    Semantics every transport keeps (the contract tests check them all):

    * **Connection.** :meth:`connect` waits until the link is up (``connect_timeout_s``) and
      raises Unavailable or PermissionDenied. Afterwards a lost link is re-established in the
      background and every subscription is sent again; listeners hear ``False``/``True``.
      Publishing while disconnected raises Unavailable at once (no local queue).
    * **Topics** are checked before anything is sent (:mod:`._topics`): a topic or filter a
      broker would call malformed is InvalidArgument for that call, never a reconnect loop.
      A filter the broker refuses fails the ``subscribe`` call and is not kept; one it refuses
      on a re-subscribe is dropped and its owner's ``on_refused`` hears why.
    * **Shared subscriptions** (``$share/<group>/…``) are checked where a broker may accept
      them and deliver nothing (MQTT): ``serve`` confirms delivery with a probe first
      (:mod:`._share`).
    * **Requests** never hang past their timeout (DeadlineExceeded), fail at once with a
      retryable Unavailable when the link drops while they wait, and raise the peer's error
      (``error_from_wire``) for an error response. Responses for no pending request are
      counted and not decoded.
    * **Chunking**: messages over :meth:`chunk_size` travel as chunk frames and are
      reassembled per (topic, set); incomplete sets expire on a timer.
    * **Limits**: ``config.limits`` bounds what is decoded, sent and reassembled; ``serve``
      adds per-handler limits, a queue and a byte budget (see :mod:`._serve`).
    * **Bad input** (undecodable frames, bad chunks, wrong message types) is counted in
      :meth:`stats`, logged at a bounded rate and dropped; it never stops the loop.
    """

    def __init__(self, config: TransportConfig) -> None:
        if not isinstance(config, TransportConfig):
            raise InvalidArgument(f"config must be a TransportConfig, not {type(config)}")
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # new → open → closing → closed
        self._subs: dict[str, _Subscription] = {}
        self._servers: dict[str, Server] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._reply_subscribed: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._ready: asyncio.Event | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._unclaimed: collections.deque[tuple[float, IncomingMessage, int]] = \
            collections.deque()
        self._unclaimed_bytes = 0
        # one topic (device) may hold one message of the limit in chunks (and their
        # bookkeeping, for chunks of 48 KiB and up); all of them together two, by default
        limit = config.limits.max_message_bytes
        per_origin = limit + limit // 64 + 64 * 1024
        total = config.max_reassembly_bytes or 2 * per_origin
        self._reassembler = chunking.Reassembler(
            timeout_s=config.reassembly_timeout_s, max_total_bytes=total,
            max_bytes_per_origin=min(per_origin, total))
        self._reassembly_timer: asyncio.TimerHandle | None = None
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._dropped = 0
        self._late = 0
        self._refused_subscriptions = 0
        self._warn = Throttled()
        self._nagle: collections.deque[float] = collections.deque(maxlen=_NAGLE_WINDOW)
        self._nagle_warned = False

    # == what an implementation provides ========================================================

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the link to the broker is up (it may be lost at any moment)."""

    @property
    @abc.abstractmethod
    def client_id(self) -> str:
        """This client's id on the broker."""

    @abc.abstractmethod
    def chunk_size(self) -> int:
        """Largest payload sent as one packet (config, capped by what the broker allows)."""

    @abc.abstractmethod
    async def _connect_impl(self) -> None:
        """Open the link and return once it is up; raise Unavailable / PermissionDenied."""

    @abc.abstractmethod
    async def _close_impl(self, timeout_s: float) -> None:
        """Close the link (cleanly: no last will), within ``timeout_s``; never raise."""

    @abc.abstractmethod
    def _packet(self, topic: str, parts: Sequence[Buffer], total: int, qos: int,
                props: PublishProperties | None) -> Any:
        """Build one packet for ``parts`` (``total`` bytes, at most :meth:`chunk_size`).
        Thread-safe: the sync request path builds packets in the caller's thread."""

    @abc.abstractmethod
    def _send_packet(self, packet: Any, topic: str, qos: int, retain: bool,
                     props: PublishProperties | None,
                     want_ack: bool) -> asyncio.Future | None:
        """Send a packet from :meth:`_packet`; raise Unavailable while disconnected. With
        ``want_ack``, return a future whose *result* is None once the broker acknowledged it,
        or the TandemError that stopped it (never an exception: nobody may await it)."""

    @abc.abstractmethod
    def _subscribe_impl(self, topic_filter: str, qos: int) -> asyncio.Future:
        """Add a filter to the link's table (kept across reconnects) and subscribe; the future's
        result is None or the TandemError the broker answered (then it is not kept)."""

    @abc.abstractmethod
    def _unsubscribe_impl(self, topic_filter: str) -> asyncio.Future:
        """Remove a filter from the table and unsubscribe; the future completes when done."""

    # whether a $share/ filter may be accepted and never deliver (MQTT brokers): serve() then
    # confirms delivery with a probe (see _share)
    _checks_shared_subscriptions = False

    def _unacked_count(self) -> int:
        return 0

    def _link_rtt_s(self) -> float | None:
        """A network round trip to the broker measured without our traffic (or None)."""
        return None

    # == lifecycle ==============================================================================

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this transport runs on (None before :meth:`connect`)."""
        return self._loop

    async def connect(self) -> None:
        """Bind to the running loop and connect (at most ``connect_timeout_s``). Raises
        Unavailable (unreachable, refused, timed out) or PermissionDenied (credentials, TLS).
        A transport connects once; after a failure or :meth:`close`, make a new one."""
        if self._state != "new":
            raise FailedPrecondition("transport already connected (or closed)")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._state = "open"
        try:
            await self._connect_impl()
        except BaseException:
            self._state = "closed"
            raise

    async def close(self, timeout_s: float = 10.0) -> None:
        """Answer what is being served with a retryable UNAVAILABLE, fail pending requests with
        Unavailable, disconnect cleanly (no last will), within ``timeout_s``. Idempotent; never
        raises; a handler stuck in a thread is left behind, not waited for."""
        if self._state in ("closing", "closed"):
            return
        was_open = self._state == "open"
        self._state = "closing"  # new calls are refused; answers may still go out
        deadline = time.monotonic() + timeout_s
        for server in list(self._servers.values()):
            server.stop()
        self._fail_pending(Unavailable("transport closed", retryable=True))
        if self._tasks:  # cancelled handlers send their answers before the link closes
            await asyncio.wait(list(self._tasks), timeout=max(0.0, _left(deadline) / 2))
        if was_open:
            await self._close_impl(max(0.0, _left(deadline)))
        self._state = "closed"
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, min(1.0, _left(deadline))))
        if self._reassembly_timer is not None:
            self._reassembly_timer.cancel()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._decoder = None

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(True)`` on the loop whenever the link is ready (connected and
        re-subscribed) and ``listener(False)`` whenever it is lost. It must not block."""
        self._listeners.append(listener)

    def remove_connection_listener(self, listener: Callable[[bool], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the link is up and re-subscribed, or raise DeadlineExceeded."""
        self._check_open()
        assert self._ready is not None
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"not connected to the broker within {timeout_s:g}s") from None

    def stats(self) -> TransportStats:
        """A snapshot of what this transport holds and has counted (call it on the loop)."""
        r = self._reassembler
        return TransportStats(
            connected=self.connected, pending_requests=len(self._pending),
            unacked_publishes=self._unacked_count(),
            unclaimed_messages=len(self._unclaimed), unclaimed_bytes=self._unclaimed_bytes,
            reassembly_sets=r.pending_sets, reassembly_bytes=r.pending_bytes,
            chunk_sets_expired=r.expired, dropped_messages=self._dropped,
            late_responses=self._late, refused_subscriptions=self._refused_subscriptions,
            serving={f: s.stats() for f, s in self._servers.items()})

    def _check_open(self) -> None:
        if self._state != "open":
            raise FailedPrecondition("transport is not connected (call connect()) or is closed")

    # == bytes ==================================================================================

    async def publish(self, topic: str, payload: Buffer, *, qos: int | None = None,
                      retain: bool = False,
                      properties: PublishProperties | None = None) -> PublishHandle:
        """Send ``payload`` (chunked when over :meth:`chunk_size`; a retained message must fit
        in one packet). Returns once handed to the link, with a :class:`PublishHandle` for the
        broker's acknowledgement; raises Unavailable at once while disconnected."""
        n = memoryview(payload).nbytes
        return self._publish(topic, [payload], n, qos, retain, properties)

    async def publish_message(self, topic: str, message: Message, *, qos: int | None = None,
                              retain: bool = False) -> PublishHandle:
        """Encode a protocol message (:mod:`tandem.protocol.codec`) and publish it."""
        parts, total = codec.encode_parts(message, self.config.limits)
        return self._publish(topic, parts, total, qos, retain, PublishProperties())

    def _publish(self, topic: str, parts: Sequence[Buffer], total: int, qos: int | None,
                 retain: bool, props: PublishProperties | None) -> PublishHandle:
        self._check_open()
        qos = self.config.qos if qos is None else qos
        packets = self._packets(topic, parts, total, qos, props, retain)
        acks = self._send_packets(packets, topic, qos, retain, props, want_ack=True)
        assert self._loop is not None
        return PublishHandle(self._loop, topic, acks)

    def _packets(self, topic: str, parts: Sequence[Buffer], total: int, qos: int,
                 props: PublishProperties | None, retain: bool = False) -> list[Any]:
        """The packets of one message: one, or its chunk frames. Thread-safe."""
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise InvalidArgument(f"qos must be 0, 1 or 2, not {qos!r}")
        limit = self.config.limits.max_message_bytes
        if total > limit:
            raise PayloadTooLarge(f"message of {total} bytes is over the transport's limit "
                                  f"({limit}: config.limits.max_message_bytes)")
        size = self.chunk_size()
        if total <= size:
            return [self._packet(topic, parts, total, qos, props)]
        if retain:
            raise InvalidArgument(f"a retained message must fit in one packet ({size} bytes)")
        whole = parts[0] if len(parts) == 1 else b"".join(parts)
        # a fresh set id per message: a retried request (same request id) must not look like a
        # duplicate of a set the receiver already completed
        return [self._packet(topic, [piece], len(piece), qos, props)
                for piece in chunking.split(whole, size)]  # type: ignore[arg-type]

    def _send_packets(self, packets: list[Any], topic: str, qos: int, retain: bool,
                      props: PublishProperties | None,
                      want_ack: bool) -> list[asyncio.Future | None]:
        return [self._send_packet(p, topic, qos, retain, props, want_ack) for p in packets]

    async def subscribe(self, topic_filter: str, handler: Handler, *,
                        qos: int | None = None,
                        on_refused: RefusalHandler | None = None) -> None:
        """Call ``handler(IncomingMessage)`` (sync or async, on the loop; payload as bytes)
        for every message matching ``topic_filter``; waits for the broker's answer, raising
        its refusal. The subscription survives reconnects; should the broker refuse it on a
        re-subscribe (by SUBACK, or by closing the connection on it twice in a row), it is
        dropped and ``on_refused(error)`` runs on the loop (else the error is logged).
        Subscribing a filter again replaces its handler; a message matching several filters
        goes to each of their handlers."""
        if not callable(handler):
            raise InvalidArgument(f"handler must be callable, not {type(handler).__name__}")
        await self._subscribe(topic_filter,
                              _Subscription(handler, takes_views=False, on_refused=on_refused),
                              qos)

    async def _subscribe(self, topic_filter: str, sub: _Subscription, qos: int | None) -> None:
        self._check_open()
        check_filter(topic_filter)
        qos = self.config.qos if qos is None else qos
        previous = self._subs.get(topic_filter)
        self._subs[topic_filter] = sub
        try:
            answer = self._subscribe_impl(topic_filter, qos)
            err = await asyncio.wait_for(answer, self.config.connect_timeout_s)
        except asyncio.TimeoutError:
            err = DeadlineExceeded(f"no answer to the subscription {topic_filter!r} within "
                                   f"{self.config.connect_timeout_s:g}s")
            self._forget_filter(topic_filter, previous, sub)
        except BaseException:
            self._forget_filter(topic_filter, previous, sub)
            raise
        if err is not None:
            self._forget_filter(topic_filter, previous, sub)
            explained = explain_refusal(self, topic_filter, err)
            if explained is err:
                raise err
            raise explained from err
        self._claim(topic_filter)

    def _forget_filter(self, topic_filter: str, previous: _Subscription | None,
                       sub: _Subscription) -> None:
        if self._subs.get(topic_filter) is sub:
            if previous is not None:
                self._subs[topic_filter] = previous
            else:
                del self._subs[topic_filter]
                self._reply_subscribed.discard(topic_filter)
                self._servers.pop(topic_filter, None)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering ``topic_filter`` (a ``serve`` filter too: its server stops)."""
        self._check_open()
        self._subs.pop(topic_filter, None)
        self._reply_subscribed.discard(topic_filter)
        server = self._servers.pop(topic_filter, None)
        if server is not None:
            server.stop()
        done = self._unsubscribe_impl(topic_filter)
        # on a timeout it is gone from our table all the same: nothing is delivered for it
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done, self.config.connect_timeout_s)

    def _subscription_refused(self, topic_filter: str, err: TandemError) -> None:
        """For implementations: the broker refused a filter of the table on a re-subscribe; it
        is dropped (not replayed again) and its owner's ``on_refused`` hears why."""
        self._refused_subscriptions += 1
        err = explain_refusal(self, topic_filter, err)
        sub = self._subs.pop(topic_filter, None)
        self._reply_subscribed.discard(topic_filter)
        server = self._servers.pop(topic_filter, None)
        if server is not None:
            server.stop()
        if sub is None or sub.on_refused is None:
            log.error("broker refused the subscription %r on re-subscribe; dropped: %s",
                      topic_filter, err)
            return
        log.warning("broker refused the subscription %r on re-subscribe; dropped", topic_filter)
        try:
            sub.on_refused(err)
        except Exception:
            log.exception("on_refused callback for %r failed", topic_filter)

    # == requests ===============================================================================

    async def request(self, topic: str, request: InferenceRequest, *,
                      timeout_s: float | None = None) -> InferenceResponse:
        """Publish ``request`` to ``topic`` and return its successful response.

        ``timeout_s`` defaults to the request's budget. An empty ``request.reply_topic`` becomes
        ``tandem/v1/resp/<device_id>`` (the only reply topic a Tandem server answers on).
        Raises the peer's error for an error response, DeadlineExceeded when the timeout
        passes, Unavailable when not connected or when the link drops while waiting."""
        prepared = self._prepare_request(topic, request, timeout_s)
        assert self._loop is not None
        future: asyncio.Future[InferenceResponse] = self._loop.create_future()
        if prepared.reply in self._reply_subscribed:
            self._start_request(prepared, future)
        else:
            await self._subscribe_then_start(prepared, future)
        try:
            return await future
        except asyncio.CancelledError:
            self._forget_request(prepared.request_id, future)
            raise

    def request_threadsafe(self, topic: str, request: InferenceRequest, *,
                           timeout_s: float | None = None
                           ) -> concurrent.futures.Future[InferenceResponse]:
        """:meth:`request` from a thread that is not the loop's (thread-safe): the request is
        encoded in the calling thread and started on the loop with one hand-off; the returned
        future completes as :meth:`request` would return or raise (the timeout is enforced on
        the loop). Cancelling the future abandons the request."""
        loop = self._loop
        self._check_open()
        assert loop is not None
        if _running_loop() is loop:
            raise FailedPrecondition("request_threadsafe() on the transport's loop: await "
                                     "request() instead")
        prepared = self._prepare_request(topic, request, timeout_s)
        future: concurrent.futures.Future[InferenceResponse] = concurrent.futures.Future()
        try:
            if prepared.reply in self._reply_subscribed:
                loop.call_soon_threadsafe(self._start_request, prepared, future)
            else:
                loop.call_soon_threadsafe(self._spawn_first, prepared, future)
        except RuntimeError:  # the loop is closed
            raise FailedPrecondition("transport is closed") from None
        return future

    def _prepare_request(self, topic: str, request: InferenceRequest,
                         timeout_s: float | None) -> _Prepared:
        """Check and encode ``request`` (thread-safe)."""
        self._check_open()
        if not isinstance(request, InferenceRequest):
            raise InvalidArgument(f"request must be an InferenceRequest, not {type(request)}")
        if timeout_s is None:
            timeout_s = request.budget_ms / 1000
        if not timeout_s > 0:
            raise DeadlineExceeded("request budget already spent")
        reply = request.reply_topic or topics.response_topic(request.device_id)
        check_topic(reply)
        if reply != request.reply_topic:
            request = dataclasses.replace(request, reply_topic=reply)
        props = PublishProperties(response_topic=reply, correlation_data=request.id,
                                  message_expiry_s=expiry_for_budget(request.budget_ms))
        parts, total = codec.encode_parts(request, self.config.limits)
        qos = self.config.qos
        packets = self._packets(topic, parts, total, qos, props)
        return _Prepared(request.id, topic, reply, packets, props, qos,
                         time.monotonic() + timeout_s, timeout_s, total <= _NAGLE_SMALL_BYTES)

    def _spawn_first(self, prepared: _Prepared, future: Any) -> None:
        task = self._spawn(self._subscribe_then_start(prepared, future))
        if isinstance(future, concurrent.futures.Future):
            future.add_done_callback(lambda f: f.cancelled() and task.cancel())

    async def _subscribe_then_start(self, prepared: _Prepared, future: Any) -> None:
        """The first request to a reply topic subscribes it (within the request's time)."""
        reply = prepared.reply
        try:
            if reply not in self._reply_subscribed:
                try:
                    await asyncio.wait_for(
                        self._subscribe(reply, _Subscription(self._on_response, True), None),
                        max(0.0, prepared.deadline_s - time.monotonic()))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"could not subscribe to {reply!r} within "
                                           f"{prepared.timeout_s:g}s") from None
                self._reply_subscribed.add(reply)
        except TandemError as exc:
            _fail(future, exc)
            return
        self._start_request(prepared, future)

    def _start_request(self, prepared: _Prepared, future: Any) -> None:
        """On the loop: register the request, arm its timer, send it. The one place a request
        starts, for :meth:`request` and :meth:`request_threadsafe` alike."""
        if future.done():  # abandoned before it started
            return
        rid = prepared.request_id
        try:
            self._check_open()
            if rid in self._pending:
                raise InvalidArgument(f"request {rid.hex()} is already pending")
            assert self._loop is not None
            timer = self._loop.call_later(max(0.0, prepared.deadline_s - time.monotonic()),
                                          self._request_timed_out, rid, future, prepared)
            self._pending[rid] = _Pending(future, timer, time.monotonic(), prepared.small)
            try:
                self._send_packets(prepared.packets, prepared.topic, prepared.qos, False,
                                   prepared.props, want_ack=False)
            except BaseException:
                self._forget_request(rid, future)
                raise
            prepared.packets = []  # the link holds them until acknowledged
        except TandemError as exc:
            _fail(future, exc)
        except Exception as exc:
            log.exception("starting request %s failed", rid.hex())
            _fail(future, InternalError(f"{type(exc).__name__}: {exc}"))

    def _request_timed_out(self, rid: bytes, future: Any, prepared: _Prepared) -> None:
        entry = self._pending.get(rid)
        if entry is not None and entry.future is future:
            del self._pending[rid]
        _fail(future, DeadlineExceeded(f"no response to request {rid.hex()} on "
                                       f"{prepared.topic!r} within {prepared.timeout_s:g}s"))

    def _forget_request(self, rid: bytes, future: Any) -> None:
        entry = self._pending.get(rid)
        if entry is not None and entry.future is future:
            del self._pending[rid]
            entry.timer.cancel()

    def _on_response(self, msg: IncomingMessage) -> None:
        """A message on a reply topic: looked up by the id in its envelope before anything
        else is decoded (a response nobody waits for is never decoded)."""
        try:
            opened = codec.open_frame(msg.payload, self.config.limits)  # envelope parsed once
            info = opened.info
        except ProtocolError as exc:
            self._drop("reply", "dropped an undecodable message on reply topic %s: %s",
                       msg.topic, exc)
            return
        rid = info.id
        if info.type is not codec.MessageType.INFERENCE_RESPONSE or rid is None:
            self._drop("reply-type", "dropped a %s on reply topic %s", info.type.name, msg.topic)
            return
        if rid not in self._pending:
            self._late += 1
            return
        if info.compressed and info.tensor_bytes >= OFFLOOP_DECODE_BYTES:
            self._spawn(self._decode_response_in_thread(msg.payload, rid))
            return
        try:
            response = opened.decode()
        except ProtocolError as exc:
            self._response_failed(rid, exc)
            return
        self._complete(rid, response)  # type: ignore[arg-type]

    async def _decode_response_in_thread(self, payload: Any, rid: bytes) -> None:
        try:
            response = await self._decode_in_thread(payload, self.config.limits)
        except ProtocolError as exc:
            self._response_failed(rid, exc)
            return
        self._complete(rid, response)

    def _response_failed(self, rid: bytes, exc: ProtocolError) -> None:
        """The response to a pending request does not decode: the request fails with that
        error now rather than waiting out its timeout."""
        self._dropped += 1
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry.timer.cancel()
            _fail(entry.future, exc)

    def _complete(self, rid: bytes, response: InferenceResponse) -> None:
        entry = self._pending.pop(rid, None)
        if entry is None:  # timed out or abandoned while it was decoded
            self._late += 1
            return
        entry.timer.cancel()
        if entry.small:
            self._watch_round_trip(time.monotonic() - entry.started_s)
        if response.error is not None:
            e = response.error
            _fail(entry.future, error_from_wire(int(e.code), e.message, e.retryable))
        else:
            _resolve(entry.future, response)

    def _fail_pending(self, error: TandemError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.timer.cancel()
            _fail(entry.future, error)

    def _watch_round_trip(self, rtt_s: float) -> None:
        """Warn once when small round trips look like Nagle's algorithm on the broker: ~40 ms
        (Nagle + delayed ACK) while the network round trip is far shorter."""
        if self._nagle_warned:
            return
        self._nagle.append(rtt_s)
        # the window's minimum must be Nagle-like too: a faster round trip rules it out now
        if len(self._nagle) < _NAGLE_WINDOW or rtt_s < _NAGLE_MIN_S * 0.9:
            return
        median = statistics.median(self._nagle)
        link = self._link_rtt_s()
        if link is not None and _NAGLE_MIN_S <= median <= _NAGLE_MAX_S and link * 4 < median \
                and min(self._nagle) >= _NAGLE_MIN_S * 0.9:
            self._nagle_warned = True
            log.warning(
                "small requests take %.0f ms a round trip while the network round trip to the "
                "broker is %.1f ms: this looks like Nagle's algorithm on the broker's sockets "
                "(mosquitto: set 'set_tcp_nodelay true'; other brokers: enable TCP_NODELAY)",
                median * 1e3, link * 1e3)

    # == serving ================================================================================

    async def serve(self, topic_filter: str, handler: RequestHandler, *,
                    executor: concurrent.futures.Executor | None = None,
                    limits: codec.Limits | None = None,
                    max_concurrency: int | None = None,
                    max_queued: int = 256,
                    max_queued_bytes: int = 256 * 2**20,
                    qos: int | None = None,
                    on_refused: RefusalHandler | None = None) -> None:
        """Answer every InferenceRequest on ``topic_filter`` (e.g.
        ``topics.request_filter("workers")``) with ``handler(request, context)``.

        An async handler runs on the loop (awaiting a future that another component completes
        is how a dynamic batcher collects requests); a sync one runs in ``executor`` when one
        is given, else on up to ``max_concurrency`` handler threads owned by this server, which
        encode their answer and hand it to the loop themselves (no executor round trip: the
        path for a blocking inference handler). ``context`` is a
        :class:`~tandem.protocol.transport.RequestContext` (topic, device, deadline, arrival).
        ``limits`` (default ``config.limits``) bound what this handler accepts, decompression
        included. At most ``max_concurrency`` handlers run at once (default 4 sync, 256
        async); beyond that up to ``max_queued`` requests wait, by priority, within
        ``max_queued_bytes``; more are answered RESOURCE_EXHAUSTED. The details are in
        :mod:`tandem.protocol.transport._serve`.

        A shared filter (``$share/<group>/…``) on a broker that may accept it and deliver
        nothing (MQTT) is confirmed with a probe before ``serve`` returns (:mod:`._share`):
        FailedPrecondition within ``config.share_check_timeout_s`` when nothing comes through,
        or when the broker refuses the filter or closes the connection on it; nothing is left
        subscribed then. ``on_refused(error)`` runs when the broker refuses the filter on a
        re-subscribe after a reconnect (the server has stopped then)."""
        self._check_open()
        server = Server(self, topic_filter, handler, executor=executor,
                        limits=self.config.limits if limits is None else limits,
                        max_concurrency=max_concurrency, max_queued=max_queued,
                        max_queued_bytes=max_queued_bytes,
                        offloop_decode_bytes=OFFLOOP_DECODE_BYTES)
        old = self._servers.get(topic_filter)
        self._servers[topic_filter] = server
        try:
            await self._subscribe(topic_filter,
                                  _Subscription(server.on_message, True, on_refused,
                                                takes_acks=True), qos)
            if self._checks_shared_subscriptions and is_shared(topic_filter) and \
                    self.config.share_check_timeout_s > 0:
                await self._confirm_shared(topic_filter, server)
        except BaseException:
            server.stop()
            if self._servers.get(topic_filter) is server:
                if old is not None:
                    self._servers[topic_filter] = old
                else:
                    del self._servers[topic_filter]
            raise
        if old is not None:
            old.stop()

    async def _confirm_shared(self, topic_filter: str, server: Server) -> None:
        """The shared-subscription self-check of :meth:`serve`; on failure the filter is
        unsubscribed again (within a bounded time) before the error is raised."""
        try:
            await confirm_delivery(self, topic_filter)
        except BaseException:
            if self._servers.get(topic_filter) is server:
                with contextlib.suppress(TandemError, asyncio.TimeoutError):
                    await asyncio.wait_for(self.unsubscribe(topic_filter),
                                           self.config.connect_timeout_s)
            raise

    def _send_reply(self, topic: str, response: InferenceResponse,
                    correlation_data: bytes | None) -> bool:
        """Publish a server's answer; False (logged) when it cannot go out. A response that
        cannot be encoded is replaced by its error, so the requester still gets an answer."""
        if self._state not in ("open", "closing"):
            return False
        try:
            packets, props = self._reply_packets(topic, response, correlation_data)
        except TandemError as exc:
            log.debug("could not send a response on %s: %s", topic, exc)
            return False
        return self._send_reply_packets(topic, packets, props)

    def _reply_packets(self, topic: str, response: InferenceResponse,
                       correlation_data: bytes | None) -> tuple[list[Any], PublishProperties]:
        """The packets of a server's answer (thread-safe: a handler thread encodes its own
        answer). A response that cannot be encoded becomes its error."""
        # only the correlation data: each MQTT 5 property costs the receiver time
        props = PublishProperties(correlation_data=correlation_data or response.id,
                                  content_type=None)
        qos = self.config.qos
        try:
            parts, total = codec.encode_parts(response, self.config.limits)
            packets = self._packets(topic, parts, total, qos, props)
        except TandemError as exc:
            log.warning("response to %s cannot be sent as it is: %s", response.id.hex(), exc)
            error = InferenceResponse(id=response.id, error=ErrorInfo(
                exc.code, f"the response could not be encoded: {exc.message}", False))
            parts, total = codec.encode_parts(error, self.config.limits)
            packets = self._packets(topic, parts, total, qos, props)
        return packets, props

    def _send_reply_packets(self, topic: str, packets: list[Any],
                            props: PublishProperties) -> bool:
        """On the loop: send packets :meth:`_reply_packets` built; False when they cannot go
        out (not connected, closed)."""
        if self._state not in ("open", "closing"):
            return False
        try:
            self._send_packets(packets, topic, self.config.qos, False, props, want_ack=False)
            return True
        except TandemError as exc:
            log.debug("could not send a response on %s: %s", topic, exc)
            return False

    async def _decode_in_thread(self, payload: Any, limits: codec.Limits) -> Any:
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="tandem-transport-decode")
        assert self._loop is not None
        return await self._loop.run_in_executor(self._decoder, codec.decode, payload, limits)

    # == from the link (on the loop) ============================================================

    def _deliver(self, msg: IncomingMessage) -> None:
        """For implementations: a packet arrived."""
        try:
            payload = self._reassembler.feed(msg.payload, origin=msg.topic)
        except ProtocolError as exc:
            if msg.ack is not None:
                msg.ack()
            self._drop("chunk", "dropped a bad chunk on %s: %s", msg.topic, exc)
            return
        if self._reassembler.pending_sets and self._reassembly_timer is None:
            self._arm_reassembly_timer()
        if payload is not msg.payload and msg.ack is not None:  # chunks: on arrival
            msg.ack()
            msg = dataclasses.replace(msg, ack=None)
        if payload is None:
            return
        if payload is not msg.payload:
            msg = dataclasses.replace(msg, payload=payload)
        self._dispatch(msg)

    def _arm_reassembly_timer(self) -> None:
        assert self._loop is not None
        every_s = min(1.0, max(0.05, self.config.reassembly_timeout_s / 4))
        self._reassembly_timer = self._loop.call_later(every_s, self._expire_chunk_sets)

    def _expire_chunk_sets(self) -> None:
        """Incomplete chunk sets are dropped on a timer, not only when the next chunk comes."""
        self._reassembly_timer = None
        self._reassembler.expire()
        if self._reassembler.pending_sets and self._state == "open":
            self._arm_reassembly_timer()

    def _dispatch(self, msg: IncomingMessage) -> None:
        """Hand ``msg`` to every matching handler. A big payload may be a view of its packet
        buffer: our own request/response handlers decode it in place, every other handler
        gets immutable bytes."""
        ack = msg.ack  # manual_ack: the first serve() handler acknowledges it, else done here
        if ack is not None:
            msg = dataclasses.replace(msg, ack=None)
        as_bytes: IncomingMessage | None = msg if type(msg.payload) is bytes else None
        matched = False
        for topic_filter, sub in list(self._subs.items()):
            if not topic_matches(topic_filter, msg.topic):
                continue
            matched = True
            given = msg
            if ack is not None and sub.takes_acks:
                given, ack = dataclasses.replace(msg, ack=ack), None
            elif not sub.takes_views:
                if as_bytes is None:
                    as_bytes = dataclasses.replace(msg, payload=bytes(msg.payload))
                given = as_bytes
            try:
                result = sub.handler(given)
                if sub.is_async or inspect.isawaitable(result):
                    self._spawn(_guarded(result, topic_filter, msg.topic))
            except BaseException as exc:  # SystemExit too: the loop survives
                log.error("handler for %r failed on a message from %s", topic_filter,
                          msg.topic, exc_info=exc)
        if ack is not None:
            ack()
        if not matched:  # e.g. a persistent session's backlog, delivered before subscribe()
            if as_bytes is None:
                as_bytes = dataclasses.replace(msg, payload=bytes(msg.payload))
            self._hold_unclaimed(as_bytes)

    def _hold_unclaimed(self, msg: IncomingMessage) -> None:
        c = self.config
        n = len(msg.payload)
        now = time.monotonic()
        self._purge_unclaimed(now)
        if n > c.max_unclaimed_bytes or c.max_unclaimed_messages == 0:
            self._drop("unclaimed", "dropped a %d-byte message on %s that no handler takes "
                       "(over max_unclaimed_bytes)", n, msg.topic)
            return
        while self._unclaimed and (len(self._unclaimed) >= c.max_unclaimed_messages
                                   or self._unclaimed_bytes + n > c.max_unclaimed_bytes):
            _, old, size = self._unclaimed.popleft()
            self._unclaimed_bytes -= size
            self._drop("unclaimed", "dropped a held message on %s that no handler took "
                       "(backlog full)", old.topic)
        self._unclaimed.append((now, msg, n))
        self._unclaimed_bytes += n

    def _purge_unclaimed(self, now: float) -> None:
        horizon = now - self.config.unclaimed_ttl_s
        while self._unclaimed and self._unclaimed[0][0] < horizon:
            _, _, size = self._unclaimed.popleft()
            self._unclaimed_bytes -= size
            self._dropped += 1

    def _claim(self, topic_filter: str) -> None:
        """Hand the held messages that match ``topic_filter`` to its (new) handler, in order."""
        if not self._unclaimed:
            return
        self._purge_unclaimed(time.monotonic())
        keep: list[tuple[float, IncomingMessage, int]] = []
        claimed: list[IncomingMessage] = []
        for entry in self._unclaimed:
            if topic_matches(topic_filter, entry[1].topic):
                claimed.append(entry[1])
                self._unclaimed_bytes -= entry[2]
            else:
                keep.append(entry)
        self._unclaimed.clear()
        self._unclaimed.extend(keep)
        for msg in claimed:
            self._dispatch(msg)

    def _link_changed(self, connected: bool, reason: str) -> None:
        """For implementations: the link is ready (connected and re-subscribed), or lost."""
        assert self._ready is not None
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

    def _drop(self, kind: str, msg: str, *args: object) -> None:
        self._dropped += 1
        self._warn.warning(kind, msg, *args)

    def _spawn(self, coro: Any) -> asyncio.Task:
        assert self._loop is not None
        task = _new_task(self._loop, coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("transport task failed", exc_info=task.exception())


async def _guarded(awaitable: Any, topic_filter: str, topic: str) -> None:
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # SystemExit too: the loop survives
        log.error("handler for %r failed on a message from %s", topic_filter, topic,
                  exc_info=exc)


if sys.version_info >= (3, 12):
    def _new_task(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task:
        # runs the coroutine at once up to its first suspension (no extra loop iteration)
        return asyncio.Task(coro, loop=loop, eager_start=True)
else:
    from asyncio.tasks import _enter_task, _leave_task  # what 3.12's eager tasks do, by hand

    def _new_task(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task:
        """Python 3.11 has no eager tasks. Called from a callback (no task running: a message
        handed over by the socket's read event), the coroutine's first step runs here, at
        once, as its task's (``current_task()`` is that task), so a handler answers in the
        read event that brought the request; the task then goes on from where it stopped.
        Called from inside a task, a plain task."""
        if asyncio.current_task(loop) is not None:
            return loop.create_task(coro)
        eager = _Eager(coro)
        task = loop.create_task(eager)
        _enter_task(loop, task)
        try:
            eager.first_step()
        finally:
            _leave_task(loop, task)
        return task

    _UNSET = object()

    class _Eager(collections.abc.Coroutine):
        """The task's coroutine: hands the task the outcome of the first step (which ran in
        :func:`_new_task`), then relays sends and throws to ``coro``; a cancellation that
        comes before the task's first step goes straight into ``coro``."""

        __slots__ = ("coro", "error", "first", "result")

        def __init__(self, coro: Any) -> None:
            self.coro = coro
            self.first: Any = _UNSET  # what the first step yielded, until the task takes it
            self.error: BaseException | None = None
            self.result: Any = _UNSET

        def first_step(self) -> None:
            try:
                self.first = self.coro.send(None)
            except StopIteration as stop:
                self.result = stop.value
            except BaseException as exc:  # raised in the task when it runs, as a task would
                self.error = exc

        def _finished(self) -> Any:
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            result, self.result = self.result, _UNSET
            raise StopIteration(result)

        def send(self, value: Any) -> Any:
            if self.result is not _UNSET or self.error is not None:
                return self._finished()
            if self.first is not _UNSET:
                first, self.first = self.first, _UNSET
                return first
            return self.coro.send(value)

        def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
            if self.result is not _UNSET or self.error is not None:
                return self._finished()  # it finished before the task could be cancelled
            self.first = _UNSET
            if val is None and tb is None:
                return self.coro.throw(typ)
            return self.coro.throw(typ, val, tb)

        def close(self) -> None:
            self.coro.close()

        def __await__(self) -> Any:
            raise TypeError("_Eager is driven by its task only")


_CANCELLED_MEANWHILE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


def _resolve(future: Any, value: Any) -> None:
    if not future.done():
        with contextlib.suppress(*_CANCELLED_MEANWHILE):  # by its caller, in another thread
            future.set_result(value)


def _fail(future: Any, error: BaseException) -> None:
    if not future.done():
        with contextlib.suppress(*_CANCELLED_MEANWHILE):
            future.set_exception(error)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _wait_timeout(timeout_s: float | None) -> float | None:
    """A timeout a blocking wait accepts: None (forever) past ``threading.TIMEOUT_MAX``."""
    if timeout_s is None or timeout_s >= threading.TIMEOUT_MAX:
        return None
    return max(0.0, timeout_s)
