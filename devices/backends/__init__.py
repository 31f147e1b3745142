"""Execution backends behind one contract: ONNX Runtime (CPU, optionally CUDA/TensorRT EPs) and
TensorRT + pycuda; :class:`SwitchableBackend` serves a part while another backend for it is
prepared (a TensorRT engine built in the background). Backend modules import their heavy
libraries only when activated."""

from tandem.devices.backends._base import Backend, TensorMeta

__all__ = [
    "Backend",
    "OnnxRuntimeBackend",
    "OnnxRuntimeError",
    "SwitchableBackend",
    "TensorMeta",
    "TensorRTBackend",
    "UnsupportedOperator",
    "map_ort_errors",
]

_ORT_NAMES = frozenset({"OnnxRuntimeBackend", "OnnxRuntimeError", "UnsupportedOperator",
                        "map_ort_errors"})


def __getattr__(name: str):  # lazy: importing the package must not import a backend module
    if name in _ORT_NAMES:  # the ONNX Runtime backend and its one error boundary
        from tandem.devices.backends import onnxruntime

        return getattr(onnxruntime, name)
    if name == "SwitchableBackend":
        from tandem.devices.backends.switchable import SwitchableBackend

        return SwitchableBackend
    if name == "TensorRTBackend":
        from tandem.devices.backends.tensorrt import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(name)
