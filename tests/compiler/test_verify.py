"""compiler._verify: head -> tail vs full in ORT, fp16/int8 transfer errors, samples, ORT errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tandem.compiler import _verify
from tandem.compiler._cuts import find_cuts
from tandem.compiler._errors import (
    OnnxRuntimeError,
    SampleError,
    SampleFileNotFound,
    UnsupportedOperator,
)
from tandem.compiler._extract import extract
from tandem.compiler._graph import analyze, load_model
from tandem.compiler._verify import Tolerance, Verifier, load_samples, verify
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, NotFound, TandemError
from tandem.protocol.tensors import Encoding, Tensor
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


def _parts(model, **kw):
    info = analyze(model)
    cuts = find_cuts(info, **kw)
    return info, cuts, [extract(model, info, c) for c in cuts]


@pytest.mark.parametrize("builder", [*BUILDERS, big_model])
def test_every_kept_cut_verifies(builder):
    model = builder()
    _, cuts, parts = _parts(model)
    verifier = Verifier(model, seed=0, n_samples=2)
    for cut, (head, tail) in zip(cuts, parts, strict=True):
        result = verifier.verify(head, tail, cut_id=cut.id)
        assert result.passed, (cut, result)
        assert result.error is None and result.cut_id == cut.id and result.n_samples == 2
        assert result.raw.max_abs_err <= 1e-4
        assert set(result.raw.outputs) == set(analyze(model).outputs)
        if tail is None:
            assert result.encodings == {} and result.usable_encodings == ("raw",)
            continue
        assert set(result.encodings) == {"fp16", "int8"}
        int8, fp16 = result.encodings["int8"], result.encodings["fp16"]
        assert int8.max_abs_err > 0 and fp16.max_abs_err > 0
        assert int8.encoded == fp16.encoded and set(int8.encoded) <= set(cut.frontier)
        assert result.usable_encodings[0] == "raw"


def test_int8_error_is_exactly_the_protocol_round_trip():
    model = cnn_chain()
    _, cuts, parts = _parts(model)
    cut = cuts[1]
    head, tail = parts[1]
    sample = random_inputs(model, seed=7)
    result = verify(model, head, tail, [sample], cut_id=cut.id)
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    h = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    t = ort.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"])
    (mid,) = h.run(None, sample)
    sent = Tensor.from_array(cut.frontier[0], mid, encoding=Encoding.INT8_AFFINE).to_array()
    (got,) = t.run(None, {cut.frontier[0]: sent})
    (ref,) = full.run(None, sample)
    expected = float(np.abs(got.astype(np.float64) - ref).max())
    assert expected > 0
    assert result.encodings["int8"].max_abs_err == pytest.approx(expected, rel=1e-6)
    assert result.encodings["int8"].outputs["logits"].max_abs == pytest.approx(expected, rel=1e-6)


def test_cut0_checks_encoding_the_raw_input():
    model = residual()
    result = verify(model, None, model, cut_id=0)
    assert result.passed and result.raw.max_abs_err == 0
    assert result.encodings["int8"].encoded == ("input",)
    assert result.encodings["int8"].max_abs_err > 0


def test_tight_encoding_tolerance_excludes_the_encoding():
    model = residual()
    _, _, parts = _parts(model)
    head, tail = parts[1]
    result = verify(model, head, tail, encoding_tolerances={"int8": Tolerance(0.0, 0.0)})
    assert result.passed
    assert not result.encodings["int8"].within_tolerance
    assert not result.encodings["int8"].outputs["logits"].within_tolerance
    assert result.usable_encodings == ("raw", "fp16")
    only16 = verify(model, head, tail, encodings=["fp16"])
    assert set(only16.encodings) == {"fp16"}


def test_wrong_tail_fails_raw_check():
    model = cnn_chain()
    _, cuts, parts = _parts(model)
    head, tail = parts[1]
    broken = onnx.ModelProto.FromString(tail.SerializeToString())
    w = broken.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    result = verify(model, head, broken, cut_id=cuts[1].id)
    assert not result.passed and result.error is None
    assert result.raw.max_abs_err > 1e-4
    assert result.usable_encodings == ()


def _with_unknown_op(model):
    bad = onnx.ModelProto.FromString(model.SerializeToString())
    node = bad.graph.node[0]
    node.op_type, node.domain = "Nope", "tandem.test"
    del node.attribute[:]
    bad.opset_import.append(helper.make_opsetid("tandem.test", 1))
    return bad


def test_part_ort_cannot_run_is_reported_not_raised():
    model = cnn_chain()
    _, cuts, parts = _parts(model)
    head, tail = parts[1]
    result = verify(model, head, _with_unknown_op(tail), cut_id=cuts[1].id)
    assert not result.passed and result.raw is None
    assert "Nope" in result.error and f"tail of cut {cuts[1].id}" in result.error


def test_full_model_ort_cannot_run_raises_typed_error():
    with pytest.raises(UnsupportedOperator) as err:
        Verifier(_with_unknown_op(cnn_chain()))
    assert isinstance(err.value, OnnxRuntimeError)
    assert isinstance(err.value, FailedPrecondition)
    assert err.value.__cause__ is not None
    assert "Nope" in str(err.value)


def test_each_session_is_built_once(monkeypatch):
    built = []
    real = _verify._Session.__init__

    def counting(self, model, what, threads):
        built.append(what)
        real(self, model, what, threads)

    monkeypatch.setattr(_verify._Session, "__init__", counting)
    model = residual()
    _, cuts, parts = _parts(model)
    verifier = Verifier(model, n_samples=3)
    for cut, (head, tail) in zip(cuts, parts, strict=True):
        verifier.verify(head, tail, cut_id=cut.id)
    interior = len(cuts) - 2
    assert built.count("full model") == 1
    assert len(built) == 1 + 2 * interior + 1 + 1  # cut 0: tail only; local: head only


def test_samples_are_seeded_and_follow_batch():
    model = dynamic_batch()
    a = Verifier(model, seed=5, n_samples=2, batch=3)
    b = Verifier(model, seed=5, n_samples=2, batch=3)
    assert len(a.samples) == 2 and a.samples[0]["x"].shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(a.samples[1]["x"], b.samples[1]["x"])
    assert not np.array_equal(a.samples[0]["x"], a.samples[1]["x"])


def test_load_samples_round_trip_and_use(tmp_path):
    model = multi_io()
    one, two = random_inputs(model, seed=1), random_inputs(model, seed=2)
    single = tmp_path / "one.npz"
    np.savez(single, **one)
    loaded = load_samples(single, model)
    assert len(loaded) == 1
    np.testing.assert_array_equal(loaded[0]["meta"], one["meta"])
    multi = tmp_path / "two.npz"
    np.savez(multi, **{f"sample{i}/{k}": v for i, s in enumerate([one, two]) for k, v in s.items()})
    loaded = load_samples(multi, model)
    assert len(loaded) == 2
    np.testing.assert_array_equal(loaded[1]["image"], two["image"])
    _, cuts, parts = _parts(model, max_frontier=3)
    result = verify(model, *parts[1], loaded, cut_id=cuts[1].id)
    assert result.passed and result.n_samples == 2


def test_load_samples_errors_are_clear(tmp_path):
    model = multi_io()
    good = random_inputs(model)
    with pytest.raises(SampleFileNotFound) as err:
        load_samples(tmp_path / "missing.npz", model)
    assert isinstance(err.value, NotFound)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(SampleError):
        load_samples(junk, model)
    cases = {
        "missing inputs \\['meta'\\]": {"image": good["image"]},
        "unknown inputs \\['extra'\\]": {**good, "extra": good["meta"]},
        "dtype float64": {**good, "meta": good["meta"].astype(np.float64)},
        "shape \\(1, 5\\)": {**good, "meta": np.zeros((1, 5), np.float32)},
    }
    for i, (match, arrays) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(SampleError, match=match) as err:
            load_samples(path, model)
        assert isinstance(err.value, InvalidArgument) and str(path) in str(err.value)
    with pytest.raises(SampleError):
        Verifier(model, [{"image": good["image"]}])


def test_dynamic_batch_user_samples_with_another_batch():
    model = dynamic_batch()
    _, cuts, parts = _parts(model)
    samples = [{"x": np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)}]
    for cut, (head, tail) in zip(cuts, parts, strict=True):
        assert verify(model, head, tail, samples, cut_id=cut.id).passed


def test_external_data_model_verifies(tmp_path):
    model = load_model(with_external_data(tmp_path))
    _, cuts, parts = _parts(model)
    verifier = Verifier(model)
    assert all(verifier.verify(h, t, cut_id=c.id).passed
               for c, (h, t) in zip(cuts, parts, strict=True))


# --- scale-aware verification (compiler v2) -------------------------------------------------


def _scaled_chain(scale: float):
    """x -> MatMul -> Relu -> MatMul: outputs of size ~``scale``; one interior cut."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((8, 4)) * scale).astype(np.float32),
                                 "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 16])],
                              [helper.make_tensor_value_info("y", 1, [1, 4])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_tolerance_is_relative_to_each_outputs_scale():
    tol = Tolerance(atol=1e-2, rtol=0.0)
    ref = np.array([1e-9, -2e-9, 0.5e-9], np.float32)
    assert tol.allows(ref, ref * 1.005)
    assert not tol.allows(ref, ref * 1.06)  # a 6 % error of a tiny output is an error
    big = ref * 1e9
    assert tol.allows(big, big + 0.01) and not tol.allows(big, big + 0.05)


def test_a_tiny_output_is_judged_at_its_scale_and_warned_about():
    model = _scaled_chain(1e-9)
    info = analyze(model)
    cut = next(c for c in find_cuts(info) if c.head_flops and c.tail_flops)
    head, tail = extract(model, info, cut)
    verifier = Verifier(model)
    assert any("too small to verify" in w and "'y'" in w for w in verifier.warnings)
    result = verifier.verify(head, tail, cut_id=cut.id)
    assert result.passed and result.raw.min_snr_db > 100  # exact up to float rounding
    int8 = result.encodings["int8"]
    # int8 costs ~1 % of this output: relative to its 1e-9 scale that is no longer hidden
    assert int8.max_abs_err < 1e-10 and int8.max_rel_err > 1e-4
    assert 10 < int8.min_snr_db < 80
    normal = Verifier(_scaled_chain(1.0)).verify(*extract(_scaled_chain(1.0), info, cut))
    assert normal.encodings["int8"].min_snr_db == pytest.approx(int8.min_snr_db, abs=1.0)


def test_constant_outputs_are_warned_about():
    model = _scaled_chain(0.0)  # a zero-initialised classifier
    verifier = Verifier(model)
    assert any("constant (0)" in w for w in verifier.warnings)
    assert not Verifier(_scaled_chain(1.0)).warnings


def test_snr_is_infinite_when_exact_and_follows_the_noise():
    assert _verify.snr_db(1.0, 0.0) == float("inf")
    assert _verify.snr_db(0.0, 1.0) == float("-inf")
    assert _verify.snr_db(100.0, 1.0) == pytest.approx(20.0)
    model = residual()
    _, cuts, parts = _parts(model)
    result = Verifier(model).verify(*parts[1], cut_id=cuts[1].id)
    assert result.raw.min_snr_db > 100 and result.encodings["fp16"].min_snr_db > 40


def _embedding_model(vocab: int = 30, types: int = 2):
    """ids -> Gather(table) + Gather(type table) with a mask multiplied in."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((vocab, 4)).astype(np.float32), "emb")
    ttab = numpy_helper.from_array(rng.standard_normal((types, 4)).astype(np.float32), "temb")
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=7),
        helper.make_node("Gather", ["emb", "ids32"], ["e"]),
        helper.make_node("Gather", ["temb", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["s"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=1),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["s", "m3"], ["y"]),
    ]
    axis = numpy_helper.from_array(np.array([2], np.int64), "axis")
    ints = [helper.make_tensor_value_info(n, 7, ["B", "S"])
            for n in ("input_ids", "token_type_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "emb", ints,
                              [helper.make_tensor_value_info("y", 1, ["B", "S", 4])],
                              [table, ttab, axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_integer_inputs_are_drawn_where_the_model_accepts_them():
    model = _embedding_model(vocab=30)
    assert _verify.input_ranges(model) == {"input_ids": (0, 30), "token_type_ids": (0, 2),
                                           "attention_mask": (0, 2)}
    verifier = Verifier(model, n_samples=3, shapes={n: (2, 50) for n in
                                                    ("input_ids", "token_type_ids",
                                                     "attention_mask")})
    ids = np.concatenate([s["input_ids"].ravel() for s in verifier.samples])
    assert ids.min() >= 0 and ids.max() < 30 and len(set(ids.tolist())) > 8
    masks = np.stack([s["attention_mask"] for s in verifier.samples])
    assert set(np.unique(masks).tolist()) == {0, 1} and (masks[..., 0] == 1).all()


def test_a_model_random_inputs_break_asks_for_samples_without_ort_noise(capfd):
    # an integer input used as a shape: random values cannot work, the message says what to do
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 6]),
                                           helper.make_tensor_value_info("shape", 7, [2])],
                              [helper.make_tensor_value_info("y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(SampleError, match="does not run on random inputs") as err:
        Verifier(model, seed=3)
    assert err.value.options == ("samples",) and isinstance(err.value.__cause__, TandemError)
    assert "--" not in str(err.value)
    captured = capfd.readouterr()
    assert "\x1b[" not in captured.err and "onnxruntime" not in captured.err
    good = [{"x": np.ones((2, 6), np.float32), "shape": np.array([3, 4], np.int64)}]
    assert Verifier(model, good).references[0]["y"].shape == (3, 4)
