"""CUDA contexts for TensorRT: one retained primary context per device per process.

pycuda's ``Context.detach()`` on a primary context calls ``cuDevicePrimaryCtxRelease`` assuming it
pops the context, which it does not (pycuda ``src/cpp/cuda.hpp``: ``context::detach`` pushes a
non-current context, then "pop is implicit in detach"), so every retain/detach cycle would leave
an entry on the thread's driver context stack, and a detach from another thread releases nothing.
Like ``pycuda/autoprimaryctx.py``, we therefore retain each device's primary context once per
process and never release it; users push it around their work (:func:`pushed`) and pop it after.

:func:`translate` is the one boundary for exceptions from ``tensorrt`` and ``pycuda`` (the
backend, the engine builder and the device identity all use it); :func:`capture_logger` is the
TensorRT logger they share (TensorRT reports most failures as return values plus log lines).

Entries are keyed by the driver module as well as the device ordinal, so a driver module that was
replaced (a test's fake) never hands out a context of the old one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    ResourceExhausted,
    TandemError,
)

__all__ = ["capture_logger", "primary_context", "pushed", "translate"]

_lock = threading.Lock()
# (id(driver module), device) -> (driver module, its retained primary context). The module is kept
# alive by the entry, so its id is never reused for another module.
_retained: dict[tuple[int, int], tuple[object, object]] = {}


def primary_context(cuda, device: int):
    """Device ``device``'s primary context, retained on first use and kept for the process."""
    key = (id(cuda), device)
    with _lock:
        entry = _retained.get(key)
        if entry is None:
            cuda.init()
            count = cuda.Device.count()
            if not 0 <= device < count:
                raise FailedPrecondition(f"no CUDA device {device} ({count} present)")
            entry = _retained[key] = (cuda, cuda.Device(device).retain_primary_context())
        return entry[1]


@contextmanager
def pushed(cuda, device: int) -> Iterator[object]:
    """Make device ``device``'s primary context current on this thread for the block."""
    ctx = primary_context(cuda, device)
    ctx.push()
    try:
        yield ctx
    finally:
        cuda.Context.pop()


def translate(exc: BaseException, what: str, cuda=None) -> TandemError:
    """A Tandem error for an exception raised by TensorRT or pycuda (chain it with ``from``)."""
    if isinstance(exc, TandemError):
        return exc
    if cuda is not None and isinstance(exc, getattr(cuda, "MemoryError", ())):
        return ResourceExhausted(f"{what}: out of device or pinned memory: {exc}")
    return InternalError(f"{what}: {type(exc).__name__}: {exc}")


def capture_logger(trt, keep_warnings: int = 20):
    """A ``trt.ILogger`` keeping every error and the last ``keep_warnings`` warnings."""

    class _Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # required for TensorRT's trampoline
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(str(msg))
                del self.warnings[:-keep_warnings]

    return _Capture()
