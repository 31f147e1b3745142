"""compiler._graph: loading (typed errors), shape inference, topological order, FLOPs, constants."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tandem.compiler._errors import InvalidModelError, ModelLoadError
from tandem.compiler._graph import analyze, load_model
from tandem.protocol.errors import InvalidArgument, NotFound
from tests._support.models import (
    big_model,
    cnn_chain,
    dynamic_batch,
    multi_io,
    residual,
    save,
    unet,
    with_external_data,
)

BUILDERS = [cnn_chain, residual, unet, multi_io, dynamic_batch]


def _node(info, op_type, nth=0):
    return [n for n in info.nodes if n.op_type == op_type][nth]


# -- loading -------------------------------------------------------------------------------------


def test_load_from_path_bytes_and_proto_agree(tmp_path):
    model = cnn_chain()
    path = save(model, tmp_path / "m.onnx")
    from_path = load_model(path)
    from_str = load_model(str(path))
    from_bytes = load_model(model.SerializeToString())
    assert load_model(model) is model
    assert from_path == from_str == from_bytes == model


def test_external_data_is_loaded(tmp_path):
    path = with_external_data(tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    raw = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    model = load_model(path)
    assert all(t.data_location != TensorProto.EXTERNAL for t in model.graph.initializer)
    ref = {t.name: numpy_helper.to_array(t) for t in residual().graph.initializer}
    for t in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), ref[t.name])


def test_missing_external_data_is_a_one_line_not_found(tmp_path):
    path = with_external_data(tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert isinstance(err.value, NotFound)
    message = str(err.value)
    assert "\n" not in message and "model.onnx.data" in message


def test_missing_model_file_is_not_found(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "nope.onnx")


@pytest.mark.parametrize("data", [b"definitely not an onnx model \xff\xfe", b"", b"\x08\x07"])
def test_not_onnx_is_invalid_argument(tmp_path, data):
    with pytest.raises(InvalidModelError) as err:
        load_model(data)
    assert isinstance(err.value, InvalidArgument)
    path = tmp_path / "junk.onnx"
    path.write_bytes(data)
    with pytest.raises(InvalidModelError):
        load_model(path)


# -- analysis ------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", BUILDERS)
def test_order_is_topological_and_covers_every_node(builder):
    model = builder()
    info = analyze(model)
    assert sorted(n.index for n in info.nodes) == list(range(len(model.graph.node)))
    seen = set(info.inputs) | {t.name for t in model.graph.initializer}
    for node in info.nodes:
        assert all(i in seen for i in node.inputs), node
        seen.update(node.outputs)
    assert all(o in seen for o in info.outputs)
    assert info.total_flops == sum(n.flops for n in info.nodes) > 0


def test_shuffled_nodes_are_sorted_again():
    model = residual()
    nodes = list(model.graph.node)
    rng = np.random.default_rng(3)
    shuffled = [nodes[i] for i in rng.permutation(len(nodes))]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    info = analyze(model)
    position = {o: p for p, n in enumerate(info.nodes) for o in n.outputs}
    for p, node in enumerate(info.nodes):
        assert all(position.get(i, -1) < p for i in node.inputs)


def test_cycle_is_rejected():
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["x", "a"], ["y"])]
    graph = helper.make_graph(nodes, "cyc", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info("y", 1, [2])])
    model = helper.make_model(ir_version=8, graph=graph,
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidModelError, match="cycle"):
        analyze(model, infer_shapes=False)


def test_conv_flops_and_bytes_by_hand():
    info = analyze(cnn_chain())
    conv = _node(info, "Conv", 0)
    # input [1,3,32,32], weight [8,3,3,3], pads 1 -> out [1,8,32,32]
    out_elems = 8 * 32 * 32
    assert conv.flops == 2 * out_elems * 3 * 3 * 3 + out_elems
    assert conv.param_bytes == (8 * 3 * 3 * 3 + 8) * 4
    assert conv.out_bytes == out_elems * 4
    assert info.tensors[conv.outputs[0]].shape == (1, 8, 32, 32)
    relu = _node(info, "Relu", 0)
    assert relu.flops == out_elems
    pool = _node(info, "MaxPool", 0)
    assert pool.flops == 8 * 16 * 16 * 4


def test_gemm_flops_by_hand():
    info = analyze(cnn_chain())
    gemm = _node(info, "Gemm")
    # [1,1024] x [1024,10]^T + bias
    assert gemm.flops == 2 * 1 * 10 * 1024 + 10
    assert gemm.param_bytes == (10 * 1024 + 10) * 4


def test_attention_matmul_flops_by_hand():
    info = analyze(big_model(120))
    matmuls = [n for n in info.nodes if n.op_type == "MatMul"]
    proj = matmuls[0]  # [1,64,16] x [16,16]
    assert proj.flops == 2 * 64 * 16 * 16
    scores = next(n for n in matmuls if info.tensors[n.outputs[0]].shape == (1, 2, 64, 64))
    # [1,2,64,8] x [1,2,8,64] -> [1,2,64,64], K = 8
    assert scores.flops == 2 * (2 * 64 * 64) * 8
    softmax = _node(info, "Softmax")
    assert softmax.flops == 5 * 2 * 64 * 64
    ln = _node(info, "LayerNormalization")
    assert ln.flops == 8 * 64 * 16


def test_conv_transpose_flops_by_hand():
    info = analyze(unet())
    ct = _node(info, "ConvTranspose")
    # input [1,16,16,16], weight [16,8,2,2], no bias
    assert ct.flops == 2 * (16 * 16 * 16) * 8 * 2 * 2
    assert info.tensors[ct.outputs[0]].shape == (1, 8, 32, 32)


def test_symbolic_dims_are_kept_and_cost_uses_batch():
    model = dynamic_batch()
    one = analyze(model)
    four = analyze(model, batch=4)
    assert one.tensors["x"].shape == ("N", 3, 16, 16)
    assert one.tensors["y"].shape == ("N", 10)
    conv = _node(one, "Conv", 0)
    assert one.tensors[conv.outputs[0]].shape == ("N", 8, 16, 16)
    assert _node(four, "Conv", 0).flops == 4 * conv.flops
    assert _node(four, "Conv", 0).out_bytes == 4 * conv.out_bytes
    assert four.nbytes("x") == 4 * 3 * 16 * 16 * 4


def test_constants_cover_initializers_constant_nodes_and_folded_chains():
    info = analyze(unet())
    model = unet()
    inits = {t.name for t in model.graph.initializer}
    const_outs = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    assert len(const_outs) >= 8
    assert inits | const_outs <= info.constants
    assert "input" not in info.constants
    assert all(n.constant for n in info.nodes if n.op_type == "Constant")
    assert not any(n.constant for n in info.nodes if n.op_type == "Conv")
    # a node computed only from constants is constant too
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.array([2.0], np.float32))),
        helper.make_node("Mul", ["c", "w"], ["cw"]), helper.make_node("Add", ["x", "cw"], ["y"])]
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])],
                              [numpy_helper.from_array(np.array([3.0], np.float32), "w")])
    info = analyze(helper.make_model(ir_version=8, graph=graph,
                                     opset_imports=[helper.make_opsetid("", 17)]))
    assert {"c", "w", "cw"} <= info.constants and "y" not in info.constants


def test_multi_io_inputs_outputs_and_dtypes():
    info = analyze(multi_io())
    assert info.inputs == ("image", "meta")
    assert info.outputs == ("logits", "features")
    assert info.tensors["features"].shape == (1, 4, 8, 8)
    assert info.tensors["meta"].dtype == TensorProto.FLOAT
    assert info.nbytes("meta") == 16


def test_big_model_analyzes_fast():
    model = big_model()
    assert 650 <= len(model.graph.node) <= 760
    analyze(model)  # warm imports
    start = time.perf_counter()
    info = analyze(model)
    assert time.perf_counter() - start < 1.5
    assert len(info.nodes) == len(model.graph.node)
