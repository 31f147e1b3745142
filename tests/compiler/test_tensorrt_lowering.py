"""EngineFromOnnx and EngineCache against the faithful TensorRT fake (tests/devices)."""

import json

import numpy as np
import pytest

from tandem.compiler._tensorrt import (
    EngineCache,
    EngineFromOnnx,
    EngineKey,
    UnsupportedModel,
    shape_profile_id,
)
from tandem.devices.backends.tensorrt import TensorRTBackend
from tandem.devices.profiles import get_profile
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, MissingDependency
from tests._support import fake_pycuda, onnx_small

SHAPES = {"x": ((1, 8), (4, 8), (16, 8))}


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(onnx_small.mlp(seed=11))
    return path


def _flags(build):
    return set(build["flags"])


def test_constructing_does_nothing_and_needs_no_tensorrt(mlp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), shapes=SHAPES)
    with pytest.raises(MissingDependency, match="tensorrt"):
        step()


@pytest.mark.parametrize("precision,expected", [
    ("fp32", set()), ("fp16", {"FP16"}), ("int8", {"FP16", "INT8"})])
def test_precision_flags_and_workspace_from_profile(fake_trt, mlp_path, precision, expected):
    calib = [{"x": np.ones((2, 8), np.float32)}] if precision == "int8" else None
    profile = get_profile("jetson-orin-nano-8gb")
    EngineFromOnnx(mlp_path, profile, precision, SHAPES, calibration=calib)()
    build = fake_trt.BUILDS[-1]
    assert _flags(build) - {"TF32"} == expected
    assert build["pools"]["WORKSPACE"] == profile.workspace_mb * 1024 * 1024
    assert build["profiles"] == [{"x": [[1, 8], [4, 8], [16, 8]]}]
    assert build["device_type"] == "GPU"


def test_engine_runs_through_the_backend(fake_trt, mlp_path):
    import onnxruntime as ort

    engine = EngineFromOnnx(mlp_path, get_profile("cloud-l4"), "fp16", SHAPES)()
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    with TensorRTBackend(engine) as backend:
        np.testing.assert_allclose(backend.infer({"x": x})["y"], ref, rtol=1e-6)


def test_int8_calibration_feeds_every_sample_at_its_shape(fake_trt, mlp_path):
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(3)]
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES,
                          calibration=samples)
    step()
    build = fake_trt.BUILDS[-1]
    assert build["calibrated"] and step.calibrated_batches == 3
    assert build["calibration_profile"] == {"x": [[2, 8], [2, 8], [2, 8]]}
    assert fake_pycuda.STATE.memory == {}  # calibration buffers freed


def test_int8_with_qdq_uses_no_calibrator(fake_trt, tmp_path):
    path = tmp_path / "qdq.onnx"
    path.write_bytes(onnx_small.qdq())
    EngineFromOnnx(path, get_profile("cloud-a10"), "int8", {"x": ((1, 4), (2, 4), (4, 4))})()
    build = fake_trt.BUILDS[-1]
    assert build["qdq"] and not build["calibrated"] and "INT8" in build["flags"]


def test_int8_without_qdq_or_samples_is_refused(fake_trt, mlp_path):
    with pytest.raises(InvalidArgument, match="calibration"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES)()
    bad = [{"x": np.ones((2, 8), np.float32)}, {"x": np.ones((3, 8), np.float32)}]
    with pytest.raises(InvalidArgument, match="same shapes"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES, calibration=bad)()


def test_dla_core_with_gpu_fallback(fake_trt, mlp_path):
    fake_trt.FAKE_NUM_DLA_CORES = 2
    EngineFromOnnx(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16", SHAPES, dla_core=1)()
    build = fake_trt.BUILDS[-1]
    assert build["device_type"] == "DLA" and build["dla_core"] == 1
    assert {"GPU_FALLBACK", "FP16"} <= _flags(build)


def test_dla_requests_that_cannot_work_are_refused_early(mlp_path):
    with pytest.raises(FailedPrecondition, match="no DLA"):
        EngineFromOnnx(mlp_path, get_profile("jetson-orin-nano-8gb"), dla_core=0)
    with pytest.raises(InvalidArgument, match="out of range"):
        EngineFromOnnx(mlp_path, get_profile("jetson-orin-nx-8gb"), dla_core=1)
    with pytest.raises(InvalidArgument, match="FP16 or INT8"):
        EngineFromOnnx(mlp_path, get_profile("jetson-agx-xavier"), "fp32", dla_core=0)
    with pytest.raises(InvalidArgument, match="not a TensorRT target"):
        EngineFromOnnx(mlp_path, get_profile("cpu-x86_64"))


def test_version_compatible_flag(fake_trt, mlp_path):
    EngineFromOnnx(mlp_path, get_profile("cloud-h100"), "fp16", SHAPES,
                   version_compatible=True)()
    assert "VERSION_COMPATIBLE" in fake_trt.BUILDS[-1]["flags"]
    EngineFromOnnx(mlp_path, get_profile("cloud-h100"), "fp16", SHAPES)()
    assert "VERSION_COMPATIBLE" not in fake_trt.BUILDS[-1]["flags"]


def test_timing_cache_is_loaded_and_saved(fake_trt, mlp_path, tmp_path):
    cache = tmp_path / "caches" / "timing.cache"
    EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=cache)()
    first = cache.read_bytes()
    assert first.startswith(fake_trt.CACHE_MAGIC) and b"MatMul" in first
    other = tmp_path / "static.onnx"
    other.write_bytes(onnx_small.static_relu())
    EngineFromOnnx(other, get_profile("cloud-t4"), "fp16", timing_cache=cache)()
    entries = json.loads(cache.read_bytes()[len(fake_trt.CACHE_MAGIC):])
    assert any(e.startswith("MatMul") for e in entries)  # loaded, kept ...
    assert any(e.startswith("Relu:relu") for e in entries)  # ... and extended
    assert [p.name for p in cache.parent.iterdir()] == ["timing.cache"]  # atomic, no temp


def test_corrupt_timing_cache_is_replaced(fake_trt, mlp_path, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage from another version")
    EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=cache)()
    assert cache.read_bytes().startswith(fake_trt.CACHE_MAGIC)


def test_dynamic_inputs_need_shapes_and_shapes_must_fit(fake_trt, mlp_path):
    with pytest.raises(InvalidArgument, match="dynamic dims"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"))()
    with pytest.raises(InvalidArgument, match="unknown inputs"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"), shapes={"z": SHAPES["x"]})()
    with pytest.raises(InvalidArgument, match="does not fit"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"),
                       shapes={"x": ((1, 9), (4, 9), (8, 9))})()
    with pytest.raises(InvalidArgument, match="min <= opt <= max"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"),
                       shapes={"x": ((4, 8), (2, 8), (8, 8))})()


def test_parser_errors_are_listed(fake_trt, tmp_path):
    path = tmp_path / "u.onnx"
    path.write_bytes(onnx_small.unsupported())
    with pytest.raises(UnsupportedModel) as err:
        EngineFromOnnx(path, get_profile("cloud-t4"))()
    assert len(err.value.errors) == 1 and "Unique" in err.value.errors[0]
    assert "No importer registered for op: Unique" in str(err.value)


def test_builder_failure_reports_the_logged_error(fake_trt, mlp_path):
    # The profile claims a DLA core the (fake) hardware does not have: the builder fails.
    fake_trt.FAKE_NUM_DLA_CORES = 0
    with pytest.raises(FailedPrecondition, match="DLA core 0 is not available"):
        EngineFromOnnx(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16", SHAPES,
                       dla_core=0)()


# ------------------------------------------------------------------------------ EngineCache
def _key(**kw):
    base = dict(part_sha256="ab" * 32, tensorrt_version="10.3.0.26", compute_capability="8.7",
                precision="fp16", shape_profile=shape_profile_id(SHAPES))
    return EngineKey(**(base | kw))


def test_cache_builds_once_then_loads(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    calls = []

    def build():
        calls.append(1)
        return b"engine-bytes"

    p1 = cache.get_or_build(_key(), build)
    p2 = cache.get_or_build(_key(), build)
    assert p1 == p2 and p1.read_bytes() == b"engine-bytes" and len(calls) == 1
    meta = json.loads(p1.with_suffix(".json").read_text())
    assert meta["key"]["tensorrt_version"] == "10.3.0.26"
    assert sorted(x.name for x in p1.parent.iterdir()) == sorted([p1.name, p1.stem + ".json"])


def test_key_fields_all_matter(tmp_path):
    cache = EngineCache(tmp_path)
    paths = {cache.path_for(k) for k in (_key(), _key(tensorrt_version="10.4"),
                                         _key(compute_capability="9.0"), _key(precision="int8"),
                                         _key(shape_profile="static"), _key(part_sha256="cd"),
                                         _key(build_options=("dla0",)))}
    assert len(paths) == 7


def test_mismatching_sidecar_is_rebuilt_not_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.get_or_build(_key(), lambda: b"old")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["key"]["tensorrt_version"] = "8.6.1"  # stored engine says: built by another TRT
    meta_path.write_text(json.dumps(meta))
    assert cache.lookup(_key()) is None
    assert cache.get_or_build(_key(), lambda: b"new").read_bytes() == b"new"
    assert cache.lookup(_key()) == path


def test_tampered_or_half_written_engine_is_rebuilt(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.get_or_build(_key(), lambda: b"good")
    path.write_bytes(b"truncat")
    assert cache.get_or_build(_key(), lambda: b"rebuilt").read_bytes() == b"rebuilt"
    path.with_suffix(".json").unlink()
    assert cache.lookup(_key()) is None


def test_key_for_part_hashes_the_file(mlp_path):
    key = EngineKey.for_part(mlp_path, get_profile("cloud-h100"), "fp16", "10.3.0.26", SHAPES)
    assert key.compute_capability == "9.0" and key.shape_profile == "x:1x8/4x8/16x8"
    assert len(key.part_sha256) == 64
    with pytest.raises(InvalidArgument):
        EngineKey.for_part(mlp_path, get_profile("cpu-arm64"), "fp32", "10.3")
