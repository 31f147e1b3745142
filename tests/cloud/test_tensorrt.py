"""Backend per part in the cloud repository: TensorRT (against the faithful fakes) built in the
background while ONNX Runtime serves, switched atomically, same answers; ONNX Runtime when
TensorRT is not wanted or not there."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading

import numpy as np
import pytest

from tandem.cloud import Worker, load_config
from tandem.cloud._repository import ModelRepository
from tandem.devices import get_profile
from tandem.protocol import MemoryBroker, MemoryTransport, TransportConfig
from tandem.protocol.errors import MissingDependency
from tests._support import fake_tensorrt
from tests.cloud.conftest import request_for, topic_for

ORIN = "jetson-orin-nano-8gb"


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    """residual compiled for ONNX Runtime and for an Orin (engines deferred to the device)."""
    pytest.importorskip("onnxruntime", reason="the parts run on real ONNX Runtime first")
    from tandem.compiler import BundleFromOnnx, CompileOptions
    from tandem.compiler import examples as ex

    d = tmp_path_factory.mktemp("trt")
    model = ex.save(ex.residual(), d / "residual.onnx")
    out = d / "residual"
    BundleFromOnnx(model, out, CompileOptions(targets=("onnxruntime", ORIN)))()
    return out


@pytest.fixture
def trt_repo(tmp_path, trt_bundle):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(trt_bundle, root / "residual")
    return root


@pytest.fixture
def fake_trt(monkeypatch):
    fake_tensorrt.install(monkeypatch)
    yield fake_tensorrt
    fake_tensorrt.check_clean()


def test_a_worker_serves_on_onnxruntime_while_the_engine_builds_then_on_tensorrt(
        fake_trt, trt_repo, trt_bundle, tmp_path):
    gate = threading.Event()  # holds the engine build until requests were served meanwhile
    building = threading.Event()

    def hold() -> None:
        building.set()
        assert gate.wait(60)

    fake_trt.BUILD_HOOK = hold

    async def main() -> None:
        broker = MemoryBroker()
        config = load_config({"repo": trt_repo, "worker_id": "trt", "profile": ORIN,
                              "engine_cache": tmp_path / "engines"}, env={})
        transport = MemoryTransport(broker, Worker(config).transport_config())
        await transport.connect()
        worker = Worker(config, transport=transport)
        await worker.start()
        loop = asyncio.get_running_loop()
        try:
            async with MemoryTransport(broker, TransportConfig()) as client:
                cuts = sorted(worker.repo.bundle(worker.repo.entries[0].digest).parts)
                served = {}
                for cut in cuts:
                    request, expected = request_for(trt_bundle, cut)
                    answer = await client.request(topic_for(request, "residual"), request)
                    served[cut] = (request, expected, answer.outputs[0].to_array())
                # every part loaded and serving on ONNX Runtime; the first engine is held
                assert await loop.run_in_executor(None, building.wait, 60)
                parts = worker.repo.loaded
                assert len(parts) == len(cuts)
                assert {p.backend_kind for p in parts} == {"onnxruntime"}
                for _, expected, got in served.values():
                    np.testing.assert_allclose(got, next(iter(expected.values())), rtol=1e-4,
                                               atol=1e-5)
                # requests keep being answered while the build goes on and across the switch
                gate.set()
                while not worker.repo.wait_engines(0):
                    for request, _, first in served.values():
                        again = await client.request(topic_for(request, "residual"),
                                                     _renew(request))
                        np.testing.assert_allclose(again.outputs[0].to_array(), first,
                                                   rtol=1e-4, atol=1e-5)
                    await asyncio.sleep(0.01)
                assert {p.backend_kind for p in worker.repo.loaded} == {"tensorrt"}
                assert len(fake_trt.BUILDS) == len(cuts)
                for request, _, first in served.values():  # on TensorRT: the same answers
                    again = await client.request(topic_for(request, "residual"),
                                                 _renew(request))
                    np.testing.assert_allclose(again.outputs[0].to_array(), first, rtol=1e-4,
                                               atol=1e-5)
        finally:
            await worker.stop()
            await transport.close()

    asyncio.run(asyncio.wait_for(main(), 180))


def _renew(request):
    from dataclasses import replace

    from tandem.protocol import new_request_id

    return replace(request, id=new_request_id())


def test_backend_choice_and_unloading_before_the_engine_is_ready(
        fake_trt, trt_repo, tmp_path, monkeypatch):
    # onnxruntime: no engine even where one could be built
    repo = ModelRepository(trt_repo, backend="onnxruntime", profile=get_profile(ORIN),
                           engine_cache=tmp_path / "e")
    repo.scan()
    part = next(iter(repo.entries[0].parts.values()))
    repo.acquire(part)
    repo.release(part)
    assert part.backend_kind == "onnxruntime" and part.engines is None
    repo.close()
    # a CPU profile: nothing to build
    repo = ModelRepository(trt_repo, profile=get_profile("cpu-x86_64"))
    repo.scan()
    part = next(iter(repo.entries[0].parts.values()))
    repo.acquire(part)
    repo.release(part)
    assert part.engines is None and part.backend_kind == "onnxruntime"
    repo.close()
    # a part unloaded while its engine builds: the engine is released unused
    gate = threading.Event()
    fake_trt.BUILD_HOOK = lambda: gate.wait(60)
    repo = ModelRepository(trt_repo, profile=get_profile(ORIN), engine_cache=tmp_path / "e")
    repo.scan()
    part = next(iter(repo.entries[0].parts.values()))
    repo.acquire(part)
    repo.release(part)
    engines = part.engines
    assert engines is not None and not engines.done
    repo.close()  # unloads it
    assert part.backend is None
    gate.set()
    assert engines.wait(60)
    assert "unloaded" in next(iter(engines.status.values()))
    # tensorrt asked for but not importable: a clean error on load, nothing half-loaded
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    repo = ModelRepository(trt_repo, backend="tensorrt", profile=get_profile(ORIN))
    repo.scan()
    part = next(iter(repo.entries[0].parts.values()))
    with pytest.raises(MissingDependency, match="tensorrt"):
        repo.acquire(part)
    assert part.backend is None and repo.loaded == []
    repo.close()
