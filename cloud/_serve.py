"""Run a worker until SIGTERM/SIGINT: HTTP first (liveness answers during startup), then the
worker; on a signal the worker drains, then HTTP stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from tandem.cloud._config import CloudConfig
from tandem.cloud._http import HttpServer
from tandem.cloud._worker import Worker

__all__ = ["serve", "serve_async"]

log = logging.getLogger("tandem.cloud")


async def serve_async(config: CloudConfig, *, stop: asyncio.Event | None = None,
                      started: asyncio.Future | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down gracefully.
    ``started`` (optional) gets ``(worker, http_port or None)`` once the worker serves. Should
    the worker become unable to serve (the broker refused its subscription after a reconnect),
    it is shut down the same way and its error raised."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, _on_signal, stop, sig)
            installed.append(sig)
    worker = Worker(config)
    http = HttpServer(worker, config.http_host, config.http_port) \
        if config.http_port is not None else None
    try:
        port = await http.start() if http is not None else None
        await worker.start()
        if started is not None and not started.done():
            started.set_result((worker, port))
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.wait_failed())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
    finally:
        try:
            if worker.state != "starting":
                await worker.stop()
        finally:
            if http is not None:
                await http.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)
    if worker.failure is not None:
        raise worker.failure


def _on_signal(stop: asyncio.Event, sig: int) -> None:
    log.info("%s: shutting down", signal.Signals(sig).name)
    stop.set()


def serve(config: CloudConfig) -> None:
    """Blocking form of :func:`serve_async`."""
    asyncio.run(serve_async(config))
