"""The worker's HTTP port (aiohttp, loaded when the server starts).

    GET  /v2/health/live                     200 while the process serves or drains
    GET  /v2/health/ready                    200 when connected, subscribed, repository verified
    GET  /v2                                 server metadata (KServe v2)
    GET  /v2/models/<m>[/versions/<v>]       model metadata: inputs/outputs, -1 for open dims
    GET  /v2/models/<m>[/versions/<v>]/ready
    POST /v2/models/<m>[/versions/<v>]/infer whole-model inference (JSON or binary tensors)
    GET  /metrics                            Prometheus exposition
    GET  /v2/bundles                         the repository's bundles (JSON)
    GET  /v2/bundles/<digest>                the bundle as one archive (Range, ETag)
    GET  /v2/bundles/<digest>/manifest.json  its manifest (and manifest.sig when signed)
    GET  /v2/bundles/<digest>/files/<path>   one listed file (Range, ETag)

Inference goes through the same batchers as MQTT requests (cut 0 of the model's newest bundle,
or of ``version``). Request ``parameters``: ``deadline_ms`` (number > 0) and ``priority``
(integer); the response's ``parameters`` carry ``queue_ms``, ``compute_ms``, ``batch_size`` and
``worker_id``. Errors are ``{"error": "...", "code": "...", "retryable": ...}`` with the HTTP
status of :func:`tandem.protocol.kserve.http_status`.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tandem.protocol import kserve
from tandem.protocol.bundle import MANIFEST_NAME, SIGNATURE_NAME, pack
from tandem.protocol.errors import InvalidArgument, NotFound, TandemError
from tandem.protocol.lazy import require

__all__ = ["HttpServer"]

log = logging.getLogger("tandem.cloud.http")

_BIG_BODY = 256 * 1024  # parse bodies larger than this off the event loop
_PLATFORM = "onnxruntime_onnx"
_NUMPY_DTYPE_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16",
                      "float64": "FP64", "int8": "INT8", "int16": "INT16", "int32": "INT32",
                      "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
                      "uint64": "UINT64", "bool": "BOOL", "string": "BYTES"}


def _datatype(manifest_dtype: str) -> str:
    return _NUMPY_DTYPE_NAMES.get(manifest_dtype, manifest_dtype.upper())


class HttpServer:
    def __init__(self, worker: Any, host: str, port: int,
                 limits: kserve.Limits = kserve.DEFAULT_LIMITS) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self.limits = limits
        self._runner: Any = None
        self._archives: dict[str, Path] = {}
        self._archive_dir: tempfile.TemporaryDirectory | None = None
        self._archive_lock = asyncio.Lock()

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        web = require("aiohttp.web", "cloud")
        app = web.Application(client_max_size=self.limits.max_body_bytes,
                               middlewares=[web.middleware(_bound(self._errors))])
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/metrics", self.metrics)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_post(prefix + "/infer", self.infer)
        r.add_get("/v2/bundles", self.bundles)
        r.add_get("/v2/bundles/{digest}", self.bundle_archive)
        r.add_get("/v2/bundles/{digest}/" + MANIFEST_NAME, self.bundle_manifest)
        r.add_get("/v2/bundles/{digest}/" + SIGNATURE_NAME, self.bundle_signature)
        r.add_get("/v2/bundles/{digest}/files/{path:.+}", self.bundle_file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise InvalidArgument(f"cannot listen on {self.host}:{self.port}: "
                                  f"{exc.strerror}") from exc
        addresses = self._runner.addresses
        if addresses:
            self.port = addresses[0][1]
        log.info("HTTP on http://%s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._archive_dir is not None:
            self._archive_dir.cleanup()
            self._archive_dir = None

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _json(doc: Any, status: int = 200) -> Any:
        web = require("aiohttp.web", "cloud")
        return web.json_response(doc, status=status)

    @staticmethod
    def _error(exc: TandemError) -> Any:
        web = require("aiohttp.web", "cloud")
        headers = {"Content-Type": kserve.CONTENT_TYPE_JSON}
        if exc.retryable:
            headers["Retry-After"] = "1"
        return web.Response(status=kserve.http_status(exc), body=kserve.error_body(exc),
                            headers=headers)

    async def _errors(self, request: Any, handler: Any) -> Any:
        """Tandem errors become KServe error bodies; aiohttp's own 4xx keep their status but
        get the same body shape; anything else is our bug (500, logged)."""
        web = require("aiohttp.web", "cloud")
        try:
            return await handler(request)
        except TandemError as exc:
            return self._error(exc)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return web.Response(status=exc.status, body=kserve.error_body(exc.reason),
                                    content_type="application/json")
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return web.Response(status=500, body=kserve.error_body("internal error"),
                                content_type="application/json")

    # -- health, metadata, metrics --------------------------------------------------------------

    async def live(self, request: Any) -> Any:
        ok = self.worker.live
        return self._json({"live": ok}, 200 if ok else 503)

    async def ready(self, request: Any) -> Any:
        ok = self.worker.ready
        return self._json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(self, request: Any) -> Any:
        from importlib.metadata import version

        return self._json(kserve.server_metadata("tandem", version("tandem-rt")))

    async def metrics(self, request: Any) -> Any:
        web = require("aiohttp.web", "cloud")
        body, content_type = self.worker.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def model_metadata(self, request: Any) -> Any:
        name = request.match_info["model"]
        entry = self.worker.repo.by_name(name, request.match_info.get("version"))
        m = entry.manifest
        doc = kserve.model_metadata(
            name, self.worker.repo.versions(name), _PLATFORM,
            [(t.name, _datatype(t.dtype), t.shape) for t in m.inputs],
            [(t.name, _datatype(t.dtype), t.shape) for t in m.outputs],
            parameters={"bundle_digest": entry.digest, "source_digest": entry.source_digest,
                        "cuts": ",".join(str(c) for c in sorted(entry.parts))})
        return self._json(doc)

    async def model_ready(self, request: Any) -> Any:
        name = request.match_info["model"]
        self.worker.whole_model(name, request.match_info.get("version"))
        return self._json({"name": name, "ready": self.worker.ready},
                          200 if self.worker.ready else 503)

    # -- inference ------------------------------------------------------------------------------

    async def infer(self, request: Any) -> Any:
        web = require("aiohttp.web", "cloud")
        name = request.match_info["model"]
        version = request.match_info.get("version")
        error: TandemError | None = None
        try:
            part = self.worker.whole_model(name, version)
            body = await request.read()
            header_length = request.headers.get(kserve.HEADER_LENGTH)
            if len(body) > _BIG_BODY:
                infer = await asyncio.get_running_loop().run_in_executor(
                    None, kserve.decode_request, body, header_length, self.limits)
            else:
                infer = kserve.decode_request(body, header_length, self.limits)
            deadline_ms, priority = _request_options(infer)
            feeds = _feeds_for(part, infer)
            outcome = await self.worker.infer_arrays(part, feeds, deadline_ms=deadline_ms,
                                                     priority=priority)
            if outcome.error is not None:
                raise outcome.error
            manifest = part.bundle.manifest
            outputs = tuple(kserve.InferTensor.from_array(n, np.asarray(outcome.outputs[n]))
                            for n in (t.name for t in manifest.outputs) if n in outcome.outputs)
            response = kserve.InferResponse(
                manifest.model_name, outputs, manifest.model_version, infer.id,
                {"queue_ms": round(outcome.queue_ms, 3),
                 "compute_ms": round(outcome.compute_ms, 3),
                 "batch_size": outcome.batch_size, "worker_id": self.worker.worker_id})
            out_body, n = kserve.encode_response(response, infer)
            return web.Response(body=out_body, headers=kserve.response_headers(n))
        except TandemError as exc:
            error = exc
            return self._error(exc)
        finally:
            self.worker.count_http(name, error)

    # -- bundles ------------------------------------------------------------------------------

    async def bundles(self, request: Any) -> Any:
        docs = [{"digest": e.digest, "model_name": e.model_name, "model_version": e.model_version,
                 "source_digest": e.source_digest, "signed": e.bundle.signed,
                 "url": f"/v2/bundles/{e.digest}"}
                for e in self.worker.repo.entries]
        return self._json({"bundles": docs})

    def _entry(self, request: Any) -> Any:
        digest = request.match_info["digest"]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise NotFound(f"not a bundle digest: {digest[:80]!r}")
        return self.worker.repo.bundle(digest)

    async def bundle_manifest(self, request: Any) -> Any:
        entry = self._entry(request)
        return self._file(entry.bundle.root / MANIFEST_NAME, "application/json")

    async def bundle_signature(self, request: Any) -> Any:
        entry = self._entry(request)
        path = entry.bundle.root / SIGNATURE_NAME
        if not path.is_file():
            raise NotFound(f"bundle {entry.digest[:12]} is not signed")
        return self._file(path, "text/plain")

    async def bundle_file(self, request: Any) -> Any:
        entry = self._entry(request)
        path = entry.bundle.path_of(request.match_info["path"])  # listed files only
        return self._file(path, "application/octet-stream")

    async def bundle_archive(self, request: Any) -> Any:
        entry = self._entry(request)
        if entry.is_archive:
            path = entry.path
        else:
            path = await self._archive_of(entry)
        headers = {"Content-Disposition":
                   f'attachment; filename="{entry.model_name}-{entry.digest[:12]}.tar.zst"'}
        return self._file(path, "application/zstd", headers)

    async def _archive_of(self, entry: Any) -> Path:
        """A directory bundle packed once (deterministic archive) and kept while served."""
        async with self._archive_lock:
            path = self._archives.get(entry.digest)
            if path is not None and path.is_file():
                return path
            if self._archive_dir is None:
                self._archive_dir = tempfile.TemporaryDirectory(prefix="tandem-cloud-archives-")
            path = Path(self._archive_dir.name) / f"{entry.digest}.tar.zst"
            await asyncio.get_running_loop().run_in_executor(None, pack, entry.bundle.root, path)
            self._archives[entry.digest] = path
            return path

    @staticmethod
    def _file(path: Path, content_type: str, headers: dict[str, str] | None = None) -> Any:
        """aiohttp's FileResponse: Range (206 and 416), If-Range, ETag, sendfile."""
        web = require("aiohttp.web", "cloud")
        if not path.is_file():
            raise NotFound(f"{path.name} is gone")
        return web.FileResponse(path, headers={"Content-Type": content_type, **(headers or {})})


def _bound(method: Any) -> Any:
    async def middleware(request: Any, handler: Any) -> Any:
        return await method(request, handler)

    return middleware


def _request_options(infer: kserve.InferRequest) -> tuple[float | None, int]:
    params = infer.parameters
    deadline = params.get("deadline_ms")
    if deadline is not None and (type(deadline) not in (int, float) or not deadline > 0):
        raise InvalidArgument("parameters.deadline_ms must be a number > 0")
    priority = params.get("priority", 0)
    if type(priority) is not int:
        raise InvalidArgument("parameters.priority must be an integer")
    return deadline, priority


def _feeds_for(part: Any, infer: kserve.InferRequest) -> dict[str, np.ndarray]:
    expected = {t.name: t for t in part.cut.frontier}
    feeds = {}
    for t in infer.inputs:
        spec = expected.get(t.name)
        if spec is None:
            raise InvalidArgument(f"model {part.bundle.model_name!r} has no input {t.name!r} "
                                  f"(inputs: {sorted(expected)})")
        want = _datatype(spec.dtype)
        if t.datatype != want:
            raise InvalidArgument(f"input {t.name!r} must be {want}, not {t.datatype}")
        if len(t.shape) != len(spec.shape) or any(
                type(d) is int and d != s for d, s in zip(spec.shape, t.shape, strict=True)):
            raise InvalidArgument(f"input {t.name!r} has shape {list(t.shape)}, the model takes "
                                  f"{kserve.metadata_shape(spec.shape)}")
        feeds[t.name] = t.data
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise InvalidArgument(f"missing input(s) {missing}")
    return feeds
