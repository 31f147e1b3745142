"""A faithful fake of the part of the ``tensorrt`` Python API Tandem uses (TensorRT 10.3 names).

Sources checked (NVIDIA/TensorRT ``release/10.3``, and ``release/10.13`` / ``release/11.0`` for
version changes): ``include/NvInferRuntime.h``, ``include/NvInfer.h``,
``python/src/infer/pyCore.cpp``, ``pyInt8.cpp``, ``pyFoundationalTypes.cpp``,
``python/docstrings/infer/pyCoreDoc.h``, ``python/packaging/bindings_wheel/tensorrt/__init__.py``,
``samples/python/common_runtime.py``; Polygraphy ``backend/trt/runner.py``, ``loader.py``,
``calibrator.py``; NVIDIA's "DLA Supported Layers and Restrictions" page.

Builder side: ``Logger``/``ILogger`` (+ ``Severity``), ``Builder`` (``create_network``,
``create_builder_config``, ``create_optimization_profile``, ``build_serialized_network``,
``num_DLA_cores``), ``OnnxParser`` (``parse``, ``parse_from_file``, ``num_errors``, ``get_error``,
``set_flag``), ``INetworkDefinition`` (inputs with ``is_shape_tensor``, outputs, layers with
``LayerType``), ``IBuilderConfig`` (flags, memory pools, ``default_device_type``, ``DLA_core``,
``int8_calibrator``, ``add_optimization_profile``, ``set_calibration_profile``, timing caches),
``IOptimizationProfile`` (``set_shape``/``get_shape``, ``set_shape_input``/``get_shape_input``),
``ITimingCache`` (``serialize``, ``combine``, ``reset``), ``IHostMemory``,
``IInt8EntropyCalibrator2``; the enums Tandem touches; ``nptype``; ``DataType.itemsize``.

Runtime side: ``Runtime`` (``deserialize_cuda_engine``, ``DLA_core``,
``engine_host_code_allowed``), ``ICudaEngine`` (name-based I/O, ``is_shape_inference_io``,
``get_tensor_location``, ``get_tensor_profile_shape``), ``IExecutionContext``
(``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``, ``set_output_allocator``,
``execute_async_v3`` queued on the fake pycuda stream), ``IOutputAllocator``.

Behaviour kept from the real library, each with its source:

- Failures are return values (None / False) with messages on the logger, not exceptions, except
  where the binding raises: ``IOptimizationProfile.set_shape`` raises ``RuntimeError("Shape
  provided for min|opt|max is inconsistent with other shapes.")`` when ``setDimensions`` refuses
  (``pyCore.cpp`` ``opt_profile_set_shape``).
- ``IHostMemory`` has the buffer protocol, ``nbytes`` and ``dtype``, and **no** ``__len__`` or
  ``__bytes__`` (``pyFoundationalTypes.cpp``: ``py::buffer_protocol()`` + ``def_buffer``):
  ``bytes(mem)`` and ``memoryview(mem)`` work, ``len(mem)`` raises TypeError.
- ``nptype`` raises TypeError for BF16, FP8 and INT4 (``tensorrt/__init__.py``: "fp8 and bfloat16
  have no equivalent numpy type"); ``DataType.itemsize`` is 2 for BF16, 1 for FP8, 0.5 for INT4.
- Shape tensors: a network input whose *values* decide a shape (here: an int32/int64 input of
  rank <= 1 consumed as the shape operand of Reshape, Expand, ConstantOfShape, Tile, Slice, Range,
  Pad, TopK, Resize, Squeeze, Unsqueeze) has ``is_shape_tensor``, ``is_shape_inference_io(name)``
  and ``get_tensor_location(name) == TensorLocation.HOST``; its address must be host memory
  (``NvInferRuntime.h`` ``setTensorAddress``: "If the TensorLocation of the tensor is kHOST, the
  pointer must point to a host buffer"; Polygraphy ``runner.py`` passes a host pointer). The
  builder needs its values in the profile (``set_shape_input``). Output shapes are computed from
  those host values; until the address is set they are -1 (``getTensorShape`` doc).
- Data-dependent output shapes (here: outputs downstream of NonZero, NonMaxSuppression or
  Compress): ``IExecutionContext.get_tensor_shape`` returns -1 for those dims even after every
  input shape is set (``getTensorShape`` doc); ``execute_async_v3`` needs an ``IOutputAllocator``
  for them (``setTensorAddress`` doc: "each output must have a non-null address or an
  IOutputAllocator"). The allocator is called during ``execute_async_v3`` as
  ``reallocate_output_async(name, current, size, alignment, stream)`` (falling back to
  ``reallocate_output`` when not overridden) with ``size`` >= 1, then ``notify_shape``; an
  exception in either is printed and swallowed, and a swallowed ``reallocate`` means nullptr, so
  the execution fails (``pyCore.cpp`` ``PyOutputAllocator``).
- INT8 calibration: the ``get_batch`` trampoline catches any exception, prints ``[ERROR] Exception
  caught in get_batch(): ...`` and returns "no more batches" (``pyInt8.cpp``
  ``pyCalibratorTrampoline::getBatch``). Non-index inputs are read as float32 whatever the
  network's dtype (Polygraphy ``calibrator.py``: "TensorRT requires non-index calibration inputs
  to be provided in float32"); index inputs (INT32, INT64, BOOL) in their own type.
- Deprecations from TensorRT 10.1: the ``int8_calibrator`` getter and setter and
  ``set_calibration_profile`` / ``get_calibration_profile`` warn with ``DeprecationWarning("Use
  Deprecated in TensorRT 10.1. Superseded by explicit quantization. instead.")`` (``pyCore.cpp``
  ``utils::deprecateMember``; ``python/src/utils.cpp`` ``issueDeprecationWarning``).
  :func:`emulate_tensorrt_11` removes what 11.0 removed: ``BuilderFlag.FP16/INT8/BF16/FP8``,
  the calibrator classes, ``int8_calibrator`` and the calibration profile (``release/11.0``
  ``pyCore.cpp``: no ``pyInt8.cpp``; networks are always strongly typed).
- Timing caches carry a header (TensorRT version, device name, compute capability):
  ``set_timing_cache(cache, ignore_mismatch=False)`` returns False and logs an error for a cache
  from another device ("A failure will be reported if the CUDA device property in the provided
  cache is different", ``pyCoreDoc.h``); ``combine`` returns False for another TensorRT version,
  and for another device unless ``ignore_mismatch``.
- The builder works on the CUDA context current when ``trt.Builder`` is created, else the
  primary context of device 0 (the CUDA runtime's default device); ``BUILDS`` records it.
- DLA: "DLA does not support dynamic dimensions, so the profile's min, max, and opt values must
  be equal" (NVIDIA, DLA Supported Layers and Restrictions). With a dynamic profile and
  ``GPU_FALLBACK`` every layer quietly runs on the GPU (``BUILDS[-1]["dla_layers"] == 0``, a
  warning is logged); without ``GPU_FALLBACK`` the build fails.
- Deserialization checks the device: another compute capability is an error ("The engine plan
  file is generated on an incompatible device, expecting compute X got compute Y, please
  rebuild.", TensorRT troubleshooting guide); another device model of the same compute capability
  only warns "Using an engine plan file across different models of devices is not recommended and
  is likely to affect performance or even cause errors." (log in ``quickstart/
  SemanticSegmentation/tutorial-runtime.ipynb``). Another TensorRT version is an error.

Differences from the real library (where the fake is stricter, looser or simpler):

- The "engine" embeds the ONNX model and runs it with ONNX Runtime on the CPU, reading and writing
  fake device memory; there are no layers, tactics, fusions or precisions (FP16/INT8 builds give
  FP32 numbers). Layer types and the shape-tensor / data-dependent-shape analysis come from a
  fixed op table, not from TensorRT's importer.
- The DLA core an engine was built for is **not** checked on deserialization: NVIDIA documents
  setting ``IRuntime::setDLACore`` before deserializing but not what happens otherwise
  (unverified), so the fake only records ``Runtime.DLA_core`` in ``LOADS``.
- ``set_input_shape`` checks the profile bounds; shape-tensor values outside the profile make
  ``execute_async_v3`` fail (the real one reports it somewhere between ``set_tensor_address`` and
  ``execute_async_v3``; the exact place is not documented).
- ``ICudaEngine.get_tensor_profile_values`` keeps the binding's trap: its keywords are named
  ``name, profile_index`` but the positions are ``(profile_index, name)`` (``pyCore.cpp``: the
  lambda takes ``int32_t profileIndex, std::string tensorName``; the same in 10.0 to 11.0), so
  only a positional call ``(0, "s")`` works.
- Not implemented: ``infer_shapes``, ``get_max_output_size``, vectorized formats, multiple
  profiles at runtime, refit, plugins. FP8 and INT4 I/O tensors parse but cannot run; BF16 I/O
  runs (as uint16 bit patterns), with dynamic output shapes resolved only without BF16 I/O.
- A host pointer given for a shape tensor is read with ``ctypes`` (it must be real host memory);
  a fake device address there is refused with an error (the real one would read garbage).

Test hooks (not TensorRT API): ``BUILDS`` (a snapshot of each build), ``LOADS`` (each
deserialization), ``BUILD_HOOK`` (called in the middle of ``build_serialized_network``),
``FAKE_NUM_DLA_CORES``, ``UNSUPPORTED_OPS``, ``reset()``, ``install()``,
``emulate_tensorrt_11()``, ``check_clean()``.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests._support import fake_pycuda

__version__ = "10.3.0.26"

MAGIC = b"FAKETRT-ENGINE\x00"
CACHE_MAGIC = b"FAKETRT-TIMING\x00"
UNSUPPORTED_OPS = {"Unique", "StringNormalizer", "TfIdfVectorizer"}
DDS_OPS = {"NonZero", "NonMaxSuppression", "Compress"}  # data-dependent output shapes
SHAPE_OPERANDS = {  # op -> input positions whose values are shapes (shape tensors in TensorRT)
    "Reshape": {1}, "Expand": {1}, "ConstantOfShape": {0}, "Tile": {1}, "Slice": {1, 2, 3, 4},
    "Range": {0, 1, 2}, "Pad": {1}, "TopK": {1}, "Resize": {2, 3}, "Squeeze": {1},
    "Unsqueeze": {1},
}
NOT_PORTABLE = ("Using an engine plan file across different models of devices is not recommended "
                "and is likely to affect performance or even cause errors.")
DEPRECATED_10_1 = "Use Deprecated in TensorRT 10.1. Superseded by explicit quantization. instead."
FAKE_NUM_DLA_CORES = 0
BUILDS: list[dict] = []
LOADS: list[dict] = []
BUILD_HOOK: Callable[[], None] | None = None


def reset() -> None:
    global FAKE_NUM_DLA_CORES, BUILD_HOOK
    FAKE_NUM_DLA_CORES = 0
    BUILD_HOOK = None
    BUILDS.clear()
    LOADS.clear()


def _version() -> tuple[int, int]:
    major, minor = str(__version__).split(".")[:2]
    return int(major), int(minor)


def _deprecated_10_1() -> None:
    if _version() >= (10, 1):
        warnings.warn(DEPRECATED_10_1, DeprecationWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ enums
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9

    @property
    def itemsize(self) -> float:
        return _ITEMSIZE[self]


_ITEMSIZE = {DataType.FLOAT: 4, DataType.HALF: 2, DataType.BF16: 2, DataType.INT8: 1,
             DataType.INT32: 4, DataType.INT64: 8, DataType.BOOL: 1, DataType.UINT8: 1,
             DataType.FP8: 1, DataType.INT4: 0.5}
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
       DataType.INT64: np.int64}
_INDEX_TYPES = {DataType.INT32, DataType.INT64, DataType.BOOL}


def nptype(trt_type: DataType):
    try:
        return _NP[DataType(trt_type)]
    except KeyError:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy "
                        "datatype.") from None


def _storage(dtype: DataType) -> np.dtype:
    """How the fake engine holds a tensor of ``dtype`` (bit patterns for BF16)."""
    if dtype == DataType.BF16:
        return np.dtype(np.uint16)
    if dtype in (DataType.FP8, DataType.INT4):
        raise fake_pycuda.LaunchError(f"the fake TensorRT cannot execute {dtype.name} I/O")
    return np.dtype(nptype(dtype))


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10
    DIRECT_IO = 11
    REJECT_EMPTY_ALGORITHMS = 12
    VERSION_COMPATIBLE = 13
    EXCLUDE_LEAN_RUNTIME = 14
    FP8 = 15
    ERROR_ON_TIMING_CACHE_MISS = 16
    BF16 = 17
    DISABLE_COMPILATION_CACHE = 18
    STRIP_PLAN = 19
    REFIT_IDENTICAL = 20
    WEIGHT_STREAMING = 21


# ``BuilderFlag`` as TensorRT 11.0 has it: no precision flags (``release/11.0`` pyCore.cpp).
BuilderFlag11 = enum.IntEnum("BuilderFlag", {
    name: value for name, value in BuilderFlag.__members__.items()
    if name not in {"FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "REJECT_EMPTY_ALGORITHMS"}})


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10 (always explicit)
    STRONGLY_TYPED = 1


class OnnxParserFlag(enum.IntEnum):
    NATIVE_INSTANCENORM = 0


class ErrorCode(enum.IntEnum):
    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8


class LayerType(enum.IntEnum):
    CONVOLUTION = 0
    ACTIVATION = 2
    POOLING = 3
    SCALE = 5
    SOFTMAX = 6
    CONCATENATION = 8
    ELEMENTWISE = 10
    MATRIX_MULTIPLY = 17
    SHUFFLE = 21
    REDUCE = 25
    IDENTITY = 27
    QUANTIZE = 33
    DEQUANTIZE = 34
    PLUGIN_V3 = 47


_LAYER_FOR_OP = {
    "Conv": LayerType.CONVOLUTION, "Relu": LayerType.ACTIVATION, "Sigmoid": LayerType.ACTIVATION,
    "MaxPool": LayerType.POOLING, "AveragePool": LayerType.POOLING,
    "GlobalAveragePool": LayerType.REDUCE, "Softmax": LayerType.SOFTMAX,
    "Concat": LayerType.CONCATENATION, "Add": LayerType.ELEMENTWISE,
    "Mul": LayerType.ELEMENTWISE, "Sub": LayerType.ELEMENTWISE, "MatMul":
    LayerType.MATRIX_MULTIPLY, "Gemm": LayerType.MATRIX_MULTIPLY, "Reshape": LayerType.SHUFFLE,
    "Flatten": LayerType.SHUFFLE, "Transpose": LayerType.SHUFFLE, "Identity": LayerType.IDENTITY,
    "QuantizeLinear": LayerType.QUANTIZE, "DequantizeLinear": LayerType.DEQUANTIZE,
}


class CalibrationAlgoType(enum.IntEnum):
    LEGACY_CALIBRATION = 0
    ENTROPY_CALIBRATION = 1
    ENTROPY_CALIBRATION_2 = 2
    MINMAX_CALIBRATION = 3


class ProfilingVerbosity(enum.IntEnum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


# ------------------------------------------------------------------------------------ logging
class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity, msg) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Logger(ILogger):
    INTERNAL_ERROR = ILogger.Severity.INTERNAL_ERROR
    ERROR = ILogger.Severity.ERROR
    WARNING = ILogger.Severity.WARNING
    INFO = ILogger.Severity.INFO
    VERBOSE = ILogger.Severity.VERBOSE

    def __init__(self, min_severity=ILogger.Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity
        self.messages: list[tuple[ILogger.Severity, str]] = []

    def log(self, severity, msg) -> None:
        if severity <= self.min_severity:
            self.messages.append((severity, msg))


def _log(logger: ILogger, severity, msg: str) -> None:
    try:  # the real PyLogger trampoline prints and swallows exceptions from log()
        logger.log(severity, msg)
    except Exception as exc:
        print(f"[ERROR] Exception caught in log(): {exc}", file=sys.stderr)


# ------------------------------------------------------------------------------------ memory
class IHostMemory(ctypes.Structure):
    """Serialized data: the buffer protocol, ``nbytes`` and ``dtype``; no ``len()``."""

    @property
    def nbytes(self) -> int:
        return ctypes.sizeof(self)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8


def _host_memory(data: bytes) -> IHostMemory:
    cls = type("IHostMemory", (IHostMemory,), {"_fields_": [("_raw", ctypes.c_ubyte * len(data))]})
    mem = cls()
    ctypes.memmove(ctypes.addressof(mem), bytes(data), len(data))
    return mem


def _as_bytes(buf) -> bytes:
    return bytes(memoryview(buf))


class Dims(tuple):
    """Shape with -1 for dynamic dims (sequence-like, as trt.Dims)."""

    def __new__(cls, dims=()):
        return super().__new__(cls, (int(d) for d in dims))


# ------------------------------------------------------------------------------------ network
class ITensor:
    def __init__(self, name: str, shape, dtype: DataType, is_input: bool,
                 is_shape: bool = False) -> None:
        self.name, self.shape, self.dtype = name, Dims(shape), dtype
        self.is_network_input = is_input
        self.is_network_output = not is_input
        self.is_shape_tensor = is_shape
        self.is_execution_tensor = not is_shape
        self.location = TensorLocation.HOST if is_shape else TensorLocation.DEVICE


class ILayer:
    def __init__(self, name: str, type: LayerType, op: str) -> None:
        self.name, self.type, self.op = name, type, op


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._layers: list[ILayer] = []
        self._onnx: bytes | None = None
        self._dds: dict[str, list[int]] = {}  # output -> dims that are data-dependent

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    num_layers = property(lambda self: len(self._layers))

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    def get_layer(self, index: int) -> ILayer:
        return self._layers[index]

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index: int) -> ILayer:
        return self._layers[index]


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32,
                7: DataType.INT64, 2: DataType.UINT8, 9: DataType.BOOL, 16: DataType.BF16,
                17: DataType.FP8, 22: DataType.INT4}


class ParserError:
    def __init__(self, code: ErrorCode, desc: str, node: int = -1, op: str = "",
                 name: str = "") -> None:
        self._code, self._desc, self._node, self._op, self._name = code, desc, node, op, name

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def __str__(self) -> str:
        where = f"In node {self._node} with name: {self._name} and operator: {self._op} " \
            if self._node >= 0 else ""
        return f"{where}({self._code.name}): {self._desc}"


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []
        self._flags = 0

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors = []

    def set_flag(self, flag: OnnxParserFlag) -> None:
        self._flags |= 1 << int(flag)

    def get_flag(self, flag: OnnxParserFlag) -> bool:
        return bool(self._flags & (1 << int(flag)))

    def parse_from_file(self, model: str) -> bool:
        try:
            data = Path(model).read_bytes()
        except OSError as exc:
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file {model}: {exc}")
            return False
        return self.parse(data, str(Path(model).parent))

    def _fail(self, code: ErrorCode, desc: str, node: int = -1, op: str = "",
              name: str = "") -> None:
        err = ParserError(code, desc, node, op, name)
        self._errors.append(err)
        _log(self._logger, ILogger.Severity.ERROR, str(err))

    def parse(self, model, path: str | None = None) -> bool:
        import onnx

        try:
            proto = onnx.load_from_string(_as_bytes(model))
        except Exception as exc:
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model: {exc}")
            return False
        ok = True
        for i, node in enumerate(proto.graph.node):
            if node.domain not in ("", "ai.onnx") or node.op_type in UNSUPPORTED_OPS:
                self._fail(ErrorCode.UNSUPPORTED_NODE,
                           f"No importer registered for op: {node.op_type}", i, node.op_type,
                           node.name)
                ok = False
        if not ok:
            return False
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:
            inferred = proto
        init = {t.name for t in proto.graph.initializer}
        shape_operands = {node.input[k] for node in proto.graph.node
                          for k in SHAPE_OPERANDS.get(node.op_type, ()) if k < len(node.input)}
        net = self._network

        def tensor(vi, is_input: bool) -> ITensor | None:
            tt = vi.type.tensor_type
            dtype = _ONNX_TO_TRT.get(tt.elem_type)
            if dtype is None:
                self._fail(ErrorCode.UNSUPPORTED_GRAPH, f"unsupported data type of {vi.name}")
                return None
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            is_shape = (is_input and vi.name in shape_operands and len(dims) <= 1
                        and dtype in (DataType.INT32, DataType.INT64))
            return ITensor(vi.name, dims, dtype, is_input, is_shape)

        for vi in proto.graph.input:
            if vi.name not in init:
                t = tensor(vi, True)
                if t is None:
                    return False
                net._inputs.append(t)
        for vi in inferred.graph.output:
            t = tensor(vi, False)
            if t is None:
                return False
            net._outputs.append(t)
        # outputs downstream of a data-dependent-shape op have data-dependent dims
        tainted: set[str] = set()
        for node in proto.graph.node:  # ONNX nodes are topologically sorted
            if node.op_type in DDS_OPS or tainted.intersection(node.input):
                tainted.update(node.output)
        for t in net._outputs:
            if t.name in tainted:
                net._dds[t.name] = [i for i, d in enumerate(t.shape) if d < 0]
        for i, node in enumerate(proto.graph.node):
            net._layers.append(ILayer(node.name or f"node_{i}",
                                      _LAYER_FOR_OP.get(node.op_type, LayerType.PLUGIN_V3),
                                      node.op_type))
        if path is not None and any(t.data_location == onnx.TensorProto.EXTERNAL
                                    for t in proto.graph.initializer):
            # as the real parser: external weights are read from ``path`` into the network,
            # so the engine is self-contained (NvOnnxParser.h: parse's "path" argument)
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, path)
            model = proto.SerializeToString()
        net._onnx = _as_bytes(model)
        return True


# ------------------------------------------------------------------------------------ builder
class IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[Dims, Dims, Dims]] = {}
        self._values: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min, opt, max) -> None:
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        if any(d < 0 for d in lo):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        if len(mid) != len(lo) or any(a > b for a, b in zip(lo, mid, strict=False)):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        if len(hi) != len(lo) or any(b > c for b, c in zip(mid, hi, strict=False)):
            raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:
        return list(self._shapes.get(input, ()))

    def set_shape_input(self, input: str, min, opt, max) -> None:
        lo, mid, hi = (tuple(int(v) for v in s) for s in (min, opt, max))
        if len(mid) != len(lo) or any(a > b for a, b in zip(lo, mid, strict=False)):
            raise RuntimeError("opt input provided for shape tensor is inconsistent with other "
                               "inputs.")
        if len(hi) != len(lo) or any(b > c for b, c in zip(mid, hi, strict=False)):
            raise RuntimeError("max input provided for shape tensor is inconsistent with other "
                               "inputs.")
        self._values[input] = (lo, mid, hi)

    def get_shape_input(self, input: str) -> list[list[int]]:
        return [list(v) for v in self._values.get(input, ())]

    def __bool__(self) -> bool:
        return True

    def _static(self, name: str) -> bool:
        lo, _opt, hi = self._shapes[name]
        return lo == hi


class IInt8Calibrator:
    def __init__(self) -> None:
        pass

    def get_batch_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_batch(self, names):  # pragma: no cover - overridden
        raise NotImplementedError

    def read_calibration_cache(self):  # pragma: no cover - overridden
        return None

    def write_calibration_cache(self, cache) -> None:  # pragma: no cover - overridden
        pass


class IInt8EntropyCalibrator2(IInt8Calibrator):
    def get_algorithm(self) -> CalibrationAlgoType:
        return CalibrationAlgoType.ENTROPY_CALIBRATION_2


class IInt8MinMaxCalibrator(IInt8Calibrator):
    def get_algorithm(self) -> CalibrationAlgoType:
        return CalibrationAlgoType.MINMAX_CALIBRATION


def _this_device() -> int:
    """The device TensorRT works on: the current context's, else the runtime's default (0)."""
    device = fake_pycuda.current_device()
    return 0 if device is None else device


def _device_header(device: int) -> dict:
    props = fake_pycuda.STATE.devices[device]
    return {"name": props.name, "cc": list(props.compute_capability)}


class ITimingCache:
    def __init__(self, entries: list[str], header: dict) -> None:
        self.entries = list(entries)
        self._header = header

    def serialize(self) -> IHostMemory:
        blob = json.dumps({"header": self._header, "entries": self.entries}).encode()
        return _host_memory(CACHE_MAGIC + blob)

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache._header["version"] != self._header["version"]:
            return False
        if input_cache._header["device"] != self._header["device"] and not ignore_mismatch:
            return False
        self.entries += [e for e in input_cache.entries if e not in self.entries]
        return True

    def reset(self) -> bool:
        self.entries = []
        return True


class IBuilderConfig:
    def __init__(self, builder: Builder) -> None:
        self._builder = builder
        self._flags = 1 << int(BuilderFlag.TF32)  # TF32 is on by default
        self._pools: dict[MemoryPoolType, int] = {}
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self._int8_calibrator = None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.builder_optimization_level = 3
        self._profiles: list[IOptimizationProfile] = []
        self._calibration_profile: IOptimizationProfile | None = None
        self._timing_cache: ITimingCache | None = None

    @property
    def int8_calibrator(self):
        _deprecated_10_1()
        return self._int8_calibrator

    @int8_calibrator.setter
    def int8_calibrator(self, calibrator) -> None:
        _deprecated_10_1()
        self._int8_calibrator = calibrator

    @property
    def flags(self) -> int:
        return self._flags

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags |= 1 << int(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags &= ~(1 << int(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return bool(self._flags & (1 << int(flag)))

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if int(pool_size) < 0:
            raise TypeError("pool_size must be non-negative")
        self._pools[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(MemoryPoolType(pool), 1 << 40)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            _log(self._builder._logger, ILogger.Severity.ERROR,
                 "IBuilderConfig::addOptimizationProfile: profile is invalid")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        _deprecated_10_1()
        if not profile:
            return False
        self._calibration_profile = profile
        return True

    def get_calibration_profile(self) -> IOptimizationProfile | None:
        _deprecated_10_1()
        return self._calibration_profile

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache | None:
        data = _as_bytes(serialized_timing_cache)
        here = {"version": __version__, "device": _device_header(self._builder._device)}
        if not data:
            return ITimingCache([], here)
        try:
            assert data.startswith(CACHE_MAGIC)
            blob = json.loads(data[len(CACHE_MAGIC):])
            return ITimingCache(blob["entries"], blob["header"])
        except Exception:
            _log(self._builder._logger, ILogger.Severity.ERROR,
                 "createTimingCache: the timing cache is corrupted")
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        here = {"version": __version__, "device": _device_header(self._builder._device)}
        if cache._header["version"] != here["version"] or (
                cache._header["device"] != here["device"] and not ignore_mismatch):
            _log(self._builder._logger, ILogger.Severity.ERROR,
                 "IBuilderConfig::setTimingCache: the timing cache was created for another "
                 f"device or TensorRT version ({cache._header} vs {here})")
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Builder(): incompatible constructor arguments (logger)")
        self._logger = logger
        self._device = _this_device()

    @property
    def num_DLA_cores(self) -> int:
        return FAKE_NUM_DLA_CORES

    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _error(self, msg: str) -> None:
        _log(self._logger, ILogger.Severity.ERROR, msg)

    def build_serialized_network(self, network: INetworkDefinition,
                                 config: IBuilderConfig) -> IHostMemory | None:
        if network._onnx is None:
            self._error("Network must have at least one output")
            return None
        flags = sorted(f.name for f in BuilderFlag if config.get_flag(f))
        dynamic = [t for t in network._inputs if any(d < 0 for d in t.shape)]
        shape_inputs = [t for t in network._inputs if t.is_shape_tensor]
        profiles = config._profiles
        if (dynamic or shape_inputs) and not profiles:
            self._error("Network has dynamic or shape inputs, but no optimization profile has "
                        "been defined.")
            return None
        for p in profiles:
            for t in network._inputs:
                if t.name not in p._shapes and t in dynamic:
                    self._error(f"Optimization profile is missing values for input {t.name}")
                    return None
                if t.is_shape_tensor and t.name not in p._values:
                    self._error(f"Optimization profile is missing values for shape input "
                                f"tensor {t.name}")
                    return None
                if t.name in p._shapes:
                    lo, _opt, hi = p._shapes[t.name]
                    if len(lo) != len(t.shape) or any(
                            d >= 0 and not (a == d == b)
                            for d, a, b in zip(t.shape, lo, hi, strict=False)):
                        self._error(f"Optimization profile dimensions of {t.name} do not match "
                                    f"the network's {tuple(t.shape)}")
                        return None
        on_dla = config.default_device_type == DeviceType.DLA
        dla_layers = 0
        if on_dla:
            if not 0 <= config.DLA_core < self.num_DLA_cores:
                self._error(f"DLA core {config.DLA_core} is not available "
                            f"({self.num_DLA_cores} DLA cores)")
                return None
            if not ({"FP16", "INT8"} & set(flags)):
                self._error("DLA requires FP16 or INT8 precision")
                return None
            dynamic_profile = any(not p._static(n) for p in profiles for n in p._shapes)
            if dynamic_profile:
                if not config.get_flag(BuilderFlag.GPU_FALLBACK):
                    self._error("DLA does not support dynamic dimensions: the profile's min, opt "
                                "and max must be equal (enable GPU fallback to run on the GPU)")
                    return None
                _log(self._logger, ILogger.Severity.WARNING,
                     "Layers with dynamic dimensions cannot run on DLA: falling back to GPU")
            else:
                dla_layers = len(network._layers)
        has_qdq = any(layer.type in (LayerType.QUANTIZE, LayerType.DEQUANTIZE)
                      for layer in network._layers)
        calibrated = False
        calibration_ranges: dict[str, list[float]] = {}
        if "INT8" in flags and not has_qdq:
            calib = config._int8_calibrator
            if calib is None:
                self._error("Calibration failure occurred with no scaling factors detected: "
                            "no calibrator and no Q/DQ layers; set dynamic ranges or a "
                            "calibrator")
                return None
            if not self._calibrate(network, config, calib, calibration_ranges):
                return None
            calibrated = True
        if BUILD_HOOK is not None:
            BUILD_HOOK()
        if config._timing_cache is not None and not config.get_flag(
                BuilderFlag.DISABLE_TIMING_CACHE):
            for layer in network._layers:
                key = f"{layer.op}:{layer.name}"
                if key not in config._timing_cache.entries:
                    config._timing_cache.entries.append(key)
        header = {
            "version": __version__,
            "device": _device_header(self._device),
            "flags": flags,
            "device_type": config.default_device_type.name,
            "dla_core": config.DLA_core if on_dla else None,
            "workspace": config._pools.get(MemoryPoolType.WORKSPACE),
            "calibrated": calibrated,
            "qdq": has_qdq,
            "inputs": [[t.name, int(t.dtype), list(t.shape), t.is_shape_tensor]
                       for t in network._inputs],
            "outputs": [[t.name, int(t.dtype), list(t.shape), False] for t in network._outputs],
            "dds": network._dds,
            "profiles": [{n: [list(s) for s in v] for n, v in p._shapes.items()}
                         for p in profiles],
            "shape_values": [{n: [list(s) for s in v] for n, v in p._values.items()}
                             for p in profiles],
        }
        BUILDS.append(dict(
            header, pools={k.name: v for k, v in config._pools.items()},
            builder_device=self._device, dla_layers=dla_layers,
            calibration_ranges=calibration_ranges,
            calibration_profile=None if config._calibration_profile is None else
            {n: [list(s) for s in v] for n, v in config._calibration_profile._shapes.items()}))
        blob = json.dumps(header).encode()
        return _host_memory(MAGIC + len(blob).to_bytes(4, "little") + blob + network._onnx)

    def _calibrate(self, network: INetworkDefinition, config: IBuilderConfig, calib,
                   ranges: dict[str, list[float]]) -> bool:
        calib.get_batch_size()
        cached = calib.read_calibration_cache()
        if cached:
            return True
        profile = config._calibration_profile or (config._profiles[0] if config._profiles
                                                  else None)
        names = [t.name for t in network._inputs]
        batches = 0
        while True:
            try:  # pyInt8.cpp: an exception is printed and means "no more batches"
                ptrs = calib.get_batch(names)
            except Exception as exc:
                print(f"[ERROR] Exception caught in get_batch(): {exc}", file=sys.stderr)
                ptrs = None
            if not ptrs:
                break
            if len(ptrs) != len(names):
                self._error("Calibrator returned the wrong number of bindings")
                return False
            for t, ptr in zip(network._inputs, ptrs, strict=False):
                shape = t.shape
                if profile is not None and t.name in profile._shapes:
                    shape = profile._shapes[t.name][1]  # calibration runs at the opt shape
                if any(d < 0 for d in shape):
                    self._error(f"Calibration needs a calibration profile for {t.name}")
                    return False
                dtype = np.dtype(nptype(t.dtype)) if t.dtype in _INDEX_TYPES else \
                    np.dtype(np.float32)
                try:
                    raw = fake_pycuda.read_device(int(ptr), int(np.prod(shape)) * dtype.itemsize)
                except fake_pycuda.LaunchError as exc:
                    self._error(f"Cuda Runtime ({exc}) while reading calibration data for "
                                f"{t.name}")
                    return False
                values = np.frombuffer(raw, dtype).astype(np.float64)
                lo, hi = (float(values.min()), float(values.max())) if values.size else (0, 0)
                old = ranges.get(t.name)
                ranges[t.name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
            batches += 1
        if not batches:
            self._error("Calibration failure: the calibrator provided no batches")
            return False
        calib.write_calibration_cache(memoryview(f"fake-cache batches={batches}".encode()))
        return True


# ------------------------------------------------------------------------------------ runtime
class Runtime:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Runtime(): incompatible constructor arguments (logger)")
        self._logger = logger
        self.DLA_core = -1
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        data = _as_bytes(serialized_engine)
        if not data.startswith(MAGIC):
            _log(self._logger, ILogger.Severity.ERROR,
                 "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                 "assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)")
            return None
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
        header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
        if header["version"] != __version__:
            _log(self._logger, ILogger.Severity.ERROR,
                 f"The engine plan file is not compatible with this version of TensorRT, "
                 f"expecting library version {__version__} got {header['version']}")
            return None
        here = _device_header(_this_device())
        built = header["device"]
        if built["cc"] != here["cc"]:
            _log(self._logger, ILogger.Severity.ERROR,
                 "The engine plan file is generated on an incompatible device, expecting compute "
                 f"{'.'.join(map(str, built['cc']))} got compute "
                 f"{'.'.join(map(str, here['cc']))}, please rebuild.")
            return None
        if built["name"] != here["name"]:
            _log(self._logger, ILogger.Severity.WARNING, NOT_PORTABLE)
        if "VERSION_COMPATIBLE" in header["flags"] and not self.engine_host_code_allowed:
            _log(self._logger, ILogger.Severity.ERROR,
                 "Cannot deserialize a version-compatible engine: engine_host_code_allowed "
                 "is false")
            return None
        LOADS.append({"runtime_dla_core": self.DLA_core, "engine_dla_core": header["dla_core"],
                      "device": _this_device()})
        return ICudaEngine(header, data[len(MAGIC) + 4 + n:], self._logger)


class IOutputAllocator:
    """Base class for output allocators (``pyCore.cpp`` ``PyOutputAllocator``)."""

    def __init__(self) -> None:
        pass

    def reallocate_output(self, tensor_name, memory, size, alignment):
        return None  # nullptr

    def notify_shape(self, tensor_name, shape) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _call_allocator(allocator: IOutputAllocator, name: str, current: int, size: int,
                    stream: int) -> int:
    """The trampoline: prefer ``reallocate_output_async``; exceptions print and mean nullptr."""
    try:
        method = getattr(allocator, "reallocate_output_async", None)
        if method is not None:
            ptr = method(name, current, size, 256, stream)
        else:
            ptr = allocator.reallocate_output(name, current, size, 256)
        return int(ptr or 0)
    except Exception as exc:
        print(f"[ERROR] Exception caught in reallocateOutputAsync(): {exc}", file=sys.stderr)
        return 0


class ICudaEngine:
    def __init__(self, header: dict, onnx_bytes: bytes, logger: ILogger) -> None:
        self._header, self._onnx, self._logger = header, onnx_bytes, logger
        self._io = [(n, DataType(d), Dims(s), TensorIOMode.INPUT, shape)
                    for n, d, s, shape in header["inputs"]]
        self._io += [(n, DataType(d), Dims(s), TensorIOMode.OUTPUT, False)
                     for n, d, s, _ in header["outputs"]]
        self._by_name = {t[0]: t for t in self._io}
        self._dds = {n: set(dims) for n, dims in header["dds"].items()}
        self._session = None
        self._lock = threading.Lock()

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self._header["profiles"]))

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def _get(self, name: str):
        try:
            return self._by_name[name]
        except KeyError:
            raise RuntimeError(f"no tensor named {name}") from None

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._by_name[name][3] if name in self._by_name else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._get(name)[1]

    def get_tensor_shape(self, name: str) -> Dims:
        return self._get(name)[2]

    def is_shape_inference_io(self, name: str) -> bool:
        return bool(self._by_name[name][4]) if name in self._by_name else False

    def get_tensor_location(self, name: str) -> TensorLocation:
        return TensorLocation.HOST if self.is_shape_inference_io(name) else TensorLocation.DEVICE

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        profiles = self._header["profiles"]
        if profile_index >= len(profiles) or name not in profiles[profile_index]:
            shape = self._get(name)[2]
            return [shape, shape, shape]
        return [Dims(s) for s in profiles[profile_index][name]]

    def get_tensor_profile_values(self, name, profile_index) -> list[list[int]]:
        # pyCore.cpp binds (profileIndex, tensorName) under the keywords (name, profile_index)
        index, tensor = name, profile_index
        if not isinstance(index, int) or not isinstance(tensor, str):
            raise TypeError("get_tensor_profile_values(): incompatible function arguments")
        if not self.is_shape_inference_io(tensor) or self.get_tensor_mode(tensor) != \
                TensorIOMode.INPUT:
            raise RuntimeError("Binding index does not correspond to an input shape tensor.")
        values = self._header["shape_values"]
        if index >= len(values) or tensor not in values[index]:
            return []
        return [list(v) for v in values[index][tensor]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def _run(self, feeds: dict[str, np.ndarray],
             out_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        """Run the embedded model; BF16 tensors travel as uint16 bit patterns."""
        import onnxruntime as ort

        with self._lock:
            if self._session is None:
                self._session = ort.InferenceSession(self._onnx,
                                                     providers=["CPUExecutionProvider"])
        outs = [t for t in self._io if t[3] == TensorIOMode.OUTPUT]
        names = [t[0] for t in outs]
        if all(self._by_name[n][1] != DataType.BF16 for n in self._by_name):
            return dict(zip(names, self._session.run(names, feeds), strict=False))
        if out_shapes is None:
            raise fake_pycuda.LaunchError("the fake needs output shapes to run BF16 I/O")
        binding = self._session.io_binding()
        for n, arr in feeds.items():
            elem = 16 if self._by_name[n][1] == DataType.BF16 else None
            value = (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, onnx_element_type=elem)
                     if elem else ort.OrtValue.ortvalue_from_numpy(arr))
            binding.bind_ortvalue_input(n, value)
        results = {}
        for n, dtype, *_ in outs:
            arr = np.zeros(out_shapes[n], _storage(dtype))
            elem = 16 if dtype == DataType.BF16 else None
            value = (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, onnx_element_type=elem)
                     if elem else ort.OrtValue.ortvalue_from_numpy(arr))
            binding.bind_ortvalue_output(n, value)
            results[n] = arr
        self._session.run_with_iobinding(binding)
        return results


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
        self._allocators: dict[str, IOutputAllocator] = {}
        self._out_shapes: dict[tuple, dict[str, Dims]] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        t = self.engine._by_name.get(name)
        if t is None or t[3] != TensorIOMode.INPUT:
            _log(self.engine._logger, ILogger.Severity.ERROR, f"{name} is not an input")
            return False
        shape = Dims(shape)
        lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(t[2]) or any(
                not (a <= s <= b) for s, a, b in zip(shape, lo, hi, strict=False)):
            _log(self.engine._logger, ILogger.Severity.ERROR,
                 f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Supplied "
                 f"shape {tuple(shape)} of {name} is out of the profile bounds)")
            return False
        self._shapes[name] = shape
        return True

    def _input_shapes(self) -> dict[str, Dims] | None:
        shapes = {}
        for n, _d, s, mode, _shape in self.engine._io:
            if mode != TensorIOMode.INPUT:
                continue
            if any(d < 0 for d in s):
                if n not in self._shapes:
                    return None
                shapes[n] = self._shapes[n]
            else:
                shapes[n] = s
        return shapes

    def _shape_values(self, shapes: dict[str, Dims]) -> dict[str, np.ndarray] | None:
        """Values of the shape-tensor inputs, read from their host addresses (None: unset)."""
        values = {}
        for n, dtype, _s, mode, is_shape in self.engine._io:
            if mode != TensorIOMode.INPUT or not is_shape:
                continue
            address = self._addresses.get(n)
            if not address:
                return None
            np_type = np.dtype(nptype(dtype))
            nbytes = int(np.prod(shapes[n])) * np_type.itemsize
            if fake_pycuda.is_device_address(address):
                raise fake_pycuda.LaunchError(
                    f"shape tensor {n} has a device address {address:#x}; TensorLocation is HOST "
                    "(its address must be host memory)")
            raw = ctypes.string_at(address, nbytes)
            values[n] = np.frombuffer(raw, np_type).reshape(tuple(shapes[n])).copy()
        return values

    def get_tensor_shape(self, name: str) -> Dims:
        t = self.engine._get(name)
        if t[3] == TensorIOMode.INPUT:
            return self._shapes.get(name, t[2])
        if all(d >= 0 for d in t[2]):
            return t[2]
        shapes = self._input_shapes()
        if shapes is None:
            return t[2]  # unresolved: -1 dims, as the real API reports
        try:
            values = self._shape_values(shapes)
        except fake_pycuda.LaunchError as exc:
            _log(self.engine._logger, ILogger.Severity.ERROR, str(exc))
            return t[2]
        if values is None:
            return t[2]  # a shape tensor's value is not set yet
        key = (tuple(sorted(shapes.items())),
               tuple((n, v.tobytes()) for n, v in sorted(values.items())))
        if key not in self._out_shapes:
            feeds = {n: np.zeros(s, _storage(self.engine._by_name[n][1]))
                     for n, s in shapes.items()} | values
            if any(self.engine._by_name[n][1] == DataType.BF16 for n in feeds):
                return t[2]  # the fake resolves dynamic output shapes only without BF16 I/O
            self._out_shapes[key] = {n: Dims(v.shape) for n, v in self.engine._run(feeds).items()}
        shape = self._out_shapes[key][name]
        dds = self.engine._dds.get(name, ())
        return Dims(-1 if i in dds else d for i, d in enumerate(shape))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._by_name:
            _log(self.engine._logger, ILogger.Severity.ERROR, f"no tensor named {name}")
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_output_allocator(self, name: str, output_allocator: IOutputAllocator) -> bool:
        t = self.engine._by_name.get(name)
        if t is None or t[3] != TensorIOMode.OUTPUT:
            _log(self.engine._logger, ILogger.Severity.ERROR, f"{name} is not an output")
            return False
        if output_allocator is None:
            self._allocators.pop(name, None)
        else:
            self._allocators[name] = output_allocator
        return True

    def get_output_allocator(self, name: str) -> IOutputAllocator | None:
        return self._allocators.get(name)

    def execute_async_v3(self, stream_handle: int) -> bool:
        log = self.engine._logger
        stream = fake_pycuda.stream_for_handle(stream_handle)
        if stream is None:
            _log(log, ILogger.Severity.ERROR, "invalid stream handle")
            return False
        shapes = self._input_shapes()
        if shapes is None:
            _log(log, ILogger.Severity.ERROR, "not all input shapes are specified")
            return False
        io = self.engine._io
        missing = [n for n, *_ in io if n not in self._addresses and n not in self._allocators]
        if missing:
            _log(log, ILogger.Severity.ERROR, f"Address is not set for tensors {missing}")
            return False
        try:
            values = self._shape_values(shapes)
        except fake_pycuda.LaunchError as exc:
            _log(log, ILogger.Severity.ERROR, str(exc))
            return False
        bounds = self.engine._header["shape_values"]
        for n, v in (values or {}).items():
            lo, _opt, hi = (bounds[0][n] if bounds and n in bounds[0] else (None, None, None))
            if lo is not None and any(not (a <= x <= b)
                                      for x, a, b in zip(v.ravel(), lo, hi, strict=False)):
                _log(log, ILogger.Severity.ERROR, f"shape tensor {n} value {v.tolist()} is "
                     f"outside the optimization profile [{lo}, {hi}]")
                return False
        dds_outputs = [n for n, *_ in io if n in self.engine._dds]
        no_allocator = [n for n in dds_outputs if n not in self._allocators]
        if no_allocator:
            _log(log, ILogger.Severity.ERROR, f"IExecutionContext::enqueueV3: outputs "
                 f"{no_allocator} have data-dependent shapes and no IOutputAllocator")
            return False
        outs = {n: self.get_tensor_shape(n) for n, _d, _s, mode, _x in io
                if mode == TensorIOMode.OUTPUT}
        addresses = dict(self._addresses)

        def gather() -> dict[str, np.ndarray]:
            feeds = {}
            for n, s in shapes.items():
                if n in (values or {}):
                    feeds[n] = values[n]
                    continue
                dtype = _storage(self.engine._by_name[n][1])
                raw = fake_pycuda.read_device(addresses[n], int(np.prod(s)) * dtype.itemsize)
                feeds[n] = np.frombuffer(raw, dtype).reshape(s)
            return feeds

        def put(n: str, v: np.ndarray) -> None:
            v = np.ascontiguousarray(v, dtype=_storage(self.engine._by_name[n][1]))
            if n not in self.engine._dds and v.shape != tuple(outs[n]):
                raise fake_pycuda.LaunchError(f"output {n} shape {v.shape} != {outs[n]}")
            if v.nbytes:
                fake_pycuda.write_device(addresses[n], v.tobytes())

        allocated = [n for n in self._allocators if n in outs]
        if allocated:
            # Sizes are known only after running: enqueueV3 synchronizes for them, then calls
            # the allocators before it returns.
            stream._drain()
            try:
                results = self.engine._run(gather(), {n: tuple(s) for n, s in outs.items()
                                                      if all(d >= 0 for d in s)} or None)
            except fake_pycuda.LaunchError as exc:
                _log(log, ILogger.Severity.ERROR, str(exc))
                return False
            for n in allocated:
                v = results[n]
                size = max(int(v.nbytes), 1)
                ptr = _call_allocator(self._allocators[n], n, addresses.get(n, 0), size,
                                      stream_handle)
                if not ptr:
                    _log(log, ILogger.Severity.ERROR,
                         f"IOutputAllocator returned nullptr for {n} ({size} bytes)")
                    return False
                addresses[n] = ptr
                try:
                    self._allocators[n].notify_shape(n, Dims(v.shape))
                except Exception as exc:
                    print(f"[ERROR] Exception caught in notifyShape(): {exc}", file=sys.stderr)
            for n, v in results.items():
                stream.enqueue(lambda n=n, v=v: put(n, v))
            return True

        def launch() -> None:  # runs when the stream reaches it, like a kernel
            for n, v in self.engine._run(gather(), {n: tuple(s) for n, s in outs.items()}).items():
                put(n, v)

        stream.enqueue(launch)
        return True


# ------------------------------------------------------------------------------------ install
def install(monkeypatch) -> None:
    """Put this fake (and fake ``pycuda.driver``) into ``sys.modules`` with fresh state.

    ``pycuda.driver`` is a fresh module object each time (sharing this fake's functions and
    state), so anything a library keyed on the driver module from an earlier test is not reused.
    """
    import types

    fake_pycuda.reset()
    reset()
    driver = types.ModuleType("pycuda.driver")
    driver.__dict__.update({k: v for k, v in vars(fake_pycuda).items()
                            if not k.startswith("__")})
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "tensorrt", sys.modules[__name__])
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def emulate_tensorrt_11(monkeypatch) -> None:
    """Make this fake look like TensorRT 11.0: strongly typed only, no implicit INT8."""
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "__version__", "11.0.0")
    monkeypatch.setattr(mod, "BuilderFlag", BuilderFlag11)
    for name in ("IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                 "CalibrationAlgoType"):
        monkeypatch.delattr(mod, name)
    for name in ("int8_calibrator", "set_calibration_profile", "get_calibration_profile"):
        monkeypatch.delattr(IBuilderConfig, name)


def check_clean() -> None:
    """Fail if a test left a CUDA context pushed on this thread."""
    assert not fake_pycuda.driver_stack(), \
        f"CUDA contexts left on the driver stack: {fake_pycuda.driver_stack()}"
