"""``tandem compile --cascade`` and ``tandem inspect`` of a cascade bundle, as a user runs them:
the round trip, tables at 80 columns and in pipes, one-line errors, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tandem.cli import main
from tandem.protocol.bundle import Manifest, load_bundle
from tests._support.cascade import make_pair, save, scorer
from tests._support.terminal import into_head, on_terminal, piped


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    pair = make_pair(0)
    d = tmp_path_factory.mktemp("cli-cascade")
    rows = pair.rows(600, 1)
    np.savez(d / "s.npz", x=rows)
    np.save(d / "labels.npy", pair.large_logits(rows).argmax(1))
    return {"dir": d, "small": save(pair.small, d / "small.onnx"),
            "large": save(pair.large, d / "large.onnx"), "samples": d / "s.npz",
            "labels": d / "labels.npy"}


def _tandem(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def _compile(inputs, out, *extra):
    return ["compile", inputs["large"], "--cascade", inputs["small"], "-t", "onnxruntime",
            "-o", out, "--samples", inputs["samples"], *extra]


@pytest.mark.parametrize("suffix", ["", ".tar.zst"])
def test_compile_then_inspect_round_trips(inputs, tmp_path, capsys, suffix):
    out = tmp_path / f"b{suffix}"
    rc, text, err = _tandem(capsys, *_compile(inputs, out, "--escalation-rate", "0.25",
                                              "--labels", inputs["labels"], "--json"))
    assert rc == 0, err
    summary = json.loads(text)
    assert summary["cascade"]["calibration"]["target"] == "escalation_rate"
    rc, text, _ = _tandem(capsys, "inspect", out, "--json")
    assert rc == 0
    shown = Manifest.from_json(text)
    with load_bundle(out) as b:
        assert shown == b.manifest and shown.cascade is not None
        assert shown.cascade.to_dict() == summary["cascade"]
    rc, text, _ = _tandem(capsys, "inspect", out)
    assert rc == 0
    assert "cascade: small model parts/small.onnx" in text
    assert "escalate when the score is below" in text and "calibration curve" in text
    assert "accuracy: small" in text and "chosen" in text
    assert "parts/small.ort.onnx" in text  # the small model's lowered artifact is listed


def test_compile_summary_and_inspect_on_a_terminal_and_in_pipes(inputs, tmp_path):
    from rich.cells import cell_len

    out = tmp_path / "b"
    rc, shown, err = on_terminal(_compile(inputs, out), columns=80)
    assert rc == 0, err
    assert max(cell_len(ln) for ln in shown.splitlines()) <= 80, shown
    assert "calibrated on 600 sample rows for agreement >= 99.0%" in " ".join(shown.split())
    rc, shown, err = on_terminal(["inspect", out], columns=80)
    assert rc == 0 and max(cell_len(ln) for ln in shown.splitlines()) <= 80, shown
    proc = piped(["inspect", out])
    assert proc.returncode == 0 and "calibration curve" in proc.stdout
    curve = proc.stdout.split("calibration curve", 1)[1].splitlines()
    assert curve[1].split() == ["escalated", "threshold", "agreement"]  # no labels, no accuracy
    rc, first, err = into_head(["inspect", out])
    assert rc == 0 and err == "" and first.strip()


def test_a_scorer_rule_from_the_command_line(inputs, tmp_path, capsys):
    path = save(scorer("max"), tmp_path / "conf.onnx")
    rc, _, err = _tandem(capsys, *_compile(inputs, tmp_path / "b", "--rule", path,
                                           "--escalation-rate", "0.1"))
    assert rc == 0, err
    rc, text, _ = _tandem(capsys, "inspect", tmp_path / "b")
    assert "rule: scorer parts/scorer.onnx" in text


@pytest.mark.parametrize("extra, needle", [
    (["--agreement", "0.9", "--escalation-rate", "0.2"],
     "not both (--agreement, --escalation-rate)"),
    (["--agreement", "1.5"], "agreement must be in (0, 1]"),
    (["--rule", "vibes"], "--rule 'vibes': not max-softmax"),
    (["--rule", "missing.onnx"], "--rule missing.onnx: no such file"),
    (["--output-map", "logits"], "expected LARGE=SMALL"),
    (["--output-map", "logits=probs"], "'probs', which it does not have"),
    (["--rule-output", "nope"], "the rule's output 'nope' is not an output"),
    (["--labels", "{d}/s.npz"], "give one .npy array"),
])
def test_bad_cascade_arguments_are_one_line_errors(inputs, tmp_path, capsys, extra, needle):
    extra = [a.format(d=inputs["dir"]) for a in extra]
    rc, _, err = _tandem(capsys, *_compile(inputs, tmp_path / "b", *extra))
    _one_line_error(rc, err, needle)
    assert not (tmp_path / "b").exists()


def test_cascade_flags_need_cascade_and_samples(inputs, tmp_path, capsys):
    rc, _, err = _tandem(capsys, "compile", inputs["large"], "-t", "onnxruntime", "-o",
                         tmp_path / "b", "--agreement", "0.9", "--labels", inputs["labels"])
    _one_line_error(rc, err, "--agreement, --labels only apply to a cascade")
    rc, _, err = _tandem(capsys, "compile", inputs["large"], "--cascade", inputs["small"],
                         "-t", "onnxruntime", "-o", tmp_path / "b")
    _one_line_error(rc, err, "give samples (an .npz of inputs) (--samples)")
    rc, _, err = _tandem(capsys, "compile", inputs["large"], "--cascade", tmp_path / "none.onnx",
                         "-t", "onnxruntime", "-o", tmp_path / "b", "--samples",
                         inputs["samples"])
    _one_line_error(rc, err, "--cascade")
    rc, _, err = _tandem(capsys, "compile", inputs["large"], "--cascade", inputs["large"],
                         "-t", "onnxruntime", "-o", tmp_path / "b", "--samples",
                         inputs["samples"])
    _one_line_error(rc, err, "the same file")
    assert not (tmp_path / "b").exists()


def test_a_mismatched_pair_is_one_line(inputs, tmp_path, capsys):
    from tests._support.cascade import _mlp

    rng = np.random.default_rng(0)
    wrong = save(_mlp([(rng.standard_normal((16, 7)), np.zeros(7))]), tmp_path / "seven.onnx")
    rc, _, err = _tandem(capsys, "compile", inputs["large"], "--cascade", wrong, "-t",
                         "onnxruntime", "-o", tmp_path / "b", "--samples", inputs["samples"])
    _one_line_error(rc, err, "cannot stand for the large model's 'logits'")
    assert "(--output-map LARGE=SMALL)" in err
