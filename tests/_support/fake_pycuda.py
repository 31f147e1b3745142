"""A faithful fake of the part of ``pycuda.driver`` Tandem uses, for machines without a GPU.

Same names and signatures as pycuda: ``init``, ``Device`` (``count``, ``name``,
``compute_capability``, ``get_attribute``, ``retain_primary_context``), ``device_attribute``,
``Context`` (``push``, static ``pop``, ``detach``, static ``get_current``, ``get_device``),
``mem_alloc`` -> ``DeviceAllocation`` (``int()``, ``free``), ``pagelocked_empty``, ``Stream``
(``handle``, ``synchronize``), ``memcpy_htod[_async]``, ``memcpy_dtoh[_async]``, and the
``Error`` / ``LogicError`` / ``MemoryError`` / ``LaunchError`` exceptions.

Behaviour kept from the real thing, because bugs hide there (sources: inducer/pycuda
``src/cpp/cuda.hpp``, ``src/wrapper/wrap_cudadrv.cpp``, ``pycuda/autoprimaryctx.py``; CUDA driver
API "API synchronization behavior"):

- **Two context stacks per thread**, as in pycuda: the CUDA driver's (``cuCtxPushCurrent`` /
  ``cuCtxPopCurrent``) and pycuda's own ``context_stack``. ``Context.push`` pops the driver's
  current context if pycuda's stack is not empty (``prepare_context_switch``), pushes the new one
  on both; ``Context.pop`` does the same in reverse and re-pushes the new top on the driver.
- **Primary contexts are reference counted** (``cuDevicePrimaryCtxRetain``/``Release``): one
  context per device, shared by every ``retain_primary_context()`` result; it is destroyed (with
  all memory allocated in it) when the count reaches 0.
- **``Context.detach`` as pycuda does it** (``cuda.hpp`` ``context::detach``): when the context
  is not the current one and this is the thread that created it, pycuda pushes it on the driver
  stack and calls ``detach_internal``, assuming it pops ("pop is implicit in detach"); for a
  primary context that is ``cuDevicePrimaryCtxRelease``, which does not pop, so an entry is left
  on the driver stack. From another thread it releases nothing (the reference leaks). A pycuda
  context object that is garbage collected while valid detaches itself (``~context``).
- every allocation and copy needs a current, live context on this thread (``LogicError``
  otherwise, as CUDA's "invalid device context");
- async copies and kernel launches are *queued* on their stream and run at ``synchronize()``:
  reading a host buffer before synchronizing sees stale data;
- async copies from or to **pageable** (not page-locked) host memory fall back to synchronous
  copies, as the CUDA driver does for ``cuMemcpyHtoDAsync``/``cuMemcpyDtoHAsync`` (pycuda passes
  the buffer straight through, ``wrap_cudadrv.cpp`` ``py_memcpy_htod_async``): the stream is
  synchronized first, then the copy happens before the call returns;
- freed or out-of-bounds device memory faults (``LaunchError``).

Differences from the real driver (none of them relied on by Tandem): device memory is a dict of
bytearrays keyed by fake addresses, so a device pointer is never host-readable and a host pointer
never device-readable; ``Device.get_attribute`` knows only ``MULTIPROCESSOR_COUNT``; streams run
their queue on ``synchronize()`` only (the real GPU runs it concurrently).

Test hooks (not pycuda API): ``STATE`` (``devices`` list of per-device properties,
``memory_limit``, counters), ``driver_stack()`` (this thread's driver stack), ``reset()``.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import threading
from dataclasses import dataclass

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
    "device_attribute",
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


class device_attribute(enum.IntEnum):
    MULTIPROCESSOR_COUNT = 16


@dataclass
class FakeDevice:
    """Properties of one fake GPU (test hook)."""

    name: str = "Fake NVIDIA GPU"
    compute_capability: tuple[int, int] = (8, 7)
    multiprocessor_count: int = 8


class _Primary:
    """The driver's primary context of one device: a handle and a reference count."""

    def __init__(self, device: int, handle: int) -> None:
        self.device, self.handle = device, handle
        self.refs = 0
        self.generation = 0  # bumped each time the context is (re)created


class _State:
    def __init__(self) -> None:
        self.initialized = False
        self.devices: list[FakeDevice] = [FakeDevice()]
        self.memory_limit = 1 << 30
        self.memory: dict[int, bytearray] = {}
        self.owner: dict[int, tuple[int, int]] = {}  # address -> (device, generation)
        self.addresses = itertools.count(0x7F0000000000, 1 << 20)
        self.streams: dict[int, Stream] = {}
        self.handles = itertools.count(0x1000)
        self.primaries: dict[int, _Primary] = {}
        self.local = threading.local()
        self.allocations = 0  # mem_alloc calls, for tests
        self.pinned = 0  # pagelocked_empty calls, for tests
        self.pinned_allocs: list[_HostAllocation] = []
        self.sync_fallbacks = 0  # async copies that ran synchronously (pageable memory)

    # kept for tests written against the first fake: one device's properties
    @property
    def device_count(self) -> int:
        return len(self.devices)

    @device_count.setter
    def device_count(self, n: int) -> None:
        self.devices = [self.devices[0] if i == 0 else FakeDevice() for i in range(n)]

    @property
    def retained(self) -> int:
        """Primary-context references held, over all devices."""
        return sum(p.refs for p in self.primaries.values())


STATE = _State()


def reset() -> None:
    global STATE
    STATE = _State()


def _stacks() -> tuple[list[int], list[Context]]:
    """(driver stack of context handles, pycuda context stack) of the calling thread."""
    local = STATE.local
    if not hasattr(local, "driver"):
        local.driver, local.pycuda = [], []
    return local.driver, local.pycuda


def driver_stack() -> list[int]:
    """Test hook: this thread's CUDA driver context stack (handles), bottom first."""
    return list(_stacks()[0])


def _primary_by_handle(handle: int) -> _Primary | None:
    return next((p for p in STATE.primaries.values() if p.handle == handle), None)


def _current() -> _Primary:
    """The live primary context current on this thread, or LogicError."""
    driver, _ = _stacks()
    primary = _primary_by_handle(driver[-1]) if driver else None
    if primary is None or primary.refs <= 0:
        raise LogicError("invalid device context")
    return primary


def _need_context(what: str) -> _Primary:
    if not STATE.initialized:
        raise LogicError(f"cu{what} failed: initialization error (call pycuda.driver.init())")
    try:
        return _current()
    except LogicError:
        raise LogicError(f"cu{what} failed: invalid device context") from None


def current_device() -> int | None:
    """Test hook: the device whose context is current on this thread (None: no context)."""
    try:
        return _current().device
    except LogicError:
        return None


def init(flags: int = 0) -> None:
    STATE.initialized = True


class Device:
    def __init__(self, number: int) -> None:
        if not STATE.initialized:
            raise LogicError("cuDeviceGet failed: initialization error")
        if not 0 <= number < len(STATE.devices):
            raise LogicError("cuDeviceGet failed: invalid device ordinal")
        self.number = number

    @staticmethod
    def count() -> int:
        if not STATE.initialized:
            raise LogicError("cuDeviceGetCount failed: initialization error")
        return len(STATE.devices)

    def name(self) -> str:
        return STATE.devices[self.number].name

    def compute_capability(self) -> tuple[int, int]:
        return STATE.devices[self.number].compute_capability

    def get_attribute(self, attr: device_attribute) -> int:
        if attr == device_attribute.MULTIPROCESSOR_COUNT:
            return STATE.devices[self.number].multiprocessor_count
        raise LogicError("cuDeviceGetAttribute failed: attribute not known to the fake")

    def retain_primary_context(self) -> Context:
        primary = STATE.primaries.get(self.number)
        if primary is None:
            primary = STATE.primaries[self.number] = _Primary(self.number, next(STATE.handles))
        if primary.refs == 0:
            primary.generation += 1  # a fresh context: nothing allocated in it yet
        primary.refs += 1
        return Context(self, primary)


class Context:
    """A pycuda context object (here always a primary context)."""

    def __init__(self, device: Device, primary: _Primary) -> None:
        self._device, self._primary = device, primary
        self._valid = True
        self._thread = threading.get_ident()
        self._state = STATE  # a context of a reset fake never touches the new state

    @property
    def handle(self) -> int:
        return self._primary.handle

    def is_valid(self) -> bool:
        return self._valid

    @staticmethod
    def _prepare_context_switch() -> None:
        driver, pycuda = _stacks()
        if pycuda and driver:
            driver.pop()

    def push(self) -> None:
        if not self._valid:
            raise LogicError("cuCtxPushCurrent failed: invalid context")
        Context._prepare_context_switch()
        driver, pycuda = _stacks()
        driver.append(self._primary.handle)
        pycuda.append(self)

    @staticmethod
    def pop() -> None:
        Context._prepare_context_switch()
        driver, pycuda = _stacks()
        if not pycuda:
            raise LogicError("context::pop failed: cannot pop non-current context")
        pycuda.pop()
        current = Context._current_context()
        if current is not None:
            driver.append(current._primary.handle)

    @staticmethod
    def _current_context(except_: Context | None = None) -> Context | None:
        _, pycuda = _stacks()
        while pycuda:
            top = pycuda[-1]
            if top is not except_ and top._valid:
                return top
            pycuda.pop()  # pycuda drops invalid contexts from its stack here
        return None

    @staticmethod
    def get_current() -> Context | None:
        return Context._current_context()

    def detach(self) -> None:
        if not self._valid:
            raise LogicError("context::detach failed: cannot detach from invalid context")
        driver, pycuda = _stacks()
        active = bool(pycuda) and pycuda[-1] is self
        if active:
            self._release()
        elif self._thread == threading.get_ident():
            driver.append(self._primary.handle)  # cuCtxPushCurrent ...
            self._release()  # ... then cuDevicePrimaryCtxRelease, which does NOT pop it
        # else: another thread: nothing is released (pycuda: "leaked out-of-thread context")
        self._valid = False
        if active:
            new_active = Context._current_context(self)
            if new_active is not None:
                driver.append(new_active._primary.handle)

    def _release(self) -> None:
        primary = self._primary
        primary.refs -= 1
        if primary.refs == 0:  # the primary context is destroyed with everything in it
            for address, owner in list(STATE.owner.items()):
                if owner == (primary.device, primary.generation):
                    STATE.memory.pop(address, None)
                    del STATE.owner[address]

    def get_device(self) -> Device:
        return self._device

    def __del__(self) -> None:  # pycuda's ~context: a valid context detaches itself
        if getattr(self, "_valid", False) and getattr(self, "_state", None) is STATE:
            with contextlib.suppress(Exception):  # a destructor must not raise
                self.detach()


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
            STATE.owner.pop(self._address, None)
            self.freed = True


class _HostAllocation:
    """Pinned host memory: pagelocked arrays are views of it, recognised by their address."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = bytearray(nbytes)
        self.ptr = np.frombuffer(self.buffer, np.uint8).ctypes.data
        self.nbytes = nbytes


def mem_alloc(nbytes: int) -> DeviceAllocation:
    primary = _need_context("MemAlloc")
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise LogicError("cuMemAlloc failed: invalid argument")
    used = sum(len(b) for b in STATE.memory.values())
    if used + nbytes > STATE.memory_limit:
        raise MemoryError("cuMemAlloc failed: out of memory")
    address = next(STATE.addresses)
    STATE.memory[address] = bytearray(nbytes)
    STATE.owner[address] = (primary.device, primary.generation)
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


def is_device_address(address: int) -> bool:
    """Test hook: True when ``address`` lies in fake device memory."""
    return any(base <= int(address) < base + len(mem) for base, mem in STATE.memory.items())


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


def _host_bytes(arr) -> memoryview:
    view = memoryview(arr)
    if not view.c_contiguous:
        raise LogicError("host buffer must be contiguous")
    return view.cast("B")


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
        self._drain()

    def _drain(self) -> None:
        queue, self._queue = self._queue, []
        for op in queue:
            op()

    def is_done(self) -> bool:
        return not self._queue


def stream_for_handle(handle: int) -> Stream | None:
    return STATE.streams.get(int(handle))


def _htod(dest, src) -> None:
    write_device(int(dest), _host_bytes(src).tobytes())


def _dtoh(dest, src) -> None:
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
    if stream is not None and _is_pinned(src):
        stream.enqueue(lambda: _htod(dest, src))
        return
    if stream is not None:  # pageable: the driver syncs the stream, then copies now
        STATE.sync_fallbacks += 1
        stream._drain()
    _htod(dest, src)


def memcpy_dtoh_async(dest, src, stream: Stream | None = None) -> None:
    _need_context("MemcpyDtoHAsync")
    if stream is not None and _is_pinned(dest):
        stream.enqueue(lambda: _dtoh(dest, src))
        return
    if stream is not None:  # pageable: returns only once the copy has completed
        STATE.sync_fallbacks += 1
        stream._drain()
    _dtoh(dest, src)
