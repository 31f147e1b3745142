"""ONNX Runtime ahead-of-time lowering: save the graph ONNX Runtime would optimize at load time.

``OrtOptimizedFromOnnx(src, dst, level)`` is a Polygraphy-style step: constructing it does
nothing; calling it creates a CPU session with ``graph_optimization_level`` set and
``SessionOptions.optimized_model_filepath`` pointing at a temporary file, then moves the result
to ``dst`` atomically and returns ``dst``. Load the result with
``OnnxRuntimeBackend(dst, optimized=True)`` (graph optimizations disabled: already done).

Levels and portability (ONNX Runtime "Graph Optimizations" documentation):
- ``basic``: semantics-preserving rewrites (constant folding, redundant node elimination, fusions
  such as Conv+BatchNorm) that run before graph partitioning and apply to every execution
  provider; the result is a valid, portable ONNX graph.
- ``extended`` (default): adds complex fusions (GELU, LayerNorm, attention, Conv+activation as
  ``com.microsoft`` ops) for the CPU/CUDA providers; loads in any ONNX Runtime with the CPU
  provider, not in other ONNX consumers (TensorRT's parser, onnx.checker with strict domains).
- ``all``: adds layout optimizations (e.g. NCHWc) chosen for the CPU the model is optimized on;
  the docs warn that an offline-optimized model should be run with the same options and on
  hardware compatible with the machine that saved it (paraphrased from memory of the ORT "Graph
  Optimizations" page, not re-read; Hugging Face Optimum's maintainers say the same: above level
  1 "the optimized graph might be hardware dependent", huggingface/optimum#137). Use it only
  when the build host is the target (or of the same CPU kind).
Parts for TensorRT targets are not lowered here: TensorRT parses the plain ONNX part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tandem.compiler._graph import external_data_files
from tandem.devices.backends.onnxruntime import map_ort_errors, session_options
from tandem.protocol.errors import InternalError, InvalidArgument, NotFound
from tandem.protocol.lazy import require

__all__ = ["LEVELS", "OrtOptimizedFromOnnx"]

LEVELS = {
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class OrtOptimizedFromOnnx:
    """Callable step: write the ONNX Runtime-optimized form of ``src_path`` to ``dst_path``."""

    def __init__(self, src_path: str | os.PathLike, dst_path: str | os.PathLike,
                 level: str = "extended") -> None:
        if level not in LEVELS:
            raise InvalidArgument(f"level must be one of {sorted(LEVELS)}, not {level!r}")
        self.src_path = Path(src_path)
        self.dst_path = Path(dst_path)
        self.level = level

    def __call__(self) -> Path:
        ort = require("onnxruntime", "cpu")
        if not self.src_path.is_file():
            raise NotFound(f"no ONNX model at {self.src_path}")
        self.dst_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.dst_path.stem}.", suffix=".onnx",
                                   dir=self.dst_path.parent)
        os.close(fd)
        try:
            so = session_options()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[self.level])
            so.optimized_model_filepath = tmp
            if external_data_files(self.src_path):
                # keep big weights out of the protobuf (2 GiB cap): <dst name>.data beside it
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name",
                    self.dst_path.name + ".data")
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            with map_ort_errors(f"optimizing {self.src_path.name}"):
                ort.InferenceSession(str(self.src_path), so, providers=["CPUExecutionProvider"])
            if not Path(tmp).stat().st_size:
                raise InternalError(f"ONNX Runtime wrote no optimized model for "
                                    f"{self.src_path.name}")
            os.replace(tmp, self.dst_path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return self.dst_path

    def __repr__(self) -> str:
        return f"OrtOptimizedFromOnnx({str(self.src_path)!r}, {str(self.dst_path)!r}, " \
            f"level={self.level!r})"
