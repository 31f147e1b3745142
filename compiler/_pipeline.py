"""``BundleFromOnnx``: the whole compile, as one step composed of the smaller ones.

    load → input shapes → analyze at them → find cuts (boundary sweep + min-cut per regime)
         → extract head/tail per cut → verify (raw, fp16, int8) → frontier dims
         → lower each part per target → write the bundle (atomically, optionally signed)

Sizes: every byte and FLOP figure is counted at one set of input shapes
(:func:`~tandem.compiler._shapes.resolve_input_shapes`: ``CompileOptions.input_shapes``, else
the samples', else the model's dims with stand-ins and one warning); the manifest records them
(``input_shapes``) and, per cut, the frontier's dims as functions of the inputs' symbolic dims
(``frontier_dims``), so the edge sizes a request of any shape.

Weights are stored once: every ONNX file of the bundle (``parts/``) reads its initializers from
``parts/weights.bin`` (:class:`~tandem.compiler._weights.WeightStore`), its ``FileEntry``
``requires`` it, and the manifest names it (``weights``).

Targets:

- ``onnxruntime`` (alias ``cpu``): every part optimized ahead of time by ONNX Runtime
  (:class:`~tandem.compiler._ort.OrtOptimizedFromOnnx`, ``parts/<part>.ort.onnx``) and loaded
  later without re-optimizing; its weights go into the shared file too (deduplicated by
  content: what the optimizer left unchanged is not stored again). Should the optimizer create
  so many new weights that the bundle would pass :data:`MAX_BUNDLE_RATIO` times the model, that
  part is optimized on load instead (its artifact is the plain part,
  ``extra["optimize"] == "on-load"``).
- a device profile id (``tandem devices`` lists them): CPU profiles lower like ``onnxruntime``;
  GPU and Jetson profiles get TensorRT engines (:class:`~tandem.compiler._tensorrt.EngineFromOnnx`).
  Engines only run on the TensorRT version and GPU they were built with, so with
  ``engines="auto"`` they are built here only when TensorRT is importable *and* this machine's
  GPU has the profile's compute capability; otherwise the artifact records the build recipe
  (precision, workspace, DLA, shape profile) and the device builds it into its engine cache on
  first use (docs/architecture.md: engines built on the device from a bundle's recipe).
  ``engines="build"`` insists on building here and fails if it cannot.

A cut whose verification fails is dropped with a warning; a model left with no interior cut is
an error (``NoValidCut``). Nothing is written unless everything succeeded. Warnings are
:class:`~tandem.compiler._errors.CompileWarning`; messages name options by their
``CompileOptions`` field (``.options``), never by a command-line flag.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.compiler._cuts import Cut, boundary_frontiers, find_cuts
from tandem.compiler._errors import (
    CompileError,
    CompileWarning,
    ExtractionError,
    NoValidCut,
    with_options,
)
from tandem.compiler._extract import extract
from tandem.compiler._graph import (
    GraphInfo,
    GraphTensor,
    analyze,
    external_data_files,
    input_specs,
    load_model,
    sendable,
    unresolved_tensors,
)
from tandem.compiler._mincut import UPLINKS_MBPS, Regime, regimes
from tandem.compiler._shapes import (
    InputShapes,
    frontier_dims,
    guess_warning,
    name_input_dims,
    resolve_input_shapes,
)
from tandem.compiler._verify import (
    CutVerification,
    Verifier,
    input_ranges,
    load_samples,
    measure_shapes,
    random_samples,
)
from tandem.compiler._weights import WeightStore
from tandem.protocol.dtypes import UnsupportedDType, by_onnx
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    from onnx import ModelProto

    from tandem.devices.profiles import Profile
    from tandem.protocol.bundle import Manifest

__all__ = [
    "BundleFromOnnx",
    "CompileOptions",
    "CompileResult",
    "NoValidCut",
    "resolve_targets",
]

TOOL_VERSION = "tandem-rt 0.1.0"
WEIGHTS = "parts/weights.bin"
#: the bundle stays within this many times the model's weights (plus the graphs)
MAX_BUNDLE_RATIO = 1.5


@dataclass(frozen=True)
class Target:
    """One lowering target: ``backend`` is "onnxruntime" or "tensorrt"."""

    name: str
    backend: str
    profile: Profile | None = None


@dataclass(frozen=True)
class CompileOptions:
    targets: tuple[str, ...] = ("onnxruntime",)
    max_cuts: int = 8
    max_frontier: int = 2
    samples: Path | None = None  # .npz of real inputs; seeded random otherwise
    n_samples: int = 2
    seed: int = 0
    batch: int = 1  # value of a symbolic leading dim nothing else sizes
    # input name -> concrete shape every byte figure is computed (and random samples drawn) at;
    # default: the samples' shapes, else the model's dims with stand-ins (and a warning)
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    min_cut: bool = True  # add the DADS minimum cut of each regime to the candidates
    uplinks_mbps: tuple[float, ...] = UPLINKS_MBPS  # the regimes' uplinks
    sign_key: Path | None = None
    key_password: bytes | None = None
    model_name: str | None = None
    model_version: str = "1"
    # orders the releases of one model for rollback protection (a device refuses a lower one);
    # None: the compile's UTC time in seconds, so a later compile is always newer
    bundle_version: int | None = None
    precision: str = "fp16"  # TensorRT precision: fp32 | fp16 | int8
    ort_level: str = "extended"
    engines: str = "auto"  # auto | build | defer
    max_batch: int = 8  # TensorRT optimization profile max for a dynamic leading dim
    timing_cache: Path | None = None  # TensorRT timing cache, loaded and saved back
    version_compatible: bool = False  # TensorRT >= 8.6 version-compatible engines
    dla_core: int | None = None  # DLA core (with GPU fallback) on profiles that have DLA
    engine_cache: Path | None = None  # built engines are reused from here (default: user cache)
    overwrite: bool = False
    threads: int = 1


@dataclass
class CutReport:
    """What the summary table shows about one kept cut."""

    cut: Cut
    verification: CutVerification
    frontier: tuple[GraphTensor, ...]
    bytes_by_encoding: dict[str, int]


@dataclass
class CompileResult:
    manifest: Manifest
    out_dir: Path
    cuts: list[CutReport]
    dropped: list[tuple[Cut, str]] = field(default_factory=list)
    total_flops: int = 0
    n_nodes: int = 0
    input_shapes: InputShapes | None = None
    regimes: list[Regime] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the compile warned about


Progress = Callable[[str, int, int], None]  # (stage description, done, total)


def resolve_targets(names: Sequence[str]) -> list[Target]:
    """Validate target names before any work: ``onnxruntime``/``cpu`` or a profile id."""
    from tandem.devices.profiles import get_profile

    if not names:
        raise with_options(InvalidArgument(
            "no target given (onnxruntime, or a device profile id)"), "targets")
    targets: list[Target] = []
    for name in dict.fromkeys(names):
        if name in ("onnxruntime", "cpu", "ort"):
            targets.append(Target("onnxruntime", "onnxruntime"))
            continue
        try:
            profile = get_profile(name)
        except NotFound as exc:
            raise InvalidArgument(f"unknown target {name!r}: {exc}") from None
        targets.append(Target(name, profile.default_backend, profile))
    return targets


def _dtype_name(code: int) -> str:
    try:
        return by_onnx(code).name  # the one dtype table (tandem.protocol.dtypes)
    except UnsupportedDType:
        raise CompileError(f"tensor element type {code} cannot be described in a bundle") from None


def _spec(t: GraphTensor):
    from tandem.protocol.bundle import TensorSpec

    shape = t.shape if t.shape is not None else ()
    return TensorSpec(name=t.name, dtype=_dtype_name(t.dtype), shape=tuple(shape))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e300


def _snr(x: float) -> float:
    from tandem.protocol.bundle import SNR_LIMIT_DB

    return max(-SNR_LIMIT_DB, min(SNR_LIMIT_DB, x)) if not math.isnan(x) else -SNR_LIMIT_DB


def _bytes_by_encoding(specs: Sequence[GraphTensor], batch: int) -> dict[str, int]:
    raw = sum(s.nbytes(batch) for s in specs)
    fp32 = sum(s.nbytes(batch) for s in specs if s.dtype == 1)
    return {"raw": raw, "fp16": raw - fp32 // 2, "int8": raw - (fp32 * 3) // 4}


def _source_digest(path: Path) -> str:
    """sha256 of the model file followed by its external data files (sorted by location)."""
    h = hashlib.sha256()
    for file in (path, *external_data_files(path)):
        with open(file, "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _sample_at(verifier: Verifier, model: ModelProto, shapes: Mapping[str, tuple[int, ...]],
               seed: int) -> dict:
    """A sample at exactly ``shapes`` (to size tensors at the compile's sizes): the verifier's
    first one when it has those shapes, else a seeded random one."""
    first = verifier.samples[0]
    if all(tuple(first[k].shape) == tuple(v) for k, v in shapes.items() if k in first):
        return first
    specs = input_specs(model)
    return random_samples(specs, 1, seed=seed, shapes=shapes, ranges=input_ranges(model))[0]


class BundleFromOnnx:
    """Callable step: compile ``model_path`` into a bundle at ``out_dir``; returns a
    :class:`CompileResult`. Construction validates the options and does nothing else."""

    def __init__(self, model_path: str | os.PathLike, out_dir: str | os.PathLike,
                 options: CompileOptions = CompileOptions(),
                 progress: Progress | None = None) -> None:
        if options.max_cuts < 1:
            raise with_options(InvalidArgument("max_cuts must be at least 1"), "max_cuts")
        if options.max_frontier < 1:
            raise with_options(InvalidArgument("max_frontier must be at least 1"),
                               "max_frontier")
        if options.engines not in ("auto", "build", "defer"):
            raise InvalidArgument(f"engines must be auto, build or defer, not {options.engines!r}")
        if options.precision not in ("fp32", "fp16", "int8"):
            raise InvalidArgument(f"unknown precision {options.precision!r}")
        self.model_path = Path(model_path)
        self.out_dir = Path(out_dir)
        self.options = options
        self.progress = progress or (lambda stage, done, total: None)

    def __call__(self) -> CompileResult:
        opts = self.options
        targets = resolve_targets(opts.targets)
        if self.out_dir.exists() and not opts.overwrite:
            raise with_options(FailedPrecondition(f"{self.out_dir} already exists"),
                               "overwrite")
        if not self.model_path.is_file():
            raise NotFound(f"no model file at {self.model_path}")
        self.warnings: list[str] = []
        self.progress("loading and analyzing the model", 0, 1)
        model = load_model(self.model_path)
        name_input_dims(model)
        specs = input_specs(model)
        samples = load_samples(opts.samples, model) if opts.samples is not None else None
        shapes = resolve_input_shapes(specs, opts.input_shapes, samples, batch=opts.batch)
        if shapes.guessed:
            self._warn(guess_warning(self.model_path.name, shapes), "input_shapes")
        info = analyze(model, batch=opts.batch, input_shapes=shapes.shapes)
        verifier = Verifier(model, samples, seed=opts.seed, n_samples=opts.n_samples,
                            batch=opts.batch, shapes=shapes.shapes,
                            intra_op_threads=opts.threads)
        for problem in verifier.warnings:
            self._warn(f"{self.model_path.name}: {problem}", "samples")
        unresolved = unresolved_tensors(model, info)
        if unresolved:  # size what shape inference could not, so cuts are costed truly
            sample = _sample_at(verifier, model, shapes.shapes, opts.seed)
            measured = measure_shapes(model, unresolved, sample, intra_op_threads=opts.threads)
            info = analyze(model, batch=opts.batch, input_shapes=shapes.shapes,
                           measured=measured)
        found_by = regimes([t.profile for t in targets if t.profile],
                           opts.uplinks_mbps) if opts.min_cut else []
        cuts = find_cuts(info, max_frontier=opts.max_frontier, max_cuts=opts.max_cuts,
                         regimes=found_by)
        self.progress("loading and analyzing the model", 1, 1)
        with tempfile.TemporaryDirectory(prefix="tandem-compile-") as scratch:
            work = Path(scratch)
            store = WeightStore(work / WEIGHTS)
            store.save(model, work / "parts/full.onnx")
            # room left for what the ORT optimizer adds, so weights + graphs stay within
            # MAX_BUNDLE_RATIO of the model (graphs are small beside real models' weights)
            self._weights_budget = int((MAX_BUNDLE_RATIO - 0.1) * store.size)
            kept, dropped, parts = self._split(model, info, cuts, verifier, work, store)
            self._check_interior(info, cuts, kept, dropped, shapes)
            dims = self._frontier_dims(model, info, kept, shapes)
            artifacts = self._lower(targets, sorted(parts), work, verifier, store)
            manifest = self._manifest(model, info, kept, artifacts, shapes, dims)
            self.progress("writing bundle", 0, 1)
            manifest = self._write(manifest, work, parts, artifacts)
        self.progress("writing bundle", 1, 1)
        return CompileResult(manifest, self.out_dir, kept, dropped, info.total_flops,
                             len(info.compute_nodes), shapes, found_by, self.warnings)

    def _warn(self, message: str, *options: str) -> None:
        self.warnings.append(message)
        warnings.warn(CompileWarning(message, *options), stacklevel=3)

    # -- steps ------------------------------------------------------------------------------

    def _check_interior(self, info: GraphInfo, cuts: list[Cut], kept: list[CutReport],
                        dropped: list[tuple[Cut, str]], shapes: InputShapes) -> None:
        """No interior cut left: an error when none exists or all failed verification; a
        warning when every one sends more than the raw input (cut 0 dominates: the bundle still
        offers cloud-only and all-local, the offload decision an edge needs) - unless the
        sizes were guessed, which the one warning about them already says."""
        n = len(info.compute_nodes)
        if any(0 < r.cut.position < n for r in kept):
            return
        name = self.model_path.name
        failed = [(c, why) for c, why in dropped if 0 < c.position < n]
        if failed:
            reasons = "; ".join(f"cut {c.id}: {why}" for c, why in failed)
            raise NoValidCut(f"{name}: no valid split point (every candidate failed: {reasons})")
        k = self.options.max_frontier
        candidates = [c for c in boundary_frontiers(info, k) if 0 < c.position < n]
        if not candidates:
            raise with_options(NoValidCut(
                f"{name}: no valid split point (no boundary between two nodes has a frontier of "
                f"at most {k} tensor(s)); allow more tensors per cut"), "max_frontier")
        if shapes.guessed:
            return
        smallest = min(c.frontier_bytes for c in candidates)
        at = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.shapes.items())
        self._warn(
            f"{name}: all {len(candidates)} split points send more than the raw input "
            f"({smallest} vs {cuts[0].frontier_bytes} bytes at {at}); the bundle offers cut 0 "
            "(cloud-only) and all-local")

    def _split(self, model, info: GraphInfo, cuts: list[Cut], verifier: Verifier, work: Path,
               store: WeightStore):
        """Extract and verify every cut; returns (kept reports, dropped, part paths)."""
        kept: list[CutReport] = []
        dropped: list[tuple[Cut, str]] = []
        parts: set[str] = {"parts/full.onnx"}
        n = len(info.compute_nodes)
        for i, cut in enumerate(cuts):
            self.progress("extracting and verifying cuts", i, len(cuts))
            stuck = [t for t in cut.frontier if not sendable(info, t)]
            if stuck:  # only cut 0 can get here: the candidates never send such tensors
                why = ", ".join(f"{t} is {_dtype_name(info.spec(t).dtype)}" for t in stuck)
                dropped.append((cut, f"{why}, which cannot travel on the wire"))
                self._warn(f"dropping cut {cut.id}: {why}, which cannot travel on the wire "
                           "(cast it in the model to send it)")
                continue
            try:
                head, tail = extract(model, info, cut)
            except (CompileError, ExtractionError) as exc:  # the latter is our bug: say so
                why = str(exc) if isinstance(exc, CompileError) else \
                    f"internal error while extracting it ({exc}); please report"
                dropped.append((cut, why))
                self._warn(f"dropping cut {cut.id}: {why}")
                continue
            result = verifier.verify(head, tail, cut_id=cut.id)
            if not result.passed:
                why = result.error or _worst(result)
                dropped.append((cut, f"verification failed: {why}"))
                self._warn(f"dropping cut {cut.id}: verification failed: {why}")
                continue
            if 0 < cut.position < n:
                assert head is not None and tail is not None  # an interior cut has both
                store.save(head, work / f"parts/cut{cut.id}.head.onnx")
                store.save(tail, work / f"parts/cut{cut.id}.tail.onnx")
                parts.update({f"parts/cut{cut.id}.head.onnx", f"parts/cut{cut.id}.tail.onnx"})
            frontier = tuple(info.spec(t) for t in cut.frontier)
            costed = tuple(info.cost_spec(t) for t in cut.frontier)
            kept.append(CutReport(cut, result, frontier,
                                  _bytes_by_encoding(costed, self.options.batch)))
        self.progress("extracting and verifying cuts", len(cuts), len(cuts))
        return kept, dropped, parts

    def _lower(self, targets: list[Target], parts: list[str], work: Path,
               verifier: Verifier, store: WeightStore) -> list:
        from tandem.protocol.bundle import Artifact

        artifacts: list[Artifact] = []
        for target in targets:
            if target.backend == "onnxruntime":
                profile_id = target.profile.id if target.profile else ""
                for i, part in enumerate(parts):
                    self.progress(f"lowering for {target.name}", i, len(parts))
                    artifacts.append(self._lower_ort(part, work, store, profile_id))
            else:
                artifacts.extend(self._lower_tensorrt(target, parts, work, verifier))
            self.progress(f"lowering for {target.name}", len(parts), len(parts))
        return artifacts

    def _lower_ort(self, part: str, work: Path, store: WeightStore, profile_id: str):
        """The ORT-optimized form of ``part`` beside it, reading the shared weights (new
        tensors the optimizer made are added); optimized on load instead when those would push
        the weights past the bundle's budget."""
        from tandem.compiler._ort import OrtOptimizedFromOnnx
        from tandem.protocol.bundle import Artifact

        ort = require("onnxruntime")
        level = self.options.ort_level
        rel = part.removesuffix(".onnx") + ".ort.onnx"
        if not (work / rel).exists():
            mark = store.mark()
            OrtOptimizedFromOnnx(work / part, work / rel, level)()
            store.adopt(work / rel)
            if store.size > self._weights_budget:
                store.rollback(mark)
                (work / rel).unlink()
        if not (work / rel).exists():
            return Artifact(part=part, target="onnxruntime", path=part, precision="fp32",
                            device_profile=profile_id,
                            builder=f"onnxruntime {ort.__version__}, optimized on load "
                                    f"level={level}",
                            extra={"optimize": "on-load", "level": level})
        return Artifact(part=part, target="onnxruntime", path=rel, precision="fp32",
                        device_profile=profile_id,
                        builder=f"onnxruntime {ort.__version__} optimized level={level}")

    def _lower_tensorrt(self, target: Target, parts: list[str], work: Path,
                        verifier: Verifier) -> list:
        from tandem.devices.engines import (
            EngineCache,
            EngineFromOnnx,
            EngineKey,
            shape_profile_id,
        )
        from tandem.protocol.bundle import Artifact, EngineRecipe

        profile = target.profile
        assert profile is not None
        build_here = self._can_build_engines(profile)
        dla_core = self.options.dla_core
        if dla_core is not None and dla_core >= profile.dla_cores:
            dla_core = None  # this profile has no such DLA core (the CLI warns about it)
        out = []
        for i, part in enumerate(parts):
            self.progress(f"lowering for {target.name}", i, len(parts))
            shapes, unresolved = _dynamic_shapes(work / part, self.options.max_batch)
            if unresolved and build_here:
                raise with_options(CompileError(
                    f"{Path(part).name}: inputs {sorted(unresolved)} have symbolic dims beyond "
                    "the batch dimension; TensorRT needs concrete shape profiles (build the "
                    "engines on the device instead)"), "engines")
            recipe = EngineRecipe(
                workspace_mb=profile.workspace_mb, shapes=shapes,
                shape_profile=shape_profile_id(shapes), unresolved_dims=unresolved,
                compute_capability=profile.compute_capability,
                version_compatible=self.options.version_compatible, dla_core=dla_core,
            )
            if not build_here:
                # Deferred: the device builds the engine from the ONNX part into its cache.
                out.append(Artifact(
                    part=part, target="tensorrt", path=part, precision=self.options.precision,
                    device_profile=profile.id, builder="deferred: built on the device",
                    engine_recipe=recipe,
                ))
                continue
            trt = require("tensorrt", "tensorrt")
            calibration = None
            if self.options.precision == "int8":
                calibration = _part_feeds(work, part, verifier)
            build = EngineFromOnnx(
                work / part, profile, self.options.precision, shapes or None, calibration,
                timing_cache=self.options.timing_cache,
                version_compatible=self.options.version_compatible, dla_core=dla_core,
            )
            key = EngineKey.for_part(work / part, profile, self.options.precision,
                                     trt.__version__, shapes or None, dla_core=dla_core,
                                     version_compatible=self.options.version_compatible)
            engine = EngineCache(self.options.engine_cache or default_engine_cache()) \
                .get_or_build(key, build).read_bytes()
            rel = f"trt/{profile.id}/{Path(part).stem}.{self.options.precision}.engine"
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(engine)
            out.append(Artifact(
                part=part, target="tensorrt", path=rel, precision=self.options.precision,
                device_profile=profile.id, builder=f"tensorrt {trt.__version__}",
                engine_recipe=dataclasses.replace(recipe, tensorrt_version=trt.__version__),
            ))
        return out

    def _can_build_engines(self, profile: Profile) -> bool:
        mode = self.options.engines
        if mode == "defer":
            return False
        if mode == "build":
            require("tensorrt", "tensorrt")
            return True
        try:
            require("tensorrt", "tensorrt")
        except FailedPrecondition:
            return False
        from tandem.devices.detect import detect_profile

        local = detect_profile()
        return local.compute_capability == profile.compute_capability

    def _frontier_dims(self, model, info: GraphInfo, kept: list[CutReport],
                       shapes: InputShapes) -> dict[str, tuple[int | str, ...]]:
        """Each kept frontier tensor's dims as functions of the input dims (those that can be
        written so); a warning names the cuts whose size is then known only at these shapes."""
        names = [t for r in kept for t in r.cut.frontier]
        if not names:
            return {}
        dims, problem = frontier_dims(model, info, names, shapes.symbols)
        blind = [r.cut.id for r in kept if any(t not in dims for t in r.cut.frontier)]
        if blind and problem:
            self._warn(f"{self.model_path.name}: the frontier size of cut(s) "
                       f"{', '.join(map(str, blind))} is known only at the compile's input "
                       f"shapes: {problem}")
        return dims

    def _manifest(self, model, info: GraphInfo, kept: list[CutReport], artifacts,
                  shapes: InputShapes, dims: Mapping[str, tuple[int | str, ...]]) -> Manifest:
        from tandem.protocol.bundle import (
            CutOrigin,
            CutSpec,
            EncodingCheck,
            Manifest,
            Verification,
        )

        n = len(info.compute_nodes)
        cut_specs = []
        for report in kept:
            cut, v = report.cut, report.verification
            raw = v.raw
            assert raw is not None  # a kept cut passed its raw check
            encodings = {
                name: EncodingCheck(
                    encoding=name, max_abs_err=_finite(chk.max_abs_err),
                    max_rel_err=_finite(chk.max_rel_err), tolerance=chk.tolerance.atol,
                    passed=chk.within_tolerance, snr_db=_snr(chk.min_snr_db),
                )
                for name, chk in v.encodings.items()
            }
            shapes_of = [dims.get(t) for t in cut.frontier]
            cut_specs.append(CutSpec(
                id=cut.id, position=cut.position,
                frontier=tuple(_spec(t) for t in report.frontier),
                frontier_dims=tuple(d for d in shapes_of if d is not None)
                if all(d is not None for d in shapes_of) else (),
                origins=tuple(CutOrigin(method=o.method) if o.regime is None else CutOrigin(
                    method=o.method, uplink_mbps=o.regime.uplink_mbps,
                    edge_gflops=o.regime.edge_gflops, cloud_gflops=o.regime.cloud_gflops)
                    for o in cut.origins),
                frontier_bytes=cut.frontier_bytes, head_flops=cut.head_flops,
                tail_flops=cut.tail_flops,
                head_part=None if cut.position == 0 else (
                    "parts/full.onnx" if cut.position >= n else f"parts/cut{cut.id}.head.onnx"),
                tail_part=None if cut.position >= n else (
                    "parts/full.onnx" if cut.position == 0 else f"parts/cut{cut.id}.tail.onnx"),
                verification=Verification(
                    samples=v.n_samples,
                    max_abs_err={k: _finite(e.max_abs) for k, e in raw.outputs.items()},
                    max_rel_err={k: _finite(e.max_rel) for k, e in raw.outputs.items()},
                    passed=v.passed, encodings=encodings,
                    snr_db={k: _snr(e.snr_db) for k, e in raw.outputs.items()},
                ),
            ))
        return Manifest(
            model_name=self.options.model_name or self.model_path.stem,
            model_version=self.options.model_version,
            bundle_version=(int(time.time()) if self.options.bundle_version is None
                            else self.options.bundle_version),
            source_digest=_source_digest(self.model_path),
            inputs=tuple(_spec(info.spec(t)) for t in info.inputs),
            outputs=tuple(_spec(info.spec(t)) for t in info.outputs),
            cuts=tuple(cut_specs),
            artifacts=tuple(artifacts),
            tool_version=TOOL_VERSION,
            extra={"total_flops": info.total_flops, "nodes": n, "batch": self.options.batch,
                   "opset": info.opset, "input_shapes_from": shapes.source,
                   "warnings": list(self.warnings)},
            input_shapes=dict(shapes.shapes),
            weights=WEIGHTS,
        )

    def _write(self, manifest: Manifest, work: Path, parts: set[str], artifacts) -> Manifest:
        from tandem.protocol.bundle import BundleWriter

        files = sorted(set(parts) | {a.path for a in artifacts})
        with BundleWriter(self.out_dir, overwrite=self.options.overwrite) as writer:
            writer.add_file(WEIGHTS, work / WEIGHTS)
            for rel in files:
                onnx_file = rel.endswith(".onnx")
                writer.add_file(rel, work / rel, requires=(WEIGHTS,) if onnx_file else ())
            return writer.finish(manifest, self.options.sign_key,
                                 password=self.options.key_password)


def _worst(v: CutVerification) -> str:
    if v.raw is None:
        return "could not run"
    bad = {k: e for k, e in v.raw.outputs.items() if not e.within_tolerance}
    return ", ".join(f"{k}: max abs err {e.max_abs:.3g}" for k, e in bad.items()) or "unknown"


def default_engine_cache() -> Path:
    """``$TANDEM_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/tandem/engines`` (``~/.cache/...``)."""
    if os.environ.get("TANDEM_ENGINE_CACHE"):
        return Path(os.environ["TANDEM_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tandem" / "engines"


def _dynamic_shapes(part: Path, max_batch: int) -> tuple[dict, dict]:
    """(min, opt, max) shapes for inputs whose only symbolic dim is the leading (batch) one,
    and the inputs with other symbolic dims (a shape profile for those needs real sizes, which
    only the device or the user knows): ``(shapes, unresolved)``."""
    onnx = require("onnx")
    model = onnx.load(str(part), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    shapes, unresolved = {}, {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if not dims or all(d.HasField("dim_value") for d in dims):
            continue
        rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if dims[0].HasField("dim_value") or any(d is None for d in rest):
            unresolved[inp.name] = [d.dim_value if d.HasField("dim_value") else
                                    (d.dim_param or "?") for d in dims]
            continue
        opt = max(1, max_batch // 2)
        shapes[inp.name] = ((1, *rest), (opt, *rest), (max_batch, *rest))
    return shapes, unresolved


def _part_feeds(work: Path, part: str, verifier: Verifier) -> list[dict]:
    """Calibration inputs of a part: the verifier's samples pushed through the head of that
    part's cut (tails) or taken as they are (heads and the full model)."""
    ort = require("onnxruntime")
    name = Path(part).name
    if ".tail." not in name:
        return [dict(s) for s in verifier.samples]
    head = work / "parts" / name.replace(".tail.", ".head.")
    sess = ort.InferenceSession(str(head), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    feeds = []
    for s in verifier.samples:
        values = dict(zip(outs, sess.run(outs, {i.name: s[i.name] for i in sess.get_inputs()}),
                          strict=True))
        feeds.append({**s, **values})
    return feeds
