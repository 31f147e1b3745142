"""Numerical verification of a cut: head then tail must equal the full model.

ONNX Runtime (CPUExecutionProvider) runs the full model once per sample (one session for all
cuts, see :class:`Verifier`) and each cut's head and tail (one session each per cut). For every
cut three transfers are checked:

- ``raw``: the frontier tensors cross unchanged; must match within :data:`RAW_TOLERANCE`
  (``CutVerification.passed``). A cut that fails is reported, not raised: the caller drops it.
- ``fp16`` and ``int8``: every float32 tensor crossing the cut (raw graph inputs included) goes
  through ``tandem.protocol.tensors.Tensor.from_array(name, x, encoding=...).to_array()`` -
  exactly what
  the edge will send - before the tail runs. The errors are recorded per output together with
  whether they are within the tolerance for that encoding, so the edge only uses an encoding
  whose error was checked. Non-float32 tensors cross raw in every mode.

Tolerance (numpy ``allclose`` style, with the absolute part scaled by the output's magnitude):
``|got - ref| <= atol * max(1, max|ref|) + rtol * |ref|`` element-wise.
Relative error is reported as ``max |got - ref| / max(|ref|, 1e-3 * max|ref|)``.

This module is the ONNX Runtime exception boundary of the compiler (``_ort_call``).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from tandem.compiler._errors import (
    RuntimeCheckError,
    SampleError,
    SampleFileNotFound,
    UnsupportedOperator,
)
from tandem.compiler._graph import GraphTensor, input_specs
from tandem.protocol.bundle import ENCODINGS  # the lossy transfer encodings, one table
from tandem.protocol.dtypes import encoding_by_name
from tandem.protocol.errors import TandemError
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    from onnx import ModelProto

__all__ = [
    "DEFAULT_ENCODING_TOLERANCES",
    "RAW_TOLERANCE",
    "CutVerification",
    "OutputError",
    "Tolerance",
    "TransferCheck",
    "Verifier",
    "load_samples",
    "measure_shapes",
    "random_samples",
    "validate_samples",
    "verify",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Tolerance:
    """``|got - ref| <= atol * max(1, max|ref|) + rtol * |ref|`` element-wise."""

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
        scale = max(1.0, float(np.abs(r).max()))
        return bool(np.all(np.abs(g - r) <= self.atol * scale + self.rtol * np.abs(r)))


RAW_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
DEFAULT_ENCODING_TOLERANCES: Mapping[str, Tolerance] = {
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "int8": Tolerance(atol=5e-2, rtol=5e-2),
}


@dataclass(frozen=True)
class OutputError:
    """Worst error of one graph output over all samples."""

    max_abs: float
    max_rel: float
    within_tolerance: bool


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
# ONNX Runtime boundary


def _ort_call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call into ONNX Runtime, translating whatever it raises into the compiler's tree."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # ORT raises pybind classes deriving from Exception directly
        if not _is_ort_exception(exc):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = type(exc).__name__
        if kind == "NotImplemented" or "not a registered function/op" in text or (
            "Could not find an implementation" in text
        ):
            raise UnsupportedOperator(f"{what}: ONNX Runtime: {text}") from exc
        raise RuntimeCheckError(f"{what}: ONNX Runtime {kind}: {text}") from exc


def _is_ort_exception(exc: Exception) -> bool:
    module = type(exc).__module__ or ""
    # The Python wrapper of ORT raises ValueError/RuntimeError for bad feeds and sessions.
    return module.startswith("onnxruntime") or isinstance(exc, (ValueError, RuntimeError))


class _Session:
    """One ORT CPU session; ``run`` takes a superset feed and returns outputs by name."""

    def __init__(self, model: ModelProto, what: str, threads: int) -> None:
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.what = what
        self.session = _ort_call(
            what, ort.InferenceSession, model.SerializeToString(), sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise RuntimeCheckError(f"{self.what}: no value for inputs {missing}")
        values = _ort_call(self.what, self.session.run, None, {n: feeds[n] for n in self.inputs})
        return dict(zip(self.outputs, values, strict=True))


# --------------------------------------------------------------------------------------------
# Samples


def random_samples(
    specs: Mapping[str, GraphTensor], n: int, *, seed: int = 0, batch: int = 1
) -> list[dict[str, np.ndarray]]:
    """``n`` seeded samples: floats ~ N(0, 1), integers in [0, 8), bools fair coin.

    Symbolic and unknown dims take ``batch``.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        sample = {}
        for name, spec in specs.items():
            shape = spec.concrete_shape(batch)
            if shape is None:
                raise SampleError(f"input {name!r} has unknown rank; pass samples explicitly")
            dtype = spec.np_dtype
            if dtype.kind == "f":
                arr = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                arr = rng.integers(0, 8, size=shape).astype(dtype)
            elif dtype.kind == "b":
                arr = rng.random(shape) > 0.5
            else:
                raise SampleError(f"input {name!r}: cannot make random {dtype} data")
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
        with loaded as npz:
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


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    if ref.shape != got.shape:
        return math.inf, math.inf
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(g - r)
    both_nan = np.isnan(r) & np.isnan(g)
    same_inf = np.isinf(r) & (r == g)
    diff = np.where(both_nan | same_inf, 0.0, diff)
    diff = np.where(np.isnan(diff), math.inf, diff)
    if diff.size == 0:
        return 0.0, 0.0
    finite_ref = np.abs(r[np.isfinite(r)])
    peak = float(finite_ref.max()) if finite_ref.size else 0.0
    floor = max(1e-3 * peak, 1e-12)
    rel = diff / np.maximum(np.abs(np.nan_to_num(r)), floor)
    return float(diff.max()), float(rel.max())


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
    :meth:`verify` call. ``samples=None`` draws ``n_samples`` seeded random samples; given
    samples are validated against the model's inputs. Raises :class:`RuntimeCheckError` (or
    :class:`UnsupportedOperator`) when the *full* model cannot run: nothing could be compared.
    """

    def __init__(
        self,
        full: ModelProto,
        samples: Sequence[Mapping[str, np.ndarray]] | None = None,
        *,
        seed: int = 0,
        n_samples: int = 2,
        batch: int = 1,
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
        if samples is None:
            self.samples = random_samples(specs, n_samples, seed=seed, batch=batch)
        else:
            self.samples = validate_samples(samples, specs)
        session = _Session(full, "full model", intra_op_threads)
        self.output_names = list(session.outputs)
        self.references = [session.run(s) for s in self.samples]

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
        except RuntimeCheckError as exc:
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
            raise RuntimeCheckError(f"{tail.what} does not produce outputs {missing}")
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
            worst_abs = worst_rel = 0.0
            ok = True
            for ref, got in zip(self.references, outs, strict=True):
                a = ref[out]
                b = np.asarray(got.get(out)) if out in got else None
                if b is None:
                    worst_abs = worst_rel = math.inf
                    ok = False
                    continue
                err_abs, err_rel = _errors(a, b)
                worst_abs, worst_rel = max(worst_abs, err_abs), max(worst_rel, err_rel)
                ok = ok and tol.allows(a, b)
            per_output[out] = OutputError(worst_abs, worst_rel, ok)
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
    raw_tolerance: Tolerance = RAW_TOLERANCE,
    encoding_tolerances: Mapping[str, Tolerance] | None = None,
    encodings: Sequence[str] = ENCODINGS,
    intra_op_threads: int = 1,
    cut_id: int | None = None,
) -> CutVerification:
    """Verify one cut. For many cuts of one model build a :class:`Verifier` once instead."""
    verifier = Verifier(
        full, samples, seed=seed, n_samples=n_samples, batch=batch, raw_tolerance=raw_tolerance,
        encoding_tolerances=encoding_tolerances, encodings=encodings,
        intra_op_threads=intra_op_threads,
    )
    return verifier.verify(head, tail, cut_id=cut_id)
