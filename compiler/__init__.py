"""ONNX in, verified split bundle out: analysis, cuts, extraction, verification, lowering.

Compose the steps yourself or run them all with :class:`BundleFromOnnx`::

    from compiler import BundleFromOnnx, CompileOptions
    result = BundleFromOnnx("model.onnx", "bundle/", CompileOptions(targets=("onnxruntime",)))()

onnx and onnxruntime load when a step runs (install extra ``cpu``); TensorRT when an engine is
built (extra ``tensorrt``).
"""

from compiler._cuts import Cut, find_cuts
from compiler._errors import (
    CompileError,
    ModelLoadError,
    RuntimeCheckError,
    UnsupportedOperator,
)
from compiler._extract import extract
from compiler._graph import GraphInfo, NodeInfo, TensorSpec, analyze, load_model
from compiler._ort import OrtOptimizedFromOnnx
from compiler._pipeline import BundleFromOnnx, CompileOptions, CompileResult, NoValidCut
from compiler._tensorrt import EngineCache, EngineFromOnnx, EngineKey, UnsupportedModel
from compiler._verify import CutVerification, Tolerance, Verifier, load_samples, verify

__all__ = [
    "BundleFromOnnx",
    "CompileError",
    "CompileOptions",
    "CompileResult",
    "Cut",
    "CutVerification",
    "EngineCache",
    "EngineFromOnnx",
    "EngineKey",
    "GraphInfo",
    "ModelLoadError",
    "NoValidCut",
    "NodeInfo",
    "OrtOptimizedFromOnnx",
    "RuntimeCheckError",
    "TensorSpec",
    "Tolerance",
    "UnsupportedModel",
    "UnsupportedOperator",
    "Verifier",
    "analyze",
    "extract",
    "find_cuts",
    "load_model",
    "load_samples",
    "verify",
]
