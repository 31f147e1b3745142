"""compiler._shapes and the sizes of a compile: --input-shape, samples, stand-ins with one warning,
costs at those sizes (the same cuts as a file with the sizes written in), frontier bytes that
follow the request (checked against what the head really produces at other sizes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from tandem.compiler import BundleFromOnnx, CompileOptions, CompileWarning, InputShapeError
from tandem.compiler._graph import GraphTensor, analyze, input_specs
from tandem.compiler._shapes import (
    STAND_IN,
    frontier_dims,
    name_input_dims,
    parse_shape,
    resolve_input_shapes,
)
from tandem.devices.backends import OnnxRuntimeBackend
from tandem.protocol.bundle import DimExpr, DimExprError, load_bundle
from tests.compiler.test_pipeline import _ort_artifact

DATA = Path(__file__).resolve().parent / "data"
SEG = DATA / "segish_dynamo.onnx"  # batch x 3 x height x width, DeepLab's shape pattern


def _specs(**shapes):
    return {name: GraphTensor(name, 1, tuple(shape)) for name, shape in shapes.items()}


def test_parse_shape():
    assert parse_shape("input=1x3x640x640") == ("input", (1, 3, 640, 640))
    assert parse_shape("a=b=2,3") == ("a=b", (2, 3))  # the last '=' splits; ',' also separates
    for bad in ("1x3", "x=", "x=1xa", "x=0x3", "=1x2", "x=-1x2"):
        with pytest.raises(InputShapeError):
            parse_shape(bad)


def test_given_shapes_bind_symbols_shared_by_other_inputs():
    specs = _specs(ids=("batch", "seq"), mask=("batch", "seq"), img=(1, 3, "H", "W"))
    got = resolve_input_shapes(specs, {"ids": (2, 128), "img": (1, 3, 480, 640)})
    assert got.shapes == {"ids": (2, 128), "mask": (2, 128), "img": (1, 3, 480, 640)}
    assert got.source == "options" and not got.guessed
    assert got.symbols == {"batch": 2, "seq": 128, "H": 480, "W": 640}


def test_samples_size_what_is_not_given_and_stand_ins_the_rest():
    specs = _specs(x=("N", 3, "H", "W"), y=("N", "S"))
    sample = {"x": np.zeros((1, 3, 32, 48), np.float32)}
    got = resolve_input_shapes(specs, None, [sample])
    assert got.shapes == {"x": (1, 3, 32, 48), "y": (1, STAND_IN)}
    assert got.guessed == {"y": ("S",)} and got.source == "guess"
    fixed = resolve_input_shapes(_specs(x=(1, 3, 8, 8)))
    assert fixed.source == "model" and fixed.shapes == {"x": (1, 3, 8, 8)}
    batch_only = resolve_input_shapes(_specs(x=("N", 3)), batch=4)
    assert batch_only.shapes == {"x": (4, 3)} and not batch_only.guessed  # batch: no warning


def test_every_input_sharing_a_guessed_symbol_is_named():
    specs = _specs(ids=("batch", "sequence"), mask=("batch", "sequence"))
    assert resolve_input_shapes(specs).guessed == {"ids": ("sequence",), "mask": ("sequence",)}


@pytest.mark.parametrize(("given", "match"), [
    ({"nope": (1, 3)}, "does not have"),
    ({"x": (1, 3, 8)}, "has 3 dims"),
    ({"x": (1, 4, 8, 8)}, "fixes 3"),
    ({"x": (1, 3, 8, 8), "y": (2, 8)}, "two values"),
])
def test_shapes_that_do_not_fit_are_refused_naming_the_option(given, match):
    specs = _specs(x=("N", 3, "H", "W"), y=("N", "H"))
    with pytest.raises(InputShapeError, match=match) as err:
        resolve_input_shapes(specs, given)
    assert err.value.options == ("input_shapes",)
    assert "--" not in str(err.value)  # library messages name no CLI flag


def test_unnamed_input_dims_get_names():
    model = onnx.load(str(SEG))
    dim = model.graph.input[0].type.tensor_type.shape.dim[3]
    dim.Clear()  # an unnamed dynamic dim, as some exporters leave
    assert name_input_dims(model) == ["input_dim3"]
    assert model.graph.input[0].type.tensor_type.shape.dim[3].dim_param == "input_dim3"


def _fixed_file(tmp_path, shape) -> Path:
    model = onnx.load(str(SEG))
    for d, size in zip(model.graph.input[0].type.tensor_type.shape.dim, shape, strict=True):
        d.Clear()
        d.dim_value = size
    path = tmp_path / "fixed.onnx"
    onnx.save_model(model, str(path))
    return path


def _compile(src, out, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = BundleFromOnnx(src, out, CompileOptions(targets=("onnxruntime",),
                                                         **options))()
    return result, [w.message for w in caught if isinstance(w.message, CompileWarning)]


def test_dynamic_model_with_input_shape_gets_the_cuts_of_the_fixed_file(tmp_path):
    shape = (1, 3, 96, 128)
    dynamic, warned = _compile(SEG, tmp_path / "d", input_shapes={"input": shape})
    fixed, _ = _compile(_fixed_file(tmp_path, shape), tmp_path / "f")
    assert not warned
    interior = [r for r in dynamic.cuts if 0 < r.cut.position < dynamic.n_nodes]
    assert len(interior) >= 2
    assert [(r.cut.id, r.cut.frontier, r.cut.frontier_bytes) for r in dynamic.cuts] == \
        [(r.cut.id, r.cut.frontier, r.cut.frontier_bytes) for r in fixed.cuts]
    assert dynamic.cuts[0].cut.frontier_bytes == 4 * 3 * 96 * 128  # the input, at that size
    assert dynamic.manifest.input_shapes == {"input": shape}
    assert dynamic.manifest.inputs[0].shape == ("batch", 3, "height", "width")  # parts stay open


def test_samples_give_the_sizes_when_no_shape_is_given(tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 80, 112)).astype(np.float32)
    np.savez(tmp_path / "s.npz", input=x)
    result, warned = _compile(SEG, tmp_path / "b", samples=tmp_path / "s.npz")
    assert not warned
    assert result.manifest.input_shapes == {"input": (1, 3, 80, 112)}
    assert result.cuts[0].cut.frontier_bytes == x.nbytes  # every figure at the samples' size


def test_no_size_known_gives_one_warning_naming_the_dims_and_no_byte_count(tmp_path):
    result, warned = _compile(SEG, tmp_path / "b")
    assert len(warned) == 1, [str(w) for w in warned]
    text = str(warned[0])
    assert "height" in text and "width" in text and "bytes" not in text
    assert warned[0].options == ("input_shapes",)
    assert result.manifest.input_shapes == {"input": (1, 3, STAND_IN, STAND_IN)}
    assert result.manifest.extra["input_shapes_from"] == "guess"


def _head_bytes(bundle, cut, x) -> int:
    art = _ort_artifact(bundle.manifest, cut.head_part)
    with OnnxRuntimeBackend(bundle.path_of(art), optimized=True) as head:
        out = head.infer({"input": x})
    return sum(out[t.name].nbytes if t.name in out else x.nbytes for t in cut.frontier)


def test_frontier_bytes_follow_the_request_size(tmp_path):
    _compile(SEG, tmp_path / "b", input_shapes={"input": (1, 3, 96, 128)})
    rng = np.random.default_rng(1)
    with load_bundle(tmp_path / "b") as bundle:
        m = bundle.manifest
        interior = [c for c in m.cuts if c.head_part and c.tail_part]
        assert interior and all(c.frontier_dims for c in m.cuts if c.frontier)
        assert any(isinstance(d, str) and "//" in d for c in interior
                   for dims in c.frontier_dims for d in dims)
        for shape in ((1, 3, 96, 128), (2, 3, 57, 203), (1, 3, 640, 480)):
            x = rng.standard_normal(shape).astype(np.float32)
            for cut in interior:
                assert m.frontier_bytes(cut.id, {"input": shape}) == _head_bytes(bundle, cut, x)
            assert m.frontier_bytes(0, {"input": shape}) == x.nbytes
        cut = interior[0]
        assert m.frontier_bytes(cut.id) == cut.frontier_bytes  # default: the compile's sizes
        fp32 = m.frontier_bytes(cut.id, {"input": (1, 3, 640, 480)})
        fp16 = m.frontier_bytes(cut.id, {"input": (1, 3, 640, 480)}, encoding="fp16")
        assert fp32 > fp16 > m.frontier_bytes(cut.id, {"input": (1, 3, 640, 480)},
                                              encoding="int8")
        for bad in ({"input": (1, 4, 8, 8)}, {"input": (1, 3, 8)}, {"x": (1, 3, 8, 8)}):
            with pytest.raises(DimExprError):
                m.frontier_bytes(cut.id, bad)


def test_frontier_dims_are_checked_against_the_costed_shape():
    model = onnx.load(str(SEG))
    name_input_dims(model)
    shapes = resolve_input_shapes(input_specs(model), {"input": (1, 3, 50, 70)})
    info = analyze(model, input_shapes=shapes.shapes)
    names = [o for n in info.compute_nodes for o in n.outputs if info.cost_spec(o).dtype == 1]
    dims, problem = frontier_dims(model, info, names, shapes.symbols)
    assert problem == "" and set(dims) == set(names)
    for name, shape in dims.items():
        values = tuple(d if isinstance(d, int) else DimExpr.parse(d).evaluate(shapes.symbols)
                       for d in shape)
        assert values == info.cost_spec(name).shape


def test_without_symbolic_inference_dims_fall_back_to_what_is_declared(monkeypatch):
    from tandem.compiler import _shapes

    def broken(model):
        raise AssertionError("an op the tool does not know")

    monkeypatch.setattr(_shapes, "_symbolic", broken)
    model = onnx.load(str(SEG))
    shapes = resolve_input_shapes(input_specs(model), {"input": (1, 3, 32, 32)})
    info = analyze(model, input_shapes=shapes.shapes)
    inner = next(o for n in info.compute_nodes if n.op_type == "Conv" for o in n.outputs)
    dims, problem = frontier_dims(model, info, ["input", inner], shapes.symbols)
    assert dims == {"input": ("batch", 3, "height", "width")}
    assert "AssertionError" in problem


def test_sympy_dims_become_exact_dim_expressions():
    sympy = pytest.importorskip("sympy")
    from tandem.compiler._shapes import _to_text, _Unexpressible

    h, w = sympy.symbols("height width", integer=True, positive=True)
    half = sympy.Rational(1, 2)
    exprs = [sympy.floor(h / 2 - half) + 1, sympy.floor(sympy.floor(h / 2 - half) / 2) + 1,
             sympy.ceiling(h / 4), 4 * h * w, sympy.Min(512, h), sympy.Max(h, w, 3),
             sympy.Mod(h, 3), 2 * sympy.floor(h / 2), sympy.floor(sympy.Float(2.0) * h),
             h**2 - w, sympy.ceiling((h - 3) / 2)]
    for expr in exprs:
        text = _to_text(expr, {"height", "width"})
        for hv, wv in ((3, 1), (7, 3), (64, 640), (513, 17)):
            want = int(expr.subs({h: hv, w: wv}))
            got = text if isinstance(text, int) else DimExpr.parse(text).evaluate(
                {"height": hv, "width": wv})
            assert got == want, (expr, text, hv, wv)
    for bad in (h / 2, sympy.Symbol("unk__3"), sympy.sqrt(h), h**20):
        with pytest.raises(_Unexpressible):
            _to_text(bad, {"height", "width"})
