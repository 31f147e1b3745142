"""The cascade benchmark's data and models (benchmarks/_cascade_models.py): the digits split is
seeded and disjoint, and the ONNX graphs written with onnx.helper compute exactly what the
fitted scikit-learn models do."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the cascade benchmark's models need scikit-learn "
                                      "(extra 'bench', in 'dev')")

from benchmarks import _cascade_models as cm
from tandem.compiler import check_pair, load_model


def test_the_split_is_seeded_and_disjoint():
    a, b = cm.digits(0), cm.digits(0)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    rows = [a.x_train, a.x_calibration, a.x_test]
    assert [len(r) for r in rows] == [900, 450, 447]
    seen = {r.tobytes() for part in rows for r in part}
    assert len(seen) == 1797  # every image once: no row in two parts
    assert a.x_train.dtype == np.float32 and a.x_train.min() >= 0 and a.x_train.max() <= 1
    assert not np.array_equal(cm.digits(1).x_test, a.x_test)


def test_written_models_are_the_trained_ones_and_fit_the_cascade_contract(tmp_path):
    import onnxruntime as ort

    split = cm.digits(0)
    layers = {"small": cm.train_small(split), "large": cm.train_large(split)}
    paths = cm.write(tmp_path, **layers)
    x, y = np.load(paths["test"])["pixels"], np.load(paths["test_labels"])
    np.testing.assert_array_equal(x, split.x_test)
    for name in ("small", "large"):
        sess = ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"pixels": x})[0]
        np.testing.assert_allclose(logits, cm.forward(layers[name], x), rtol=1e-4, atol=1e-4)
    small = ort.InferenceSession(str(paths["small"]), providers=["CPUExecutionProvider"])
    large = ort.InferenceSession(str(paths["large"]), providers=["CPUExecutionProvider"])
    small_acc = np.mean(small.run(None, {"pixels": x})[0].argmax(1) == y)
    large_acc = np.mean(large.run(None, {"pixels": x})[0].argmax(1) == y)
    assert 0.85 < small_acc < large_acc  # a weaker small model, a better large one
    assert check_pair(load_model(paths["small"]), load_model(paths["large"])) == \
        {"logits": "logits"}
