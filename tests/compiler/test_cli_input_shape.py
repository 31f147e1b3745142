"""``tandem compile --input-shape``: the sizes a dynamic model is compiled for, and flags named by
the CLI (never by the library) in errors and warnings."""

from __future__ import annotations

import json
from pathlib import Path

from tandem.cli import main
from tandem.protocol.bundle import load_bundle

SEG = Path(__file__).resolve().parent / "data" / "segish_dynamo.onnx"


def _tandem(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_input_shape_sets_the_sizes_of_every_figure(tmp_path, capsys):
    rc, out, err = _tandem(capsys, "compile", SEG, "-t", "onnxruntime", "-o", tmp_path / "b",
                           "--input-shape", "input=1x3x96x128", "--json")
    assert rc == 0, err
    assert "warning" not in err
    summary = json.loads(out)
    assert summary["cuts"][0]["bytes"]["raw"] == 4 * 3 * 96 * 128
    with load_bundle(tmp_path / "b") as bundle:
        assert bundle.manifest.input_shapes == {"input": (1, 3, 96, 128)}


def test_without_a_size_one_warning_names_the_dims_and_the_flag(tmp_path, capsys):
    rc, _, err = _tandem(capsys, "compile", SEG, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--json")
    assert rc == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    text = " ".join(err.split())
    assert "height, width" in text and "--input-shape" in text and "bytes" not in text


def test_bad_input_shapes_are_one_line_errors_naming_the_flag(tmp_path, capsys):
    for args, needle in ((["--input-shape", "input=1x3x96"], "has 3 dims"),
                         (["--input-shape", "image=1x3x96x96"], "does not have"),
                         (["--input-shape", "input=1x3xbig"], "integers"),
                         (["--input-shape", "1x3x96x96"], "NAME=DIMS")):
        rc, _, err = _tandem(capsys, "compile", SEG, "-t", "onnxruntime", "-o",
                             tmp_path / "b", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert needle in lines[0] and "Traceback" not in err
        assert not (tmp_path / "b").exists()
    rc, _, err = _tandem(capsys, "compile", SEG, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--input-shape", "input=1x3x96x96", "--input-shape",
                         "input=1x3x64x64")
    assert rc == 0  # the last one given wins, as a repeated option does
