"""The Backend contract, exercised through OnnxRuntimeBackend (real ONNX Runtime on the CPU)."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from tandem.devices.backends import Backend, TensorMeta
from tandem.devices.backends.onnxruntime import OnnxRuntimeBackend
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, NotFound, TandemError
from tests._support import onnx_small


def _reference(model: bytes, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_import_devices_does_not_import_heavy_libraries():
    code = ("import sys, devices, devices.backends, devices.profiles, devices.detect, "
            "devices.cli; import devices.backends.onnxruntime, devices.backends.tensorrt; "
            "bad = [m for m in ('onnxruntime', 'onnx', 'tensorrt', 'pycuda', 'rich') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_construction_allocates_nothing(monkeypatch):
    import onnxruntime as ort

    created = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: created.append(a))
    backend = OnnxRuntimeBackend(onnx_small.mlp())
    assert created == [] and backend._sess is None and not backend.is_active


def test_state_checks():
    backend = OnnxRuntimeBackend(onnx_small.mlp())
    x = np.zeros((1, 8), np.float32)
    with pytest.raises(FailedPrecondition, match="not active"):
        backend.infer({"x": x})
    with pytest.raises(FailedPrecondition):
        _ = backend.inputs
    with pytest.raises(FailedPrecondition):
        backend.deactivate()
    backend.activate()
    with pytest.raises(FailedPrecondition, match="already active"):
        backend.activate()
    backend.deactivate()
    with pytest.raises(FailedPrecondition):
        backend.infer({"x": x})


def test_context_manager_runs_and_releases():
    model = onnx_small.mlp()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    with OnnxRuntimeBackend(model) as backend:
        assert backend.is_active
        out = backend.infer({"x": x})
        assert list(out) == ["y"]
        np.testing.assert_allclose(out["y"], _reference(model, {"x": x})[0], rtol=1e-6)
    assert not backend.is_active and backend._sess is None


def test_metadata_keeps_symbolic_dims():
    with OnnxRuntimeBackend(onnx_small.two_inputs()) as backend:
        assert backend.inputs == (TensorMeta("a", np.dtype(np.float32), ("N", 4)),
                                  TensorMeta("b", np.dtype(np.float32), ("N", 4)))
        assert backend.outputs[0].shape == ("N", 4) and backend.batchable


@pytest.mark.parametrize("feeds,match", [
    ({}, "missing inputs"),
    ({"x": np.zeros((1, 8), np.float32), "z": np.zeros(1, np.float32)}, "unexpected"),
    ({"y": np.zeros((1, 8), np.float32)}, "missing inputs \\['x'\\]"),
    ({"x": np.zeros((1, 8), np.float64)}, "dtype float64"),
    ({"x": np.zeros((8,), np.float32)}, "rank 1"),
    ({"x": np.zeros((1, 7), np.float32)}, "dim 1 must be 8"),
    ({"x": [[0.0] * 8]}, "numpy array"),
])
def test_bad_inputs_are_invalid_argument(feeds, match):
    with OnnxRuntimeBackend(onnx_small.mlp()) as backend, pytest.raises(InvalidArgument,
                                                                        match=match):
        backend.infer(feeds)


def test_named_dims_must_agree_across_inputs():
    with OnnxRuntimeBackend(onnx_small.two_inputs()) as backend, \
            pytest.raises(InvalidArgument, match="'N'"):
        backend.infer({"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)})


def test_infer_batch_stacks_along_the_leading_dim(monkeypatch):
    model = onnx_small.mlp()
    rng = np.random.default_rng(2)
    reqs = [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (1, 3, 2)]
    with OnnxRuntimeBackend(model) as backend:
        calls = []
        real = backend._infer_impl
        monkeypatch.setattr(backend, "_infer_impl", lambda f: calls.append(f) or real(f))
        outs = backend.infer_batch(reqs)
    assert len(calls) == 1 and calls[0]["x"].shape == (6, 8)
    for req, out in zip(reqs, outs, strict=True):
        np.testing.assert_allclose(out["y"], _reference(model, req)[0], rtol=1e-5, atol=1e-6)


def test_infer_batch_isolates_a_bad_request():
    with OnnxRuntimeBackend(onnx_small.mlp()) as backend:
        good = {"x": np.ones((2, 8), np.float32)}
        outs = backend.infer_batch([good, {"x": np.ones((2, 5), np.float32)}, good])
    assert isinstance(outs[1], InvalidArgument)
    assert outs[0]["y"].shape == (2, 4) and np.array_equal(outs[0]["y"], outs[2]["y"])


def test_static_part_is_not_batched_but_still_served():
    with OnnxRuntimeBackend(onnx_small.static_relu()) as backend:
        assert not backend.batchable
        x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
        outs = backend.infer_batch([{"x": x}, {"x": -x}])
    np.testing.assert_array_equal(outs[0]["y"], np.maximum(x, 0))
    np.testing.assert_array_equal(outs[1]["y"], np.maximum(-x, 0))


def test_optimized_flag_disables_graph_optimizations(tmp_path, monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(model, so, providers):
        seen.append(so.graph_optimization_level)
        return real(model, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    with OnnxRuntimeBackend(onnx_small.mlp(), optimized=True, intra_op_threads=1):
        pass
    with OnnxRuntimeBackend(onnx_small.mlp()):
        pass
    assert seen[0] == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert seen[1] != ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_unavailable_providers_fall_back_to_cpu():
    with OnnxRuntimeBackend(onnx_small.mlp(), providers=["TensorrtExecutionProvider",
                                                         "CUDAExecutionProvider"]) as backend:
        assert backend.providers == ["CPUExecutionProvider"]


def test_load_errors_are_translated(tmp_path):
    with pytest.raises(NotFound):
        OnnxRuntimeBackend(tmp_path / "missing.onnx").activate()
    bad = OnnxRuntimeBackend(b"not an onnx model")
    with pytest.raises(TandemError) as err:
        bad.activate()
    assert isinstance(err.value, InvalidArgument) and err.value.__cause__ is not None
    assert not bad.is_active


def test_backend_hooks_are_abstract():
    with pytest.raises(NotImplementedError):
        Backend().activate()


def test_infer_batch_groups_requests_that_differ_beyond_the_leading_dim(monkeypatch):
    # ("N", "S") input: requests with different S cannot share a batch, yet each is served
    relu = onnx_small._model(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        [onnx_small._vi("x", ["N", "S"])], [onnx_small._vi("y", ["N", "S"])])
    reqs = [{"x": np.full((1, 3), -1.0, np.float32)}, {"x": np.ones((2, 5), np.float32)},
            {"x": np.ones((1, 3), np.float32)}]
    with OnnxRuntimeBackend(relu) as backend:
        calls = []
        real = backend._infer_impl
        monkeypatch.setattr(backend, "_infer_impl", lambda f: calls.append(f) or real(f))
        outs = backend.infer_batch(reqs)
    assert sorted(c["x"].shape for c in calls) == [(2, 3), (2, 5)]
    for req, out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out["y"], np.maximum(req["x"], 0))


def test_with_block_takes_over_an_already_active_backend():
    backend = OnnxRuntimeBackend(onnx_small.mlp()).activate()
    with backend as same:
        assert same is backend and backend.is_active
    assert not backend.is_active  # the block owned it and deactivated it
