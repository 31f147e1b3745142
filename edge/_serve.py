"""Running the daemon as a process: the daemon and its local API on one event loop, until
SIGINT or SIGTERM (then a graceful stop: running requests finish, ``offline`` is announced)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from tandem.edge._config import EdgeConfig

__all__ = ["run", "serve"]

log = logging.getLogger("tandem.edge")


async def serve(config: EdgeConfig, *, ready: Callable[[Any, int], None] | None = None,
                stop: asyncio.Event | None = None, **daemon_options: Any) -> None:
    """Start the daemon and its API, call ``ready(daemon, port)``, serve until ``stop`` is set
    (or SIGINT/SIGTERM when running in the main thread), then stop both."""
    from tandem.edge._api import LocalApi
    from tandem.edge._daemon import EdgeDaemon

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    daemon = EdgeDaemon(config, **daemon_options)
    api = LocalApi(daemon, config.api_host, config.api_port,
                   max_body_bytes=config.max_body_mb << 20)
    try:
        await daemon.start()
        port = await api.start()
        log.info("local API on http://%s:%d/v2 (KServe v2)", config.api_host, port)
        await daemon.advertise(port)
        if ready is not None:
            ready(daemon, port)
        await stop.wait()
        log.info("stopping")
    finally:
        await api.stop()
        await daemon.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(config: EdgeConfig, **daemon_options: Any) -> None:
    """Blocking :func:`serve` with one-line logs at ``config.log_level``."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config, **daemon_options))
