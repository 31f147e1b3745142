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
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, NotFound
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
