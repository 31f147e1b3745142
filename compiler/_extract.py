"""Cut a model into a head and a tail at a :class:`~tandem.compiler._cuts.Cut`.

Both parts are defined by the frontier alone (backward slices), so they hold exactly the nodes
needed on each side:

- head: graph inputs -> the frontier tensors that nodes produce (frontier tensors that are raw
  graph inputs are sent by the edge as they are, so the head does not re-emit them);
- tail: the frontier tensors (raw inputs among them) -> every original graph output. A graph
  output produced in the head is a frontier tensor and the tail passes it through unchanged.

Initializers, sparse initializers and Constant nodes are copied only to the side that reads
them (both, when both do). Opset imports, IR version, model-local functions, producer fields and
metadata are preserved. Input/output types come from shape inference with symbolic dims kept.
Each part must pass ``onnx.checker.check_model`` (with ``full_check`` unless shape inference of
the original model itself cannot complete); a part that fails is our bug
(:class:`~tandem.compiler._errors.ExtractionError`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tandem.compiler._cuts import Cut
from tandem.compiler._errors import CompileError, ExtractionError
from tandem.compiler._graph import GraphInfo, GraphTensor, implicit_inputs
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    from onnx import ModelProto, ValueInfoProto

__all__ = ["extract", "slice_nodes"]


def slice_nodes(info: GraphInfo, targets: Iterable[str], stop: Iterable[str]) -> list[int]:
    """Positions in ``info.nodes`` of the nodes needed to compute ``targets`` from ``stop``.

    Walks producers backward from ``targets`` and does not cross tensors in ``stop`` (nor
    graph inputs and initializers, which have no producer). Returned in topological order.
    """
    producers = info.producers
    stop_set = set(stop)
    needed: set[int] = set()
    stack = [t for t in targets if t not in stop_set]
    seen: set[str] = set(stack)
    while stack:
        name = stack.pop()
        pos = producers.get(name)
        if pos is None or pos in needed:
            continue
        needed.add(pos)
        for inp in info.nodes[pos].inputs:
            if inp not in seen and inp not in stop_set:
                seen.add(inp)
                stack.append(inp)
    return sorted(needed)


def _value_info(spec: GraphTensor) -> ValueInfoProto:
    onnx = require("onnx")
    shape = None if spec.shape is None else [None if d == "?" else d for d in spec.shape]
    return onnx.helper.make_tensor_value_info(spec.name, spec.dtype, shape)


def _build(
    model: ModelProto,
    info: GraphInfo,
    positions: list[int],
    inputs: list[str],
    outputs: list[str],
    name: str,
) -> ModelProto:
    onnx = require("onnx")
    graph = model.graph
    nodes = [graph.node[info.nodes[p].index] for p in positions]
    read: set[str] = set(outputs)
    for p in positions:
        read.update(info.nodes[p].inputs)
    for node in nodes:  # a subgraph may read an initializer of the outer graph
        read.update(implicit_inputs(node))
    initializers = [t for t in graph.initializer if t.name in read]
    sparse = [t for t in graph.sparse_initializer if t.values.name in read]
    known = {vi.name for vi in (*graph.input, *graph.output)}
    produced = {o for p in positions for o in info.nodes[p].outputs}
    value_info = [
        _value_info(info.tensors[t])
        for t in sorted(produced)
        if t in info.tensors and t not in known and t not in outputs
        and info.tensors[t].dtype
    ]
    for tensor in (*inputs, *outputs):
        if tensor not in info.tensors or not info.tensors[tensor].dtype:
            raise CompileError(f"tensor {tensor!r} has no inferred type; cannot cut there")
    part_inputs = [_value_info(info.tensors[t]) for t in inputs]
    if model.ir_version < 4:  # IR <= 3 lists every initializer among the graph inputs too
        declared = {vi.name: vi for vi in graph.input}
        part_inputs += [declared[t.name] for t in initializers
                        if t.name in declared and t.name not in inputs]
    part_graph = onnx.helper.make_graph(
        nodes,
        name,
        part_inputs,
        [_value_info(info.tensors[t]) for t in outputs],
        initializer=initializers,
        sparse_initializer=sparse,
        value_info=value_info,
    )
    part = onnx.ModelProto()
    part.ir_version = model.ir_version
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.metadata_props.extend(model.metadata_props)
    part.producer_name = model.producer_name
    part.producer_version = model.producer_version
    part.domain = model.domain
    part.model_version = model.model_version
    part.doc_string = model.doc_string
    part.graph.CopyFrom(part_graph)
    return part


def _check(part: ModelProto, what: str, full: bool) -> None:
    onnx = require("onnx")
    try:
        onnx.checker.check_model(part, full_check=full)
    except onnx.shape_inference.InferenceError as exc:
        if not full:
            raise ExtractionError(f"{what} fails the ONNX checker: {exc}") from exc
        _check(part, what, full=False)
    except onnx.checker.ValidationError as exc:
        raise ExtractionError(f"{what} fails the ONNX checker: {exc}") from exc


def extract(
    model: ModelProto, info: GraphInfo, cut: Cut, *, check: bool = True
) -> tuple[ModelProto | None, ModelProto | None]:
    """Split ``model`` at ``cut`` into ``(head, tail)``.

    Cut 0 returns ``(None, model)``: nothing runs on the edge. The all-local cut returns
    ``(model, None)``. ``info`` must come from ``analyze(model)``.
    """
    n = len(info.compute_nodes)
    if cut.position == 0:
        return None, model
    if cut.position >= n or cut.local_only:
        return model, None
    if not cut.frontier:
        raise CompileError(f"cut {cut.id} has an empty frontier but is not the all-local cut")
    unknown = [t for t in cut.frontier if t not in info.tensors and t not in info.producers]
    if unknown:
        raise CompileError(f"cut {cut.id}: frontier tensors {unknown} are not in the model")
    graph_inputs = set(info.inputs)
    head_targets = [t for t in cut.frontier if t not in graph_inputs]
    if not head_targets:
        raise CompileError(f"cut {cut.id}: the head produces nothing the tail needs")
    head_nodes = slice_nodes(info, head_targets, info.inputs)
    head_reads = {i for p in head_nodes for i in info.nodes[p].inputs}
    head_inputs = [t for t in info.inputs if t in head_reads or t in head_targets]
    tail_nodes = slice_nodes(info, info.outputs, cut.frontier)
    tail_reads = {i for p in tail_nodes for i in info.nodes[p].inputs} | set(info.outputs)
    tail_inputs = list(cut.frontier)
    uncarried = sorted(t for t in tail_reads if t in graph_inputs and t not in cut.frontier)
    recomputed = {p for p in tail_nodes if not info.nodes[p].constant} & set(head_nodes)
    if uncarried or recomputed:
        what = uncarried or sorted({o for p in recomputed for o in info.nodes[p].outputs})
        raise CompileError(
            f"frontier of cut {cut.id} does not separate the graph: the tail needs {what}"
        )
    full = all(info.spec(t).shape is not None for t in (*info.inputs, *info.outputs))
    name = model.graph.name or "model"
    head = _build(model, info, head_nodes, head_inputs, head_targets, f"{name}_head{cut.id}")
    tail = _build(model, info, tail_nodes, tail_inputs, list(info.outputs),
                  f"{name}_tail{cut.id}")
    if check:
        _check(head, f"head of cut {cut.id}", full)
        _check(tail, f"tail of cut {cut.id}", full)
    return head, tail
