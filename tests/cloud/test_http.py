"""The worker's HTTP port: health, Prometheus metrics, KServe v2 inference (tritonclient and raw
bodies), model metadata, bundle downloads with Range."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tandem.protocol import kserve
from tandem.protocol.bundle import load_bundle
from tests.cloud.conftest import broker_url, request_for

pytestmark = pytest.mark.broker


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(port: int, path: str, body: bytes, headers: dict | None = None
         ) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def http_worker(mosquitto, run_worker, repo):
    return run_worker(repo=repo, broker=broker_url(mosquitto), http_port=0)


def test_health_metadata_and_metrics(http_worker):
    port = http_worker.http_port
    assert get(port, "/v2/health/live")[0] == 200
    assert json.loads(get(port, "/v2/health/ready")[2]) == {"ready": True}
    status, _, body = get(port, "/v2/models/dynamic_batch")
    doc = json.loads(body)
    assert status == 200 and doc["inputs"] == [{"name": "x", "datatype": "FP32",
                                                "shape": [-1, 3, 16, 16]}]
    assert doc["outputs"][0]["shape"] == [-1, 10] and doc["versions"] == ["1"]
    status, _, body = get(port, "/v2/models/nope")
    assert status == 404 and "unknown model" in json.loads(body)["error"]
    assert json.loads(get(port, "/v2")[2])["extensions"] == ["binary_tensor_data"]
    status, headers, body = get(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in ("tandem_cloud_requests_total", "tandem_cloud_queue_seconds",
                 "tandem_cloud_compute_seconds", "tandem_cloud_batch_size",
                 "tandem_cloud_inflight", "tandem_cloud_decode_errors_total",
                 'tandem_cloud_bundles{state="served"} 2.0'):
        assert name in text or name.split("{")[0] in text, name


def test_tritonclient_infers_with_binary_and_json(http_worker, compiled):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient not installed")
    request, expected = request_for(compiled["dynamic_batch"], 0)
    x = request.tensors[0].to_array()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_worker.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("dynamic_batch")
        for binary in (True, False):
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("y", binary_data=binary)
            result = client.infer("dynamic_batch", [inp], outputs=[out], request_id="r1")
            np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-5,
                                       atol=1e-5)
            assert result.get_response()["id"] == "r1"
        with pytest.raises(Exception, match="has no input"):
            bad = httpclient.InferInput("z", list(x.shape), "FP32")
            bad.set_data_from_numpy(x)
            client.infer("dynamic_batch", [bad])
    finally:
        client.close()


def test_http_infer_errors_and_batching_with_mqtt(http_worker, compiled):
    port = http_worker.http_port
    x = np.zeros((2, 3, 16, 16), np.float32)
    body, n = kserve.encode_request(kserve.InferRequest(
        (kserve.InferTensor.from_array("x", x),), parameters={"priority": 1,
                                                              "deadline_ms": 5000}))
    status, headers, out = post(port, "/v2/models/dynamic_batch/infer", body,
                                {kserve.HEADER_LENGTH: str(n)})
    assert status == 200, out
    resp = kserve.decode_response(out, headers.get(kserve.HEADER_LENGTH))
    assert resp.outputs[0].shape == (2, 10)
    assert resp.parameters["worker_id"] == "w1" and resp.parameters["compute_ms"] > 0
    cases = [
        (b"{not json", None, 400),
        (json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1],
                                 "data": [1]}]}).encode(), None, 400),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 16, 15],
                                 "data": [0.0] * 720}]}).encode(), None, 400),
        (json.dumps({"inputs": []}).encode(), None, 400),
        (body, None, 400),  # binary body without the header length
    ]
    for payload, hlen, code in cases:
        status, _, out = post(port, "/v2/models/dynamic_batch/infer", payload,
                              {kserve.HEADER_LENGTH: hlen} if hlen else {})
        assert status == code, (payload[:60], out)
        assert "error" in json.loads(out)
    status, _, out = post(port, "/v2/models/nope/infer", b"{}")
    assert status == 404
    # residual's batch is fixed at 1: cut 0 still serves it whole
    r_request, r_expected = request_for(compiled["residual"], 0)
    body, n = kserve.encode_request(kserve.InferRequest(
        (kserve.InferTensor.from_array("input", r_request.tensors[0].to_array()),)))
    status, headers, out = post(port, "/v2/models/residual/versions/1/infer", body,
                                {kserve.HEADER_LENGTH: str(n)})
    assert status == 200
    got = kserve.decode_response(out, headers.get(kserve.HEADER_LENGTH)).outputs[0].data
    np.testing.assert_allclose(got, next(iter(r_expected.values())), rtol=1e-5, atol=1e-5)
    m = http_worker.worker.metrics
    assert m.value("tandem_cloud_requests_total",
                   {"model": "dynamic_batch", "status": "OK", "via": "http"}) == 1
    assert m.value("tandem_cloud_requests_total",
                   {"model": "dynamic_batch", "status": "INVALID_ARGUMENT", "via": "http"}) == 5


def test_bundles_download_with_range_and_resume(http_worker, repo, tmp_path):
    port = http_worker.http_port
    listing = json.loads(get(port, "/v2/bundles")[2])["bundles"]
    entry = next(b for b in listing if b["model_name"] == "dynamic_batch")
    url = entry["url"]
    status, headers, whole = get(port, url)
    assert status == 200 and headers.get("Accept-Ranges") == "bytes"
    # resume: the first part, then the rest with Range
    cut = len(whole) // 3
    s1, _, first = get(port, url, {"Range": f"bytes=0-{cut - 1}"})
    s2, h2, rest = get(port, url, {"Range": f"bytes={cut}-"})
    assert (s1, s2) == (206, 206) and first + rest == whole
    assert h2["Content-Range"] == f"bytes {cut}-{len(whole) - 1}/{len(whole)}"
    assert get(port, url, {"Range": f"bytes={len(whole) + 10}-"})[0] == 416
    archive = tmp_path / "got.tar.zst"
    archive.write_bytes(whole)
    with load_bundle(archive) as b:  # a verified bundle, the same one
        assert b.digest == entry["digest"]
    status, _, manifest = get(port, f"{url}/manifest.json")
    assert status == 200 and hashlib.sha256(manifest).hexdigest() == entry["digest"]
    with load_bundle(repo / "dynamic_batch") as b:
        part = b.manifest.files[0]
        status, _, data = get(port, f"{url}/files/{part.path}")
        assert status == 200 and hashlib.sha256(data).hexdigest() == part.sha256
    assert get(port, f"{url}/files/../../etc/passwd")[0] in (400, 404)
    assert get(port, f"{url}/files/not-listed")[0] in (400, 404)
    assert get(port, "/v2/bundles/" + "0" * 64)[0] == 404
    assert get(port, "/v2/bundles/xyz")[0] == 404


def test_ready_means_verified_connected_and_subscribed_and_live_stays_up(
        mosquitto_factory, repo, compiled):
    """``/v2/health/ready`` is 503 before the repository's first scan has finished (held here
    inside the real scan), before the broker is reachable and while it is gone, 200 once the
    worker is connected, subscribed and every bundle verified; ``/v2/health/live`` is 200 all
    the while."""
    import asyncio
    import threading
    import time

    from tandem.cloud import Worker, load_config
    from tandem.cloud._http import HttpServer
    from tandem.protocol import MqttTransport, TransportConfig

    broker = mosquitto_factory(start=False)  # down for now
    scan_may_finish = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        config = load_config({"repo": repo, "worker_id": "rdy", "repo_poll_s": 3600,
                              "broker": f"mqtt://127.0.0.1:{broker.port}"}, env={})
        transport = MqttTransport(Worker(config).transport_config())
        worker = Worker(config, transport=transport)
        real_scan = worker.repo.scan

        def held_scan():
            assert scan_may_finish.wait(30)
            return real_scan()

        worker.repo.scan = held_scan
        http = HttpServer(worker, "127.0.0.1", 0)
        port = await http.start()

        async def health() -> tuple[int, int]:
            live = await loop.run_in_executor(None, get, port, "/v2/health/live")
            ready = await loop.run_in_executor(None, get, port, "/v2/health/ready")
            assert json.loads(ready[2]) == {"ready": ready[0] == 200}
            return live[0], ready[0]

        async def until(want: tuple[int, int], what: str) -> None:
            deadline = time.monotonic() + 20
            while (got := await health()) != want:
                assert time.monotonic() < deadline, (what, got)
                await asyncio.sleep(0.05)

        try:
            assert await health() == (200, 503)  # nothing connected, nothing verified
            broker.start()
            await transport.connect()
            assert transport.connected
            starting = asyncio.ensure_future(worker.start())
            await asyncio.sleep(0.3)
            assert not starting.done() and worker.state == "starting"
            assert await health() == (200, 503)  # connected, but the repository not verified
            scan_may_finish.set()
            await asyncio.wait_for(starting, 30)
            assert await health() == (200, 200)
            broker.kill()  # the broker vanishes
            await until((200, 503), "not ready while the broker is gone")
            assert worker.state == "serving"
            broker.start()  # back on the same port: the transport reconnects, resubscribes
            await until((200, 200), "ready again once reconnected")
            request, expected = request_for(compiled["residual"], 1)
            async with MqttTransport(TransportConfig(host="127.0.0.1", port=broker.port)) as c:
                response = await c.request(f"tandem/v1/req/{request.device_id}/residual",
                                           request, timeout_s=10)
            np.testing.assert_allclose(response.outputs[0].to_array(),
                                       next(iter(expected.values())), rtol=1e-5, atol=1e-5)
            await worker.stop()
            assert await health() == (503, 503)  # stopped: neither live nor ready
        finally:
            scan_may_finish.set()
            if worker.state not in ("starting", "stopped"):
                await worker.stop()
            await transport.close()
            await http.stop()

    asyncio.run(asyncio.wait_for(main(), 90))
