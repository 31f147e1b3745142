"""TensorRTBackend through the faithful fake (real numbers: the fake engine runs ONNX Runtime),
plus one real-hardware test under the ``gpu`` marker."""

import numpy as np
import pytest

from tandem.devices.backends.tensorrt import TensorRTBackend
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    MissingDependency,
    NotFound,
    ResourceExhausted,
)
from tests._support import fake_pycuda, onnx_small
from tests.devices.conftest import GPU_SKIP_REASON, real_tensorrt_available


def build(trt, model: bytes, shapes=None, flags=(), dla_core=None) -> bytes:
    """Build an engine with the TensorRT builder API (here: the fake's)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model)
    config = builder.create_builder_config()
    for f in flags:
        config.set_flag(f)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        assert config.add_optimization_profile(profile) == 0
    return bytes(builder.build_serialized_network(network, config))


def reference(model: bytes, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)


MLP_SHAPES = {"x": ((1, 8), (4, 8), (16, 8))}


def test_missing_tensorrt_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as without TensorRT
    backend = TensorRTBackend(b"engine")
    with pytest.raises(MissingDependency, match="tensorrt"):
        backend.activate()
    assert not backend.is_active


def test_construction_allocates_nothing(fake_trt):
    TensorRTBackend(b"whatever", device=0)
    assert fake_pycuda.STATE.allocations == 0 and not fake_pycuda.STATE.initialized


def test_dynamic_batch_runs_real_numbers_and_grows_buffers(fake_trt, tmp_path):
    model = onnx_small.mlp(seed=5)
    path = tmp_path / "mlp.engine"
    path.write_bytes(build(fake_trt, model, MLP_SHAPES))
    rng = np.random.default_rng(0)
    with TensorRTBackend(path) as backend:
        assert backend.inputs[0].shape == (None, 8) and backend.outputs[0].shape == (None, 4)
        assert fake_pycuda.STATE.allocations == 0  # dynamic: allocated at the first shape
        for n in (2, 2, 7, 3, 16):
            x = rng.standard_normal((n, 8)).astype(np.float32)
            y = backend.infer({"x": x})["y"]
            assert type(y) is np.ndarray and y.shape == (n, 4)
            np.testing.assert_allclose(y, reference(model, {"x": x})[0], rtol=1e-6)
        # input+output buffers allocated for 2, grown for 7 and 16; never for 3 (fits)
        assert fake_pycuda.STATE.allocations == 6
    assert fake_pycuda.STATE.memory == {} and fake_pycuda.STATE.retained == 0


def test_outputs_do_not_alias_the_reused_buffers(fake_trt):
    model = onnx_small.mlp()
    with TensorRTBackend(build(fake_trt, model, MLP_SHAPES)) as backend:
        a = backend.infer({"x": np.ones((2, 8), np.float32)})["y"]
        a_copy = a.copy()
        backend.infer({"x": -np.ones((2, 8), np.float32)})
    np.testing.assert_array_equal(a, a_copy)


def test_shape_outside_the_profile_is_invalid_argument(fake_trt):
    with TensorRTBackend(build(fake_trt, onnx_small.mlp(), MLP_SHAPES)) as backend:
        with pytest.raises(InvalidArgument, match="optimization profile"):
            backend.infer({"x": np.zeros((17, 8), np.float32)})
        with pytest.raises(InvalidArgument, match="dim 1 must be 8"):
            backend.infer({"x": np.zeros((2, 9), np.float32)})
        with pytest.raises(InvalidArgument, match="dtype"):
            backend.infer({"x": np.zeros((2, 8), np.float16)})
        assert backend.infer({"x": np.zeros((16, 8), np.float32)})["y"].shape == (16, 4)


def test_static_engine_allocates_at_activation(fake_trt):
    model = onnx_small.static_relu()
    with TensorRTBackend(build(fake_trt, model)) as backend:
        assert fake_pycuda.STATE.allocations == 2 and not backend.batchable
        x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
        np.testing.assert_array_equal(backend.infer({"x": x})["y"], np.maximum(x, 0))
        assert fake_pycuda.STATE.allocations == 2


def test_batch_respects_the_profile_max(fake_trt, monkeypatch):
    model = onnx_small.mlp()
    reqs = [{"x": np.full((6, 8), i, np.float32)} for i in range(4)]  # 24 rows > max 16
    with TensorRTBackend(build(fake_trt, model, MLP_SHAPES)) as backend:
        sizes = []
        real = backend._infer_impl
        monkeypatch.setattr(backend, "_infer_impl",
                            lambda f: sizes.append(f["x"].shape[0]) or real(f))
        outs = backend.infer_batch(reqs)
    assert sizes == [12, 12]
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_allclose(o["y"], reference(model, r)[0], rtol=1e-6)


def test_two_inputs(fake_trt):
    shapes = {"a": ((1, 4), (2, 4), (8, 4)), "b": ((1, 4), (2, 4), (8, 4))}
    with TensorRTBackend(build(fake_trt, onnx_small.two_inputs(), shapes)) as backend:
        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(backend.infer({"a": a, "b": a})["s"], 2 * a)


def test_bad_engine_bytes_are_invalid_argument_and_release_everything(fake_trt):
    backend = TensorRTBackend(b"not an engine")
    with pytest.raises(InvalidArgument, match="cannot deserialize") as err:
        backend.activate()
    assert "magicTag" in str(err.value) and not backend.is_active
    assert fake_pycuda.STATE.retained == 0


def test_engine_from_another_tensorrt_version_is_refused(fake_trt, monkeypatch):
    data = build(fake_trt, onnx_small.mlp(), MLP_SHAPES)
    monkeypatch.setattr(fake_trt, "__version__", "10.4.0.1")
    with pytest.raises(InvalidArgument, match="not compatible with this version"):
        TensorRTBackend(data).activate()


def test_version_compatible_engine_needs_host_code(fake_trt):
    data = build(fake_trt, onnx_small.static_relu(),
                 flags=[fake_trt.BuilderFlag.VERSION_COMPATIBLE])
    with pytest.raises(InvalidArgument, match="engine_host_code_allowed"):
        TensorRTBackend(data).activate()
    with TensorRTBackend(data, allow_host_code=True) as backend:
        assert backend.infer({"x": np.ones((2, 3), np.float32)})["y"].sum() == 6


def test_dla_engine_needs_its_core(fake_trt):
    fake_trt.FAKE_NUM_DLA_CORES = 2
    data = build(fake_trt, onnx_small.static_relu(), flags=[fake_trt.BuilderFlag.FP16],
                 dla_core=1)
    with pytest.raises(InvalidArgument):
        TensorRTBackend(data).activate()
    with TensorRTBackend(data, dla_core=1) as backend:
        assert backend.infer({"x": np.ones((2, 3), np.float32)})["y"].shape == (2, 3)


def test_missing_file_and_missing_device(fake_trt, tmp_path):
    with pytest.raises(NotFound):
        TensorRTBackend(tmp_path / "nope.engine").activate()
    with pytest.raises(FailedPrecondition, match="no CUDA device 3"):
        TensorRTBackend(b"x", device=3).activate()


def test_out_of_device_memory_is_resource_exhausted(fake_trt):
    fake_pycuda.STATE.memory_limit = 64
    engine = build(fake_trt, onnx_small.mlp(), MLP_SHAPES)
    with TensorRTBackend(engine) as backend, pytest.raises(ResourceExhausted):
        backend.infer({"x": np.zeros((16, 8), np.float32)})


@pytest.mark.gpu
@pytest.mark.skipif(not real_tensorrt_available(), reason=GPU_SKIP_REASON)
def test_real_tensorrt_engine_matches_onnxruntime(tmp_path):  # pragma: no cover - needs a GPU
    from tandem.compiler._tensorrt import EngineFromOnnx
    from tandem.devices.detect import detect_profile

    profile = detect_profile()
    if profile.default_backend != "tensorrt":
        pytest.skip(f"detected profile {profile.id} is not a TensorRT target")
    model = onnx_small.mlp(seed=7)
    src = tmp_path / "mlp.onnx"
    src.write_bytes(model)
    engine = EngineFromOnnx(src, profile, precision="fp32", shapes=MLP_SHAPES)()
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    with TensorRTBackend(engine) as backend:
        np.testing.assert_allclose(backend.infer({"x": x})["y"], reference(model, {"x": x})[0],
                                   rtol=1e-3, atol=1e-3)
