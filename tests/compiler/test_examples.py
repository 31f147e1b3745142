"""The demo's example model (``examples.mobilenet``): seeded, valid, and cut where compute and
bytes really trade against each other (the compiler finds it, not this test's arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the cpu extra (onnx, onnxruntime) is not installed")


def test_mobilenet_is_seeded():
    from tandem.compiler import examples

    assert examples.mobilenet(seed=3).SerializeToString() == \
        examples.mobilenet(seed=3).SerializeToString()
    assert examples.mobilenet(seed=3).SerializeToString() != \
        examples.mobilenet(seed=4).SerializeToString()


def test_mobilenet_runs_with_activations_in_range():
    import onnxruntime as ort

    from tandem.compiler import examples

    model = examples.mobilenet()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, examples.random_inputs(model))
    assert logits.shape == (1, 1000)
    assert np.isfinite(logits).all()
    # He-scaled random weights: neither vanishing nor exploding after 20 layers
    assert 1e-2 < float(logits.std()) < 1e2


def test_mobilenet_cuts_trade_compute_against_bytes(tmp_path):
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples
    from tandem.protocol.bundle import load_bundle

    path = examples.save(examples.mobilenet(), tmp_path / "m.onnx")
    BundleFromOnnx(path, tmp_path / "b", CompileOptions(targets=("onnxruntime",)))()
    with load_bundle(tmp_path / "b") as bundle:
        m = bundle.manifest
        interior = [c for c in m.cuts if not c.cloud_only and not c.local_only]
        total = m.cuts[0].tail_flops
        input_bytes = m.cuts[0].frontier_bytes
    assert len(interior) >= 2
    # a cheap head with a small frontier (the bottleneck): what makes a split worth it
    assert any(c.head_flops <= 0.1 * total and c.frontier_bytes <= 0.05 * input_bytes
               for c in interior)
    # and cuts that differ: more edge compute buys fewer bytes along the Pareto set
    by_head = sorted(interior, key=lambda c: c.head_flops)
    assert [c.frontier_bytes for c in by_head] == sorted(
        (c.frontier_bytes for c in by_head), reverse=True)
    assert by_head[-1].head_flops > 0.9 * total
