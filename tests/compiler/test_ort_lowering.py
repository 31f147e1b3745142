import numpy as np
import pytest

from tandem.compiler._ort import OrtOptimizedFromOnnx
from tandem.devices.backends.onnxruntime import OnnxRuntimeBackend
from tandem.protocol.errors import InvalidArgument, NotFound
from tests._support import onnx_small


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_optimized_model_loads_unoptimized_and_matches(tmp_path, level):
    import onnx

    src = tmp_path / "part.onnx"
    src.write_bytes(onnx_small.conv_bn_relu(seed=3))
    step = OrtOptimizedFromOnnx(src, tmp_path / "out" / f"part.{level}.onnx", level=level)
    assert not (tmp_path / "out").exists()  # constructing does nothing
    dst = step()
    assert dst.is_file() and list((tmp_path / "out").iterdir()) == [dst]  # no temp left
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "BatchNormalization" not in ops  # folded into the Conv ahead of time

    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with OnnxRuntimeBackend(src) as ref, OnnxRuntimeBackend(dst, optimized=True) as opt:
        np.testing.assert_allclose(opt.infer({"x": x})["y"], ref.infer({"x": x})["y"],
                                   rtol=1e-4, atol=1e-5)


def test_bad_level_and_missing_source(tmp_path):
    with pytest.raises(InvalidArgument):
        OrtOptimizedFromOnnx(tmp_path / "a.onnx", tmp_path / "b.onnx", level="max")
    with pytest.raises(NotFound):
        OrtOptimizedFromOnnx(tmp_path / "a.onnx", tmp_path / "b.onnx")()


def test_broken_model_is_invalid_argument_and_leaves_nothing(tmp_path):
    src = tmp_path / "bad.onnx"
    src.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InvalidArgument) as err:
        OrtOptimizedFromOnnx(src, tmp_path / "o" / "bad.opt.onnx")()
    assert err.value.__cause__ is not None
    assert list((tmp_path / "o").iterdir()) == []
