"""Fixtures for the edge daemon's tests: compiled example bundles (once per session), a
config for a daemon in a temporary state directory, and an in-process cloud (a responder on a
MemoryBroker that runs the bundle's tails with ONNX Runtime, as a worker would) so the daemon's
logic is tested without a broker process. Whole-system runs with a real mosquitto and a real
``tandem cloud serve`` are in tests/e2e."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from tandem.edge import EdgeConfig
from tandem.protocol import topics
from tandem.protocol.errors import Code
from tandem.protocol.messages import ErrorInfo, InferenceResponse, Timings

pytest.importorskip("onnxruntime")


def compile_example(directory: Path, kind: str, **options) -> Path:
    from tandem.compiler import BundleFromOnnx, CompileOptions
    from tandem.compiler import examples as ex

    model = ex.save(getattr(ex, kind)(), directory / f"{kind}.onnx")
    out = directory / f"{kind}.bundle"
    if out.exists():
        shutil.rmtree(out)
    BundleFromOnnx(model, out, CompileOptions(targets=("onnxruntime",), **options))()
    return out


@pytest.fixture(scope="session")
def residual_bundle(tmp_path_factory) -> Path:
    return compile_example(tmp_path_factory.mktemp("bundles"), "residual")


@pytest.fixture(scope="session")
def dynamic_hw_bundle(tmp_path_factory) -> Path:
    return compile_example(tmp_path_factory.mktemp("bundles"), "dynamic_hw",
                           input_shapes={"image": (1, 3, 32, 32)})


@pytest.fixture(scope="session")
def multi_io_bundle(tmp_path_factory) -> Path:
    return compile_example(tmp_path_factory.mktemp("bundles"), "multi_io")


def make_config(tmp_path: Path, bundle: Path | None, **overrides) -> EdgeConfig:
    values = dict(bundle=bundle, device_id="cam-test", state_dir=tmp_path / "state",
                  profile="cpu-x86_64", profile_runs=3, profile_warmup=1, advertise=False,
                  probe_interval_s=0.2, heartbeat_s=0.5, deadline_ms=2000.0)
    values.update(overrides)
    return EdgeConfig(**values)


def reference(bundle: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The full model's outputs, run directly with ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "parts" / "full.onnx"),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def assert_matches(answer_outputs, want, manifest, parameters) -> None:
    """Outputs equal the full model's within the tolerance the compiler verified for the
    encoding the plan used (raw: float32 round-off)."""
    enc = parameters.get("encoding", "raw")
    tol = 1e-5
    if parameters.get("ran") == "cloud" and enc != "raw":
        tol = manifest.cut(parameters["cut_id"]).verification.encodings[enc].tolerance
    for name, ref in want.items():
        np.testing.assert_allclose(answer_outputs[name], ref, rtol=max(tol, 1e-4), atol=tol)


class MemoryCloud:
    """A cloud worker on a MemoryBroker for unit tests: runs the tail of any cut of ``bundle``
    and answers link probes (requests without tensors) at once, empty, as a worker does
    (``probes`` counts them; they are not in ``requests``).

    ``stall`` (an asyncio.Event, set = stalled) holds answers back; ``error`` answers every
    request with that code; ``compute_ms`` is reported in the timings."""

    def __init__(self, broker, bundle: Path) -> None:
        from tandem.protocol.bundle import load_bundle

        self.broker = broker
        self.bundle = load_bundle(bundle)
        self.transport = None
        self.requests: list = []
        self.probes = 0
        self.error: Code | None = None
        self.stalled = False
        self._backends: dict[str, object] = {}

    def _tail(self, cut_id: int):
        from tandem.devices.backends import OnnxRuntimeBackend

        cut = self.bundle.manifest.cut(cut_id)
        if cut.tail_part is None:
            raise KeyError(cut_id)
        if cut.tail_part not in self._backends:
            self._backends[cut.tail_part] = OnnxRuntimeBackend(
                self.bundle.path_of(cut.tail_part)).activate()
        return self._backends[cut.tail_part]

    async def start(self) -> None:
        from tandem.protocol.transport import MemoryTransport, TransportConfig

        self.transport = MemoryTransport(self.broker, TransportConfig(client_id="cloud"))
        await self.transport.connect()
        await self.transport.serve(topics.request_filter("workers"), self._handle,
                                   max_concurrency=8)

    async def _handle(self, request, context):
        from tandem.protocol.tensors import Tensor

        while self.stalled:
            await asyncio.sleep(0.01)
        if not request.tensors:
            self.probes += 1
            return InferenceResponse(id=request.id, worker_id="memory-cloud")
        self.requests.append(request)
        while self.stalled:
            await asyncio.sleep(0.01)
        if self.error is not None:
            return InferenceResponse(id=request.id, error=ErrorInfo(self.error, "test error",
                                                                    self.error in (5, 6)))
        try:
            backend = self._tail(request.cut_id)
        except KeyError:
            return InferenceResponse(id=request.id, error=ErrorInfo(Code.NOT_FOUND,
                                                                    "no tail for this cut"))
        feeds = {t.name: t.to_array() for t in request.tensors}
        out = await asyncio.get_running_loop().run_in_executor(None, backend.infer, feeds)
        return InferenceResponse(id=request.id, worker_id="memory-cloud",
                                 outputs=tuple(Tensor.from_array(n, a) for n, a in out.items()),
                                 timings=Timings(queue_ms=0.1, compute_ms=0.5))

    async def stop(self) -> None:
        if self.transport is not None:
            await self.transport.close()
        for b in self._backends.values():
            b.deactivate()
        self.bundle.close()


class RequestStream:
    """Valid requests sent one after another by a thread (``tandem.edge.Client``) while the
    ``with`` block runs, each checked with ``check(result)``. ``answers`` holds every answer's
    parameters and ``sent`` counts the requests; the first failure ends the stream and is raised
    when the block ends."""

    def __init__(self, url: str, feeds, check, **options) -> None:
        self.url, self.feeds, self.check, self.options = url, feeds, check, options
        self.answers: list[dict] = []
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-stream")

    def _run(self) -> None:
        from tandem.edge import Client

        with Client(self.url) as client:
            while not self._stop.is_set():
                self.sent += 1
                try:
                    r = client.infer(self.feeds, **self.options)
                    self.check(r)
                    self.answers.append(r.parameters)
                except BaseException as exc:
                    self.error = exc
                    return

    def __enter__(self) -> RequestStream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


def send_malformed(port: int, bodies: list[bytes], n: int = 1000) -> list[int]:
    """POST ``n`` malformed bodies (cycling through ``bodies``; every 7th with a binary header
    length that lies) on one kept-alive connection; each must get a 4xx with a one-line JSON
    error. The statuses."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    try:
        for i in range(n):
            body = bodies[i % len(bodies)]
            headers = {"Content-Type": "application/json"}
            if i % 7 == 3:
                headers["Inference-Header-Content-Length"] = str(len(body) + 10)
            conn.request("POST", "/v2/models/residual/infer", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            statuses.append(resp.status)
            assert 400 <= resp.status < 500, (body[:80], resp.status, data[:200])
            doc = json.loads(data)
            assert doc["error"] and "\n" not in doc["error"]
    finally:
        conn.close()
    return statuses
