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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tandem.protocol.bundle._dims import DimExpr, DimExprError
from tandem.protocol.bundle._errors import BundleNotFound, ManifestError
from tandem.protocol.errors import UnsupportedVersion

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "MANIFEST_NAME",
    "RESERVED_NAMES",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "SNR_LIMIT_DB",
    "Artifact",
    "CutOrigin",
    "CutSpec",
    "EncodingCheck",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "Verification",
    "path_problem",
    "utc_now",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

#: Element types a TensorSpec may name (numpy / ONNX names).
DTYPES = frozenset(
    {
        "bool",
        "int4", "int8", "int16", "int32", "int64",
        "uint4", "uint8", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64",
        "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz",
        "complex64", "complex128",
        "string",
    }
)  # fmt: skip

#: Lossy frontier encodings this version knows (a manifest may name others; readers skip them).
ENCODINGS = ("fp16", "int8")

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
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
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
    _str(value, name)
    if not _SHA256.fullmatch(value):  # type: ignore[arg-type]
        raise ManifestError(name, "expected 64 lowercase hex digits (sha256)")
    return value  # type: ignore[return-value]


def _timestamp(value: object, name: str) -> str:
    _str(value, name)
    text = value[:-1] + "+00:00" if value.endswith("Z") else value  # type: ignore[union-attr]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ManifestError(name, f"{value!r} is not an ISO 8601 timestamp") from None
    if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        raise ManifestError(name, f"{value!r} is not UTC (end it with 'Z' or '+00:00')")
    return value  # type: ignore[return-value]


def _tuple(value: object, name: str, item: type) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ManifestError(name, f"expected a list, got {_type_name(value)}")
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


def _many(cls: type) -> Callable[[Any, str], tuple]:
    def convert(value: object, path: str) -> tuple:
        return tuple(cls._from_dict(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))

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
        shape = _tuple(self.shape, "shape", object)
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
        _set(self, "frontier", _tuple(self.frontier, "frontier", TensorSpec))
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
            {"frontier": _many(TensorSpec), "verification": Verification._from_dict,
             "frontier_dims": lambda v, p: tuple(tuple(_list(d, f"{p}[{i}]"))
                                                 for i, d in enumerate(_list(v, p))),
             "origins": _many(CutOrigin)},
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
        _set(self, "requires", _tuple(self.requires, "requires", str))
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


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A part lowered for one target (an ORT-optimized model, a TensorRT engine, ...)."""

    part: str  # bundle path of the source part ONNX
    target: str  # "onnxruntime" | "tensorrt" | ...
    path: str  # bundle path of the artifact itself
    precision: str = "fp32"
    device_profile: str = ""  # profile name it was built for; "" = any device
    builder: str = ""  # e.g. "onnxruntime 1.32 optimized level=extended"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _path(self.part, "part")
        _str(self.target, "target")
        _path(self.path, "path")
        _str(self.precision, "precision")
        _str(self.device_profile, "device_profile", empty=True)
        _str(self.builder, "builder", empty=True)
        _set(self, "extra", _json_map(self.extra, "extra"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _from_dict(cls, data: object, path: str) -> Artifact:
        return _build(cls, data, path, {})


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
    # compiler v2: the input shapes every byte and FLOP figure was computed at, and the one
    # weights file every ONNX part reads its initializers from (external data with offsets)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    weights: str | None = None

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
        for name, item in (
            ("inputs", TensorSpec),
            ("outputs", TensorSpec),
            ("cuts", CutSpec),
            ("files", FileEntry),
            ("artifacts", Artifact),
        ):
            _set(self, name, _tuple(getattr(self, name), name, item))
        _str(self.tool_version, "tool_version", empty=True)
        _set(self, "extra", _json_map(self.extra, "extra"))
        _set(self, "input_shapes", _input_shapes(self.input_shapes, "input_shapes"))
        _opt_path(self.weights, "weights")
        _check_v2(self)
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
        """Lossy encodings verified for this cut's frontier, in :data:`ENCODINGS` order.

        Empty when the cut's own verification did not pass. Sending the frontier in its own
        dtype (no lossy encoding) is always allowed for a cut whose verification passed.
        Encodings this version does not know are left out.
        """
        verification = self.cut(cut_id).verification
        if not verification.passed:
            return ()
        checks = verification.encodings
        return tuple(e for e in ENCODINGS if e in checks and checks[e].passed)

    def file(self, path: str) -> FileEntry:
        """The entry for a bundle path, or :class:`BundleNotFound`."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise BundleNotFound(f"{path!r} is not a file of bundle {self.model_name!r}")

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
            **({"input_shapes": {k: list(v) for k, v in self.input_shapes.items()}}
               if self.input_shapes else {}),
            **({"weights": self.weights} if self.weights is not None else {}),
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
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError("", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
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
                "inputs": _many(TensorSpec),
                "outputs": _many(TensorSpec),
                "cuts": _many(CutSpec),
                "files": _many(FileEntry),
                "artifacts": _many(Artifact),
                "input_shapes": lambda v, p: {k: tuple(_list(x, f"{p}[{k!r}]"))
                                              for k, x in _obj(v, p).items()},
            },
        )


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


# element bytes of the dtypes a frontier may hold (to be replaced by the protocol's one dtype
# table); sub-byte types round up to one byte
_ELEMENT_BYTES = {"bool": 1, "int4": 1, "uint4": 1, "int8": 1, "uint8": 1, "int16": 2,
                  "uint16": 2, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4,
                  "float32": 4, "int64": 8, "uint64": 8, "float64": 8, "complex64": 8,
                  "complex128": 16, "float8e4m3fn": 1, "float8e4m3fnuz": 1, "float8e5m2": 1,
                  "float8e5m2fnuz": 1}
_ENCODED_BYTES = {"fp16": 2, "int8": 1}


def _element_bytes(dtype: str, encoding: str) -> int:
    if dtype == "float32" and encoding in _ENCODED_BYTES:
        return _ENCODED_BYTES[encoding]
    if dtype not in _ELEMENT_BYTES:
        raise DimExprError(f"a {dtype} tensor has no fixed size")
    return _ELEMENT_BYTES[dtype]


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
