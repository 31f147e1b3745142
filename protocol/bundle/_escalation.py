"""What a cascade's escalation rule computes: the one definition the compiler calibrates with and
the edge decides with (see ``protocol/bundle/BUNDLE.md``, *Cascades*).

A builtin rule reads one output of the small model, ``[batch, classes]``, as logits (softmax
over the last axis first) or as probabilities, and gives one score per row, in float64:

- ``max_softmax``: the largest probability (higher: surer; escalate below the threshold);
- ``margin``: the largest probability minus the second largest (surer above; escalate below);
- ``entropy``: ``-sum p ln p`` (higher: less sure; escalate above the threshold).

A user scorer (``scorer``) is an ONNX model the reader runs itself; it returns a confidence
per row (escalate below the threshold). A NaN score always escalates.
"""

from __future__ import annotations

import numpy as np

from tandem.protocol.errors import InvalidArgument

__all__ = ["BUILTIN_RULES", "RULE_KINDS", "escalate_above", "escalates", "rule_scores"]

BUILTIN_RULES = ("max_softmax", "margin", "entropy")
RULE_KINDS = (*BUILTIN_RULES, "scorer")


def escalate_above(kind: str) -> bool:
    """True when a higher score means a harder input (``entropy``), else False."""
    return kind == "entropy"


def _probabilities(values: np.ndarray, probabilities: bool) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if probabilities:
        return np.clip(x, 0.0, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        z = x - np.max(x, axis=-1, keepdims=True)
        e = np.exp(z)
        return e / np.sum(e, axis=-1, keepdims=True)


def rule_scores(kind: str, values: np.ndarray, *, probabilities: bool = False) -> np.ndarray:
    """One float64 score per row of ``values`` (``[batch, classes]``, at least 2 classes) for
    the builtin rule ``kind``; InvalidArgument for another shape or kind."""
    if kind not in BUILTIN_RULES:
        raise InvalidArgument(f"{kind!r} is not a builtin escalation rule "
                              f"({', '.join(BUILTIN_RULES)})")
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] < 2:
        raise InvalidArgument(f"an escalation rule reads [batch, classes] with at least 2 "
                              f"classes, not shape {list(values.shape)}")
    if values.dtype.kind not in "fiu":
        raise InvalidArgument(f"an escalation rule reads numbers, not {values.dtype}")
    p = _probabilities(values, probabilities)
    if kind == "max_softmax":
        return p.max(axis=1)
    if kind == "margin":
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=1)


def escalates(kind: str, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which rows escalate: score below ``threshold`` (above for ``entropy``); NaN always."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        past = s > threshold if escalate_above(kind) else s < threshold
    return past | np.isnan(s)
