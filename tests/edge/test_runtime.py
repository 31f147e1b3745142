"""The runtime: input checks, parts on ONNX Runtime, the background TensorRT build (against the
faithful fakes) with an atomic switch while requests run, and the switch's release of the old
backend only after its last call."""

from __future__ import annotations

import shutil
import sys
import threading

import numpy as np
import pytest

from tandem.devices import get_profile
from tandem.edge._runtime import ModelRuntime, PartRunner, check_feeds
from tandem.protocol.bundle import TensorSpec, open_bundle
from tandem.protocol.errors import InvalidArgument, MissingDependency
from tests._support import fake_tensorrt
from tests.edge.conftest import reference

ORIN = "jetson-orin-nano-8gb"


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    """residual compiled for ONNX Runtime and for an Orin (engines deferred to the device)."""
    from tandem.compiler import BundleFromOnnx, CompileOptions
    from tandem.compiler import examples as ex

    d = tmp_path_factory.mktemp("trt")
    model = ex.save(ex.residual(), d / "residual.onnx")
    out = d / "bundle"
    BundleFromOnnx(model, out, CompileOptions(targets=("onnxruntime", ORIN)))()
    return out


@pytest.fixture
def fake_trt(monkeypatch):
    fake_tensorrt.install(monkeypatch)
    yield fake_tensorrt
    fake_tensorrt.check_clean()


def _x(seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((1, 3, 16, 16))
            .astype(np.float32)}


def test_check_feeds_names_every_problem():
    specs = (TensorSpec(name="a", dtype="float32", shape=("N", 3, "H", "W")),
             TensorSpec(name="b", dtype="int64", shape=("N", 2)))
    ok = {"a": np.zeros((2, 3, 5, 7), np.float32), "b": np.zeros((2, 2), np.int64)}
    assert check_feeds(specs, ok) == ((2, 3, 5, 7), (2, 2))
    cases = [
        ({"a": ok["a"]}, r"missing input\(s\) \['b'\]"),
        ({**ok, "c": ok["b"]}, r"unknown input\(s\) \['c'\]"),
        ({**ok, "b": np.zeros((2, 2), np.int32)}, "dtype int32, the model takes int64"),
        ({**ok, "a": np.zeros((2, 4, 5, 7), np.float32)}, "the model takes"),
        ({**ok, "a": np.zeros((2, 3, 5), np.float32)}, "rank 4"),
        ({**ok, "b": np.zeros((3, 2), np.int64)}, "dim 'N' is 2 in one input and 3"),
        ({**ok, "a": np.zeros((2, 3, 0, 7), np.float32)}, "empty dim 'H'"),
    ]
    for feeds, match in cases:
        with pytest.raises(InvalidArgument, match=match):
            check_feeds(specs, feeds)


def test_parts_run_and_agree_with_the_full_model(residual_bundle):
    with open_bundle(residual_bundle) as bundle:
        rt = ModelRuntime(bundle, get_profile("cpu-x86_64"))
        rt.load()
        try:
            x = _x()
            want = reference(residual_bundle, x)["logits"]
            np.testing.assert_allclose(rt.run_full(x)["logits"], want, rtol=1e-5, atol=1e-6)
            for cut in rt.interior:
                frontier = rt.run_head(cut.id, x)
                assert set(frontier) == {t.name for t in cut.frontier}
                out = rt.run_tail(cut.id, frontier)
                np.testing.assert_allclose(out["logits"], want, rtol=1e-4, atol=1e-5)
            assert rt.run_head(0, x).keys() == x.keys()  # cut 0: the input is the frontier
            assert rt.engine_plan() == []  # a CPU profile builds no engine
        finally:
            rt.close()


def test_engines_build_in_the_background_and_requests_switch_atomically(
        fake_trt, trt_bundle, tmp_path):
    with open_bundle(trt_bundle) as bundle:
        rt = ModelRuntime(bundle, get_profile(ORIN), engine_cache=tmp_path / "engines")
        rt.load()
        try:
            assert all(r.kind == "onnxruntime" for r in rt.parts.values())
            x = _x(1)
            want = reference(trt_bundle, x)["logits"]
            switched = []
            rt.on_switch = lambda part, kind: switched.append((part, kind))
            errors: list[BaseException] = []
            kinds_seen: set[str] = set()
            stop = threading.Event()

            def serve():
                while not stop.is_set():
                    try:
                        kinds_seen.add(rt.full.kind)
                        cut = rt.interior[0]
                        out = rt.run_tail(cut.id, rt.run_head(cut.id, x))
                        np.testing.assert_allclose(out["logits"], want, rtol=1e-4, atol=1e-5)
                        np.testing.assert_allclose(rt.run_full(x)["logits"], want, rtol=1e-4,
                                                   atol=1e-5)
                    except BaseException as exc:
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=serve) for _ in range(3)]
            for t in threads:
                t.start()
            assert rt.start_engines()
            assert rt.wait_engines(120)
            stop.set()
            for t in threads:
                t.join()
            assert not errors, errors[0]
            assert all(r.kind == "tensorrt" for r in rt.parts.values())
            assert {p for p, _ in switched} == set(rt.parts)
            assert set(rt.engine_status.values()) == {"tensorrt"}
            assert len(fake_trt.BUILDS) == len(rt.parts)
            np.testing.assert_allclose(rt.run_full(x)["logits"], want, rtol=1e-4, atol=1e-5)
        finally:
            rt.close()
    # a second runtime finds every engine in the cache: no new build
    before = len(fake_trt.BUILDS)
    with open_bundle(trt_bundle) as bundle:
        rt = ModelRuntime(bundle, get_profile(ORIN), engine_cache=tmp_path / "engines")
        rt.load()
        try:
            rt.start_engines()
            assert rt.wait_engines(60)
            assert len(fake_trt.BUILDS) == before
        finally:
            rt.close()


def test_backend_choice(trt_bundle, monkeypatch):
    with open_bundle(trt_bundle) as bundle:
        rt = ModelRuntime(bundle, get_profile(ORIN), backend="onnxruntime")
        rt.load()
        try:
            assert rt.engine_plan() == []
        finally:
            rt.close()
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        rt = ModelRuntime(bundle, get_profile(ORIN), backend="auto")
        rt.load()
        try:
            assert rt.engine_plan() == []  # not importable: ONNX Runtime serves
            rt.backend_choice = "tensorrt"
            with pytest.raises(MissingDependency, match="tensorrt"):
                rt.engine_plan()
        finally:
            rt.close()


class _Backend:
    """A backend whose infer blocks until released (to switch while a call runs)."""

    def __init__(self, name):
        self.name = name
        self.is_active = True
        self.entered = threading.Event()
        self.release = threading.Event()
        self.deactivated = False

    def infer(self, feeds):
        self.entered.set()
        self.release.wait(10)
        return {"y": self.name}

    def deactivate(self):
        self.deactivated = True
        self.is_active = False


def test_switch_releases_the_old_backend_after_its_last_call():
    old, new = _Backend("old"), _Backend("new")
    new.release.set()
    runner = PartRunner("p", old, "onnxruntime")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", runner.infer({})))
    t.start()
    assert old.entered.wait(5)
    runner.switch(new, "tensorrt")
    assert runner.infer({}) == {"y": "new"}  # the next call runs on the new backend
    assert not old.deactivated  # still running a call
    old.release.set()
    t.join(5)
    assert result["r"] == {"y": "old"} and old.deactivated
    runner.close()
    assert new.deactivated
    late = _Backend("late")
    runner.switch(late, "tensorrt")  # after close: never used, released at once
    assert late.deactivated


def test_an_unloadable_part_is_a_clean_error(residual_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(residual_bundle, broken)
    with open_bundle(residual_bundle) as bundle:
        full = bundle.select("full", "onnxruntime").full
        target = full.path.relative_to(bundle.root)
    (broken / target).write_bytes(b"not onnx" + b"\0" * 10)
    with pytest.raises(Exception) as info, open_bundle(broken) as bundle:
        ModelRuntime(bundle, get_profile("cpu-x86_64")).load()
    assert target.name in str(info.value)


def test_the_daemon_serves_through_the_switch_and_reports_it(fake_trt, trt_bundle, tmp_path):
    import asyncio

    from tandem.edge import EdgeDaemon, RequestOptions
    from tandem.protocol.transport import MemoryBroker, MemoryTransport
    from tests.edge.conftest import make_config

    async def main():
        broker = MemoryBroker()
        d = EdgeDaemon(make_config(tmp_path, trt_bundle, profile=ORIN),
                       transport_factory=lambda: MemoryTransport(broker), progress=False)
        await d.start()
        try:
            x = _x(4)
            want = reference(trt_bundle, x)["logits"]
            answers = []
            while not d.model.runtime.wait_engines(0):
                answers.append(await d.infer(x, RequestOptions(mode="local")))
                await asyncio.sleep(0.01)
            answers.append(await d.infer(x, RequestOptions(mode="local")))
            for a in answers:
                np.testing.assert_allclose(a.outputs["logits"], want, rtol=1e-4, atol=1e-5)
            st = d.status()
            assert set(st["bundle"]["backends"].values()) == {"tensorrt"}
            text = d.metrics.exposition()[0].decode()
            assert 'tandem_edge_backend_info{backend="tensorrt",part="parts/full.onnx"} 1.0' \
                in text
            table = d.model.table
            assert all("tensorrt" in table.parts[p] for p in d.model.runtime.parts)
        finally:
            await d.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
