"""The manifest's cascade block (issue #17): strict validation of what a peer's file may say, the
JSON round trip, readers that do not know it, selection of the small model and scorer, and the
escalation rules' arithmetic (the one definition the compiler and the edge share)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tandem.protocol.bundle import (
    BundleNotFound,
    BundleWriter,
    Calibration,
    CalibrationPoint,
    Cascade,
    CutSpec,
    EscalationRule,
    Manifest,
    ManifestError,
    TensorSpec,
    Verification,
    open_bundle,
)
from tandem.protocol.errors import InvalidArgument

DIGEST = "a" * 64


def _rule(**kw) -> EscalationRule:
    return EscalationRule(**{"kind": "max_softmax", "threshold": 0.7, "output": "probs", **kw})


def _calibration(**kw) -> Calibration:
    curve = (CalibrationPoint(threshold=0.2, escalation_rate=0.0, agreement=0.9),
             CalibrationPoint(threshold=0.7, escalation_rate=0.2, agreement=0.99),
             CalibrationPoint(threshold=2.0, escalation_rate=1.0, agreement=1.0))
    return Calibration(**{"samples": 500, "target": "agreement", "target_value": 0.99,
                          "chosen": curve[1], "curve": curve, "small_agreement": 0.9, **kw})


def _cascade(**kw) -> Cascade:
    return Cascade(**{
        "small_part": "parts/small.onnx", "small_digest": "b" * 64,
        "small_outputs": (TensorSpec(name="probs", dtype="float32", shape=("N", 10)),),
        "small_flops": 1000, "output_map": {"y": "probs"}, "rule": _rule(),
        "calibration": _calibration(), **kw})


def _manifest(**kw) -> Manifest:
    return Manifest(**{
        "model_name": "digits", "model_version": "1", "source_digest": DIGEST,
        "inputs": (TensorSpec(name="x", dtype="float32", shape=("N", 64)),),
        "outputs": (TensorSpec(name="y", dtype="float32", shape=("batch", 10)),),
        "cuts": (CutSpec(id=0, position=0, frontier=(), frontier_bytes=256, head_flops=0,
                         tail_flops=10, head_part=None, tail_part="parts/full.onnx",
                         verification=Verification(samples=1, passed=True)),),
        "cascade": _cascade(), **kw})


def test_round_trip_and_old_readers():
    m = _manifest()
    again = Manifest.from_json(m.to_json())
    assert again == m and again.cascade.calibration.chosen.agreement == 0.99
    data = json.loads(m.to_json())
    assert data["cascade"]["rule"] == {"kind": "max_softmax", "threshold": 0.7,
                                       "output": "probs", "probabilities": False}
    # a manifest without the block is the large model alone, as before
    del data["cascade"]
    assert Manifest.from_dict(data).cascade is None
    assert "cascade" not in _manifest(cascade=None).to_dict()


@pytest.mark.parametrize("change, field", [
    (lambda d: d["rule"].update(kind="vibes"), "cascade.rule.kind"),
    (lambda d: d["rule"].update(threshold=float("inf")), "cascade.rule.threshold"),
    (lambda d: d["rule"].update(threshold="0.5"), "cascade.rule.threshold"),
    (lambda d: d["rule"].update(kind="scorer"), "cascade.rule.scorer_part"),
    (lambda d: d["rule"].update(scorer_part="../../etc/passwd", kind="scorer"),
     "cascade.rule.scorer_part"),
    (lambda d: d["rule"].update(output="logits"), "cascade.rule.output"),
    (lambda d: d.update(small_part="/abs.onnx"), "cascade.small_part"),
    (lambda d: d.update(small_digest="xyz"), "cascade.small_digest"),
    (lambda d: d.update(output_map={"y": "nope"}), "cascade.output_map['y']"),
    (lambda d: d.update(output_map={}), "cascade.output_map"),
    (lambda d: d.update(output_map={"y": "probs", "z": "probs"}), "cascade.output_map"),
    (lambda d: d["calibration"].update(target="vibes"), "cascade.calibration.target"),
    (lambda d: d["calibration"].update(target_value=1.5), "cascade.calibration.target_value"),
    (lambda d: d["calibration"].update(samples=0), "cascade.calibration.samples"),
    (lambda d: d["calibration"]["curve"].reverse(), "cascade.calibration.curve"),
    (lambda d: d["calibration"]["curve"][0].update(agreement=-0.1),
     "cascade.calibration.curve[0].agreement"),
    (lambda d: d["calibration"].update(curve=[d["calibration"]["chosen"]] * 2000),
     "cascade.calibration.curve"),
    (lambda d: d["small_outputs"][0].update(dtype="int64"), "cascade.output_map['y']"),
    (lambda d: d["small_outputs"][0].update(shape=["N", 11]), "cascade.output_map['y']"),
])
def test_a_bad_cascade_block_names_its_field(change, field):
    data = json.loads(_manifest().to_json())
    change(data["cascade"])
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data)
    assert info.value.field == field, str(info.value)


def test_every_output_needs_a_small_output_of_the_same_kind():
    two = (TensorSpec(name="y", dtype="float32", shape=("batch", 10)),
           TensorSpec(name="z", dtype="int64", shape=("batch",)))
    with pytest.raises(ManifestError, match=r"\['z'\] have no small output"):
        _manifest(outputs=two)
    # a symbolic dim agrees with any size; a fixed one must match
    _manifest(outputs=(TensorSpec(name="y", dtype="float32", shape=(1, 10)),))
    with pytest.raises(ManifestError, match="does not stand for"):
        _manifest(outputs=(TensorSpec(name="y", dtype="float32", shape=(1, 10, 1)),))


def test_references_and_selection(tmp_path):
    weights = b"\0" * 16
    with BundleWriter(tmp_path / "b") as w:
        for path in ("parts/full.onnx", "parts/small.onnx"):
            w.add_file(path, b"onnx:" + path.encode(), requires=("parts/weights.bin",))
        w.add_file("parts/weights.bin", weights)
        w.finish(_manifest(weights="parts/weights.bin"))
    with open_bundle(tmp_path / "b") as b:
        sel = b.select(("full", "small", "scorer"), "onnxruntime")
        assert sel.small.part == "parts/small.onnx" and sel.small.backend == "onnxruntime"
        assert sel.scorer is None  # a builtin rule has none
        assert set(sel.files) == {"parts/full.onnx", "parts/small.onnx", "parts/weights.bin"}
        assert len(sel.distinct()) == 2
        tails = b.select("tail", "onnxruntime")  # what the cloud asks for: never the small one
        assert "parts/small.onnx" not in tails.files
    with BundleWriter(tmp_path / "c") as w:
        w.add_file("parts/full.onnx", b"x")
        with pytest.raises(ManifestError, match=r"cascade\.small_part"):
            w.finish(_manifest())
        w.abort()
    assert not (tmp_path / "c").exists()
    with BundleWriter(tmp_path / "d") as w:
        w.add_file("parts/full.onnx", b"x")
        w.finish(_manifest(cascade=None))
    with open_bundle(tmp_path / "d") as b, pytest.raises(BundleNotFound, match="not a cascade"):
        b.select("small", "onnxruntime")


def test_builtin_scores():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [2.0, 2.0, -50, -50]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for kind, want in (("max_softmax", [0.25, probs[1, 0], 0.5]),
                       ("margin", [0.0, probs[1, 0] - probs[1, 1], 0.0]),
                       ("entropy", [math.log(4), None, math.log(2)])):
        got = _rule(kind=kind, output="y").scores({"y": logits})
        same = _rule(kind=kind, output="y", probabilities=True).scores({"y": probs})
        np.testing.assert_allclose(got, same, atol=1e-12)
        for i, w in enumerate(want):
            if w is not None:
                assert got[i] == pytest.approx(w, abs=1e-9)
    assert _rule(kind="entropy").escalate_above and not _rule().escalate_above
    # scores and decisions: below for confidences, above for entropy, NaN always
    scores = np.array([0.1, 0.7, 0.9, np.nan])
    assert _rule(threshold=0.7).escalates(scores).tolist() == [True, False, False, True]
    assert _rule(kind="entropy", threshold=0.7).escalates(scores).tolist() == \
        [False, False, True, True]
    nan = _rule(output="y").scores({"y": np.array([[np.inf, 1.0], [np.nan, 0.0]])})
    assert _rule(output="y").escalates(nan).all()


@pytest.mark.parametrize("value", [np.zeros((3,)), np.zeros((3, 1)), np.zeros((2, 3, 4)),
                                   np.array([["a", "b"]])])
def test_rules_refuse_what_is_not_batch_by_classes(value):
    with pytest.raises(InvalidArgument):
        _rule(output="y").scores({"y": value})


def test_a_scorer_rule_is_run_by_the_reader():
    rule = _rule(kind="scorer", scorer_part="parts/scorer.onnx")
    with pytest.raises(InvalidArgument, match=r"runs parts/scorer\.onnx"):
        rule.scores({"probs": np.zeros((1, 2))})
    assert rule.escalates(np.array([[0.5], [0.9]])).tolist() == [True, False]
