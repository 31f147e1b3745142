"""The manifest fields of compiler v2 (frontier sizes as functions of the input dims, cut origins,
the shared weights file, SNR) and the dimension-expression parser behind them, which reads
untrusted manifest text."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.protocol.bundle import (
    SNR_LIMIT_DB,
    BundleWriter,
    CutOrigin,
    CutSpec,
    DimExpr,
    DimExprError,
    Manifest,
    ManifestError,
    TensorSpec,
    Verification,
)

DIGEST = "a" * 64


def _cut(**kw) -> CutSpec:
    fields = dict(
        id=7, position=3,
        frontier=(TensorSpec(name="f", dtype="float32", shape=("batch", 8, "h2", "w2")),
                  TensorSpec(name="s", dtype="int64", shape=(4,))),
        frontier_bytes=8 * 50 * 70 * 4 + 32, head_flops=10, tail_flops=20,
        head_part="parts/h.onnx", tail_part="parts/t.onnx",
        verification=Verification(samples=1, passed=True, snr_db={"y": 42.5}),
        frontier_dims=(("batch", 8, "(height + 1)//2", "-((-width)//2)"), (4,)),
        origins=(CutOrigin(method="sweep"),
                 CutOrigin(method="mincut", uplink_mbps=6.0, edge_gflops=50.0,
                           cloud_gflops=500.0)),
    )
    fields.update(kw)
    return CutSpec(**fields)


def _manifest(**kw) -> Manifest:
    fields = dict(
        model_name="seg", model_version="1", source_digest=DIGEST,
        inputs=(TensorSpec(name="input", dtype="float32", shape=("batch", 3, "height",
                                                                   "width")),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 4, "height",
                                                              "width")),),
        cuts=(_cut(),), input_shapes={"input": (1, 3, 100, 140)}, weights="parts/weights.bin",
    )
    fields.update(kw)
    return Manifest(**fields)


def test_dim_expressions_evaluate_with_python_semantics():
    env = {"h": 7, "w": 10}
    cases = {"h": 7, "3": 3, "h*w": 70, "(h - 1)//2 + 1": 4, "-((-h)//2)": 4, "h % 4": 3,
             "max(h, w) - min(h, w)": 3, " 2 * ( h+w ) ": 34, "--h": 7, "w//3*3": 9}
    for text, value in cases.items():
        assert DimExpr.parse(text).evaluate(env) == value, text
    assert DimExpr.parse("max(h, w*2) + batch").symbols == {"h", "w", "batch"}


@pytest.mark.parametrize("text", ["", "  ", "h +", "(h", "h)", "2 ** 3", "h / 2", "eval(1)",
                                  "__import__('os')", "h; w", "min(h)", "1e3", "h w",
                                  "max(h, w, 1)", "x" * 600])
def test_malformed_expressions_are_refused(text):
    with pytest.raises(DimExprError):
        DimExpr.parse(text)


def test_hostile_expressions_are_bounded():
    with pytest.raises(DimExprError, match="nested deeper"):
        DimExpr.parse("(" * 40 + "h" + ")" * 40)
    with pytest.raises(DimExprError, match="nested deeper"):
        DimExpr.parse("-" * 100 + "h")
    with pytest.raises(DimExprError, match="2\\*\\*63"):
        DimExpr.parse("*".join(["h"] * 40)).evaluate({"h": 10**6})
    for text, env in (("h // (w - w)", {"h": 1, "w": 2}), ("h % 0", {"h": 1}),
                      ("h - 5", {"h": 1}), ("h", {}), ("h", {"h": -1}), ("h", {"h": True})):
        with pytest.raises(DimExprError):
            DimExpr.parse(text).evaluate(env)


@given(st.text(max_size=60))
def test_the_parser_never_raises_anything_else(text):
    with contextlib.suppress(DimExprError):
        DimExpr.parse(text).evaluate({})


def test_v2_fields_round_trip_and_old_manifests_keep_their_bytes():
    m = _manifest()
    again = Manifest.from_json(m.to_json())
    assert again == m and again.to_json() == m.to_json()
    assert again.cuts[0].origins[1].uplink_mbps == 6.0
    old = _manifest(cuts=(_cut(frontier_dims=(), origins=(), verification=Verification()),),
                    input_shapes={}, weights=None)
    text = old.to_json()
    for key in ("frontier_dims", "origins", "input_shapes", "weights", "snr_db"):
        assert f'"{key}"' not in text  # absent fields are not written


def test_frontier_bytes_at_any_input_size():
    m = _manifest()
    at = {"input": (1, 3, 100, 140)}
    assert m.frontier_bytes(7) == m.frontier_bytes(7, at) == m.cuts[0].frontier_bytes
    assert m.frontier_bytes(7, {"input": (2, 3, 101, 7)}) == 2 * 8 * 51 * 4 * 4 + 32
    assert m.frontier_bytes(7, {"input": (1, 3, 100, 140)}, encoding="fp16") == \
        8 * 50 * 70 * 2 + 32  # int64 crosses raw
    assert m.frontier_bytes(7, at, encoding="int8") == 8 * 50 * 70 + 32
    for bad, match in (({"input": (1, 4, 10, 10)}, "does not fit"),
                       ({"input": (1, 3, 10)}, "does not fit"),
                       ({"other": (1,)}, "not inputs"),
                       ({"input": (1, 3, 10.5, 10)}, "does not fit")):
        with pytest.raises(DimExprError, match=match):
            m.frontier_bytes(7, bad)
    with pytest.raises(DimExprError, match="unknown encoding"):
        m.frontier_bytes(7, at, encoding="zstd")


def test_a_cut_without_dims_is_known_only_at_the_compile_shapes():
    m = _manifest(cuts=(_cut(frontier_dims=()),))
    assert m.frontier_bytes(7, {"input": (1, 3, 100, 140)}) == m.cuts[0].frontier_bytes
    with pytest.raises(DimExprError, match="only at the compile's input shapes"):
        m.frontier_bytes(7, {"input": (1, 3, 200, 140)})


@pytest.mark.parametrize(("change", "field"), [
    ({"frontier_dims": (("batch", 8, "h", "w"),)}, "frontier_dims"),  # one shape for two
    ({"frontier_dims": (("batch", 8, "h"), (4,))}, "frontier_dims[0]"),  # wrong rank
    ({"frontier_dims": (("batch", 8, "(h", "w"), (4,))}, "frontier_dims[0][2]"),
    ({"frontier_dims": (("batch", -8, "h", "w"), (4,))}, "frontier_dims[0][1]"),
    ({"origins": ({"method": "sweep"},)}, "origins[0]"),
])
def test_malformed_cut_fields_name_the_field(change, field):
    with pytest.raises(ManifestError) as err:
        _cut(**change)
    assert err.value.field == field


def test_manifest_level_rules():
    with pytest.raises(ManifestError, match="not dims of the inputs"):
        _manifest(cuts=(_cut(frontier_dims=(("batch", 8, "secret", "w"), (4,))),))
    with pytest.raises(ManifestError, match="not an input"):
        _manifest(input_shapes={"nope": (1,)})
    with pytest.raises(ManifestError, match="rank"):
        _manifest(input_shapes={"input": (1, 3)})
    with pytest.raises(ManifestError, match="snr_db"):
        Verification(snr_db={"y": SNR_LIMIT_DB + 1})
    data = json.loads(_manifest().to_json())
    data["input_shapes"]["input"] = [1, 3, "big", 4]
    with pytest.raises(ManifestError, match=r"input_shapes\['input'\]\[2\]"):
        Manifest.from_dict(data)


def test_weights_file_must_be_in_the_bundle(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        for rel in ("parts/h.onnx", "parts/t.onnx"):
            w.add_file(rel, b"onnx", requires=("parts/weights.bin",))
        with pytest.raises(ManifestError, match="weights"):
            w.finish(_manifest())
        w.abort()
    assert not (tmp_path / "b").exists()
    with BundleWriter(tmp_path / "c") as w:
        w.add_file("parts/weights.bin", b"\0" * 64)
        for rel in ("parts/h.onnx", "parts/t.onnx"):
            w.add_file(rel, b"onnx", requires=("parts/weights.bin",))
        m = w.finish(_manifest())
    assert m.file("parts/h.onnx").requires == ("parts/weights.bin",)
