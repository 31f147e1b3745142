"""A faithful fake of the part of ``pycuda.driver`` Tandem uses, for machines without a GPU.

Same names and signatures as pycuda: ``init``, ``Device`` (``count``, ``name``,
``compute_capability``, ``retain_primary_context``), ``Context`` (``push``, static ``pop``,
``detach``, ``get_current``), ``mem_alloc`` -> ``DeviceAllocation`` (``int()``, ``free``),
``pagelocked_empty``, ``Stream`` (``handle``, ``synchronize``), ``memcpy_htod[_async]``,
``memcpy_dtoh[_async]``, and the ``Error`` / ``LogicError`` / ``MemoryError`` /
``LaunchError`` exceptions.

Behaviour kept from the real thing, because bugs hide there:
- every allocation and copy needs a current context (``LogicError`` otherwise, as CUDA's
  "invalid device context");
- async copies and kernel launches are *queued* on their stream and happen at
  ``synchronize()``: reading a host buffer before synchronizing sees stale data;
- freed or out-of-bounds device memory faults (``LogicError`` / ``LaunchError``).

Device memory is a dict of bytearrays keyed by fake addresses. ``reset()`` clears all state.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = [
    "Context",
    "Device",
    "DeviceAllocation",
    "Error",
    "LaunchError",
    "LogicError",
    "MemoryError",
    "Stream",
    "init",
    "mem_alloc",
    "memcpy_dtoh",
    "memcpy_dtoh_async",
    "memcpy_htod",
    "memcpy_htod_async",
    "pagelocked_empty",
]


class Error(Exception):
    pass


class LogicError(Error):
    pass


class LaunchError(Error):
    pass


class MemoryError(Error):
    pass


class _State:
    def __init__(self) -> None:
        self.initialized = False
        self.device_count = 1
        self.device_name = "Fake NVIDIA GPU"
        self.compute_capability = (8, 7)
        self.memory_limit = 1 << 30
        self.stack: list[Context] = []
        self.memory: dict[int, bytearray] = {}
        self.addresses = itertools.count(0x7F0000000000, 1 << 20)
        self.streams: dict[int, Stream] = {}
        self.handles = itertools.count(0x1000)
        self.allocations = 0  # mem_alloc calls, for tests
        self.pinned = 0  # pagelocked_empty calls, for tests
        self.pinned_allocs: list[_HostAllocation] = []
        self.retained = 0  # primary-context references held


STATE = _State()


def reset() -> None:
    global STATE
    STATE = _State()


def _need_context(what: str) -> None:
    if not STATE.initialized:
        raise LogicError(f"cu{what} failed: initialization error (call pycuda.driver.init())")
    if not STATE.stack:
        raise LogicError(f"cu{what} failed: invalid device context")


def init(flags: int = 0) -> None:
    STATE.initialized = True


class Device:
    def __init__(self, number: int) -> None:
        if not STATE.initialized:
            raise LogicError("cuDeviceGet failed: initialization error")
        if not 0 <= number < STATE.device_count:
            raise LogicError("cuDeviceGet failed: invalid device ordinal")
        self.number = number

    @staticmethod
    def count() -> int:
        if not STATE.initialized:
            raise LogicError("cuDeviceGetCount failed: initialization error")
        return STATE.device_count

    def name(self) -> str:
        return STATE.device_name

    def compute_capability(self) -> tuple[int, int]:
        return STATE.compute_capability

    def retain_primary_context(self) -> Context:
        STATE.retained += 1
        return Context(self)


class Context:
    def __init__(self, device: Device) -> None:
        self._device = device
        self._detached = False

    def push(self) -> None:
        if self._detached:
            raise LogicError("cuCtxPushCurrent failed: context was detached")
        STATE.stack.append(self)

    @staticmethod
    def pop() -> None:
        if not STATE.stack:
            raise LogicError("cuCtxPopCurrent failed: invalid context")
        STATE.stack.pop()

    @staticmethod
    def get_current() -> Context | None:
        return STATE.stack[-1] if STATE.stack else None

    def detach(self) -> None:
        if self._detached:
            raise LogicError("context already detached")
        self._detached = True
        STATE.retained -= 1

    def get_device(self) -> Device:
        return self._device


class DeviceAllocation:
    def __init__(self, address: int, size: int) -> None:
        self._address, self.size = address, size
        self.freed = False

    def __int__(self) -> int:
        return self._address

    __index__ = __int__

    def free(self) -> None:
        _need_context("MemFree")
        if not self.freed:
            STATE.memory.pop(self._address, None)
            self.freed = True


class _HostAllocation:
    """Pinned host memory: pagelocked arrays are views of it, recognised by their address."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = bytearray(nbytes)
        self.ptr = np.frombuffer(self.buffer, np.uint8).ctypes.data
        self.nbytes = nbytes


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _need_context("MemAlloc")
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise LogicError("cuMemAlloc failed: invalid argument")
    used = sum(len(b) for b in STATE.memory.values())
    if used + nbytes > STATE.memory_limit:
        raise MemoryError("cuMemAlloc failed: out of memory")
    address = next(STATE.addresses)
    STATE.memory[address] = bytearray(nbytes)
    STATE.allocations += 1
    return DeviceAllocation(address, nbytes)


def pagelocked_empty(shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    _need_context("MemHostAlloc")
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
    count = int(np.prod(shape))
    alloc = _HostAllocation(max(count * dtype.itemsize, 1))
    STATE.pinned_allocs.append(alloc)
    STATE.pinned += 1
    return np.frombuffer(alloc.buffer, dtype, count).reshape(shape, order=order)


def _is_pinned(arr: object) -> bool:
    if not isinstance(arr, np.ndarray):
        return False
    ptr = arr.ctypes.data
    return any(a.ptr <= ptr < a.ptr + a.nbytes for a in STATE.pinned_allocs)


def _resolve(address: int, nbytes: int) -> tuple[bytearray, int]:
    for base, mem in STATE.memory.items():
        if base <= address < base + len(mem):
            offset = address - base
            if offset + nbytes > len(mem):
                raise LaunchError(f"an illegal memory access was encountered ({nbytes} bytes at "
                                  f"{address:#x}, allocation of {len(mem)})")
            return mem, offset
    raise LaunchError(f"an illegal memory access was encountered (address {address:#x} is not "
                      "allocated)")


def read_device(address: int, nbytes: int) -> bytes:
    """Test/fake-engine helper: the bytes at a device address."""
    mem, off = _resolve(int(address), nbytes)
    return bytes(mem[off:off + nbytes])


def write_device(address: int, data: bytes) -> None:
    mem, off = _resolve(int(address), len(data))
    mem[off:off + len(data)] = data


def _host_bytes(arr: np.ndarray) -> memoryview:
    if not arr.flags.c_contiguous:
        raise LogicError("host buffer must be contiguous")
    return memoryview(arr).cast("B")


class Stream:
    def __init__(self, flags: int = 0) -> None:
        _need_context("StreamCreate")
        self.handle = next(STATE.handles)
        self._queue: list = []
        STATE.streams[self.handle] = self

    def enqueue(self, op) -> None:
        self._queue.append(op)

    def synchronize(self) -> None:
        _need_context("StreamSynchronize")
        queue, self._queue = self._queue, []
        for op in queue:
            op()

    def is_done(self) -> bool:
        return not self._queue


def stream_for_handle(handle: int) -> Stream | None:
    return STATE.streams.get(int(handle))


def _htod(dest, src: np.ndarray) -> None:
    write_device(int(dest), _host_bytes(src).tobytes())


def _dtoh(dest: np.ndarray, src) -> None:
    view = _host_bytes(dest)
    view[:] = read_device(int(src), view.nbytes)


def memcpy_htod(dest, src) -> None:
    _need_context("MemcpyHtoD")
    _htod(dest, src)


def memcpy_dtoh(dest, src) -> None:
    _need_context("MemcpyDtoH")
    _dtoh(dest, src)


def memcpy_htod_async(dest, src, stream: Stream | None = None) -> None:
    _need_context("MemcpyHtoDAsync")
    if not _is_pinned(src):
        raise LogicError("fake pycuda: async copies need page-locked host memory "
                         "(pagelocked_empty)")
    if stream is None:
        _htod(dest, src)
    else:
        stream.enqueue(lambda: _htod(dest, src))


def memcpy_dtoh_async(dest, src, stream: Stream | None = None) -> None:
    _need_context("MemcpyDtoHAsync")
    if not _is_pinned(dest):
        raise LogicError("fake pycuda: async copies need page-locked host memory "
                         "(pagelocked_empty)")
    if stream is None:
        _dtoh(dest, src)
    else:
        stream.enqueue(lambda: _dtoh(dest, src))
