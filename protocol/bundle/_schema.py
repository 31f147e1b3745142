"""The bundle manifest: frozen dataclasses, strict validation, one JSON boundary.

Every dataclass validates its fields when constructed (so the compiler learns of a mistake where
it makes it) and :meth:`Manifest.from_json` names the full path of a bad field
(``cuts[1].frontier[0].shape[2]``). Unknown keys are ignored (forward compatibility within a
schema major version, as msgspec does); a ``schema_version`` this reader does not know is refused.
See ``protocol/bundle/BUNDLE.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tandem.protocol import dtypes as _dtypes
from tandem.protocol.bundle._dims import DimExpr, DimExprError
from tandem.protocol.bundle._errors import BundleNotFound, BundleRollback, ManifestError
from tandem.protocol.errors import InvalidArgument, UnsupportedVersion

__all__ = [
    "CALIBRATION_TARGETS",
    "DTYPES",
    "ENCODINGS",
    "MANIFEST_NAME",
    "MAX_CURVE_POINTS",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_ELEMENTS",
    "RESERVED_NAMES",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "SNR_LIMIT_DB",
    "Artifact",
    "Calibration",
    "CalibrationPoint",
    "Cascade",
    "CutOrigin",
    "CutSpec",
    "EncodingCheck",
    "EngineRecipe",
    "EscalationRule",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "Verification",
    "check_manifest_size",
    "check_not_older",
    "path_problem",
    "spec_mismatch",
    "utc_now",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

#: Element types a TensorSpec may name (the names of :data:`tandem.protocol.dtypes.DTYPES`).
DTYPES = frozenset(info.name for info in _dtypes.DTYPES)

#: Lossy frontier encodings this version knows (a manifest may name others; readers skip them).
ENCODINGS = tuple(_dtypes.LOSSY_ENCODINGS)

#: What a manifest may hold: far more than a real one needs (a few KiB for a model with a dozen
#: cuts; ~1.5 MiB for 10,000 files), far less than what costs a reader real memory. Checked on
#: the bytes before they are parsed, and by every dataclass (so a writer cannot make one).
MAX_MANIFEST_BYTES = 4 << 20
MAX_MANIFEST_ELEMENTS = 200_000  # JSON objects + arrays + commas, counted before parsing
MAX_FILES = 10_000
MAX_CUTS = 1024
MAX_ARTIFACTS = 10_000
MAX_TENSORS = 1024  # inputs, outputs, one cut's frontier
MAX_RANK = 64
MAX_REQUIRES = 256

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_PATH = 1024
_MAX_SEGMENT = 255


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a ``Z`` suffix, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a safe relative POSIX path inside a bundle, or None if it is.

    Rules: a non-empty str of at most 1024 characters; ``/`` separators only (no ``\\``);
    not absolute; no empty, ``.`` or ``..`` segment; no ``:`` (drive letters, NTFS streams);
    no control characters; each segment at most 255 characters.
    """
    if not isinstance(path, str):
        return f"expected a path string, got {type(path).__name__}"
    if not path:
        return "empty path"
    if len(path) > _MAX_PATH:
        return f"path longer than {_MAX_PATH} characters"
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return f"{path!r}: control character in path"
    if "\\" in path:
        return f"{path!r}: backslash in path (use '/')"
    if ":" in path:
        return f"{path!r}: ':' in path"
    if path.startswith("/"):
        return f"{path!r}: absolute path"
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            return f"{path!r}: empty, '.' or '..' segment"
        if len(segment) > _MAX_SEGMENT:
            return f"{path!r}: segment longer than {_MAX_SEGMENT} characters"
    return None


# --- field validators (raise ManifestError naming the field) --------------------------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _str(value: object, name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ManifestError(name, f"expected str, got {_type_name(value)}")
    if not empty and not value:
        raise ManifestError(name, "must not be empty")
    return value


def _opt_path(value: object, name: str) -> str | None:
    if value is None:
        return None
    return _path(value, name)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        dup = None
        for key, _ in pairs:
            if key in seen:
                dup = key
                break
            seen.add(key)
        raise ValueError(f"duplicate key {dup!r} (the wire decoder refuses these too)")
    return data


def _path(value: object, name: str) -> str:
    _str(value, name)
    problem = path_problem(value)
    if problem:
        raise ManifestError(name, problem)
    return value  # type: ignore[return-value]


def _int(value: object, name: str, *, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(name, f"expected int, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ManifestError(name, f"must be >= {minimum}, got {value}")
    return value


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(name, f"expected float, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ManifestError(name, f"must be finite, got {value}")
    if value < 0:
        raise ManifestError(name, f"must be >= 0, got {value}")
    return value


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(name, f"expected bool, got {_type_name(value)}")
    return value


def _sha256(value: object, name: str) -> str:
    text = _str(value, name)
    if not _SHA256.fullmatch(text):
        raise ManifestError(name, "expected 64 lowercase hex digits (sha256)")
    return text


def _timestamp(value: object, name: str) -> str:
    value = _str(value, name)
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ManifestError(name, f"{value!r} is not an ISO 8601 timestamp") from None
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ManifestError(name, f"{value!r} is not UTC (end it with 'Z' or '+00:00')")
    return value


def _tuple(value: object, name: str, item: type, limit: int | None = None) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ManifestError(name, f"expected a list, got {_type_name(value)}")
    if limit is not None and len(value) > limit:
        raise ManifestError(name, f"{len(value)} entries, at most {limit}")
    for i, element in enumerate(value):
        if not isinstance(element, item):
            raise ManifestError(
                f"{name}[{i}]", f"expected {item.__name__}, got {_type_name(element)}"
            )
    return tuple(value)


def _float_map(value: object, name: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ManifestError(name, f"expected an object, got {_type_name(value)}")
    out = {}
    for key, number in value.items():
        _str(key, f"{name} key")
        out[key] = _float(number, f"{name}[{key!r}]")
    return out


def _json_map(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(name, f"expected an object, got {_type_name(value)}")
    for key in value:
        _str(key, f"{name} key", empty=True)
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ManifestError(name, f"not JSON-serializable ({exc})") from None


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# --- decoding helpers -------------------------------------------------------------------------


_MISSING = object()


def _obj(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(name, f"expected an object, got {_type_name(value)}")
    return value


def _list(value: object, name: str) -> list:
    if not isinstance(value, list):
        raise ManifestError(name, f"expected a list, got {_type_name(value)}")
    return value


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _build(cls: type, data: object, path: str, convert: dict[str, Callable[[Any, str], Any]]):
    """Build ``cls`` from a JSON object; ``convert`` turns nested values into dataclasses."""
    data = _obj(data, path or "manifest")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = data.get(f.name, _MISSING)
        if value is _MISSING:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(_join(path, f.name), "missing required field")
            continue
        if f.name in convert:
            value = convert[f.name](value, _join(path, f.name))
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ManifestError as exc:
        raise exc.under(path) if path else exc from None


def _many(cls: type, limit: int) -> Callable[[Any, str], tuple]:
    def convert(value: object, path: str) -> tuple:
        items = _list(value, path)
        if len(items) > limit:  # before converting any of them
            raise ManifestError(path, f"{len(items)} entries, at most {limit}")
        return tuple(cls._from_dict(v, f"{path}[{i}]")  # type: ignore[attr-defined]
                     for i, v in enumerate(items))

    return convert


# --- the schema -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """A named tensor: element type and shape (``str`` dims are symbolic, e.g. ``"batch"``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        _str(self.name, "name")
        _str(self.dtype, "dtype")
        if self.dtype not in DTYPES:
            raise ManifestError("dtype", f"unknown dtype {self.dtype!r}")
        shape = _tuple(self.shape, "shape", object, MAX_RANK)
        for i, dim in enumerate(shape):
            if isinstance(dim, str):
                _str(dim, f"shape[{i}]")
            else:
                _int(dim, f"shape[{i}]")
        _set(self, "shape", shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def _from_dict(cls, data: object, path: str) -> TensorSpec:
        return _build(cls, data, path, {"shape": lambda v, p: tuple(_list(v, p))})


@dataclass(frozen=True, kw_only=True)
class EncodingCheck:
    """Accuracy of one lossy frontier encoding measured by the compiler for one cut."""

    encoding: str  # "fp16" | "int8" (per-tensor affine)
    max_abs_err: float
    max_rel_err: float
    tolerance: float  # the bound the errors were checked against
    passed: bool
    snr_db: float | None = None  # compiler v2: worst output's SNR (see Verification.snr_db)

    def __post_init__(self) -> None:
        _str(self.encoding, "encoding")
        for name in ("max_abs_err", "max_rel_err", "tolerance"):
            _set(self, name, _float(getattr(self, name), name))
        _bool(self.passed, "passed")
        if self.snr_db is not None:
            _set(self, "snr_db", _snr(self.snr_db, "snr_db"))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.snr_db is None:
            del out["snr_db"]
        return out

    @classmethod
    def _from_dict(cls, data: object, path: str) -> EncodingCheck:
        return _build(cls, data, path, {})


def _encodings(value: object, path: str) -> dict[str, EncodingCheck]:
    data = _obj(value, path)
    return {k: EncodingCheck._from_dict(v, f"{path}[{k!r}]") for k, v in data.items()}


@dataclass(frozen=True, kw_only=True)
class Verification:
    """head∘tail == full, checked by the compiler on ``samples`` inputs; errors per output."""

    samples: int = 0
    max_abs_err: dict[str, float] = field(default_factory=dict)
    max_rel_err: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    encodings: dict[str, EncodingCheck] = field(default_factory=dict)
    # compiler v2: scale-free error per output, 10 log10(sum ref^2 / sum err^2) in dB over
    # all samples, clamped to [-SNR_LIMIT_DB, SNR_LIMIT_DB] (SNR_LIMIT_DB: no error at all)
    snr_db: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _int(self.samples, "samples")
        _set(self, "max_abs_err", _float_map(self.max_abs_err, "max_abs_err"))
        _set(self, "max_rel_err", _float_map(self.max_rel_err, "max_rel_err"))
        if not isinstance(self.snr_db, Mapping):
            raise ManifestError("snr_db", f"expected an object, got {_type_name(self.snr_db)}")
        _set(self, "snr_db", {_str(k, "snr_db key"): _snr(v, f"snr_db[{k!r}]")
                              for k, v in self.snr_db.items()})
        _bool(self.passed, "passed")
        if not isinstance(self.encodings, Mapping):
            raise ManifestError(
                "encodings", f"expected an object, got {_type_name(self.encodings)}"
            )
        for key, check in self.encodings.items():
            if not isinstance(check, EncodingCheck):
                raise ManifestError(
                    f"encodings[{key!r}]", f"expected EncodingCheck, got {_type_name(check)}"
                )
            if key != check.encoding:
                raise ManifestError(
                    f"encodings[{key!r}].encoding", f"{check.encoding!r} does not match its key"
                )
        _set(self, "encodings", dict(self.encodings))

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs_err": dict(self.max_abs_err),
            "max_rel_err": dict(self.max_rel_err),
            "passed": self.passed,
            "encodings": {k: v.to_dict() for k, v in self.encodings.items()},
            **({"snr_db": dict(self.snr_db)} if self.snr_db else {}),
        }

    @classmethod
    def _from_dict(cls, data: object, path: str) -> Verification:
        return _build(cls, data, path, {"encodings": _encodings})


@dataclass(frozen=True, kw_only=True)
class CutSpec:
    """One split point. ``head_part`` runs on the device, ``tail_part`` on the cloud.

    Cut 0 (cloud-only) has no head; the full-local cut has no tail; never both missing.
    ``position`` is the number of compute nodes in the head (for a cut found by the sweep, its
    boundary in the compiler's order). ``frontier_bytes`` is the frontier's size in its own
    dtypes at the manifest's ``input_shapes``; ``frontier_dims`` (one entry per frontier
    tensor, each dim an int or a :class:`~tandem.protocol.bundle.DimExpr` text over the inputs'
    symbolic dims; empty when unknown) sizes it at any other input shape
    (:meth:`Manifest.frontier_bytes`). ``origins`` says how the compiler found the cut.
    """

    id: int
    position: int
    frontier: tuple[TensorSpec, ...]
    frontier_bytes: int
    head_flops: int
    tail_flops: int
    head_part: str | None
    tail_part: str | None
    verification: Verification
    # compiler v2 (see the block "Compiler v2" below)
    frontier_dims: tuple[tuple[int | str, ...], ...] = ()
    origins: tuple[CutOrigin, ...] = ()

    def __post_init__(self) -> None:
        _set(self, "frontier_dims", _frontier_dims(self.frontier_dims, "frontier_dims"))
        _set(self, "origins", _tuple(self.origins, "origins", CutOrigin))
        _int(self.id, "id")
        _int(self.position, "position")
        _set(self, "frontier", _tuple(self.frontier, "frontier", TensorSpec, MAX_TENSORS))
        if self.frontier_dims and len(self.frontier_dims) != len(self.frontier):
            raise ManifestError("frontier_dims", f"{len(self.frontier_dims)} shapes for "
                                f"{len(self.frontier)} frontier tensors")
        for i, (dims, spec) in enumerate(zip(self.frontier_dims, self.frontier, strict=False)):
            if len(dims) != len(spec.shape):
                raise ManifestError(f"frontier_dims[{i}]", f"{len(dims)} dims for "
                                    f"{spec.name!r} of rank {len(spec.shape)}")
        _int(self.frontier_bytes, "frontier_bytes")
        _int(self.head_flops, "head_flops")
        _int(self.tail_flops, "tail_flops")
        _opt_path(self.head_part, "head_part")
        _opt_path(self.tail_part, "tail_part")
        if self.head_part is None and self.tail_part is None:
            raise ManifestError("tail_part", "a cut needs a head_part, a tail_part or both")
        if not isinstance(self.verification, Verification):
            raise ManifestError(
                "verification", f"expected Verification, got {_type_name(self.verification)}"
            )

    @property
    def cloud_only(self) -> bool:
        return self.head_part is None

    @property
    def local_only(self) -> bool:
        return self.tail_part is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "position": self.position,
            "frontier": [t.to_dict() for t in self.frontier],
            "frontier_bytes": self.frontier_bytes,
            "head_flops": self.head_flops,
            "tail_flops": self.tail_flops,
            "head_part": self.head_part,
            "tail_part": self.tail_part,
            "verification": self.verification.to_dict(),
            **({"frontier_dims": [list(d) for d in self.frontier_dims]}
               if self.frontier_dims else {}),
            **({"origins": [o.to_dict() for o in self.origins]} if self.origins else {}),
        }

    @classmethod
    def _from_dict(cls, data: object, path: str) -> CutSpec:
        return _build(
            cls,
            data,
            path,
            {"frontier": _many(TensorSpec, MAX_TENSORS),
             "verification": Verification._from_dict,
             "frontier_dims": lambda v, p: tuple(tuple(_list(d, f"{p}[{i}]"))
                                                 for i, d in enumerate(_list(v, p))),
             "origins": _many(CutOrigin, MAX_TENSORS)},
        )


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """A file of the bundle: relative POSIX path, sha256 (hex) and size in bytes.

    ``requires`` lists the other bundle files this one cannot be used without (an ONNX part's
    external-data weights file, for example): whoever selects this file selects those too."""

    path: str
    sha256: str
    size: int
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _path(self.path, "path")
        if self.path in RESERVED_NAMES or self.path.split("/", 1)[0] in RESERVED_NAMES:
            raise ManifestError("path", f"{self.path!r} is reserved")
        _sha256(self.sha256, "sha256")
        _int(self.size, "size")
        _set(self, "requires", _tuple(self.requires, "requires", str, MAX_REQUIRES))
        for i, ref in enumerate(self.requires):
            _path(ref, f"requires[{i}]")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.requires:
            del out["requires"]  # files written before `requires` existed keep their bytes
        else:
            out["requires"] = list(self.requires)
        return out

    @classmethod
    def _from_dict(cls, data: object, path: str) -> FileEntry:
        return _build(cls, data, path, {"requires": lambda v, p: _tuple(v, p, str)})


def _shape_triple(value: object, name: str) -> tuple[tuple[int, ...], ...]:
    triple = _tuple(value, name, object, 3)
    if len(triple) != 3:
        raise ManifestError(name, "expected [min, opt, max] shapes")
    out = []
    for i, shape in enumerate(triple):
        dims = _tuple(shape, f"{name}[{i}]", object, MAX_RANK)
        out.append(tuple(_int(d, f"{name}[{i}]") for d in dims))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class EngineRecipe:
    """How to build a TensorRT engine from a part's ONNX: what a device needs to build it into
    its engine cache when the bundle carries none for it (``Artifact.build_on_device``), or to
    rebuild one its TensorRT cannot load.

    ``shapes`` maps an input with a dynamic batch dimension to its (min, opt, max) shapes;
    ``unresolved_dims`` the inputs with other symbolic dims (their shape profile needs sizes
    only the device knows); ``tensorrt_version`` is the version that built the bundled engine
    (``""`` when none was built).
    """

    workspace_mb: int | None = None
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict)
    shape_profile: str = "static"
    unresolved_dims: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    compute_capability: str | None = None
    version_compatible: bool = False
    dla_core: int | None = None
    tensorrt_version: str = ""

    def __post_init__(self) -> None:
        if self.workspace_mb is not None:
            _int(self.workspace_mb, "workspace_mb", minimum=1)
        shapes = _obj(self.shapes, "shapes")
        if len(shapes) > MAX_TENSORS:
            raise ManifestError("shapes", f"{len(shapes)} entries, at most {MAX_TENSORS}")
        _set(self, "shapes", {_str(k, "shapes key"): _shape_triple(v, f"shapes[{k!r}]")
                              for k, v in shapes.items()})
        _str(self.shape_profile, "shape_profile")
        dims = _obj(self.unresolved_dims, "unresolved_dims")
        if len(dims) > MAX_TENSORS:
            raise ManifestError("unresolved_dims", f"{len(dims)} entries, at most {MAX_TENSORS}")
        unresolved = {}
        for k, v in dims.items():
            where = f"unresolved_dims[{k!r}]"
            shape = _tuple(v, where, object, MAX_RANK)
            for i, d in enumerate(shape):
                _str(d, f"{where}[{i}]") if isinstance(d, str) else _int(d, f"{where}[{i}]")
            unresolved[_str(k, "unresolved_dims key")] = shape
        _set(self, "unresolved_dims", unresolved)
        if self.compute_capability is not None:
            _str(self.compute_capability, "compute_capability")
        _bool(self.version_compatible, "version_compatible")
        if self.dla_core is not None:
            _int(self.dla_core, "dla_core")
        _str(self.tensorrt_version, "tensorrt_version", empty=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspace_mb": self.workspace_mb,
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
            "shape_profile": self.shape_profile,
            "unresolved_dims": {k: list(v) for k, v in self.unresolved_dims.items()},
            "compute_capability": self.compute_capability,
            "version_compatible": self.version_compatible,
            "dla_core": self.dla_core,
            "tensorrt_version": self.tensorrt_version,
        }

    @classmethod
    def _from_dict(cls, data: object, path: str) -> EngineRecipe:
        return _build(cls, data, path, {})


# The keys compilers before EngineRecipe wrote into a TensorRT artifact's ``extra``.
_LEGACY_RECIPE_KEYS = ("workspace_mb", "shapes", "shape_profile", "unresolved_dims",
                       "compute_capability", "version_compatible", "dla_core",
                       "tensorrt_version")


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A part lowered for one target (an ORT-optimized model, a TensorRT engine, ...).

    ``engine_recipe`` (TensorRT targets) says how the engine is built; when ``path`` is the
    part itself the bundle carries no engine and the device builds it (:attr:`build_on_device`).
    """

    part: str  # bundle path of the source part ONNX
    target: str  # "onnxruntime" | "tensorrt" | ...
    path: str  # bundle path of the artifact itself
    precision: str = "fp32"
    device_profile: str = ""  # profile name it was built for; "" = any device
    builder: str = ""  # e.g. "onnxruntime 1.32 optimized level=extended"
    extra: dict[str, Any] = field(default_factory=dict)
    engine_recipe: EngineRecipe | None = None

    def __post_init__(self) -> None:
        _path(self.part, "part")
        _str(self.target, "target")
        _path(self.path, "path")
        _str(self.precision, "precision")
        _str(self.device_profile, "device_profile", empty=True)
        _str(self.builder, "builder", empty=True)
        _set(self, "extra", _json_map(self.extra, "extra"))
        if self.engine_recipe is not None and not isinstance(self.engine_recipe, EngineRecipe):
            raise ManifestError("engine_recipe",
                                f"expected EngineRecipe, got {_type_name(self.engine_recipe)}")

    @property
    def build_on_device(self) -> bool:
        """True when the device must build this engine from the part (no engine in the bundle)."""
        return self.engine_recipe is not None and self.path == self.part

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["extra"] = dict(self.extra)
        if self.engine_recipe is None:
            del out["engine_recipe"]  # artifacts without one keep their bytes
        else:
            out["engine_recipe"] = self.engine_recipe.to_dict()
        return out

    @classmethod
    def _from_dict(cls, data: object, path: str) -> Artifact:
        data = _obj(data, path)
        convert: dict[str, Callable[[Any, str], Any]] = {
            "engine_recipe": lambda v, p: None if v is None else EngineRecipe._from_dict(v, p)}
        extra = data.get("extra")
        if ("engine_recipe" not in data and data.get("target") == "tensorrt"
                and isinstance(extra, Mapping) and "build" in extra):
            # written before EngineRecipe: the recipe was loose keys of ``extra``
            legacy = {k: extra[k] for k in _LEGACY_RECIPE_KEYS if k in extra}
            data = {**data, "engine_recipe": legacy}
        return _build(cls, data, path, convert)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a bundle holds. ``files`` covers every file but manifest.json and manifest.sig."""

    model_name: str
    model_version: str
    source_digest: str  # sha256 hex of the source ONNX (the wire's ``model_digest``)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cuts: tuple[CutSpec, ...] = ()
    files: tuple[FileEntry, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    created_at: str = field(default_factory=utc_now)
    tool_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    bundle_version: int = 0  # monotonic per model: a device refuses to go below it (rollback)
    # compiler v2: the input shapes every byte and FLOP figure was computed at, and the one
    # weights file every ONNX part reads its initializers from (external data with offsets)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    weights: str | None = None
    # cascades (see the block "Cascades" below): the small model, its contract and its rule
    cascade: Cascade | None = None

    def __post_init__(self) -> None:
        _int(self.schema_version, "schema_version")
        if self.schema_version != SCHEMA_VERSION:
            raise UnsupportedVersion(
                f"schema_version {self.schema_version} is not supported "
                f"(this Tandem reads {SCHEMA_VERSION})"
            )
        _str(self.model_name, "model_name")
        _str(self.model_version, "model_version")
        _sha256(self.source_digest, "source_digest")
        _timestamp(self.created_at, "created_at")
        for name, item, limit in (
            ("inputs", TensorSpec, MAX_TENSORS),
            ("outputs", TensorSpec, MAX_TENSORS),
            ("cuts", CutSpec, MAX_CUTS),
            ("files", FileEntry, MAX_FILES),
            ("artifacts", Artifact, MAX_ARTIFACTS),
        ):
            _set(self, name, _tuple(getattr(self, name), name, item, limit))
        _int(self.bundle_version, "bundle_version")
        _str(self.tool_version, "tool_version", empty=True)
        _set(self, "extra", _json_map(self.extra, "extra"))
        _set(self, "input_shapes", _input_shapes(self.input_shapes, "input_shapes"))
        _opt_path(self.weights, "weights")
        _check_v2(self)
        _check_cascade(self)
        _unique([t.name for t in self.inputs], "inputs", "name")
        _unique([t.name for t in self.outputs], "outputs", "name")
        _unique([c.id for c in self.cuts], "cuts", "id")
        _unique([f.path for f in self.files], "files", "path")
        paths = {f.path for f in self.files}
        for i, entry in enumerate(self.files):
            parts = entry.path.split("/")
            for n in range(1, len(parts)):
                if "/".join(parts[:n]) in paths:
                    raise ManifestError(
                        f"files[{i}].path", f"{entry.path!r} is under another file's path"
                    )

    # --- queries the edge daemon, the cloud and the fleet tools need ---------------------------

    def cut(self, cut_id: int) -> CutSpec:
        """The cut with this id, or :class:`BundleNotFound`."""
        for cut in self.cuts:
            if cut.id == cut_id:
                return cut
        known = ", ".join(str(c.id) for c in self.cuts) or "none"
        raise BundleNotFound(f"cut {cut_id} is not in model {self.model_name!r} (cuts: {known})")

    def allowed_encodings(self, cut_id: int) -> tuple[str, ...]:
        """The transfer encodings the edge may use for this cut's frontier: ``"raw"`` (each
        tensor in its own dtype) first, then the lossy :data:`ENCODINGS` whose check passed, in
        that order.

        Empty when the cut's own verification did not pass (the cut must not be used at all);
        ``"raw"`` is always allowed for a cut whose verification passed. Lossy encodings this
        version does not know are left out. ``tandem inspect`` and ``tandem compile`` show this.
        """
        verification = self.cut(cut_id).verification
        if not verification.passed:
            return ()
        checks = verification.encodings
        return ("raw", *(e for e in ENCODINGS if e in checks and checks[e].passed))

    def file(self, path: str) -> FileEntry:
        """The entry for a bundle path, or :class:`BundleNotFound`."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise BundleNotFound(f"{path!r} is not a file of bundle {self.model_name!r}")

    def closure(self, paths: Iterable[str]) -> tuple[str, ...]:
        """``paths`` and every file they ``require``, transitively, in a stable order; an
        unlisted path is :class:`BundleNotFound`."""
        by_path = {f.path: f for f in self.files}
        out: dict[str, None] = {}
        todo = list(paths)
        while todo:
            path = todo.pop(0)
            if path in out:
                continue
            entry = by_path.get(path)
            if entry is None:
                raise BundleNotFound(f"{path!r} is not a file of bundle {self.model_name!r}")
            out[path] = None
            todo.extend(entry.requires)
        return tuple(out)

    @property
    def full_part(self) -> str | None:
        """Bundle path of the whole model: the tail of the cloud-only cut, else the head of
        the all-local cut (None when the bundle has neither)."""
        for cut in self.cuts:
            if cut.head_part is None and cut.tail_part is not None:
                return cut.tail_part
        for cut in self.cuts:
            if cut.tail_part is None and cut.head_part is not None:
                return cut.head_part
        return None

    def artifacts_for(
        self, part: str, *, target: str | None = None, device_profile: str | None = None
    ) -> tuple[Artifact, ...]:
        """Artifacts lowered from ``part``, optionally only for one target / device profile."""
        return tuple(
            a
            for a in self.artifacts
            if a.part == part
            and (target is None or a.target == target)
            and (device_profile is None or a.device_profile in ("", device_profile))
        )

    def check_references(self) -> None:
        """Every part and artifact path named by cuts and artifacts is listed in ``files``."""
        paths = {f.path for f in self.files}
        for i, entry in enumerate(self.files):
            for ref in entry.requires:
                if ref not in paths or ref == entry.path:
                    raise ManifestError(f"files[{i}].requires", f"{ref!r} is not another file")
        for i, cut in enumerate(self.cuts):
            for name in ("head_part", "tail_part"):
                ref = getattr(cut, name)
                if ref is not None and ref not in paths:
                    raise ManifestError(f"cuts[{i}].{name}", f"{ref!r} is not in files")
        for i, artifact in enumerate(self.artifacts):
            for name in ("part", "path"):
                ref = getattr(artifact, name)
                if ref not in paths:
                    raise ManifestError(f"artifacts[{i}].{name}", f"{ref!r} is not in files")
        if self.weights is not None and self.weights not in paths:
            raise ManifestError("weights", f"{self.weights!r} is not in files")
        if self.cascade is not None:
            for name, ref in (("small_part", self.cascade.small_part),
                              ("rule.scorer_part", self.cascade.rule.scorer_part)):
                if ref is not None and ref not in paths:
                    raise ManifestError(f"cascade.{name}", f"{ref!r} is not in files")

    def frontier_bytes(self, cut_id: int, input_shapes: Mapping[str, Any] | None = None, *,
                       encoding: str = "raw") -> int:
        """Bytes of cut ``cut_id``'s frontier for a request with these ``input_shapes``
        (input name -> concrete shape; ``None``: the compile's own ``input_shapes``), sent in
        ``encoding``: ``"raw"`` (every tensor in its dtype), ``"fp16"`` (float32 tensors as 2
        bytes an element) or ``"int8"`` (float32 tensors as 1 byte an element). Element bytes
        only, without the wire's headers. Raises :class:`BundleNotFound` for an unknown cut and
        :class:`~tandem.protocol.bundle.DimExprError` (InvalidArgument) for shapes that do not
        fit the inputs, or when the cut's frontier size is known only at the compile's shapes.
        """
        cut = self.cut(cut_id)
        if encoding not in ("raw", *ENCODINGS):
            raise DimExprError(f"unknown encoding {encoding!r} (raw, {', '.join(ENCODINGS)})")
        if not cut.frontier:
            return 0
        dims = cut.frontier_dims
        if not dims:
            if input_shapes is None or self._is_compile_shape(input_shapes):
                if encoding == "raw":
                    return cut.frontier_bytes
                dims = tuple(tuple(t.shape) for t in cut.frontier)  # static at compile shapes
                if not all(isinstance(d, int) for shape in dims for d in shape):
                    raise DimExprError(f"cut {cut_id}: frontier shapes are not recorded")
            else:
                raise DimExprError(
                    f"cut {cut_id}: the bundle knows its frontier size only at the compile's "
                    f"input shapes {self.input_shapes}")
        symbols = self._bind(self.input_shapes if input_shapes is None else input_shapes)
        total = 0
        for spec, shape in zip(cut.frontier, dims, strict=True):
            n = 1
            for d in shape:
                n *= d if isinstance(d, int) else DimExpr.parse(d).evaluate(symbols)
            total += n * _element_bytes(spec.dtype, encoding)
        return total

    def _is_compile_shape(self, shapes: Mapping[str, Any]) -> bool:
        return bool(self.input_shapes) and {k: tuple(v) for k, v in shapes.items()} == {
            k: tuple(v) for k, v in self.input_shapes.items()}

    def _bind(self, shapes: Mapping[str, Any]) -> dict[str, int]:
        """Symbolic input dim -> its value in ``shapes`` (every named input, ranks checked)."""
        specs = {t.name: t for t in self.inputs}
        unknown = sorted(set(shapes) - set(specs))
        if unknown:
            raise DimExprError(f"shapes for {unknown}, which are not inputs of "
                               f"{self.model_name!r} (inputs: {', '.join(specs)})")
        symbols: dict[str, int] = {}
        for name, shape in shapes.items():
            spec = specs[name]
            shape = tuple(shape)
            if len(shape) != len(spec.shape) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise DimExprError(f"shape {list(shape)} for {name!r} does not fit "
                                   f"{list(spec.shape)}")
            for dim, size in zip(spec.shape, shape, strict=True):
                if isinstance(dim, int):
                    if dim != size:
                        raise DimExprError(f"shape {list(shape)} for {name!r} does not fit "
                                           f"{list(spec.shape)}")
                elif symbols.setdefault(dim, size) != size:
                    raise DimExprError(f"dim {dim!r} is {symbols[dim]} in one input and "
                                       f"{size} in another")
        return symbols

    # --- the one JSON boundary ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "source_digest": self.source_digest,
            "created_at": self.created_at,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "cuts": [c.to_dict() for c in self.cuts],
            "files": [f.to_dict() for f in self.files],
            "artifacts": [a.to_dict() for a in self.artifacts],
            "tool_version": self.tool_version,
            "extra": dict(self.extra),
            **({"bundle_version": self.bundle_version} if self.bundle_version else {}),
            **({"input_shapes": {k: list(v) for k, v in self.input_shapes.items()}}
               if self.input_shapes else {}),
            **({"weights": self.weights} if self.weights is not None else {}),
            **({"cascade": self.cascade.to_dict()} if self.cascade is not None else {}),
        }

    def to_json(self) -> str:
        """Deterministic JSON text: sorted keys, 2-space indent, UTF-8 safe, trailing newline."""
        return (
            json.dumps(
                self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False
            )
            + "\n"
        )

    def to_bytes(self) -> bytes:
        """The exact bytes written as manifest.json (and signed)."""
        return self.to_json().encode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate; errors are :class:`ManifestError` naming the field, or
        :class:`UnsupportedVersion` for an unknown ``schema_version``."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text)
            check_manifest_size(text)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError("", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
        else:
            check_manifest_size(text.encode("utf-8", "surrogatepass"))
        try:
            data = json.loads(text, parse_constant=_reject_constant,
                              object_pairs_hook=_unique_keys)
        except RecursionError:
            raise ManifestError("", "nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ManifestError(
                "", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise ManifestError("", str(exc)) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        data = _obj(data, "manifest")
        version = data.get("schema_version", _MISSING)
        if version is _MISSING:
            raise ManifestError("schema_version", "missing required field")
        _int(version, "schema_version")
        if version != SCHEMA_VERSION:
            raise UnsupportedVersion(
                f"manifest schema_version {version} is not supported "
                f"(this Tandem reads {SCHEMA_VERSION}); upgrade tandem-rt"
            )
        return _build(
            cls,
            data,
            "",
            {
                "inputs": _many(TensorSpec, MAX_TENSORS),
                "outputs": _many(TensorSpec, MAX_TENSORS),
                "cuts": _many(CutSpec, MAX_CUTS),
                "files": _many(FileEntry, MAX_FILES),
                "artifacts": _many(Artifact, MAX_ARTIFACTS),
                "input_shapes": lambda v, p: {k: tuple(_list(x, f"{p}[{k!r}]"))
                                              for k, x in _obj(v, p).items()},
                "cascade": lambda v, p: None if v is None else Cascade._from_dict(v, p),
            },
        )


def check_manifest_size(content: bytes) -> None:
    """ManifestError unless ``content`` is within :data:`MAX_MANIFEST_BYTES` and
    :data:`MAX_MANIFEST_ELEMENTS` (counted on the bytes, before anything is parsed: a JSON bomb
    of ``{}`` costs a parser ~50 bytes of memory per byte of text)."""
    if len(content) > MAX_MANIFEST_BYTES:
        raise ManifestError("", f"{len(content)} bytes, at most {MAX_MANIFEST_BYTES}")
    elements = content.count(b"{") + content.count(b"[") + content.count(b",")
    if elements > MAX_MANIFEST_ELEMENTS:
        raise ManifestError("", f"over {MAX_MANIFEST_ELEMENTS} JSON elements "
                                f"({elements} braces, brackets and commas)")


def check_not_older(current: Manifest | int | Any, candidate: Manifest | Any, *,
                    force: bool = False) -> None:
    """Refuse a rollback: :class:`BundleRollback` when ``candidate`` (a Manifest, or a Bundle)
    has a lower ``bundle_version`` than ``current`` (the newest bundle of the same model the
    device has accepted: a Manifest, a Bundle, or its version as an int), unless ``force``.

    An older bundle signed by the same key verifies like a new one; only the version says it is
    older. Versions are compared within one model: two manifests of different ``model_name``
    are an InvalidArgument (a device keeps the highest version per model it runs). Equal
    versions pass (reinstalling the same release).
    """
    cand = getattr(candidate, "manifest", candidate)
    if not isinstance(cand, Manifest):
        raise InvalidArgument(f"candidate must be a Manifest or a Bundle, not "
                              f"{_type_name(candidate)}")
    if isinstance(current, int) and not isinstance(current, bool):
        version, what = current, f"version {current}"
    else:
        cur = getattr(current, "manifest", current)
        if not isinstance(cur, Manifest):
            raise InvalidArgument(f"current must be a Manifest, a Bundle or an int, not "
                                  f"{_type_name(current)}")
        if cur.model_name != cand.model_name:
            raise InvalidArgument(f"cannot order bundles of different models "
                                  f"({cur.model_name!r}, {cand.model_name!r})")
        version, what = cur.bundle_version, f"{cur.model_name!r} version {cur.bundle_version}"
    if cand.bundle_version < version and not force:
        raise BundleRollback(
            f"bundle {cand.model_name!r} version {cand.bundle_version} is older than the "
            f"installed {what}; refusing a rollback (force it to install anyway)")


# --- Compiler v2: frontier sizes as functions of the input dims, cut provenance, shared weights


SNR_LIMIT_DB = 999.0
CUT_METHODS = ("endpoint", "sweep", "mincut")


@dataclass(frozen=True, kw_only=True)
class CutOrigin:
    """How the compiler found a cut. ``method``: ``"endpoint"`` (cut 0 and all-local),
    ``"sweep"`` (a boundary of the compiler's topological order) or ``"mincut"`` (an s-t
    minimum cut of the DAG for one regime: ``uplink_mbps``, and the edge and cloud sustained
    speeds ``edge_gflops`` / ``cloud_gflops`` in GFLOP/s it assumed)."""

    method: str
    uplink_mbps: float | None = None
    edge_gflops: float | None = None
    cloud_gflops: float | None = None

    def __post_init__(self) -> None:
        _str(self.method, "method")
        for name in ("uplink_mbps", "edge_gflops", "cloud_gflops"):
            value = getattr(self, name)
            if value is not None:
                _set(self, name, _float(value, name))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def _from_dict(cls, data: object, path: str) -> CutOrigin:
        return _build(cls, data, path, {})


def _element_bytes(dtype: str, encoding: str) -> int:
    """Bytes per element of a ``dtype`` tensor sent in ``encoding`` (the one dtype table)."""
    info = _dtypes.by_name(dtype)
    if encoding != "raw" and info.wire is not None:
        size = _dtypes.storage_itemsize(info.wire, _dtypes.encoding_by_name(encoding))
        if size is not None:
            return size
    return info.itemsize


def _snr(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(name, f"expected float, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > SNR_LIMIT_DB:
        raise ManifestError(name, f"must be within +-{SNR_LIMIT_DB:g}, got {value}")
    return value


def _frontier_dims(value: object, name: str) -> tuple[tuple[int | str, ...], ...]:
    out = []
    for i, dims in enumerate(_tuple(value, name, object)):
        if not isinstance(dims, (list, tuple)):
            raise ManifestError(f"{name}[{i}]", f"expected a list, got {_type_name(dims)}")
        shape: list[int | str] = []
        for j, dim in enumerate(dims):
            where = f"{name}[{i}][{j}]"
            if isinstance(dim, str):
                try:
                    DimExpr.parse(dim)
                except DimExprError as exc:
                    raise ManifestError(where, str(exc)) from None
                shape.append(dim)
            else:
                shape.append(_int(dim, where))
        out.append(tuple(shape))
    return tuple(out)


def _input_shapes(value: object, name: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise ManifestError(name, f"expected an object, got {_type_name(value)}")
    out = {}
    for key, shape in value.items():
        _str(key, f"{name} key")
        out[key] = tuple(_int(d, f"{name}[{key!r}][{i}]")
                         for i, d in enumerate(_tuple(shape, f"{name}[{key!r}]", int)))
    return out


def _check_v2(manifest: Manifest) -> None:
    """Cross-field rules of the v2 fields: input shapes name inputs with their rank; frontier
    expressions name only symbolic dims of the inputs."""
    specs = {t.name: t for t in manifest.inputs}
    for key, shape in manifest.input_shapes.items():
        if key not in specs:
            raise ManifestError(f"input_shapes[{key!r}]", "not an input")
        if len(shape) != len(specs[key].shape):
            raise ManifestError(f"input_shapes[{key!r}]", "rank differs from the input's")
    symbols = {d for t in manifest.inputs for d in t.shape if isinstance(d, str)}
    for i, cut in enumerate(manifest.cuts):
        for j, dims in enumerate(cut.frontier_dims):
            for k, dim in enumerate(dims):
                if isinstance(dim, str):
                    unknown = DimExpr.parse(dim).symbols - symbols
                    if unknown:
                        raise ManifestError(f"cuts[{i}].frontier_dims[{j}][{k}]",
                                            f"{sorted(unknown)} are not dims of the inputs")


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} is not allowed")


def _unique(values: list, name: str, key: str) -> None:
    seen = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ManifestError(f"{name}[{i}].{key}", f"duplicate {key} {value!r}")
        seen.add(value)


# --- Cascades (issue #17): a small model answers on the device, the large one the hard inputs
#
# A cascade bundle is the large model's bundle (its cuts, parts, digests: what the cloud serves
# and an escalation runs, split or not) plus this block: the small model's part, the output
# contract between the two, the escalation rule and its calibration. Readers that do not know
# ``cascade`` see the large model alone.

MAX_CURVE_POINTS = 1024
CALIBRATION_TARGETS = ("agreement", "escalation_rate")


def _signed(value: object, name: str) -> float:
    """A finite float of either sign (thresholds: logit margins and scorer outputs can be < 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(name, f"expected float, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ManifestError(name, f"must be finite, got {value}")
    return value


def _fraction(value: object, name: str) -> float:
    value = _float(value, name)
    if value > 1:
        raise ManifestError(name, f"must be within [0, 1], got {value}")
    return value


def _opt_fraction(value: object, name: str) -> float | None:
    return None if value is None else _fraction(value, name)


@dataclass(frozen=True, kw_only=True)
class EscalationRule:
    """When the small model's answer is not trusted. ``kind``: ``max_softmax``, ``margin``,
    ``entropy`` (builtins reading ``output``, ``[batch, classes]``, as logits or, with
    ``probabilities``, as probabilities) or ``scorer`` (the ONNX model at ``scorer_part``, fed
    the small model's outputs and the model's inputs by name, returns a confidence per row).
    A row escalates when its score is below ``threshold`` (above it for ``entropy``: see
    :attr:`escalate_above`). ``output`` is the small model's output whose top-1 class is the
    answer: agreement with the large model is measured on it whatever the kind."""

    kind: str
    threshold: float
    output: str
    probabilities: bool = False
    scorer_part: str | None = None

    def __post_init__(self) -> None:
        from tandem.protocol.bundle._escalation import RULE_KINDS

        _str(self.kind, "kind")
        if self.kind not in RULE_KINDS:
            raise ManifestError("kind", f"unknown rule {self.kind!r} ({', '.join(RULE_KINDS)})")
        _set(self, "threshold", _signed(self.threshold, "threshold"))
        _str(self.output, "output")
        _bool(self.probabilities, "probabilities")
        _opt_path(self.scorer_part, "scorer_part")
        if (self.kind == "scorer") != (self.scorer_part is not None):
            raise ManifestError("scorer_part", "set for kind 'scorer' and only for it")

    @property
    def escalate_above(self) -> bool:
        """True when a score above the threshold escalates (``entropy``), else below."""
        from tandem.protocol.bundle._escalation import escalate_above

        return escalate_above(self.kind)

    def scores(self, outputs: Mapping[str, Any]) -> Any:
        """One float64 score per row from the small model's ``outputs`` (name -> array), for a
        builtin kind; a ``scorer`` is run by the reader (InvalidArgument here)."""
        from tandem.protocol.bundle._escalation import rule_scores

        if self.kind == "scorer":
            raise InvalidArgument(f"a scorer rule runs {self.scorer_part}; builtin rules only")
        if self.output not in outputs:
            raise InvalidArgument(f"the escalation rule reads {self.output!r}, which is not "
                                  f"among the outputs ({', '.join(outputs)})")
        return rule_scores(self.kind, outputs[self.output], probabilities=self.probabilities)

    def escalates(self, scores: Any) -> Any:
        """A bool per row: True where the row goes to the large model (NaN scores do)."""
        from tandem.protocol.bundle._escalation import escalates

        return escalates(self.kind, scores, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.scorer_part is None:
            del out["scorer_part"]
        return out

    @classmethod
    def _from_dict(cls, data: object, path: str) -> EscalationRule:
        return _build(cls, data, path, {})


@dataclass(frozen=True, kw_only=True)
class CalibrationPoint:
    """One threshold of the calibration curve: the share of the samples it escalates, the
    share on which the cascade's answer agrees with the large model's (top-1 of the rule's
    ``output``) and, when labels were given, the cascade's accuracy."""

    threshold: float
    escalation_rate: float
    agreement: float
    accuracy: float | None = None

    def __post_init__(self) -> None:
        _set(self, "threshold", _signed(self.threshold, "threshold"))
        _set(self, "escalation_rate", _fraction(self.escalation_rate, "escalation_rate"))
        _set(self, "agreement", _fraction(self.agreement, "agreement"))
        _set(self, "accuracy", _opt_fraction(self.accuracy, "accuracy"))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def _from_dict(cls, data: object, path: str) -> CalibrationPoint:
        return _build(cls, data, path, {})


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How the threshold was chosen, label-free: on ``samples`` rows, the curve of escalation
    rate against agreement (``curve``, by escalation rate), and the point chosen for ``target``
    (``agreement``: the least escalation reaching ``target_value``; ``escalation_rate``: the
    most agreement escalating at most ``target_value``). ``small_agreement`` is the small
    model's agreement alone; with labels, ``small_accuracy`` / ``large_accuracy`` and each
    point's cascade accuracy."""

    samples: int
    target: str
    target_value: float
    chosen: CalibrationPoint
    curve: tuple[CalibrationPoint, ...]
    small_agreement: float
    small_accuracy: float | None = None
    large_accuracy: float | None = None

    def __post_init__(self) -> None:
        _int(self.samples, "samples", minimum=1)
        _str(self.target, "target")
        if self.target not in CALIBRATION_TARGETS:
            raise ManifestError("target", f"unknown target {self.target!r} "
                                f"({', '.join(CALIBRATION_TARGETS)})")
        _set(self, "target_value", _fraction(self.target_value, "target_value"))
        if not isinstance(self.chosen, CalibrationPoint):
            raise ManifestError("chosen", f"expected CalibrationPoint, got "
                                f"{_type_name(self.chosen)}")
        _set(self, "curve", _tuple(self.curve, "curve", CalibrationPoint, MAX_CURVE_POINTS))
        rates = [p.escalation_rate for p in self.curve]
        if rates != sorted(rates):
            raise ManifestError("curve", "points must be in order of escalation rate")
        _set(self, "small_agreement", _fraction(self.small_agreement, "small_agreement"))
        _set(self, "small_accuracy", _opt_fraction(self.small_accuracy, "small_accuracy"))
        _set(self, "large_accuracy", _opt_fraction(self.large_accuracy, "large_accuracy"))

    @property
    def labelled(self) -> bool:
        return self.large_accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "samples": self.samples, "target": self.target, "target_value": self.target_value,
            "chosen": self.chosen.to_dict(), "curve": [p.to_dict() for p in self.curve],
            "small_agreement": self.small_agreement,
        }
        for name in ("small_accuracy", "large_accuracy"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def _from_dict(cls, data: object, path: str) -> Calibration:
        return _build(cls, data, path, {"chosen": CalibrationPoint._from_dict,
                                        "curve": _many(CalibrationPoint, MAX_CURVE_POINTS)})


@dataclass(frozen=True, kw_only=True)
class Cascade:
    """The small model of a cascade bundle (the manifest's own model is the large one).

    ``small_part`` is the small model's ONNX (lowered like any part: ``artifacts`` name it),
    ``small_digest`` the sha256 of its source file, ``small_outputs`` its outputs and
    ``small_flops`` its cost at the manifest's ``input_shapes``. Its inputs are the manifest's.
    ``output_map`` maps every output of the manifest (the large model's) to the small output
    that stands for it: same dtype and rank, fixed dims equal, so either model's answer has the
    same outputs. ``rule`` decides which inputs escalate; ``calibration`` records how its
    threshold was chosen."""

    small_part: str
    small_digest: str
    small_outputs: tuple[TensorSpec, ...]
    small_flops: int
    output_map: dict[str, str]
    rule: EscalationRule
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        _path(self.small_part, "small_part")
        _sha256(self.small_digest, "small_digest")
        _set(self, "small_outputs", _tuple(self.small_outputs, "small_outputs", TensorSpec,
                                           MAX_TENSORS))
        _unique([t.name for t in self.small_outputs], "small_outputs", "name")
        _int(self.small_flops, "small_flops")
        mapping = _obj(self.output_map, "output_map")
        if len(mapping) > MAX_TENSORS:
            raise ManifestError("output_map", f"{len(mapping)} entries, at most {MAX_TENSORS}")
        _set(self, "output_map", {_str(k, "output_map key"): _str(v, f"output_map[{k!r}]")
                                  for k, v in mapping.items()})
        small = {t.name for t in self.small_outputs}
        for large, name in self.output_map.items():
            if name not in small:
                raise ManifestError(f"output_map[{large!r}]",
                                    f"{name!r} is not an output of the small model")
        if len(set(self.output_map.values())) != len(self.output_map):
            raise ManifestError("output_map", "two outputs map to the same small output")
        if not isinstance(self.rule, EscalationRule):
            raise ManifestError("rule", f"expected EscalationRule, got {_type_name(self.rule)}")
        if self.rule.output not in small:
            raise ManifestError("rule.output", f"{self.rule.output!r} is not an output of the "
                                "small model")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise ManifestError("calibration", f"expected Calibration, got "
                                f"{_type_name(self.calibration)}")

    @property
    def parts(self) -> tuple[str, ...]:
        """The bundle paths the cascade adds: the small model, and the scorer if any."""
        return (self.small_part, *((self.rule.scorer_part,) if self.rule.scorer_part else ()))

    def small_output(self, large_output: str) -> str:
        """The small model's output that stands for ``large_output``."""
        try:
            return self.output_map[large_output]
        except KeyError:
            raise BundleNotFound(f"{large_output!r} is not an output of the cascade") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "small_part": self.small_part, "small_digest": self.small_digest,
            "small_outputs": [t.to_dict() for t in self.small_outputs],
            "small_flops": self.small_flops, "output_map": dict(self.output_map),
            "rule": self.rule.to_dict(),
            **({"calibration": self.calibration.to_dict()} if self.calibration else {}),
        }

    @classmethod
    def _from_dict(cls, data: object, path: str) -> Cascade:
        return _build(cls, data, path, {
            "small_outputs": _many(TensorSpec, MAX_TENSORS),
            "rule": EscalationRule._from_dict,
            "calibration": lambda v, p: None if v is None else Calibration._from_dict(v, p),
        })


def _check_cascade(manifest: Manifest) -> None:
    """Cross-field rules of ``cascade``: it maps every output of the manifest, to a small output
    of the same dtype and rank whose fixed dims agree."""
    cascade = manifest.cascade
    if cascade is None:
        return
    if not isinstance(cascade, Cascade):
        raise ManifestError("cascade", f"expected Cascade, got {_type_name(cascade)}")
    large = {t.name: t for t in manifest.outputs}
    small = {t.name: t for t in cascade.small_outputs}
    missing = sorted(set(large) - set(cascade.output_map))
    if missing:
        raise ManifestError("cascade.output_map", f"outputs {missing} have no small output")
    for name, small_name in cascade.output_map.items():
        where = f"cascade.output_map[{name!r}]"
        if name not in large:
            raise ManifestError(where, f"{name!r} is not an output of the model")
        problem = spec_mismatch(large[name], small[small_name])
        if problem:
            raise ManifestError(where, f"{small_name!r} does not stand for {name!r}: {problem}")


def spec_mismatch(a: TensorSpec | Any, b: TensorSpec | Any) -> str | None:
    """Why tensors ``a`` and ``b`` (anything with ``dtype`` and ``shape``) cannot stand for each
    other: another dtype, another rank, or two fixed dims that differ (a symbolic dim agrees
    with any); None when they can."""
    if a.dtype != b.dtype:
        return f"dtype {b.dtype} vs {a.dtype}"
    if len(a.shape) != len(b.shape):
        return f"shape {list(b.shape)} vs {list(a.shape)}"
    for x, y in zip(a.shape, b.shape, strict=True):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return f"shape {list(b.shape)} vs {list(a.shape)}"
    return None
