"""The local KServe v2 API over a real HTTP socket: tritonclient.http unchanged (binary and
JSON), per-request parameters, metadata, malformed and oversize requests, the spool endpoint,
metrics, and the edge clients. The cloud is an in-process responder (tests/e2e run a real
broker and a real worker)."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import threading

import numpy as np
import pytest

from tandem.edge import AsyncClient, Client, Deferred, InferResult
from tandem.protocol.errors import InvalidArgument, NotFound, ResourceExhausted
from tandem.protocol.transport import MemoryBroker, MemoryTransport, TransportConfig
from tests.edge.conftest import (
    MemoryCloud,
    RequestStream,
    assert_matches,
    make_config,
    reference,
    send_malformed,
)

httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("aiohttp")


class ApiEnv:
    """A daemon + its API on a free port in a thread of its own, beside a MemoryCloud."""

    def __init__(self, tmp_path, bundle, **overrides):
        self.broker = MemoryBroker()
        self.bundle = bundle
        self.config = make_config(tmp_path, bundle, api_port=0, **overrides)
        self.daemon = None
        self.port = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name="edge-api-test")
        self._thread.start()
        assert self._ready.wait(60), "the daemon did not start"
        if self._failed:
            raise self._failed
        return self

    def _run(self):
        from tandem.edge import serve

        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            self.cloud = MemoryCloud(self.broker, self.bundle)
            await self.cloud.start()

            def ready(daemon, port):
                self.daemon, self.port = daemon, port

            try:
                task = asyncio.ensure_future(serve(
                    self.config, ready=ready, stop=self.stop, progress=False,
                    transport_factory=lambda: MemoryTransport(self.broker, TransportConfig(
                        client_id="edge-cam-test"))))
                while self.port is None and not task.done():
                    await asyncio.sleep(0.01)
                while self.daemon is not None and self.daemon.transport is None and \
                        not task.done():
                    await asyncio.sleep(0.01)
                self._ready.set()
                await task
            finally:
                await self.cloud.stop()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._failed = exc
            self._ready.set()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()

    @property
    def url(self):
        return f"127.0.0.1:{self.port}"

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.headers
        finally:
            conn.close()


@pytest.fixture
def api(tmp_path, residual_bundle):
    with ApiEnv(tmp_path, residual_bundle) as env:
        yield env


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)


def test_health_and_metadata(api):
    client = httpclient.InferenceServerClient(api.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("residual")
    meta = client.get_model_metadata("residual")
    assert meta["name"] == "residual" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16]}]
    assert meta["outputs"][0]["name"] == "logits"
    assert client.get_server_metadata()["name"] == "tandem-edge"
    status, body, _ = api.raw("GET", "/v2/models/nope")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    assert api.raw("GET", "/v2/models/residual/versions/9")[0] == 404
    assert api.raw("GET", "/v2/models/residual/versions/1")[0] == 200
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_unchanged(api, binary):
    client = httpclient.InferenceServerClient(api.url)
    x = _x(1)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    for mode in ("local", "cloud", "auto"):
        result = client.infer("residual", [inp], outputs=[out], parameters={"mode": mode})
        params = result.get_response()["parameters"]
        assert params["plan"] in ("local", "cloud") or params["plan"].startswith("split:")
        if mode != "auto":
            assert params["plan"] == mode
        assert_matches({"logits": result.as_numpy("logits")}, reference(api.bundle, {"input": x}),
                       api.daemon.model.bundle.manifest, params)
        assert params["actual_ms"] > 0 and params["expected_ms"] > 0 and params["reason"]
    client.close()


def test_request_parameters_are_checked(api):
    client = Client(f"http://{api.url}")
    x = {"input": _x()}
    cut = api.daemon.model.runtime.interior[0].id
    r = client.infer(x, mode=f"split:{cut}", deadline_ms=500, priority=3)
    assert isinstance(r, InferResult) and r.plan == f"split:{cut}" and r.ran == "cloud"
    for bad, match in [({"mode": "sideways"}, "mode must be"),
                       ({"mode": "split:999"}, "split:999 is not a plan"),
                       ({"deadline_ms": -1}, "deadline_ms must be a number"),
                       ({"deadline_ms": "soon"}, "deadline_ms must be a number"),
                       ({"priority": 1.5}, "priority must be an integer"),
                       ({"deferrable": "yes"}, "deferrable must be a boolean")]:
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16],
                                       "data": x["input"].ravel().tolist()}],
                           "parameters": bad}).encode()
        status, data, _ = api.raw("POST", "/v2/models/residual/infer", body)
        assert status == 400, (bad, data)
        assert match in json.loads(data)["error"]
    client.close()


def _bad_requests(x):
    good = {"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16],
            "data": x.ravel().tolist()}
    return [
        b"{not json",
        b"",
        b"[]",
        json.dumps({"inputs": []}).encode(),
        json.dumps({"inputs": [{**good, "name": "nope"}]}).encode(),
        json.dumps({"inputs": [{**good, "datatype": "INT32"}]}).encode(),
        json.dumps({"inputs": [{**good, "datatype": "FP64"}]}).encode(),
        json.dumps({"inputs": [{**good, "shape": [1, 3, 16, 15]}]}).encode(),
        json.dumps({"inputs": [{**good, "shape": [1, 3, 16]}]}).encode(),
        json.dumps({"inputs": [{**good, "data": [1, 2, 3]}]}).encode(),
        json.dumps({"inputs": [good, good]}).encode(),
        json.dumps({"inputs": [good], "outputs": [{"name": "nope"}]}).encode(),
        json.dumps({"inputs": [good], "extra": 1}).encode(),
        json.dumps({"inputs": [{**good, "datatype": "BYTES", "data": ["a"] * 768}]}).encode(),
        "{\"inputs\": [{\"name\": \"\udc80\"}]}".encode("utf-8", "surrogatepass"),
        b"{" * 100_000,
    ]


def test_malformed_requests_get_one_line_4xx_and_never_disturb_others(api):
    x = _x(2)
    want = reference(api.bundle, {"input": x})

    def check(r):
        np.testing.assert_allclose(r.outputs["logits"], want["logits"], rtol=1e-4, atol=1e-5)

    with RequestStream(f"http://{api.url}", {"input": x}, check, mode="local") as stream:
        assert len(send_malformed(api.port, _bad_requests(x))) == 1000
    assert stream.answers


def test_oversize_and_compressed_bombs_are_refused(tmp_path, residual_bundle):
    with ApiEnv(tmp_path, residual_bundle, max_body_mb=1) as api:
        status, data, _ = api.raw("POST", "/v2/models/residual/infer", b"x" * (2 << 20))
        assert status == 413 and "max_body_mb" in json.loads(data)["error"]
        bomb = gzip.compress(b"{" + b" " * (64 << 20))
        status, data, _ = api.raw("POST", "/v2/models/residual/infer", bomb,
                                  {"Content-Encoding": "gzip"})
        assert status == 413, data[:200]  # bounded after decompression too
        assert Client(f"http://{api.url}").infer({"input": _x()}, mode="local").ran == "local"


def test_deferrable_requests_are_spooled_and_fetched_once(api):
    client = Client(f"http://{api.url}")
    x = {"input": _x(5)}
    api.broker.stop()
    deadline = threading.Event()
    for _ in range(500):
        if not api.daemon.link.available:
            break
        deadline.wait(0.01)
    pending = client.infer(x, mode="cloud", deferrable=True)
    assert isinstance(pending, Deferred)
    status, data, _ = api.raw("GET", f"/v2/spool/{pending.id}")
    assert status == 202 and json.loads(data)["state"] == "pending"
    assert client.result(pending.id) is None
    listing = json.loads(api.raw("GET", "/v2/spool")[1])
    assert listing["counts"]["pending"] == 1
    api.broker.start()
    result = None
    for _ in range(400):
        result = client.result(pending.id)
        if result is not None:
            break
        deadline.wait(0.05)
    assert result is not None and result.parameters["deferred"] is True
    np.testing.assert_allclose(result.outputs["logits"], reference(api.bundle, x)["logits"],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(NotFound, match="already delivered"):
        client.result(pending.id)
    assert api.raw("GET", "/v2/spool/" + "f" * 32)[0] == 404
    assert api.raw("GET", "/v2/spool/../../etc/passwd")[0] == 404
    client.close()


def test_a_full_spool_refuses_clearly(tmp_path, residual_bundle):
    with ApiEnv(tmp_path, residual_bundle, spool_max_items=1) as api:
        client = Client(f"http://{api.url}")
        api.broker.stop()
        for _ in range(500):
            if not api.daemon.link.available:
                break
            threading.Event().wait(0.01)
        first = client.infer({"input": _x()}, mode="cloud", deferrable=True)
        assert isinstance(first, Deferred)
        with pytest.raises(ResourceExhausted, match="spool is full"):
            client.infer({"input": _x()}, mode="cloud", deferrable=True)
        # not deferrable: answered locally all the same
        assert client.infer({"input": _x()}, mode="cloud").ran == "fallback"
        client.close()


def test_metrics_and_status(api):
    client = Client(f"http://{api.url}")
    client.infer({"input": _x()}, mode="local")
    client.infer({"input": _x()}, mode="cloud")
    status, body, headers = api.raw("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("tandem_edge_latency_seconds_bucket", "tandem_edge_offload_ratio",
                 "tandem_edge_fallbacks_total", "tandem_edge_spool_requests",
                 "tandem_edge_uplink_bps", "tandem_edge_rtt_seconds",
                 "tandem_edge_plans_total", "tandem_edge_bundle_info"):
        assert name in text, name
    assert 'tandem_edge_requests_total{outcome="ok",plan="local",ran="local"} 1.0' in text
    # the latency histogram per plan, the offload ratio, the link estimates as numbers
    assert 'tandem_edge_latency_seconds_count{plan="local",ran="local"} 1.0' in text
    assert 'tandem_edge_latency_seconds_count{plan="cloud",ran="cloud"} 1.0' in text
    assert "tandem_edge_offload_ratio 0.5" in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("tandem_edge_rtt_seconds", "tandem_edge_uplink_bps",
                                  "tandem_edge_spool_requests"))}
    assert values["tandem_edge_rtt_seconds"] > 0 and values["tandem_edge_uplink_bps"] > 0
    assert values['tandem_edge_spool_requests{state="pending"}'] == 0
    st = client.status()
    assert st["bundle"]["model"] == "residual" and st["plans"] and "link" in st
    assert {p["plan"] for p in st["plans"]} >= {"local", "cloud"}
    client.close()


def test_async_client(api):
    async def main():
        async with AsyncClient(f"http://{api.url}") as client:
            assert await client.ready()
            results = await asyncio.gather(*(client.infer({"input": _x(i)}, mode="local")
                                             for i in range(8)))
            for i, r in enumerate(results):
                np.testing.assert_allclose(r.outputs["logits"],
                                           reference(api.bundle, {"input": _x(i)})["logits"],
                                           rtol=1e-4, atol=1e-5)
            with pytest.raises(InvalidArgument):
                await client.infer({"wrong": _x()})

    asyncio.run(main())


def test_busy_local_compute_answers_429(tmp_path, residual_bundle):
    with ApiEnv(tmp_path, residual_bundle, compute_threads=1, max_queued=1) as api:
        release, running = threading.Event(), threading.Event()
        runner = api.daemon.model.runtime.full
        original = runner.infer

        def slow(feeds):
            running.set()
            release.wait(10)
            return original(feeds)

        runner.infer = slow
        results = []

        def call():
            try:
                results.append(Client(f"http://{api.url}").infer({"input": _x()}, mode="local"))
            except Exception as exc:
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        threads[0].start()
        assert running.wait(10)  # one runs; of the next three, one may wait, two are refused
        for t in threads[1:]:
            t.start()
        for _ in range(500):
            if sum(isinstance(r, ResourceExhausted) for r in results) >= 2:
                break
            threading.Event().wait(0.01)
        release.set()
        for t in threads:
            t.join(30)
        assert sum(isinstance(r, ResourceExhausted) for r in results) == 2
        assert sum(isinstance(r, InferResult) for r in results) == 2
