"""Cascade bundles: a small model answers on the device, the large model takes the hard inputs.

:class:`CascadeBundleFromOnnx` compiles one bundle holding both models::

    check the pair → run both (and the scorer) on every sample row → calibrate the threshold
        → compile the large model like any model (cuts, verification, lowering)
        → add the small model (and the scorer) as parts lowered for every target
        → the manifest's ``cascade`` block (contract, rule, calibration) → write

The manifest's own model is the large one: its cuts are what the cloud serves and an
escalation runs (cloud-only or split), so a reader that knows nothing of cascades sees the
large model. The small model's inputs are the large model's; its outputs stand for the large
model's by name, or through a declared mapping (:class:`CascadeOptions.output_map`), with the
same dtype and rank and equal fixed dims, checked on the graphs and again on every sample.

**Escalation rule.** Builtins read one output of the small model, ``[batch, classes]``:
``max_softmax`` (the top probability), ``margin`` (top-1 minus top-2) or ``entropy``; an ONNX
scorer may replace them: its inputs name outputs of the small model (or inputs of the model),
and it returns one float score per row, ``[batch]`` or ``[batch, 1]``, a confidence (escalate
below the threshold). The rule's ``output`` also decides what "the answer" is: its top-1 class.
Whether that output holds logits or probabilities is detected on the samples (every row in
[0, 1] summing to 1) unless :attr:`CascadeOptions.probabilities` says.
The scores are computed by :class:`tandem.protocol.bundle.EscalationRule`, the same code the
edge decides with.

**Calibration, label-free.** Every row of the samples (the leading axis of each input when both
models take any batch, else one row per sample) runs through both models. Escalating the k rows
the rule trusts least, for each k the threshold can separate (ties move together), gives the
curve of escalation rate against *agreement*: the share of rows where the cascade's top-1
equals the large model's (an escalated row always agrees). The threshold is the curve's point
for the target: the least escalation whose agreement reaches ``agreement``, or the most
agreement escalating at most ``escalation_rate`` of the rows. Thresholds lie midway between the
neighbouring scores. With labels, the accuracy of the small model, the large model and the
cascade at every point is recorded too. The manifest keeps at most
:data:`CURVE_POINTS` points, the chosen one always among them.

The large model's cuts are verified on the first :attr:`CascadeOptions.verify_rows` rows (one
row each), and its costs counted at one row unless ``CompileOptions.input_shapes`` says
otherwise: calibration wants many rows, a cut's cost the size of one request.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.compiler._errors import CascadeError, CompileError, with_options
from tandem.compiler._graph import (
    GraphTensor,
    _spec_from_type,
    analyze,
    input_specs,
    load_model,
)
from tandem.compiler._pipeline import (
    BundleFromOnnx,
    CompileOptions,
    CompileResult,
    Progress,
    _source_digest,
    _spec,
    resolve_targets,
)
from tandem.compiler._shapes import name_input_dims, resolve_input_shapes
from tandem.compiler._verify import _Session, load_samples
from tandem.protocol.bundle import (
    BUILTIN_RULES,
    Calibration,
    CalibrationPoint,
    Cascade,
    EscalationRule,
    spec_mismatch,
)
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:  # pragma: no cover
    from onnx import ModelProto

    from tandem.protocol.bundle import Manifest

__all__ = [
    "CURVE_POINTS",
    "CascadeBundleFromOnnx",
    "CascadeOptions",
    "RowOutcomes",
    "calibrate",
    "check_pair",
    "check_scorer",
]

SMALL_PART = "parts/small.onnx"
SCORER_PART = "parts/scorer.onnx"
#: the most points of the curve a manifest keeps (evenly over the escalation rate)
CURVE_POINTS = 101
#: rows run through the models at once
CHUNK_ROWS = 256
#: fewer calibration rows than this and the threshold is a rough guess (a warning says so)
FEW_ROWS = 200
_FLOAT_CODES = (1, 10, 11, 16)  # ONNX float, float16, double, bfloat16


@dataclass(frozen=True)
class CascadeOptions:
    """How a cascade escalates and is calibrated (beside :class:`CompileOptions`, whose
    ``samples`` are required: a threshold calibrated on random inputs means nothing).

    ``rule``: ``max_softmax``, ``margin``, ``entropy`` or ``scorer`` (with ``scorer``, the path
    of its ONNX). ``output``: the small model's output the rule reads and whose top-1 class is
    the answer (default: the one standing for the large model's first output; a large model's
    output name is taken for the small output mapped to it). ``output_map``: large output name
    -> small output name, for outputs whose names differ (the others map to the same name).
    ``agreement`` / ``escalation_rate``: the calibration target, one of them (default:
    agreement 0.99). ``labels``: a ``.npy`` of one class index per sample row, to record
    accuracies too. ``probabilities``: whether ``output`` holds probabilities (None: detected).
    ``verify_rows``: rows the large model's cuts are verified on.
    """

    rule: str = "max_softmax"
    scorer: Path | None = None
    output: str | None = None
    output_map: Mapping[str, str] | None = None
    agreement: float | None = None
    escalation_rate: float | None = None
    labels: Path | None = None
    probabilities: bool | None = None
    verify_rows: int = 8

    @property
    def target(self) -> tuple[str, float]:
        """``(kind, value)`` of the calibration target."""
        if self.escalation_rate is not None:
            return "escalation_rate", float(self.escalation_rate)
        return "agreement", float(0.99 if self.agreement is None else self.agreement)


def _check_options(c: CascadeOptions) -> None:
    if c.rule not in (*BUILTIN_RULES, "scorer"):
        raise with_options(InvalidArgument(
            f"unknown escalation rule {c.rule!r} (max_softmax, margin, entropy, or a scorer "
            "ONNX model)"), "rule")
    if (c.rule == "scorer") != (c.scorer is not None):
        raise with_options(InvalidArgument("a scorer rule needs the scorer's ONNX file, and "
                                           "only a scorer rule takes one"), "scorer")
    if c.agreement is not None and c.escalation_rate is not None:
        raise with_options(InvalidArgument(
            "give one calibration target: an agreement or an escalation rate, not both"),
            "agreement", "escalation_rate")
    if c.agreement is not None and not (0 < c.agreement <= 1):
        raise with_options(InvalidArgument(f"agreement must be in (0, 1], got {c.agreement}"),
                           "agreement")
    if c.escalation_rate is not None and not (0 <= c.escalation_rate <= 1):
        raise with_options(InvalidArgument(
            f"escalation rate must be in [0, 1], got {c.escalation_rate}"), "escalation_rate")
    if c.verify_rows < 1:
        raise with_options(InvalidArgument("verify_rows must be at least 1"), "verify_rows")


# --- the contract between the two models ------------------------------------------------------


def _outputs(model: ModelProto) -> dict[str, GraphTensor]:
    out = {}
    for vi in model.graph.output:
        spec = _spec_from_type(vi.name, vi.type)
        out[vi.name] = spec if spec is not None else GraphTensor(vi.name, 0, None)
    return out


def _show(t: GraphTensor) -> str:
    from tandem.compiler._pipeline import _dtype_name

    try:
        dtype = _dtype_name(t.dtype)
    except CompileError:
        dtype = f"type {t.dtype}"
    return dtype + (f"{list(t.shape)}" if t.shape is not None else "[?]")


def _mismatch(a: GraphTensor, b: GraphTensor) -> str | None:
    """spec_mismatch for graph tensors, where an unknown rank agrees with any."""
    if a.dtype != b.dtype:
        return f"{_show(b)} vs {_show(a)}"
    if a.shape is None or b.shape is None:
        return None
    return None if spec_mismatch(a, b) is None else f"{_show(b)} vs {_show(a)}"


def check_pair(small: ModelProto, large: ModelProto,
               output_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """The output mapping (large output -> small output, every large output) under which
    ``small`` can stand for ``large``: the same inputs (names, dtypes, ranks, fixed dims) and,
    per large output, a small output of the same dtype and rank with equal fixed dims (a
    symbolic dim agrees with any). :class:`CascadeError`, one line, otherwise."""
    s_in, l_in = input_specs(small), input_specs(large)
    if set(s_in) != set(l_in):
        raise CascadeError(f"the small and the large model must take the same inputs: the small "
                           f"one takes {sorted(s_in)}, the large one {sorted(l_in)}")
    for name, spec in l_in.items():
        problem = _mismatch(spec, s_in[name])
        if problem:
            raise CascadeError(f"input {name!r} differs between the small and the large model "
                               f"(small {problem.replace(' vs ', ', large ')})")
    s_out, l_out = _outputs(small), _outputs(large)
    given = dict(output_map or {})
    unknown = sorted(set(given) - set(l_out))
    if unknown:
        raise with_options(CascadeError(
            f"the output mapping names {unknown}, which are not outputs of the large model "
            f"(outputs: {', '.join(l_out)})"), "output_map")
    mapping = {}
    for name, spec in l_out.items():
        small_name = given.get(name, name)
        if small_name not in s_out:
            how = "is mapped to" if name in given else "needs"
            raise with_options(CascadeError(
                f"the large model's output {name!r} {how} the small model's output "
                f"{small_name!r}, which it does not have (outputs: {', '.join(s_out)}); map "
                f"one to it"), "output_map")
        problem = _mismatch(spec, s_out[small_name])
        if problem:
            raise with_options(CascadeError(
                f"the small model's output {small_name!r} cannot stand for the large model's "
                f"{name!r}: {problem.replace(' vs ', ' where the large one has ')}"),
                "output_map")
        mapping[name] = small_name
    doubled = sorted({v for v in mapping.values() if list(mapping.values()).count(v) > 1})
    if doubled:
        raise with_options(CascadeError(
            f"the small model's output(s) {doubled} stand for several outputs of the large "
            "model"), "output_map")
    return mapping


def check_scorer(scorer: ModelProto, small_outputs: Mapping[str, GraphTensor],
                 inputs: Mapping[str, GraphTensor], name: str = "scorer") -> None:
    """A scorer reads outputs of the small model or inputs of the model, by name, with their
    dtypes and ranks, and returns one float tensor, ``[batch]`` or ``[batch, 1]``:
    :class:`CascadeError`, one line, otherwise."""
    available = {**inputs, **small_outputs}
    for spec in input_specs(scorer).values():
        if spec.name not in available:
            raise with_options(CascadeError(
                f"{name}: input {spec.name!r} is neither an output of the small model "
                f"({', '.join(small_outputs)}) nor an input of the model "
                f"({', '.join(inputs)})"), "scorer")
        problem = _mismatch(available[spec.name], spec)
        if problem:
            given = problem.replace(" vs ", ", the small model gives ")
            raise with_options(CascadeError(f"{name}: input {spec.name!r} is {given}"),
                               "scorer")
    outs = list(_outputs(scorer).values())
    want = "one float score per row ([batch] or [batch, 1])"
    if len(outs) != 1:
        raise with_options(CascadeError(
            f"{name}: must return {want}; it has {len(outs)} outputs"), "scorer")
    out = outs[0]
    shape = out.shape
    ok_shape = shape is None or len(shape) == 1 or (
        len(shape) == 2 and not (isinstance(shape[1], int) and shape[1] != 1))
    if out.dtype not in _FLOAT_CODES or not ok_shape:
        raise with_options(CascadeError(
            f"{name}: must return {want}; its output {out.name!r} is {_show(out)}"), "scorer")


# --- running both models over the sample rows -------------------------------------------------


@dataclass
class RowOutcomes:
    """Per sample row: the rule's score (float64), and the small and large models' top-1
    class on the rule's output and its counterpart."""

    scores: np.ndarray
    small_top1: np.ndarray
    large_top1: np.ndarray
    probabilities: bool = False

    def __len__(self) -> int:
        return len(self.scores)


def _batchable(*specs: Mapping[str, GraphTensor]) -> bool:
    return all(s.shape and not isinstance(s.shape[0], int) for m in specs for s in m.values())


def _rows(samples: Sequence[Mapping[str, np.ndarray]], batchable: bool):
    """Feeds of at most CHUNK_ROWS rows each: slices along the leading axis when both models
    take any batch, else each sample whole."""
    for sample in samples:
        if not batchable:
            yield dict(sample)
            continue
        sizes = {a.shape[0] if a.ndim else 1 for a in sample.values()}
        if len(sizes) != 1:
            raise with_options(CascadeError(
                "the inputs of one sample disagree on their number of rows (leading axis): "
                f"{ {k: list(v.shape) for k, v in sample.items()} }"), "samples")
        n = sizes.pop()
        for start in range(0, n, CHUNK_ROWS):
            yield {k: v[start:start + CHUNK_ROWS] for k, v in sample.items()}


def _top1(values: np.ndarray, what: str) -> np.ndarray:
    if values.ndim != 2 or values.shape[1] < 2:
        raise with_options(CascadeError(
            f"{what} has shape {list(values.shape)} on the samples; a cascade's answer is the "
            "top-1 class of a [batch, classes] output (at least 2 classes)"), "output")
    return np.argmax(values, axis=1)


def _looks_like_probabilities(values: np.ndarray) -> bool:
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)) or v.min(initial=0.0) < 0 or v.max(initial=0.0) > 1:
        return False
    return bool(np.all(np.abs(v.sum(axis=1) - 1) <= 1e-3))


def run_rows(small: ModelProto, large: ModelProto, scorer: ModelProto | None,
             samples: Sequence[Mapping[str, np.ndarray]], mapping: Mapping[str, str],
             output: str, rule: str, probabilities: bool | None, *, threads: int = 1,
             progress: Progress | None = None) -> RowOutcomes:
    """Run the small model, the large model (and the scorer) over every sample row; check the
    output contract on the real tensors; the rule's score and both top-1 classes per row."""
    large_of = {v: k for k, v in mapping.items()}
    small_s = _Session(small, "the small model", threads)
    large_s = _Session(large, "the large model", threads)
    scorer_s = _Session(scorer, "the scorer", threads) if scorer is not None else None
    batchable = _batchable(input_specs(small), input_specs(large))
    total = sum((next(iter(s.values())).shape[0] if batchable and s else 1) for s in samples)
    scores: list[np.ndarray] = []
    as_logits: list[np.ndarray] = []
    small_top, large_top = [], []
    looks_prob = True
    done = 0
    for feed in _rows(samples, batchable):
        s_out = small_s.run(feed)
        l_out = large_s.run(feed)
        for l_name, s_name in mapping.items():
            a, b = l_out[l_name], s_out[s_name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise with_options(CascadeError(
                    f"on the samples, the small model's {s_name!r} is {b.dtype}{list(b.shape)} "
                    f"where the large model's {l_name!r} is {a.dtype}{list(a.shape)}"),
                    "output_map")
        values = s_out[output]
        s_top = _top1(values, f"the small model's output {output!r}")
        l_top = _top1(l_out[large_of[output]], f"the large model's output {large_of[output]!r}")
        if scorer_s is not None:
            got = scorer_s.run({**feed, **s_out})
            score = next(iter(got.values()))
            rows = values.shape[0]
            if score.shape not in ((rows,), (rows, 1)) or score.dtype.kind != "f":
                raise with_options(CascadeError(
                    f"the scorer returned {score.dtype}{list(score.shape)} for {rows} rows; it "
                    f"must return one float score per row ([{rows}] or [{rows}, 1])"), "scorer")
            if np.isinf(score).any():
                raise with_options(CascadeError(
                    "the scorer returned an infinite score for some rows; it must return a "
                    "finite confidence (NaN escalates)"), "scorer")
            scores.append(score.reshape(-1).astype(np.float64))
        else:
            looks_prob = looks_prob and _looks_like_probabilities(values)
            scores.append(_rule(rule, output, probabilities=True).scores(s_out))
            as_logits.append(_rule(rule, output, probabilities=False).scores(s_out))
        small_top.append(s_top)
        large_top.append(l_top)
        done += values.shape[0]
        if progress is not None:
            progress("calibrating the cascade", min(done, total), total)
    prob = looks_prob if probabilities is None else probabilities
    if scorer_s is None and not prob:
        scores = as_logits
    if not small_top:
        raise with_options(CascadeError("the samples hold no rows to calibrate on"), "samples")
    return RowOutcomes(np.concatenate(scores), np.concatenate(small_top),
                       np.concatenate(large_top), prob if scorer_s is None else False)


def _rule(kind: str, output: str = "_", *, probabilities: bool = False) -> EscalationRule:
    """A rule of ``kind`` (no threshold yet): what it scores and which way it escalates."""
    return EscalationRule(kind=kind, threshold=0.0, output=output, probabilities=probabilities,
                          scorer_part="parts/_" if kind == "scorer" else None)


# --- calibration ------------------------------------------------------------------------------


def _load_labels(path: Path, rows: int) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise with_options(CascadeError(f"labels {path}: not a readable .npy file ({exc})"),
                           "labels") from exc
    if not isinstance(labels, np.ndarray):
        raise with_options(CascadeError(f"labels {path}: an .npz archive; give one .npy array "
                                        "(numpy.save)"), "labels")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise with_options(CascadeError(
            f"labels {path}: expected one integer class per sample row, got "
            f"{labels.dtype}{list(labels.shape)}"), "labels")
    if len(labels) != rows:
        raise with_options(CascadeError(
            f"labels {path}: {len(labels)} labels for {rows} sample rows"), "labels")
    return labels.astype(np.int64)


def calibrate(outcomes: RowOutcomes, kind: str, target: str, value: float,
              labels: np.ndarray | None = None,
              points: int = CURVE_POINTS) -> tuple[float, Calibration]:
    """The threshold for ``target`` (``"agreement"`` or ``"escalation_rate"``, ``value`` in
    [0, 1]) and the :class:`Calibration` that records the curve (see the module docstring)."""
    n = len(outcomes)
    if n == 0:
        raise CascadeError("no sample rows to calibrate on")
    above = _rule(kind).escalate_above
    s = np.asarray(outcomes.scores, dtype=np.float64)
    nan = np.isnan(s)
    # hardness: higher escalates first; NaN scores always escalate (the rule says so)
    hard = np.where(nan, np.inf, s if above else -s)
    order = np.argsort(-hard, kind="stable")
    hard_sorted = hard[order]
    agree = (outcomes.small_top1 == outcomes.large_top1)[order]
    # agreement after escalating the first k rows: escalated rows agree by definition
    agree_rest = np.concatenate([[agree.sum()], agree.sum() - np.cumsum(agree)])
    k_all = np.arange(n + 1)
    agreement = (k_all + agree_rest) / n
    accuracy = None
    small_acc = large_acc = None
    if labels is not None:
        small_ok = (outcomes.small_top1 == labels)[order]
        large_ok = (outcomes.large_top1 == labels)[order]
        small_acc, large_acc = float(small_ok.mean()), float(large_ok.mean())
        accuracy = (np.concatenate([[0], np.cumsum(large_ok)])
                    + np.concatenate([[small_ok.sum()], small_ok.sum() - np.cumsum(small_ok)])) / n
    # k is reachable by a threshold when row k-1 is strictly harder than row k; k = the number
    # of NaN rows at least (they escalate whatever the threshold)
    n_nan = int(nan.sum())
    valid = np.zeros(n + 1, dtype=bool)
    valid[n] = True
    valid[n_nan] = True
    inner = np.arange(max(n_nan, 1), n)
    valid[inner] = hard_sorted[inner - 1] > hard_sorted[inner]
    ks = k_all[valid]
    if target == "agreement":
        meets = ks[agreement[ks] >= value - 1e-12]
        k = int(meets.min()) if meets.size else n
    elif target == "escalation_rate":
        within = ks[ks <= value * n + 1e-9]
        k = int(within.max()) if within.size else int(ks.min())
    else:
        raise InvalidArgument(f"unknown calibration target {target!r}")

    def threshold(k: int) -> float:
        finite = hard_sorted[np.isfinite(hard_sorted)]
        if k >= n:  # everything: beyond the easiest row
            edge = float(finite.min()) if finite.size else 0.0
            t = edge - max(1.0, abs(edge))
        elif k <= n_nan:  # nothing but the NaN rows: at the hardest finite row (strict test)
            t = float(hard_sorted[k])
        else:
            hi, lo = float(hard_sorted[k - 1]), float(hard_sorted[k])
            t = (hi + lo) / 2
            if not t < hi:  # adjacent floats: the harder one must still escalate
                t = lo
        return t if above else -t

    def point(k: int) -> CalibrationPoint:
        return CalibrationPoint(
            threshold=threshold(k), escalation_rate=k / n, agreement=float(agreement[k]),
            accuracy=None if accuracy is None else float(accuracy[k]))

    grid = np.linspace(0, n, num=max(2, points - 1))
    picks = {int(ks[np.abs(ks - g).argmin()]) for g in grid} | {k}
    curve = tuple(point(i) for i in sorted(picks))
    return threshold(k), Calibration(
        samples=n, target=target, target_value=value, chosen=point(k), curve=curve,
        small_agreement=float(agreement[0]), small_accuracy=small_acc, large_accuracy=large_acc)


# --- the compile --------------------------------------------------------------------------------


class CascadeBundleFromOnnx(BundleFromOnnx):
    """Callable step: compile ``small_path`` and ``large_path`` into one cascade bundle at
    ``out_dir``; returns the large model's :class:`CompileResult` (its manifest carries the
    ``cascade`` block). Construction validates the options and does nothing else."""

    def __init__(self, small_path: str | Path, large_path: str | Path, out_dir: str | Path,
                 options: CompileOptions = CompileOptions(),
                 cascade: CascadeOptions = CascadeOptions(),
                 progress: Progress | None = None) -> None:
        super().__init__(large_path, out_dir, options, progress)
        _check_options(cascade)
        self.small_path = Path(small_path)
        self.cascade = cascade
        self._block: Cascade | None = None
        self._small: ModelProto | None = None
        self._scorer: ModelProto | None = None
        self._pending: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self) -> CompileResult:
        opts, c = self.options, self.cascade
        resolve_targets(opts.targets)
        if self.out_dir.exists() and not opts.overwrite:
            raise with_options(FailedPrecondition(f"{self.out_dir} already exists"),
                               "overwrite")
        if opts.samples is None:
            raise with_options(CascadeError(
                "a cascade is calibrated on real inputs: give samples (an .npz of inputs)"),
                "samples")
        for path, what in ((self.small_path, "small"), (self.model_path, "large")):
            if not path.is_file():
                raise NotFound(f"no {what} model file at {path}")
        if self.small_path.resolve() == self.model_path.resolve():
            raise CascadeError(f"the small and the large model are the same file "
                               f"({self.small_path})")
        self.progress("calibrating the cascade", 0, 1)
        small, large = load_model(self.small_path), load_model(self.model_path)
        name_input_dims(small)
        name_input_dims(large)
        mapping = check_pair(small, large, c.output_map)
        output = self._decision_output(mapping, _outputs(small))
        scorer = None
        if c.scorer is not None:
            if not Path(c.scorer).is_file():
                raise NotFound(f"no scorer model file at {c.scorer}")
            scorer = load_model(c.scorer)
            check_scorer(scorer, _outputs(small), input_specs(large), Path(c.scorer).name)
        samples = load_samples(opts.samples, large)
        load_samples(opts.samples, small)  # fits the small model too (same checks, its names)
        outcomes = run_rows(small, large, scorer, samples, mapping, output, c.rule,
                            c.probabilities, threads=opts.threads, progress=self.progress)
        labels = _load_labels(Path(c.labels), len(outcomes)) if c.labels is not None else None
        target, value = c.target
        threshold, calibration = calibrate(outcomes, c.rule, target, value, labels)
        self._note_calibration(calibration, len(outcomes))
        batchable = _batchable(input_specs(small), input_specs(large))
        probabilities = outcomes.probabilities
        del large, outcomes, labels  # the large model is loaded again by the compile
        with tempfile.TemporaryDirectory(prefix="tandem-cascade-") as scratch:
            verify = Path(scratch) / "verify.npz"
            rows = _verify_rows(samples, batchable, c.verify_rows)
            del samples
            np.savez(verify, **{f"sample{i}/{k}": v for i, row in enumerate(rows)
                                for k, v in row.items()})
            shapes = resolve_input_shapes(input_specs(small), opts.input_shapes, rows,
                                          batch=opts.batch)
            info = analyze(small, batch=opts.batch, input_shapes=shapes.shapes)
            self._small, self._scorer = small, scorer
            self._block = Cascade(
                small_part=SMALL_PART, small_digest=_source_digest(self.small_path),
                small_outputs=tuple(_spec(info.spec(t)) for t in info.outputs),
                small_flops=info.total_flops, output_map=mapping,
                rule=EscalationRule(kind=c.rule, threshold=threshold, output=output,
                                    probabilities=probabilities,
                                    scorer_part=SCORER_PART if scorer is not None else None),
                calibration=calibration)
            self.options = dataclasses.replace(opts, samples=verify)
            try:
                return super().__call__()
            finally:
                self.options = opts

    def _decision_output(self, mapping: Mapping[str, str],
                         small_outputs: Mapping[str, GraphTensor]) -> str:
        name = self.cascade.output
        if name is None:
            return next(iter(mapping.values()))
        if name in mapping.values():
            return name
        if name in mapping:
            return mapping[name]
        raise with_options(CascadeError(
            f"the rule's output {name!r} is not an output of the small model that stands for "
            f"one of the large model's (those: {', '.join(mapping.values())})"), "output")

    def _note_calibration(self, cal: Calibration, rows: int) -> None:
        """Warnings about the calibration, emitted once the compile's warnings are collected."""
        if rows < FEW_ROWS:
            self._pending.append((f"the cascade is calibrated on {rows} sample rows only; its "
                                  "escalation rate on real inputs may differ a lot (give "
                                  f"{FEW_ROWS} or more)", ("samples",)))
        chosen = cal.chosen
        if cal.target == "agreement" and chosen.escalation_rate > 0.5:
            self._pending.append((
                f"to agree with the large model on {cal.target_value:.1%} of the samples the "
                f"cascade escalates {chosen.escalation_rate:.1%} of them (the small model alone "
                f"agrees on {cal.small_agreement:.1%})", ("agreement",)))

    # -- hooks into the large model's compile -----------------------------------------------

    def _lower(self, targets, parts, work: Path, verifier, store) -> list:
        for message, options in self._pending:
            self._warn(message, *options)
        before = store.size
        assert self._small is not None
        store.save(self._small, work / SMALL_PART)
        if self._scorer is not None:
            store.save(self._scorer, work / SCORER_PART)
        from tandem.compiler._pipeline import MAX_BUNDLE_RATIO

        self._weights_budget += int((MAX_BUNDLE_RATIO - 0.1) * (store.size - before))
        artifacts = super()._lower(targets, [*parts, SMALL_PART], work, verifier, store)
        if self._scorer is not None:  # tiny, and fed the small model's outputs: ONNX Runtime
            artifacts.append(self._lower_ort(SCORER_PART, work, store, ""))
        return artifacts

    def _manifest(self, *args: Any, **kwargs: Any) -> Manifest:
        manifest = super()._manifest(*args, **kwargs)
        return dataclasses.replace(manifest, cascade=self._block)

    def _write(self, manifest, work: Path, parts, artifacts) -> Manifest:
        assert self._block is not None
        return super()._write(manifest, work, {*parts, *self._block.parts}, artifacts)


def _verify_rows(samples: Sequence[Mapping[str, np.ndarray]], batchable: bool,
                 n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` rows of the samples, one per sample (whole samples when not batchable)."""
    out: list[dict[str, np.ndarray]] = []
    for sample in samples:
        if not batchable:
            out.append(dict(sample))
        else:
            rows = next(iter(sample.values())).shape[0] if sample else 0
            out.extend({k: v[i:i + 1] for k, v in sample.items()} for i in range(rows))
        if len(out) >= n:
            break
    return out[:n] or [dict(samples[0])]

