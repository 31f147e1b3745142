"""A bundle made runnable on this device: every part the daemon may run, each behind a
:class:`PartRunner` whose backend can be switched atomically.

What runs where (``protocol/bundle/BUNDLE.md``): the all-local cut's head is the full model;
cut ``k``'s head computes the frontier from the inputs and its tail computes every output from
the frontier; cut 0 has no head (the frontier is the raw input). The daemon loads the full
model, every interior head and every interior tail (the tails run locally when an offload
fails: the fallback from the split point).

Backends: ONNX Runtime always serves first (the bundle's ORT-optimized artifact of a part when
it has one, else the part itself). With ``backend`` ``auto`` or ``tensorrt``, when ``tensorrt``
imports and the bundle has a TensorRT artifact for this device profile, the engine is loaded
(prebuilt) or built from the artifact's recipe into the engine cache in a background thread,
and the part switches to it atomically when it is ready: a request already running finishes
on the backend it started on, the next one runs on the engine. The old backend is released
when the last request holding it ends.

Inputs are checked against the manifest before anything runs (names, dtypes, ranks, fixed
dims, symbolic dims that must agree): :meth:`ModelRuntime.check_inputs`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.protocol import dtypes
from tandem.protocol.errors import InvalidArgument, MissingDependency, TandemError

__all__ = ["ModelRuntime", "PartRunner", "check_feeds"]

log = logging.getLogger("tandem.edge.runtime")

_MAX_ELEMENTS = 1 << 31


def numpy_dtype(manifest_dtype: str) -> np.dtype:
    """The numpy dtype holding a manifest dtype's values (bfloat16: uint16 bit patterns, as on
    the wire); InvalidArgument for a type the daemon does not carry."""
    info = dtypes.by_name(manifest_dtype)
    if info.numpy is not None:
        return info.numpy
    if info.name == "bfloat16":
        return np.dtype("<u2")
    raise InvalidArgument(f"the edge daemon does not carry {manifest_dtype} tensors")


class PartRunner:
    """One part of the bundle, run by its current backend (switchable while serving).

    ``infer`` is thread-safe; :meth:`switch` replaces the backend for the calls that start
    afterwards, and the replaced backend is deactivated once no call holds it."""

    def __init__(self, path: str, backend: Any, kind: str) -> None:
        self.path = path
        self._backend = backend
        self.kind = kind  # "onnxruntime" | "tensorrt"
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(backend) -> calls running on it
        self._retired: dict[int, Any] = {}
        self._closed = False

    @property
    def backend(self) -> Any:
        return self._backend

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._backend.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._backend.outputs)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            backend = self._backend
            key = id(backend)
            self._users[key] = self._users.get(key, 0) + 1
        try:
            return backend.infer(feeds)
        finally:
            self._release(key)

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

    def switch(self, backend: Any, kind: str) -> None:
        """Serve the next calls with ``backend`` (active); the old one is deactivated when its
        last call ends."""
        with self._lock:
            if self._closed:
                old = backend  # too late: nobody will call it
            else:
                old, self._backend, self.kind = self._backend, backend, kind
            key = id(old)
            if self._users.get(key):
                self._retired[key] = old
                old = None
        if old is not None:
            _deactivate(old)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            backends = [self._backend, *self._retired.values()]
            self._retired.clear()
        for b in backends:
            _deactivate(b)


def _deactivate(backend: Any) -> None:
    with contextlib.suppress(TandemError):
        if backend.is_active:
            backend.deactivate()


def check_feeds(inputs: tuple, feeds: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    """Check ``feeds`` against the manifest's input specs (names, dtypes, ranks, fixed dims,
    symbolic dims that must agree, sizes); return the shape key (the inputs' shapes in
    manifest order). InvalidArgument naming the problem otherwise."""
    names = [t.name for t in inputs]
    if set(feeds) != set(names):
        missing = sorted(set(names) - set(feeds))
        unexpected = sorted(set(feeds) - set(names))
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unexpected:
            parts.append(f"unknown input(s) {[u[:64] for u in unexpected[:8]]}")
        raise InvalidArgument(f"{'; '.join(parts)} (the model takes {names})")
    bound: dict[str, int] = {}
    key = []
    for spec in inputs:
        arr = feeds[spec.name]
        want = numpy_dtype(spec.dtype)
        if arr.dtype != want:
            raise InvalidArgument(f"input {spec.name!r} has dtype {arr.dtype}, the model takes "
                                  f"{spec.dtype}")
        shape = tuple(int(d) for d in arr.shape)
        if len(shape) != len(spec.shape):
            raise InvalidArgument(f"input {spec.name!r} has shape {list(shape)}, the model "
                                  f"takes rank {len(spec.shape)} {list(spec.shape)}")
        for dim, size in zip(spec.shape, shape, strict=True):
            if isinstance(dim, int):
                if dim != size:
                    raise InvalidArgument(f"input {spec.name!r} has shape {list(shape)}, the "
                                          f"model takes {list(spec.shape)}")
            else:
                if size == 0:
                    raise InvalidArgument(f"input {spec.name!r} has an empty dim {dim!r}")
                if bound.setdefault(dim, size) != size:
                    raise InvalidArgument(f"dim {dim!r} is {bound[dim]} in one input and "
                                          f"{size} in {spec.name!r}")
        if arr.size >= _MAX_ELEMENTS:
            raise InvalidArgument(f"input {spec.name!r} has {arr.size} elements (too many)")
        key.append(shape)
    return tuple(key)


class ModelRuntime:
    """The runnable parts of a loaded bundle on this device.

    ``bundle``: a :class:`~tandem.protocol.bundle.Bundle` (verified); ``profile``: the device's
    :class:`~tandem.devices.Profile` (selects TensorRT artifacts). Construction loads nothing;
    :meth:`load` activates every part (ONNX Runtime) and :meth:`start_engines` starts the
    TensorRT builds in the background."""

    def __init__(self, bundle: Any, profile: Any, *, backend: str = "auto",
                 engine_cache: Path | None = None, intra_op_threads: int = 0) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.digest: str = bundle.digest
        self.profile = profile
        self.backend_choice = backend
        self.engine_cache = engine_cache
        self.intra_op_threads = intra_op_threads
        self.parts: dict[str, PartRunner] = {}
        self.cuts = sorted(self.manifest.cuts, key=lambda c: c.id)
        local = [c for c in self.cuts if c.local_only]
        if not local:
            raise InvalidArgument(f"bundle {self.manifest.model_name!r} has no all-local cut: "
                                  "the edge daemon needs the full model to answer locally")
        self.local_cut = local[0]
        cloud = [c for c in self.cuts if c.cloud_only]
        self.cloud_cut = cloud[0] if cloud else None
        self.interior = [c for c in self.cuts if not c.local_only and not c.cloud_only]
        self.output_names = tuple(t.name for t in self.manifest.outputs)
        self._engine_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.engine_status: dict[str, str] = {}
        self.on_switch: Callable[[str, str], None] | None = None

    # -- parts --------------------------------------------------------------------------------

    def part_paths(self) -> list[str]:
        """Every part this daemon runs (the full model first), each once."""
        paths = [self.local_cut.head_part]
        for cut in self.interior:
            paths += [cut.head_part, cut.tail_part]
        out: list[str] = []
        for p in paths:
            if p is not None and p not in out:
                out.append(p)
        return out

    def load(self) -> None:
        """Activate every part on ONNX Runtime (the bundle's ONNX Runtime artifact of a part
        when it has one, else the part; :meth:`Bundle.select` verifies what it picks)."""
        from tandem.devices.backends import OnnxRuntimeBackend

        selection = self.bundle.select(("head", "tail", "full"), "onnxruntime")
        runnables = {r.part: r for r in selection.distinct()}
        try:
            for part in self.part_paths():
                r = runnables[part]
                backend = OnnxRuntimeBackend(r.path, intra_op_threads=self.intra_op_threads or None,
                                             optimized=r.optimized, name=part).activate()
                self.parts[part] = PartRunner(part, backend, "onnxruntime")
                self.engine_status[part] = "onnxruntime"
        except BaseException:
            self.close()
            raise

    @property
    def full(self) -> PartRunner:
        return self.parts[self.local_cut.head_part]

    def head(self, cut_id: int) -> PartRunner | None:
        cut = self.manifest.cut(cut_id)
        if cut.cloud_only:
            return None
        return self.parts[cut.head_part]

    def tail(self, cut_id: int) -> PartRunner:
        """The part that finishes cut ``cut_id`` locally from its frontier (cut 0: the full
        model from the raw input)."""
        cut = self.manifest.cut(cut_id)
        if cut.cloud_only:
            return self.full
        if cut.local_only:
            raise InvalidArgument(f"cut {cut_id} is all-local: it has no tail")
        return self.parts[cut.tail_part]

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
        return check_feeds(self.manifest.inputs, feeds)

    # -- execution (blocking: call from a worker thread) ----------------------------------------

    def run_full(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.full.infer(feeds)

    def run_head(self, cut_id: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The frontier of cut ``cut_id`` for these inputs (raw inputs among it passed as they
        are); for cut 0, the inputs themselves."""
        cut = self.manifest.cut(cut_id)
        names = [t.name for t in cut.frontier]
        if cut.cloud_only:
            return {n: feeds[n] for n in names}
        head = self.parts[cut.head_part]
        wanted = head.input_names
        out = head.infer({n: feeds[n] for n in wanted})
        return {n: out[n] if n in out else feeds[n] for n in names}

    def run_tail(self, cut_id: int, frontier: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tail = self.tail(cut_id)
        out = tail.infer({n: frontier[n] for n in tail.input_names})
        return {n: out[n] for n in self.output_names}

    # -- TensorRT -------------------------------------------------------------------------------

    def engine_plan(self) -> list[Any]:
        """The TensorRT :class:`~tandem.protocol.bundle.Runnable` of each part that has one for
        this profile, or [] when TensorRT is not wanted or not importable."""
        if self.backend_choice == "onnxruntime" or self.profile.compute_capability is None:
            return []
        try:
            from tandem.protocol.lazy import require

            require("tensorrt", "tensorrt")
        except MissingDependency as exc:
            if self.backend_choice == "tensorrt":
                raise
            log.debug("TensorRT not used: %s", exc)
            return []
        selection = self.bundle.select(("head", "tail", "full"), self.profile.id)
        plan = []
        for r in selection.distinct():
            if r.backend != "tensorrt" or r.part not in self.parts:
                continue
            if r.recipe is not None and r.recipe.unresolved_dims and r.build_on_device:
                self.engine_status[r.part] = "onnxruntime (TensorRT needs concrete shapes)"
                continue
            plan.append(r)
        return plan

    def start_engines(self) -> bool:
        """Start the background TensorRT work; False when there is none."""
        plan = self.engine_plan()
        if not plan:
            return False
        for r in plan:
            self.engine_status[r.part] = "onnxruntime (TensorRT engine building)"
        self._engine_thread = threading.Thread(target=self._build_engines, args=(plan,),
                                               name="tandem-edge-engines", daemon=True)
        self._engine_thread.start()
        return True

    def wait_engines(self, timeout_s: float | None = None) -> bool:
        """Wait for the background builds; True when they are done."""
        t = self._engine_thread
        if t is None:
            return True
        t.join(timeout_s)
        return not t.is_alive()

    def _build_engines(self, plan: list[Any]) -> None:
        for runnable in plan:
            part = runnable.part
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                backend = self._engine_backend(runnable)
            except TandemError as exc:
                self.engine_status[part] = f"onnxruntime (TensorRT failed: {exc})"
                log.warning("TensorRT engine for %s failed; ONNX Runtime keeps serving it: %s",
                            part, exc)
                continue
            except Exception as exc:  # a foreign error the devices layer did not translate
                self.engine_status[part] = f"onnxruntime (TensorRT failed: {exc})"
                log.exception("TensorRT engine for %s failed", part)
                continue
            runner = self.parts.get(part)
            if runner is None or self._stop.is_set():
                _deactivate(backend)
                return
            runner.switch(backend, "tensorrt")
            self.engine_status[part] = "tensorrt"
            log.info("part %s switched to TensorRT (engine ready after %.1f s)", part,
                     time.monotonic() - started)
            if self.on_switch is not None:
                try:
                    self.on_switch(part, "tensorrt")
                except Exception:
                    log.exception("engine switch hook failed")

    def _engine_backend(self, runnable: Any) -> Any:
        """An active TensorRT backend for ``runnable``: its bundled engine when this TensorRT
        loads it, else one built from the part (its recipe) into the engine cache."""
        from tandem.devices.engines import EngineCache, EngineFromOnnx, activate_cached

        part = runnable.part
        if not runnable.build_on_device:
            from tandem.devices.backends import TensorRTBackend

            try:
                return TensorRTBackend(runnable.path, name=part,
                                       foreign_engine="error").activate()
            except TandemError as exc:
                log.info("bundled engine for %s not usable here (%s); building one", part, exc)
        source = runnable.source or self.bundle.path_of(part)
        build = EngineFromOnnx.from_recipe(source, self.profile, runnable.precision,
                                           runnable.recipe or {})
        cache = EngineCache(self.engine_cache or Path.home() / ".cache" / "tandem" / "engines")
        return activate_cached(cache, build.engine_key(), build, name=part)

    def close(self) -> None:
        self._stop.set()
        for runner in self.parts.values():
            runner.close()
        self.parts.clear()
