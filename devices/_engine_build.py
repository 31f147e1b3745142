"""Build a TensorRT engine from an ONNX part: :class:`EngineFromOnnx` (public through
:mod:`tandem.devices.engines`), used by the compiler at compile time and by a device building
the engine a bundle's recipe describes.

``EngineFromOnnx(...)`` is a Polygraphy-style step: constructing it does nothing; calling it
pushes the target device's primary CUDA context (so ``trt.Builder`` works on that device, not on
whatever context is current), parses the ONNX file, configures the builder from the target
:class:`~tandem.devices.profiles.Profile` and returns the serialized engine bytes:

- precision: ``fp32`` (no flag), ``fp16`` (``BuilderFlag.FP16``), ``int8`` (``INT8`` + ``FP16``
  so layers without INT8 kernels fall back to FP16, as ``trtexec --int8 --fp16``). A model with
  Q/DQ layers (explicit quantization, NVIDIA's recommended path since TensorRT 10.1) uses its
  scales and no calibrator. Otherwise (implicit INT8, deprecated in 10.1) it calibrates with an
  ``IInt8EntropyCalibrator2`` (the calibrator NVIDIA requires for DLA) fed the given samples:
  non-index inputs cast to float32 (TensorRT reads them as float32 whatever the network's
  type), index inputs in their own type, every sample checked against the network's shapes, at a
  calibration profile of exactly the samples' shapes. An exception while feeding a batch (which
  TensorRT's trampoline would print and treat as "no more batches") is kept and raised after the
  build. We keep our own reference to the calibrator (the ``int8_calibrator`` getter is
  deprecated); deprecated calls are made with their DeprecationWarning silenced, on purpose.
- TensorRT >= 11 builds strongly typed networks only (no ``BuilderFlag.FP16/INT8``, no
  calibrators): ``fp16`` and implicit ``int8`` are refused with a clear error there; a Q/DQ model
  builds as ``int8``, an fp32 one as ``fp32``.
- workspace: ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, workspace MiB)``;
- dynamic inputs: one optimization profile from ``shapes`` = {name: (min, opt, max)};
- DLA: ``default_device_type = DeviceType.DLA``, ``DLA_core`` and ``GPU_FALLBACK``, only where
  the profile has DLA cores (DLA runs FP16/INT8 only). DLA has no dynamic dimensions, so the
  profile is made static at each input's ``opt`` shape (otherwise, with GPU fallback, every
  layer would quietly run on the GPU); :meth:`EngineFromOnnx.for_batch_sizes` gives one static
  build per batch size where more than one is needed;
- ``version_compatible``: ``BuilderFlag.VERSION_COMPATIBLE`` (TRT >= 8.6; the engine embeds a
  lean runtime, so it must be loaded with host code allowed);
- timing cache: ``timing_cache`` names a base path; the file used is keyed by the GPU's name,
  compute capability and the TensorRT version (:func:`timing_cache_file`). It is loaded (a cache
  TensorRT refuses, ``set_timing_cache`` returning False, is replaced by an empty one) and, after
  the build, merged with what is on disk under a file lock and written back atomically, as
  Polygraphy's ``EngineBytesFromNetwork`` does, so concurrent builds keep each other's entries.

TensorRT signals failure by return values plus logger messages; they are translated here into
Tandem errors: parser failures -> :class:`UnsupportedModel` (listing every parser error), a
failed build -> :class:`~tandem.protocol.errors.FailedPrecondition` with the logged errors.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tandem.devices._cuda import capture_logger, pushed, translate
from tandem.devices._engine_cache import (
    DeviceIdentity,
    EngineKey,
    build_options,
    calibration_digest,
    shape_profile_id,
    static_shapes,
)
from tandem.devices.profiles import Profile
from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    TandemError,
)
from tandem.protocol.files import atomic_write, file_lock
from tandem.protocol.lazy import require

__all__ = ["PRECISIONS", "EngineFromOnnx", "UnsupportedModel", "timing_cache_file"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
Shape = tuple[int, ...]


class UnsupportedModel(InvalidArgument):
    """The TensorRT ONNX parser rejected the model; ``errors`` lists what it said."""

    def __init__(self, message: str = "", errors: Sequence[str] = (), **kw) -> None:
        super().__init__(message, **kw)
        self.errors = list(errors)


def timing_cache_file(base: str | os.PathLike, identity: DeviceIdentity,
                      tensorrt_version: str) -> Path:
    """The timing-cache file for this GPU and TensorRT: ``timing.cache`` ->
    ``timing.NVIDIA-Jetson-AGX-Orin.sm87.trt10.3.0.26.cache`` (same folder)."""
    base = Path(base)
    version = "".join(c if c.isalnum() or c in "._-" else "-" for c in str(tensorrt_version))
    suffix = base.suffix or ".cache"
    stem = base.stem if base.suffix else base.name
    return base.with_name(f"{stem}.{identity.slug}.trt{version}{suffix}")


def _major_minor(trt) -> tuple[int, int]:
    parts = str(trt.__version__).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def _strongly_typed_only(trt) -> bool:
    """TensorRT >= 11: no precision flags, no calibrators (``release/11.0`` pyCore.cpp)."""
    return _major_minor(trt) >= (11, 0) or not hasattr(trt.BuilderFlag, "FP16")


def _deprecated(call, *args):
    """Call a TensorRT API deprecated in 10.1 that we still need on 10.x, without the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return call(*args)


def _make_calibrator(trt, cuda, batches: list[dict[str, np.ndarray]]):
    """An IInt8EntropyCalibrator2 that feeds ``batches`` (checked, cast host arrays)."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # required for TensorRT's trampoline
            self._it = iter(batches)
            self._device: dict[str, Any] = {}  # pycuda DeviceAllocations
            self.batches_served = 0
            self.cache: bytes | None = None
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is part of each input's shape

        def get_batch(self, names):
            # TensorRT's trampoline prints any exception raised here and takes it for "no more
            # batches" (silently bad scales), so keep it for the builder to raise afterwards.
            if self.error is not None:
                return None
            try:
                batch = next(self._it, None)
                if batch is None:
                    return None
                ptrs = []
                for name in names:
                    arr = batch[name]
                    if name not in self._device:
                        self._device[name] = cuda.mem_alloc(max(arr.nbytes, 1))
                    cuda.memcpy_htod(self._device[name], arr)
                    ptrs.append(int(self._device[name]))
                self.batches_served += 1
                return ptrs
            except BaseException as exc:  # raised again after the build
                self.error = exc
                return None

        def read_calibration_cache(self):
            return None  # always calibrate from the samples given

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(memoryview(cache))

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
        workspace_mb: int | None = None,
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
        if not isinstance(device, int) or device < 0:
            raise InvalidArgument("device must be a CUDA device number >= 0")
        if workspace_mb is not None and (not isinstance(workspace_mb, int) or workspace_mb <= 0):
            raise InvalidArgument("workspace_mb must be a positive integer")
        self.onnx_path = Path(onnx_path)
        self.profile = profile
        self.precision = precision
        try:
            self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
                str(n): tuple(tuple(int(d) for d in s) for s in v)  # type: ignore[misc]
                for n, v in (shapes or {}).items()}
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"shapes must map names to (min, opt, max) lists of ints: "
                                  f"{exc}") from exc
        for name, triple in self.shapes.items():
            if len(triple) != 3:
                raise InvalidArgument(f"shapes[{name!r}] must be (min, opt, max)")
        self.requested_shapes = dict(self.shapes)
        self.notes: list[str] = []
        if dla_core is not None and any(lo != hi for lo, _opt, hi in self.shapes.values()):
            self.shapes = static_shapes(self.shapes)
            self.notes.append(
                "DLA has no dynamic dimensions: the engine is built for the opt shapes only ("
                + shape_profile_id(self.shapes) + "); use for_batch_sizes() for more")
            log.warning("%s: %s", self.onnx_path.name, self.notes[-1])
        self.calibration = list(calibration) if calibration is not None else None
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.version_compatible = version_compatible
        self.dla_core = dla_core
        self.device = device
        self.workspace_mb = workspace_mb or profile.workspace_mb
        self.calibrated_batches = 0  # set by the last call, for reports
        self.timing_cache_used: Path | None = None  # the keyed file of the last call

    # ---------------------------------------------------------------- variants and keys
    @classmethod
    def from_recipe(cls, onnx_path: str | os.PathLike, profile: Profile, precision: str,
                    recipe, **kw) -> EngineFromOnnx:
        """The build an artifact's on-device recipe describes (a mapping or a record with
        ``workspace_mb``, ``shapes``, ``version_compatible``, ``dla_core``)."""

        def field(name: str, default=None):
            if isinstance(recipe, Mapping):
                return recipe.get(name, default)
            return getattr(recipe, name, default)

        shapes = field("shapes") or None
        if shapes is not None and not isinstance(shapes, Mapping):
            raise InvalidArgument("the engine recipe's shapes must be a mapping")
        dla_core = field("dla_core")
        if dla_core is not None and (isinstance(dla_core, bool) or not isinstance(dla_core, int)):
            raise InvalidArgument("the engine recipe's dla_core must be an integer or null")
        vc = field("version_compatible", False)
        if not isinstance(vc, bool):
            raise InvalidArgument("the engine recipe's version_compatible must be a boolean")
        return cls(onnx_path, profile, precision, shapes, dla_core=dla_core,
                   version_compatible=vc,
                   workspace_mb=field("workspace_mb") or None, **kw)

    def for_batch_sizes(self, batch_sizes: Sequence[int]) -> list[EngineFromOnnx]:
        """One build per batch size, each with a static profile (leading dim = the batch size,
        other dims at ``opt``): what a DLA target needs to serve more than one batch size."""
        out = []
        for n in batch_sizes:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InvalidArgument(f"batch sizes must be integers >= 1, not {n!r}")
            shapes = {}
            for name, (lo, opt, hi) in self.requested_shapes.items():
                if not lo or not lo[0] <= n <= hi[0]:
                    raise InvalidArgument(f"batch size {n} is outside {name!r}'s profile "
                                          f"({lo[0] if lo else '-'}..{hi[0] if hi else '-'})")
                s = (n, *opt[1:])
                shapes[name] = (s, s, s)
            step = EngineFromOnnx(self.onnx_path, self.profile, self.precision, shapes,
                                  self.calibration, self.timing_cache, self.version_compatible,
                                  self.dla_core, device=self.device,
                                  workspace_mb=self.workspace_mb)
            out.append(step)
        return out

    def engine_key(self, tensorrt_version: str | None = None,
                   identity: DeviceIdentity | None = None) -> EngineKey:
        """The :class:`EngineKey` of this build on its device (read from the device)."""
        if tensorrt_version is None:
            tensorrt_version = require("tensorrt", "tensorrt").__version__
        return EngineKey.for_part(self.onnx_path, self.profile, self.precision, tensorrt_version,
                                  self.shapes or None, dla_core=self.dla_core,
                                  version_compatible=self.version_compatible, device=self.device,
                                  identity=identity, calibration=self.calibration)

    def complete_key(self, key: EngineKey) -> EngineKey:
        """``key`` with what only this build knows (its calibration data's digest); an
        :class:`~tandem.protocol.errors.InternalError` when ``key`` describes another build."""
        mine = (self.precision, shape_profile_id(self.shapes or None),
                build_options(self.dla_core, self.version_compatible))
        theirs = (key.precision, key.shape_profile, key.build_options)
        if mine != theirs:
            raise InternalError(f"engine key {theirs} does not describe this build {mine}")
        if self.precision == "int8" and self.calibration and not key.calibration_sha256:
            key = replace(key, calibration_sha256=calibration_digest(self.calibration))
        return key

    # ---------------------------------------------------------------- build
    def __call__(self) -> bytes:
        trt = require("tensorrt", "tensorrt")
        cuda = require("pycuda.driver", "tensorrt")
        if not self.onnx_path.is_file():
            raise InvalidArgument(f"no ONNX file at {self.onnx_path}")
        logger = capture_logger(trt)
        try:
            with pushed(cuda, self.device):  # the builder binds to the current context
                return self._build(trt, cuda, logger)
        except TandemError:
            raise
        except Exception as exc:  # the TensorRT/pycuda boundary
            raise translate(exc, f"TensorRT build of {self.onnx_path.name} failed",
                            cuda) from exc

    def _build(self, trt, cuda, logger) -> bytes:
        strongly_typed = _strongly_typed_only(trt)
        if strongly_typed and self.precision == "fp16":
            raise FailedPrecondition(
                f"TensorRT {trt.__version__} builds strongly typed networks only: the precision "
                "follows the model's types, there is no FP16 flag; export the model in float16 "
                "and build it as fp32, or use TensorRT 10")
        builder = trt.Builder(logger)
        flags = 0
        if _major_minor(trt)[0] < 10:  # explicit batch is the only mode in TRT 10
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
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_mb) << 20)
        if self.precision in ("fp16", "int8") and not strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        calibrator = None
        if self.precision == "int8":
            calibrator = self._setup_int8(trt, cuda, builder, network, config, strongly_typed)
        if self.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if self.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = self.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        self._add_profile(builder, network, config)
        cache_file = self._load_timing_cache(trt, config, logger)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                self.calibrated_batches = calibrator.batches_served
                calibrator.free()
        if calibrator is not None and calibrator.error is not None:
            error = calibrator.error
            raise translate(error, f"calibration of {self.onnx_path.name} failed at batch "
                                   f"{calibrator.batches_served + 1}", cuda) from error
        if serialized is None:
            raise FailedPrecondition(
                f"TensorRT {trt.__version__} could not build {self.onnx_path.name} for "
                f"{self.profile.id} ({self.precision}): "
                + "; ".join(logger.errors or ["no detail from the builder"]))
        if cache_file is not None:
            self._save_timing_cache(config, cache_file)
        return bytes(memoryview(serialized))

    def _add_profile(self, builder, network, config) -> None:
        inputs = {network.get_input(i).name: network.get_input(i)
                  for i in range(network.num_inputs)}
        unknown = sorted(set(self.shapes) - set(inputs))
        if unknown:
            raise InvalidArgument(f"shapes given for unknown inputs {unknown} "
                                  f"(inputs: {sorted(inputs)})")
        shape_inputs = sorted(n for n, t in inputs.items() if getattr(t, "is_shape_tensor", False))
        if shape_inputs:
            raise FailedPrecondition(
                f"inputs {shape_inputs} are shape tensors (their values decide shapes); Tandem "
                "does not give shape-value profiles yet, so this part cannot be built here")
        dynamic = [n for n, t in inputs.items() if any(d < 0 for d in tuple(t.shape))]
        missing = [n for n in dynamic if n not in self.shapes]
        if missing:
            raise InvalidArgument(f"inputs {missing} have dynamic dims: give shapes "
                                  f"{{name: (min, opt, max)}} for them")
        if not self.shapes:
            return
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in self.shapes.items():
            shape = tuple(inputs[name].shape)
            for s in (lo, opt, hi):
                if len(s) != len(shape) or any(
                        d >= 0 and d != v for d, v in zip(shape, s, strict=True)):
                    raise InvalidArgument(f"shape {s} for {name!r} does not fit its dims {shape}")
            if any(not (0 <= a <= b <= c < 1 << 31) for a, b, c in zip(lo, opt, hi, strict=True)):
                raise InvalidArgument(f"shapes for {name!r} must satisfy 0 <= min <= opt <= max "
                                      "< 2**31")
            opt_profile.set_shape(name, lo, opt, hi)  # raises RuntimeError if inconsistent
        if config.add_optimization_profile(opt_profile) < 0:
            raise InvalidArgument(f"TensorRT rejected the optimization profile {self.shapes}")

    # ---------------------------------------------------------------- int8
    def _setup_int8(self, trt, cuda, builder, network, config, strongly_typed: bool):
        """Returns our calibrator when calibrating (implicit INT8), else None."""
        has_qdq = any(
            network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
            for i in range(network.num_layers))
        if has_qdq:
            if self.calibration:
                log.info("%s has Q/DQ layers: their scales are used, the calibration samples "
                         "are not", self.onnx_path.name)
            if not strongly_typed:
                config.set_flag(trt.BuilderFlag.INT8)
            return None  # explicit quantization: no calibrator
        if strongly_typed:
            raise FailedPrecondition(
                f"TensorRT {trt.__version__} removed implicit INT8 calibration: give a model "
                f"with Q/DQ nodes (explicit quantization) for int8, or use TensorRT 10")
        if not self.calibration:
            raise InvalidArgument("int8 without Q/DQ nodes needs calibration samples")
        batches = self._calibration_batches(trt, network)
        config.set_flag(trt.BuilderFlag.INT8)
        dynamic = any(any(d < 0 for d in tuple(network.get_input(i).shape))
                      for i in range(network.num_inputs))
        if dynamic:  # calibration runs at exactly the samples' shapes
            cal_profile = builder.create_optimization_profile()
            for name, arr in batches[0].items():
                cal_profile.set_shape(name, arr.shape, arr.shape, arr.shape)
            if not _deprecated(config.set_calibration_profile, cal_profile):
                raise InvalidArgument("TensorRT rejected the calibration shapes "
                                      f"{ {n: a.shape for n, a in batches[0].items()} }")
        calibrator = _make_calibrator(trt, cuda, batches)
        with warnings.catch_warnings():  # deprecated in 10.1, needed for implicit INT8
            warnings.simplefilter("ignore", DeprecationWarning)
            config.int8_calibrator = calibrator
        return calibrator

    def _calibration_batches(self, trt, network) -> list[dict[str, np.ndarray]]:
        """The samples as TensorRT reads them: checked against the network, cast, contiguous."""
        index_types = {trt.DataType.INT32, trt.DataType.INT64, trt.DataType.BOOL}
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        names = sorted(t.name for t in inputs)
        batches = []
        first_shapes: dict[str, tuple] = {}
        for k, sample in enumerate(self.calibration or ()):
            if not isinstance(sample, Mapping) or sorted(sample) != names:
                got = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise InvalidArgument(f"calibration sample {k} has inputs {got}, expected "
                                      f"{names}")
            batch = {}
            for t in inputs:
                arr = np.asarray(sample[t.name])
                network_shape = tuple(t.shape)
                if arr.ndim != len(network_shape) or any(
                        d >= 0 and d != s for d, s in zip(network_shape, arr.shape, strict=True)):
                    raise InvalidArgument(f"calibration sample {k}: {t.name!r} has shape "
                                          f"{arr.shape}, the network wants {network_shape}")
                if first_shapes.setdefault(t.name, arr.shape) != arr.shape:
                    raise InvalidArgument(
                        "calibration samples must all have the same shapes "
                        f"({t.name}: {arr.shape} vs {first_shapes[t.name]})")
                if t.dtype in index_types:
                    target = np.dtype(trt.nptype(t.dtype))
                    cast = arr.astype(target)
                    if arr.dtype.kind not in "biu" or not np.array_equal(cast, arr):
                        raise InvalidArgument(f"calibration sample {k}: {t.name!r} must hold "
                                              f"{target} values, got {arr.dtype}")
                else:  # TensorRT reads non-index calibration inputs as float32
                    if arr.dtype.kind not in "biuf":
                        raise InvalidArgument(f"calibration sample {k}: {t.name!r} has dtype "
                                              f"{arr.dtype}, not a number type")
                    with np.errstate(over="ignore", invalid="ignore"):
                        cast = arr.astype(np.float32)
                    if not np.isfinite(cast).all():
                        raise InvalidArgument(f"calibration sample {k}: {t.name!r} has "
                                              "non-finite values (after the cast to float32)")
                batch[t.name] = np.ascontiguousarray(cast)
            batches.append(batch)
        return batches

    # ---------------------------------------------------------------- timing cache
    def _load_timing_cache(self, trt, config, logger) -> Path | None:
        if self.timing_cache is None:
            return None
        identity = DeviceIdentity.read(self.device)
        path = timing_cache_file(self.timing_cache, identity, trt.__version__)
        self.timing_cache_used = path
        data = b""
        with file_lock(path):
            if path.is_file():
                data = path.read_bytes()
        mark = len(logger.errors)
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, False):
            # Corrupt, or made for another device or TensorRT although the name says otherwise.
            log.warning("%s: TensorRT refused the timing cache %s (%s); starting an empty one",
                        self.onnx_path.name, path, "; ".join(logger.errors[mark:]) or "no detail")
            del logger.errors[mark:]
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, False):
                raise FailedPrecondition(f"TensorRT {trt.__version__} refused an empty timing "
                                         f"cache: {'; '.join(logger.errors) or 'no detail'}")
        return path

    def _save_timing_cache(self, config, path: Path) -> None:
        """Merge with what other builds saved meanwhile, under the lock, then write."""
        cache = config.get_timing_cache()
        if cache is None:
            return
        with file_lock(path):
            if path.is_file():
                on_disk = config.create_timing_cache(path.read_bytes())
                if on_disk is not None and not cache.combine(on_disk, False):
                    log.warning("could not merge the timing cache %s into this build's; "
                                "writing this build's", path)
            atomic_write(path, memoryview(cache.serialize()))
