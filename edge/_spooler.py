"""The daemon's side of the durable spool (:mod:`tandem.edge._spool` is the database): a
deferrable cloud request accepted while the cloud is unreachable, sent when it is back, and its
result handed to the application once (``GET /v2/spool/<id>``, :mod:`tandem.edge._api`).

Spooled requests go out with the same request id on every try, with ``spool_budget_ms`` each;
a retryable failure is tried again with backoff (0.5 s doubling to 60 s), a non-retryable
error is stored as the result. Every database call runs in one worker thread (fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tandem.edge._requests import Deferred, RequestOptions
from tandem.edge._serving import ServingModel
from tandem.edge._spool import Spool
from tandem.protocol import codec, topics
from tandem.protocol.errors import (
    InternalError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    TandemError,
)
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.tensors import Tensor

__all__ = ["Spooler"]

log = logging.getLogger("tandem.edge.spool")


class Spooler:
    """Deferred requests of one :class:`~tandem.edge._daemon.EdgeDaemon`."""

    def __init__(self, daemon: Any, spool: Spool, thread: ThreadPoolExecutor) -> None:
        self.daemon = daemon
        self.spool = spool
        self._thread = thread
        self.wake = asyncio.Event()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def defer(self, model: ServingModel, feeds: dict[str, np.ndarray],
                     options: RequestOptions) -> Deferred:
        assert self.spool is not None
        rid = new_request_id()
        request = InferenceRequest(
            id=rid, device_id=self.daemon.device_id, model_digest=model.cost.model_digest,
            cut_id=model.runtime.cloud_cut.id if model.runtime.cloud_cut else 0,
            budget_ms=int(self.daemon.config.spool_budget_ms),
            tensors=tuple(Tensor.from_array(n, a) for n, a in feeds.items()),
            priority=options.priority)
        payload = b"".join(bytes(p) for p in codec.encode_parts(request)[0])
        await self.call(self.spool.put, rid.hex(), model.name, payload,
                               options.spool_format or {})
        log.info("spooled request %s for the cloud (unreachable now)", rid.hex())
        await self.refresh_metrics()
        self.daemon._window.add(0.0, "spool", False)
        assert self.daemon.metrics is not None
        self.daemon.metrics.requests.labels("cloud", "spool", "spooled").inc()
        return Deferred(rid.hex(), model.name)

    async def refresh_metrics(self) -> None:
        if self.spool is None or self.daemon.metrics is None:
            return
        with contextlib.suppress(TandemError):
            counts = await self.call(self.spool.counts)
            for state, n in counts.items():
                self.daemon.metrics.spool.labels(state).set(n)

    async def loop(self) -> None:
        """Send pending spooled requests while the cloud is available; store each answer."""
        while self.daemon._state == "serving":  # not True: 3.11 wait_for can swallow a cancel
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.daemon.config.probe_interval_s)
            self.wake.clear()
            d = self.daemon
            if d.transport is None or not d.link.available:
                continue
            try:
                entries = await self.call(self.spool.due, 8)
            except TandemError as exc:
                log.warning("spool unreadable: %s", exc)
                continue
            if not entries:
                continue
            await asyncio.gather(*(self._send(e) for e in entries))
            self.wake.set()  # more may be due
            await self.refresh_metrics()

    async def _send(self, entry: Any) -> None:
        assert self.spool is not None
        try:
            request = codec.decode(entry.request)
            if type(request) is not InferenceRequest:
                raise InvalidArgument("not a request")
        except (ProtocolError, InvalidArgument) as exc:
            log.error("spooled request %s is unreadable (%s): answering with the error",
                      entry.id, exc)
            await self.call(self.spool.complete, entry.id, b"",
                                   {"error": f"spooled request unreadable: {exc}",
                                    "code": "INTERNAL"})
            return
        transport = self.daemon.transport
        t0 = time.monotonic()
        try:
            response = await transport.request(
                topics.request_topic(self.daemon.device_id, entry.model), request)
        except TandemError as exc:
            if exc.retryable:
                delay = min(60.0, 0.5 * 2 ** min(entry.attempts, 7))
                log.info("spooled request %s not answered (%s); retry in %.1f s", entry.id, exc,
                         delay)
                await self.call(self.spool.retry_later, entry.id, delay)
                return
            failed = {"error": exc.message, "code": exc.code.name, "ran": "cloud"}
            await self.call(self.spool.complete, entry.id, b"", failed)
            return
        info = {"ran": "cloud", "cloud_ms": round((time.monotonic() - t0) * 1e3, 3),
                "worker_id": response.worker_id, "attempts": entry.attempts + 1}
        payload = b"".join(bytes(p) for p in codec.encode_parts(response)[0])
        await self.call(self.spool.complete, entry.id, payload, info)
        log.info("spooled request %s answered by %s", entry.id, response.worker_id)

    async def result(self, request_id: str) -> tuple[str, Any]:
        """``("pending", info)``, ``("delivered", info)`` or ``("done", (outputs, info, fmt))``
        for a spool id; the ``done`` answer is given once. NotFound for an unknown id."""
        assert self.spool is not None
        if not isinstance(request_id, str) or len(request_id) != 32 or \
                any(c not in "0123456789abcdef" for c in request_id):
            raise NotFound(f"no spooled request {request_id[:40]!r} (ids are 32 hex digits)")
        found = await self.call(self.spool.take, request_id)
        await self.refresh_metrics()
        base = {"id": request_id, "model": found.model, "created_s": found.created_s,
                "finished_s": found.finished_s, "delivered_s": found.delivered_s}
        if found.state != "done":
            return found.state, base
        info = {**(found.info or {}), **base}
        if not found.result:
            return "done", (None, info, found.fmt)
        response = codec.decode(found.result)
        if not isinstance(response, InferenceResponse):  # only complete() writes results
            raise InternalError(f"spooled request {request_id}: the stored result is a "
                                f"{type(response).__name__}, not an InferenceResponse")
        if response.error is not None:
            info.update(error=response.error.message, code=int(response.error.code))
            return "done", (None, info, found.fmt)
        outputs = {t.name: t.to_array() for t in response.outputs}
        return "done", (outputs, info, found.fmt)
