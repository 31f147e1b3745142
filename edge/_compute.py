"""Local compute: a fixed set of threads running blocking inference, highest priority first.

``await pool.run(fn, priority)`` queues ``fn`` (blocking: a backend call) and returns its
result on the caller's event loop. At most ``max_queued`` calls wait; beyond that
:class:`~tandem.protocol.errors.ResourceExhausted` (the API answers 429) so a burst cannot grow
memory without bound. Among waiting calls the higher ``priority`` runs first, then the older.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tandem.protocol.errors import ResourceExhausted, Unavailable

__all__ = ["ComputePool"]

T = TypeVar("T")


class ComputePool:
    def __init__(self, threads: int, max_queued: int, *, name: str = "tandem-edge-compute"):
        self.max_queued = max_queued
        self._heap: list[tuple[int, int, Callable[[], Any], asyncio.Future, Any]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.busy = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        return len(self._heap)

    async def run(self, fn: Callable[[], T], priority: int = 0) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cv:
            if self._closed:
                raise Unavailable("the daemon is shutting down", retryable=True)
            if len(self._heap) >= self.max_queued:
                raise ResourceExhausted(f"{len(self._heap)} requests already wait for local "
                                        "compute; try again later")
            heapq.heappush(self._heap, (-priority, next(self._seq), fn, future, loop))
            self._cv.notify()
        return await future

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, fn, future, loop = heapq.heappop(self._heap)
                self.busy += 1
            try:
                if future.cancelled():
                    continue
                try:
                    result = fn()
                except BaseException as exc:  # handed to the awaiting request
                    _settle(loop, future, None, exc)
                else:
                    _settle(loop, future, result, None)
            finally:
                with self._cv:
                    self.busy -= 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, then stop the threads (waiting at most ``timeout_s``)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout_s)


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any,
            exc: BaseException | None) -> None:
    def apply() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(apply)
