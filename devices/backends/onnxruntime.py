"""ONNX Runtime backend: CPU by default, CUDA/TensorRT execution providers when present and asked.

``optimized=True`` says the model was optimized ahead of time (``compiler``'s
``OrtOptimizedFromOnnx``), so the session is created with graph optimizations disabled
(``ORT_DISABLE_ALL``) instead of optimizing it again at every start.

ONNX Runtime exceptions are translated here, and only here, into Tandem errors (chained).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tandem.devices.backends._base import Backend, TensorMeta
from tandem.protocol.dtypes import UnsupportedDType, by_ort
from tandem.protocol.errors import FailedPrecondition, InternalError, InvalidArgument, NotFound
from tandem.protocol.lazy import require

__all__ = ["OnnxRuntimeBackend"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"

def _translate(exc: Exception, what: str) -> Exception:
    """The one boundary for ONNX Runtime errors: map its exception classes to ours."""
    kind = type(exc).__name__  # onnxruntime.capi.onnxruntime_pybind11_state.<Kind>
    msg = f"{what}: {kind}: {exc}"
    if kind in ("NoSuchFile", "NotFound"):
        return NotFound(msg)
    if kind in ("InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented"):
        return InvalidArgument(msg)  # a model or input ONNX Runtime rejects
    return InternalError(msg)  # Fail, EPFail, RuntimeException, ...: not the caller's mistake


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
        self._sess = None  # created by activate(), never before
        self._out_names: list[str] = []
        self.providers: list[str] = []  # the providers the live session uses

    def _resolve_providers(self, ort) -> list:
        available = set(ort.get_available_providers())
        chosen, skipped = [], []
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
        so = ort.SessionOptions()
        if self.optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self._threads is not None:
            so.intra_op_num_threads = self._threads
        model = self._model
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if isinstance(model, str) and not Path(model).is_file():
            raise NotFound(f"{self.name}: no model file at {model}")
        if isinstance(model, bytearray):
            model = bytes(model)
        try:
            self._sess = ort.InferenceSession(model, so, providers=self._resolve_providers(ort))
        except Exception as exc:
            raise _translate(exc, f"{self.name}: cannot load the model") from exc
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
        try:
            values = self._sess.run(self._out_names, feeds)
        except Exception as exc:
            raise _translate(exc, f"{self.name}: inference failed") from exc
        return dict(zip(self._out_names, values, strict=True))

    def _deactivate_impl(self) -> None:
        self._sess = None
        self._out_names = []
        self.providers = []


def _describe(model: object) -> str:
    if isinstance(model, (bytes, bytearray)):
        return f"<{len(model)} bytes>"
    return Path(os.fspath(model)).name  # type: ignore[arg-type]
