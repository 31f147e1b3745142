"""TensorRT lowering: ONNX part -> serialized engine, and the on-device engine cache.

``EngineFromOnnx(...)`` is a Polygraphy-style step: constructing it does nothing; calling it parses
the ONNX file, configures the builder from the target :class:`~tandem.devices.profiles.Profile` and
returns the serialized engine bytes:

- precision: ``fp32`` (no flag), ``fp16`` (``BuilderFlag.FP16``), ``int8`` (``INT8`` + ``FP16`` so
  layers without INT8 kernels fall back to FP16, as ``trtexec --int8 --fp16``). An INT8 build of
  a model with Q/DQ layers (explicit quantization) uses their scales and no calibrator; otherwise
  it calibrates with an ``IInt8EntropyCalibrator2`` fed the given sample inputs, at a
  calibration profile of exactly the samples' shapes;
- workspace: ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, profile.workspace_mb MiB)``;
- dynamic inputs: one optimization profile from ``shapes`` = {name: (min, opt, max)};
- DLA: ``default_device_type = DeviceType.DLA``, ``DLA_core`` and ``GPU_FALLBACK``, only where
  the profile has DLA cores (DLA runs FP16/INT8 only);
- ``version_compatible``: ``BuilderFlag.VERSION_COMPATIBLE`` (TRT >= 8.6; the engine embeds a lean
  runtime, so it must be loaded with host code allowed; see FACTS.md §5);
- timing cache: loaded from ``timing_cache`` when the file exists and saved back (atomically).

Engines are specific to the TensorRT version and GPU they were built on, so ``EngineCache`` keys
them by (part sha256, TensorRT version, compute capability, precision, shape profile), stores a
sidecar JSON with the key, and rebuilds rather than loads anything whose sidecar does not match.

TensorRT signals failure by return values plus logger messages; they are translated here, and only
here, into Tandem errors: parser failures -> :class:`UnsupportedModel` (listing every parser
error), a failed build -> :class:`~tandem.protocol.errors.FailedPrecondition` with the logged
errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tandem.devices.profiles import Profile
from tandem.protocol.errors import FailedPrecondition, InternalError, InvalidArgument, TandemError
from tandem.protocol.lazy import require

__all__ = ["EngineCache", "EngineFromOnnx", "EngineKey", "UnsupportedModel", "shape_profile_id"]

PRECISIONS = ("fp32", "fp16", "int8")
Shape = tuple[int, ...]


class UnsupportedModel(InvalidArgument):
    """The TensorRT ONNX parser rejected the model; ``errors`` lists what it said."""

    def __init__(self, message: str = "", errors: Sequence[str] = (), **kw) -> None:
        super().__init__(message, **kw)
        self.errors = list(errors)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shape_profile_id(shapes: Mapping[str, tuple[Shape, Shape, Shape]] | None) -> str:
    """Canonical text of a shape profile: ``"x:1x3x224x224/4x3x224x224/8x3x224x224;..."``."""
    if not shapes:
        return "static"
    parts = []
    for name in sorted(shapes):
        dims = "/".join("x".join(str(int(d)) for d in s) for s in shapes[name])
        parts.append(f"{name}:{dims}")
    return ";".join(parts)


def _logger(trt):
    class _Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(str(msg))

    return _Capture()


def _make_calibrator(trt, cuda, batches: list[dict[str, np.ndarray]]):
    """An IInt8EntropyCalibrator2 that feeds ``batches`` (host arrays) from device buffers."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # required for TensorRT's trampoline
            self._it = iter(batches)
            self._device: dict[str, object] = {}
            self.batches_served = 0
            self.cache: bytes | None = None

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is part of each input's shape

        def get_batch(self, names):
            try:
                batch = next(self._it)
            except StopIteration:
                return None
            ptrs = []
            for name in names:
                arr = np.ascontiguousarray(batch[name])
                if name not in self._device:
                    self._device[name] = cuda.mem_alloc(max(arr.nbytes, 1))
                cuda.memcpy_htod(self._device[name], arr)
                ptrs.append(int(self._device[name]))
            self.batches_served += 1
            return ptrs

        def read_calibration_cache(self):
            return None  # always calibrate from the samples given

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

        def free(self) -> None:
            for alloc in self._device.values():
                alloc.free()
            self._device = {}

    return _Calibrator()


class EngineFromOnnx:
    """Callable step: build a TensorRT engine for ``profile`` from an ONNX file; returns bytes."""

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        profile: Profile,
        precision: str = "fp16",
        shapes: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
        calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
        timing_cache: str | os.PathLike | None = None,
        version_compatible: bool = False,
        dla_core: int | None = None,
        *,
        device: int = 0,
    ) -> None:
        if precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if profile.default_backend != "tensorrt" or profile.workspace_mb is None:
            raise InvalidArgument(f"profile {profile.id} is not a TensorRT target "
                                  f"(default backend {profile.default_backend})")
        if dla_core is not None:
            if profile.dla_cores == 0:
                raise FailedPrecondition(f"profile {profile.id} has no DLA cores")
            if not 0 <= dla_core < profile.dla_cores:
                raise InvalidArgument(f"dla_core {dla_core} out of range: {profile.id} has "
                                      f"{profile.dla_cores} DLA core(s)")
            if precision == "fp32":
                raise InvalidArgument("DLA runs FP16 or INT8 only; choose precision fp16/int8")
        self.onnx_path = Path(onnx_path)
        self.profile = profile
        self.precision = precision
        self.shapes = {n: tuple(tuple(int(d) for d in s) for s in v)
                       for n, v in (shapes or {}).items()}
        for name, triple in self.shapes.items():
            if len(triple) != 3:
                raise InvalidArgument(f"shapes[{name!r}] must be (min, opt, max)")
        self.calibration = list(calibration) if calibration is not None else None
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.version_compatible = version_compatible
        self.dla_core = dla_core
        self.device = device
        self.calibrated_batches = 0  # set by the last call, for reports

    def __call__(self) -> bytes:
        trt = require("tensorrt", "tensorrt")
        if not self.onnx_path.is_file():
            raise InvalidArgument(f"no ONNX file at {self.onnx_path}")
        logger = _logger(trt)
        try:
            return self._build(trt, logger)
        except TandemError:
            raise
        except Exception as exc:  # the TensorRT/pycuda boundary
            raise InternalError(f"TensorRT build of {self.onnx_path.name} failed: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _build(self, trt, logger) -> bytes:
        builder = trt.Builder(logger)
        flags = 0
        major = int(str(trt.__version__).split(".")[0])
        if major < 10:  # explicit batch is the only mode in TRT 10, and the flag is deprecated
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if self.version_compatible and hasattr(trt, "OnnxParserFlag"):
            parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # needed for VC engines
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise UnsupportedModel(
                f"TensorRT {trt.__version__} cannot parse {self.onnx_path.name}: "
                + "; ".join(errors or logger.errors or ["no detail"]), errors=errors)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(self.profile.workspace_mb) << 20)
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if self.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if self.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = self.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

        self._add_profile(trt, builder, network, config)
        self._load_timing_cache(config, logger)
        calibrator = self._setup_int8(trt, builder, network, config)  # last: pushes a context

        cuda_ctx = None
        cuda = None
        if calibrator is not None:
            cuda, cuda_ctx = calibrator  # (module, pushed context), see _setup_int8
            calibrator = config.int8_calibrator
        try:
            serialized = builder.build_serialized_network(network, config)
            if calibrator is not None:
                self.calibrated_batches = calibrator.batches_served
        finally:
            if cuda_ctx is not None:
                config.int8_calibrator.free()
                cuda.Context.pop()
                cuda_ctx.detach()
        if serialized is None:
            raise FailedPrecondition(
                f"TensorRT {trt.__version__} could not build {self.onnx_path.name} for "
                f"{self.profile.id} ({self.precision}): "
                + "; ".join(logger.errors or ["no detail from the builder"]))
        self._save_timing_cache(config)
        return bytes(serialized)

    def _add_profile(self, trt, builder, network, config) -> None:
        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape)
                  for i in range(network.num_inputs)}
        unknown = sorted(set(self.shapes) - set(inputs))
        if unknown:
            raise InvalidArgument(f"shapes given for unknown inputs {unknown} "
                                  f"(inputs: {sorted(inputs)})")
        dynamic = [n for n, s in inputs.items() if any(d < 0 for d in s)]
        missing = [n for n in dynamic if n not in self.shapes]
        if missing:
            raise InvalidArgument(f"inputs {missing} have dynamic dims: give shapes "
                                  f"{{name: (min, opt, max)}} for them")
        if not self.shapes:
            return
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in self.shapes.items():
            shape = inputs[name]
            for s in (lo, opt, hi):
                if len(s) != len(shape) or any(
                        d >= 0 and d != v for d, v in zip(shape, s, strict=True)):
                    raise InvalidArgument(f"shape {s} for {name!r} does not fit its dims {shape}")
            if any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi, strict=True)):
                raise InvalidArgument(f"shapes for {name!r} must satisfy min <= opt <= max")
            opt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(opt_profile) < 0:
            raise InvalidArgument(f"TensorRT rejected the optimization profile {self.shapes}")

    def _setup_int8(self, trt, builder, network, config):
        """Returns (pycuda.driver, pushed context) when calibrating, else None."""
        if self.precision != "int8":
            return None
        has_qdq = any(
            network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
            for i in range(network.num_layers))
        if has_qdq:
            return None  # explicit quantization: the Q/DQ scales are used, no calibrator
        if not self.calibration:
            raise InvalidArgument("int8 without Q/DQ nodes needs calibration samples")
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        first = self.calibration[0]
        for k, sample in enumerate(self.calibration):
            if set(sample) != set(names):
                raise InvalidArgument(f"calibration sample {k} has inputs {sorted(sample)}, "
                                      f"expected {sorted(names)}")
            for n in names:
                if np.shape(sample[n]) != np.shape(first[n]):
                    raise InvalidArgument("calibration samples must all have the same shapes "
                                          f"({n}: {np.shape(sample[n])} vs {np.shape(first[n])})")
        cuda = require("pycuda.driver", "tensorrt")
        cuda.init()
        ctx = cuda.Device(self.device).retain_primary_context()
        ctx.push()
        try:
            cal_profile = builder.create_optimization_profile()
            for n in names:
                s = tuple(np.shape(first[n]))
                cal_profile.set_shape(n, s, s, s)  # calibration runs at these exact shapes
            if not config.set_calibration_profile(cal_profile):
                raise InvalidArgument("TensorRT rejected the calibration shapes "
                                      f"{ {n: np.shape(first[n]) for n in names} }")
            config.int8_calibrator = _make_calibrator(trt, cuda, self.calibration)
        except BaseException:
            cuda.Context.pop()
            ctx.detach()
            raise
        return cuda, ctx

    def _load_timing_cache(self, config, logger) -> None:
        data = b""
        if self.timing_cache is not None and self.timing_cache.is_file():
            data = self.timing_cache.read_bytes()
        cache = config.create_timing_cache(data)
        if cache is None:  # unreadable (another TensorRT version?): start from an empty one
            logger.errors.clear()
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    def _save_timing_cache(self, config) -> None:
        if self.timing_cache is None:
            return
        cache = config.get_timing_cache()
        if cache is not None:
            _atomic_write(self.timing_cache, bytes(cache.serialize()))


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on; any difference means a different engine."""

    part_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: str
    shape_profile: str = "static"
    # other builder settings that change the engine ("dla1", "version-compatible"), sorted
    build_options: tuple[str, ...] = ()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    @classmethod
    def for_part(cls, onnx_path: str | os.PathLike, profile: Profile, precision: str,
                 tensorrt_version: str, shapes=None, *, dla_core: int | None = None,
                 version_compatible: bool = False) -> EngineKey:
        if profile.compute_capability is None:
            raise InvalidArgument(f"profile {profile.id} has no GPU compute capability")
        digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
        options = [f"dla{dla_core}"] if dla_core is not None else []
        if version_compatible:
            options.append("version-compatible")
        return cls(digest, str(tensorrt_version), profile.compute_capability, precision,
                   shape_profile_id(shapes), tuple(sorted(options)))


class EngineCache:
    """Engines on disk under ``root``: ``<digest>.engine`` plus a ``<digest>.json`` sidecar."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path_for(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()[:40]}.engine"

    def _sidecar(self, path: Path) -> Path:
        return path.with_suffix(".json")

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached engine for ``key``, only if its sidecar matches ``key`` and its bytes."""
        path = self.path_for(key)
        try:
            meta = json.loads(self._sidecar(path).read_text())
            data = path.read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("key") != json.loads(json.dumps(asdict(key))):  # as stored: lists
            return None
        if meta.get("engine_sha256") != hashlib.sha256(data).hexdigest():
            return None
        return path

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> Path:
        """The engine for ``key``, building (and storing) it when absent or not matching."""
        hit = self.lookup(key)
        if hit is not None:
            return hit
        data = build()
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InternalError("engine build returned no bytes")
        path = self.path_for(key)
        self._sidecar(path).unlink(missing_ok=True)  # never a sidecar for other bytes
        _atomic_write(path, bytes(data))
        meta = {"key": asdict(key), "engine_sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data)}
        _atomic_write(self._sidecar(path), (json.dumps(meta, indent=2) + "\n").encode())
        return path
