"""ONNX Runtime backend: CPU by default, CUDA/TensorRT execution providers when present and asked.

``optimized=True`` says the model was optimized ahead of time (``compiler``'s
``OrtOptimizedFromOnnx``), so the session is created with graph optimizations disabled
(``ORT_DISABLE_ALL``) instead of optimizing it again at every start.

ONNX Runtime exceptions are translated here, and only here, into Tandem errors (chained):
:func:`map_ort_errors` is the one boundary, used by this backend and by the compiler (lowering,
verification). Translation::

    ONNX Runtime raises                               Tandem raises
    NoSuchFile                                        NotFound
    NotImplemented, "Could not find an implementation",
      "not a registered function/op"                  UnsupportedOperator (FailedPrecondition)
    InvalidArgument, InvalidGraph, InvalidProtobuf,
      the wrapper's ValueError (missing feeds, ...)   InvalidArgument
    anything else (Fail, RuntimeException, EPFail...) OnnxRuntimeError   (FailedPrecondition)

Messages keep the first line of ONNX Runtime's text without its ``[ONNXRuntimeError] : N :``
prefix. Sessions made by :func:`session_options` log nothing below FATAL, so a failure reaches
the user once, as the translated error, and never as ONNX Runtime's coloured log line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tandem.devices.backends._base import Backend, TensorMeta
from tandem.protocol.dtypes import UnsupportedDType, by_ort
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TandemError,
)
from tandem.protocol.lazy import require

__all__ = [
    "OnnxRuntimeBackend",
    "OnnxRuntimeError",
    "UnsupportedOperator",
    "map_ort_errors",
    "quiet_run_options",
    "session_options",
]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


class OnnxRuntimeError(FailedPrecondition):
    """ONNX Runtime could not load or run a model: neither the caller's arguments nor a bug of
    Tandem (a kernel failed, an execution provider gave up, ...)."""


class UnsupportedOperator(OnnxRuntimeError):
    """ONNX Runtime has no implementation for an operator (or opset, or type) the model uses."""


_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_UNSUPPORTED = ("Could not find an implementation", "not a registered function/op")
_INVALID = ("InvalidArgument", "InvalidGraph", "InvalidProtobuf", "ModelLoadCanceled")


def _is_ort_exception(exc: BaseException) -> bool:
    # pybind classes live in onnxruntime.capi.onnxruntime_pybind11_state; the Python wrapper
    # itself raises ValueError / RuntimeError (missing feeds, bad provider options, ...)
    module = type(exc).__module__ or ""
    return module.startswith("onnxruntime") or isinstance(exc, (ValueError, RuntimeError))


def ort_error(exc: BaseException, what: str) -> TandemError:
    """The Tandem error for an exception ONNX Runtime raised while doing ``what``."""
    kind = type(exc).__name__
    text = str(exc).strip()
    line = _PREFIX.sub("", text.splitlines()[0]) if text else kind
    message = f"{what}: ONNX Runtime: {line}"
    if kind in ("NoSuchFile", "NotFound"):
        return NotFound(message)
    if kind == "NotImplemented" or any(s in text for s in _UNSUPPORTED):
        return UnsupportedOperator(message)
    if kind in _INVALID or isinstance(exc, ValueError):
        return InvalidArgument(message)
    return OnnxRuntimeError(message)


@contextmanager
def map_ort_errors(what: str) -> Iterator[None]:
    """The one ONNX Runtime boundary: inside the block, whatever ONNX Runtime raises leaves as a
    Tandem error (see the module docstring), chained to the original with ``from``::

        with map_ort_errors("head of cut 3"):
            session.run(None, feeds)

    Tandem errors and exceptions that are not ONNX Runtime's pass through unchanged.
    """
    try:
        yield
    except TandemError:
        raise
    except Exception as exc:
        if not _is_ort_exception(exc):
            raise
        raise ort_error(exc, what) from exc


def session_options(*, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    quiet: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` with thread counts set and, when ``quiet``, ONNX Runtime's
    own logging limited to FATAL (its errors reach the caller through :func:`map_ort_errors`)."""
    ort = require("onnxruntime", "cpu")
    so = ort.SessionOptions()
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        so.inter_op_num_threads = inter_op_threads
    if quiet:
        so.log_severity_level = 4
    return so


def quiet_run_options() -> Any:
    """``onnxruntime.RunOptions`` that keep a failing run from logging its own error line."""
    ort = require("onnxruntime", "cpu")
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    return ro


class OnnxRuntimeBackend(Backend):
    """Run an ONNX model (path or serialized bytes) with ONNX Runtime."""

    def __init__(
        self,
        path_or_bytes: str | os.PathLike | bytes,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        intra_op_threads: int | None = None,
        optimized: bool = False,
        *,
        name: str | None = None,
    ) -> None:
        if not isinstance(path_or_bytes, (str, os.PathLike, bytes, bytearray)):
            raise InvalidArgument("OnnxRuntimeBackend needs a model path or serialized bytes")
        if intra_op_threads is not None and intra_op_threads < 0:
            raise InvalidArgument("intra_op_threads must be >= 0")
        super().__init__(name or f"OnnxRuntimeBackend({_describe(path_or_bytes)})")
        self._model = path_or_bytes
        self._requested = list(providers) if providers else [CPU]
        self._threads = intra_op_threads
        self.optimized = optimized
        self._sess: Any = None  # an ort.InferenceSession, created by activate(), never before
        self._run_options: Any = None
        self._out_names: list[str] = []
        self.providers: list[str] = []  # the providers the live session uses

    def _resolve_providers(self, ort) -> list:
        available = set(ort.get_available_providers())
        chosen: list = []
        skipped: list = []
        for p in self._requested:
            pname = p[0] if isinstance(p, tuple) else p
            (chosen if pname in available else skipped).append(p)
        if skipped:
            log.warning("%s: execution providers not available here, skipped: %s (available: %s)",
                        self.name, skipped, sorted(available))
        if not any((p[0] if isinstance(p, tuple) else p) == CPU for p in chosen):
            chosen.append(CPU)  # every node can fall back to the CPU
        return chosen

    def _activate_impl(self) -> None:
        ort = require("onnxruntime", "cpu")
        so = session_options(intra_op_threads=self._threads, quiet=False)
        if self.optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        model = self._model
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if isinstance(model, str) and not Path(model).is_file():
            raise NotFound(f"{self.name}: no model file at {model}")
        if isinstance(model, bytearray):
            model = bytes(model)
        with map_ort_errors(f"{self.name}: cannot load the model"):
            self._sess = ort.InferenceSession(model, so, providers=self._resolve_providers(ort))
        self._run_options = quiet_run_options()
        self.providers = self._sess.get_providers()
        self._out_names = [o.name for o in self._sess.get_outputs()]

    def _io_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        def meta(arg) -> TensorMeta:
            try:  # ONNX Runtime's type string -> numpy, from the one dtype table
                dtype = by_ort(arg.type).numpy
            except UnsupportedDType:
                dtype = None
            if dtype is None:
                raise FailedPrecondition(f"{self.name}: tensor {arg.name!r} has type {arg.type}, "
                                         "which Tandem backends do not carry")
            shape = tuple(d if isinstance(d, (int, str)) or d is None else None
                          for d in (arg.shape or ()))
            return TensorMeta(arg.name, np.dtype(dtype), shape)

        return ([meta(a) for a in self._sess.get_inputs()],
                [meta(a) for a in self._sess.get_outputs()])

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with map_ort_errors(f"{self.name}: inference failed"):
            values = self._sess.run(self._out_names, feeds, self._run_options)
        return dict(zip(self._out_names, values, strict=True))

    def _deactivate_impl(self) -> None:
        self._sess = None
        self._out_names = []
        self.providers = []


def _describe(model: object) -> str:
    if isinstance(model, (bytes, bytearray)):
        return f"<{len(model)} bytes>"
    return Path(os.fspath(model)).name  # type: ignore[call-overload]
