"""EngineFromOnnx (tandem.devices.engines) against the faithful TensorRT/pycuda fakes.

Tests of a point where the fake follows the real API name the source; every difference between
the fakes and the real libraries is listed in tests/_support/fake_tensorrt.py and fake_pycuda.py.
"""

import json
import sys
import threading
import warnings

import numpy as np
import pytest

from tandem.devices.backends.tensorrt import TensorRTBackend
from tandem.devices.engines import (
    EngineFromOnnx,
    UnsupportedModel,
    timing_cache_file,
)
from tandem.devices.profiles import get_profile
from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    MissingDependency,
)
from tests._support import fake_pycuda, onnx_small

SHAPES = {"x": ((1, 8), (4, 8), (16, 8))}


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(onnx_small.mlp(seed=11))
    return path


def _flags(build):
    return set(build["flags"])


def _samples(n=3, shape=(2, 8), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(dtype)} for _ in range(n)]


def test_constructing_does_nothing_and_needs_no_tensorrt(mlp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), shapes=SHAPES)
    with pytest.raises(MissingDependency, match="tensorrt"):
        step()


@pytest.mark.parametrize("precision,expected", [
    ("fp32", set()), ("fp16", {"FP16"}), ("int8", {"FP16", "INT8"})])
def test_precision_flags_and_workspace_from_profile(fake_trt, mlp_path, precision, expected):
    calib = _samples(1) if precision == "int8" else None
    profile = get_profile("jetson-orin-nano-8gb")
    EngineFromOnnx(mlp_path, profile, precision, SHAPES, calibration=calib)()
    build = fake_trt.BUILDS[-1]
    assert _flags(build) - {"TF32"} == expected
    assert build["pools"]["WORKSPACE"] == profile.workspace_mb * 1024 * 1024
    assert build["profiles"] == [{"x": [[1, 8], [4, 8], [16, 8]]}]
    assert build["device_type"] == "GPU"
    assert fake_pycuda.driver_stack() == []


def test_engine_runs_through_the_backend(fake_trt, mlp_path):
    import onnxruntime as ort

    engine = EngineFromOnnx(mlp_path, get_profile("cloud-l4"), "fp16", SHAPES)()
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    with TensorRTBackend(engine) as backend:
        np.testing.assert_allclose(backend.infer({"x": x})["y"], ref, rtol=1e-6)


# ------------------------------------------------------------ 3. the target device's context
def test_every_build_runs_on_the_target_devices_primary_context(fake_trt, mlp_path):
    # fake_tensorrt docstring: the builder uses the context current at trt.Builder(), else
    # device 0's primary context (the CUDA runtime's default device)
    fake_pycuda.STATE.device_count = 2
    for precision in ("fp32", "fp16"):
        EngineFromOnnx(mlp_path, get_profile("cloud-a10"), precision, SHAPES, device=1)()
        assert fake_trt.BUILDS[-1]["builder_device"] == 1
        assert fake_pycuda.driver_stack() == []
    from tandem.devices._cuda import pushed

    cuda = sys.modules["pycuda.driver"]
    with pushed(cuda, 0):  # a caller's context is current: the build still targets device 1
        EngineFromOnnx(mlp_path, get_profile("cloud-a10"), "fp16", SHAPES, device=1)()
        assert fake_pycuda.current_device() == 0  # and the caller's is current again after
    assert fake_trt.BUILDS[-1]["builder_device"] == 1
    with pytest.raises(FailedPrecondition, match="no CUDA device 2"):
        EngineFromOnnx(mlp_path, get_profile("cloud-a10"), "fp16", SHAPES, device=2)()


# ----------------------------------------------------------------------------- 4. DLA
def test_dla_builds_get_a_static_profile_so_layers_stay_on_the_dla(fake_trt, mlp_path):
    # NVIDIA, DLA Supported Layers and Restrictions: min == opt == max for DLA
    fake_trt.FAKE_NUM_DLA_CORES = 2
    step = EngineFromOnnx(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16", SHAPES,
                          dla_core=1)
    assert step.shapes == {"x": ((4, 8), (4, 8), (4, 8))} and "opt shapes only" in step.notes[0]
    engine = step()
    build = fake_trt.BUILDS[-1]
    assert build["device_type"] == "DLA" and build["dla_core"] == 1
    assert {"GPU_FALLBACK", "FP16"} <= _flags(build)
    assert build["profiles"] == [{"x": [[4, 8], [4, 8], [4, 8]]}]
    assert build["dla_layers"] == 4  # not quietly moved to the GPU
    with TensorRTBackend(engine, dla_core=1) as backend:
        assert backend.inputs[0].shape == (None, 8)
        with pytest.raises(InvalidArgument, match="optimization profile"):
            backend.infer({"x": np.zeros((2, 8), np.float32)})
        assert backend.infer({"x": np.zeros((4, 8), np.float32)})["y"].shape == (4, 4)


def test_dla_one_static_engine_per_batch_size(fake_trt, mlp_path):
    fake_trt.FAKE_NUM_DLA_CORES = 2
    step = EngineFromOnnx(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16", SHAPES,
                          dla_core=0)
    variants = step.for_batch_sizes([1, 8, 16])
    assert [v.shapes["x"][0] for v in variants] == [(1, 8), (8, 8), (16, 8)]
    for v in variants:
        v()
    assert [b["dla_layers"] for b in fake_trt.BUILDS] == [4, 4, 4]
    with pytest.raises(InvalidArgument, match="outside"):
        EngineFromOnnx(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16", SHAPES,
                       dla_core=0).for_batch_sizes([17])
    with pytest.raises(InvalidArgument, match="integers"):
        step.for_batch_sizes([0])


def test_fake_dla_with_a_dynamic_profile_falls_back_to_the_gpu(fake_trt, mlp_path):
    # what the fix avoids: TensorRT quietly runs every layer on the GPU (fake_tensorrt docstring)
    import onnx  # noqa: F401 - the fake parser needs it

    from tests.devices.test_tensorrt_backend import build

    fake_trt.FAKE_NUM_DLA_CORES = 1
    build(fake_trt, mlp_path.read_bytes(), SHAPES,
          flags=[fake_trt.BuilderFlag.FP16, fake_trt.BuilderFlag.GPU_FALLBACK], dla_core=0)
    assert fake_trt.BUILDS[-1]["dla_layers"] == 0


def test_dla_requests_that_cannot_work_are_refused_early(mlp_path):
    with pytest.raises(FailedPrecondition, match="no DLA"):
        EngineFromOnnx(mlp_path, get_profile("jetson-orin-nano-8gb"), dla_core=0)
    with pytest.raises(InvalidArgument, match="out of range"):
        EngineFromOnnx(mlp_path, get_profile("jetson-orin-nx-8gb"), dla_core=1)
    with pytest.raises(InvalidArgument, match="FP16 or INT8"):
        EngineFromOnnx(mlp_path, get_profile("jetson-agx-xavier"), "fp32", dla_core=0)
    with pytest.raises(InvalidArgument, match="not a TensorRT target"):
        EngineFromOnnx(mlp_path, get_profile("cpu-x86_64"))


# ------------------------------------------------------------------ 5. INT8 API by version
def test_int8_calibration_feeds_every_sample_at_its_shape(fake_trt, mlp_path):
    samples = _samples(3)
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES, calibration=samples)
    step()
    build = fake_trt.BUILDS[-1]
    assert build["calibrated"] and step.calibrated_batches == 3
    assert build["calibration_profile"] == {"x": [[2, 8], [2, 8], [2, 8]]}
    assert fake_pycuda.STATE.memory == {}  # calibration buffers freed


def test_no_deprecated_tensorrt_api_warns_out_of_a_build(fake_trt, mlp_path):
    # pyCore.cpp: int8_calibrator and set_calibration_profile warn (deprecated in 10.1); we keep
    # our own calibrator reference and silence the setters we still need on 10.x on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES,
                              calibration=_samples(2))
        step()
    assert step.calibrated_batches == 2 and fake_trt.BUILDS[-1]["calibrated"]


def test_int8_with_qdq_uses_no_calibrator_even_when_samples_are_given(fake_trt, tmp_path):
    path = tmp_path / "qdq.onnx"
    path.write_bytes(onnx_small.qdq())
    samples = [{"x": np.ones((2, 4), np.float32)}]
    EngineFromOnnx(path, get_profile("cloud-a10"), "int8", {"x": ((1, 4), (2, 4), (4, 4))},
                   calibration=samples)()
    build = fake_trt.BUILDS[-1]
    assert build["qdq"] and not build["calibrated"] and "INT8" in build["flags"]


def test_tensorrt_11_int8_needs_qdq_and_fp16_is_refused_clearly(fake_trt, mlp_path, tmp_path,
                                                                monkeypatch):
    # release/11.0: no BuilderFlag.FP16/INT8, no calibrators, strongly typed networks only
    fake_trt.emulate_tensorrt_11(monkeypatch)
    profile = get_profile("cloud-h100")
    with pytest.raises(FailedPrecondition, match=r"removed implicit INT8.*Q/DQ"):
        EngineFromOnnx(mlp_path, profile, "int8", SHAPES, calibration=_samples(1))()
    with pytest.raises(FailedPrecondition, match=r"strongly typed.*no FP16 flag"):
        EngineFromOnnx(mlp_path, profile, "fp16", SHAPES)()
    qdq = tmp_path / "qdq.onnx"
    qdq.write_bytes(onnx_small.qdq())
    EngineFromOnnx(qdq, profile, "int8", {"x": ((1, 4), (2, 4), (4, 4))})()
    assert fake_trt.BUILDS[-1]["qdq"] and _flags(fake_trt.BUILDS[-1]) == {"TF32"}
    EngineFromOnnx(mlp_path, profile, "fp32", SHAPES)()
    assert fake_pycuda.driver_stack() == []


# --------------------------------------------------------------------- 6. calibration data
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_calibration_samples_are_cast_to_float32(fake_trt, mlp_path, dtype):
    # Polygraphy calibrator.py: TensorRT reads non-index calibration inputs as float32
    samples = [{"x": (np.arange(16).reshape(2, 8) - 5).astype(dtype)},
               {"x": (np.arange(16).reshape(2, 8) * 2).astype(dtype)}]
    EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES, calibration=samples)()
    assert fake_trt.BUILDS[-1]["calibration_ranges"] == {"x": [-5.0, 30.0]}


def test_calibration_samples_are_checked_before_the_build(fake_trt, mlp_path):
    profile = get_profile("cloud-t4")

    def refused(samples, match):
        with pytest.raises(InvalidArgument, match=match):
            EngineFromOnnx(mlp_path, profile, "int8", SHAPES, calibration=samples)()

    refused([{"x": np.ones((2, 9), np.float32)}], r"shape \(2, 9\), the network wants")
    refused([{"x": np.ones((8,), np.float32)}], "the network wants")
    refused([{"x": np.ones((2, 8))}, {"x": np.ones((3, 8))}], "same shapes")
    refused([{"x": np.full((2, 8), np.nan)}], "non-finite")
    refused([{"x": np.full((2, 8), 1e300)}], "non-finite")  # overflows float32
    refused([{"y": np.ones((2, 8))}], r"has inputs \['y'\], expected \['x'\]")
    refused([{"x": np.array([["a"] * 8] * 2)}], "not a number type")
    refused([], "needs calibration samples")
    assert fake_trt.BUILDS == []


def test_an_error_while_feeding_a_batch_is_raised_after_the_build(fake_trt, mlp_path,
                                                                  monkeypatch, capsys):
    # pyInt8.cpp getBatch: the trampoline prints the exception and stops calibrating; the fake
    # does the same, so without our own bookkeeping this build would "succeed" on one batch
    cuda = sys.modules["pycuda.driver"]
    real = cuda.memcpy_htod
    calls = []

    def flaky(dest, src):
        calls.append(1)
        if len(calls) == 2:
            raise cuda.LogicError("cuMemcpyHtoD failed: an illegal memory access")
        real(dest, src)

    monkeypatch.setattr(cuda, "memcpy_htod", flaky)
    with pytest.raises(InternalError, match=r"calibration of mlp\.onnx failed at batch 2.*illegal"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "int8", SHAPES,
                       calibration=_samples(3))()
    assert "Exception caught in get_batch" not in capsys.readouterr().err
    assert fake_pycuda.STATE.memory == {} and fake_pycuda.driver_stack() == []


def test_fake_calibration_trampoline_swallows_exceptions(fake_trt, mlp_path, capsys):
    # the fake is faithful: a raising get_batch ends calibration with a printed error
    trt = fake_trt
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse(onnx_small.static_relu())
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)

    class Bad(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            raise ValueError("boom")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config.int8_calibrator = Bad()
    assert builder.build_serialized_network(network, config) is None
    assert "[ERROR] Exception caught in get_batch(): boom" in capsys.readouterr().err


# --------------------------------------------------------------------------- 7. timing cache
def _entries(path):
    blob = json.loads(path.read_bytes()[len(b"FAKETRT-TIMING\x00"):])
    return blob["header"], blob["entries"]


def test_timing_cache_file_is_keyed_by_gpu_and_tensorrt(fake_trt, mlp_path, tmp_path):
    base = tmp_path / "caches" / "timing.cache"
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=base)
    step()
    assert step.timing_cache_used == tmp_path / "caches" / \
        "timing.Fake-NVIDIA-GPU.sm87.trt10.3.0.26.cache"
    header, entries = _entries(step.timing_cache_used)
    assert header["device"]["name"] == "Fake NVIDIA GPU" and any("MatMul" in e for e in entries)
    fake_pycuda.STATE.devices[0].name = "NVIDIA A10"
    other = tmp_path / "static.onnx"
    other.write_bytes(onnx_small.static_relu())
    second = EngineFromOnnx(other, get_profile("cloud-t4"), "fp16", timing_cache=base)
    second()
    assert second.timing_cache_used.name == "timing.NVIDIA-A10.sm87.trt10.3.0.26.cache"
    assert "Relu:relu" not in _entries(step.timing_cache_used)[1]  # kept apart
    assert not (tmp_path / "caches" / "timing.cache").exists()


def test_a_timing_cache_tensorrt_refuses_is_replaced(fake_trt, mlp_path, tmp_path, caplog):
    # pyCoreDoc.h set_timing_cache: returns a bool; a cache of another device is refused
    base = tmp_path / "timing.cache"
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=base)
    step()
    keyed = step.timing_cache_used
    # The same file name, but written on another device (a copied cache directory, a renamed
    # board): set_timing_cache says False.
    fake_pycuda.STATE.devices[0].multiprocessor_count = 16  # not in the name: same file
    blob = json.loads(keyed.read_bytes()[len(b"FAKETRT-TIMING\x00"):])
    blob["header"]["device"]["name"] = "somewhere else"
    keyed.write_bytes(b"FAKETRT-TIMING\x00" + json.dumps(blob).encode())
    EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=base)()
    assert "refused the timing cache" in caplog.text
    header, entries = _entries(keyed)
    assert header["device"]["name"] == "Fake NVIDIA GPU" and entries  # ours now, saved
    keyed.write_bytes(b"garbage")
    EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=base)()
    assert _entries(keyed)[1]


def test_concurrent_builds_merge_their_timing_caches(fake_trt, mlp_path, tmp_path):
    # Polygraphy loader.py: under the lock, combine with the on-disk cache, then save
    base = tmp_path / "timing.cache"
    other = tmp_path / "static.onnx"
    other.write_bytes(onnx_small.static_relu())

    def second_build():  # another build starts and finishes while the first one runs
        fake_trt.BUILD_HOOK = None
        EngineFromOnnx(other, get_profile("cloud-t4"), "fp16", timing_cache=base)()

    fake_trt.BUILD_HOOK = second_build
    step = EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES, timing_cache=base)
    step()
    entries = _entries(step.timing_cache_used)[1]
    assert any(e.startswith("Relu:relu") for e in entries)  # the second build's ...
    assert any(e.startswith("MatMul:mm1") for e in entries)  # ... and the first's
    assert sorted(p.name for p in tmp_path.iterdir() if "timing" in p.name) == sorted(
        [step.timing_cache_used.name, step.timing_cache_used.name + ".lock"])


def test_saving_the_timing_cache_waits_for_the_lock(fake_trt, mlp_path, tmp_path):
    import fcntl

    from tandem.devices.engines import DeviceIdentity

    base = tmp_path / "timing.cache"
    keyed = timing_cache_file(base, DeviceIdentity("Fake NVIDIA GPU", "8.7", 8), "10.3.0.26")
    built = threading.Event()
    fake_trt.BUILD_HOOK = built.set
    errors = []

    def run():
        try:
            EngineFromOnnx(mlp_path, get_profile("cloud-t4"), "fp16", SHAPES,
                           timing_cache=base)()
        except BaseException as exc:  # reported below
            errors.append(exc)
        if fake_pycuda.driver_stack():
            errors.append(AssertionError(f"left on the stack: {fake_pycuda.driver_stack()}"))

    with open(keyed.with_name(keyed.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another process is saving
        worker = threading.Thread(target=run)
        worker.start()
        # the loading step needs the lock too: the build cannot start until we let go
        worker.join(0.3)
        assert worker.is_alive() and not built.is_set()
        keyed.write_bytes(b"")  # the other process wrote an empty file meanwhile
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    worker.join(30)
    assert not worker.is_alive() and not errors and built.is_set()
    assert any("MatMul" in e for e in _entries(keyed)[1])


# ---------------------------------------------------------------------------- the rest
def test_version_compatible_flag(fake_trt, mlp_path):
    EngineFromOnnx(mlp_path, get_profile("cloud-h100"), "fp16", SHAPES,
                   version_compatible=True)()
    assert "VERSION_COMPATIBLE" in fake_trt.BUILDS[-1]["flags"]
    EngineFromOnnx(mlp_path, get_profile("cloud-h100"), "fp16", SHAPES)()
    assert "VERSION_COMPATIBLE" not in fake_trt.BUILDS[-1]["flags"]


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
    with pytest.raises(InvalidArgument, match=r"< 2\*\*31"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"),
                       shapes={"x": ((1, 8), (4, 8), (1 << 40, 8))})()
    with pytest.raises(InvalidArgument, match="lists of ints"):
        EngineFromOnnx(mlp_path, get_profile("cloud-t4"), shapes={"x": ((1, "a"),) * 3})
    assert fake_pycuda.driver_stack() == []


def test_shape_tensor_inputs_are_refused_with_a_clear_error(fake_trt, tmp_path):
    from tests.devices.test_tensorrt_backend import reshape_model

    path = tmp_path / "reshape.onnx"
    path.write_bytes(reshape_model())
    with pytest.raises(FailedPrecondition, match=r"\['s'\] are shape tensors"):
        EngineFromOnnx(path, get_profile("cloud-t4"), "fp16",
                       {"x": ((1, 6), (2, 6), (4, 6))})()


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


def test_from_recipe_reads_the_artifact_recipe(fake_trt, mlp_path):
    fake_trt.FAKE_NUM_DLA_CORES = 2
    recipe = {"workspace_mb": 256, "shapes": {"x": [[1, 8], [4, 8], [16, 8]]},
              "version_compatible": True, "dla_core": 1, "build": "on-device"}
    step = EngineFromOnnx.from_recipe(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16",
                                      recipe)
    step()
    build = fake_trt.BUILDS[-1]
    assert build["pools"]["WORKSPACE"] == 256 << 20 and build["dla_core"] == 1
    assert "VERSION_COMPATIBLE" in build["flags"]
    for bad, match in [({"shapes": [1, 2]}, "mapping"), ({"dla_core": "1"}, "dla_core"),
                       ({"version_compatible": "yes"}, "boolean"),
                       ({"workspace_mb": -5}, "workspace_mb"),
                       ({"shapes": {"x": [[1], [2]]}}, "min, opt, max")]:
        with pytest.raises(InvalidArgument, match=match):
            EngineFromOnnx.from_recipe(mlp_path, get_profile("cloud-t4"), "fp16", bad)
