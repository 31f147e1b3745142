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
when the last request holding it ends. The mechanism is :mod:`tandem.devices`' (shared with the
cloud endpoint): :class:`~tandem.devices.backends.SwitchableBackend` and
:class:`~tandem.devices.engines.BackgroundEngineBuild`.

Inputs are checked against the manifest before anything runs (names, dtypes, ranks, fixed
dims, symbolic dims that must agree): :meth:`ModelRuntime.check_inputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.devices.backends.switchable import SwitchableBackend
from tandem.protocol import dtypes
from tandem.protocol.errors import InvalidArgument

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


class PartRunner(SwitchableBackend):
    """One part of the bundle (bundle path ``path``), run by its current backend, switchable
    while serving: :class:`tandem.devices.backends.SwitchableBackend`."""

    def __init__(self, path: str, backend: Any, kind: str) -> None:
        super().__init__(backend, kind, name=path)
        self.path = path


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
        self._engines: Any = None  # a tandem.devices.engines.BackgroundEngineBuild
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
        from tandem.devices.engines import engine_plan, tensorrt_wanted

        if not tensorrt_wanted(self.backend_choice, self.profile):
            return []
        selection = self.bundle.select(("head", "tail", "full"), self.profile.id)
        plan, skipped = engine_plan(r for r in selection.distinct() if r.part in self.parts)
        self.engine_status.update(skipped)
        return plan

    def start_engines(self) -> bool:
        """Start the background TensorRT work; False when there is none."""
        from tandem.devices.engines import BackgroundEngineBuild, engine_backend

        plan = self.engine_plan()
        if not plan:
            return False
        cache = self.engine_cache or Path.home() / ".cache" / "tandem" / "engines"

        def job(r: Any) -> tuple[str, Callable[[], Any], Callable[[], Any]]:
            return (r.part,
                    lambda: engine_backend(r, self.profile, cache,
                                           source=self.bundle.path_of(r.part), name=r.part),
                    lambda: self.parts.get(r.part))

        self._engines = BackgroundEngineBuild([job(r) for r in plan], name="tandem-edge-engines",
                                              on_switch=self._switched,
                                              status=self.engine_status).start()
        return True

    def _switched(self, part: str, kind: str) -> None:
        if self.on_switch is not None:
            self.on_switch(part, kind)

    def wait_engines(self, timeout_s: float | None = None) -> bool:
        """Wait for the background builds; True when they are done."""
        return self._engines is None or self._engines.wait(timeout_s)

    def close(self) -> None:
        if self._engines is not None:
            self._engines.stop()
        for runner in self.parts.values():
            runner.close()
        self.parts.clear()
