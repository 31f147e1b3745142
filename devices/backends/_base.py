"""The one execution-backend contract (template method, after Polygraphy's runners).

Public methods check state and inputs once; implementations override only the hooks::

    activate()    -> _activate_impl()  then _io_impl() -> (inputs, outputs)
    infer(feeds)  -> checks names/dtypes/ranks/fixed dims -> _infer_impl(feeds)
    deactivate()  -> _deactivate_impl()

Construction allocates nothing heavy (no session, no engine, no device memory); ``activate`` does
the work and a backend is a context manager. Metadata (``inputs``/``outputs``) is known once
active. A shape is a tuple whose entries are ints (fixed), strings (named symbolic dims: equal
names must agree within one call) or None (anonymous dynamic dims).

``infer_batch`` runs many requests as one call along the leading dim when the part allows it
(dynamic leading dim on every input and output); each request still succeeds or fails on its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.protocol.errors import FailedPrecondition, InternalError, InvalidArgument, TandemError

__all__ = ["Backend", "Dim", "TensorMeta"]

Dim = int | str | None


@dataclass(frozen=True)
class TensorMeta:
    """Name, numpy dtype and shape of an input or output (symbolic dims as str or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dynamic_leading(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)


class Backend:
    """Base of every backend. Subclasses implement the ``_*_impl`` hooks only."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self._active = False
        self._inputs: tuple[TensorMeta, ...] = ()
        self._outputs: tuple[TensorMeta, ...] = ()
        # Precomputed once per activation: (name, dtype, rank, fixed dims, named dims).
        self._checks: tuple[tuple[str, np.dtype, int, tuple, tuple], ...] = ()
        self._input_names: frozenset[str] = frozenset()

    # ---------------------------------------------------------------- hooks
    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _io_impl(self) -> tuple[Sequence[TensorMeta], Sequence[TensorMeta]]:
        raise NotImplementedError

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        raise NotImplementedError

    def _max_batch_impl(self) -> int | None:
        """Largest leading dim one call accepts (None: no limit known)."""
        return None

    # ---------------------------------------------------------------- state
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Backend:
        if self._active:
            raise FailedPrecondition(f"{self.name} is already active")
        self._activate_impl()
        try:
            inputs, outputs = self._io_impl()
            self._set_io(tuple(inputs), tuple(outputs))
        except BaseException:
            self._deactivate_impl()
            raise
        self._active = True
        return self

    def deactivate(self) -> None:
        if not self._active:
            raise FailedPrecondition(f"{self.name} is not active")
        try:
            self._deactivate_impl()
        finally:
            self._active = False

    def __enter__(self) -> Backend:
        """Activate (unless already active, e.g. handed over by ``activate_cached``); the
        ``with`` block then owns the backend and deactivates it on exit."""
        return self if self._active else self.activate()

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self.deactivate()

    def __del__(self) -> None:  # best effort: release native resources if the user forgot
        if getattr(self, "_active", False):
            with contextlib.suppress(Exception):
                self.deactivate()

    def _require_active(self) -> None:
        if not self._active:
            raise FailedPrecondition(f"{self.name} is not active: call activate() or use `with`")

    @property
    def inputs(self) -> tuple[TensorMeta, ...]:
        self._require_active()
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorMeta, ...]:
        self._require_active()
        return self._outputs

    @property
    def batchable(self) -> bool:
        """True when requests can be stacked along the leading dim (it is dynamic everywhere)."""
        self._require_active()
        return all(t.dynamic_leading for t in self._inputs + self._outputs)

    def _set_io(self, inputs: tuple[TensorMeta, ...], outputs: tuple[TensorMeta, ...]) -> None:
        self._inputs, self._outputs = inputs, outputs
        checks = []
        for t in inputs:
            fixed = tuple((i, d) for i, d in enumerate(t.shape) if isinstance(d, int))
            named = tuple((i, d) for i, d in enumerate(t.shape) if isinstance(d, str))
            checks.append((t.name, np.dtype(t.dtype), len(t.shape), fixed, named))
        self._checks = tuple(checks)
        self._input_names = frozenset(t.name for t in inputs)

    # ---------------------------------------------------------------- inference
    def _check(self, feeds: Any) -> None:
        if not isinstance(feeds, dict):
            raise InvalidArgument(f"{self.name}: feeds must be a dict of name -> numpy array")
        if len(feeds) != len(self._checks) or feeds.keys() != self._input_names:
            missing = sorted(self._input_names - feeds.keys())
            unexpected = sorted(set(feeds) - self._input_names)
            raise InvalidArgument(f"{self.name}: missing inputs {missing}, unexpected inputs "
                                  f"{unexpected} (expects {sorted(self._input_names)})")
        bound: dict[str, int] | None = None
        for name, dtype, rank, fixed, named in self._checks:
            arr = feeds[name]
            if type(arr) is not np.ndarray and not isinstance(arr, np.ndarray):
                raise InvalidArgument(f"{self.name}: input {name!r} must be a numpy array, got "
                                      f"{type(arr).__name__}")
            if arr.dtype != dtype:
                raise InvalidArgument(f"{self.name}: input {name!r} has dtype {arr.dtype}, "
                                      f"expected {dtype}")
            shape = arr.shape
            if len(shape) != rank:
                raise InvalidArgument(f"{self.name}: input {name!r} has rank {len(shape)} "
                                      f"{shape}, expected rank {rank}")
            for axis, size in fixed:
                if shape[axis] != size:
                    raise InvalidArgument(f"{self.name}: input {name!r} has shape {shape}, "
                                          f"dim {axis} must be {size}")
            for axis, sym in named:
                if bound is None:
                    bound = {}
                seen = bound.setdefault(sym, shape[axis])
                if seen != shape[axis]:
                    raise InvalidArgument(f"{self.name}: dim {sym!r} is {seen} in one input and "
                                          f"{shape[axis]} in {name!r}")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. Inputs are checked (names, dtypes, ranks, fixed dims) before the backend."""
        if not self._active:
            self._require_active()
        self._check(feeds)
        return self._infer_impl(feeds)

    def infer_batch(
        self, requests: Sequence[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | TandemError]:
        """Run many requests; each entry of the result is its outputs or its own error.

        When the part is :attr:`batchable`, valid requests are concatenated along the leading
        dim (in chunks no larger than the backend's limit) and the outputs split back; if a
        combined run fails, its requests are retried one by one so one bad request cannot fail
        the others.
        """
        self._require_active()
        results: list[dict[str, np.ndarray] | TandemError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, feeds in enumerate(requests):
            try:
                self._check(feeds)
            except TandemError as exc:
                results[i] = exc
            else:
                valid.append(i)
        if not self.batchable:
            for i in valid:
                results[i] = self._one(requests[i])
            return results  # type: ignore[return-value]
        limit = self._max_batch_impl()
        first = self._inputs[0].name
        # Only requests that agree on every non-leading dim can be stacked together.
        groups: dict[tuple, list[int]] = {}
        for i in valid:
            key = tuple(requests[i][t.name].shape[1:] for t in self._inputs)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            chunk: list[int] = []
            rows = 0
            for i in members:
                n = requests[i][first].shape[0]
                if chunk and limit is not None and rows + n > limit:
                    self._run_chunk(requests, chunk, results)
                    chunk, rows = [], 0
                chunk.append(i)
                rows += n
            if chunk:
                self._run_chunk(requests, chunk, results)
        return results  # type: ignore[return-value]

    def _one(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | TandemError:
        try:
            return self._infer_impl(feeds)
        except TandemError as exc:
            return exc
        except Exception as exc:  # a foreign error a hook did not translate: our bug
            return InternalError(f"{self.name}: {type(exc).__name__}: {exc}")

    def _run_chunk(self, requests, chunk: list[int], results: list) -> None:
        if len(chunk) == 1:
            results[chunk[0]] = self._one(requests[chunk[0]])
            return
        first = self._inputs[0].name
        sizes = [requests[i][first].shape[0] for i in chunk]
        stacked = {t.name: np.concatenate([requests[i][t.name] for i in chunk], axis=0)
                   for t in self._inputs}
        out = self._one(stacked)
        if isinstance(out, TandemError) or any(
                v.ndim == 0 or v.shape[0] != sum(sizes) for v in out.values()):
            for i in chunk:  # isolate the failure: every request gets its own answer
                results[i] = self._one(requests[i])
            return
        bounds = np.cumsum(sizes)[:-1]
        split = {name: np.split(v, bounds, axis=0) for name, v in out.items()}
        for k, i in enumerate(chunk):
            results[i] = {name: parts[k] for name, parts in split.items()}
