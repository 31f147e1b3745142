"""Cascade bundles (tandem.compiler._cascade): both models in one bundle, the output contract,
the escalation rules, label-free calibration, and what a calibrated bundle does on inputs it
has not seen."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.compiler import (
    CascadeBundleFromOnnx,
    CascadeError,
    CascadeOptions,
    CompileOptions,
    RowOutcomes,
    calibrate,
)
from tandem.protocol.bundle import EscalationRule, Manifest, load_bundle, open_bundle
from tandem.protocol.errors import InvalidArgument
from tests._support.cascade import make_pair, save, scorer

CALIBRATION_ROWS = 1000


@pytest.fixture(scope="module")
def pair():
    return make_pair(0)


@pytest.fixture(scope="module")
def files(pair, tmp_path_factory):
    """small.onnx, large.onnx, samples.npz (calibration rows), labels.npy (the large model's
    own top-1 on them: a stand-in for ground truth) and held_out (other rows)."""
    d = tmp_path_factory.mktemp("cascade")
    rows = pair.rows(CALIBRATION_ROWS, 1)
    np.savez(d / "samples.npz", x=rows)
    np.save(d / "labels.npy", pair.large_logits(rows).argmax(1))
    return {"dir": d, "small": save(pair.small, d / "small.onnx"),
            "large": save(pair.large, d / "large.onnx"), "samples": d / "samples.npz",
            "labels": d / "labels.npy", "held_out": pair.rows(4000, 2), "rows": rows}


def compile_cascade(files, out, cascade=CascadeOptions(), **options):
    options.setdefault("samples", files["samples"])
    return CascadeBundleFromOnnx(files["small"], files["large"], out, CompileOptions(**options),
                                 cascade)()


def run_small(bundle, x):
    sel = bundle.select("small", "onnxruntime")
    sess = ort.InferenceSession(str(sel.small.path))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True))


@pytest.fixture(scope="module")
def rate_bundle(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "rate"
    compile_cascade(files, out, CascadeOptions(escalation_rate=0.2, labels=files["labels"]))
    return out


def test_one_bundle_holds_both_models_and_the_large_one_is_cut_and_verified(rate_bundle, pair):
    with load_bundle(rate_bundle) as b:
        m = b.manifest
        c = m.cascade
        assert c is not None and c.small_part in {f.path for f in m.files}
        assert m.artifacts_for(c.small_part, target="onnxruntime")
        # the manifest's own model is the large one: its cuts, its outputs
        interior = [cut for cut in m.cuts if cut.head_part and cut.tail_part]
        assert interior and all(cut.verification.passed for cut in m.cuts)
        assert min(cut.frontier_bytes for cut in interior) < m.cut(0).frontier_bytes
        assert m.input_shapes == {"x": (1, 16)}  # costed at one request, not at the samples
        assert c.output_map == {"logits": "logits"} and c.rule.kind == "max_softmax"
        assert not c.rule.probabilities  # detected: the small model returns logits
        assert 0 < c.small_flops < m.extra["total_flops"]
        # the small part really is the small model
        x = pair.rows(5, 9)
        np.testing.assert_allclose(run_small(b, x)["logits"], pair.small_logits(x), rtol=1e-4,
                                   atol=1e-4)
        # and the JSON round trip is exact
        assert Manifest.from_json(m.to_json()) == m


def test_a_calibrated_bundle_reproduces_its_escalation_rate_on_held_out_rows(rate_bundle,
                                                                            files):
    with open_bundle(rate_bundle) as b:
        c = b.manifest.cascade
        cal = c.calibration
        assert cal.target == "escalation_rate" and cal.target_value == 0.2
        assert cal.chosen.escalation_rate <= 0.2
        assert cal.chosen.escalation_rate > 0.19  # ties are rare: it gets close from below
        held_out = files["held_out"]
        rate = c.rule.escalates(c.rule.scores(run_small(b, held_out))).mean()
        # 4000 rows: the binomial standard error at 20 % is 0.6 %
        assert abs(rate - cal.chosen.escalation_rate) < 0.03, rate


def test_the_recorded_curve_is_what_the_models_do_on_the_samples(rate_bundle, files, pair):
    rows = files["rows"]
    with open_bundle(rate_bundle) as b:
        c = b.manifest.cascade
        small = run_small(b, rows)
    scores = c.rule.scores(small)
    small_top, large_top = small["logits"].argmax(1), pair.large_logits(rows).argmax(1)
    labels = np.load(files["labels"])
    cal = c.calibration
    assert cal.samples == CALIBRATION_ROWS
    assert cal.small_agreement == pytest.approx(np.mean(small_top == large_top))
    assert cal.small_accuracy == pytest.approx(np.mean(small_top == labels))
    assert cal.large_accuracy == 1.0  # the labels are the large model's answers here
    assert cal.chosen in cal.curve and 50 <= len(cal.curve) <= 102
    for point in cal.curve:
        up = EscalationRule(kind="max_softmax", threshold=point.threshold, output="logits")
        escalated = up.escalates(scores)
        answer = np.where(escalated, large_top, small_top)
        assert escalated.mean() == pytest.approx(point.escalation_rate)
        assert np.mean(answer == large_top) == pytest.approx(point.agreement)
        assert np.mean(answer == labels) == pytest.approx(point.accuracy)
    rates = [p.escalation_rate for p in cal.curve]
    assert rates[0] == 0 and rates[-1] == 1


def test_an_agreement_target_gets_the_least_escalation_that_reaches_it(files, tmp_path):
    result = compile_cascade(files, tmp_path / "b", CascadeOptions(agreement=0.99))
    cal = result.manifest.cascade.calibration
    assert cal.target == "agreement" and cal.chosen.agreement >= 0.99
    below = [p for p in cal.curve if p.escalation_rate < cal.chosen.escalation_rate]
    assert below and max(p.agreement for p in below) < 0.99
    assert cal.small_agreement < 0.99 < 1
    assert not cal.labelled and cal.chosen.accuracy is None


@pytest.mark.parametrize("rule", ["margin", "entropy"])
def test_builtin_rules(files, tmp_path, rule):
    result = compile_cascade(files, tmp_path / "b",
                             CascadeOptions(rule=rule, escalation_rate=0.3))
    c = result.manifest.cascade
    assert c.rule.kind == rule and c.rule.escalate_above == (rule == "entropy")
    with open_bundle(tmp_path / "b") as b:
        rate = c.rule.escalates(c.rule.scores(run_small(b, files["held_out"]))).mean()
    assert abs(rate - c.calibration.chosen.escalation_rate) < 0.03


def test_probabilities_are_detected_and_scored_as_such(pair, files, tmp_path):
    import onnx
    from onnx import helper

    probs = onnx.ModelProto()
    probs.CopyFrom(pair.small)
    probs.graph.node[-1].output[0] = "z"
    probs.graph.node.append(helper.make_node("Softmax", ["z"], ["logits"], axis=1))
    small = save(probs, tmp_path / "probs.onnx")
    out = tmp_path / "b"
    CascadeBundleFromOnnx(small, files["large"], out, CompileOptions(samples=files["samples"]),
                          CascadeOptions(escalation_rate=0.2))()
    with open_bundle(out) as b:
        rule = b.manifest.cascade.rule
        assert rule.probabilities
        # the same inputs escalate whether the model ends in softmax or not
        rate = rule.escalates(rule.scores(run_small(b, files["held_out"]))).mean()
        assert abs(rate - 0.2) < 0.03


@pytest.mark.parametrize("kind", ["max", "max_keepdims"])
def test_a_user_scorer_is_a_part_of_the_bundle(files, tmp_path, kind):
    path = save(scorer(kind), tmp_path / "scorer.onnx")
    result = compile_cascade(files, tmp_path / "b",
                             CascadeOptions(rule="scorer", scorer=path, escalation_rate=0.25))
    c = result.manifest.cascade
    assert c.rule.kind == "scorer" and c.rule.scorer_part == "parts/scorer.onnx"
    with open_bundle(tmp_path / "b") as b:
        sel = b.select(("small", "scorer"), "onnxruntime")
        assert sel.scorer is not None and sel.scorer.part == "parts/scorer.onnx"
        outputs = run_small(b, files["held_out"])
        sess = ort.InferenceSession(str(sel.scorer.path))
        score = sess.run(None, {"logits": outputs["logits"]})[0].reshape(-1)
    rate = c.rule.escalates(score).mean()
    assert abs(rate - c.calibration.chosen.escalation_rate) < 0.03


def test_a_declared_output_mapping(pair, files, tmp_path):
    other = make_pair(0, small_output="scores")
    small = save(other.small, tmp_path / "renamed.onnx")
    with pytest.raises(CascadeError, match="map one to it"):
        CascadeBundleFromOnnx(small, files["large"], tmp_path / "x",
                              CompileOptions(samples=files["samples"]))()
    result = CascadeBundleFromOnnx(
        small, files["large"], tmp_path / "b", CompileOptions(samples=files["samples"]),
        CascadeOptions(output_map={"logits": "scores"}, escalation_rate=0.1))()
    c = result.manifest.cascade
    assert c.output_map == {"logits": "scores"} and c.rule.output == "scores"
    assert [t.name for t in result.manifest.outputs] == ["logits"]


# --- bad pairs, bad scorers, bad targets: one-line CascadeErrors ---------------------------


def _other_mlp(tmp_path, name, **kwargs):
    from tests._support.cascade import _mlp

    rng = np.random.default_rng(3)
    din = kwargs.pop("din", 16)
    dout = kwargs.pop("dout", 10)
    layers = [(rng.standard_normal((din, dout)), np.zeros(dout))]
    return save(_mlp(layers, din=din, **kwargs), tmp_path / name)


@pytest.mark.parametrize("small_kwargs, message", [
    ({"in_name": "image"}, "must take the same inputs"),
    ({"din": 12}, "input 'x' differs"),
    ({"dout": 7}, "cannot stand for"),
    ({"output": "probs"}, "which it does not have"),
])
def test_mismatched_pairs_are_one_line_errors(files, tmp_path, small_kwargs, message):
    small = _other_mlp(tmp_path, "bad.onnx", **small_kwargs)
    with pytest.raises(CascadeError, match=message) as info:
        CascadeBundleFromOnnx(small, files["large"], tmp_path / "b",
                              CompileOptions(samples=files["samples"]))()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind, message", [
    ("two_outputs", "it has 2 outputs"),
    ("int_output", "one float score per row"),
    ("wide", "one float score per row"),
])
def test_scorers_with_the_wrong_signature_are_one_line_errors(files, tmp_path, kind, message):
    path = save(scorer(kind), tmp_path / "s.onnx")
    with pytest.raises(CascadeError, match=message) as info:
        compile_cascade(files, tmp_path / "b", CascadeOptions(rule="scorer", scorer=path))
    assert "\n" not in str(info.value)


def test_a_scorer_reading_what_the_small_model_does_not_give(files, tmp_path):
    path = save(scorer("max", reads="features"), tmp_path / "s.onnx")
    with pytest.raises(CascadeError, match="'features' is neither an output"):
        compile_cascade(files, tmp_path / "b", CascadeOptions(rule="scorer", scorer=path))


def test_calibration_needs_samples_and_fitting_labels(files, tmp_path):
    with pytest.raises(CascadeError, match="give samples"):
        compile_cascade(files, tmp_path / "b", samples=None)
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=np.int64))
    with pytest.raises(CascadeError, match="10 labels for 1000 sample rows"):
        compile_cascade(files, tmp_path / "b", CascadeOptions(labels=tmp_path / "short.npy"))
    np.save(tmp_path / "float.npy", np.zeros(1000, dtype=np.float32))
    with pytest.raises(CascadeError, match="one integer class per sample row"):
        compile_cascade(files, tmp_path / "b", CascadeOptions(labels=tmp_path / "float.npy"))
    with pytest.raises(InvalidArgument, match="not both"):
        compile_cascade(files, tmp_path / "b", CascadeOptions(agreement=0.9, escalation_rate=0.1))
    assert not (tmp_path / "b").exists()


def test_few_rows_warn(files, tmp_path, pair):
    np.savez(tmp_path / "few.npz", x=pair.rows(50, 4))
    with pytest.warns(UserWarning, match="calibrated on 50 sample rows only"):
        compile_cascade(files, tmp_path / "b", samples=tmp_path / "few.npz")


# --- calibrate() on its own -----------------------------------------------------------------


def _outcomes(scores, agree):
    agree = np.asarray(agree, dtype=bool)
    small = np.zeros(len(agree), dtype=np.int64)
    return RowOutcomes(np.asarray(scores, dtype=np.float64), small,
                       np.where(agree, 0, 1).astype(np.int64))


def test_ties_move_together_and_nan_always_escalates():
    scores = [0.1, 0.1, 0.1, 0.5, 0.9, float("nan")]
    agree = [False, True, False, True, True, False]
    _, cal = calibrate(_outcomes(scores, agree), "max_softmax", "escalation_rate", 0.4)
    # 0.4 * 6 = 2.4 rows: the NaN row, and the three 0.1 rows cannot be split -> only the NaN
    assert cal.chosen.escalation_rate == pytest.approx(1 / 6)
    rates = {round(p.escalation_rate * 6) for p in cal.curve}
    assert rates == {1, 4, 5, 6}  # 0 is impossible (NaN escalates), 2 and 3 split a tie
    _, cal = calibrate(_outcomes(scores, agree), "max_softmax", "agreement", 1.0)
    assert cal.chosen.escalation_rate == pytest.approx(4 / 6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=1, max_size=60),
       st.sampled_from(["max_softmax", "entropy"]), st.floats(0, 1))
def test_every_curve_point_escalates_exactly_its_rate(rows, kind, target):
    scores = np.array([s / 20 for s, _ in rows])
    outcomes = _outcomes(scores, [a for _, a in rows])
    threshold, cal = calibrate(outcomes, kind, "escalation_rate", target)
    rule = EscalationRule(kind=kind, threshold=threshold, output="y")
    n = len(rows)
    assert rule.escalates(scores).mean() == pytest.approx(cal.chosen.escalation_rate)
    assert cal.chosen.escalation_rate <= target + 1e-9 or cal.chosen.escalation_rate == min(
        p.escalation_rate for p in cal.curve)
    agree = np.array([a for _, a in rows])
    for p in cal.curve:
        up = EscalationRule(kind=kind, threshold=p.threshold, output="y").escalates(scores)
        assert up.sum() == round(p.escalation_rate * n)
        assert np.mean(up | agree) == pytest.approx(p.agreement)
    json.dumps(cal.to_dict(), allow_nan=False)


def test_models_with_a_fixed_batch_calibrate_one_row_per_sample(pair, tmp_path):
    from tests._support.cascade import _mlp

    small = save(_mlp(pair.small_layers, batch=1), tmp_path / "small1.onnx")
    large = save(_mlp(pair.large_layers, batch=1), tmp_path / "large1.onnx")
    rows = pair.rows(300, 6)
    np.savez(tmp_path / "s.npz", **{f"sample{i}/x": rows[i:i + 1] for i in range(len(rows))})
    result = CascadeBundleFromOnnx(small, large, tmp_path / "b",
                                   CompileOptions(samples=tmp_path / "s.npz"),
                                   CascadeOptions(escalation_rate=0.2))()
    cal = result.manifest.cascade.calibration
    assert cal.samples == 300 and cal.chosen.escalation_rate <= 0.2
    assert result.manifest.input_shapes == {"x": (1, 16)}
    # the large model's cuts were verified on the first rows, not on all 300
    assert {c.verification.samples for c in result.manifest.cuts} == {8}


def test_an_answer_that_is_not_batch_by_classes_is_refused(tmp_path, files):
    from tests._support.cascade import _mlp

    rng = np.random.default_rng(1)
    one = [(rng.standard_normal((16, 1)), np.zeros(1))]
    small = save(_mlp(one), tmp_path / "s1.onnx")
    large = save(_mlp(one), tmp_path / "l1.onnx")
    with pytest.raises(CascadeError, match=r"top-1 class of a \[batch, classes\] output"):
        CascadeBundleFromOnnx(small, large, tmp_path / "b",
                              CompileOptions(samples=files["samples"]))()
