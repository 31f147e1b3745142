"""compiler._extract: every part passes the checker and head -> tail equals the full model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tandem.compiler._cuts import Cut, boundary_frontiers, find_cuts
from tandem.compiler._errors import CompileError
from tandem.compiler._extract import extract
from tandem.compiler._graph import analyze, load_model
from tests._support.models import (
    big_model,
    cnn_chain,
    dynamic_batch,
    multi_io,
    random_inputs,
    residual,
    unet,
    with_external_data,
)

BUILDERS = [cnn_chain, residual, unet, multi_io, dynamic_batch]


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, {n: feeds[n] for n in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))


def _assert_split_equals_full(model, info, cut, feeds, reference):
    head, tail = extract(model, info, cut)
    onnx.checker.check_model(head, full_check=True)
    onnx.checker.check_model(tail, full_check=True)
    assert [o.name for o in head.graph.output] == [t for t in cut.frontier
                                                  if t not in info.inputs]
    assert [i.name for i in tail.graph.input] == list(cut.frontier)
    assert [o.name for o in tail.graph.output] == list(info.outputs)
    crossing = {**feeds, **_run(head, feeds)}
    got = _run(tail, crossing)
    for name, ref in reference.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)
    return head, tail


@pytest.mark.parametrize("builder", BUILDERS)
def test_every_boundary_splits_exactly(builder):
    model = builder()
    info = analyze(model)
    feeds = random_inputs(model, seed=1, batch=2)
    reference = _run(model, feeds)
    boundaries = list(boundary_frontiers(info, max_frontier=3))
    assert boundaries
    for cut in boundaries:
        _assert_split_equals_full(model, info, cut, feeds, reference)


@pytest.mark.parametrize("builder", [*BUILDERS, big_model])
def test_kept_cuts_split_exactly(builder):
    model = builder()
    info = analyze(model)
    feeds = random_inputs(model, seed=2)
    reference = _run(model, feeds)
    for cut in find_cuts(info)[1:-1]:
        _assert_split_equals_full(model, info, cut, feeds, reference)


def test_cut0_and_local_are_the_whole_model():
    model = cnn_chain()
    info = analyze(model)
    cuts = find_cuts(info)
    assert extract(model, info, cuts[0]) == (None, model)
    assert extract(model, info, cuts[-1]) == (model, None)


def test_parts_copy_only_what_they_read():
    model = unet()
    info = analyze(model)
    for cut in boundary_frontiers(info, max_frontier=3):
        head, tail = extract(model, info, cut)
        for part in (head, tail):
            read = {i for n in part.graph.node for i in n.input}
            assert {t.name for t in part.graph.initializer} <= read
            const_outs = {n.output[0] for n in part.graph.node if n.op_type == "Constant"}
            assert const_outs <= read
        # the two sides together hold each compute node exactly once
        compute = {n.output[0] for n in model.graph.node if n.op_type != "Constant"}
        head_c = {n.output[0] for n in head.graph.node if n.op_type != "Constant"}
        tail_c = {n.output[0] for n in tail.graph.node if n.op_type != "Constant"}
        assert not head_c & tail_c
        assert head_c | tail_c <= compute


def test_constant_nodes_follow_their_readers():
    model = unet()
    info = analyze(model)
    late = max(boundary_frontiers(info, max_frontier=3), key=lambda c: c.position)
    head, tail = extract(model, info, late)
    assert any(n.op_type == "Constant" for n in head.graph.node)
    # the Resize scales Constant sits early in the model but only the decoder reads it
    early = min(boundary_frontiers(info, max_frontier=3), key=lambda c: c.position)
    head, tail = extract(model, info, early)
    scales = next(n.output[0] for n in model.graph.node
                  if n.op_type == "Constant" and n.attribute[0].t.dims == [4]
                  and n.attribute[0].t.data_type == TensorProto.FLOAT)
    assert scales in {n.output[0] for n in tail.graph.node}
    assert scales not in {n.output[0] for n in head.graph.node}


def test_metadata_opsets_and_ir_version_preserved():
    model = residual()
    model.metadata_props.add(key="source", value="tests")
    info = analyze(model)
    cut = find_cuts(info)[1]
    for part in extract(model, info, cut):
        assert part.ir_version == model.ir_version
        assert list(part.opset_import) == list(model.opset_import)
        assert part.producer_name == model.producer_name
        assert {p.key: p.value for p in part.metadata_props} == {"source": "tests"}


def test_symbolic_dims_kept_on_part_boundaries():
    model = dynamic_batch()
    info = analyze(model)
    cut = find_cuts(info)[1]
    head, tail = extract(model, info, cut)
    out = head.graph.output[0].type.tensor_type.shape.dim
    inp = tail.graph.input[0].type.tensor_type.shape.dim
    assert out[0].dim_param == "N" and inp[0].dim_param == "N"
    assert head.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    feeds = random_inputs(model, batch=3)
    np.testing.assert_allclose(_run(tail, _run(head, feeds))["y"], _run(model, feeds)["y"],
                               rtol=1e-5, atol=1e-6)


def test_graph_output_produced_in_head_passes_through_tail():
    model = multi_io()
    info = analyze(model)
    carrying = [c for c in boundary_frontiers(info, max_frontier=3) if "features" in c.frontier]
    assert carrying
    feeds = random_inputs(model, seed=4)
    reference = _run(model, feeds)
    for cut in carrying:
        head, tail = _assert_split_equals_full(model, info, cut, feeds, reference)
        assert "features" in {o.name for o in head.graph.output}
        assert "features" in {i.name for i in tail.graph.input}
        # raw inputs read after the cut go straight to the tail, not through the head
        if "meta" in cut.frontier:
            assert "meta" not in {o.name for o in head.graph.output}


def test_external_data_model_splits(tmp_path):
    path = with_external_data(tmp_path)
    model = load_model(path)
    info = analyze(model)
    feeds = random_inputs(model)
    reference = _run(model, feeds)
    for cut in find_cuts(info)[1:-1]:
        _assert_split_equals_full(model, info, cut, feeds, reference)


def test_frontier_that_does_not_separate_is_rejected():
    model = residual()
    info = analyze(model)
    good = find_cuts(info)[1]
    compute = info.compute_nodes
    # drop the skip from an in-block frontier: the tail would need it
    add = next(p for p, n in enumerate(compute) if n.op_type == "Add")
    bad = Cut(add, add, (compute[add - 1].outputs[0],), 1, 1, 1)
    with pytest.raises(CompileError, match="separate"):
        extract(model, info, bad)
    with pytest.raises(CompileError):
        extract(model, info, Cut(good.id, good.position, ("no_such_tensor",), 1, 1, 1))


def _function_and_if_model():
    """x -> Relu -> a; local function Scale(a); If(sum(a) > 0) reads `a` from the outer scope."""
    fn = helper.make_function(
        "tandem.test", "Scale", ["t"], ["u"],
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
            np.array(2.0, np.float32))),
         helper.make_node("Mul", ["t", "k"], ["u"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Neg", ["b"], ["r_then"])], "then", [],
                               [vi("r_then", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["b"], ["r_else"])], "else", [],
                               [vi("r_else", TensorProto.FLOAT, [1, 4])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Scale", ["a"], ["b"], domain="tandem.test"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["r", "a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fn_if", [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(ir_version=8, graph=graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("tandem.test", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_functions_and_subgraph_outer_reads():
    model = _function_and_if_model()
    info = analyze(model)
    if_node = next(n for n in info.nodes if n.op_type == "If")
    assert "b" in if_node.inputs  # implicit outer-scope read counts as an input
    feeds = {"x": np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)}
    reference = _run(model, feeds)
    cuts = list(boundary_frontiers(info, max_frontier=4))
    assert cuts
    for cut in cuts:
        head, tail = _assert_split_equals_full(model, info, cut, feeds, reference)
        for part in (head, tail):
            assert [f.name for f in part.functions] == ["Scale"]
    # the If must never be separated from the tensor its branches read
    for cut in cuts:
        if_pos = next(p for p, n in enumerate(info.compute_nodes) if n.op_type == "If")
        if cut.position <= if_pos:
            assert "b" in cut.frontier or cut.position <= 1
