"""The cloud worker: one shared subscription, strict decoding, routing to the batchers, exactly
one answer per request, load reports, graceful shutdown.

Contract with devices (at least once, idempotent by id):

* every request that reaches the worker gets exactly one answer on
  ``tandem/v1/resp/<device>`` — the device named in the request topic, never a topic the payload
  chose: its outputs, or a typed error (INVALID_ARGUMENT for a payload that decodes far enough
  to find its id, NOT_FOUND for an unknown model or cut, FAILED_PRECONDITION for a model served
  here under other digests or a part whose files changed on disk after the scan,
  DEADLINE_EXCEEDED for a spent budget, RESOURCE_EXHAUSTED for a full queue, UNAVAILABLE while
  shutting down);
* a request id seen again from the same device within ``dedup_window_s`` (QoS 1 redelivery, a
  retry) *by the same worker* is answered with the same response without recomputing (while the
  first is still running, the transport drops the copy: the first one's answer is the answer);
  retryable errors are not remembered, so a retry after RESOURCE_EXHAUSTED is computed. The
  reply cache is this worker's own memory (:class:`_ReplyCache`), not shared: a retry that the
  shared subscription delivers to another worker of the group is computed again there;
* the transport's ``serve`` does the strict decoding: a payload that cannot be decoded far enough
  to find its id is counted (``tandem_cloud_decode_errors_total``) and logged, rate limited; one
  whose id is readable (MQTT 5 correlation data) is answered with its error; the worker keeps
  serving;
* after a crash (SIGKILL) the requests the worker held are lost with it, and so is its reply
  cache: a device retries by id, and whichever worker gets the retry computes it (again, if the
  crashed one had computed it without its answer getting out). Requests are idempotent (a
  tail's outputs depend only on its input tensors), so a retry computed twice is harmless; what
  is not guaranteed across workers is "computed at most once".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tandem.cloud._batcher import BatchPolicy, Dispatcher, Outcome, WorkItem
from tandem.cloud._config import CloudConfig
from tandem.cloud._metrics import Metrics
from tandem.cloud._repository import ModelRepository, Part
from tandem.protocol import codec, topics
from tandem.protocol.errors import (
    Code,
    NotFound,
    TandemError,
    Unavailable,
)
from tandem.protocol.messages import (
    CloudLoad,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Timings,
)

__all__ = ["Worker"]

log = logging.getLogger("tandem.cloud.worker")

_ACK_TIMEOUT_S = 2.0


class _ReplyCache:
    """Responses by (device, request id) for ``window_s``, at most ``max_bytes`` of outputs."""

    def __init__(self, window_s: float, max_bytes: int) -> None:
        self.window_s = window_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, bytes], tuple[float, InferenceResponse, int]] = \
            OrderedDict()

    def get(self, key: tuple[str, bytes], now: float) -> InferenceResponse | None:
        self._expire(now)
        hit = self._items.get(key)
        return hit[1] if hit is not None else None

    def put(self, key: tuple[str, bytes], response: InferenceResponse, now: float) -> None:
        if self.window_s <= 0:
            return
        size = sum(len(t.data) for t in response.outputs) + 128
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[key] = (now + self.window_s, response, size)
        self.bytes += size
        self._expire(now)
        while self.bytes > self.max_bytes and self._items:
            _, (_, _, n) = self._items.popitem(last=False)
            self.bytes -= n

    def _expire(self, now: float) -> None:
        while self._items:
            key, (until, _, n) = next(iter(self._items.items()))
            if until > now:
                return
            del self._items[key]
            self.bytes -= n

    def __len__(self) -> int:
        return len(self._items)


def _profile(profile_id: str | None) -> Any:
    """The named device profile (NotFound for an unknown id, at start), or None: detected."""
    if profile_id is None:
        return None
    from tandem.devices import get_profile

    return get_profile(profile_id)


def _error_response(rid: bytes, exc: TandemError, worker_id: str, queue_depth: int,
                    timings: Timings | None = None) -> InferenceResponse:
    return InferenceResponse(id=rid, error=ErrorInfo(exc.code, exc.message, exc.retryable),
                             timings=timings or Timings(), worker_id=worker_id,
                             queue_depth=queue_depth)


class Worker:
    """A cloud worker. ``await start()`` connects, scans the repository and subscribes;
    ``await stop()`` drains and disconnects. Run it with :func:`tandem.cloud.serve` (signals,
    HTTP) or drive it yourself on an event loop."""

    def __init__(self, config: CloudConfig, *, transport: Any = None) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.metrics = Metrics(config.worker_id)
        self.repo = ModelRepository(
            config.repo, public_key=config.public_key,
            memory_budget_bytes=config.memory_budget_mb << 20,
            intra_op_threads=config.intra_op_threads, backend=config.backend,
            profile=_profile(config.profile), engine_cache=config.engine_cache)
        self.dispatcher: Dispatcher | None = None
        self._transport = transport
        self._own_transport = transport is None
        self._replies = _ReplyCache(config.dedup_window_s, config.dedup_max_mb << 20)
        self._handling = 0  # requests inside the handler (MQTT) or the HTTP path
        self._idle = asyncio.Event()
        self._background: list[asyncio.Task] = []
        self._state = "starting"
        self._scanned = False
        self._subscribed = False
        self._filter = topics.request_filter(config.group or None)
        self._stopped = asyncio.Event()
        self._failed = asyncio.Event()
        self.failure: TandemError | None = None  # why the worker cannot serve any more
        self.answered = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def live(self) -> bool:
        return self._state in ("starting", "serving", "draining")

    @property
    def ready(self) -> bool:
        """Connected, subscribed, and every bundle of the repository verified (served or
        rejected) at least once."""
        return (self._state == "serving" and self._scanned and self._subscribed
                and self._transport is not None and self._transport.connected)

    @property
    def inflight(self) -> int:
        return self._handling

    @property
    def transport(self) -> Any:
        """The transport this worker serves on (None before :meth:`start`). One handed to the
        constructor stays the caller's to close; one the worker made is closed by :meth:`stop`."""
        return self._transport

    @property
    def queue_depth(self) -> int:
        return self.dispatcher.queue_depth if self.dispatcher is not None else 0

    def transport_config(self) -> Any:
        """The TransportConfig this worker connects with (client id, credentials, TLS, and
        its last will: a retained CloudLoad with state \"offline\")."""
        from tandem.protocol.transport import TlsConfig, TransportConfig, Will

        cfg = self.config
        addr = cfg.broker_address
        tls = None
        if addr.tls or cfg.ca_file or cfg.cert_file:
            tls = TlsConfig(ca_file=str(cfg.ca_file) if cfg.ca_file else None,
                            cert_file=str(cfg.cert_file) if cfg.cert_file else None,
                            key_file=str(cfg.key_file) if cfg.key_file else None)
        will = Will(topics.load_topic(self.worker_id), codec.encode(self._load("offline")),
                    qos=1, retain=True)
        return TransportConfig(
            host=addr.host, port=addr.port, client_id=f"tandem-cloud-{self.worker_id}",
            protocol=cfg.mqtt_version, username=cfg.username or addr.username,
            password=cfg.password or addr.password, tls=tls, will=will, clean_start=True,
            receive_maximum=cfg.inflight_limit, manual_ack=True)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        policy = BatchPolicy(self.config.max_batch, self.config.max_delay_ms,
                             self.config.queue_limit, self.config.compute_threads)
        self.dispatcher = Dispatcher(self.repo, policy)
        self.dispatcher.on_batch = self._on_batch
        self.dispatcher.on_outcome = self._on_outcome
        self.repo.on_unload = lambda part: None
        report = await loop.run_in_executor(None, self.repo.scan)
        self._scanned = True
        self._count_bundles()
        log.info("repository %s: %d bundle(s) served, %d rejected", self.config.repo,
                 len(report.added), len(report.rejected))
        if self._transport is None:  # MQTT or NATS, as the broker URL says
            from tandem.protocol.broker_url import transport_for_url

            self._transport = transport_for_url(self.config.broker, self.transport_config())
        if self._own_transport:
            await self._transport.connect()
        self._transport.add_connection_listener(self._on_connection)
        self.metrics.connected.set(1 if self._transport.connected else 0)
        self.metrics.watch_serving(self._serve_stats)
        cfg = self.config
        # the handler hands every request to the dispatcher, which does admission (queue
        # limit), priorities and deadlines; the transport's own queue is only the anteroom.
        # On a $share filter the transport first checks that the broker delivers through it.
        try:
            await self._transport.serve(
                self._filter, self._handle,
                max_concurrency=cfg.queue_limit + cfg.max_batch * cfg.compute_threads,
                max_queued=cfg.inflight_limit, on_refused=self._serve_refused)
        except BaseException:
            if self._own_transport:
                await self._transport.close()
            raise
        self._subscribed = True
        self._state = "serving"
        log.info("worker %s serving %s on %s (group %s)", self.worker_id, self._filter,
                 self.config.broker_address, self.config.group or "none: alone")
        self._background = [
            loop.create_task(self._report_loop(), name="load reports"),
            loop.create_task(self._scan_loop(), name="repository scan"),
        ]

    async def stop(self) -> None:
        """Graceful shutdown: stop taking requests (new arrivals are answered UNAVAILABLE,
        retryable), finish what is queued within ``drain_timeout_s`` (what is left then is
        answered UNAVAILABLE), stop serving, mark the worker offline, disconnect."""
        if self._state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        self._state = "draining"
        log.info("draining: no new requests, finishing %d queued", self.queue_depth)
        if self._transport is not None and self._transport.connected:
            with contextlib.suppress(TandemError):
                await self._publish_load()
        cancelled = 0
        if self.dispatcher is not None:
            cancelled = await self.dispatcher.drain(self.config.drain_timeout_s)
        if self._handling:  # the handlers return and their answers go out
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s + 5)
        self._state = "stopping"
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._transport is not None:
            if self._subscribed:
                with contextlib.suppress(TandemError):
                    await self._transport.unsubscribe(self._filter)
                self._subscribed = False
            with contextlib.suppress(TandemError, asyncio.TimeoutError):
                handle = await self._publish_load("offline")
                await asyncio.wait_for(handle, _ACK_TIMEOUT_S)  # PUBACK: it is out
            if self._own_transport:
                await self._transport.close()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        await asyncio.get_running_loop().run_in_executor(None, self.repo.close)
        self._state = "stopped"
        self._stopped.set()
        log.info("stopped (answered %d, %d answered UNAVAILABLE at shutdown)", self.answered,
                 cancelled)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_failed(self) -> TandemError:
        """Return :attr:`failure` once the worker can no longer serve (the broker refused its
        subscription after a reconnect): not ready from then on; stop it and report."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    def _serve_refused(self, error: TandemError) -> None:
        # never an idle worker: the request subscription is gone, so the worker is done
        log.error("the broker refused the request subscription after a reconnect: %s", error)
        self._subscribed = False
        self.failure = error
        self._failed.set()

    def _on_connection(self, connected: bool) -> None:
        self.metrics.connected.set(1 if connected else 0)

    # -- background ---------------------------------------------------------------------------

    def _load(self, state: str | None = None) -> CloudLoad:
        tail, batch = [], []
        d = self.dispatcher
        if d is not None:
            for key, stats in list(d.stats.items()):
                part = self._part_by_key(key)
                if part is None or stats.samples == 0:
                    continue
                digest, cut = part.bundle.source_digest, part.cut.id
                tail.append((digest, cut, round(stats.compute_ms, 3)))
                batch.append((digest, cut, round(stats.batch_size, 3)))
        return CloudLoad(
            worker_id=self.worker_id, timestamp_ms=int(time.time() * 1000),
            queue_depth=self.queue_depth, inflight=self.inflight,
            queue_ms=round(d.expected_wait_ms(), 3) if d is not None else 0.0,
            tail_ms=tuple(tail), batch_size=tuple(batch),
            state=state or ("online" if self._state == "serving" else "draining"))

    def _part_by_key(self, key: tuple[str, int]) -> Part | None:
        digest, cut = key
        try:
            return self.repo.bundle(digest).parts.get(cut)
        except NotFound:
            return None

    async def _publish_load(self, state: str | None = None) -> Any:
        return await self._transport.publish_message(topics.load_topic(self.worker_id),
                                                     self._load(state), qos=1, retain=True)

    async def _report_loop(self) -> None:
        while True:
            try:
                if self._transport.connected:
                    await self._publish_load()
            except TandemError as exc:
                log.debug("load report not sent: %s", exc)
            self.metrics.queue_depth.set(self.queue_depth)
            self.metrics.inflight.set(self.inflight)
            self.metrics.loaded_parts.set(len(self.repo.loaded))
            self.metrics.loaded_bytes.set(self.repo.loaded_bytes)
            await asyncio.sleep(self.config.load_interval_s)

    async def _scan_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.repo_poll_s)
            try:
                report = await loop.run_in_executor(None, self.repo.scan)
            except TandemError as exc:
                log.error("repository scan failed: %s", exc)
                continue
            if report.removed and self.dispatcher is not None:
                for key in list(self.dispatcher.stats):
                    if key[0] in report.removed:
                        self.dispatcher.forget(key)
            self._count_bundles()

    def _count_bundles(self) -> None:
        self.metrics.bundles.labels("served").set(len(self.repo.entries))
        self.metrics.bundles.labels("rejected").set(len(self.repo.rejected))

    # -- metrics hooks ------------------------------------------------------------------------

    def _on_batch(self, part: Part, size: int, compute_s: float) -> None:
        labels = (part.bundle.model_name, str(part.cut.id))
        self.metrics.compute_seconds.labels(*labels).observe(compute_s)
        self.metrics.batch_size.labels(*labels).observe(size)

    def _on_outcome(self, item: WorkItem, outcome: Outcome) -> None:
        if outcome.compute_ms or outcome.ok:
            self.metrics.queue_seconds.labels(item.part.bundle.model_name).observe(
                outcome.queue_ms / 1000)

    def _count(self, model: str, error: ErrorInfo | TandemError | None, via: str) -> None:
        status = "OK" if error is None else Code(error.code).name if \
            int(error.code) in Code._value2member_map_ else str(int(error.code))
        self.metrics.requests.labels(model, status, via).inc()

    # -- MQTT requests ------------------------------------------------------------------------

    def _serve_stats(self) -> Any:
        if self._transport is None:
            return None
        return self._transport.stats().serving.get(self._filter)

    def _enter(self) -> None:
        self._handling += 1

    def _leave(self) -> None:
        self._handling -= 1
        if self._handling == 0:
            self._idle.set()

    async def _handle(self, request: InferenceRequest, ctx: Any) -> InferenceResponse:
        """The transport's async handler (on the loop): one decoded request from the device of
        ``ctx.device_id``; returns its answer (or raises a TandemError, answered as such)."""
        self._enter()
        model_name = ctx.model
        try:
            if not request.tensors and self._state == "serving":
                # an edge daemon's link probe (no tail takes no tensors): answered at once,
                # empty, never computed, cached or counted as a request
                self.metrics.link_probes.inc()
                return InferenceResponse(id=request.id, worker_id=self.worker_id,
                                         queue_depth=self.queue_depth)
            key = (ctx.device_id, request.id)
            now = time.monotonic()
            cached = self._replies.get(key, now)
            if cached is not None:
                self.metrics.duplicates.inc()
                response = cached
            else:
                response, model_name = await self._answer(request, ctx)
                if response.error is None or not response.error.retryable:
                    self._replies.put(key, response, time.monotonic())
            self.answered += 1
            return response
        except TandemError as exc:
            self._count(model_name, exc, "mqtt")
            self.answered += 1
            raise
        finally:
            self._leave()

    async def _answer(self, request: InferenceRequest, ctx: Any
                      ) -> tuple[InferenceResponse, str]:
        rid = request.id
        model_name = ctx.model
        try:
            if self._state != "serving" or self.dispatcher is None:
                raise Unavailable("this worker is shutting down; retry on another",
                                  retryable=True)
            part = self.repo.resolve(request.model_digest, request.cut_id, ctx.model)
            model_name = part.bundle.model_name
            loop = asyncio.get_running_loop()
            remaining = ctx.remaining_s()
            deadline = math.inf if remaining is None else loop.time() + remaining
            future = self.dispatcher.submit(part, request.tensors, deadline=deadline,
                                            priority=request.priority, wire=True,
                                            on_start=ctx.started)
        except TandemError as exc:
            response = _error_response(rid, exc, self.worker_id, self.queue_depth)
            self._count(model_name, exc, "mqtt")
            return response, model_name
        outcome = await future
        timings = Timings(queue_ms=round(outcome.queue_ms, 3),
                          compute_ms=round(outcome.compute_ms, 3))
        if outcome.error is not None:
            response = _error_response(rid, outcome.error, self.worker_id, self.queue_depth,
                                       timings)
        else:
            response = InferenceResponse(id=rid, outputs=outcome.outputs,  # type: ignore[arg-type]
                                         timings=timings, worker_id=self.worker_id,
                                         queue_depth=self.queue_depth)
        self._count(model_name, outcome.error, "mqtt")
        return response, model_name

    # -- HTTP (whole-model requests) ----------------------------------------------------------

    def whole_model(self, name: str, version: str | None = None) -> Part:
        """The part that runs model ``name`` from its raw inputs (cut 0)."""
        entry = self.repo.by_name(name, version)
        for part in entry.parts.values():
            if part.cut.head_part is None:
                return part
        raise NotFound(f"model {name!r} has no whole-model part (no cut 0) in its bundle")

    async def infer_arrays(self, part: Part, feeds: dict[str, Any], *,
                           deadline_ms: float | None = None, priority: int = 0) -> Outcome:
        """Run ``feeds`` through ``part``'s batcher (the HTTP path): raises what admission
        raises; the outcome carries the outputs (arrays by name) or the error."""
        if self._state != "serving" or self.dispatcher is None:
            raise Unavailable("the worker is not serving (starting or shutting down)",
                              retryable=True)
        loop = asyncio.get_running_loop()
        deadline = math.inf if deadline_ms is None else loop.time() + deadline_ms / 1000
        future = self.dispatcher.submit(part, feeds, deadline=deadline, priority=priority,
                                        wire=False)
        self._enter()
        try:
            return await future
        finally:
            self._leave()

    def count_http(self, model: str, error: TandemError | None) -> None:
        self._count(model, error, "http")

    def bundle_path(self, digest: str) -> Path:
        return self.repo.bundle(digest).path
