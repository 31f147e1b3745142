"""compiler._cuts: exact frontiers, constants never cross, Pareto set, cap, cut 0 and all-local."""

from __future__ import annotations

import itertools
import time

import pytest

from tandem.compiler._cuts import Cut, boundary_frontiers, find_cuts, pareto
from tandem.compiler._errors import CompileError
from tandem.compiler._graph import analyze
from tests._support.models import big_model, cnn_chain, dynamic_batch, multi_io, residual, unet

BUILDERS = [cnn_chain, residual, unet, multi_io, dynamic_batch]


def _brute_frontier(info, b):
    """The definition: non-constant tensors produced before boundary b, read at/after it."""
    compute = info.compute_nodes
    produced = set(info.inputs) | {o for n in compute[:b] for o in n.outputs}
    needed = {i for n in compute[b:] for i in n.inputs} | set(info.outputs)
    return {t for t in produced & needed if t not in info.constants}


@pytest.mark.parametrize("builder", BUILDERS)
def test_sweep_matches_the_definition_at_every_boundary(builder):
    info = analyze(builder())
    n = len(info.compute_nodes)
    found = {c.position: c for c in boundary_frontiers(info, max_frontier=10**6)}
    for b in range(1, n):
        expected = _brute_frontier(info, b)
        assert set(found[b].frontier) == expected, b
        assert found[b].frontier_bytes == sum(info.nbytes(t) for t in expected)
        head = sum(node.flops for node in info.compute_nodes[:b])
        assert (found[b].head_flops, found[b].tail_flops) == (head,
                                                              info.total_flops - head
                                                              - _const_flops(info))


def _const_flops(info):
    return sum(n.flops for n in info.nodes if n.constant)


def test_residual_skip_makes_in_block_boundaries_frontier_two():
    info = analyze(residual())
    compute = info.compute_nodes
    cuts = {c.position: c for c in boundary_frontiers(info, max_frontier=3)}
    adds = [p for p, n in enumerate(compute) if n.op_type == "Add"]
    for add in adds:
        skip = compute[add].inputs[0]
        # block = Conv, Relu, Conv, Add: before its first Conv only the block input crosses ...
        assert cuts[add - 3].frontier == (skip,)
        # ... from after that Conv up to the Add the skip and the branch both cross
        for b in range(add - 2, add + 1):
            assert len(cuts[b].frontier) == 2 and skip in cuts[b].frontier, b
        # right after the block (Add + Relu done) the frontier is 1 again
        assert len(cuts[add + 2].frontier) == 1
    one = {c.position for c in boundary_frontiers(info, max_frontier=1)}
    assert not one & {b for add in adds for b in range(add - 2, add + 1)}


def test_unet_long_skip_is_carried_through_the_decoder():
    info = analyze(unet())
    compute = info.compute_nodes
    enc1 = next(n.outputs[0] for n in compute if n.op_type == "Relu")
    last_reader = max(p for p, n in enumerate(compute) if enc1 in n.inputs)
    first = next(p for p, n in enumerate(compute) if enc1 in n.outputs) + 1
    every = {c.position: c for c in boundary_frontiers(info, max_frontier=10)}
    for b in range(first + 1, last_reader + 1):
        assert enc1 in every[b].frontier
    # no cut with a single tensor exists while enc1 is live (except right after it)
    single = {c.position for c in boundary_frontiers(info, max_frontier=1)}
    assert not single & set(range(first + 1, last_reader + 1))


@pytest.mark.parametrize("builder", [*BUILDERS, big_model])
def test_constants_never_cross(builder):
    info = analyze(builder())
    for cut in boundary_frontiers(info, max_frontier=4):
        assert not set(cut.frontier) & info.constants
    for cut in find_cuts(info, max_frontier=3):
        assert not set(cut.frontier) & info.constants


@pytest.mark.parametrize("builder", [*BUILDERS, big_model])
def test_find_cuts_has_cut0_local_pareto_and_cap(builder):
    info = analyze(builder())
    n = len(info.compute_nodes)
    cuts = find_cuts(info, max_frontier=2, max_cuts=5)
    assert 2 <= len(cuts) <= 5 + 2
    assert [c.position for c in cuts] == sorted({c.position for c in cuts})
    first, last = cuts[0], cuts[-1]
    assert (first.id, first.frontier, first.head_flops) == (0, info.inputs, 0)
    assert first.frontier_bytes == sum(info.nbytes(t) for t in info.inputs)
    assert first.cloud_only and not first.local_only
    assert (last.id, last.position, last.frontier, last.tail_flops) == (n, n, (), 0)
    assert last.local_only
    interior = cuts[1:-1]
    for cut in interior:
        assert cut.id == cut.position
        assert 1 <= len(cut.frontier) <= 2
        assert cut.frontier_bytes < first.frontier_bytes  # else cut 0 dominates it
    # no kept cut is dominated by any candidate (both axes minimized)
    candidates = [first, *boundary_frontiers(info, max_frontier=2)]
    for cut in interior:
        for other in candidates:
            dominated = (other.head_flops <= cut.head_flops
                         and other.frontier_bytes <= cut.frontier_bytes
                         and (other.head_flops, other.frontier_bytes)
                         != (cut.head_flops, cut.frontier_bytes))
            assert not dominated, (cut, other)


def test_pareto_drops_dominated_and_keeps_tradeoffs():
    def cut(pos, flops, nbytes):
        return Cut(pos, pos, ("t",), nbytes, flops, 100 - flops)

    a, b, c, d, e = cut(1, 10, 500), cut(2, 20, 400), cut(3, 30, 450), cut(4, 40, 100), \
        cut(5, 40, 100)
    kept = pareto([c, e, a, d, b])
    assert kept == [a, b, d]  # c: b has less work and fewer bytes; e ties d, later position


def test_cap_spreads_over_head_share():
    info = analyze(big_model(300))
    many = find_cuts(info, max_frontier=2, max_cuts=100)
    few = find_cuts(info, max_frontier=2, max_cuts=1)
    assert len(few) == 1 + 2
    assert {c.position for c in few} <= {c.position for c in many}
    with pytest.raises(CompileError):
        find_cuts(info, max_cuts=0)
    with pytest.raises(CompileError):
        find_cuts(info, max_frontier=0)


def test_more_cuts_kept_when_they_trade_bytes_for_work():
    info = analyze(residual())
    cuts = find_cuts(info, max_frontier=2, max_cuts=8)
    interior = cuts[1:-1]
    assert len(interior) >= 2
    assert all(a.frontier_bytes > b.frontier_bytes for a, b in itertools.pairwise(interior))
    assert all(a.head_flops < b.head_flops for a, b in itertools.pairwise(interior))


def test_graph_output_produced_in_head_is_carried():
    info = analyze(multi_io())
    compute = info.compute_nodes
    made = next(p for p, n in enumerate(compute) if "features" in n.outputs) + 1
    cuts = {c.position: c for c in boundary_frontiers(info, max_frontier=5)}
    for b in range(made, len(compute)):
        assert "features" in cuts[b].frontier
        assert "meta" in cuts[b].frontier or b > next(
            p for p, n in enumerate(compute) if "meta" in n.inputs)


def test_dynamic_batch_bytes_follow_batch():
    one = find_cuts(analyze(dynamic_batch(), batch=1))
    four = find_cuts(analyze(dynamic_batch(), batch=4))
    assert [c.position for c in one] == [c.position for c in four]
    assert [4 * c.frontier_bytes for c in one] == [c.frontier_bytes for c in four]


def test_sweep_is_fast_on_big_model():
    info = analyze(big_model())
    start = time.perf_counter()
    cuts = find_cuts(info)
    every = list(boundary_frontiers(info, max_frontier=2))
    assert time.perf_counter() - start < 0.5
    assert len(every) > 300 and 3 <= len(cuts) <= 8


def test_boundaries_with_untyped_tensors_are_skipped():
    from onnx import helper

    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "untyped", [vi("x", 1, [1, 4])], [vi("y", 1, [1, 4])])
    model = helper.make_model(ir_version=8, graph=graph,
                              opset_imports=[helper.make_opsetid("", 17)])
    typed = {c.position for c in boundary_frontiers(analyze(model), 2)}
    assert typed == {1, 2}
    info = analyze(model, infer_shapes=False)  # no value_info: a and b are untyped
    assert list(boundary_frontiers(info, 2)) == []
    assert [c.position for c in find_cuts(info)] == [0, 3]
