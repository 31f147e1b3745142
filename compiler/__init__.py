"""ONNX in, verified split bundle out: analysis, cuts, extraction, verification, lowering.

Compose the steps yourself or run them all with :class:`BundleFromOnnx`::

    from tandem.compiler import BundleFromOnnx, CompileOptions
    result = BundleFromOnnx("model.onnx", "bundle/", CompileOptions(targets=("onnxruntime",)))()

onnx and onnxruntime load when a step runs (install extra ``cpu``); TensorRT when an engine is
built (extra ``tensorrt``).
"""

from tandem.compiler._cascade import (
    CascadeBundleFromOnnx,
    CascadeOptions,
    RowOutcomes,
    calibrate,
    check_pair,
    check_scorer,
)
from tandem.compiler._cuts import Cut, find_cuts
from tandem.compiler._errors import (
    CascadeError,
    CompileError,
    CompileWarning,
    InputShapeError,
    ModelLoadError,
    NoValidCut,
    OnnxRuntimeError,
    SampleError,
    UnsupportedOperator,
)
from tandem.compiler._extract import extract
from tandem.compiler._graph import GraphInfo, GraphTensor, NodeInfo, analyze, load_model
from tandem.compiler._ort import OrtOptimizedFromOnnx
from tandem.compiler._pipeline import BundleFromOnnx, CompileOptions, CompileResult
from tandem.compiler._tensorrt import EngineCache, EngineFromOnnx, EngineKey, UnsupportedModel
from tandem.compiler._verify import CutVerification, Tolerance, Verifier, load_samples, verify

__all__ = [
    "BundleFromOnnx",
    "CascadeBundleFromOnnx",
    "CascadeError",
    "CascadeOptions",
    "CompileError",
    "CompileOptions",
    "CompileResult",
    "CompileWarning",
    "Cut",
    "CutVerification",
    "EngineCache",
    "EngineFromOnnx",
    "EngineKey",
    "GraphInfo",
    "GraphTensor",
    "InputShapeError",
    "ModelLoadError",
    "NoValidCut",
    "NodeInfo",
    "OnnxRuntimeError",
    "OrtOptimizedFromOnnx",
    "RowOutcomes",
    "SampleError",
    "Tolerance",
    "UnsupportedModel",
    "UnsupportedOperator",
    "Verifier",
    "analyze",
    "calibrate",
    "check_pair",
    "check_scorer",
    "extract",
    "find_cuts",
    "load_model",
    "load_samples",
    "verify",
]
