"""TensorRTBackend through the faithful fake (real numbers: the fake engine runs ONNX Runtime),
plus one real-hardware test under the ``gpu`` marker.

Each test of a point where the fake follows the real API names the source in
tests/_support/fake_tensorrt.py or fake_pycuda.py (their docstrings list every difference)."""

import sys
import threading

import numpy as np
import pytest

from tandem.devices.backends.tensorrt import ForeignEngine, TensorRTBackend
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    MissingDependency,
    NotFound,
    ResourceExhausted,
)
from tests._support import fake_pycuda, onnx_small
from tests.devices.conftest import GPU_SKIP_REASON, real_tensorrt_available


def build(trt, model: bytes, shapes=None, flags=(), dla_core=None, shape_values=None) -> bytes:
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
    if shapes or shape_values:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in (shapes or {}).items():
            profile.set_shape(name, lo, opt, hi)
        for name, (lo, opt, hi) in (shape_values or {}).items():
            profile.set_shape_input(name, lo, opt, hi)
        assert config.add_optimization_profile(profile) == 0
    engine = builder.build_serialized_network(network, config)
    assert engine is not None, logger.messages
    return bytes(engine)


def reference(model: bytes, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)


def _model(nodes, inputs, outputs, opset=17, ir=8) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _vi(name, elem, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


MLP_SHAPES = {"x": ((1, 8), (4, 8), (16, 8))}


def test_missing_tensorrt_names_the_extra(monkeypatch):
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
        # every copy was truly asynchronous: pinned buffers, never pycuda's synchronous fallback
        assert fake_pycuda.STATE.sync_fallbacks == 0
    assert fake_pycuda.STATE.memory == {} and fake_pycuda.driver_stack() == []


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
        assert backend.batchable
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


# ------------------------------------------------------------------ 1. shape-tensor inputs
def reshape_model() -> bytes:
    """y = Reshape(x, s): ``s`` is a shape tensor (its values decide y's shape)."""
    from onnx import TensorProto, helper

    return _model([helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")],
                  [_vi("x", TensorProto.FLOAT, ["N", 6]), _vi("s", TensorProto.INT64, [2])],
                  [_vi("y", TensorProto.FLOAT, [None, None])])


def test_shape_tensor_inputs_live_in_host_memory(fake_trt):
    # fake_tensorrt docstring, "Shape tensors": TensorLocation.HOST, host pointer (setTensorAddress)
    engine = build(fake_trt, reshape_model(), {"x": ((1, 6), (2, 6), (4, 6))},
                   shape_values={"s": ((1, 1), (2, 6), (24, 24))})
    with TensorRTBackend(engine) as backend:
        assert [(t.name, t.dtype, t.shape) for t in backend.inputs] == [
            ("x", np.float32, (None, 6)), ("s", np.int64, (2,))]
        assert not backend.batchable  # the output's shape comes from values, not the batch
        x = np.arange(12, dtype=np.float32).reshape(2, 6)
        for target in ((3, 4), (12, 1), (4, 3)):
            y = backend.infer({"x": x, "s": np.array(target, np.int64)})["y"]
            np.testing.assert_array_equal(y, x.reshape(target))
        with pytest.raises(InvalidArgument, match="'s' = \\[-1, 24\\] is outside"):
            backend.infer({"x": np.zeros((4, 6), np.float32), "s": np.array([-1, 24], np.int64)})
        assert backend.infer({"x": x, "s": np.array([1, 12], np.int64)})["y"].shape == (1, 12)
        # no device memory was ever given to the shape tensor
        assert "s" not in {k for k, b in backend._buffers.items() if b.device is not None}


# ------------------------------------------------------------- 2. data-dependent shapes
def nonzero_model() -> bytes:
    from onnx import TensorProto, helper

    return _model([helper.make_node("NonZero", ["x"], ["idx"], name="nz"),
                   helper.make_node("Relu", ["x"], ["y"], name="relu")],
                  [_vi("x", TensorProto.FLOAT, ["N"])],
                  [_vi("idx", TensorProto.INT64, [1, None]), _vi("y", TensorProto.FLOAT, ["N"])])


def test_data_dependent_output_shapes_use_an_output_allocator(fake_trt):
    # fake_tensorrt docstring, "Data-dependent output shapes": get_tensor_shape gives -1
    model = nonzero_model()
    with TensorRTBackend(build(fake_trt, model, {"x": ((1,), (4,), (64,))})) as backend:
        assert backend.outputs[0].shape == (1, None) and not backend.batchable
        for x in ([0, 1, 0, 2], [3, 3, 3, 3, 3, 3, 3, 3, 3], [0, 0], [5] * 64, [0, -1, 1]):
            arr = np.array(x, np.float32)
            out = backend.infer({"x": arr})
            idx, y = reference(model, {"x": arr})
            np.testing.assert_array_equal(out["idx"], idx)
            np.testing.assert_array_equal(out["y"], y)
        results = backend.infer_batch([{"x": np.array([1, 0], np.float32)},
                                       {"x": np.array([0, 0, 7], np.float32)}])
    assert [r["idx"].tolist() for r in results] == [[[0]], [[2]]]
    assert fake_pycuda.STATE.memory == {}


def test_an_output_allocator_failure_is_reported_not_swallowed(fake_trt):
    # pyCore.cpp PyOutputAllocator prints and swallows exceptions; the backend keeps them
    with TensorRTBackend(build(fake_trt, nonzero_model(), {"x": ((1,), (4,), (1 << 16,))})) \
            as backend:
        fake_pycuda.STATE.memory_limit = (1 << 16) * 4 * 2 + 4096
        with pytest.raises(ResourceExhausted, match="allocating an output"):
            backend.infer({"x": np.ones(1 << 16, np.float32)})
        fake_pycuda.STATE.memory_limit = 1 << 30
        assert backend.infer({"x": np.ones(3, np.float32)})["idx"].tolist() == [[0, 1, 2]]


# ------------------------------------------------------------------------ 10. BF16, FP8
def test_bf16_inputs_and_outputs_travel_as_uint16_bit_patterns(fake_trt):
    # tensorrt/__init__.py nptype: no numpy type for bfloat16; common_runtime.py: byte buffers
    from onnx import TensorProto, helper

    model = _model([helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                    helper.make_node("Relu", ["f"], ["r"]),
                    helper.make_node("Cast", ["r"], ["y"], to=TensorProto.BFLOAT16)],
                   [_vi("x", TensorProto.BFLOAT16, [2, 3])],
                   [_vi("y", TensorProto.BFLOAT16, [2, 3])])
    values = np.array([[1.0, -2.0, 3.5], [-0.25, 0.5, -8.0]], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact in bfloat16
    with TensorRTBackend(build(fake_trt, model)) as backend:
        assert backend.inputs[0].dtype == np.uint16 and backend.outputs[0].dtype == np.uint16
        out = backend.infer({"x": bits})["y"]
    np.testing.assert_array_equal((out.astype(np.uint32) << 16).view(np.float32),
                                  np.maximum(values, 0))


def test_fp8_io_is_refused_clearly_at_activation(fake_trt):
    from onnx import TensorProto, helper

    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                   [_vi("x", TensorProto.FLOAT8E4M3FN, [2, 3])],
                   [_vi("y", TensorProto.FLOAT, [2, 3])],
                   opset=19, ir=9)
    backend = TensorRTBackend(build(fake_trt, model))
    with pytest.raises(FailedPrecondition, match=r"'x' is FP8.*FLOAT, HALF or BF16"):
        backend.activate()
    assert not backend.is_active and fake_pycuda.STATE.memory == {}


# --------------------------------------------------------------- 9. CUDA context bookkeeping
def test_activate_deactivate_cycles_keep_one_context_reference_and_a_clean_stack(fake_trt):
    # fake_pycuda docstring: pycuda's detach() leaves the primary context on the driver stack
    engine = build(fake_trt, onnx_small.static_relu())
    for _ in range(3):
        with TensorRTBackend(engine) as backend:
            backend.infer({"x": np.ones((2, 3), np.float32)})
            assert fake_pycuda.driver_stack() == []
        assert fake_pycuda.driver_stack() == []
        assert fake_pycuda.STATE.retained == 1  # once per device per process
    assert fake_pycuda.STATE.memory == {}


def test_deactivate_and_infer_on_other_threads(fake_trt):
    engine = build(fake_trt, onnx_small.static_relu())
    backend = TensorRTBackend(engine).activate()
    seen = []

    def work(fn):
        fn()
        seen.append(fake_pycuda.driver_stack())

    t = threading.Thread(target=work, args=(
        lambda: backend.infer({"x": np.ones((2, 3), np.float32)}),))
    t.start()
    t.join()
    t = threading.Thread(target=work, args=(backend.deactivate,))
    t.start()
    t.join()
    assert seen == [[], []] and fake_pycuda.driver_stack() == []
    with TensorRTBackend(engine):
        assert fake_pycuda.STATE.retained == 1  # no reference leaked by the other thread
    assert fake_pycuda.STATE.memory == {}


def test_each_device_gets_its_own_primary_context(fake_trt):
    fake_pycuda.STATE.device_count = 2
    engine = build(fake_trt, onnx_small.static_relu())
    with TensorRTBackend(engine, device=1) as b1, TensorRTBackend(engine, device=0) as b0:
        x = np.ones((2, 3), np.float32)
        b1.infer({"x": x})
        b0.infer({"x": x})
    assert {d: p.refs for d, p in fake_pycuda.STATE.primaries.items()} == {0: 1, 1: 1}
    assert fake_trt.LOADS[0]["device"] == 1 and fake_trt.LOADS[1]["device"] == 0


# ------------------------------------------------------------------ 8. foreign engines
def test_engine_from_another_device_model_warns_or_raises(fake_trt, caplog):
    # fake_tensorrt docstring: same compute capability, another model -> TensorRT only warns
    engine = build(fake_trt, onnx_small.static_relu())
    fake_pycuda.STATE.devices[0].name = "NVIDIA Jetson Orin NX"
    with TensorRTBackend(engine) as backend:
        assert backend.infer({"x": np.ones((2, 3), np.float32)})["y"].shape == (2, 3)
    assert "another device model" in caplog.text
    with pytest.raises(ForeignEngine, match="different models of devices"):
        TensorRTBackend(engine, foreign_engine="error").activate()
    assert fake_pycuda.driver_stack() == []


def test_engine_from_another_compute_capability_is_refused(fake_trt):
    engine = build(fake_trt, onnx_small.static_relu())
    fake_pycuda.STATE.devices[0].compute_capability = (8, 6)
    with pytest.raises(InvalidArgument, match=r"incompatible device, expecting compute 8\.7 got "
                                              r"compute 8\.6"):
        TensorRTBackend(engine).activate()


def test_bad_engine_bytes_are_invalid_argument_and_release_everything(fake_trt):
    backend = TensorRTBackend(b"not an engine")
    with pytest.raises(InvalidArgument, match="cannot deserialize") as err:
        backend.activate()
    assert "magicTag" in str(err.value) and not backend.is_active
    assert fake_pycuda.driver_stack() == [] and fake_pycuda.STATE.memory == {}


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


def test_dla_core_is_set_on_the_runtime_before_deserializing(fake_trt):
    # What TensorRT does with a DLA engine loaded without Runtime.DLA_core is not documented:
    # the fake records the setting instead of refusing (fake_tensorrt docstring).
    fake_trt.FAKE_NUM_DLA_CORES = 2
    data = build(fake_trt, onnx_small.static_relu(), flags=[fake_trt.BuilderFlag.FP16],
                 dla_core=1)
    with TensorRTBackend(data, dla_core=1) as backend:
        assert backend.infer({"x": np.ones((2, 3), np.float32)})["y"].shape == (2, 3)
    assert fake_trt.LOADS[-1] == {"runtime_dla_core": 1, "engine_dla_core": 1, "device": 0}


def test_missing_file_and_missing_device(fake_trt, tmp_path):
    with pytest.raises(NotFound):
        TensorRTBackend(tmp_path / "nope.engine").activate()
    with pytest.raises(FailedPrecondition, match="no CUDA device 3"):
        TensorRTBackend(b"x", device=3).activate()
    with pytest.raises(InvalidArgument, match="foreign_engine"):
        TensorRTBackend(b"x", foreign_engine="ignore")


def test_out_of_device_memory_is_resource_exhausted(fake_trt):
    fake_pycuda.STATE.memory_limit = 64
    engine = build(fake_trt, onnx_small.mlp(), MLP_SHAPES)
    with TensorRTBackend(engine) as backend, pytest.raises(ResourceExhausted):
        backend.infer({"x": np.zeros((16, 8), np.float32)})


# ------------------------------------------------- 11. the fake against the real API itself
def test_fake_host_memory_has_the_buffer_protocol_and_no_len(fake_trt):
    # pyFoundationalTypes.cpp: IHostMemory is py::buffer_protocol() with nbytes, no __len__
    mem = fake_trt._host_memory(b"plan")
    assert bytes(mem) == b"plan" and memoryview(mem).nbytes == mem.nbytes == 4
    with pytest.raises(TypeError):
        len(mem)


def test_fake_profile_set_shape_raises_on_inconsistent_dims(fake_trt):
    # pyCore.cpp opt_profile_set_shape: PY_ASSERT_RUNTIME_ERROR(setDimensions(...))
    profile = fake_trt.IOptimizationProfile()
    with pytest.raises(RuntimeError, match="opt is inconsistent"):
        profile.set_shape("x", (4, 8), (2, 8), (8, 8))
    with pytest.raises(RuntimeError, match="max is inconsistent"):
        profile.set_shape("x", (1, 8), (2, 8), (2, 8, 1))
    assert profile.get_shape("x") == []


def test_fake_pycuda_detach_of_a_primary_context_leaves_it_on_the_driver_stack(fake_trt):
    # pycuda src/cpp/cuda.hpp context::detach: push, cuDevicePrimaryCtxRelease, no pop
    cuda = sys.modules["pycuda.driver"]
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    cuda.Context.pop()
    assert fake_pycuda.driver_stack() == []
    ctx.detach()
    assert fake_pycuda.driver_stack() == [ctx.handle] and fake_pycuda.STATE.retained == 0
    fake_pycuda._stacks()[0].clear()  # what a real process would be left with


def test_fake_pycuda_async_copy_of_pageable_memory_is_synchronous(fake_trt):
    # CUDA driver API, "API synchronization behavior": pageable transfers are synchronous
    from tandem.devices._cuda import pushed

    cuda = sys.modules["pycuda.driver"]
    with pushed(cuda, 0):
        stream = cuda.Stream()
        dev = cuda.mem_alloc(16)
        cuda.memcpy_htod_async(dev, np.arange(4, dtype=np.float32), stream)
        out = np.zeros(4, np.float32)
        cuda.memcpy_dtoh_async(out, dev, stream)
        assert out.tolist() == [0, 1, 2, 3] and stream.is_done()  # done before synchronize()
        dev.free()


@pytest.mark.gpu
@pytest.mark.skipif(not real_tensorrt_available(), reason=GPU_SKIP_REASON)
def test_real_tensorrt_engine_matches_onnxruntime(tmp_path):  # pragma: no cover - needs a GPU
    from tandem.devices.detect import detect_profile
    from tandem.devices.engines import EngineFromOnnx

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
