"""The blocking shell over any :class:`~tandem.protocol.transport.Transport`.

It runs the transport's event loop in its own thread (``tandem-transport-loop``) and waits for
each call with a timeout, raising DeadlineExceeded when it passes. No logic of its own: every
call is the async core's method run on that loop (requests through the core's thread-safe entry,
:meth:`Transport.request_threadsafe`). Handlers run on the loop thread (sync ``subscribe``
handlers must not block; ``serve`` runs sync handlers in an executor).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tandem.protocol.codec import Limits
from tandem.protocol.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from tandem.protocol.messages import InferenceRequest, InferenceResponse, Message
from tandem.protocol.transport._config import PublishProperties, TransportConfig
from tandem.protocol.transport._core import (
    Handler,
    PublishHandle,
    RefusalHandler,
    Transport,
    TransportStats,
    _wait_timeout,
)
from tandem.protocol.transport._log import log
from tandem.protocol.transport._serve import RequestHandler

__all__ = ["SyncTransport"]

_T = TypeVar("_T")

_GUARD_S = 1.0  # on top of a timeout the core enforces itself: only against a stuck loop


class SyncTransport:
    """Blocking API over ``transport`` (an unconnected
    :class:`~tandem.protocol.mqtt.MqttTransport`, :class:`MemoryTransport`, …)::

        with SyncTransport(MqttTransport(TransportConfig(host="broker"))) as t:
            response = t.request("tandem/v1/req/cam-01/m", request)

    ``call_timeout_s`` bounds calls that have no timeout of their own (publish, stats)."""

    def __init__(self, transport: Transport, *, call_timeout_s: float = 10.0) -> None:
        if not isinstance(transport, Transport):
            raise InvalidArgument(
                f"SyncTransport wraps a Transport, not {type(transport).__name__}")
        self._t = transport
        self.call_timeout_s = call_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def transport(self) -> Transport:
        """The async core (use it from handlers, which run on its loop)."""
        return self._t

    @property
    def config(self) -> TransportConfig:
        return self._t.config

    @property
    def connected(self) -> bool:
        """True while the link is up and the loop thread is alive."""
        return self._t.connected and self._thread is not None and self._thread.is_alive()

    @property
    def client_id(self) -> str:
        return self._t.client_id

    def chunk_size(self) -> int:
        return self._t.chunk_size()

    # -- lifecycle -------------------------------------------------------------------------------

    def connect(self) -> None:
        """Start the loop thread and connect (see :meth:`Transport.connect`)."""
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
            self._call(self._t.connect(), self.config.connect_timeout_s + _GUARD_S, "connect")
        except BaseException:
            self.close()
            raise

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the transport and stop the loop thread, all within ``timeout_s``. Idempotent;
        never raises (what does not finish in time is left to the daemon thread, logged)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        deadline = time.monotonic() + timeout_s
        try:
            if thread.is_alive():
                self._call(self._t.close(max(0.0, timeout_s * 0.8)), _left(deadline), "close")
                # the connect/reconnect executor threads end with the transport
                self._call(loop.shutdown_default_executor(), _left(deadline), "close")
        except Exception as exc:
            log.warning("transport close did not finish within %gs: %s", timeout_s, exc)
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(max(0.0, _left(deadline)))
                if not thread.is_alive():
                    loop.close()

    def __enter__(self) -> SyncTransport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(connected)`` runs on the transport's loop thread: it must not block."""
        self._t.add_connection_listener(listener)

    def remove_connection_listener(self, listener: Callable[[bool], None]) -> None:
        self._t.remove_connection_listener(listener)

    def wait_connected(self, timeout_s: float) -> None:
        self._call(self._t.wait_connected(timeout_s), timeout_s + _GUARD_S, "wait_connected")

    def stats(self) -> TransportStats:
        return self._call(_run(self._t.stats), self.call_timeout_s, "stats")

    # -- calls -----------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | bytearray | memoryview, *,
                qos: int | None = None, retain: bool = False,
                properties: PublishProperties | None = None) -> PublishHandle:
        """Publish; returns once handed to the link. ``handle.wait(timeout_s)`` waits for the
        broker's acknowledgement."""
        return self._call(self._t.publish(topic, payload, qos=qos, retain=retain,
                                          properties=properties), self.call_timeout_s,
                          "publish")

    def publish_message(self, topic: str, message: Message, *, qos: int | None = None,
                        retain: bool = False) -> PublishHandle:
        return self._call(self._t.publish_message(topic, message, qos=qos, retain=retain),
                          self.call_timeout_s, "publish")

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int | None = None,
                  on_refused: RefusalHandler | None = None) -> None:
        """``handler`` (and ``on_refused``) run on the transport's loop thread: they must not
        block."""
        self._call(self._t.subscribe(topic_filter, handler, qos=qos, on_refused=on_refused),
                   self.config.connect_timeout_s + _GUARD_S, "subscribe")

    def unsubscribe(self, topic_filter: str) -> None:
        self._call(self._t.unsubscribe(topic_filter), self.config.connect_timeout_s + _GUARD_S,
                   "unsubscribe")

    def request(self, topic: str, request: InferenceRequest, *,
                timeout_s: float | None = None) -> InferenceResponse:
        """:meth:`Transport.request`, blocking: encoded in this thread, started on the loop
        with one hand-off (:meth:`Transport.request_threadsafe`), waited for here."""
        self._loop_or_fail()
        future = self._t.request_threadsafe(topic, request, timeout_s=timeout_s)
        if timeout_s is None:
            timeout_s = request.budget_ms / 1000
        try:
            return future.result(_wait_timeout(timeout_s + _GUARD_S))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"transport request did not finish within "
                                   f"{timeout_s + _GUARD_S:g}s (is the loop stuck?)") from None

    def serve(self, topic_filter: str, handler: RequestHandler, *,
              executor: concurrent.futures.Executor | None = None,
              limits: Limits | None = None, max_concurrency: int | None = None,
              max_queued: int = 256, max_queued_bytes: int = 256 * 2**20,
              qos: int | None = None, on_refused: RefusalHandler | None = None) -> None:
        """:meth:`Transport.serve` (a sync handler runs in ``executor``, never on the loop;
        ``on_refused`` runs on the loop thread)."""
        c = self.config
        # the SUBSCRIBE, then the shared-subscription check (a probe's SUBSCRIBE and the probes)
        self._call(self._t.serve(topic_filter, handler, executor=executor, limits=limits,
                                 max_concurrency=max_concurrency, max_queued=max_queued,
                                 max_queued_bytes=max_queued_bytes, qos=qos,
                                 on_refused=on_refused),
                   3 * c.connect_timeout_s + c.share_check_timeout_s + _GUARD_S, "serve")

    # -- plumbing --------------------------------------------------------------------------------

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise FailedPrecondition("transport is not connected (call connect()) or is closed")
        return loop

    def _call(self, coro: Coroutine[Any, Any, _T], timeout_s: float, what: str) -> _T:
        try:
            loop = self._loop_or_fail()
        except FailedPrecondition:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(_wait_timeout(timeout_s))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"transport {what} did not finish within {timeout_s:g}s") \
                from None


async def _run(fn: Callable[[], _T]) -> _T:
    return fn()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
