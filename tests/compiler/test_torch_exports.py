"""Models exported by torch (TorchScript and dynamo exporters; see data/export_torch_models.py):
real exporter output compiles into bundles that reproduce the model at batch 1 and 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.compiler import BundleFromOnnx, CompileOptions, analyze, load_model
from tandem.compiler._graph import unresolved_tensors
from tandem.protocol.bundle import load_bundle
from tests.compiler.test_pipeline import _check_bundle_reproduces

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = sorted(p.stem for p in DATA.glob("*.onnx"))


def test_fixtures_are_there():
    assert FIXTURES == ["bertish_dynamo", "resnetish_dynamo", "resnetish_torchscript",
                        "segish_dynamo", "vitish_dynamo", "vitish_torchscript", "vitzero_dynamo"]


def _inputs(model, manifest, batch: int) -> dict:
    """Inputs at the compiled sizes with the batch changed, integers where the model takes
    them (token ids inside the embedding table)."""
    from tandem.compiler._graph import input_specs
    from tandem.compiler._verify import input_ranges, random_samples

    shapes = {k: (batch, *v[1:]) for k, v in manifest.input_shapes.items()}
    return random_samples(input_specs(model), 1, seed=123, shapes=shapes,
                          ranges=input_ranges(model))[0]


@pytest.mark.parametrize("name", FIXTURES)
def test_torch_export_compiles_and_reproduces(name, tmp_path):
    src = DATA / f"{name}.onnx"
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("onnxruntime",)))()
    # a BERT is cheapest to split before it starts: its token ids are smaller than anything
    assert len(result.cuts) >= (2 if name.startswith("bert") else 3), \
        [r.cut.frontier for r in result.cuts]
    model = load_model(src)
    with load_bundle(tmp_path / "b") as bundle:
        dynamic = isinstance(bundle.manifest.inputs[0].shape[0], str)  # dynamo may specialize
        for batch in (1, 3) if dynamic else (1,):
            _check_bundle_reproduces(bundle, model, x=_inputs(model, bundle.manifest, batch))


def test_torchscript_vit_needs_measured_sizes(tmp_path):
    # the TorchScript exporter's shape arithmetic leaves dims shape inference cannot resolve;
    # every kept cut must be costed with the measured size, never as if those dims were 1
    src = DATA / "vitish_torchscript.onnx"
    model = load_model(src)
    assert unresolved_tensors(model, analyze(model))
    result = BundleFromOnnx(src, tmp_path / "b", CompileOptions(targets=("onnxruntime",)))()
    with load_bundle(tmp_path / "b") as bundle:
        crossing = {}
        import numpy as np

        from tandem.devices.backends import OnnxRuntimeBackend
        from tests.compiler.test_pipeline import _ort_artifact

        x = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("f4")}
        for cut in bundle.manifest.cuts:
            if cut.head_part and cut.tail_part:
                with OnnxRuntimeBackend(bundle.path_of(
                        _ort_artifact(bundle.manifest, cut.head_part)), optimized=True) as head:
                    crossing = head.infer(x)
                actual = sum(crossing[t.name].nbytes for t in cut.frontier)
                assert cut.frontier_bytes == actual, (cut.id, cut.frontier_bytes, actual)
    assert result.cuts


def test_zoo_regressions_warn_where_verification_cannot_tell(tmp_path):
    # torchvision's ViT zero-initialises its classifier: constant outputs verify nothing
    vit = BundleFromOnnx(DATA / "vitzero_dynamo.onnx", tmp_path / "v",
                         CompileOptions(targets=("onnxruntime",)))()
    assert any("constant" in w and "'logits'" in w for w in vit.warnings)
    assert vit.manifest.extra["warnings"] == vit.warnings
    # a BERT verifies on random token ids only when they stay inside its tables
    bert = BundleFromOnnx(DATA / "bertish_dynamo.onnx", tmp_path / "b",
                          CompileOptions(targets=("onnxruntime",),
                                         input_shapes={"input_ids": (2, 12)}))()
    assert bert.manifest.input_shapes == {"input_ids": (2, 12), "token_type_ids": (2, 12),
                                          "attention_mask": (2, 12)}
    assert all("send more than the raw input" in w for w in bert.warnings)
    assert all(r.verification.passed for r in bert.cuts)
