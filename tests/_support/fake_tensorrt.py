"""A faithful fake of the part of the ``tensorrt`` Python API Tandem uses (TensorRT 10 names).

Builder side: ``Logger``/``ILogger`` (+ ``Severity``), ``Builder`` (``create_network``,
``create_builder_config``, ``create_optimization_profile``, ``build_serialized_network``,
``num_DLA_cores``), ``OnnxParser`` (``parse``, ``parse_from_file``, ``num_errors``,
``get_error`` -> error with ``desc()``/``node()``/``code()``, ``set_flag``),
``INetworkDefinition`` (inputs, outputs, layers with ``LayerType``), ``IBuilderConfig``
(``set_flag``/``get_flag``, ``set_memory_pool_limit``, ``default_device_type``, ``DLA_core``,
``int8_calibrator``, ``add_optimization_profile``, ``set_calibration_profile``,
``create_timing_cache``/``set_timing_cache``/``get_timing_cache``), ``IOptimizationProfile``
(``set_shape``/``get_shape``), ``ITimingCache.serialize``, ``IHostMemory``,
``IInt8EntropyCalibrator2``; enums ``BuilderFlag``, ``MemoryPoolType``, ``DeviceType``,
``NetworkDefinitionCreationFlag``, ``OnnxParserFlag``, ``DataType``, ``TensorIOMode``,
``LayerType``, ``CalibrationAlgoType``; ``nptype``.

Runtime side: ``Runtime`` (``deserialize_cuda_engine`` returns None on bad bytes, as the real
one does, logging an error; ``DLA_core``; ``engine_host_code_allowed``), ``ICudaEngine``
(``num_io_tensors``, ``get_tensor_name``/``_mode``/``_dtype``/``_shape``,
``get_tensor_profile_shape``, ``create_execution_context``), ``IExecutionContext``
(``set_input_shape`` -> bool, ``get_tensor_shape``, ``set_tensor_address`` -> bool,
``execute_async_v3(stream_handle)`` -> bool, queued on the fake pycuda stream).

Failure behaviour follows the real library: builder and parser failures are return values
(None / False) with messages on the logger, not exceptions. The "engine" embeds the ONNX model and
runs it with onnxruntime on the CPU, reading and writing fake device memory, so a backend driven
through this fake computes real numbers through its real buffer/copy/shape code.

Test hooks (not TensorRT API): ``BUILDS`` (a snapshot of each build's config), ``reset()``,
``FAKE_NUM_DLA_CORES``, ``UNSUPPORTED_OPS``.
"""

from __future__ import annotations

import enum
import json
import threading
from pathlib import Path

import numpy as np

from tests._support import fake_pycuda

__version__ = "10.3.0.26"

MAGIC = b"FAKETRT-ENGINE\x00"
CACHE_MAGIC = b"FAKETRT-TIMING\x00"
UNSUPPORTED_OPS = {"Unique", "StringNormalizer", "TfIdfVectorizer"}
FAKE_NUM_DLA_CORES = 0
BUILDS: list[dict] = []


def reset() -> None:
    global FAKE_NUM_DLA_CORES
    FAKE_NUM_DLA_CORES = 0
    BUILDS.clear()


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


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
       DataType.INT64: np.int64}


def nptype(trt_type: DataType):
    try:
        return _NP[DataType(trt_type)]
    except KeyError:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy "
                        "datatype.") from None


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


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
    logger.log(severity, msg)


# ------------------------------------------------------------------------------------ memory
class IHostMemory:
    """Serialized data (buffer-like; ``bytes(mem)`` gives the bytes)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def nbytes(self) -> int:
        return len(self._data)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8

    def __bytes__(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data)


def _as_bytes(buf) -> bytes:
    if isinstance(buf, IHostMemory):
        return bytes(buf)
    return bytes(memoryview(buf))


class Dims(tuple):
    """Shape with -1 for dynamic dims (sequence-like, as trt.Dims)."""

    def __new__(cls, dims=()):
        return super().__new__(cls, (int(d) for d in dims))


# ------------------------------------------------------------------------------------ network
class ITensor:
    def __init__(self, name: str, shape, dtype: DataType, is_input: bool) -> None:
        self.name, self.shape, self.dtype = name, Dims(shape), dtype
        self.is_network_input = is_input
        self.is_network_output = not is_input


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
                7: DataType.INT64, 2: DataType.UINT8, 9: DataType.BOOL}


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

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        try:
            proto = onnx.load_from_string(bytes(model))
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
        net = self._network

        def tensor(vi, is_input: bool) -> ITensor | None:
            tt = vi.type.tensor_type
            dtype = _ONNX_TO_TRT.get(tt.elem_type)
            if dtype is None:
                self._fail(ErrorCode.UNSUPPORTED_GRAPH, f"unsupported data type of {vi.name}")
                return None
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            return ITensor(vi.name, dims, dtype, is_input)

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
        for i, node in enumerate(proto.graph.node):
            net._layers.append(ILayer(node.name or f"node_{i}",
                                      _LAYER_FOR_OP.get(node.op_type, LayerType.PLUGIN_V3),
                                      node.op_type))
        net._onnx = bytes(model)
        return True


# ------------------------------------------------------------------------------------ builder
class IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[Dims, Dims, Dims]] = {}
        self._valid = True

    def set_shape(self, input: str, min, opt, max) -> None:
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        if not (len(lo) == len(mid) == len(hi)) or any(
                not (a <= b <= c) or a < 0 for a, b, c in zip(lo, mid, hi, strict=False)):
            self._valid = False  # the real API logs and invalidates the profile
            return
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:
        return list(self._shapes.get(input, (Dims(), Dims(), Dims())))

    def __bool__(self) -> bool:
        return self._valid


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


class ITimingCache:
    def __init__(self, entries: list[str]) -> None:
        self.entries = list(entries)

    def serialize(self) -> IHostMemory:
        return IHostMemory(CACHE_MAGIC + json.dumps(self.entries).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
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
        self.int8_calibrator = None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.builder_optimization_level = 3
        self._profiles: list[IOptimizationProfile] = []
        self._calibration_profile: IOptimizationProfile | None = None
        self._timing_cache: ITimingCache | None = None

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
        if not profile:
            return False
        self._calibration_profile = profile
        return True

    def get_calibration_profile(self) -> IOptimizationProfile | None:
        return self._calibration_profile

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache | None:
        data = _as_bytes(serialized_timing_cache)
        if not data:
            return ITimingCache([])
        if not data.startswith(CACHE_MAGIC):
            _log(self._builder._logger, ILogger.Severity.ERROR,
                 "createTimingCache: the timing cache is corrupted or from another version")
            return None
        return ITimingCache(json.loads(data[len(CACHE_MAGIC):]))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Builder(): incompatible constructor arguments (logger)")
        self._logger = logger

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
        profiles = config._profiles
        if dynamic and not profiles:
            self._error("Network has dynamic or shape inputs, but no optimization profile has "
                        "been defined.")
            return None
        for p in profiles:
            for t in network._inputs:
                if t.name not in p._shapes and t in dynamic:
                    self._error(f"Optimization profile is missing values for input {t.name}")
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
        if on_dla:
            if not 0 <= config.DLA_core < self.num_DLA_cores:
                self._error(f"DLA core {config.DLA_core} is not available "
                            f"({self.num_DLA_cores} DLA cores)")
                return None
            if not (config.get_flag(BuilderFlag.FP16) or config.get_flag(BuilderFlag.INT8)):
                self._error("DLA requires FP16 or INT8 precision")
                return None
        has_qdq = any(layer.type in (LayerType.QUANTIZE, LayerType.DEQUANTIZE)
                      for layer in network._layers)
        calibrated = False
        if config.get_flag(BuilderFlag.INT8) and not has_qdq:
            calib = config.int8_calibrator
            if calib is None:
                self._error("Calibration failure occurred with no scaling factors detected: "
                            "no calibrator and no Q/DQ layers; set dynamic ranges or a "
                            "calibrator")
                return None
            if not self._calibrate(network, config, calib):
                return None
            calibrated = True
        if config._timing_cache is not None and not config.get_flag(
                BuilderFlag.DISABLE_TIMING_CACHE):
            for layer in network._layers:
                key = f"{layer.op}:{layer.name}"
                if key not in config._timing_cache.entries:
                    config._timing_cache.entries.append(key)
        header = {
            "version": __version__,
            "flags": flags,
            "device_type": config.default_device_type.name,
            "dla_core": config.DLA_core if on_dla else None,
            "workspace": config._pools.get(MemoryPoolType.WORKSPACE),
            "calibrated": calibrated,
            "qdq": has_qdq,
            "inputs": [[t.name, int(t.dtype), list(t.shape)] for t in network._inputs],
            "outputs": [[t.name, int(t.dtype), list(t.shape)] for t in network._outputs],
            "profiles": [{n: [list(s) for s in v] for n, v in p._shapes.items()}
                         for p in profiles],
        }
        BUILDS.append(dict(header, pools={k.name: v for k, v in config._pools.items()},
                           calibration_profile=None if config._calibration_profile is None else
                           {n: [list(s) for s in v] for n, v in
                            config._calibration_profile._shapes.items()}))
        blob = json.dumps(header).encode()
        return IHostMemory(MAGIC + len(blob).to_bytes(4, "little") + blob + network._onnx)

    def _calibrate(self, network: INetworkDefinition, config: IBuilderConfig, calib) -> bool:
        calib.get_batch_size()
        cached = calib.read_calibration_cache()
        if cached:
            return True
        profile = config._calibration_profile or (config._profiles[0] if config._profiles
                                                  else None)
        names = [t.name for t in network._inputs]
        batches = 0
        while True:
            ptrs = calib.get_batch(names)
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
                nbytes = int(np.prod(shape)) * np.dtype(nptype(t.dtype)).itemsize
                fake_pycuda.read_device(int(ptr), nbytes)  # faults if the buffer is too small
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
        if "VERSION_COMPATIBLE" in header["flags"] and not self.engine_host_code_allowed:
            _log(self._logger, ILogger.Severity.ERROR,
                 "Cannot deserialize a version-compatible engine: engine_host_code_allowed "
                 "is false")
            return None
        if header["dla_core"] is not None and self.DLA_core != header["dla_core"]:
            _log(self._logger, ILogger.Severity.ERROR,
                 f"Engine was built for DLA core {header['dla_core']}; set Runtime.DLA_core")
            return None
        return ICudaEngine(header, data[len(MAGIC) + 4 + n:], self._logger)


class ICudaEngine:
    def __init__(self, header: dict, onnx_bytes: bytes, logger: ILogger) -> None:
        self._header, self._onnx, self._logger = header, onnx_bytes, logger
        self._io = [(n, DataType(d), Dims(s), TensorIOMode.INPUT) for n, d, s in header["inputs"]]
        self._io += [(n, DataType(d), Dims(s), TensorIOMode.OUTPUT)
                     for n, d, s in header["outputs"]]
        self._by_name = {t[0]: t for t in self._io}
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

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        profiles = self._header["profiles"]
        if profile_index >= len(profiles) or name not in profiles[profile_index]:
            shape = self._get(name)[2]
            return [shape, shape, shape]
        return [Dims(s) for s in profiles[profile_index][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        with self._lock:
            if self._session is None:
                self._session = ort.InferenceSession(self._onnx,
                                                     providers=["CPUExecutionProvider"])
        names = [t[0] for t in self._io if t[3] == TensorIOMode.OUTPUT]
        return dict(zip(names, self._session.run(names, feeds), strict=False))


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
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
        for n, _d, s, mode in self.engine._io:
            if mode != TensorIOMode.INPUT:
                continue
            if any(d < 0 for d in s):
                if n not in self._shapes:
                    return None
                shapes[n] = self._shapes[n]
            else:
                shapes[n] = s
        return shapes

    def get_tensor_shape(self, name: str) -> Dims:
        t = self.engine._get(name)
        if t[3] == TensorIOMode.INPUT:
            return self._shapes.get(name, t[2])
        if all(d >= 0 for d in t[2]):
            return t[2]
        shapes = self._input_shapes()
        if shapes is None:
            return t[2]  # unresolved: -1 dims, as the real API reports
        key = tuple(sorted(shapes.items()))
        if key not in self._out_shapes:
            zeros = {n: np.zeros(s, nptype(self.engine._by_name[n][1]))
                     for n, s in shapes.items()}
            self._out_shapes[key] = {n: Dims(v.shape) for n, v in self.engine._run(zeros).items()}
        return self._out_shapes[key][name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._by_name:
            _log(self.engine._logger, ILogger.Severity.ERROR, f"no tensor named {name}")
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

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
        missing = [n for n, *_ in self.engine._io if n not in self._addresses]
        if missing:
            _log(log, ILogger.Severity.ERROR, f"Address is not set for tensors {missing}")
            return False
        io = {n: (nptype(d), mode) for n, d, _s, mode in self.engine._io}
        outs = {n: self.get_tensor_shape(n) for n, (_t, mode) in io.items()
                if mode == TensorIOMode.OUTPUT}
        addresses = dict(self._addresses)

        def launch() -> None:  # runs when the stream reaches it, like a kernel
            feeds = {}
            for n, s in shapes.items():
                dtype = np.dtype(io[n][0])
                raw = fake_pycuda.read_device(addresses[n], int(np.prod(s)) * dtype.itemsize)
                feeds[n] = np.frombuffer(raw, dtype).reshape(s)
            for n, v in self.engine._run(feeds).items():
                v = np.ascontiguousarray(v, dtype=io[n][0])
                if v.shape != tuple(outs[n]):
                    raise fake_pycuda.LaunchError(f"output {n} shape {v.shape} != {outs[n]}")
                fake_pycuda.write_device(addresses[n], v.tobytes())

        stream.enqueue(launch)
        return True


# ------------------------------------------------------------------------------------ install
def install(monkeypatch) -> None:
    """Put this fake (and fake ``pycuda.driver``) into ``sys.modules`` with fresh state."""
    import sys
    import types

    fake_pycuda.reset()
    reset()
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = fake_pycuda
    monkeypatch.setitem(sys.modules, "tensorrt", sys.modules[__name__])
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake_pycuda)


def check_clean() -> None:
    """Fail if a test left a CUDA context pushed."""
    assert not fake_pycuda.STATE.stack, "a CUDA context was left pushed"
