"""One asyncio event loop on its own daemon thread, for the blocking shells of this package
(:class:`~tandem.lab.SyncLinkEmulator`, :class:`~tandem.lab.SyncBroker`): each call runs on the
loop and waits at most ``call_timeout_s``, raising DeadlineExceeded past it. :class:`SyncShell`
is what those shells share: start and close an object with async ``start()``/``close()`` there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tandem.protocol.errors import DeadlineExceeded, FailedPrecondition, Unavailable

__all__ = ["LoopThread", "SyncShell", "Tasks", "listen"]

_T = TypeVar("_T")


class LoopThread:
    def __init__(self, name: str, call_timeout_s: float = 10.0) -> None:
        self.name = name
        self.call_timeout_s = call_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise FailedPrecondition(f"{self.name} is already running")
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self.call_timeout_s)
        if not thread.is_alive():
            loop.close()

    def call(self, coro: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        """Run ``coro`` on the loop and wait for its result."""
        if self._loop is None:
            coro.close()
            raise FailedPrecondition(f"{self.name} is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        wait_s = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            return future.result(wait_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"{self.name} did not answer within {wait_s} s") from None

    def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Call the plain function ``fn(*args)`` on the loop's thread and return its result."""

        async def call() -> _T:
            return fn(*args)

        return self.call(call())


class SyncShell:
    """Runs ``target`` (an object with async ``start()`` and ``close()``) on its own loop thread
    named ``name``; a context manager."""

    def __init__(self, target: Any, name: str, call_timeout_s: float) -> None:
        self._target = target
        self._thread = LoopThread(name, call_timeout_s)

    def start(self):  # -> the shell itself
        self._thread.start()
        try:
            self._thread.call(self._target.start())
        except BaseException:
            self._thread.stop()
            raise
        return self

    def close(self) -> None:
        if not self._thread.running:
            return
        try:
            self._thread.call(self._target.close())
        finally:
            self._thread.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tasks:
    """The tasks a server started for its connections: spawned here, all cancelled (and waited
    for) by :meth:`cancel_all` when it closes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def listen(handler: Callable[..., Any], host: str, port: int, what: str,
                 **kwargs: Any) -> asyncio.Server:
    """``asyncio.start_server``, with the OS's refusal (a port in use, a host name that does not
    resolve, no permission) as one Unavailable naming what could not listen where."""
    try:
        return await asyncio.start_server(handler, host, port, **kwargs)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if "address already in use" in str(exc).lower():
            why = "address already in use"
        raise Unavailable(f"{what} cannot listen on {host}:{port}: {why}") from exc
