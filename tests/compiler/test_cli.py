"""``tandem compile / inspect / keygen / example`` as a user runs them: one-line errors, exit
codes, no traceback, and no half-written output."""

from __future__ import annotations

import json

import onnx
import pytest

from tandem.cli import main
from tests._support.models import cnn_chain, residual, save, with_external_data


def _tandem(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]


def test_compile_then_inspect(tmp_path, capsys):
    src = save(residual(), tmp_path / "m.onnx")
    rc, out, _ = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--json")
    assert rc == 0
    summary = json.loads(out)
    assert summary["cuts"][0]["id"] == 0 and summary["cuts"][-1]["bytes"]["raw"] == 0
    rc, out, _ = _tandem(capsys, "inspect", tmp_path / "b", "--json")
    assert rc == 0
    assert json.loads(out)["source_digest"] == summary["source_digest"]
    rc, out, _ = _tandem(capsys, "inspect", tmp_path / "b")
    assert rc == 0 and "unsigned" in out and "cuts" in out


def test_signed_archive_round_trip_and_tampering(tmp_path, capsys):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    assert _tandem(capsys, "keygen", priv, pub)[0] == 0
    archive = tmp_path / "m.tar.zst"
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", archive,
                         "--sign-key", priv)
    assert rc == 0, err
    rc, out, _ = _tandem(capsys, "inspect", archive, "--public-key", pub)
    assert rc == 0 and "signature verified" in out

    other_priv, other_pub = tmp_path / "o.pem", tmp_path / "o.pub"
    _tandem(capsys, "keygen", other_priv, other_pub)
    rc, _, err = _tandem(capsys, "inspect", archive, "--public-key", other_pub)
    _assert_one_line_error(rc, err, "signature")

    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "d",
                         "--sign-key", priv)
    assert rc == 0, err
    part = tmp_path / "d" / "parts" / "full.onnx"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rc, _, err = _tandem(capsys, "inspect", tmp_path / "d", "--public-key", pub)
    _assert_one_line_error(rc, err, "parts/full.onnx")


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    rc, _, err = _tandem(capsys, "compile", bad, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "bad.onnx")
    assert not (tmp_path / "out").exists()


def test_missing_external_data(tmp_path, capsys):
    src = with_external_data(tmp_path / "src")
    (src.parent / "model.onnx.data").unlink()
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "model.onnx.data")
    assert not (tmp_path / "out").exists()


def test_op_the_target_cannot_run(tmp_path, capsys):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [h.make_node("Relu", ["x"], ["a"]),
             h.make_node("FancyOp", ["a"], ["b"], domain="com.example"),
             h.make_node("Relu", ["b"], ["y"])]
    model = h.make_model(ir_version=8, graph=h.make_graph(nodes, "g", [x], [y]),
                         opset_imports=[
        h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    src = save(model, tmp_path / "custom.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "FancyOp")
    assert not (tmp_path / "out").exists()


def test_model_with_no_valid_cut(tmp_path, capsys):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = h.make_model(ir_version=8, graph=graph,
                         opset_imports=[h.make_opsetid("", 17)])
    src = save(model, tmp_path / "tiny.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "no valid split point")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["jetson-orin-nano-16gb", "tpu"])
def test_unknown_target(tmp_path, capsys, target):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", target, "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, f"unknown target {target!r}")
    assert not (tmp_path / "out").exists()


def test_missing_model_file(tmp_path, capsys):
    rc, _, err = _tandem(capsys, "compile", tmp_path / "nope.onnx", "-t", "onnxruntime",
                         "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "nope.onnx")


def test_inspect_of_a_missing_bundle(tmp_path, capsys):
    rc, _, err = _tandem(capsys, "inspect", tmp_path / "nothing")
    _assert_one_line_error(rc, err, "nothing")


def test_example_writes_a_valid_model(tmp_path, capsys):
    rc, _, _ = _tandem(capsys, "example", "unet", tmp_path / "u.onnx")
    assert rc == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "u.onnx")))


@pytest.mark.parametrize("part, total, shown", [
    (0, 10, "0%"), (10, 10, "100%"), (5, 10, "50%"), (999, 1000, ">99%"), (1, 1000, "<1%"),
    (3, 0, "-"),
])
def test_flop_share_never_rounds_a_split_to_all_or_nothing(part, total, shown):
    from tandem.compiler.cli import _share

    assert _share(part, total) == shown


def test_compile_verifies_on_the_users_samples(tmp_path, capsys):
    import numpy as np

    src = save(cnn_chain(), tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "s.npz", **{f"sample{i}/input": rng.standard_normal(
        (1, 3, 32, 32)).astype(np.float32) for i in range(3)})
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--samples", tmp_path / "s.npz")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {c["verification"]["samples"] for c in manifest["cuts"]} == {3}
    np.savez(tmp_path / "wrong.npz", image=np.zeros((1, 3, 32, 32), np.float32))
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "c",
                         "--samples", tmp_path / "wrong.npz")
    _assert_one_line_error(rc, err, "wrong.npz")
    assert not (tmp_path / "c").exists()
