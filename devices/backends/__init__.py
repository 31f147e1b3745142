"""Execution backends behind one contract: ONNX Runtime (CPU, optionally CUDA/TensorRT EPs) and
TensorRT + pycuda. Backend modules import their heavy libraries only when activated."""

from tandem.devices.backends._base import Backend, TensorMeta

__all__ = ["Backend", "OnnxRuntimeBackend", "TensorMeta", "TensorRTBackend"]


def __getattr__(name: str):  # lazy: importing the package must not import a backend module
    if name == "OnnxRuntimeBackend":
        from tandem.devices.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "TensorRTBackend":
        from tandem.devices.backends.tensorrt import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(name)
