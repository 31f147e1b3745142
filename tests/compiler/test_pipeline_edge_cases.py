"""Models that broke the first pipeline (found in review): NaN/inf values, IR 3 models, weights in
Constant attributes, models whose splits never beat sending the input, sequence dims."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from tandem.compiler import BundleFromOnnx, CompileOptions, _pipeline
from tandem.compiler._verify import RAW_TOLERANCE, SampleError, Verifier
from tandem.protocol.bundle import load_bundle
from tests.compiler.test_pipeline import _check_bundle_reproduces


def _vi(name, shape, dtype=TP.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), ir=8):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = ir
    return model


def _weight(name, shape, seed=0):
    return nh.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
                         name)


def _compile(model, tmp_path, **options):
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    opts = CompileOptions(**{"targets": ("onnxruntime",), **options})
    return BundleFromOnnx(src, tmp_path / "b", opts)()


def test_identical_nan_outputs_verify():
    ref = np.array([1.0, np.nan, np.inf], np.float32)
    assert RAW_TOLERANCE.allows(ref, ref.copy())
    assert not RAW_TOLERANCE.allows(ref, np.array([1.0, 0.0, np.inf], np.float32))


def test_model_with_nan_outputs_compiles(tmp_path):
    # Sqrt of a seeded normal sample: NaN in the output on every sample, identically on every cut
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Sqrt", ["a"], ["s"]),
             h.make_node("Neg", ["s"], ["n"]), h.make_node("Abs", ["n"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 64])], [_vi("y", [1, 4])], [_weight("w", (64, 4))])
    result = _compile(model, tmp_path)
    assert any(0 < r.cut.id < result.n_nodes for r in result.cuts)


def test_inf_crossing_a_cut_disables_int8_there_but_keeps_the_cut(tmp_path):
    # log(relu(-|s|)) is -inf everywhere; int8 cannot carry inf, raw and fp16 can
    nodes = [h.make_node("MatMul", ["x", "w"], ["s"]), h.make_node("Abs", ["s"], ["a"]),
             h.make_node("Neg", ["a"], ["n"]), h.make_node("Relu", ["n"], ["r"]),
             h.make_node("Log", ["r"], ["l"]),
             h.make_node("ReduceMin", ["l"], ["m"], keepdims=1, axes=[1]),
             h.make_node("Exp", ["m"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 32])], [_vi("y", [1, 1])], [_weight("w", (32, 8), 1)])
    result = _compile(model, tmp_path)
    (inf_cut,) = [r for r in result.cuts if r.cut.frontier == ("m",)]
    assert inf_cut.verification.passed
    assert inf_cut.verification.usable_encodings == ("raw", "fp16")
    spec = result.manifest.cut(inf_cut.cut.id)
    assert not spec.verification.encodings["int8"].passed
    assert result.manifest.allowed_encodings(inf_cut.cut.id) == ("raw", "fp16")


def test_ir3_model_with_initializers_as_inputs(tmp_path):
    w = _weight("w", (16, 16))
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("ReduceSum", ["b"], ["c"], keepdims=1),
             h.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 16]), _vi("w", [16, 16])], [_vi("y", [1, 1])], [w], ir=3)
    model.opset_import[0].version = 9  # the era of IR 3
    onnx.checker.check_model(model)
    result = _compile(model, tmp_path)
    with load_bundle(tmp_path / "b") as bundle:
        _check_bundle_reproduces(bundle, model)
    assert len(result.cuts) >= 3


def test_weights_in_constant_attributes_are_in_the_source_digest(tmp_path):
    const = h.make_node("Constant", [], ["k"], value=_weight("kv", (1, 256)))
    model = _model([const, h.make_node("Add", ["x", "k"], ["y"])], [_vi("x", [1, 256])],
                   [_vi("y", [1, 256])])
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0, convert_attribute=True)
    before = _pipeline._source_digest(src)
    data = bytearray((tmp_path / "m.data").read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "m.data").write_bytes(bytes(data))
    assert _pipeline._source_digest(src) != before


def test_model_whose_splits_all_send_more_than_the_input_still_compiles(tmp_path):
    # an embedding lookup: 8 int64 tokens in, 8x128 floats after the first node
    emb = _weight("emb", (100, 128))
    nodes = [h.make_node("Gather", ["emb", "tokens"], ["e"]), h.make_node("Relu", ["e"], ["r"]),
             h.make_node("ReduceMean", ["r"], ["y"], keepdims=0, axes=[1])]
    model = _model(nodes, [_vi("tokens", [1, 8], TP.INT64)], [_vi("y", [1, 128])], [emb])
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = BundleFromOnnx(src, tmp_path / "b", CompileOptions())()
    assert [r.cut.id for r in result.cuts] == [0, 3]
    assert any("send more than the raw input" in str(w.message) for w in caught)


def test_tensorrt_defer_records_sequence_dims_for_the_device(tmp_path):
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("MatMul", ["b", "w2"], ["y"])]
    model = _model(nodes, [_vi("x", ["N", "S", 16])], [_vi("y", ["N", "S", 2])],
                   [_weight("w", (16, 8)), _weight("w2", (8, 2), 1)])
    result = _compile(model, tmp_path, targets=("cloud-l4",), engines="defer")
    trt = [a for a in result.manifest.artifacts if a.target == "tensorrt"]
    assert trt and all(a.build_on_device for a in trt)
    assert any(a.engine_recipe.unresolved_dims for a in trt)


def test_samples_that_are_not_an_npz_are_a_one_line_error(tmp_path):
    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("Neg", ["a"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 4])])
    np.save(tmp_path / "s.npy", np.zeros((1, 4), np.float32))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    from tandem.compiler._verify import load_samples

    with pytest.raises(SampleError, match="single array"):
        load_samples(tmp_path / "s.npy", model)
    with pytest.raises(SampleError, match=r"not a readable \.npz"):
        load_samples(tmp_path / "bad.npz", model)
    assert Verifier(model, n_samples=1).samples


def test_a_cut_the_extractor_gets_wrong_is_dropped_not_fatal(tmp_path, monkeypatch):
    from tandem.compiler._errors import ExtractionError

    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("MatMul", ["b", "w2"], ["c"]), h.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 64])], [_vi("y", [1, 4])],
                   [_weight("w1", (64, 16)), _weight("w2", (16, 4), 1)])
    real = _pipeline.extract
    victims = []

    def flaky_extract(model, info, cut, **kw):
        if 0 < cut.position < len(info.compute_nodes) and not victims:
            victims.append(cut.id)
            raise ExtractionError("head fails the ONNX checker (simulated)")
        return real(model, info, cut, **kw)

    monkeypatch.setattr(_pipeline, "extract", flaky_extract)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _compile(model, tmp_path)
    assert victims and victims[0] in [c.id for c, _ in result.dropped]
    assert any("please report" in str(w.message) for w in caught)


def _runtime_reshape_model():
    """Conv, then a Reshape whose shape is computed from Shape(): what exporters emit for
    ``flatten`` with a dynamic batch. Shape inference leaves the last dim unknown ("unk__0")."""
    c = 16
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]),
             h.make_node("Shape", ["c"], ["s"]),
             h.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             h.make_node("Unsqueeze", ["b", "ax"], ["bu"]),
             h.make_node("Concat", ["bu", "cc", "m1"], ["shp"], axis=0),
             h.make_node("Reshape", ["c", "shp"], ["r"]),
             h.make_node("Relu", ["r"], ["rr"]),
             h.make_node("ReduceMean", ["rr"], ["y"], axes=[2], keepdims=0)]
    inits = [_weight("w", (c, c, 1, 1)),
             nh.from_array(np.array(0, np.int64), "i0"),
             nh.from_array(np.array([0], np.int64), "ax"),
             nh.from_array(np.array([c], np.int64), "cc"),
             nh.from_array(np.array([-1], np.int64), "m1")]
    return _model(nodes, [_vi("x", ["batch", c, 8, 8])], [_vi("y", ["batch", c])], inits)


def test_sizes_shape_inference_cannot_resolve_are_measured(tmp_path):
    from tandem.compiler import analyze, find_cuts
    from tandem.compiler._graph import input_specs, unresolved_tensors
    from tandem.compiler._verify import measure_shapes, random_samples

    model = _runtime_reshape_model()
    info = analyze(model)
    assert info.tensors["r"].shape == ("batch", 16, "unk__0")
    assert info.nbytes("rr") == 16 * 4  # the unknown dim costed as if it were the batch
    # ...so, unmeasured, a cut sending "r" looks 64x cheaper than the input
    assert ("r",) in [c.frontier for c in find_cuts(info)]
    unresolved = unresolved_tensors(model, info)
    assert {"r", "rr"} <= set(unresolved)
    sample = random_samples(input_specs(model), 1)[0]
    measured = measure_shapes(model, unresolved, sample)
    assert measured["rr"] == (1, (1, 16, 64))
    info = analyze(model, measured=measured)
    assert info.nbytes("rr") == 16 * 64 * 4
    assert info.tensors["rr"].shape == ("batch", 16, "unk__0")  # parts keep the dim open
    assert [c.frontier for c in find_cuts(info)] == [("x",), ()]  # "r" is as big as the input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _compile(model, tmp_path)  # the pipeline measures by itself
    assert [r.cut.frontier for r in result.cuts] == [("x",), ()]
    with load_bundle(tmp_path / "b") as bundle:
        _check_bundle_reproduces(bundle, model, batch=3)


def test_frontiers_the_wire_cannot_carry_are_refused(tmp_path):
    # float64 in, cast to float32 after one op; an int16 tensor inside: only cuts whose
    # frontier can travel (tandem.protocol.dtypes) survive
    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("Cast", ["a"], ["b"], to=TP.FLOAT),
             h.make_node("MatMul", ["b", "w"], ["c"]),
             h.make_node("Cast", ["c"], ["d"], to=TP.INT16),
             h.make_node("Cast", ["d"], ["e"], to=TP.FLOAT), h.make_node("Relu", ["e"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 64], TP.DOUBLE)], [_vi("y", [1, 4])],
                   [_weight("w", (64, 4))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _compile(model, tmp_path)
    kept = {r.cut.id: r.cut.frontier for r in result.cuts}
    assert 0 not in kept  # the raw input is float64
    assert any("x is float64, which cannot travel" in str(w.message) for w in caught)
    assert all(f not in (("a",), ("d",)) for f in kept.values())  # float64 / int16 never cross
    assert any(f in (("b",), ("c",)) for f in kept.values())
    with load_bundle(tmp_path / "b") as bundle:
        assert {t.dtype for c in bundle.manifest.cuts for t in c.frontier} <= {"float32"}
