"""TensorRT backend: a serialized engine run through pycuda.

``activate`` pushes the device's primary CUDA context, deserializes the engine
(``trt.Runtime.deserialize_cuda_engine``), creates an execution context and a stream, and
allocates pinned host + device buffers for every static-shape tensor. ``infer`` does
``set_input_shape`` (dynamic dims, checked against optimization profile 0), async H2D copies,
``execute_async_v3(stream.handle)``, async D2H copies and one ``stream.synchronize()``. Buffers
grow (never shrink) when a bigger shape arrives.

I/O is name-based (``num_io_tensors`` / ``get_tensor_name`` / ``set_tensor_address``): TensorRT
10's API, also present in 8.5 and 8.6, so no binding-index fallback is needed for TRT >= 8.5.

``tensorrt`` and ``pycuda`` are imported on activation only (install extra ``tensorrt``).
TensorRT and pycuda failures are translated here, and only here, into Tandem errors (chained).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

from tandem.devices.backends._base import Backend, TensorMeta
from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TandemError,
)
from tandem.protocol.lazy import require

__all__ = ["TensorRTBackend"]


def _translate(exc: Exception, what: str, cuda) -> TandemError:
    """The one boundary for TensorRT/pycuda exceptions."""
    if isinstance(exc, TandemError):
        return exc
    if cuda is not None and isinstance(exc, getattr(cuda, "MemoryError", ())):
        return ResourceExhausted(f"{what}: out of device or pinned memory: {exc}")
    return InternalError(f"{what}: {type(exc).__name__}: {exc}")


def _logger(trt):
    """A TensorRT logger that keeps errors so they can go into our exception messages."""

    class _Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(str(msg))

    return _Capture()


class _Buffer:
    """A pinned host buffer and a device buffer for one I/O tensor; grows on demand."""

    __slots__ = ("capacity", "device", "dtype", "host", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype
        self.capacity = 0
        self.host = None
        self.device = None

    def ensure(self, cuda, shape: tuple[int, ...]) -> np.ndarray:
        """Room for ``shape``; returns the pinned host view of that shape."""
        count = math.prod(shape)
        nbytes = max(count * self.dtype.itemsize, 1)
        if nbytes > self.capacity:
            self.free()
            self.device = cuda.mem_alloc(nbytes)
            self.host = cuda.pagelocked_empty(max(count, 1), self.dtype)
            self.capacity = nbytes
        return self.host[:count].reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
        base = getattr(self.host, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()
        self.device = self.host = None
        self.capacity = 0


class TensorRTBackend(Backend):
    """Run a serialized TensorRT engine (a path or bytes) on CUDA device ``device``.

    ``dla_core`` must be given for engines built for a DLA core; ``allow_host_code`` lets the
    runtime load version-compatible engines (they embed a lean runtime, i.e. host code).
    """

    def __init__(
        self,
        engine_path_or_bytes: str | os.PathLike | bytes,
        device: int = 0,
        *,
        dla_core: int | None = None,
        allow_host_code: bool = False,
        name: str | None = None,
    ) -> None:
        if not isinstance(engine_path_or_bytes, (str, os.PathLike, bytes, bytearray)):
            raise InvalidArgument("TensorRTBackend needs an engine path or serialized bytes")
        if device < 0:
            raise InvalidArgument("device must be >= 0")
        label = (f"<{len(engine_path_or_bytes)} bytes>"
                 if isinstance(engine_path_or_bytes, (bytes, bytearray))
                 else Path(os.fspath(engine_path_or_bytes)).name)
        super().__init__(name or f"TensorRTBackend({label})")
        self._source = engine_path_or_bytes
        self._device = device
        self._dla_core = dla_core
        self._allow_host_code = allow_host_code
        self._lock = threading.Lock()
        # Everything below is created by activate(), never before.
        self._trt = self._cuda = self._cuda_ctx = None
        self._runtime = self._engine = self._context = self._stream = None
        self._buffers: dict[str, _Buffer] = {}
        self._in_names: list[str] = []
        self._out_names: list[str] = []
        self._bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._dynamic: set[str] = set()

    # ------------------------------------------------------------ activate
    def _activate_impl(self) -> None:
        trt = require("tensorrt", "tensorrt")
        cuda = require("pycuda.driver", "tensorrt")
        src = self._source
        if isinstance(src, (bytes, bytearray)):
            data = bytes(src)
        else:
            try:
                data = Path(os.fspath(src)).read_bytes()
            except FileNotFoundError as exc:
                raise NotFound(f"{self.name}: no engine file at {src}") from exc
        self._trt, self._cuda = trt, cuda
        try:
            cuda.init()
            if self._device >= cuda.Device.count():
                raise FailedPrecondition(f"{self.name}: no CUDA device {self._device} "
                                         f"({cuda.Device.count()} present)")
            self._cuda_ctx = cuda.Device(self._device).retain_primary_context()
            self._cuda_ctx.push()
        except Exception as exc:
            self._cuda_ctx = None
            raise _translate(exc, f"{self.name}: cannot open CUDA device {self._device}",
                             cuda) from exc
        try:
            self._load(trt, cuda, data)
        except Exception as exc:
            cuda.Context.pop()  # undo our push before _release pushes/pops its own
            self._release()
            raise _translate(exc, f"{self.name}: cannot load the engine", cuda) from exc
        cuda.Context.pop()

    def _load(self, trt, cuda, data: bytes) -> None:
        logger = _logger(trt)
        self._logger = logger
        self._runtime = trt.Runtime(logger)
        if self._allow_host_code:
            self._runtime.engine_host_code_allowed = True
        if self._dla_core is not None:
            self._runtime.DLA_core = self._dla_core
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise InvalidArgument(
                f"{self.name}: TensorRT {trt.__version__} cannot deserialize this engine "
                f"({'; '.join(logger.errors) or 'no detail'}); engines are specific to the "
                "TensorRT version and GPU they were built for (rebuild it for this device)")
        if not hasattr(engine, "num_io_tensors"):
            raise FailedPrecondition(f"{self.name}: TensorRT {trt.__version__} lacks the "
                                     "name-based I/O API (needs TensorRT >= 8.5)")
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ResourceExhausted(f"{self.name}: cannot create an execution context "
                                    f"({'; '.join(logger.errors) or 'no detail'})")
        self._stream = cuda.Stream()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._in_names if is_input else self._out_names).append(name)
            self._buffers[name] = buf = _Buffer(name, dtype)
            shape = tuple(engine.get_tensor_shape(name))
            if is_input and any(d < 0 for d in shape):
                lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
                self._bounds[name] = (tuple(lo), tuple(hi))
                self._dynamic.add(name)
            elif all(d >= 0 for d in shape):
                buf.ensure(cuda, shape)  # static: allocate once, now
                if not self._context.set_tensor_address(name, int(buf.device)):
                    raise InternalError(f"{self.name}: set_tensor_address({name!r}) failed")

    def _io_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        def meta(name: str) -> TensorMeta:
            shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
            return TensorMeta(name, self._buffers[name].dtype, shape)

        return [meta(n) for n in self._in_names], [meta(n) for n in self._out_names]

    def _max_batch_impl(self) -> int | None:
        highs = [hi[0] for name, (_lo, hi) in self._bounds.items() if hi]
        return min(highs) if highs else None

    # ------------------------------------------------------------ infer
    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, ctx, stream = self._cuda, self._context, self._stream
        with self._lock:
            self._cuda_ctx.push()
            try:
                for name in self._in_names:
                    arr = feeds[name]
                    shape = arr.shape
                    buf = self._buffers[name]
                    if name in self._dynamic:
                        lo, hi = self._bounds[name]
                        if any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
                            raise InvalidArgument(
                                f"{self.name}: input {name!r} shape {shape} is outside the "
                                f"engine's optimization profile (min {lo}, max {hi})")
                        if not ctx.set_input_shape(name, shape):
                            raise InvalidArgument(f"{self.name}: TensorRT rejected shape {shape} "
                                                  f"for {name!r}: {self._errors()}")
                        old = buf.device
                        host = buf.ensure(cuda, shape)
                        if buf.device is not old:
                            ctx.set_tensor_address(name, int(buf.device))
                    else:
                        host = buf.host[: arr.size].reshape(shape)
                    np.copyto(host, arr, casting="no")
                    if arr.size:
                        cuda.memcpy_htod_async(buf.device, host, stream)
                views = []
                for name in self._out_names:
                    shape = tuple(ctx.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise InternalError(f"{self.name}: output {name!r} shape unresolved "
                                            f"{shape}: {self._errors()}")
                    buf = self._buffers[name]
                    old = buf.device
                    views.append(buf.ensure(cuda, shape))
                    if buf.device is not old:
                        ctx.set_tensor_address(name, int(buf.device))
                if not ctx.execute_async_v3(stream.handle):
                    raise InternalError(f"{self.name}: execute_async_v3 failed: {self._errors()}")
                for name, view in zip(self._out_names, views, strict=True):
                    if view.size:
                        cuda.memcpy_dtoh_async(view, self._buffers[name].device, stream)
                stream.synchronize()
                names = self._out_names
                return {name: view.copy() for name, view in zip(names, views, strict=True)}
            except TandemError:
                raise
            except Exception as exc:
                raise _translate(exc, f"{self.name}: inference failed", cuda) from exc
            finally:
                cuda.Context.pop()

    def _errors(self) -> str:
        errors = getattr(self, "_logger", None)
        errors = errors.errors[-3:] if errors is not None else []
        return "; ".join(errors) or "no detail from TensorRT"

    # ------------------------------------------------------------ deactivate
    def _deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        cuda, cuda_ctx = self._cuda, self._cuda_ctx
        if cuda_ctx is not None:
            cuda_ctx.push()
            try:
                if self._stream is not None:
                    self._stream.synchronize()
                for buf in self._buffers.values():
                    buf.free()
            finally:
                self._context = self._engine = self._runtime = self._stream = None
                cuda.Context.pop()
                cuda_ctx.detach()
        self._cuda_ctx = None
        self._buffers = {}
        self._in_names, self._out_names = [], []
        self._bounds, self._dynamic = {}, set()
