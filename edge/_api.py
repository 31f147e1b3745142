"""The local API: the Open Inference Protocol (KServe v2) over HTTP, with Triton's binary tensor
extension, so ``tritonclient.http`` and KServe clients work unchanged. The bodies are
:mod:`tandem.protocol.kserve`'s (the same codec as the cloud endpoint's HTTP port).

    GET  /v2/health/live                      200 while the daemon runs
    GET  /v2/health/ready                     200 once a bundle is loaded and serving
    GET  /v2                                  server metadata
    GET  /v2/models/<m>[/versions/<v>]        model metadata (-1 for open dims)
    GET  /v2/models/<m>[/versions/<v>]/ready
    POST /v2/models/<m>[/versions/<v>]/infer  inference: JSON or binary tensors
    GET  /v2/spool                            spooled requests (id, state, times)
    GET  /v2/spool/<id>                       a spooled request's result (see below)
    GET  /v2/edge/status                      bundle, backends, plans and estimates, link
    GET  /metrics                             Prometheus exposition

Request ``parameters`` (all optional): ``mode`` (``auto`` | ``local`` | ``cloud`` |
``cascade`` | ``split:<cut id>``), ``deadline_ms`` (number > 0), ``priority`` (integer),
``deferrable`` (boolean). The response's ``parameters`` say which plan was chosen (``plan``),
where the result came from (``ran``: cloud | local | fallback), the expected and actual time
(``expected_ms``, ``actual_ms``), whether the deadline was met, and why the plan was chosen
(``reason``). On a cascade bundle (``mode=cascade``, or ``auto``) they add ``escalated``,
``escalation`` (none | cloud | skipped | failed), ``score``, ``threshold`` and ``rule``
(:mod:`tandem.edge._cascade_planner`).

A deferrable ``cloud`` request while the cloud is unreachable is answered **202 Accepted**
with ``{"id": …, "state": "pending", "result": "/v2/spool/<id>"}`` (and a ``Location``
header). ``GET /v2/spool/<id>`` then answers 202 while pending, the inference response (200, in
the JSON or binary form the original request asked for; or the cloud's error with its status)
**once**, and 410 Gone afterwards; 404 for an id it does not know.

Errors are ``{"error": "<one line>", "code": …, "retryable": …}`` with the status of
:func:`tandem.protocol.kserve.http_status` (400 malformed, 404 unknown model, 413 over
``max_body_mb``, 429 local compute or spool full, 503 not ready). A bad request never affects
another one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from tandem.edge._config import parse_mode
from tandem.edge._daemon import Answer, Deferred, EdgeDaemon, RequestOptions
from tandem.protocol.errors import (
    InternalError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    TandemError,
)
from tandem.protocol.lazy import require

__all__ = ["LocalApi"]

log = logging.getLogger("tandem.edge.api")

_BIG_BODY = 256 * 1024  # decode and encode bodies larger than this off the event loop
_DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64",
              "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
              "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
              "bool": "BOOL", "string": "BYTES"}
_KNOWN_PARAMETERS = ("mode", "deadline_ms", "priority", "deferrable")


def _datatype(manifest_dtype: str) -> str:
    return _DATATYPES.get(manifest_dtype, manifest_dtype.upper())


def _tandem_version() -> str:
    try:
        return version("tandem-rt")
    except PackageNotFoundError:
        return "0"


def request_options(params: dict[str, Any], default_mode: str,
                    default_deadline_ms: float) -> RequestOptions:
    """The daemon's options from a request's ``parameters`` (InvalidArgument naming the bad
    one). Other parameters (``binary_data_output``…) are left to the codec."""
    mode, cut = parse_mode(params.get("mode", default_mode))
    deadline = params.get("deadline_ms", default_deadline_ms)
    if type(deadline) not in (int, float) or not math.isfinite(deadline) or \
            not 0 < deadline <= 86_400_000:
        raise InvalidArgument(f"parameters.deadline_ms must be a number in (0, 86400000], not "
                              f"{str(deadline)[:40]!r}")
    priority = params.get("priority", 0)
    if type(priority) is not int or not -1_000_000 <= priority <= 1_000_000:
        raise InvalidArgument(f"parameters.priority must be an integer, not "
                              f"{str(priority)[:40]!r}")
    deferrable = params.get("deferrable", False)
    if type(deferrable) is not bool:
        raise InvalidArgument("parameters.deferrable must be a boolean")
    return RequestOptions(mode=mode, cut_id=cut, deadline_ms=float(deadline),
                          priority=priority, deferrable=deferrable)


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _params(values: dict[str, Any]) -> dict[str, Any]:
    """Response parameters as the codec takes them: booleans, numbers, strings."""
    out = {}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v if type(v) in (bool, int, float, str) else str(v)
    return out


class LocalApi:
    """The HTTP server of one :class:`~tandem.edge._daemon.EdgeDaemon`."""

    def __init__(self, daemon: EdgeDaemon, host: str, port: int, *,
                 max_body_bytes: int = 64 << 20) -> None:
        self.daemon = daemon
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self._runner: Any = None
        kserve = require("tandem.protocol.kserve")
        self.kserve = kserve
        self.limits = kserve.Limits(max_body_bytes=max_body_bytes,
                                    max_header_bytes=max_body_bytes)

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        web = require("aiohttp.web", "edge")
        app = web.Application(client_max_size=self.max_body_bytes,
                              middlewares=[self._errors_middleware(web)])
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_post(prefix + "/infer", self.infer)
        r.add_get("/v2/spool", self.spool_list)
        r.add_get("/v2/spool/{id}", self.spool_result)
        r.add_get("/v2/edge/status", self.status)
        r.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- errors ---------------------------------------------------------------------------------

    def _errors_middleware(self, web: Any) -> Any:
        kserve = self.kserve
        metrics = self.daemon.metrics

        def respond(status: int, exc: TandemError) -> Any:
            exc.message = _one_line(exc.message)
            if metrics is not None:
                metrics.api_errors.labels(str(status)).inc()
            return web.Response(status=status, body=kserve.error_body(exc),
                                content_type="application/json")

        @web.middleware
        async def errors(request: Any, handler: Any) -> Any:
            try:
                return await handler(request)
            except TandemError as exc:
                return respond(kserve.http_status(exc), exc)
            except web.HTTPRequestEntityTooLarge:
                return respond(413, PayloadTooLarge(
                    f"request body over {self.max_body_bytes} bytes (max_body_mb)"))
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                err = (NotFound if exc.status == 404 else InvalidArgument)(
                    f"{exc.reason}: {request.method} {request.path[:200]}")
                return respond(exc.status, err)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:
                log.exception("the local API failed on %s %s", request.method,
                              request.path[:200])
                return respond(500, InternalError(f"{type(exc).__name__}: {exc}"))

        return errors

    # -- health and metadata --------------------------------------------------------------------

    def _json(self, doc: Any, status: int = 200) -> Any:
        web = require("aiohttp.web", "edge")
        return web.Response(status=status, body=json.dumps(doc).encode(),
                            content_type="application/json")

    async def live(self, request: Any) -> Any:
        web = require("aiohttp.web", "edge")
        return web.Response(status=200 if self.daemon.live else 503)

    async def ready(self, request: Any) -> Any:
        web = require("aiohttp.web", "edge")
        return web.Response(status=200 if self.daemon.ready else 503)

    async def server_metadata(self, request: Any) -> Any:
        return self._json(self.kserve.server_metadata("tandem-edge", _tandem_version()))

    def _model(self, request: Any) -> Any:
        model = self.daemon.model
        name = request.match_info["model"]
        if model is None:
            raise NotFound(f"model {name[:128]!r} is not loaded (no bundle yet)")
        m = model.bundle.manifest
        if name != m.model_name:
            raise NotFound(f"unknown model {name[:128]!r} (this daemon serves "
                           f"{m.model_name!r})")
        wanted = request.match_info.get("version")
        if wanted is not None and wanted != m.model_version:
            raise NotFound(f"model {name!r} has no version {wanted[:64]!r} (serving "
                           f"{m.model_version!r})")
        return model

    async def model_metadata(self, request: Any) -> Any:
        model = self._model(request)
        m = model.bundle.manifest
        doc = self.kserve.model_metadata(
            m.model_name, [m.model_version], "tandem_edge",
            [(t.name, _datatype(t.dtype), t.shape) for t in m.inputs],
            [(t.name, _datatype(t.dtype), t.shape) for t in m.outputs],
            {"bundle_digest": model.digest,
             "cuts": ",".join(str(c.id) for c in m.cuts)})
        return self._json(doc)

    async def model_ready(self, request: Any) -> Any:
        web = require("aiohttp.web", "edge")
        self._model(request)
        return web.Response(status=200 if self.daemon.ready else 503)

    async def status(self, request: Any) -> Any:
        return self._json(self.daemon.status())

    async def metrics(self, request: Any) -> Any:
        web = require("aiohttp.web", "edge")
        if self.daemon.metrics is None:
            return web.Response(status=503)
        body, content_type = self.daemon.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- inference ------------------------------------------------------------------------------

    async def infer(self, request: Any) -> Any:
        web = require("aiohttp.web", "edge")
        kserve = self.kserve
        model = self._model(request)
        body = await request.read()
        header_length = request.headers.get(kserve.HEADER_LENGTH)
        loop = asyncio.get_running_loop()
        if len(body) > _BIG_BODY:
            req = await loop.run_in_executor(None, kserve.decode_request, body, header_length,
                                             self.limits)
        else:
            req = kserve.decode_request(body, header_length, self.limits)
        cfg = self.daemon.config
        options = request_options(dict(req.parameters), cfg.mode, cfg.deadline_ms)
        names = set(self.daemon.model.runtime.output_names) if self.daemon.model else set()
        unknown = [o.name for o in req.outputs if o.name not in names]
        if unknown:
            raise InvalidArgument(f"unknown output(s) {[u[:64] for u in unknown[:8]]} requested "
                                  f"(the model has {sorted(names)})")
        if options.deferrable:
            fmt = {"binary_data_output": req.binary_data_output, "id": req.id,
                   "outputs": [[o.name, o.binary_data] for o in req.outputs]}
            options = RequestOptions(options.mode, options.cut_id, options.deadline_ms,
                                     options.priority, True, fmt)
        feeds = req.feeds()
        for name, arr in list(feeds.items()):
            if arr.dtype == object:
                raise InvalidArgument(f"input {name!r}: BYTES tensors are not model inputs here")
        del model
        result = await self.daemon.infer(feeds, options)
        if isinstance(result, Deferred):
            doc = {"id": result.id, "model_name": result.model, "state": "pending",
                   "result": f"/v2/spool/{result.id}"}
            return web.Response(status=202, body=json.dumps(doc).encode(),
                                content_type="application/json",
                                headers={"Location": f"/v2/spool/{result.id}"})
        return await self._answer(result, req)

    async def _answer(self, answer: Answer, req: Any, params: dict[str, Any] | None = None
                      ) -> Any:
        web = require("aiohttp.web", "edge")
        kserve = self.kserve
        outputs = tuple(kserve.InferTensor.from_array(n, a) for n, a in answer.outputs.items()
                        if req.selects(n))
        response = kserve.InferResponse(answer.model, outputs, answer.version or None,
                                        req.id, _params(params or answer.parameters))
        if sum(int(a.nbytes) for a in answer.outputs.values()) > _BIG_BODY:
            body, header_length = await asyncio.get_running_loop().run_in_executor(
                None, kserve.encode_response, response, req)
        else:
            body, header_length = kserve.encode_response(response, req)
        return web.Response(body=body, headers=kserve.response_headers(header_length))

    # -- the spool ------------------------------------------------------------------------------

    async def spool_list(self, request: Any) -> Any:
        spooler = self.daemon.spooler
        if spooler is None:
            return self._json({"requests": []})
        rows = await spooler.call(spooler.spool.list, 100)
        counts = await spooler.call(spooler.spool.counts)
        return self._json({"counts": counts, "requests": rows})

    async def spool_result(self, request: Any) -> Any:
        kserve = self.kserve
        rid = request.match_info["id"]
        if self.daemon.spooler is None:
            raise NotFound("no spool")
        state, found = await self.daemon.spooler.result(rid)
        if state == "pending":
            return self._json({"id": rid, "state": "pending"}, status=202)
        if state == "delivered":
            return self._json({"error": f"the result of {rid} was already delivered",
                               "code": "NOT_FOUND", "retryable": False, "state": "delivered"},
                              status=410)
        outputs, info, fmt = found
        if outputs is None:
            from tandem.protocol.errors import Code, error_class

            code = info.get("code", "INTERNAL")
            if isinstance(code, int):
                code = Code(code).name if code in Code._value2member_map_ else "UNKNOWN"
            exc = error_class(Code[code] if code in Code.__members__ else Code.UNKNOWN)(
                info.get("error", "the cloud did not compute the request"))
            return self._json({"error": _one_line(exc.message), "code": exc.code.name,
                               "retryable": False, "id": rid}, status=kserve.http_status(exc))
        fmt = fmt or {}
        req = kserve.InferRequest(
            (), tuple(kserve.RequestedOutput(n, {} if b is None else {"binary_data": b})
                      for n, b in fmt.get("outputs", [])),
            fmt.get("id"), {"binary_data_output": bool(fmt.get("binary_data_output"))})
        answer = Answer(outputs, {}, info.get("model", ""))
        return await self._answer(answer, req, {**info, "spool_id": rid, "plan": "cloud",
                                                "deferred": True})
