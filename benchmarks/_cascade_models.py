"""The data and models of the cascade benchmark (issue #17), made at benchmark time; not a
benchmark itself.

Data: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797 8x8 images of
0-9, shipped inside the package, nothing downloaded), pixels scaled to [0, 1] as float32
``[N, 64]``, split once with a seeded permutation into *train* (900 rows: fits both models),
*calibration* (450: the compile's ``--samples`` and ``--labels``) and *test* (447: held out, what
the benchmark measures on).

Models, trained with scikit-learn and written as ONNX graphs with ``onnx.helper`` (a chain of
``Gemm`` and ``Relu`` from the fitted ``coef_`` / ``coefs_`` and intercepts; no skl2onnx):

- *small*: ``LogisticRegression(C=0.05)``, 650 parameters, one Gemm: the device's model;
- *large*: ``MLPClassifier((256, 256))`` with ReLU, about 85,000 parameters: the cloud's model.

Both take ``pixels`` ``[N, 64]`` and return ``logits`` ``[N, 10]`` (before the softmax that
scikit-learn's ``predict_proba`` applies), so the pair meets the cascade's output contract as is.
scikit-learn is a benchmark dependency (extra ``bench``), never one of the package.

    python -m benchmarks._cascade_models out/cascade-data     # writes the files, prints accuracies
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Split", "digits", "to_onnx", "train_large", "train_small", "write"]

INPUT = "pixels"
OUTPUT = "logits"
TRAIN_ROWS = 900
CALIBRATION_ROWS = 450


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_calibration: np.ndarray
    y_calibration: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0) -> Split:
    """The digits, scaled to [0, 1], split into train / calibration / test rows."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    a, b = TRAIN_ROWS, TRAIN_ROWS + CALIBRATION_ROWS
    tr, ca, te = order[:a], order[a:b], order[b:]
    return Split(x[tr], y[tr], x[ca], y[ca], x[te], y[te])


Layers = list[tuple[np.ndarray, np.ndarray]]  # (weights [in, out], bias [out]) per Gemm


def train_small(split: Split, seed: int = 0) -> Layers:
    """A multinomial logistic regression: logits = x @ W + b."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=0.05, max_iter=2000, random_state=seed)
    model.fit(split.x_train, split.y_train)
    return _checked(model, [(model.coef_.T.copy(), model.intercept_.copy())], split.x_train)


def train_large(split: Split, seed: int = 0) -> Layers:
    """A two-hidden-layer ReLU MLP (256, 256); its logits are the last layer before softmax."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=500, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(split.x_train, split.y_train)
    return _checked(model, list(zip(model.coefs_, model.intercepts_, strict=True)),
                    split.x_train)


def _checked(model, layers: Layers, x: np.ndarray) -> Layers:
    """``layers`` after checking that their softmax is the fitted model's ``predict_proba``
    (what the ONNX graph computes is then what scikit-learn does)."""
    logits = forward(layers, x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    if not np.allclose(e / e.sum(axis=1, keepdims=True), model.predict_proba(x), atol=1e-6):
        raise RuntimeError(f"the exported layers of {type(model).__name__} do not reproduce "
                           "its predict_proba")
    return layers


def to_onnx(layers: Layers, name: str):
    """``pixels [N, 64]`` -> Gemm (-> Relu -> Gemm)* -> ``logits [N, classes]`` (opset 17)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], INPUT
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(np.asarray(w, np.float32), f"{name}.w{i}"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"{name}.b{i}")]
        last = i == len(layers) - 1
        y = OUTPUT if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [x, f"{name}.w{i}", f"{name}.b{i}"], [y],
                                      name=f"gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    din, dout = layers[0][0].shape[0], layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", din])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", dout])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="benchmarks._cascade_models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def forward(layers: Layers, x: np.ndarray) -> np.ndarray:
    """The logits in numpy (float64), for checking the ONNX graphs."""
    h = np.asarray(x, np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def write(out_dir: Path | str, seed: int = 0, *, small: Layers | None = None,
          large: Layers | None = None) -> dict[str, Path]:
    """Train both models (unless given, trained on :func:`digits` of this ``seed``) and write
    ``small.onnx``, ``large.onnx``, ``calibration.npz`` (input ``pixels``),
    ``calibration_labels.npy``, ``test.npz`` and ``test_labels.npy`` to ``out_dir``. Returns the
    paths by those names (without suffix)."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = digits(seed)
    paths = {k: out / f"{k}{ext}" for k, ext in (
        ("small", ".onnx"), ("large", ".onnx"), ("calibration", ".npz"),
        ("calibration_labels", ".npy"), ("test", ".npz"), ("test_labels", ".npy"))}
    small = small if small is not None else train_small(split, seed)
    large = large if large is not None else train_large(split, seed)
    onnx.save(to_onnx(small, "small"), str(paths["small"]))
    onnx.save(to_onnx(large, "large"), str(paths["large"]))
    np.savez(paths["calibration"], **{INPUT: split.x_calibration})
    np.save(paths["calibration_labels"], split.y_calibration)
    np.savez(paths["test"], **{INPUT: split.x_test})
    np.save(paths["test_labels"], split.y_test)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks._cascade_models OUT_DIR", file=sys.stderr)
        return 2
    import onnxruntime as ort

    paths = write(args[0])
    x = np.load(paths["test"])[INPUT]
    y = np.load(paths["test_labels"])
    for name in ("small", "large"):
        sess = ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])
        accuracy = float(np.mean(sess.run(None, {INPUT: x})[0].argmax(1) == y))
        print(f"{name}: {paths[name]} test accuracy {accuracy:.4f} on {len(y)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
