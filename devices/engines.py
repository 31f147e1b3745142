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
- :func:`activate_cached` — the engine for a key, active in a
  :class:`~tandem.devices.backends.tensorrt.TensorRTBackend`; a cached engine TensorRT calls
  foreign to this device model (its "not recommended across different models of devices"
  warning) counts as a miss: it is evicted and rebuilt once.

Nothing here imports ``tensorrt`` or ``pycuda`` until a build, a device read or a load runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
    "DeviceIdentity",
    "EngineCache",
    "EngineFromOnnx",
    "EngineKey",
    "ForeignEngine",
    "UnsupportedModel",
    "activate_cached",
    "calibration_digest",
    "external_data_digests",
    "iter_tensors",
    "read_l4t_release",
    "shape_profile_id",
    "static_shapes",
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
