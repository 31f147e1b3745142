"""Small seeded ONNX models built with onnx.helper, for backend and lowering tests."""

from __future__ import annotations

import numpy as np

__all__ = ["conv_bn_relu", "mlp", "qdq", "static_relu", "two_inputs", "unsupported"]


def _model(nodes, inputs, outputs, inits=(), opset=17) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _vi(name, shape, elem=None):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, shape)


def _init(name, arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(arr, name)


def mlp(batch="N", din=8, dh=16, dout=4, seed=0) -> bytes:
    """x[batch, din] -> MatMul -> Add -> Relu -> MatMul -> y[batch, dout]."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((din, dh)).astype(np.float32)
    b1 = rng.standard_normal(dh).astype(np.float32)
    w2 = rng.standard_normal((dh, dout)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="mm2")]
    return _model(nodes, [_vi("x", [batch, din])], [_vi("y", [batch, dout])],
                  [_init("w1", w1), _init("b1", b1), _init("w2", w2)])


def two_inputs() -> bytes:
    """a[N, 4] + b[N, 4] -> s[N, 4]; both share the symbolic dim N."""
    from onnx import helper

    return _model([helper.make_node("Add", ["a", "b"], ["s"], name="add")],
                  [_vi("a", ["N", 4]), _vi("b", ["N", 4])], [_vi("s", ["N", 4])])


def static_relu() -> bytes:
    from onnx import helper

    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                  [_vi("x", [2, 3])], [_vi("y", [2, 3])])


def conv_bn_relu(seed=0, channels=8) -> bytes:
    """x[N,3,16,16] -> Conv -> BatchNormalization -> Relu (fusable by ORT)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    c = channels
    inits = [_init("w", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
             _init("bias", rng.standard_normal(c).astype(np.float32)),
             _init("scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
             _init("shift", rng.standard_normal(c).astype(np.float32)),
             _init("mean", rng.standard_normal(c).astype(np.float32)),
             _init("var", rng.uniform(0.5, 1.5, c).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"],
                              ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    return _model(nodes, [_vi("x", ["N", 3, 16, 16])], [_vi("y", ["N", c, 16, 16])], inits)


def qdq() -> bytes:
    """x -> QuantizeLinear -> DequantizeLinear -> Relu: explicitly quantized (QDQ)."""
    from onnx import TensorProto, helper

    inits = [_init("s", np.array(0.05, np.float32)), _init("z", np.array(0, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("Relu", ["dq"], ["y"], name="relu")]
    del TensorProto
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)


def unsupported() -> bytes:
    """A graph with an op the (fake) TensorRT parser has no importer for."""
    from onnx import helper

    return _model([helper.make_node("Unique", ["x"], ["y"], name="uniq", sorted=1)],
                  [_vi("x", [5])], [_vi("y", [None])])
