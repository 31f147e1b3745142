"""compiler._mincut (DADS): the minimum cut is the best down-set (checked by enumerating every
down-set), it finds a partition no prefix of the order reaches, and such a cut travels through
the whole compile (extracted, verified, in the bundle with its provenance and a stable id)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper as h
from onnx import numpy_helper as nh

from tandem.compiler import BundleFromOnnx, CompileOptions
from tandem.compiler._cuts import cut_from_head, find_cuts, mincut_cuts
from tandem.compiler._graph import GraphInfo, GraphTensor, NodeInfo, analyze
from tandem.compiler._mincut import (
    DEFAULT_EDGE_GFLOPS,
    DEFAULT_SPEED_RATIOS,
    SUSTAINED,
    UPLINKS_MBPS,
    Regime,
    min_cut,
    regimes,
)
from tandem.devices.profiles import get_profile
from tandem.protocol.bundle import load_bundle
from tests.compiler.test_pipeline import _check_bundle_reproduces

F = onnx.TensorProto.FLOAT


def two_branches() -> onnx.ModelProto:
    """Inputs x and z (2 KiB each). Branch B (z: a 0.5 MFLOP MatMul that sends as much as it
    reads) comes first in the file's order, branch A (x: a 4 KFLOP MatMul down to 16 bytes)
    second; a join reads both. Every prefix of the order that runs A's reducer runs B's heavy
    MatMul too, yet the best head for a mid price runs A alone."""
    rng = np.random.default_rng(0)

    def w(name, shape):
        return nh.from_array((rng.standard_normal(shape) / math.sqrt(shape[0]))
                             .astype(np.float32), name)

    nodes = [
        h.make_node("MatMul", ["z", "wz"], ["zb"], name="b_heavy"),
        h.make_node("MatMul", ["x", "wx"], ["xa"], name="a_reduce"),
        h.make_node("Relu", ["zb"], ["zc"], name="b_relu"),
        h.make_node("Relu", ["xa"], ["xr"], name="a_relu"),
        h.make_node("MatMul", ["zc", "wzy"], ["zy"], name="b_out"),
        h.make_node("Add", ["zy", "xr"], ["y"], name="join"),
    ]
    graph = h.make_graph(
        nodes, "two_branches",
        [h.make_tensor_value_info("x", F, [1, 512]), h.make_tensor_value_info("z", F, [1, 512])],
        [h.make_tensor_value_info("y", F, [1, 4])],
        [w("wz", (512, 512)), w("wx", (512, 4)), w("wzy", (512, 4))])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _down_sets(info: GraphInfo):
    """Every down-set of the compute DAG (brute force; small graphs only)."""
    compute = info.compute_nodes
    producer = {o: p for p, n in enumerate(compute) for o in n.outputs}
    preds = [{producer[i] for i in n.inputs if i in producer} for n in compute]
    for size in range(len(compute) + 1):
        for head in itertools.combinations(range(len(compute)), size):
            chosen = set(head)
            if all(preds[p] <= chosen for p in chosen):
                yield frozenset(chosen)


def _objective(info: GraphInfo, head, price: float) -> float:
    cut = cut_from_head(info, head, cut_id=-1)
    carried = sum(info.nbytes(o) for o in info.outputs) if len(head) == len(
        info.compute_nodes) else 0  # all-local still returns the outputs across the link
    return price * cut.head_flops + cut.frontier_bytes + carried


def _best(info, price):
    return min(_objective(info, d, price) for d in _down_sets(info))


def test_the_optimum_is_provably_not_a_prefix_and_min_cut_finds_it():
    info = analyze(two_branches())
    names = [n.name for n in info.compute_nodes]
    assert names[:2] == ["b_heavy", "a_reduce"]  # the file's order: B's heavy node first
    price = 0.05  # bytes of uplink per FLOP on the edge
    best = _best(info, price)
    optimal = {d for d in _down_sets(info) if _objective(info, d, price) == best}
    prefixes = {frozenset(range(k)) for k in range(len(names) + 1)}
    assert not optimal & prefixes  # no boundary of the order is optimal
    for solver in ("scipy", "networkx"):
        head = min_cut(info, price, solver=solver)
        assert head in optimal
        assert {names[p] for p in head} == {"a_reduce"}  # the smallest optimal head
    cut = cut_from_head(info, min_cut(info, price), cut_id=-1)
    assert set(cut.frontier) == {"z", "xa"} and not cut.is_prefix


@pytest.mark.parametrize("price", [1e-9, 1e-3, 0.01, 0.05, 0.4, 1.0, 100.0])
def test_min_cut_matches_the_brute_force_at_every_price(price):
    info = analyze(two_branches())
    head = min_cut(info, price)
    assert _objective(info, head, price) <= _best(info, price) + len(info.compute_nodes)


@st.composite
def dags(draw):
    """A random DAG of 2-8 compute nodes over 1-2 inputs, with random FLOPs and sizes."""
    n = draw(st.integers(2, 8))
    n_inputs = draw(st.integers(1, 2))
    names = [f"in{i}" for i in range(n_inputs)]
    tensors = {t: GraphTensor(t, 1, (draw(st.integers(1, 64)),)) for t in names}
    nodes = []
    for i in range(n):
        k = draw(st.integers(1, min(3, len(names))))
        ins = tuple(draw(st.lists(st.sampled_from(names), min_size=k, max_size=k,
                                  unique=True)))
        out = f"t{i}"
        tensors[out] = GraphTensor(out, 1, (draw(st.integers(1, 64)),))
        nodes.append(NodeInfo(f"n{i}", "Op", ins, (out,), draw(st.integers(0, 10_000)), 0, 0,
                              index=i))
        names.append(out)
    read = {i for node in nodes for i in node.inputs}
    outputs = tuple(t for t in names[n_inputs:] if t not in read) or (names[-1],)
    return GraphInfo(nodes=tuple(nodes), tensors=tensors, inputs=tuple(names[:n_inputs]),
                     outputs=outputs, constants=frozenset(),
                     total_flops=sum(node.flops for node in nodes),
                     producers={node.outputs[0]: p for p, node in enumerate(nodes)})


@settings(max_examples=60, deadline=None)
@given(info=dags(), price=st.sampled_from([1e-4, 1e-3, 0.01, 0.1, 1.0]))
def test_min_cut_is_the_best_down_set_of_random_dags(info, price):
    best = _best(info, price)
    heads = {solver: min_cut(info, price, solver=solver) for solver in ("scipy", "networkx")}
    assert heads["scipy"] == heads["networkx"]  # both: the smallest optimal head
    producer = {o: p for p, n in enumerate(info.compute_nodes) for o in n.outputs}
    for p in heads["scipy"]:  # a down-set
        assert all(producer[i] in heads["scipy"] for i in info.compute_nodes[p].inputs
                   if i in producer)
    assert _objective(info, heads["scipy"], price) <= best + len(info.compute_nodes)


def test_regimes_from_profiles_and_defaults():
    default = regimes()
    assert len(default) == len(UPLINKS_MBPS) * len(DEFAULT_SPEED_RATIOS)
    assert {r.edge_gflops for r in default} == {DEFAULT_EDGE_GFLOPS}
    assert {r.cloud_gflops for r in default} == {DEFAULT_EDGE_GFLOPS * k
                                                 for k in DEFAULT_SPEED_RATIOS}
    nano, l4 = get_profile("jetson-orin-nano-8gb"), get_profile("cloud-l4")
    pairs = regimes([nano, l4])
    assert len(pairs) == len(UPLINKS_MBPS)
    # INT8 40 TOPS sparse -> 20 dense -> 10 TFLOPS FP16-equivalent, 30 % sustained
    assert pairs[0].edge_gflops == pytest.approx(40 / 2 / 2 * 1000 * SUSTAINED)
    assert pairs[0].cloud_gflops == pytest.approx(121 * 1000 * SUSTAINED)
    assert all(r.bytes_per_flop > 0 for r in pairs)
    assert regimes([l4, get_profile("cloud-h100")]) == [  # only clouds: the default edge
        Regime(u, DEFAULT_EDGE_GFLOPS, c) for u in UPLINKS_MBPS
        for c in sorted({121 * 1000 * SUSTAINED, 989.5 * 1000 * SUSTAINED})]


def test_partition_ids_are_stable_unique_and_above_every_boundary():
    info = analyze(two_branches())
    n = len(info.compute_nodes)
    fast = [Regime(20_000.0, 50.0, 500.0)]  # price ~0.045 bytes/FLOP
    first = mincut_cuts(info, fast)
    again = mincut_cuts(analyze(two_branches()), fast)
    assert [c.id for c in first] == [c.id for c in again]
    (cut,) = first
    assert cut.id > n and not cut.is_prefix and cut.position == 1
    assert [o.method for o in cut.origins] == ["mincut"] and cut.origins[0].regime == fast[0]
    cuts = find_cuts(info, max_frontier=2, regimes=fast)
    assert cut.id in [c.id for c in cuts]
    assert len({c.id for c in cuts}) == len(cuts)
    assert not any(c.id == cut.id for c in find_cuts(info, max_frontier=1, regimes=fast))


def test_a_min_cut_partition_goes_through_the_whole_compile(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(two_branches(), str(src))
    opts = CompileOptions(targets=("onnxruntime",), uplinks_mbps=(20_000.0,))
    result = BundleFromOnnx(src, tmp_path / "b", opts)()
    n = result.n_nodes
    partition = [r for r in result.cuts if r.cut.id > n]
    assert len(partition) == 1 and partition[0].verification.passed
    with load_bundle(tmp_path / "b") as bundle:
        spec = bundle.manifest.cut(partition[0].cut.id)
        assert [o.method for o in spec.origins] == ["mincut", "mincut"]  # both cloud speeds
        assert {o.uplink_mbps for o in spec.origins} == {20_000.0}
        assert spec.position == 1 and {t.name for t in spec.frontier} == {"z", "xa"}
        assert {o.method for c in bundle.manifest.cuts for o in c.origins} >= {"endpoint"}
        _check_bundle_reproduces(bundle, two_branches())
    plain = BundleFromOnnx(src, tmp_path / "c", CompileOptions(
        targets=("onnxruntime",), uplinks_mbps=(20_000.0,), min_cut=False))()
    assert all(r.cut.id <= n for r in plain.cuts)
