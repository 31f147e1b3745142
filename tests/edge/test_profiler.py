"""On-device profiling: every part measured, the table stored under the bundle digest and the
device and reused by a restart, a part measured again after a backend switch."""

from __future__ import annotations

import json
import logging

import pytest

from tandem.devices import get_profile
from tandem.edge._profiler import load_table, profile_bundle, profile_part, profile_shapes
from tandem.edge._runtime import ModelRuntime
from tandem.protocol.bundle import TensorSpec, open_bundle
from tandem.protocol.errors import InvalidArgument


def _runtime(bundle, profile="cpu-x86_64"):
    rt = ModelRuntime(bundle, get_profile(profile))
    rt.load()
    return rt


def test_profiles_every_part_and_reuses_the_stored_table(residual_bundle, tmp_path, caplog):
    with open_bundle(residual_bundle) as bundle:
        rt = _runtime(bundle)
        try:
            with caplog.at_level(logging.INFO, logger="tandem.edge.profiler"):
                table = profile_bundle(rt, tmp_path, warmup=1, runs=3, progress=True)
            assert set(table.parts) == set(rt.parts)
            assert all(t["onnxruntime"].runs == 3 and t["onnxruntime"].median_ms > 0
                       for t in table.parts.values())
            assert set(table.encode_ms) == {0, *(c.id for c in rt.interior)}
            assert all(set(v) == {"raw", "fp16", "int8"} for v in table.frontier_bytes.values())
            assert table.frontier_bytes[0]["raw"] == 3 * 16 * 16 * 4
            assert table.frontier_bytes[0]["int8"] == 3 * 16 * 16
            assert "profiled full model" in caplog.text  # no terminal: one line per part
            files = list((tmp_path / "profiles").iterdir())
            assert [f.name for f in files] == [f"{bundle.digest}-cpu-x86_64.json"]
            again = profile_bundle(rt, tmp_path, warmup=1, runs=3)
            assert again.created_at == table.created_at  # reused, not measured again
            assert load_table(files[0], "0" * 64, "cpu-x86_64") is None  # another bundle
            files[0].write_text("{not json")
            assert load_table(files[0], bundle.digest, "cpu-x86_64") is None
            rt.parts["parts/full.onnx"].kind = "tensorrt"  # as after a switch
            timing = profile_part(rt, again, "parts/full.onnx", tmp_path, warmup=0, runs=2)
            stored = json.loads(files[0].read_text())
            assert stored["parts"]["parts/full.onnx"]["tensorrt"]["runs"] == 2 == timing.runs
        finally:
            rt.close()


def test_profile_shapes():
    class M:
        inputs = (TensorSpec(name="x", dtype="float32", shape=("N", 3, "H", "W")),
                  TensorSpec(name="m", dtype="float32", shape=(1, 4)))
        input_shapes: dict = {}  # noqa: RUF012

    assert profile_shapes(M, {}) == {"x": (1, 3, 64, 64), "m": (1, 4)}
    assert profile_shapes(M, {"x": (2, 3, 32, 48)})["x"] == (2, 3, 32, 48)
    M.input_shapes = {"x": (1, 3, 224, 224)}
    assert profile_shapes(M, {})["x"] == (1, 3, 224, 224)
    with pytest.raises(InvalidArgument, match="does not fit"):
        profile_shapes(M, {"m": (1, 5)})
