"""Input shapes: the sizes a compile costs and verifies at, and frontier dims as functions of them.

**Which sizes.** Every byte and FLOP figure of a compile is counted at one set of concrete input
shapes, chosen by :func:`resolve_input_shapes` in this order:

1. the shapes the user gives (``CompileOptions.input_shapes``);
2. else the shapes of the user's samples (the first sample);
3. else the model's own dims, with a symbolic leading (batch) dim = ``batch`` and any other
   symbolic dim = :data:`STAND_IN` (64): a guess, which the compile warns about once, naming
   those dims (and no byte count, since none would be true of real requests).

A symbol shared by several inputs (``batch``, ``sequence``) takes one value: a shape given for
one input fixes it for the others.

**Sizes that follow the request.** Parts keep their dims open, so one bundle serves any size. For
the edge to cost a request of another size exactly, :func:`frontier_dims` writes each frontier
tensor's shape with every dim an ``int`` or an integer expression over the inputs' symbolic
dims (grammar: :class:`tandem.protocol.bundle.DimExpr`). The expressions come from ONNX
Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``, which works in
``sympy``), converted exactly: ``floor(p/q)`` becomes ``(p)//q`` and ``ceiling(p/q)``
``-((-(p))//q)``. Each expression is checked against the concrete shape the compile costed; a
tensor whose dims cannot be written so (data-dependent sizes, an op the inference does not
know) gets none, and the manifest then knows that cut's bytes only at the compile's sizes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tandem.compiler._errors import InputShapeError, with_options
from tandem.compiler._graph import GraphInfo, GraphTensor, skeleton
from tandem.protocol.bundle import DimExpr, DimExprError
from tandem.protocol.errors import MissingDependency
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from onnx import ModelProto

__all__ = [
    "STAND_IN",
    "InputShapes",
    "frontier_dims",
    "name_input_dims",
    "parse_shape",
    "resolve_input_shapes",
]

STAND_IN = 64  # the size of a symbolic non-batch dim nobody gave

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputShapes:
    """The concrete input shapes a compile costs and verifies at.

    ``source`` says where they came from (``"options"``, ``"samples"``, ``"model"``: the model
    fixes every dim, ``"guess"``: some symbolic dim took :data:`STAND_IN`); ``guessed`` maps an
    input to its symbolic dims that took the stand-in.
    """

    shapes: Mapping[str, tuple[int, ...]]
    source: str
    guessed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    symbols: Mapping[str, int] = field(default_factory=dict)  # symbolic dim -> its value


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"NAME=1x3x640x640"`` -> ``("NAME", (1, 3, 640, 640))`` (``,`` also separates dims)."""
    name, sep, dims = str(text).rpartition("=")
    if not sep or not name.strip():
        raise InputShapeError(f"{text!r}: expected NAME=DIMS, for example input=1x3x640x640")
    parts = dims.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputShapeError(f"{text!r}: dims must be integers separated by 'x'") from None
    if not shape or any(d < 1 for d in shape):
        raise InputShapeError(f"{text!r}: every dim must be at least 1")
    return name.strip(), shape


def resolve_input_shapes(
    specs: Mapping[str, GraphTensor],
    given: Mapping[str, Sequence[int]] | None = None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    batch: int = 1,
) -> InputShapes:
    """The concrete shape of every input, from ``given``, else ``samples``, else the model's
    dims with stand-ins (see the module docstring). Raises :class:`InputShapeError` for a
    given shape that names no input, has the wrong rank, contradicts a fixed dim, or gives one
    symbolic dim two values."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise with_options(InputShapeError(
            f"input shapes given for {unknown}, which the model does not have "
            f"(inputs: {', '.join(specs)})"), "input_shapes")
    symbols: dict[str, int] = {}

    def bind(name: str, shape: Sequence[int], what: str) -> tuple[int, ...]:
        spec = specs[name]
        shape = tuple(int(d) for d in shape)
        if spec.shape is None:
            return shape
        if len(shape) != len(spec.shape):
            raise with_options(InputShapeError(
                f"{what} for {name!r} has {len(shape)} dims, the model's input has "
                f"{len(spec.shape)} ({_show(spec.shape)})"), "input_shapes")
        for axis, (dim, size) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(dim, int):
                if dim != size:
                    raise with_options(InputShapeError(
                        f"{what} for {name!r} has {size} at axis {axis}, where the model fixes "
                        f"{dim} ({_show(spec.shape)})"), "input_shapes")
            elif dim != "?" and symbols.setdefault(dim, size) != size:
                raise with_options(InputShapeError(
                    f"{what} gives symbolic dim {dim!r} two values ({symbols[dim]} and "
                    f"{size})"), "input_shapes")
        return shape

    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in given.items():
        shapes[name] = bind(name, shape, "the input shape")
    source = "options" if given else "model"
    if samples:
        for name in specs:
            if name not in shapes and name in samples[0]:
                shapes[name] = bind(name, samples[0][name].shape, "sample 0")
                source = "options" if given else "samples"
    guessed: dict[str, tuple[str, ...]] = {}
    stand_in_symbols: set[str] = set()
    for name, spec in specs.items():
        if name in shapes:
            continue
        if spec.shape is None:
            raise with_options(InputShapeError(
                f"input {name!r} has no known rank; give its shape"), "input_shapes")
        dims, stand_ins = [], []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif dim in symbols:
                dims.append(symbols[dim])
                if dim in stand_in_symbols:
                    stand_ins.append(dim)
            elif axis == 0:
                dims.append(symbols.setdefault(dim, batch) if dim != "?" else batch)
            else:
                dims.append(symbols.setdefault(dim, STAND_IN) if dim != "?" else STAND_IN)
                stand_ins.append(dim if dim != "?" else f"axis {axis}")
                stand_in_symbols.add(dim)
        shapes[name] = tuple(dims)
        if stand_ins:
            guessed[name] = tuple(stand_ins)
    if guessed:
        source = "guess"
    return InputShapes({n: shapes[n] for n in specs}, source, guessed, symbols)


def guess_warning(model_name: str, shapes: InputShapes) -> str:
    """The one warning for symbolic input dims that nobody sized (no byte count in it)."""
    dims = "; ".join(f"{name}: {', '.join(d)}" for name, d in shapes.guessed.items())
    return (f"{model_name}: inputs have symbolic dims of unknown size ({dims}); cuts were "
            f"chosen and verified with each at {STAND_IN}, a stand-in, and may not suit real "
            "requests (the bundle records frontier sizes as functions of these dims); give "
            "the input shapes to compile for")


def name_input_dims(model: ModelProto) -> list[str]:
    """Give every unnamed symbolic dim of the model's inputs a name (``<input>_dim<axis>``),
    in place, so frontier sizes can be written in terms of it. Returns the names given."""
    inits = {t.name for t in model.graph.initializer}
    taken = {d.dim_param for vi in model.graph.input if vi.type.HasField("tensor_type")
             for d in vi.type.tensor_type.shape.dim if d.dim_param}
    named = []
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        if not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") or d.dim_param:
                continue
            base = "".join(c if c.isalnum() or c == "_" else "_" for c in vi.name) or "input"
            if not (base[0].isalpha() or base[0] == "_"):
                base = "d_" + base
            name, k = f"{base}_dim{axis}", 1
            while name in taken:
                name, k = f"{base}_dim{axis}_{k}", k + 1
            d.dim_param = name
            taken.add(name)
            named.append(name)
    return named


# --------------------------------------------------------------------------------------------
# Frontier dims as expressions of the input dims


class _Unexpressible(Exception):
    """A sympy expression outside what the dim grammar writes exactly (internal signal)."""


def frontier_dims(model: ModelProto, info: GraphInfo, tensors: Iterable[str],
                  symbols: Mapping[str, int]) -> tuple[dict[str, tuple[int | str, ...]], str]:
    """``({tensor: dims}, problem)``: for each of ``tensors`` that can be written so, its shape
    with every dim an int or an expression over the input dims, checked against the shape the
    compile costed (``info.cost_spec``) at the input dims ``symbols``. ``problem`` says why
    some or all could not be written ('' when none failed)."""
    wanted = list(dict.fromkeys(tensors))
    if not wanted:
        return {}, ""
    inputs = set(symbols)
    static: dict[str, tuple[int | str, ...]] = {}
    for t in wanted:  # dims that are numbers or input dims already: no inference needed
        shape = info.spec(t).shape
        if shape is not None and all(isinstance(d, int) or d in inputs for d in shape):
            try:
                _check(t, tuple(shape), info.cost_spec(t).shape, symbols)
            except _Unexpressible:
                continue
            static[t] = tuple(shape)
    if len(static) == len(wanted):
        return static, ""
    try:
        inferred, exprs = _symbolic(model)
    except MissingDependency as exc:  # sympy missing: the message names the extra
        return dict(static), str(exc)
    except Exception as exc:  # a third-party tool on any model: fall back, say why
        log.debug("symbolic shape inference failed", exc_info=True)
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return dict(static), f"symbolic shape inference failed ({why})"
    out: dict[str, tuple[int | str, ...]] = {}
    failed = []
    for name in wanted:
        if name in static:
            out[name] = static[name]
            continue
        dims = inferred.get(name)
        try:
            if dims is None:
                raise _Unexpressible("no shape")
            texts = tuple(d if isinstance(d, int) else _to_text(exprs[d], inputs)
                          if d in exprs else _raise(d) for d in dims)
            _check(name, texts, info.cost_spec(name).shape, symbols)
        except (_Unexpressible, KeyError) as exc:
            failed.append(f"{name} ({exc})")
            continue
        out[name] = texts
    problem = f"no size expression for {', '.join(failed[:3])}" + (
        f" and {len(failed) - 3} more" if len(failed) > 3 else "") if failed else ""
    return out, problem


def _raise(dim: str) -> str:
    raise _Unexpressible(f"dim {dim!r} is not a function of the inputs")


def _check(name: str, texts: tuple[int | str, ...], costed: tuple | None,
           symbols: Mapping[str, int]) -> None:
    if costed is None or len(costed) != len(texts):
        raise _Unexpressible("rank differs from the costed shape")
    for text, size in zip(texts, costed, strict=True):
        try:
            value = text if isinstance(text, int) else DimExpr.parse(text).evaluate(symbols)
        except DimExprError as exc:
            raise _Unexpressible(str(exc)) from None
        if value != size:
            raise _Unexpressible(f"{text} = {value} at the compile's sizes, not {size}")


def _symbolic(model: ModelProto) -> tuple[dict[str, tuple[int | str, ...]], dict[str, Any]]:
    """Run ONNX Runtime's symbolic shape inference on a skeleton of ``model``: every tensor's
    dims (int or dim string) and the sympy expression of each dim string."""
    require("sympy", "cpu")
    require("onnxruntime", "cpu")
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    tool_log = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = tool_log.level
    tool_log.setLevel(logging.CRITICAL)  # its warnings are ours to judge, not the user's noise
    try:
        # the steps of SymbolicShapeInference.infer_shapes, without its dump of a partial
        # model into the working directory when inference is incomplete
        sym = SymbolicShapeInference(2**31 - 1, True, False, 0)
        sym._preprocess(skeleton(model))
        while sym.run_:
            sym._infer_impl()
        sym._update_output_from_vi()
    finally:
        tool_log.setLevel(level)
    graph = sym.out_mp_.graph
    dims: dict[str, tuple[int | str, ...]] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        shape = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.dim_param:
                shape.append(d.dim_param)
            else:
                break
        else:
            dims[vi.name] = tuple(shape)
    return dims, dict(sym.symbolic_dims_)


def _to_text(expr: Any, inputs: set[str]) -> str | int:
    """An exact dim-grammar text (or int) for a sympy integer expression over ``inputs``."""
    import sympy

    if expr.is_Integer:
        return int(expr)
    text = _emit(expr, inputs, sympy)
    return int(text) if text.lstrip("-").isdigit() else text


def _emit(e: Any, inputs: set[str], sympy: Any) -> str:
    if e.is_Integer:
        return str(int(e))
    if e.is_Float:
        if float(e).is_integer():
            return str(int(e))
        raise _Unexpressible(f"non-integer {e}")
    if e.is_Rational:
        raise _Unexpressible(f"fraction {e}")
    if e.is_Symbol:
        if e.name not in inputs:
            raise _Unexpressible(f"dim {e.name!r} is not an input dim")
        return e.name
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        num, den = sympy.fraction(sympy.together(sympy.nsimplify(e.args[0], rational=True)))
        if not den.is_Integer or int(den) <= 0:
            raise _Unexpressible(f"divisor {den} is not a positive integer")
        p = _wrap(_emit(sympy.expand(num), inputs, sympy))
        q = int(den)
        if q == 1:
            return p
        return f"({p}//{q})" if isinstance(e, sympy.floor) else f"(-((-{p})//{q}))"
    if e.is_Add:
        terms = sorted(e.args, key=sympy.default_sort_key)
        return "(" + " + ".join(_emit(t, inputs, sympy) for t in terms) + ")"
    if e.is_Mul:
        coeff, rest = e.as_coeff_Mul()
        if coeff.is_Rational and not coeff.is_Integer:
            # a fractional coefficient is exact only inside floor/ceiling
            raise _Unexpressible(f"fraction in {e}")
        factors = [_emit(f, inputs, sympy) for f in sympy.Mul.make_args(rest)]
        if coeff != 1:
            factors.insert(0, _emit(coeff, inputs, sympy))
        return "(" + "*".join(factors) + ")"
    if e.is_Pow:
        base, exp = e.args
        if exp.is_Integer and 0 < int(exp) <= 8:
            return "(" + "*".join([_emit(base, inputs, sympy)] * int(exp)) + ")"
        raise _Unexpressible(f"power {e}")
    if isinstance(e, (sympy.Max, sympy.Min)):
        fn = "max" if isinstance(e, sympy.Max) else "min"
        args = [_emit(a, inputs, sympy) for a in sorted(e.args, key=sympy.default_sort_key)]
        text = args[0]
        for arg in args[1:]:
            text = f"{fn}({text}, {arg})"
        return text
    if isinstance(e, sympy.Mod):
        a, b = (_wrap(_emit(x, inputs, sympy)) for x in e.args)
        return f"({a}%{b})"
    raise _Unexpressible(f"{type(e).__name__} {e}")


def _wrap(text: str) -> str:
    """``text`` as one operand: as it is when it is a name, a number or already one
    parenthesized group, else in parentheses."""
    if text.isidentifier() or text.isdigit():
        return text
    if text.startswith("(") and text.endswith(")"):
        depth = 0
        for i, c in enumerate(text):
            depth += (c == "(") - (c == ")")
            if depth == 0 and i < len(text) - 1:
                break
        else:
            return text
    return f"({text})"


def _show(shape: Sequence) -> str:
    return "x".join(str(d) for d in shape)


def numel(dims: Sequence[int | str], symbols: Mapping[str, int]) -> int:
    """Elements of a shape whose dims are ints or dim expressions, at ``symbols``."""
    return math.prod(d if isinstance(d, int) else DimExpr.parse(d).evaluate(symbols)
                     for d in dims)
