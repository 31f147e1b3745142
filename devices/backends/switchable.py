"""A backend that can be replaced while it serves: what the edge daemon and the cloud endpoint run
a part on while its TensorRT engine is built in the background.

:class:`SwitchableBackend` forwards ``infer`` / ``infer_batch`` to its current backend;
:meth:`SwitchableBackend.switch` hands the calls that start afterwards to another (active)
backend, atomically: a call already running finishes on the backend it started on, and the
replaced backend is deactivated when its last call ends (or at once when none runs). A switch
after :meth:`~SwitchableBackend.close` deactivates the newcomer at once (nobody will call it).

The background builds that drive the switch live in :mod:`tandem.devices.engines`
(:class:`~tandem.devices.engines.BackgroundEngineBuild`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from tandem.protocol.errors import FailedPrecondition, TandemError

__all__ = ["SwitchableBackend"]

T = TypeVar("T")


class SwitchableBackend:
    """One part served by its current backend (``kind``: ``"onnxruntime"`` or ``"tensorrt"``).

    Thread-safe: any number of threads call :meth:`infer` / :meth:`infer_batch` while another
    switches. Not a :class:`~tandem.devices.backends.Backend` subclass (it owns no session): it
    holds active backends and releases them."""

    def __init__(self, backend: Any, kind: str, *, name: str | None = None) -> None:
        self.name = name or getattr(backend, "name", "part")
        self._backend = backend
        self.kind = kind
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(backend) -> calls running on it
        self._retired: dict[int, Any] = {}  # replaced backends still running a call
        self._closed = False
        self.switches = 0

    @property
    def backend(self) -> Any:
        """The backend the next call runs on."""
        return self._backend

    @property
    def is_active(self) -> bool:
        return not self._closed

    @property
    def inputs(self) -> tuple:
        return tuple(self._backend.inputs)

    @property
    def outputs(self) -> tuple:
        return tuple(self._backend.outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._backend.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._backend.outputs)

    def run(self, call: Callable[[Any], T]) -> T:
        """``call(backend)`` on the current backend, holding it for the call's duration."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"{self.name} is closed")
            backend = self._backend
            key = id(backend)
            self._users[key] = self._users.get(key, 0) + 1
        try:
            return call(backend)
        finally:
            self._release(key)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(lambda b: b.infer(feeds))

    def infer_batch(self, requests: Sequence[dict[str, np.ndarray]]
                    ) -> list[dict[str, np.ndarray] | TandemError]:
        return self.run(lambda b: b.infer_batch(requests))

    def _release(self, key: int) -> None:
        retire = None
        with self._lock:
            n = self._users[key] - 1
            if n:
                self._users[key] = n
            else:
                del self._users[key]
                retire = self._retired.pop(key, None)
        if retire is not None:
            _deactivate(retire)

    def switch(self, backend: Any, kind: str) -> bool:
        """Serve the next calls with ``backend`` (active); the old one is deactivated when its
        last call ends. False (and ``backend`` deactivated) when this one is closed."""
        with self._lock:
            if self._closed:
                old, switched = backend, False  # too late: nobody will call it
            else:
                old, self._backend, self.kind = self._backend, backend, kind
                self.switches += 1
                switched = True
            key = id(old)
            if self._users.get(key):
                self._retired[key] = old
                old = None
        if old is not None:
            _deactivate(old)
        return switched

    def close(self) -> None:
        """Deactivate the current backend, and each replaced one still running a call (calls
        that are running finish first only if the backend allows it: close after the work)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            backends = [self._backend, *self._retired.values()]
            self._retired.clear()
        for b in backends:
            _deactivate(b)

    deactivate = close

    def __repr__(self) -> str:
        return f"SwitchableBackend({self.name!r}, {self.kind})"


def _deactivate(backend: Any) -> None:
    with contextlib.suppress(TandemError):
        if getattr(backend, "is_active", True):
            backend.deactivate()
