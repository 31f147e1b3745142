"""Load an ONNX model and analyze it: shapes, a topological order, per-node cost, constants.

``load_model`` is the ONNX/protobuf exception boundary for reading models; ``analyze`` turns a
model into a :class:`GraphInfo`, the read-only picture every later compiler step works from.

Cost conventions (documented here once, tested by hand-computed values):

- Conv: ``2 * N * C_out * prod(out_spatial) * (C_in / group) * prod(kernel)``, plus one add per
  output element when a bias is given. ConvTranspose: ``2 * N * C_in * prod(in_spatial) *
  (C_out / group) * prod(kernel)`` (+ bias adds).
- MatMul (batched and broadcast, so attention chains ``Q @ K^T`` and ``P @ V`` are covered):
  ``2 * prod(output shape) * K``. Gemm: ``2 * M * N * K`` plus ``M * N`` when C is given.
- Elementwise math (Add, Mul, Relu, Sigmoid, ...): one per output element.
- Pooling: one per output element per kernel element; global pooling: one per input element.
- Softmax / LogSoftmax: five per element; BatchNormalization: two per element; Layer/Instance/
  Group normalization: eight per element; reductions: one per input element.
- Everything else (Reshape, Transpose, Concat, Gather, Cast, ...): 0.

Shapes. Symbolic dimensions (``dim_param``) stay symbolic in :class:`GraphTensor` (a dim is
``int`` or ``str``; an unknown dim is ``"?"``): extracted parts keep them open. Costs (FLOPs,
bytes) are counted at concrete input shapes: ``analyze(model, input_shapes={...})`` fixes them
in a copy of the graph and runs shape inference on that copy, so a model with symbolic H and W
is costed exactly as the same model with those sizes written into its file (what inference
still cannot size is measured, see :func:`unresolved_tensors`). Without ``input_shapes`` every
symbolic dim counts as ``batch`` (default 1).

Shape inference runs on a *skeleton* of the model: large initializers become typed graph inputs,
so inference never copies the weights (data propagation only needs the small integer tensors
that shape arithmetic reads).
"""

from __future__ import annotations

import heapq
import math
import os
from collections import ChainMap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.compiler._errors import InvalidModelError, ModelLoadError
from tandem.devices.engines import iter_tensors
from tandem.protocol.dtypes import DTypeInfo, UnsupportedDType, by_onnx
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from onnx import GraphProto, ModelProto, NodeProto

__all__ = [
    "Dim",
    "GraphInfo",
    "GraphTensor",
    "NodeInfo",
    "analyze",
    "dtype_size",
    "external_data_files",
    "implicit_inputs",
    "input_specs",
    "load_model",
    "sendable",
    "skeleton",
    "unresolved_tensors",
]

Dim = int | str

def _ops(text: str) -> frozenset[str]:
    return frozenset(text.split())


_ELEMENTWISE = _ops(
    """Add Sub Mul Div Pow Mod Relu LeakyRelu PRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish
    Tanh Exp Log Sqrt Reciprocal Neg Abs Erf Gelu Softplus Softsign Mish Clip Max Min Sum Mean
    Where Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Floor Ceil Round Sign
    ThresholdedRelu Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Not BitShift
    Resize Upsample QuantizeLinear DequantizeLinear Trilu"""
)
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_REDUCE = _ops(
    """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin CumSum"""
)
_NORM8 = frozenset(
    {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization",
     "MeanVarianceNormalization", "SimplifiedLayerNormalization"}
)
# Ops whose output is not a function of their inputs: never constant, even with no inputs.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli", "Dropout"}
)


@dataclass(frozen=True)
class GraphTensor:
    """A tensor's element type (ONNX ``TensorProto`` code) and shape (``None`` = unknown rank)."""

    name: str
    dtype: int
    shape: tuple[Dim, ...] | None

    @property
    def is_float(self) -> bool:
        row = _dtype_row(self.dtype)
        return row is not None and row.is_float

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...] | None:
        """The shape with every symbolic or unknown dim replaced by ``batch``."""
        if self.shape is None:
            return None
        return tuple(d if isinstance(d, int) else batch for d in self.shape)

    def numel(self, batch: int = 1) -> int | None:
        shape = self.concrete_shape(batch)
        return None if shape is None else math.prod(shape)

    def nbytes(self, batch: int = 1) -> int:
        """Bytes of this tensor with symbolic dims = ``batch``; 0 when the rank is unknown."""
        n = self.numel(batch)
        return 0 if n is None else n * dtype_size(self.dtype)

    @property
    def np_dtype(self) -> np.dtype:
        onnx = require("onnx")
        import numpy as np

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.dtype))


@dataclass(frozen=True)
class NodeInfo:
    """One node of the graph, in topological order, with its cost.

    ``inputs`` includes tensors a subgraph (If/Loop/Scan body) reads from the outer scope, and
    omits empty optional-input names. ``index`` is the node's position in ``graph.node``;
    ``constant`` marks nodes computed only from constants (copied to both sides of any cut).
    """

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: int
    param_bytes: int
    out_bytes: int
    index: int = -1
    constant: bool = False


@dataclass(frozen=True)
class GraphInfo:
    """What the compiler knows about a model after shape inference and costing.

    ``nodes`` is a topological order (the model's own order when valid, else a stable sort of
    it). ``inputs`` are the graph inputs that are not initializers; ``constants`` holds
    initializers, Constant-node outputs and everything computed only from those.
    """

    nodes: tuple[NodeInfo, ...]
    tensors: Mapping[str, GraphTensor]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: frozenset[str]
    total_flops: int
    batch: int = 1
    opset: int = 0
    producers: Mapping[str, int] = field(default_factory=dict, repr=False)
    # outputs of shape arithmetic (Shape/Size and what only they and constants feed): a few
    # int64 values; they cross cuts but do not count against a cut's tensor limit
    shape_tensors: frozenset[str] = frozenset()
    # shapes for cost only: inferred at ``input_shapes`` (when given), with dims inference left
    # unknown filled in from a measured run (see :func:`unresolved_tensors`); ``tensors`` itself
    # stays as declared, since extracted parts must not pin a dim that may vary
    cost_tensors: Mapping[str, GraphTensor] | None = field(default=None, repr=False)
    # the concrete input shapes costs were counted at (None: symbolic dims = ``batch``)
    input_shapes: Mapping[str, tuple[int, ...]] | None = None

    def spec(self, name: str) -> GraphTensor:
        """The spec of ``name``; a tensor shape inference could not type gets dtype 0."""
        return self.tensors.get(name) or GraphTensor(name, 0, None)

    def cost_spec(self, name: str) -> GraphTensor:
        """The spec bytes and FLOPs are counted with (measured where inference did not know)."""
        if self.cost_tensors is not None and name in self.cost_tensors:
            return self.cost_tensors[name]
        return self.spec(name)

    def nbytes(self, name: str) -> int:
        return self.cost_spec(name).nbytes(self.batch)

    @property
    def compute_nodes(self) -> tuple[NodeInfo, ...]:
        """Non-constant nodes in topological order: the positions cuts are counted in."""
        return tuple(n for n in self.nodes if not n.constant)


def sendable(info: GraphInfo, name: str) -> bool:
    """Whether tensor ``name`` can cross a cut: typed, of known rank, and of a dtype the wire
    carries (``tandem.protocol.dtypes.wire_dtype_for``)."""
    spec = info.spec(name)
    if not spec.dtype or spec.shape is None:
        return False
    from tandem.protocol.dtypes import UnsupportedDType, wire_dtype_for

    try:
        wire_dtype_for(spec.dtype)
    except UnsupportedDType:
        return False
    return True


def dtype_size(dtype: int) -> int:
    """Bytes per element of an ONNX ``TensorProto`` data type (0 if unknown)."""
    row = _dtype_row(dtype)
    return 0 if row is None else row.itemsize


def _dtype_row(dtype: int) -> DTypeInfo | None:
    """The row of the one dtype table (``tandem.protocol.dtypes``) for an ONNX code, or None."""
    try:
        return by_onnx(dtype)
    except UnsupportedDType:
        return None


# --------------------------------------------------------------------------------------------
# Loading


def load_model(path_or_proto: str | os.PathLike[str] | bytes | ModelProto) -> ModelProto:
    """Load a model from a path, serialized bytes, or a ``ModelProto`` (returned as is: its
    external data, if any, must already be loaded).

    External data is loaded from next to the model file. Raises :class:`ModelLoadError`
    (NOT_FOUND) for a missing model or external data file and :class:`InvalidModelError`
    (INVALID_ARGUMENT) for bytes that are not an ONNX model.
    """
    onnx = require("onnx")
    from google.protobuf.message import DecodeError

    if isinstance(path_or_proto, onnx.ModelProto):
        model = path_or_proto
        _check_is_model(model, "model")
        return model
    if isinstance(path_or_proto, (bytes, bytearray, memoryview)):
        try:
            model = onnx.load_from_string(bytes(path_or_proto))
        except (DecodeError, ValueError) as exc:
            raise InvalidModelError(f"bytes are not an ONNX model: {exc}") from exc
        _check_is_model(model, "bytes")
        return model
    path = Path(path_or_proto)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as exc:
        raise InvalidModelError(f"{path} is not an ONNX model: {exc}") from exc
    _check_is_model(model, str(path))
    base = path.parent
    missing = []
    for tensor in iter_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or not (base / location).is_file():
            missing.append((tensor.name, location))
    if missing:
        name, location = missing[0]
        more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{path}: external data file {location!r} for tensor {name!r} not found in {base}"
            f"{more}"
        )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: cannot read external data: {exc}") from exc
    return model


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a model file refers to (any tensor, subgraphs included),
    sorted and without duplicates. Reads the model without its weights."""
    onnx = require("onnx")
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as exc:
        raise InvalidModelError(f"{path} is not an ONNX model: {exc}") from exc
    locations = {
        entry.value
        for tensor in iter_tensors(model.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / loc for loc in sorted(locations)]


def _check_is_model(model: ModelProto, what: str) -> None:
    # protobuf parses some garbage (and empty bytes) as an empty message: reject those too.
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        raise InvalidModelError(f"{what} is not an ONNX model (no IR version, opset or graph)")


# --------------------------------------------------------------------------------------------
# Analysis


def implicit_inputs(node: NodeProto) -> list[str]:
    """Outer-scope tensors read by a node's subgraphs (If/Loop/Scan bodies), in first-use order."""
    found: dict[str, None] = {}
    for attr in node.attribute:
        subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for sub in subs:
            for name in _outer_refs(sub):
                found.setdefault(name)
    return list(found)


def _outer_refs(graph: GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    refs: dict[str, None] = {}
    for node in graph.node:
        for name in list(node.input) + implicit_inputs(node):
            if name and name not in defined:
                refs.setdefault(name)
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            refs.setdefault(out.name)
    return list(refs)


def _spec_from_type(name: str, type_proto: Any) -> GraphTensor | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return GraphTensor(name, tt.elem_type, None)
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append("?")
    return GraphTensor(name, tt.elem_type, tuple(dims))


def input_specs(model: ModelProto) -> dict[str, GraphTensor]:
    """Specs of the graph inputs that are not initializers, in declaration order."""
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        spec = _spec_from_type(vi.name, vi.type)
        if spec is None:
            raise InvalidModelError(f"graph input {vi.name!r} is not a tensor")
        specs[vi.name] = spec
    return specs


_SKELETON_MIN_ELEMENTS = 1024  # initializers at least this big become typed inputs


def skeleton(model: ModelProto,
             input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelProto:
    """A copy of ``model`` without its large initializers (each becomes a graph input of the
    same type and shape) and, when given, with ``input_shapes`` written into its inputs: what
    shape inference needs, at a fraction of the memory. Nodes, small initializers (the shape
    arithmetic's constants), functions and opsets are kept."""
    onnx = require("onnx")
    graph = model.graph
    out = onnx.ModelProto()
    for fname in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, fname, getattr(model, fname))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    shapes = dict(input_shapes or {})
    kept_inputs = set()
    for vi in graph.input:
        new = g.input.add()
        new.CopyFrom(vi)
        kept_inputs.add(vi.name)
        if vi.name in shapes and vi.type.HasField("tensor_type"):
            dims = new.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[vi.name], strict=False):
                d.Clear()
                d.dim_value = int(size)
    for init in graph.initializer:
        if math.prod(init.dims) >= _SKELETON_MIN_ELEMENTS:
            if init.name not in kept_inputs:
                g.input.append(onnx.helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)
    if out.ir_version < 4:  # IR <= 3 wants every initializer among the inputs: not needed here
        out.ir_version = 4
    return out


def _infer(model: ModelProto) -> ModelProto:
    onnx = require("onnx")
    try:
        return onnx.shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=True
        )
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise InvalidModelError(f"shape inference failed: {exc}") from exc


def _typed(graph: GraphProto) -> dict[str, GraphTensor]:
    tensors: dict[str, GraphTensor] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        spec = _spec_from_type(vi.name, vi.type)
        if spec is not None:
            tensors[vi.name] = spec
    return tensors


def analyze(model: ModelProto, *, batch: int = 1, infer_shapes: bool = True,
            measured: Mapping[str, tuple[int, tuple[int, ...]]] | None = None,
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> GraphInfo:
    """Shape-infer ``model`` and describe it as a :class:`GraphInfo`.

    ``input_shapes`` (input name -> concrete shape) are the sizes costs (FLOPs, bytes) are
    counted at; inputs not named there, and every symbolic dim when it is ``None``, count as
    ``batch``. ``measured`` maps tensors to ``(onnx dtype, shape)`` observed in a real run at
    those sizes (:func:`tandem.compiler._verify.measure_shapes`): dims shape inference could not
    resolve are costed with the measured size, and tensors it could not type at all get a
    declared type with unknown dims. Raises :class:`InvalidModelError` for a graph with a cycle
    or a tensor nobody produces.
    """
    if batch < 1:
        raise InvalidModelError(f"batch must be >= 1, got {batch}")
    graph = model.graph
    tensors = _typed(_infer(skeleton(model)).graph) if infer_shapes else _typed(graph)
    fixed_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    # cost lookups see the measured shapes first, then the shapes inferred at ``input_shapes``,
    # then everything ``tensors`` holds (it grows below with initializers and Constant outputs)
    overrides: dict[str, GraphTensor] = {}
    at_size: dict[str, GraphTensor] = {}
    if fixed_shapes and any(not t.is_static for n, t in tensors.items() if n in fixed_shapes):
        at_size = _typed(_infer(skeleton(model, fixed_shapes)).graph) if infer_shapes else {}
        for name, shape in fixed_shapes.items():
            if name in tensors:
                at_size[name] = GraphTensor(name, tensors[name].dtype, shape)
    cost: Mapping[str, GraphTensor] = ChainMap(overrides, at_size, tensors)
    if measured:
        symbols = frozenset() if fixed_shapes else _input_symbols(graph)
        for name, (dtype, shape) in measured.items():
            spec = tensors.get(name)
            if spec is None or spec.dtype == 0:  # untyped: declare it, dims left open
                tensors[name] = GraphTensor(name, dtype, tuple("?" for _ in shape))
                overrides[name] = GraphTensor(name, dtype, tuple(shape))
                continue
            known = at_size.get(name, spec)
            if known.shape is None or len(known.shape) != len(shape):
                overrides[name] = GraphTensor(name, spec.dtype, tuple(shape))
            else:
                overrides[name] = GraphTensor(name, spec.dtype, tuple(
                    d if isinstance(d, int) or d in symbols else m
                    for d, m in zip(known.shape, shape, strict=True)))
    init_bytes: dict[str, int] = {}
    for init in graph.initializer:
        dims = tuple(int(d) for d in init.dims)
        tensors[init.name] = GraphTensor(init.name, init.data_type, dims)
        init_bytes[init.name] = math.prod(init.dims) * dtype_size(init.data_type)
    for sp in graph.sparse_initializer:
        tensors[sp.values.name] = GraphTensor(
            sp.values.name, sp.values.data_type, tuple(int(d) for d in sp.dims)
        )
        init_bytes[sp.values.name] = math.prod(sp.values.dims) * dtype_size(sp.values.data_type)

    constants: set[str] = set(init_bytes)
    inputs = tuple(i.name for i in graph.input if i.name not in constants)
    outputs = tuple(o.name for o in graph.output)

    protos = list(graph.node)
    all_inputs = [[n for n in p.input if n] + implicit_inputs(p) for p in protos]
    order, shape_only = _topological_order(protos, all_inputs, set(inputs) | constants,
                                           frozenset(inputs))

    nodes: list[NodeInfo] = []
    producers: dict[str, int] = {}
    total = 0
    for pos, idx in enumerate(order):
        proto = protos[idx]
        ins = tuple(all_inputs[idx])
        outs = tuple(o for o in proto.output if o)
        if proto.op_type == "Constant" and not proto.domain:
            is_const = True
            for attr in proto.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    t = attr.t
                    tensors.setdefault(
                        outs[0], GraphTensor(outs[0], t.data_type, tuple(int(d) for d in t.dims))
                    )
        else:
            is_const = (
                bool(ins)
                and proto.op_type not in _NONDETERMINISTIC
                and all(n in constants for n in ins)
            )
        if is_const:
            constants.update(outs)
        flops = _node_flops(proto, ins, outs, cost, batch)
        param = sum(init_bytes.get(n, 0) for n in ins)
        if proto.op_type == "Constant":
            param = sum(cost[o].nbytes(batch) for o in outs if o in cost)
        out_bytes = sum(cost[o].nbytes(batch) for o in outs if o in cost)
        for o in outs:
            producers[o] = pos
        total += flops
        nodes.append(
            NodeInfo(
                name=proto.name or f"{proto.op_type}_{idx}",
                op_type=proto.op_type,
                inputs=ins,
                outputs=outs,
                flops=flops,
                param_bytes=param,
                out_bytes=out_bytes,
                index=idx,
                constant=is_const,
            )
        )

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphInfo(
        nodes=tuple(nodes),
        tensors=tensors,
        inputs=inputs,
        outputs=outputs,
        constants=frozenset(constants),
        total_flops=total,
        batch=batch,
        opset=opset,
        producers=producers,
        shape_tensors=frozenset(o for i in shape_only for o in protos[i].output if o)
        - frozenset(constants),
        cost_tensors=ChainMap(overrides, at_size) if (overrides or at_size) else None,
        input_shapes=fixed_shapes or None,
    )


def _input_symbols(graph: GraphProto) -> frozenset[str]:
    """The symbolic dims the model declares on its inputs (e.g. a batch "N")."""
    return frozenset(d.dim_param for vi in graph.input if vi.type.HasField("tensor_type")
                     for d in vi.type.tensor_type.shape.dim if d.dim_param)


def unresolved_tensors(model: ModelProto, info: GraphInfo) -> list[str]:
    """Non-constant tensors whose size shape inference could not pin down: untyped, unknown
    rank, or a dim that is not a number (at ``info.input_shapes``; without them, a dim that is
    neither a number nor a symbolic dim of the graph inputs, so it would be costed as if it were
    the batch). Measure these before choosing cuts."""
    symbols = frozenset() if info.input_shapes else _input_symbols(model.graph)
    out = []
    for node in info.nodes:
        if node.constant:
            continue
        for name in node.outputs:
            spec = info.cost_spec(name) if name in info.tensors else None
            if spec is None or spec.dtype == 0 or spec.shape is None or any(
                    not isinstance(d, int) and d not in symbols for d in spec.shape):
                out.append(name)
    return out


def _topological_order(
    protos: list[NodeProto], all_inputs: list[list[str]], available: set[str],
    graph_inputs: frozenset[str] = frozenset(),
) -> tuple[list[int], set[int]]:
    """Kahn's algorithm, preferring the lowest original index (the model's own order if valid),
    except that shape arithmetic goes first: a node that computes only from tensor *shapes*
    (``Shape``/``Size`` of anything, and what only such nodes and constants feed) runs as soon
    as it can. Exporters often read an input's shape at the very end (to resize an output back
    to the input's size); left there, the raw input would stay live across every boundary and
    no split could beat sending it. Hoisted, only a few int64 values stay live.
    Returns the order and the shape-arithmetic nodes."""
    producer: dict[str, int] = {}
    for idx, proto in enumerate(protos):
        for out in proto.output:
            if not out:
                continue
            if out in producer or out in available:
                raise InvalidModelError(f"tensor {out!r} is produced more than once")
            producer[out] = idx
    n = len(protos)
    indegree = [0] * n
    users: list[list[int]] = [[] for _ in range(n)]
    deps_of: list[set[int]] = []
    for idx, ins in enumerate(all_inputs):
        deps = set()
        for name in ins:
            if name in available:
                continue
            src = producer.get(name)
            if src is None:
                raise InvalidModelError(
                    f"node {protos[idx].name or idx} ({protos[idx].op_type}) reads {name!r}, "
                    "which no node, input or initializer produces"
                )
            deps.add(src)
        deps_of.append(deps)
        indegree[idx] = len(deps)
        for src in deps:
            users[src].append(idx)
    first = _kahn(n, list(indegree), users, lambda i: i)
    if len(first) != n:
        stuck = [protos[i].name or str(i) for i in range(n) if i not in set(first)][:5]
        raise InvalidModelError(f"graph has a cycle (through nodes {', '.join(stuck)})")
    shape_only = _shape_arithmetic(protos, all_inputs, producer, first, graph_inputs)
    if not shape_only:
        return first, shape_only
    return _kahn(n, indegree, users, lambda i: (i not in shape_only, i)), shape_only


def _kahn(n: int, indegree: list[int], users: list[list[int]], key) -> list[int]:
    ready = [(key(i), i) for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, idx = heapq.heappop(ready)
        order.append(idx)
        for user in users[idx]:
            indegree[user] -= 1
            if indegree[user] == 0:
                heapq.heappush(ready, (key(user), user))
    return order


_SHAPE_OPS = frozenset({"Shape", "Size"})


def _shape_arithmetic(protos: list[NodeProto], all_inputs: list[list[str]],
                      producer: Mapping[str, int], order: list[int],
                      graph_inputs: frozenset[str]) -> set[int]:
    """Nodes whose outputs depend on tensor shapes only (never on a tensor's values)."""
    shape_only: set[int] = set()
    constant: set[int] = set()
    for idx in order:
        proto = protos[idx]
        if proto.domain not in ("", "ai.onnx") or proto.op_type in _NONDETERMINISTIC:
            continue
        if proto.op_type in _SHAPE_OPS:
            shape_only.add(idx)
            continue
        sources = [producer.get(name) for name in all_inputs[idx]]
        if any(name in graph_inputs for name in all_inputs[idx]):
            continue
        if all(s is None or s in constant for s in sources):
            constant.add(idx)  # initializers and Constant nodes only
        elif all(s is None or s in constant or s in shape_only for s in sources):
            shape_only.add(idx)
    return shape_only


def _attr(proto: NodeProto, name: str, default: Any) -> Any:
    onnx = require("onnx")
    for a in proto.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_flops(
    proto: NodeProto,
    ins: tuple[str, ...],
    outs: tuple[str, ...],
    tensors: Mapping[str, GraphTensor],
    batch: int,
) -> int:
    op = proto.op_type
    if proto.domain not in ("", "ai.onnx", "com.microsoft"):
        return 0

    def shape(name: str) -> tuple[int, ...] | None:
        spec = tensors.get(name)
        return None if spec is None else spec.concrete_shape(batch)

    def numel(name: str) -> int:
        s = shape(name)
        return 0 if s is None else math.prod(s)

    out = outs[0] if outs else ""
    if op in ("Conv", "ConvTranspose"):
        w = shape(ins[1]) if len(ins) > 1 else None
        if w is None or len(w) < 3:
            return 0
        # w[1] is already C_in/group (Conv) or C_out/group (ConvTranspose).
        kernel = math.prod(w[2:])
        bias = numel(out) if len(proto.input) > 2 and proto.input[2] else 0
        if op == "Conv":
            o = shape(out)
            if o is None:
                return 0
            # w: [C_out, C_in/group, k...]; out: [N, C_out, spatial...]
            return 2 * math.prod(o) * w[1] * kernel + bias
        x = shape(ins[0])
        if x is None:
            return 0
        # w: [C_in, C_out/group, k...]; x: [N, C_in, spatial...]
        return 2 * math.prod(x) * w[1] * kernel + bias
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shape(ins[0])
        o = shape(out)
        if a is None or o is None or not a:
            return 0
        k = a[-1]
        return 2 * math.prod(o) * k
    if op == "Gemm":
        a = shape(ins[0])
        o = shape(out)
        if a is None or o is None or len(a) != 2:
            return 0
        k = a[0] if _attr(proto, "transA", 0) else a[1]
        bias = math.prod(o) if len(proto.input) > 2 and proto.input[2] else 0
        return 2 * math.prod(o) * k + bias
    if op in _ELEMENTWISE:
        return numel(out)
    if op in _POOL:
        kernel = _attr(proto, "kernel_shape", [])
        return numel(out) * (math.prod(kernel) if kernel else 1)
    if op in _GLOBAL_POOL or op in _REDUCE:
        return numel(ins[0]) if ins else 0
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        return 5 * numel(out)
    if op == "BatchNormalization":
        return 2 * numel(out)
    if op in _NORM8:
        return 8 * numel(out)
    return 0
