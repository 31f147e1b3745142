"""The whole compile: every test model becomes a bundle whose lowered parts reproduce the model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest

from tandem.compiler import BundleFromOnnx, CompileOptions, NoValidCut
from tandem.devices.backends import OnnxRuntimeBackend
from tandem.protocol.bundle import load_bundle
from tandem.protocol.errors import FailedPrecondition, InvalidArgument
from tandem.protocol.tensors import Encoding, Tensor
from tests._support.models import (
    big_model,
    cnn_chain,
    dynamic_batch,
    multi_io,
    random_inputs,
    residual,
    save,
    unet,
    with_external_data,
)

BUILDERS = {
    "cnn_chain": cnn_chain,
    "residual": residual,
    "unet": unet,
    "multi_io": multi_io,
    "dynamic_batch": dynamic_batch,
}


def _run(runnable, feeds: dict) -> dict:
    assert runnable.backend == "onnxruntime"
    with OnnxRuntimeBackend(runnable.path, optimized=runnable.optimized) as backend:
        names = {m.name for m in backend.inputs}
        return backend.infer({k: v for k, v in feeds.items() if k in names})


def _ort_artifact(manifest, part: str) -> str:
    (art,) = manifest.artifacts_for(part, target="onnxruntime")
    return art.path


def _check_bundle_reproduces(bundle, model, batch: int = 1, x: dict | None = None) -> None:
    """Run every cut's lowered head then tail, as ``Bundle.select`` picks them for ONNX Runtime,
    and compare with the full model, within the tolerance the manifest recorded, for raw and
    for each allowed encoding (on ``x``, else seeded random float inputs)."""
    m = bundle.manifest
    x = random_inputs(model, seed=123, batch=batch) if x is None else x
    selection = bundle.select(("head", "tail", "full"), "onnxruntime")
    assert all(r.optimized and r.source is not None for r in selection.distinct())
    full = _run(selection.full, x)
    assert m.cuts, "a bundle without cuts"
    for cut in m.cuts:
        head, tail = selection.for_cut(cut.id)
        crossing = dict(x)
        if head is not None:
            crossing.update(_run(head, x))
        if tail is None:
            got = crossing
            for name, ref in full.items():
                np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5)
            continue
        frontier = {t.name: crossing[t.name] for t in cut.frontier}
        got = _run(tail, frontier)
        for name, ref in full.items():
            atol = 1e-4 * max(1, np.abs(ref).max())
            np.testing.assert_allclose(got[name], ref, rtol=1e-3, atol=atol)
        assert m.allowed_encodings(cut.id)[0] == "raw"
        for enc in m.allowed_encodings(cut.id)[1:]:
            check = cut.verification.encodings[enc]
            wire = Encoding.FP16 if enc == "fp16" else Encoding.INT8_AFFINE
            coded = {
                k: Tensor.from_array(k, v, encoding=wire).to_array() if v.dtype == np.float32
                else v for k, v in frontier.items()
            }
            got = _run(tail, coded)
            for name, ref in full.items():
                err = np.abs(got[name].astype(np.float64) - ref).max()
                # new inputs, so allow the recorded worst case with margin
                bound = max(4 * check.max_abs_err, check.tolerance * max(1, np.abs(ref).max()))
                assert err <= bound


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_test_model_compiles_to_a_bundle_that_reproduces_it(name, tmp_path):
    model = BUILDERS[name]()
    src = save(model, tmp_path / f"{name}.onnx")
    result = BundleFromOnnx(src, tmp_path / "bundle", CompileOptions(targets=("onnxruntime",)))()
    assert any(0 < r.cut.id < result.n_nodes for r in result.cuts)
    with load_bundle(tmp_path / "bundle") as bundle:
        assert bundle.manifest.source_digest == result.manifest.source_digest
        assert [c.id for c in bundle.manifest.cuts] == [r.cut.id for r in result.cuts]
        _check_bundle_reproduces(bundle, model)


def test_dynamic_batch_bundle_runs_at_batch_four(tmp_path):
    model = dynamic_batch()
    src = save(model, tmp_path / "m.onnx")
    BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("onnxruntime",)))()
    with load_bundle(tmp_path / "b") as bundle:
        assert bundle.manifest.inputs[0].shape[0] == "N"
        _check_bundle_reproduces(bundle, model, batch=4)


def test_external_data_model_compiles(tmp_path):
    src = with_external_data(tmp_path / "src")
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("onnxruntime",)))()
    with load_bundle(tmp_path / "b") as bundle:
        _check_bundle_reproduces(bundle, onnx.load(str(src)))
    # the digest covers the weights: changing the external data changes it
    data = src.parent / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    again = BundleFromOnnx(src, tmp_path / "b2", CompileOptions(targets=("onnxruntime",)))()
    assert again.manifest.source_digest != result.manifest.source_digest


def test_max_cuts_and_pareto_in_the_manifest(tmp_path):
    src = save(big_model(), tmp_path / "big.onnx")
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("onnxruntime",),
                                                                max_cuts=3))()
    cuts = result.manifest.cuts
    assert 3 <= len(cuts) <= 3 + 2
    assert cuts[0].head_part is None and cuts[-1].tail_part is None
    interior = cuts[1:-1]
    # more edge work buys fewer bytes, never more
    for a, b in itertools.pairwise(interior):
        assert a.head_flops < b.head_flops and a.frontier_bytes > b.frontier_bytes
    assert all(c.frontier_bytes < cuts[0].frontier_bytes for c in interior)


def test_tensorrt_target_without_tensorrt_defers_engines_to_the_device(tmp_path):
    src = save(residual(), tmp_path / "m.onnx")
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(
        targets=("onnxruntime", "jetson-orin-nano-8gb")))()
    trt = [a for a in result.manifest.artifacts if a.target == "tensorrt"]
    assert trt and all(a.build_on_device for a in trt)
    assert all(a.path == a.part and a.device_profile == "jetson-orin-nano-8gb" for a in trt)
    from tandem.devices.profiles import get_profile

    expected = get_profile("jetson-orin-nano-8gb").workspace_mb
    assert {a.engine_recipe.workspace_mb for a in trt} == {expected}


def test_tensorrt_engines_built_with_the_fake(fake_trt, tmp_path):
    src = save(dynamic_batch(), tmp_path / "m.onnx")
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(
        targets=("cloud-t4",), engines="build", precision="fp16", max_batch=8))()
    engines = [a for a in result.manifest.artifacts if a.target == "tensorrt"]
    assert engines and all(a.path.endswith(".fp16.engine") for a in engines)
    profiles = [triple for a in engines for triple in a.engine_recipe.shapes.values()]
    assert profiles, "a dynamic-batch model must get optimization profiles"
    assert all(lo[0] == 1 and hi[0] == 8 for lo, _, hi in profiles)
    with load_bundle(tmp_path / "b") as bundle:
        for a in engines:
            assert bundle.read(a.path)  # digests verified, engine bytes present


def test_unknown_target_fails_before_any_work(tmp_path):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    with pytest.raises(InvalidArgument, match="unknown target 'jetson-nope'"):
        BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("jetson-nope",)))()
    assert not (tmp_path / "b").exists()


def test_single_node_model_has_no_valid_cut(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(ir_version=8, graph=graph,
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    src = save(model,
               tmp_path / "m.onnx")
    with pytest.raises(NoValidCut, match="no valid split point"):
        BundleFromOnnx(src, tmp_path / "b", CompileOptions())()
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep").write_text("x")
    with pytest.raises(FailedPrecondition, match="already exists"):
        BundleFromOnnx(src, tmp_path / "b", CompileOptions())()
    assert (tmp_path / "b" / "keep").exists()
    with pytest.raises(FailedPrecondition, match="not a bundle"):  # overwrite replaces bundles
        BundleFromOnnx(src, tmp_path / "b", CompileOptions(overwrite=True))()
    assert (tmp_path / "b" / "keep").read_text() == "x"
    BundleFromOnnx(src, tmp_path / "c", CompileOptions())()
    BundleFromOnnx(src, tmp_path / "c", CompileOptions(overwrite=True, model_version="2"))()
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["model_version"] == "2"


def test_tensorrt_build_options_reach_the_builder(fake_trt, tmp_path):
    fake_trt.FAKE_NUM_DLA_CORES = 2  # an AGX Orin has two
    src = save(residual(), tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(
        targets=("jetson-agx-orin-64gb",), engines="build", precision="fp16",
        timing_cache=cache, version_compatible=True, dla_core=1))()
    engines = [a for a in result.manifest.artifacts if a.target == "tensorrt"]
    assert engines and all(a.engine_recipe.dla_core == 1 and a.engine_recipe.version_compatible
                           for a in engines)
    keyed = list(tmp_path.glob("timing.*.cache"))  # keyed by GPU and TensorRT version
    assert len(keyed) == 1 and keyed[0].stat().st_size > 0
    builds = fake_trt.BUILDS[-len(engines):]
    assert all(b["device_type"] == "DLA" and b["dla_core"] == 1 for b in builds)


def test_engines_are_reused_from_the_cache_and_rebuilt_when_the_key_changes(fake_trt,
                                                                            tmp_path):
    fake_trt.FAKE_NUM_DLA_CORES = 2
    src = save(residual(), tmp_path / "m.onnx")

    def compile_(out, **kw):
        return BundleFromOnnx(src, tmp_path / out, CompileOptions(
            targets=("jetson-agx-orin-64gb",), engines="build", engine_cache=tmp_path / "c",
            **kw))()

    first = compile_("b1")
    built = len(fake_trt.BUILDS)
    parts = {a.part for a in first.manifest.artifacts}
    assert built == len(parts)
    again = compile_("b2")
    assert len(fake_trt.BUILDS) == built  # every engine came from the cache
    assert [a.path for a in again.manifest.artifacts] == [a.path for a in first.manifest.artifacts]
    with load_bundle(tmp_path / "b1") as b1, load_bundle(tmp_path / "b2") as b2:
        for a in first.manifest.artifacts:
            assert b1.read(a.path) == b2.read(a.path)
    compile_("b3", dla_core=0)  # a different engine: built, not loaded
    assert len(fake_trt.BUILDS) == 2 * built


def test_every_progress_stage_reaches_its_total(tmp_path):
    src = save(residual(), tmp_path / "m.onnx")
    last: dict[str, tuple[int, int]] = {}
    BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("onnxruntime",)),
                   progress=lambda stage, done, total: last.__setitem__(stage, (done, total)))()
    assert {"loading and analyzing the model", "extracting and verifying cuts",
            "lowering for onnxruntime", "writing bundle"} <= set(last)
    assert all(done == total for done, total in last.values()), last
