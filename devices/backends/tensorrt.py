"""TensorRT backend: a serialized engine run through pycuda.

``activate`` pushes the device's primary CUDA context (retained once per device per process and
never released, as ``pycuda/autoprimaryctx.py`` does, see ``devices/_cuda.py``), deserializes the
engine (``trt.Runtime.deserialize_cuda_engine``), creates an execution context and a stream, and
allocates pinned host + device buffers for every static-shape tensor. ``infer`` does
``set_input_shape`` (dynamic dims, checked against optimization profile 0), async H2D copies,
``execute_async_v3(stream.handle)``, async D2H copies and one ``stream.synchronize()``. Buffers
grow (never shrink) when a bigger shape arrives.

Tensors TensorRT treats specially:

- **shape tensors** (``engine.is_shape_inference_io(name)`` / ``get_tensor_location(name) ==
  TensorLocation.HOST``): inputs whose values decide shapes live in host memory; their address
  is a host buffer of ours (as Polygraphy's ``TrtRunner`` passes a host pointer), set before the
  output shapes are asked for;
- **data-dependent output shapes** (an output dim still -1 once every input is set): an
  ``IOutputAllocator`` (as Polygraphy's runner uses) gets device memory when TensorRT knows the
  size, and the shape it reports sizes the copy back;
- **BF16** I/O has no numpy type (``trt.nptype`` raises TypeError); it travels as uint16 bit
  patterns (as ``samples/python/common_runtime.py`` falls back to byte buffers, and as
  ``tandem.protocol.DType.BFLOAT16`` carries it). FP8, INT4 and other types without a numpy
  equivalent are refused at activation with a clear error.

I/O is name-based (``num_io_tensors`` / ``get_tensor_name`` / ``set_tensor_address``): TensorRT
10's API, also present in 8.5 and 8.6, so no binding-index fallback is needed for TRT >= 8.5.

An engine TensorRT warns is from another device model ("Using an engine plan file across different
models of devices is not recommended ...") loads with a logged warning, or raises
:class:`ForeignEngine` when ``foreign_engine="error"`` (how the engine cache treats it as a miss).

``tensorrt`` and ``pycuda`` are imported on activation only (install extra ``tensorrt``).
TensorRT and pycuda failures are translated by ``devices/_cuda.translate`` (chained).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tandem.devices._cuda import capture_logger, primary_context, translate
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

__all__ = ["ForeignEngine", "TensorRTBackend"]

log = logging.getLogger(__name__)

# TensorRT's warning when a plan was built on another device model of the same compute capability.
NOT_PORTABLE = "across different models of devices"


class ForeignEngine(FailedPrecondition):
    """TensorRT says the engine was built on another device model (it may be slow or wrong)."""


def _output_allocator(trt, cuda):
    """An IOutputAllocator handing out device buffers that grow (never shrink)."""

    class _Allocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)  # required for TensorRT's trampoline
            self.buffers: dict[str, Any] = {}  # pycuda DeviceAllocations
            self.capacity: dict[str, int] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.error: BaseException | None = None

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            # TensorRT's trampoline prints and swallows exceptions: keep them for infer().
            try:
                size = max(int(size), 1)
                if self.capacity.get(tensor_name, 0) < size:
                    old = self.buffers.pop(tensor_name, None)
                    if old is not None:
                        old.free()
                    self.capacity.pop(tensor_name, None)
                    self.buffers[tensor_name] = cuda.mem_alloc(size)
                    self.capacity[tensor_name] = size
                return int(self.buffers[tensor_name])
            except BaseException as exc:  # kept for infer() to raise
                self.error = exc
                return 0

        def reallocate_output(self, tensor_name, memory, size, alignment):  # TensorRT < 10
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def notify_shape(self, tensor_name, shape) -> None:
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def free(self) -> None:
            for buf in self.buffers.values():
                buf.free()
            self.buffers, self.capacity = {}, {}

    return _Allocator()


class _Buffer:
    """A pinned host buffer and a device buffer for one I/O tensor; grows on demand."""

    __slots__ = ("capacity", "device", "dtype", "host", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype
        self.capacity = 0
        self.host: Any = None  # pinned numpy array
        self.device: Any = None  # pycuda DeviceAllocation

    def ensure(self, cuda, shape: tuple[int, ...], *, device: bool = True) -> np.ndarray:
        """Room for ``shape``; returns the pinned host view of that shape."""
        count = math.prod(shape)
        nbytes = max(count * self.dtype.itemsize, 1)
        if nbytes > self.capacity:
            self.free()
            if device:
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

    ``dla_core`` is set on the runtime before deserializing an engine built for a DLA core;
    ``allow_host_code`` lets the runtime load version-compatible engines (they embed a lean
    runtime, i.e. host code); ``foreign_engine`` is ``"warn"`` (log) or ``"error"``
    (:class:`ForeignEngine`) for an engine TensorRT says was built on another device model.
    """

    def __init__(
        self,
        engine_path_or_bytes: str | os.PathLike | bytes,
        device: int = 0,
        *,
        dla_core: int | None = None,
        allow_host_code: bool = False,
        name: str | None = None,
        foreign_engine: str = "warn",
    ) -> None:
        if not isinstance(engine_path_or_bytes, (str, os.PathLike, bytes, bytearray)):
            raise InvalidArgument("TensorRTBackend needs an engine path or serialized bytes")
        if device < 0:
            raise InvalidArgument("device must be >= 0")
        if foreign_engine not in ("warn", "error"):
            raise InvalidArgument("foreign_engine must be 'warn' or 'error'")
        label = (f"<{len(engine_path_or_bytes)} bytes>"
                 if isinstance(engine_path_or_bytes, (bytes, bytearray))
                 else Path(os.fspath(engine_path_or_bytes)).name)
        super().__init__(name or f"TensorRTBackend({label})")
        self._source = engine_path_or_bytes
        self._device = device
        self._dla_core = dla_core
        self._allow_host_code = allow_host_code
        self._foreign_engine = foreign_engine
        self._lock = threading.Lock()
        # Everything below is created by activate(), never before.
        # (typed Any: TensorRT and pycuda objects, None while inactive)
        self._trt: Any = None
        self._cuda: Any = None
        self._cuda_ctx: Any = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._allocator: Any = None
        self._buffers: dict[str, _Buffer] = {}
        self._in_names: list[str] = []
        self._out_names: list[str] = []
        self._bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._dynamic: set[str] = set()
        self._host_inputs: set[str] = set()  # shape tensors: host memory
        self._host_arrays: dict[str, np.ndarray] = {}
        self._value_bounds: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._data_dependent: set[str] = set()  # outputs sized by the output allocator
        self._batch_ok = True

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
            self._cuda_ctx = primary_context(cuda, self._device)
            self._cuda_ctx.push()
        except Exception as exc:
            self._cuda_ctx = None
            if isinstance(exc, FailedPrecondition):
                raise FailedPrecondition(f"{self.name}: {exc}") from exc
            raise translate(exc, f"{self.name}: cannot open CUDA device {self._device}",
                            cuda) from exc
        try:
            self._load(trt, cuda, data)
        except Exception as exc:
            cuda.Context.pop()  # undo our push before _release pushes/pops its own
            self._release()
            raise translate(exc, f"{self.name}: cannot load the engine", cuda) from exc
        cuda.Context.pop()

    def _load(self, trt, cuda, data: bytes) -> None:
        logger = self._logger = capture_logger(trt)
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
        foreign = [w for w in logger.warnings if NOT_PORTABLE in w]
        if foreign:
            message = (f"{self.name}: the engine was built on another device model than CUDA "
                       f"device {self._device} (TensorRT: {foreign[0]})")
            if self._foreign_engine == "error":
                raise ForeignEngine(message)
            log.warning("%s", message)
        if not hasattr(engine, "num_io_tensors"):
            raise FailedPrecondition(f"{self.name}: TensorRT {trt.__version__} lacks the "
                                     "name-based I/O API (needs TensorRT >= 8.5)")
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ResourceExhausted(f"{self.name}: cannot create an execution context "
                                    f"({'; '.join(logger.errors) or 'no detail'})")
        self._stream = cuda.Stream()
        host = getattr(getattr(trt, "TensorLocation", None), "HOST", None)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = self._numpy_dtype(trt, name, engine.get_tensor_dtype(name))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._in_names if is_input else self._out_names).append(name)
            self._buffers[name] = buf = _Buffer(name, dtype)
            shape = tuple(engine.get_tensor_shape(name))
            on_host = is_input and (engine.is_shape_inference_io(name) or (
                host is not None and engine.get_tensor_location(name) == host))
            if on_host:
                self._host_inputs.add(name)
                self._value_bounds[name] = self._profile_values(engine, name)
            if is_input and any(d < 0 for d in shape):
                lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
                self._bounds[name] = (tuple(lo), tuple(hi))
                self._dynamic.add(name)
            elif all(d >= 0 for d in shape) and not on_host:
                buf.ensure(cuda, shape)  # static: allocate once, now
                if not self._context.set_tensor_address(name, int(buf.device)):
                    raise InternalError(f"{self.name}: set_tensor_address({name!r}) failed")
        self._probe_outputs()

    @staticmethod
    def _profile_values(engine, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(min, max) values profile 0 allows for shape tensor ``name`` (None: unknown).

        Called positionally on purpose: the binding (TensorRT 10.0 to 11.0) names its arguments
        ``name, profile_index`` but takes them as ``(profile_index, name)``."""
        try:
            values = engine.get_tensor_profile_values(0, name)
        except (AttributeError, TypeError, RuntimeError):
            return None
        if len(values) != 3:
            return None
        return np.asarray(values[0]), np.asarray(values[2])

    def _numpy_dtype(self, trt, name: str, trt_dtype) -> np.dtype:
        try:
            return np.dtype(trt.nptype(trt_dtype))
        except TypeError:
            pass
        if trt_dtype == getattr(trt.DataType, "BF16", None):
            return np.dtype(np.uint16)  # bfloat16 bit patterns, as DType.BFLOAT16 travels
        kind = getattr(trt_dtype, "name", str(trt_dtype))
        raise FailedPrecondition(
            f"{self.name}: tensor {name!r} is {kind}, which has no numpy type and which Tandem "
            "does not carry (FP8, INT4, FP4 I/O); rebuild the engine with FLOAT, HALF or BF16 "
            "inputs and outputs (keep the low precision inside the network)")

    def _io_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        def meta(name: str) -> TensorMeta:
            shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
            return TensorMeta(name, self._buffers[name].dtype, shape)

        return [meta(n) for n in self._in_names], [meta(n) for n in self._out_names]

    def _max_batch_impl(self) -> int | None:
        highs = [hi[0] for name, (_lo, hi) in self._bounds.items() if hi]
        return min(highs) if highs else None

    @property
    def batchable(self) -> bool:
        """False as well when an output's size depends on the data (not on the batch)."""
        return super().batchable and self._batch_ok

    def _probe_outputs(self) -> None:
        """Find outputs whose shape depends on data: still -1 with every input shape set (at the
        profile's opt shapes). They get the output allocator now. With shape-tensor inputs the
        values are unknown here, so dynamic outputs are conservatively kept out of batching."""
        engine, ctx = self._engine, self._context
        dynamic_outputs = [n for n in self._out_names
                           if any(d < 0 for d in engine.get_tensor_shape(n))]
        if not dynamic_outputs:
            return
        if self._host_inputs:
            self._batch_ok = False
            return
        for name in self._dynamic:
            _lo, opt, _hi = engine.get_tensor_profile_shape(name, 0)
            if not ctx.set_input_shape(name, tuple(opt)):
                raise InvalidArgument(f"{self.name}: TensorRT rejected the profile's opt shape "
                                      f"{tuple(opt)} for {name!r}: {self._errors()}")
        for name in dynamic_outputs:
            if any(d < 0 for d in ctx.get_tensor_shape(name)):
                self._use_allocator(name)
        if self._data_dependent:
            self._batch_ok = False

    # ------------------------------------------------------------ infer
    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, ctx, stream = self._cuda, self._context, self._stream
        with self._lock:
            self._cuda_ctx.push()
            try:
                for name in self._in_names:
                    self._set_input(cuda, ctx, stream, name, feeds[name])
                views: list[np.ndarray | None] = []
                for name in self._out_names:
                    shape = tuple(ctx.get_tensor_shape(name))
                    if any(d < 0 for d in shape) or name in self._data_dependent:
                        self._use_allocator(name)
                        views.append(None)  # sized by the output allocator while it runs
                        continue
                    buf = self._buffers[name]
                    old = buf.device
                    views.append(buf.ensure(cuda, shape))
                    if buf.device is not old:
                        ctx.set_tensor_address(name, int(buf.device))
                if not ctx.execute_async_v3(stream.handle):
                    if self._allocator is not None and self._allocator.error is not None:
                        error, self._allocator.error = self._allocator.error, None
                        raise translate(error, f"{self.name}: allocating an output", cuda) \
                            from error
                    raise InternalError(f"{self.name}: execute_async_v3 failed: {self._errors()}")
                done: list[np.ndarray] = []
                for name, view in zip(self._out_names, views, strict=True):
                    if view is None:
                        view = self._copy_allocated(cuda, stream, name)
                    elif view.size:
                        cuda.memcpy_dtoh_async(view, self._buffers[name].device, stream)
                    done.append(view)
                stream.synchronize()
                return {name: view.copy()
                        for name, view in zip(self._out_names, done, strict=True)}
            except TandemError:
                raise
            except Exception as exc:
                raise translate(exc, f"{self.name}: inference failed", cuda) from exc
            finally:
                cuda.Context.pop()

    def _set_input(self, cuda, ctx, stream, name: str, arr: np.ndarray) -> None:
        shape = arr.shape
        if name in self._dynamic:
            lo, hi = self._bounds[name]
            if any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
                raise InvalidArgument(
                    f"{self.name}: input {name!r} shape {shape} is outside the "
                    f"engine's optimization profile (min {lo}, max {hi})")
            if not ctx.set_input_shape(name, shape):
                raise InvalidArgument(f"{self.name}: TensorRT rejected shape {shape} "
                                      f"for {name!r}: {self._errors()}")
        if name in self._host_inputs:
            # A shape tensor: TensorRT reads its values from host memory, on the host.
            bounds = self._value_bounds.get(name)
            if bounds is not None and bounds[0].shape == arr.shape and (
                    (arr < bounds[0]).any() or (arr > bounds[1]).any()):
                raise InvalidArgument(
                    f"{self.name}: shape input {name!r} = {arr.tolist()} is outside the engine's "
                    f"optimization profile (min {bounds[0].tolist()}, max {bounds[1].tolist()})")
            host = self._host_arrays.get(name)
            if host is None or host.size < arr.size:
                host = self._host_arrays[name] = np.empty(max(arr.size, 1), arr.dtype)
            view = host[: arr.size].reshape(shape)
            np.copyto(view, arr, casting="no")
            if not ctx.set_tensor_address(name, int(host.ctypes.data)):
                raise InternalError(f"{self.name}: set_tensor_address({name!r}) failed: "
                                    f"{self._errors()}")
            return
        buf = self._buffers[name]
        if name in self._dynamic:
            old = buf.device
            host = buf.ensure(cuda, shape)
            if buf.device is not old:
                ctx.set_tensor_address(name, int(buf.device))
        else:
            host = buf.host[: arr.size].reshape(shape)
        np.copyto(host, arr, casting="no")
        if arr.size:
            cuda.memcpy_htod_async(buf.device, host, stream)

    def _use_allocator(self, name: str) -> None:
        """Give output ``name`` (a data-dependent shape) to the output allocator, once."""
        if name in self._data_dependent:
            return
        if self._allocator is None:
            self._allocator = _output_allocator(self._trt, self._cuda)
        if not self._context.set_output_allocator(name, self._allocator):
            raise InternalError(f"{self.name}: set_output_allocator({name!r}) failed: "
                                f"{self._errors()}")
        self._data_dependent.add(name)

    def _copy_allocated(self, cuda, stream, name: str) -> np.ndarray:
        allocator = self._allocator
        shape = allocator.shapes.get(name)
        if shape is None or name not in allocator.buffers:
            raise InternalError(f"{self.name}: TensorRT reported no shape or memory for the "
                                f"data-dependent output {name!r}: {self._errors()}")
        view = self._buffers[name].ensure(cuda, shape, device=False)
        if view.size:
            cuda.memcpy_dtoh_async(view, allocator.buffers[name], stream)
        return view

    def _errors(self) -> str:
        errors: list[str] = self._logger.errors[-3:] if self._logger is not None else []
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
                if self._allocator is not None:
                    self._allocator.free()
            finally:
                self._context = self._engine = self._runtime = self._stream = None
                self._allocator = None
                cuda.Context.pop()  # the primary context stays retained for the process
        self._cuda_ctx = None
        self._buffers = {}
        self._in_names, self._out_names = [], []
        self._bounds, self._dynamic = {}, set()
        self._host_inputs, self._host_arrays, self._data_dependent = set(), {}, set()
        self._value_bounds = {}
        self._batch_ok = True
