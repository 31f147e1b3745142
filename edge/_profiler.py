"""On-device profiling: how long every part of the bundle takes here, measured, and kept on disk.

For the full model and for every interior cut's head and tail: ``warmup`` untimed runs, then
``runs`` timed runs (median and p90 kept), on seeded random inputs at the profile shapes (the
manifest's ``input_shapes`` when the compiler recorded them, else ``--profile-shapes``, else
the inputs' fixed dims with 1 for a leading open dim and 64 for any other). A tail runs on the
frontier its own head computed. The time to encode each cut's frontier in every encoding the
compiler verified for it is measured too (what the planner calls ``encode``).

The table is stored as JSON in ``<state_dir>/profiles/<bundle digest>-<device profile>.json``
(written atomically), per part and per backend kind, so a restart reuses it, and a part that
switches to TensorRT is measured again (:func:`profile_part`) and stored beside its ONNX
Runtime figures. A progress bar shows on a terminal; elsewhere one log line per part.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.edge._runtime import ModelRuntime, numpy_dtype
from tandem.protocol.errors import InvalidArgument
from tandem.protocol.files import atomic_write

__all__ = ["FORMAT", "PartTiming", "ProfileTable", "load_table", "profile_bundle",
           "profile_part", "profile_shapes"]

log = logging.getLogger("tandem.edge.profiler")

FORMAT = 1
_DEFAULT_OPEN_DIM = 64


@dataclass(frozen=True)
class PartTiming:
    median_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "runs": self.runs}


@dataclass
class ProfileTable:
    """Measured times on this device at ``shapes``: ``parts[part][backend kind]``, and
    ``encode_ms[cut id][encoding]`` / ``frontier_bytes[cut id][encoding]`` for the frontier at
    those shapes."""

    bundle_digest: str
    device: str
    shapes: dict[str, tuple[int, ...]]
    parts: dict[str, dict[str, PartTiming]] = field(default_factory=dict)
    encode_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    frontier_bytes: dict[int, dict[str, int]] = field(default_factory=dict)
    output_bytes: int = 0
    created_at: float = field(default_factory=time.time)

    @property
    def input_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def part_ms(self, part: str, kind: str) -> float | None:
        by_kind = self.parts.get(part, {})
        timing = by_kind.get(kind) or by_kind.get("onnxruntime")
        return None if timing is None else timing.median_ms

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "bundle_digest": self.bundle_digest, "device": self.device,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "parts": {p: {k: t.to_dict() for k, t in kinds.items()}
                      for p, kinds in self.parts.items()},
            "encode_ms": {str(c): v for c, v in self.encode_ms.items()},
            "frontier_bytes": {str(c): v for c, v in self.frontier_bytes.items()},
            "output_bytes": self.output_bytes, "created_at": self.created_at,
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProfileTable:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a profile table of this format")
        return cls(
            bundle_digest=str(doc["bundle_digest"]), device=str(doc["device"]),
            shapes={k: tuple(int(d) for d in v) for k, v in doc["shapes"].items()},
            parts={p: {k: PartTiming(float(t["median_ms"]), float(t["p90_ms"]), int(t["runs"]))
                       for k, t in kinds.items()} for p, kinds in doc["parts"].items()},
            encode_ms={int(c): {e: float(ms) for e, ms in v.items()}
                       for c, v in doc["encode_ms"].items()},
            frontier_bytes={int(c): {e: int(n) for e, n in v.items()}
                            for c, v in doc["frontier_bytes"].items()},
            output_bytes=int(doc.get("output_bytes", 0)),
            created_at=float(doc.get("created_at", 0.0)))

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_json())


def table_path(state_dir: Path, bundle_digest: str, device: str) -> Path:
    return state_dir / "profiles" / f"{bundle_digest}-{device}.json"


def load_table(path: Path, bundle_digest: str, device: str) -> ProfileTable | None:
    """The stored table, or None when there is none or it is not for this bundle and device
    (a damaged file is logged and ignored)."""
    try:
        table = ProfileTable.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the stored profile %s: %s", path, exc)
        return None
    if table.bundle_digest != bundle_digest or table.device != device:
        return None
    return table


def profile_shapes(manifest: Any, given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The input shapes to profile at (see the module docstring)."""
    recorded = dict(getattr(manifest, "input_shapes", None) or {})
    out = {}
    for spec in manifest.inputs:
        if spec.name in given:
            shape = tuple(given[spec.name])
        elif spec.name in recorded:
            shape = tuple(recorded[spec.name])
        else:
            shape = tuple(d if isinstance(d, int) else (1 if i == 0 else _DEFAULT_OPEN_DIM)
                          for i, d in enumerate(spec.shape))
        if len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, shape, strict=True)):
            raise InvalidArgument(f"profile shape {list(shape)} for {spec.name!r} does not fit "
                                  f"{list(spec.shape)}")
        out[spec.name] = shape
    return out


def sample_inputs(manifest: Any, shapes: dict[str, tuple[int, ...]],
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest.inputs:
        dtype = numpy_dtype(spec.dtype)
        shape = shapes[spec.name]
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype)
    return feeds


def _time_ms(fn: Callable[[], Any], warmup: int, runs: int) -> tuple[PartTiming, Any]:
    out = None
    for _ in range(warmup):
        out = fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    p90 = samples[min(len(samples) - 1, math.ceil(0.9 * len(samples)) - 1)]
    return PartTiming(round(statistics.median(samples), 4), round(p90, 4), runs), out


class _Progress:
    """A rich progress bar on a terminal; log lines elsewhere."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._bar = None
        self.label = label
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), transient=True,
                                 console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def step(self, what: str, timing: PartTiming | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{self.label}: {what}")
        elif timing is not None:
            log.info("profiled %s: median %.3f ms, p90 %.3f ms (%d runs)", what,
                     timing.median_ms, timing.p90_ms, timing.runs)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _encode_costs(frontier: dict[str, np.ndarray], encodings: tuple[str, ...],
                  runs: int) -> tuple[dict[str, float], dict[str, int]]:
    """(ms, bytes) to encode ``frontier`` in each encoding (raw and the verified ones)."""
    from tandem.protocol.dtypes import LOSSY_ENCODINGS
    from tandem.protocol.tensors import Encoding, Tensor

    ms, sizes = {}, {}
    for enc in dict.fromkeys(("raw", *encodings)):
        code = LOSSY_ENCODINGS.get(enc, Encoding.RAW)

        def encode(code=code) -> int:
            return sum(Tensor.from_array(n, a, code if a.dtype == np.float32 else
                                         Encoding.RAW).nbytes for n, a in frontier.items())

        timing, nbytes = _time_ms(encode, 1, max(3, min(runs, 10)))
        ms[enc], sizes[enc] = timing.median_ms, int(nbytes)
    return ms, sizes


def profile_bundle(runtime: ModelRuntime, state_dir: Path | None, *, warmup: int = 3,
                   runs: int = 20, shapes: dict[str, tuple[int, ...]] | None = None,
                   progress: bool = True, reuse: bool = True) -> ProfileTable:
    """Measure every part of ``runtime`` (or reuse the stored table for this bundle and
    device when it covers every part on its current backend); store and return the table."""
    manifest = runtime.manifest
    device = runtime.profile.id
    path = table_path(state_dir, runtime.digest, device) if state_dir is not None else None
    shapes = profile_shapes(manifest, shapes or {})
    if reuse and path is not None:
        table = load_table(path, runtime.digest, device)
        if table is not None and table.shapes == shapes and all(
                runner.kind in table.parts.get(part, {})
                for part, runner in runtime.parts.items()):
            log.info("using the stored profile %s", path)
            return table
    table = ProfileTable(runtime.digest, device, shapes)
    feeds = sample_inputs(manifest, shapes)
    steps = 1 + 2 * len(runtime.interior) + (1 if runtime.cloud_cut is not None else 0)
    bar = _Progress(steps, f"profiling {manifest.model_name}", progress)
    try:
        full = runtime.full
        timing, outputs = _time_ms(lambda: runtime.run_full(feeds), warmup, runs)
        table.parts.setdefault(full.path, {})[full.kind] = timing
        table.output_bytes = sum(int(np.asarray(v).nbytes) for v in outputs.values())
        bar.step("full model", timing)
        if runtime.cloud_cut is not None:
            cid = runtime.cloud_cut.id
            table.encode_ms[cid], table.frontier_bytes[cid] = _encode_costs(
                feeds, manifest.allowed_encodings(cid), runs)
            bar.step(f"encoding the input (cut {cid})", None)
        for cut in runtime.interior:
            head = runtime.parts[cut.head_part]
            timing, frontier = _time_ms(functools.partial(runtime.run_head, cut.id, feeds),
                                        warmup, runs)
            table.parts.setdefault(head.path, {})[head.kind] = timing
            bar.step(f"head of cut {cut.id}", timing)
            tail = runtime.parts[cut.tail_part]
            timing, _ = _time_ms(functools.partial(runtime.run_tail, cut.id, frontier),
                                 warmup, runs)
            table.parts.setdefault(tail.path, {})[tail.kind] = timing
            bar.step(f"tail of cut {cut.id}", timing)
            table.encode_ms[cut.id], table.frontier_bytes[cut.id] = _encode_costs(
                frontier, manifest.allowed_encodings(cut.id), runs)
    finally:
        bar.close()
    if path is not None:
        table.save(path)
    return table


def profile_part(runtime: ModelRuntime, table: ProfileTable, part: str, state_dir: Path | None,
                 *, warmup: int = 3, runs: int = 20) -> PartTiming:
    """Measure one part again on its current backend (after a switch to TensorRT), add it to
    ``table`` and store the table."""
    feeds = sample_inputs(runtime.manifest, table.shapes)
    runner = runtime.parts[part]
    if part == runtime.full.path:
        fn: Callable[[], Any] = lambda: runtime.run_full(feeds)  # noqa: E731
    else:
        cut = next(c for c in runtime.interior if part in (c.head_part, c.tail_part))
        if part == cut.head_part:
            fn = lambda: runtime.run_head(cut.id, feeds)  # noqa: E731
        else:
            frontier = runtime.run_head(cut.id, feeds)
            fn = lambda: runtime.run_tail(cut.id, frontier)  # noqa: E731
    timing, _ = _time_ms(fn, warmup, runs)
    table.parts.setdefault(part, {})[runner.kind] = timing
    if state_dir is not None:
        table.save(table_path(state_dir, runtime.digest, runtime.profile.id))
    return timing
