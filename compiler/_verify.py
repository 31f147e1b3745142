"""Numerical verification of a cut: head then tail must equal the full model.

ONNX Runtime (CPUExecutionProvider) runs the full model once per sample (one session for all
cuts, see :class:`Verifier`) and each cut's head and tail (one session each per cut). For every
cut three transfers are checked:

- ``raw``: the frontier tensors cross unchanged; must match within :data:`RAW_TOLERANCE`
  (``CutVerification.passed``). A cut that fails is reported, not raised: the caller drops it.
- ``fp16`` and ``int8``: every float32 tensor crossing the cut (raw graph inputs included) goes
  through ``tandem.protocol.tensors.Tensor.from_array(name, x, encoding=...).to_array()`` -
  exactly what the edge will send - before the tail runs. The errors are recorded per output
  together with whether they are within the tolerance for that encoding, so the edge only uses
  an encoding whose error was checked. Non-float32 tensors cross raw in every mode.

Tolerance, relative to the scale of each output (numpy ``allclose`` style, element-wise, per
sample)::

    |got - ref| <= atol * scale + rtol * |ref|,   scale = max |ref| over the output

so an output that peaks at 1e-9 is held to errors around 1e-13, not to 1e-4 as an absolute
floor would allow. Integer and bool outputs must match exactly. Beside the worst absolute and
relative error (``max |got - ref| / max(|ref|, 1e-3 * scale)``) every check reports a
scale-free signal-to-noise ratio, ``SNR = 10 log10(sum ref^2 / sum (got - ref)^2)`` dB over all
samples (``inf`` when exact).

Verification cannot judge a cut when the reference outputs carry no signal; :attr:`Verifier.
warnings` says so when an output is constant over every sample (a zero-initialised classifier,
say) or peaks below :data:`TINY_OUTPUT` (random weights that shrink activations layer after
layer). Real samples, or real weights, are the cure.

Random samples (when the user gives none) are drawn where a real model accepts them: floats
~ N(0, 1); integer inputs used as indices into a table (token ids, token type ids, position ids:
a ``Gather`` of an initializer, possibly through Cast/Reshape/Unsqueeze/...) uniformly below the
smallest such table; integer inputs named like a mask 0/1 (first position 1); other integers in
[0, 8); bools a fair coin. When the full model still does not run on them, :class:`SampleError`
says to give real samples (``options == ("samples",)``) instead of ONNX Runtime's message alone.

ONNX Runtime is called through :func:`tandem.devices.backends.onnxruntime.map_ort_errors`, the
one boundary; sessions and runs are quiet, so ONNX Runtime prints nothing of its own.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tandem.compiler._errors import (
    ExtractionError,
    SampleError,
    SampleFileNotFound,
    with_options,
)
from tandem.compiler._graph import GraphTensor, input_specs
from tandem.devices.backends.onnxruntime import (
    map_ort_errors,
    quiet_run_options,
    session_options,
)
from tandem.protocol.bundle import ENCODINGS  # the lossy transfer encodings, one table
from tandem.protocol.dtypes import encoding_by_name
from tandem.protocol.errors import TandemError
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    from onnx import ModelProto

__all__ = [
    "DEFAULT_ENCODING_TOLERANCES",
    "RAW_TOLERANCE",
    "TINY_OUTPUT",
    "CutVerification",
    "OutputError",
    "Tolerance",
    "TransferCheck",
    "Verifier",
    "input_ranges",
    "load_samples",
    "measure_shapes",
    "random_samples",
    "snr_db",
    "validate_samples",
    "verify",
]

#: Reference outputs peaking below this carry too little signal to verify against.
TINY_OUTPUT = 1e-6


@dataclass(frozen=True)
class Tolerance:
    """``|got - ref| <= atol * max|ref| + rtol * |ref|`` element-wise (per output, per sample)."""

    atol: float
    rtol: float

    def allows(self, ref: np.ndarray, got: np.ndarray) -> bool:
        if ref.shape != got.shape:
            return False
        if ref.dtype.kind not in "fc":
            return bool(np.array_equal(ref, got))
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        finite = np.isfinite(r)
        if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(
                r[~finite], g[~finite], equal_nan=True):
            return False
        if not finite.any():
            return True
        r, g = r[finite], g[finite]
        scale = float(np.abs(r).max())
        return bool(np.all(np.abs(g - r) <= self.atol * scale + self.rtol * np.abs(r)))


RAW_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
DEFAULT_ENCODING_TOLERANCES: Mapping[str, Tolerance] = {
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "int8": Tolerance(atol=5e-2, rtol=5e-2),
}


@dataclass(frozen=True)
class OutputError:
    """Worst error of one graph output over all samples, and its SNR in dB (``inf``: exact)."""

    max_abs: float
    max_rel: float
    within_tolerance: bool
    snr_db: float = math.inf


@dataclass(frozen=True)
class TransferCheck:
    """Errors of one transfer mode (``raw``, ``fp16``, ``int8``) for one cut."""

    encoding: str
    tolerance: Tolerance
    outputs: Mapping[str, OutputError]
    encoded: tuple[str, ...] = ()  # the tensors that actually went through the encoding

    @property
    def max_abs_err(self) -> float:
        return max((e.max_abs for e in self.outputs.values()), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((e.max_rel for e in self.outputs.values()), default=0.0)

    @property
    def min_snr_db(self) -> float:
        """The worst output's SNR (``inf`` when every output is exact)."""
        return min((e.snr_db for e in self.outputs.values()), default=math.inf)

    @property
    def within_tolerance(self) -> bool:
        return all(e.within_tolerance for e in self.outputs.values())


@dataclass(frozen=True)
class CutVerification:
    """The outcome of verifying one cut. ``passed`` is the raw (lossless) check.

    ``error`` holds why the cut could not be run at all (then ``passed`` is false and ``raw`` is
    ``None``). ``encodings`` maps ``"fp16"``/``"int8"`` to their checks; the all-local cut
    transfers nothing and has none.
    """

    cut_id: int | None
    passed: bool
    raw: TransferCheck | None
    encodings: Mapping[str, TransferCheck] = field(default_factory=dict)
    n_samples: int = 0
    error: str | None = None

    @property
    def usable_encodings(self) -> tuple[str, ...]:
        """Transfer encodings the edge may use for this cut: ``raw`` first, if it passed."""
        if not self.passed:
            return ()
        return ("raw", *(name for name, chk in self.encodings.items() if chk.within_tolerance))


# --------------------------------------------------------------------------------------------
# ONNX Runtime sessions (through the one boundary)


class _Session:
    """One quiet ORT CPU session; ``run`` takes a superset feed and returns outputs by name."""

    def __init__(self, model: ModelProto, what: str, threads: int) -> None:
        ort = require("onnxruntime", "cpu")
        opts = session_options(intra_op_threads=threads, inter_op_threads=1)
        self.what = what
        self._run_options = quiet_run_options()
        with map_ort_errors(what):
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise SampleError(f"{self.what}: no value for inputs {missing}")
        with map_ort_errors(self.what):
            values = self.session.run(None, {n: feeds[n] for n in self.inputs},
                                      self._run_options)
        return dict(zip(self.outputs, values, strict=True))


# --------------------------------------------------------------------------------------------
# Samples

# ops that pass index values through unchanged (so an input that reaches a Gather through them
# is an index into that Gather's table)
_INDEX_PRESERVING = frozenset({"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity",
                               "Expand", "Slice", "Transpose", "Concat", "Tile"})
_MASK_WORDS = ("mask",)


def input_ranges(model: ModelProto) -> dict[str, tuple[int, int]]:
    """``{input: (low, high)}``, high exclusive, for the model's integer inputs: indices into a
    table (the smallest table any use reaches), ``(0, 2)`` for masks, else ``(0, 8)``."""
    from onnx import numpy_helper

    graph = model.graph
    specs = input_specs(model)
    tables: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:  # Constant tables (exporters sometimes keep embeddings so)
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    tables[node.output[0]] = tuple(numpy_helper.to_array(attr.t).shape)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, pos))
    out: dict[str, tuple[int, int]] = {}
    for name, spec in specs.items():
        if spec.np_dtype.kind not in "iu":
            continue
        bound = None
        stack, seen = [name], {name}
        while stack:
            tensor = stack.pop()
            for node, pos in consumers.get(tensor, []):
                if node.op_type in ("Gather", "GatherElements") and pos == 1 \
                        and node.input[0] in tables:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = tables[node.input[0]]
                    if dims and -len(dims) <= axis < len(dims):
                        size = dims[axis]
                        bound = size if bound is None else min(bound, size)
                elif node.op_type in _INDEX_PRESERVING and pos == 0:
                    for o in node.output:
                        if o and o not in seen:
                            seen.add(o)
                            stack.append(o)
        if bound is not None and bound > 0:
            out[name] = (0, int(bound))
        elif any(w in name.lower() for w in _MASK_WORDS):
            out[name] = (0, 2)
        else:
            out[name] = (0, 8)
    return out


def random_samples(
    specs: Mapping[str, GraphTensor], n: int, *, seed: int = 0, batch: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``n`` seeded samples: floats ~ N(0, 1), integers uniform in ``ranges[name]`` (default
    [0, 8); a 0/1 range keeps the first element of the last axis 1, as a mask would), bools a
    fair coin.

    An input's shape is ``shapes[name]`` when given, else its declared shape with symbolic and
    unknown dims = ``batch``.
    """
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    ranges = ranges or {}
    samples = []
    for _ in range(n):
        sample = {}
        for name, spec in specs.items():
            shape = tuple(shapes[name]) if name in shapes else spec.concrete_shape(batch)
            if shape is None:
                raise with_options(SampleError(
                    f"input {name!r} has unknown rank; give sample inputs"), "samples")
            dtype = spec.np_dtype
            if dtype.kind == "f":
                arr = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                low, high = ranges.get(name, (0, 8))
                arr = rng.integers(low, high, size=shape).astype(dtype)
                if (low, high) == (0, 2) and arr.ndim and arr.shape[-1]:
                    arr[..., 0] = 1  # a mask attends to at least one position
            elif dtype.kind == "b":
                arr = rng.random(shape) > 0.5
            else:
                raise with_options(SampleError(
                    f"input {name!r}: cannot make random {dtype} data; give sample inputs"),
                    "samples")
            sample[name] = arr
        samples.append(sample)
    return samples


def validate_samples(
    samples: Sequence[Mapping[str, np.ndarray]], specs: Mapping[str, GraphTensor]
) -> list[dict[str, np.ndarray]]:
    """Check every sample has exactly the model inputs with matching dtypes and shapes."""
    if not samples:
        raise SampleError("no samples given")
    out = []
    for i, sample in enumerate(samples):
        missing = [n for n in specs if n not in sample]
        extra = [n for n in sample if n not in specs]
        if missing or extra:
            raise SampleError(
                f"sample {i}: missing inputs {missing}, unknown inputs {extra} "
                f"(model inputs: {list(specs)})"
            )
        checked = {}
        for name, spec in specs.items():
            arr = np.asarray(sample[name])
            if arr.dtype != spec.np_dtype:
                raise SampleError(
                    f"sample {i}: input {name!r} has dtype {arr.dtype}, model wants {spec.np_dtype}"
                )
            if spec.shape is not None and (
                arr.ndim != len(spec.shape)
                or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape,
                                                                      strict=True))
            ):
                raise SampleError(
                    f"sample {i}: input {name!r} has shape {arr.shape}, model wants "
                    f"{list(spec.shape)}"
                )
            checked[name] = arr
        out.append(checked)
    return out


def load_samples(
    path: str | os.PathLike[str], model: ModelProto | Mapping[str, GraphTensor] | None = None
) -> list[dict[str, np.ndarray]]:
    """Sample inputs from an ``.npz`` file, validated against ``model``'s inputs when given.

    Keys are input names (one sample) or ``sample<i>/<input name>`` (several samples).
    """
    path = Path(path)
    if not path.is_file():
        raise SampleFileNotFound(f"sample file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, Mapping):  # a .npy: one unnamed array
            raise SampleError(f"{path} holds a single array; give an .npz of named inputs "
                              "(numpy.savez(path, <input name>=array, ...))")
        with loaded as npz:  # type: ignore[attr-defined]  # an NpzFile
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SampleError(f"{path} is not a readable .npz file: {exc}") from exc
    if not isinstance(arrays, dict) or not arrays:
        raise SampleError(f"{path} holds no arrays")
    by_index: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        head, sep, name = key.partition("/")
        if sep and head.startswith("sample") and head[6:].isdigit():
            by_index.setdefault(int(head[6:]), {})[name] = arr
        elif sep and head.startswith("sample"):
            raise SampleError(f"{path}: key {key!r} is not 'sample<i>/<input name>'")
        else:
            by_index.setdefault(0, {})[key] = arr
    samples = [by_index[i] for i in sorted(by_index)]
    if model is None:
        return samples
    specs = model if isinstance(model, Mapping) else input_specs(model)
    try:
        return validate_samples(samples, specs)
    except SampleError as exc:
        raise SampleError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Verification


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float]:
    """``(max abs, max rel, signal energy, error energy)`` of ``got`` against ``ref``."""
    if ref.shape != got.shape:
        return math.inf, math.inf, 0.0, math.inf
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(g - r)
    both_nan = np.isnan(r) & np.isnan(g)
    same_inf = np.isinf(r) & (r == g)
    diff = np.where(both_nan | same_inf, 0.0, diff)
    diff = np.where(np.isnan(diff), math.inf, diff)
    if diff.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    finite_ref = r[np.isfinite(r)]
    peak = float(np.abs(finite_ref).max()) if finite_ref.size else 0.0
    floor = max(1e-3 * peak, 1e-300)
    rel = diff / np.maximum(np.abs(np.nan_to_num(r)), floor)
    with np.errstate(over="ignore"):
        signal = float(np.sum(finite_ref * finite_ref))
        noise = float(np.sum(diff * diff))
    return float(diff.max()), float(rel.max()), signal, noise


class _Reference:
    """One reference output with what every comparison against it needs, computed once.
    float32 outputs are compared in float32 (the difference of two close float32 values is
    exact), energies are summed in float64."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.fast = arr.dtype.kind == "f" and arr.size > 0 and bool(np.isfinite(arr).all())
        if self.fast:
            self.r = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)
            self.abs = np.abs(self.r)
            self.peak = float(self.abs.max())
            self.low = float(self.r.min())
            self.signal = _energy(self.r)

    def compare(self, got: np.ndarray, tol: Tolerance) -> tuple[float, float, float, float, bool]:
        """``(max abs, max rel, signal energy, error energy, within tol)`` for ``got``."""
        if self.fast and got.shape == self.arr.shape and got.dtype == self.r.dtype \
                and np.isfinite(got).all():
            d = np.abs(got - self.r)
            rel = float((d / np.maximum(self.abs, max(1e-3 * self.peak, 1e-30))).max())
            ok = bool(np.all(d <= tol.atol * self.peak + tol.rtol * self.abs))
            return float(d.max()), rel, self.signal, _energy(d), ok
        return (*_errors(self.arr, got), tol.allows(self.arr, got))


def _energy(x: np.ndarray) -> float:
    """``sum(x**2)`` in float64, in blocks (no float64 copy of a large array)."""
    flat = x.ravel()
    total = 0.0
    for start in range(0, flat.size, 1 << 20):
        block = flat[start:start + (1 << 20)].astype(np.float64)
        total += float(np.dot(block, block))
    return total


def snr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``: ``inf`` when the noise is 0, ``-inf`` when the signal is."""
    if noise == 0:
        return math.inf
    if signal == 0 or not math.isfinite(noise):
        return -math.inf
    return 10 * math.log10(signal / noise)


def _encode(name: str, arr: np.ndarray, encoding: str) -> np.ndarray:
    if arr.dtype != np.float32:
        return arr
    from tandem.protocol import tensors  # the codec the edge uses: verify exactly what it sends
    code = encoding_by_name(encoding)  # the one encoding table (tandem.protocol.dtypes)
    return np.asarray(tensors.Tensor.from_array(name, arr, encoding=code).to_array(),
                      dtype=np.float32)


def measure_shapes(
    model: ModelProto, names: Sequence[str], sample: Mapping[str, np.ndarray], *,
    intra_op_threads: int = 1,
) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{tensor: (onnx dtype, shape)}`` of intermediate ``names`` in one real run on
    ``sample``: the sizes shape inference could not work out (see
    :func:`tandem.compiler._graph.unresolved_tensors`). Tensors ORT cannot expose are left out."""
    onnx = require("onnx")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    for name in wanted:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = _Session(probe, "the model (sizing intermediate tensors)", intra_op_threads)
    values = session.run(sample)
    out = {}
    for name in names:
        value = values.get(name)
        if isinstance(value, np.ndarray):
            try:
                dtype = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            except (KeyError, ValueError, TypeError):
                continue
            out[name] = (int(dtype), tuple(int(d) for d in value.shape))
    return out


class Verifier:
    """Reference outputs of ``full`` on fixed samples, reused to verify every cut.

    The full model's session is built once here and each cut's head and tail once per
    :meth:`verify` call. ``samples=None`` draws ``n_samples`` seeded random samples (shapes:
    ``shapes``, else symbolic dims = ``batch``; integer values in :func:`input_ranges`); given
    samples are validated against the model's inputs. Raises :class:`SampleError` when the full
    model does not run on random samples, and ONNX Runtime's translated error
    (:class:`~tandem.devices.backends.onnxruntime.OnnxRuntimeError`,
    :class:`~tandem.devices.backends.onnxruntime.UnsupportedOperator`, ...) when it does not run
    on the given ones: nothing could be compared. ``warnings`` lists what verification cannot
    judge on these samples (see the module docstring).
    """

    def __init__(
        self,
        full: ModelProto,
        samples: Sequence[Mapping[str, np.ndarray]] | None = None,
        *,
        seed: int = 0,
        n_samples: int = 2,
        batch: int = 1,
        shapes: Mapping[str, Sequence[int]] | None = None,
        raw_tolerance: Tolerance = RAW_TOLERANCE,
        encoding_tolerances: Mapping[str, Tolerance] | None = None,
        encodings: Sequence[str] = ENCODINGS,
        intra_op_threads: int = 1,
    ) -> None:
        tolerances = dict(DEFAULT_ENCODING_TOLERANCES)
        tolerances.update(encoding_tolerances or {})
        unknown = [e for e in encodings if e not in ("fp16", "int8")]
        if unknown:
            raise SampleError(f"unknown transfer encodings {unknown} (known: fp16, int8)")
        self.raw_tolerance = raw_tolerance
        self.tolerances = {e: tolerances[e] for e in encodings}
        self.threads = intra_op_threads
        specs = input_specs(full)
        self.random = samples is None
        if samples is None:
            self.samples = random_samples(specs, n_samples, seed=seed, batch=batch,
                                          shapes=shapes, ranges=input_ranges(full))
        else:
            self.samples = validate_samples(samples, specs)
        session = _Session(full, "full model", intra_op_threads)
        self.output_names = list(session.outputs)
        try:
            self.references = [session.run(s) for s in self.samples]
        except TandemError as exc:
            if not self.random:
                raise
            raise with_options(SampleError(
                f"the model does not run on random inputs ({exc}); give sample inputs it "
                "accepts"), "samples") from exc
        self._compared = [{k: _Reference(np.asarray(v)) for k, v in ref.items()}
                          for ref in self.references]
        self.warnings = self._judge_references()

    def _judge_references(self) -> list[str]:
        """What verification cannot judge: outputs constant over every sample, or tiny."""
        out = []
        for name in self.output_names:
            refs = [compared[name] for compared in self._compared]
            if not refs or refs[0].arr.dtype.kind != "f" or not refs[0].arr.size:
                continue
            if not all(r.fast for r in refs):
                finite = np.concatenate([r.arr[np.isfinite(r.arr)] for r in refs])
                if not finite.size:
                    out.append(f"output {name!r} is not finite on any sample: verification "
                               "cannot compare cuts against it")
                continue
            peak = max(r.peak for r in refs)
            low = min(r.low for r in refs)
            high = max(float(r.r.max()) for r in refs)
            if low == high:
                out.append(f"output {name!r} is constant ({low:.3g}) on every sample: "
                           "verification cannot tell a wrong cut from a right one (real "
                           "samples or real weights would)")
            elif peak < TINY_OUTPUT:
                out.append(f"output {name!r} peaks at {peak:.2g}, too small to verify against "
                           "(errors are judged relative to it; real samples or real weights "
                           "would give a signal)")
        return out

    def verify(
        self, head: ModelProto | None, tail: ModelProto | None, *, cut_id: int | None = None
    ) -> CutVerification:
        """Check ``tail(head(x)) == full(x)`` on every sample, raw and per encoding.

        ``head=None`` is cut 0 (the inputs cross); ``tail=None`` is the all-local plan.
        A part ORT cannot build or run gives ``passed=False`` with ``error`` set.
        """
        n = len(self.samples)
        try:
            head_s = _Session(head, f"head of cut {cut_id}", self.threads) if head else None
            tail_s = _Session(tail, f"tail of cut {cut_id}", self.threads) if tail else None
            crossing = [self._crossing(head_s, s) for s in self.samples]
            if tail_s is None:
                results = {"raw": [{k: v for k, v in c.items() if k in self.output_names}
                                   for c in crossing]}
                encoded: dict[str, tuple[str, ...]] = {}
            else:
                results, encoded = self._run_tail(tail_s, crossing)
        except TandemError as exc:  # what ONNX Runtime said, translated at the boundary
            return CutVerification(cut_id, False, None, {}, n, error=str(exc))
        raw = self._check("raw", self.raw_tolerance, results["raw"], ())
        checks = {
            name: self._check(name, tol, results[name], encoded[name])
            for name, tol in self.tolerances.items()
            if name in results
        }
        return CutVerification(cut_id, raw.within_tolerance, raw, checks, n)

    def _crossing(self, head: _Session | None, sample: dict[str, np.ndarray]) -> dict:
        if head is None:
            return dict(sample)
        return {**sample, **head.run(sample)}

    def _run_tail(
        self, tail: _Session, crossing: list[dict[str, np.ndarray]]
    ) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, tuple[str, ...]]]:
        missing = [name for name in self.output_names if name not in tail.outputs]
        if missing:
            raise ExtractionError(f"{tail.what} does not produce outputs {missing}")
        results: dict[str, list[dict[str, np.ndarray]]] = {"raw": []}
        encoded: dict[str, tuple[str, ...]] = {}
        unencodable: set[str] = set()
        for values in crossing:
            feeds = {name: values[name] for name in tail.inputs if name in values}
            results["raw"].append(tail.run(feeds))
            for enc in self.tolerances:
                encoded[enc] = tuple(k for k, v in feeds.items() if v.dtype == np.float32)
                if enc in unencodable:
                    continue
                try:
                    coded = {k: _encode(k, v, enc) for k, v in feeds.items()}
                except TandemError:  # e.g. int8 of a tensor holding inf: not usable here
                    unencodable.add(enc)
                    continue
                results.setdefault(enc, []).append(tail.run(coded))
        for enc in unencodable:  # recorded as failed (infinite error), never silently skipped
            results[enc] = [{} for _ in crossing]
        return results, encoded

    def _check(
        self,
        name: str,
        tol: Tolerance,
        outs: list[dict[str, np.ndarray]],
        encoded: tuple[str, ...],
    ) -> TransferCheck:
        per_output = {}
        for out in self.output_names:
            worst_abs = worst_rel = signal = noise = 0.0
            ok = True
            for ref, got in zip(self._compared, outs, strict=True):
                b = np.asarray(got.get(out)) if out in got else None
                if b is None:
                    worst_abs = worst_rel = noise = math.inf
                    ok = False
                    continue
                err_abs, err_rel, sig, err, within = ref[out].compare(b, tol)
                worst_abs, worst_rel = max(worst_abs, err_abs), max(worst_rel, err_rel)
                signal, noise = signal + sig, noise + err
                ok = ok and within
            per_output[out] = OutputError(worst_abs, worst_rel, ok, snr_db(signal, noise))
        return TransferCheck(name, tol, per_output, encoded)


def verify(
    full: ModelProto,
    head: ModelProto | None,
    tail: ModelProto | None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    seed: int = 0,
    n_samples: int = 2,
    batch: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    raw_tolerance: Tolerance = RAW_TOLERANCE,
    encoding_tolerances: Mapping[str, Tolerance] | None = None,
    encodings: Sequence[str] = ENCODINGS,
    intra_op_threads: int = 1,
    cut_id: int | None = None,
) -> CutVerification:
    """Verify one cut. For many cuts of one model build a :class:`Verifier` once instead."""
    verifier = Verifier(
        full, samples, seed=seed, n_samples=n_samples, batch=batch, shapes=shapes,
        raw_tolerance=raw_tolerance, encoding_tolerances=encoding_tolerances,
        encodings=encodings, intra_op_threads=intra_op_threads,
    )
    return verifier.verify(head, tail, cut_id=cut_id)
