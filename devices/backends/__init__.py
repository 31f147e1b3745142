"""Execution backends behind one contract: ONNX Runtime (CPU, optionally CUDA/TensorRT EPs) and
TensorRT + pycuda. Backend modules import their heavy libraries only when activated."""

from devices.backends._base import Backend, TensorMeta

__all__ = ["Backend", "OnnxRuntimeBackend", "TensorMeta", "TensorRTBackend"]


def __getattr__(name: str):  # lazy: importing the package must not import a backend module
    if name == "OnnxRuntimeBackend":
        from devices.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "TensorRTBackend":
        from devices.backends.tensorrt import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(name)
