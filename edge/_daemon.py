"""The edge daemon: serves a bundle, plans every request, offloads with fallback from the split
point, spools deferrable cloud requests, keeps presence, and rolls out new bundles.

Life::

    daemon = EdgeDaemon(config)
    await daemon.start()     # verify the bundle, detect the device, load + profile, connect
    answer = await daemon.infer(feeds, RequestOptions(mode="auto", deadline_ms=50))
    await daemon.stop()

Exactly one answer per accepted request: :meth:`EdgeDaemon.infer` returns an :class:`Answer`
(outputs and the parameters that say which plan ran, the expected and actual time and why), a
:class:`Deferred` (the spool id of a deferrable request), or raises one TandemError — never
more than one of these, whatever the broker, the link or a worker does.

Plans run through executors by kind: ``local`` here; ``cloud`` and ``split`` through
:func:`tandem.edge._offload.offload` (offload with fallback from the split point); other kinds
through :meth:`EdgeDaemon.register_executor`. Deferrable requests go through
:class:`tandem.edge._spooler.Spooler`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.edge._cascade_planner import CascadePlanner
from tandem.edge._compute import ComputePool
from tandem.edge._config import EdgeConfig
from tandem.edge._link import LinkEstimator
from tandem.edge._metrics import Metrics
from tandem.edge._offload import offload
from tandem.edge._planner import Decision
from tandem.edge._requests import Answer, Deferred, RequestOptions
from tandem.edge._serving import ServingModel, build_serving_model
from tandem.edge._spool import Spool
from tandem.edge._spooler import Spooler
from tandem.protocol import codec, topics
from tandem.protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ProtocolError,
    TandemError,
    Unavailable,
)
from tandem.protocol.messages import (
    Assignment,
    CloudLoad,
    DeviceStatus,
    InferenceRequest,
    new_request_id,
)

__all__ = ["Answer", "Deferred", "EdgeDaemon", "RequestOptions"]

log = logging.getLogger("tandem.edge")

_PROBE_BUDGET_MS = 2000
_WINDOW_S = 60.0
_STATUS_FIELDS = {f.name for f in dataclasses.fields(DeviceStatus)}
_REASON_MAX = 300  # characters of a refusal's reason in the heartbeat


@dataclass
class _Window:
    """Requests of the last minute, for the heartbeat (p50/p99, plan mix, fallbacks)."""

    entries: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8192))

    def add(self, latency_ms: float, plan: str, fallback: bool,
            escalated: bool | None = None) -> None:
        """``escalated``: for a cascade request, whether its rule escalated it (None: not a
        cascade request)."""
        self.entries.append((time.monotonic(), latency_ms, plan, fallback, escalated))

    def summary(self) -> dict[str, Any]:
        horizon = time.monotonic() - _WINDOW_S
        recent = [e for e in self.entries if e[0] >= horizon]
        if not recent:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "fallbacks": 0, "plan_mix": (),
                    "escalation_ratio": 0.0}
        lat = np.array([e[1] for e in recent])
        mix = collections.Counter(e[2] for e in recent)
        cascaded = [e[4] for e in recent if e[4] is not None]
        return {"p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "fallbacks": sum(1 for e in recent if e[3]),
                "plan_mix": tuple(sorted(mix.items())),
                "escalation_ratio": round(sum(cascaded) / len(cascaded), 4) if cascaded
                else 0.0}


class EdgeDaemon:
    """See the module docstring. ``transport_factory`` makes an unconnected
    :class:`~tandem.protocol.transport.Transport` (default: MQTT from the config; tests pass a
    MemoryTransport); ``profile`` overrides device detection (a
    :class:`~tandem.devices.Profile`); ``fetch_bundle`` replaces the fleet's download function
    for rollouts; ``enrollment`` (a fleet :class:`~tandem.devices.fleet.Enrollment`) supplies
    the broker, credentials, TLS files and the bundle-signing key."""

    def __init__(self, config: EdgeConfig, *, transport_factory: Callable[[], Any] | None = None,
                 profile: Any = None, fetch_bundle: Callable[..., Path] | None = None,
                 public_key: Any = None, enrollment: Any = None,
                 progress: bool = True) -> None:
        self.config = config
        self.device_id = config.device_id
        self.state_dir = config.resolved_state_dir()
        self.link = LinkEstimator(prior_uplink_mbps=config.prior_uplink_mbps,
                                  prior_rtt_ms=config.prior_rtt_ms,
                                  failures_to_degrade=config.failures_to_degrade)
        self.metrics: Metrics | None = None
        self.model: ServingModel | None = None
        self.previous: ServingModel | None = None
        self.transport: Any = None
        self.spool: Spool | None = None
        self.spooler: Spooler | None = None
        self.pool: ComputePool | None = None
        self.profile = profile
        self.detection = ""
        self.broker_url: str | None = None
        self.enrollment = enrollment
        if public_key is None and enrollment is not None:
            public_key = enrollment.bundle_public_key_pem.encode()
        self.public_key = public_key
        self.progress = progress
        self._transport_factory = transport_factory
        self._fetch_bundle = fetch_bundle
        self._tasks: list[asyncio.Task] = []
        self._spawned: set[asyncio.Task] = set()
        self._window = _Window()
        self._state = "new"
        self._started_s = time.monotonic()
        self._advertiser: Any = None
        self._rollout: Any = None
        self._spool_thread: ThreadPoolExecutor | None = None
        self.last_rollout: dict[str, Any] = {}
        self.on_model_change: list[Callable[[ServingModel], None]] = []
        offload_plan = functools.partial(offload, self)
        self._executors: dict[str, Callable[..., Any]] = {
            "local": self._run_local_plan, "cloud": offload_plan, "split": offload_plan}

    def register_executor(self, kind: str, execute: Callable[..., Any]) -> None:
        """Run plans of ``kind`` (costed by :meth:`CostModel.register_kind`) with
        ``await execute(model, decision, feeds, key, deadline, priority)``, which returns
        ``(outputs, info)``; ``info["ran"]`` says where the result came from (``local``,
        ``cloud`` or ``fallback``), the other entries go into the response's parameters."""
        self._executors[kind] = execute

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def live(self) -> bool:
        return self._state in ("starting", "serving", "stopping")

    @property
    def ready(self) -> bool:
        return self._state == "serving" and self.model is not None

    async def start(self) -> None:
        """Verify and load the bundle, detect the device, profile, open the spool, start the
        background work (connection, probes, heartbeat, spool, engines, presence)."""
        if self._state != "new":
            raise FailedPrecondition("the daemon was already started")
        self._state = "starting"
        loop = asyncio.get_running_loop()
        spool_thread = ThreadPoolExecutor(1, thread_name_prefix="tandem-edge-spool")
        self._spool_thread = spool_thread
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = Metrics()
            if self.profile is None:
                self.profile, self.detection = await loop.run_in_executor(None, self._detect)
            if self.public_key is None and self.config.public_key is not None:
                self.public_key = self.config.public_key
            self.spool = await loop.run_in_executor(self._spool_thread, lambda: Spool(
                self.state_dir / "spool.db", max_items=self.config.spool_max_items,
                max_bytes=self.config.spool_max_mb << 20))
            self.spooler = Spooler(self, self.spool, spool_thread)
            self.pool = ComputePool(self.config.compute_threads, self.config.max_queued)
            from tandem.edge._rollout import Rollout

            self._rollout = Rollout(self, fetch_bundle=self._fetch_bundle)
            paths = self._rollout.candidate_paths()
            for i, path in enumerate(paths):
                try:
                    model = await loop.run_in_executor(None, self._load_model, path)
                except TandemError as exc:
                    if i == len(paths) - 1:
                        raise
                    log.error("bundle %s does not load (%s); rolling back to %s", path, exc,
                              paths[i + 1])
                    continue
                self._install(model)
                break
            if not paths:
                log.info("no bundle yet: waiting for an assignment on %s",
                         topics.assign_topic(self.device_id))
        except BaseException:
            await self._close_resources()
            self._state = "stopped"
            raise
        self._state = "serving"
        self._tasks = [
            loop.create_task(self._connect_loop(), name="edge connect"),
            loop.create_task(self._probe_loop(), name="edge probes"),
            loop.create_task(self._heartbeat_loop(), name="edge heartbeat"),
            loop.create_task(self.spooler.loop(), name="edge spool"),
        ]
        await self.spooler.refresh_metrics()

    def _detect(self) -> tuple[Any, str]:
        from tandem.devices import detect, get_profile

        if self.config.profile:
            return get_profile(self.config.profile), f"{self.config.profile} (configured)"
        d = detect()
        return d.profile, f"{d.profile.id} ({d.source}{': ' + d.detail if d.detail else ''})"

    def _load_model(self, path: Path) -> ServingModel:
        """Verify, load and profile the bundle at ``path`` (blocking)."""
        from tandem.protocol.bundle import open_bundle

        bundle = open_bundle(path, public_key=self.public_key)
        try:
            model = build_serving_model(bundle, Path(path), self.profile, self.link, self.config,
                                        self.state_dir, progress=self.progress)
        except BaseException:
            bundle.close()
            raise
        if bundle.manifest.cascade is not None:
            try:
                model.cascade = CascadePlanner.load(
                    bundle, model.runtime, model.cost, model.table,
                    intra_op_threads=self.config.intra_op_threads,
                    warmup=self.config.profile_warmup, runs=self.config.profile_runs)
            except BaseException:
                model.close()
                raise
        return model

    def _install(self, model: ServingModel) -> None:
        """Serve ``model`` from the next request on (atomic: one reference)."""
        old = self.model
        self.model = model
        if old is not None:
            self.previous = old
        m = model.bundle.manifest
        log.info("serving %s %s (bundle %s, %d cuts, %s) on %s", m.model_name, m.model_version,
                 model.digest[:12], len(m.cuts), ", ".join(
                     f"{p.rsplit('/', 1)[-1]}: {r.kind}" for p, r in model.runtime.parts.items()),
                 self.profile.id)
        previous_hook = model.runtime.on_switch

        def on_switch(part: str, kind: str) -> None:  # in the engine thread
            if previous_hook is not None:
                previous_hook(part, kind)
            self._report_serving()

        model.runtime.on_switch = on_switch
        if model.runtime.start_engines():
            log.info("building TensorRT engines in the background; ONNX Runtime serves "
                     "meanwhile")
        self._report_serving()
        for hook in self.on_model_change:
            hook(model)

    def _report_serving(self) -> None:
        model = self.model
        if model is None or self.metrics is None:
            return
        m = model.bundle.manifest
        self.metrics.serving(m.model_name, m.model_version, model.digest,
                             {p: r.kind for p, r in model.runtime.parts.items()})

    async def stop(self) -> None:
        """Stop taking requests, finish those running (bounded), announce offline, close."""
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.model is not None:
            await self.model.drained(5.0)
        if self.transport is not None and self.transport.connected:
            with contextlib.suppress(TandemError, asyncio.TimeoutError):
                handle = await self.transport.publish_message(
                    topics.status_topic(self.device_id), self._status("offline"), retain=True)
                await asyncio.wait_for(handle._result(), 2.0)
        for task in list(self._spawned):
            task.cancel()
        await asyncio.gather(*self._spawned, return_exceptions=True)
        await self._close_resources()
        self._state = "stopped"

    async def _close_resources(self) -> None:
        loop = asyncio.get_running_loop()
        if self._advertiser is not None:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, self._advertiser.close)
            self._advertiser = None
        if self.transport is not None:
            await self.transport.close()
        if self.pool is not None:
            await loop.run_in_executor(None, self.pool.close)
        for model in (self.model, self.previous):
            if model is not None:
                await loop.run_in_executor(None, model.close)
        if self.spool is not None:
            await loop.run_in_executor(self._spool_thread, self.spool.close)
        if self._spool_thread is not None:
            self._spool_thread.shutdown(wait=False)

    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return task

    # -- presence -------------------------------------------------------------------------------

    async def advertise(self, port: int) -> None:
        """Announce the local API on ``port`` over mDNS (logged and skipped when mDNS or the
        ``discovery`` extra is missing)."""
        if not self.config.advertise:
            return
        from tandem.edge._presence import Advertiser

        adv = Advertiser(self.device_id, port, self.config.api_host,
                         interfaces=self.config.interface_list)
        try:
            await asyncio.get_running_loop().run_in_executor(None, adv.start,
                                                             self._txt_properties())
        except TandemError as exc:
            log.warning("not announcing the API over mDNS: %s", exc)
            return
        self._advertiser = adv
        log.info("announced %s.%s on port %d", self.device_id, "_tandem._tcp.local.", port)

    def _txt_properties(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("tandem-rt")
        except PackageNotFoundError:
            v = ""
        model = self.model.name if self.model is not None else ""
        return {"model": model, "profile": self.profile.id if self.profile else "",
                "version": v}

    # -- the broker -----------------------------------------------------------------------------

    def _make_transport(self) -> Any:
        """The transport the broker URL selects (MQTT, or NATS for ``nats://``/``tls://``;
        :func:`tandem.protocol.broker_url.transport_for_url`), or one from the enrollment."""
        if self._transport_factory is not None:
            return self._transport_factory()
        from tandem.protocol.broker_url import transport_for_url
        from tandem.protocol.mqtt import MqttTransport
        from tandem.protocol.transport import TlsConfig, TransportConfig, Will

        assert self.broker_url is not None
        cfg = self.config
        will = Will(topics.status_topic(self.device_id), codec.encode(self._status("offline")),
                    qos=1, retain=True)
        e = self.enrollment
        if e is not None and not cfg.broker:
            auth = "certificate" if e.urls else "password"
            return MqttTransport(e.transport_config(
                self.state_dir / "secrets", auth=auth, will=will, clean_start=True,
                reconnect_max_s=2.0, protocol=cfg.mqtt_version))
        tls = None
        if cfg.ca_file or cfg.cert_file:
            tls = TlsConfig(ca_file=str(cfg.ca_file) if cfg.ca_file else None,
                            cert_file=str(cfg.cert_file) if cfg.cert_file else None,
                            key_file=str(cfg.key_file) if cfg.key_file else None)
        username, password = cfg.username, cfg.password
        if e is not None and username is None:
            username, password = e.username, e.password
        return transport_for_url(self.broker_url, TransportConfig(
            client_id=f"tandem-edge-{self.device_id}", protocol=cfg.mqtt_version,
            username=username, password=password, tls=tls, will=will, clean_start=True,
            reconnect_max_s=2.0))

    async def _resolve_broker(self) -> str:
        if self.config.broker:
            return self.config.broker
        e = self.enrollment
        if e is not None:
            return (e.urls or e.password_urls)[0]
        from tandem.edge._presence import discover_broker

        try:
            found = await asyncio.get_running_loop().run_in_executor(
                None, lambda: discover_broker(self.config.discovery_timeout_s,
                                              interfaces=self.config.interface_list))
        except TandemError as exc:
            log.info("no broker from mDNS (%s)", exc)
            found = None
        if found:
            log.info("using the broker advertised over mDNS: %s", found)
            return found
        return "mqtt://127.0.0.1:1883"

    async def _connect_loop(self) -> None:
        """Connect (retrying with backoff while the broker is unreachable), then subscribe to
        load reports and assignments; the transport reconnects by itself afterwards."""
        if self._transport_factory is None:
            self.broker_url = await self._resolve_broker()
        delay = 0.2
        while self._state == "serving":  # not True: 3.11 wait_for can swallow a cancel
            transport = self._make_transport()
            transport.add_connection_listener(self._on_connection)
            try:
                await transport.connect()
                await transport.subscribe(f"{topics.PREFIX}/cloud/+/load", self._on_load)
                await transport.subscribe(topics.assign_topic(self.device_id), self._on_assign)
            except TandemError as exc:
                await transport.close()
                (log.info if exc.retryable else log.error)(
                    "broker %s not usable (%s); serving locally, retrying in %.1f s",
                    self.broker_url or "(memory)", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.transport = transport
            self.link.observe_connected(transport.connected)
            log.info("connected to the broker %s", self.broker_url or "(memory)")
            await self._heartbeat()
            return

    def _on_connection(self, connected: bool) -> None:
        self.link.observe_connected(connected)
        log.info("broker connection %s", "up" if connected else "lost: serving locally")
        if connected and self.spooler is not None:
            self.spooler.wake.set()
        if self.metrics is not None:
            self.metrics.link(self.link.snapshot())

    def _on_load(self, msg: Any) -> None:
        try:
            load = codec.decode(msg.payload)
        except ProtocolError as exc:
            log.debug("dropped an undecodable load report on %s: %s", msg.topic, exc)
            return
        if type(load) is CloudLoad:
            self.link.observe_load(load)

    def _on_assign(self, msg: Any) -> None:
        if not msg.payload:
            return  # a cleared retained assignment
        try:
            assignment = codec.decode(msg.payload)
        except ProtocolError as exc:
            log.warning("dropped an undecodable assignment: %s", exc)
            return
        if type(assignment) is not Assignment or assignment.device_id != self.device_id:
            log.warning("dropped an assignment that is not for %s", self.device_id)
            return
        self._rollout.submit(assignment)

    def _request_topic(self, model: ServingModel) -> str:
        return topics.request_topic(self.device_id, model.name)

    # -- background -----------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """A light probe when no offload ran for ``probe_interval_s`` (and always while
        degraded): a request without tensors (for the all-local cut), which a worker answers
        at once, empty, without computing or counting it (protocol/SPEC.md §2.1)."""
        interval = self.config.probe_interval_s
        while self._state == "serving":  # not True: 3.11 wait_for can swallow a cancel
            await asyncio.sleep(interval)
            t = self.transport
            model = self.model
            if t is None or model is None or not t.connected:
                continue
            link = self.link
            if link.available and time.monotonic() - link.last_offload_s < interval:
                continue
            await self.probe()

    async def probe(self) -> float | None:
        """Send one probe now; its round trip in ms, or None when it went unanswered."""
        t, model = self.transport, self.model
        if t is None or model is None:
            return None
        request = InferenceRequest(
            id=new_request_id(), device_id=self.device_id, model_digest=model.cost.model_digest,
            cut_id=model.runtime.local_cut.id, budget_ms=_PROBE_BUDGET_MS, tensors=())
        self.link.probes_sent += 1
        t0 = time.monotonic()
        try:
            await t.request(self._request_topic(model), request,
                            timeout_s=_PROBE_BUDGET_MS / 1000)
        except (DeadlineExceeded, Unavailable) as exc:
            log.debug("probe unanswered: %s", exc)
            self.link.observe_probe_failed()
            if self.metrics is not None:
                self.metrics.probes.labels("unanswered").inc()
            return None
        except TandemError:
            pass  # a worker older than the probe rule answers with an error: the cloud is there
        rtt_ms = (time.monotonic() - t0) * 1e3
        was_degraded = self.link.degraded_since is not None
        self.link.observe_probe(rtt_ms)
        if was_degraded:
            log.info("the cloud answers again (probe %.1f ms): offloading resumes", rtt_ms)
            if self.spooler is not None:
                self.spooler.wake.set()
        if self.metrics is not None:
            self.metrics.probes.labels("answered").inc()
            self.metrics.link(self.link.snapshot())
        return rtt_ms

    async def _heartbeat_loop(self) -> None:
        while self._state == "serving":  # not True: 3.11 wait_for can swallow a cancel
            await asyncio.sleep(self.config.heartbeat_s)
            await self._heartbeat()
            if self.spooler is not None:
                with contextlib.suppress(TandemError):
                    await self.spooler.call(self.spooler.spool.purge,
                                            self.config.spool_retention_s)

    async def _heartbeat(self) -> None:
        if self.metrics is not None:
            self.metrics.link(self.link.snapshot())
        t = self.transport
        if t is None or not t.connected:
            return
        state = "online" if self.link.available else "degraded"
        try:
            await t.publish_message(topics.status_topic(self.device_id), self._status(state),
                                    retain=True)
        except TandemError as exc:
            log.debug("heartbeat not sent: %s", exc)

    def _status(self, state: str) -> DeviceStatus:
        values: dict[str, Any] = {
            "device_id": self.device_id, "state": state, "timestamp_ms": int(time.time() * 1000),
            "bundle_digest": self.model.digest if self.model is not None else "",
            "uplink_bps": float(self.link.uplink_bps), "rtt_ms": float(self.link.rtt_ms),
            "queue_depth": self.pool.queued if self.pool is not None else 0}
        values.update(self._window.summary())
        if self.last_rollout.get("result") == "refused":  # the fleet sees why (fleet status)
            values["refused_digest"] = self.last_rollout["digest"]
            values["refused_reason"] = self.last_rollout["detail"][:_REASON_MAX]
        return DeviceStatus(**{k: v for k, v in values.items() if k in _STATUS_FIELDS})

    # -- requests -------------------------------------------------------------------------------

    async def infer(self, feeds: dict[str, np.ndarray],
                    options: RequestOptions = RequestOptions()) -> Answer | Deferred:
        """Answer one request (module docstring). Raises InvalidArgument for inputs the model
        does not take, ResourceExhausted when local compute or the spool is full, Unavailable
        while no bundle is loaded."""
        started = time.monotonic()
        model = self.model
        if model is None or self._state != "serving":
            raise Unavailable("no bundle is loaded yet" if self._state == "serving" else
                              "the daemon is not serving", retryable=True)
        if options.mode in ("cascade", "auto") and model.cascade is not None:
            return await model.cascade.infer(self, model, feeds, options, started)
        if options.mode == "cascade":
            raise FailedPrecondition(f"mode=cascade needs a cascade bundle; {model.name!r} has "
                                     "no small model (tandem compile --cascade)")
        decision: Decision | None = None
        model.acquire()
        try:
            key = model.runtime.check_inputs(feeds)
            t0 = time.perf_counter()
            if options.mode == "auto":
                decision = model.planner.decide(key, options.deadline_ms)
            else:
                decision = model.planner.forced(options.mode, options.cut_id, key)
            decide_s = time.perf_counter() - t0
            metrics = self.metrics
            assert metrics is not None
            metrics.decided(decision.plan.label, decide_s)
            if options.deferrable and decision.plan.offloads and options.mode == "cloud" and \
                    not self.link.available:
                assert self.spooler is not None
                return await self.spooler.defer(model, feeds, options)
            deadline = started + options.deadline_ms / 1000
            execute = self._executors.get(decision.plan.kind)
            if execute is None:
                raise FailedPrecondition(f"plan kind {decision.plan.kind!r} has no executor")
            outputs, info = await execute(model, decision, feeds, key, deadline,
                                          options.priority)
        except TandemError:
            if self.metrics is not None and decision is not None:
                self.metrics.failed(decision.plan.label, "local")
            raise
        finally:
            model.release()
        actual_ms = (time.monotonic() - started) * 1e3
        ran = info.pop("ran")
        fallback = ran == "fallback"
        parameters = {
            "plan": decision.plan.label, "ran": ran, "cut_id": decision.plan.cut_id,
            "encoding": decision.plan.encoding, "expected_ms": round(decision.estimate.total_ms, 3),
            "actual_ms": round(actual_ms, 3), "deadline_ms": options.deadline_ms,
            "deadline_met": actual_ms <= options.deadline_ms, "reason": decision.reason,
            "fallback": fallback, "decision_us": round(decide_s * 1e6, 1),
            "bundle": model.digest[:16], **info}
        metrics.answered(decision.plan.label, ran, actual_ms / 1e3)
        if fallback:
            metrics.fallbacks.labels(info.get("fallback_reason", "error")).inc()
        self._window.add(actual_ms, decision.plan.label, fallback)
        m = model.bundle.manifest
        return Answer(outputs, parameters, m.model_name, m.model_version)

    def record_answer(self, plan: str, ran: str, actual_ms: float,
                      fallback_reason: str | None = None, *, escalated: bool | None = None,
                      path: str | None = None) -> None:
        """Count an answer that another plan kind's code produced (metrics, heartbeat window);
        ``escalated``/``path``: a cascade's (see :mod:`tandem.edge._cascade_planner`)."""
        metrics = self.metrics
        if metrics is not None:
            metrics.answered(plan, ran, actual_ms / 1e3)
            if fallback_reason is not None:
                metrics.fallbacks.labels(fallback_reason).inc()
            if escalated is not None and path is not None:
                metrics.cascaded(path, escalated, actual_ms / 1e3)
        self._window.add(actual_ms, plan, fallback_reason is not None, escalated)

    async def _run_local_plan(self, model: ServingModel, decision: Decision,
                              feeds: dict[str, np.ndarray], key: Any, deadline: float,
                              priority: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return await self.run_local(model, feeds, key, priority)

    async def run_local(self, model: ServingModel, feeds: dict[str, np.ndarray], key: Any,
                        priority: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run the full model here (for executors of other plan kinds too)."""
        runtime = model.runtime

        def run() -> tuple[dict[str, np.ndarray], float]:
            t0 = time.perf_counter()
            out = runtime.run_full(feeds)
            return out, (time.perf_counter() - t0) * 1e3

        assert self.pool is not None
        outputs, ms = await self.pool.run(run, priority)
        model.cost.observe_local(runtime.full.path, key, ms)
        return outputs, {"ran": "local", "compute_ms": round(ms, 3)}

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``GET /v2/edge/status`` shows: bundle, backends, plans with their current
        estimates at the profile shapes, link, spool, rollout."""
        model = self.model
        out: dict[str, Any] = {
            "device_id": self.device_id, "state": self._state, "profile": self.detection,
            "broker": self.broker_url, "link": self.link.snapshot(),
            "uptime_s": round(time.monotonic() - self._started_s, 1),
            "rollout": self.last_rollout, "window": self._window.summary()}
        if model is not None:
            m = model.bundle.manifest
            key = tuple(model.table.shapes[t.name] for t in m.inputs)
            plans = []
            for plan in model.cost.plans():
                est = model.cost.estimate(plan, key)
                plans.append({"plan": plan.label, "encoding": plan.encoding,
                              "expected_ms": round(est.total_ms, 3),
                              "fallback_ms": round(est.fallback_ms, 3),
                              "tail_measured": est.tail_measured, **est.terms()})
            out["bundle"] = {"model": m.model_name, "version": m.model_version,
                             "digest": model.digest, "path": str(model.path),
                             "profile_shapes": {k: list(v) for k, v in model.table.shapes.items()},
                             "backends": dict(model.runtime.engine_status)}
            out["plans"] = plans
            if model.cascade is not None:
                out["cascade"] = model.cascade.status()
        return json.loads(json.dumps(out, default=str))
