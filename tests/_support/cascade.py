"""A small/large model pair for cascade tests, built with onnx.helper and seeded.

The large model is an MLP with a narrow middle layer (so it has interior cuts that send less
than its input: an escalation may be split); the small one is a linear model fitted by least
squares to the large one's logits, so it agrees with it often but not always, and is surer
where it agrees. Scorers of the right and of wrong signatures come with them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "DIN", "Pair", "make_pair", "save", "scorer"]

DIN = 16
CLASSES = 10


def _mlp(layers, *, output="logits", din=DIN, batch="N", in_name="x"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], in_name
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        last = i == len(layers) - 1
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"],
                                      [output if last else f"g{i}"], name=f"gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    dout = layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, din])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, dout])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _forward(layers, x):
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


class Pair:
    """``small`` and ``large`` (ModelProto), ``rows(n, seed)`` inputs from their distribution,
    ``large_logits`` / ``small_logits`` (numpy references of both models)."""

    def __init__(self, seed: int = 0, *, small_output: str = "logits") -> None:
        rng = np.random.default_rng(seed)
        self.large_layers = [
            (rng.standard_normal((DIN, 64)) / 4, rng.standard_normal(64) * 0.1),
            (rng.standard_normal((64, 6)) / 8, np.zeros(6)),  # the narrow layer: 24 bytes a row
            (rng.standard_normal((6, 64)), np.zeros(64)),
            (rng.standard_normal((64, CLASSES)) / 2, np.zeros(CLASSES)),
        ]
        fit = self.rows(4000, seed + 1000)
        target = _forward(self.large_layers, fit)
        design = np.hstack([fit, np.ones((len(fit), 1))])
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        self.small_layers = [(coef[:-1], coef[-1])]
        self.large = _mlp(self.large_layers)
        self.small = _mlp(self.small_layers, output=small_output)

    @staticmethod
    def rows(n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, DIN)).astype(np.float32)

    def large_logits(self, x: np.ndarray) -> np.ndarray:
        return _forward(self.large_layers, x.astype(np.float64))

    def small_logits(self, x: np.ndarray) -> np.ndarray:
        return _forward(self.small_layers, x.astype(np.float64))


def make_pair(seed: int = 0, **kwargs) -> Pair:
    return Pair(seed, **kwargs)


def scorer(kind: str = "max", *, reads: str = "logits"):
    """A scorer model: ``max`` (the top logit, ``[N]``), ``max_keepdims`` (``[N, 1]``), or the
    wrong ones: ``two_outputs``, ``int_output``, ``wide`` (``[N, 3]``)."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    inputs = [value(reads, TensorProto.FLOAT, ["N", CLASSES])]
    keep = 1 if kind in ("max_keepdims", "wide") else 0
    nodes = [helper.make_node("ReduceMax", [reads], ["top"], keepdims=keep, axes=[1])]
    outputs = [value("top", TensorProto.FLOAT, ["N", 1] if keep else ["N"])]
    if kind == "two_outputs":
        nodes.append(helper.make_node("Identity", [reads], ["copy"]))
        outputs.append(value("copy", TensorProto.FLOAT, ["N", CLASSES]))
    elif kind == "int_output":
        nodes.append(helper.make_node("ArgMax", [reads], ["idx"], axis=1, keepdims=0))
        outputs = [value("idx", TensorProto.INT64, ["N"])]
    elif kind == "wide":
        nodes.append(helper.make_node("Concat", ["top", "top", "top"], ["wide"], axis=1))
        outputs = [value("wide", TensorProto.FLOAT, ["N", 3])]
    graph = helper.make_graph(nodes, "scorer", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path
