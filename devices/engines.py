"""TensorRT engines on a device: build one from an ONNX part, key it, cache it, load it.

What the compiler uses at compile time and what a device uses to build the engine a bundle's
recipe describes::

    from tandem.devices.engines import EngineCache, EngineFromOnnx, activate_cached

    build = EngineFromOnnx.from_recipe(part_path, profile, "fp16", artifact.extra)
    backend = activate_cached(EngineCache(cache_dir), build.engine_key(), build)
    outputs = backend.infer(feeds)

- :class:`EngineFromOnnx` — the build step (bytes out); see its module for every builder setting.
- :class:`EngineKey` — what an engine depends on, read from the device (:class:`DeviceIdentity`:
  GPU name, compute capability, multiprocessor count, L4T release on Jetson), plus the part and
  its external-data files, the calibration data, the TensorRT version, precision, shape profile
  and builder options.
- :class:`EngineCache` — ``<digest>.engine`` + sidecar on disk; a mismatching or half-written
  entry is a miss; builds of one key are serialized across processes.
- :func:`engine_backend` — the active TensorRT backend for a bundle's TensorRT
  :class:`~tandem.protocol.bundle.Runnable`: its bundled engine, else built from its recipe
  into the cache; :func:`tensorrt_wanted` and :func:`engine_plan` decide which parts get one.
- :class:`BackgroundEngineBuild` — those engines prepared in a background thread while ONNX
  Runtime serves, each part switched atomically when its engine is ready
  (:class:`~tandem.devices.backends.SwitchableBackend`): the edge daemon and the cloud endpoint
  both serve this way.
- :func:`activate_cached` — the engine for a key, active in a
  :class:`~tandem.devices.backends.tensorrt.TensorRTBackend`; a cached engine TensorRT calls
  foreign to this device model (its "not recommended across different models of devices"
  warning) counts as a miss: it is evicted and rebuilt once.

Nothing here imports ``tensorrt`` or ``pycuda`` until a build, a device read or a load runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tandem.devices._engine_build import (
    PRECISIONS,
    EngineFromOnnx,
    UnsupportedModel,
    timing_cache_file,
)
from tandem.devices._engine_cache import (
    TEGRA_RELEASE,
    DeviceIdentity,
    EngineCache,
    EngineKey,
    calibration_digest,
    external_data_digests,
    iter_tensors,
    read_l4t_release,
    shape_profile_id,
    static_shapes,
)
from tandem.devices.backends.tensorrt import ForeignEngine

__all__ = [
    "PRECISIONS",
    "TEGRA_RELEASE",
    "BackgroundEngineBuild",
    "DeviceIdentity",
    "EngineCache",
    "EngineFromOnnx",
    "EngineKey",
    "ForeignEngine",
    "UnsupportedModel",
    "activate_cached",
    "calibration_digest",
    "engine_backend",
    "engine_plan",
    "external_data_digests",
    "iter_tensors",
    "read_l4t_release",
    "shape_profile_id",
    "static_shapes",
    "tensorrt_wanted",
    "timing_cache_file",
]

log = logging.getLogger(__name__)


def activate_cached(cache: EngineCache, key: EngineKey, build: Callable[[], bytes], *,
                    device: int = 0, dla_core: int | None = None,
                    allow_host_code: bool = False, name: str | None = None):
    """An active :class:`~tandem.devices.backends.tensorrt.TensorRTBackend` running ``key``'s
    engine from ``cache`` (built by ``build`` when missing).

    ``dla_core`` and ``allow_host_code`` default to what ``build`` says when it is an
    :class:`EngineFromOnnx` (its DLA core; host code for version-compatible engines).
    """
    from tandem.devices.backends.tensorrt import TensorRTBackend

    if isinstance(build, EngineFromOnnx):
        dla_core = build.dla_core if dla_core is None else dla_core
        allow_host_code = allow_host_code or build.version_compatible

    def open_(foreign: str):
        return TensorRTBackend(cache.get_or_build(key, build), device, dla_core=dla_core,
                               allow_host_code=allow_host_code, name=name,
                               foreign_engine=foreign).activate()

    try:
        return open_("error")
    except ForeignEngine as exc:
        log.warning("%s; rebuilding it on this device", exc)
        cache.evict(build.complete_key(key) if hasattr(build, "complete_key") else key)
        return open_("warn")


def tensorrt_wanted(choice: str, profile: Any) -> bool:
    """Whether to prepare TensorRT engines: ``choice`` ``"auto"`` or ``"tensorrt"``, a GPU
    profile (a compute capability) and ``tensorrt`` importable. ``"tensorrt"`` when it does not
    import raises MissingDependency (naming the package); ``"auto"`` is then False."""
    if choice == "onnxruntime" or getattr(profile, "compute_capability", None) is None:
        return False
    from tandem.protocol.errors import MissingDependency
    from tandem.protocol.lazy import require

    try:
        require("tensorrt", "tensorrt")
    except MissingDependency as exc:
        if choice == "tensorrt":
            raise
        log.debug("TensorRT not used: %s", exc)
        return False
    return True


def engine_plan(runnables: Iterable[Any]) -> tuple[list[Any], dict[str, str]]:
    """Of the :class:`~tandem.protocol.bundle.Runnable` s a bundle selected for a GPU profile,
    the TensorRT ones an engine can be had for (``plan``), and why the others stay on ONNX
    Runtime (``skipped``: part -> reason; parts without a TensorRT artifact are not listed)."""
    plan, skipped = [], {}
    for r in runnables:
        if r.backend != "tensorrt":
            continue
        if r.recipe is not None and r.recipe.unresolved_dims and r.build_on_device:
            skipped[r.part] = "onnxruntime (TensorRT needs concrete shapes)"
            continue
        plan.append(r)
    return plan, skipped


def engine_backend(runnable: Any, profile: Any, cache_dir: Path, *, source: Path | None = None,
                   name: str | None = None) -> Any:
    """An active :class:`~tandem.devices.backends.tensorrt.TensorRTBackend` for a TensorRT
    ``runnable``: its bundled engine when this TensorRT loads it, else one built from the part
    (its recipe) into the engine cache at ``cache_dir`` (or found there)."""
    from tandem.devices.backends.tensorrt import TensorRTBackend
    from tandem.protocol.errors import InvalidArgument, TandemError

    name = name or runnable.part
    if not runnable.build_on_device:
        try:
            return TensorRTBackend(runnable.path, name=name, foreign_engine="error").activate()
        except TandemError as exc:
            log.info("bundled engine for %s not usable here (%s); building one", name, exc)
    source = runnable.source or source
    if source is None:
        raise InvalidArgument(f"{name}: no ONNX source to build a TensorRT engine from")
    build = EngineFromOnnx.from_recipe(source, profile, runnable.precision,
                                       runnable.recipe or {})
    return activate_cached(EngineCache(cache_dir), build.engine_key(), build, name=name)


class BackgroundEngineBuild:
    """Prepare TensorRT backends in one background thread and switch parts to them.

    ``jobs``: ``(part, make, target)`` triples — ``make()`` returns an active backend (e.g.
    ``lambda: engine_backend(r, profile, cache)``), ``target`` is the part's
    :class:`~tandem.devices.backends.SwitchableBackend` (or a callable returning it, or None when
    the part is gone by then). Jobs run in order; a failing one leaves its part on the backend it
    has (``status[part]`` says why) and the next one runs. ``status`` maps each part to
    ``"onnxruntime (TensorRT engine building)"``, then ``"tensorrt"`` or the reason it is not.
    ``on_switch(part, kind)`` is called in the build thread after each switch."""

    BUILDING = "onnxruntime (TensorRT engine building)"

    def __init__(self, jobs: Sequence[tuple[str, Callable[[], Any], Any]], *,
                 name: str = "tandem-engines",
                 on_switch: Callable[[str, str], None] | None = None,
                 status: dict[str, str] | None = None) -> None:
        self.jobs = list(jobs)
        self.name = name
        self.on_switch = on_switch
        self.status: dict[str, str] = {} if status is None else status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundEngineBuild:
        for part, _, _ in self.jobs:
            self.status[part] = self.BUILDING
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the builds; True when they are over."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.done

    def stop(self) -> None:
        """Start no further job; a build already running finishes and is released unused."""
        self._stop.set()

    def _run(self) -> None:
        for part, make, target in self.jobs:
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                backend = make()
            except Exception as exc:  # a TandemError, or a foreign one not translated below
                self.status[part] = f"onnxruntime (TensorRT failed: {exc})"
                if isinstance(exc, _tandem_error()):
                    log.warning("TensorRT engine for %s failed; ONNX Runtime keeps serving it: "
                                "%s", part, exc)
                else:
                    log.exception("TensorRT engine for %s failed", part)
                continue
            runner = target if target is None or hasattr(target, "switch") else target()
            if runner is None or self._stop.is_set():
                _release(backend)
                self.status[part] = "onnxruntime (unloaded before its engine was ready)"
                continue
            if not runner.switch(backend, "tensorrt"):  # closed meanwhile: released by switch
                self.status[part] = "onnxruntime (unloaded before its engine was ready)"
                continue
            self.status[part] = "tensorrt"
            log.info("part %s switched to TensorRT (engine ready after %.1f s)", part,
                     time.monotonic() - started)
            if self.on_switch is not None:
                try:
                    self.on_switch(part, "tensorrt")
                except Exception:
                    log.exception("engine switch hook failed")


def _tandem_error() -> type:
    from tandem.protocol.errors import TandemError

    return TandemError


def _release(backend: Any) -> None:
    from tandem.protocol.errors import TandemError

    try:
        if backend.is_active:
            backend.deactivate()
    except TandemError as exc:
        log.warning("could not release %s: %s", backend, exc)
