"""Device profiles as data: what Tandem knows about each kind of target, read from profiles.json.

A profile says what a device is (Jetson module, datacenter GPU, plain CPU), what it can do (compute
capability, memory, peak FP16/INT8, DLA cores, memory bandwidth), what software it usually runs
(JetPack, TensorRT) and how Tandem lowers models for it (default backend, TensorRT workspace cap).
Every figure carries a source in ``Profile.sources``; sources starting with ``"unverified:"`` were
not re-read in their primary document.

Figures are dense unless ``fp16_sparse`` / ``int8_sparse`` is true. Jetson INT8 TOPS are NVIDIA's
module totals (GPU + DLA), and Orin's are quoted with sparsity, as NVIDIA publishes them.

The data file is validated when loaded: a missing field, a wrong type, an unknown kind or backend,
or a figure without a source raises :class:`~tandem.protocol.errors.InternalError` (the file
ships with
the package, so a bad file is our bug).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

from tandem.protocol.errors import InternalError, NotFound

__all__ = ["DATA_FILE", "FIGURE_FIELDS", "KINDS", "Profile", "get_profile", "load_profiles"]

DATA_FILE = Path(__file__).resolve().parent / "profiles.json"

KINDS = ("jetson", "gpu", "cpu")
BACKENDS = ("tensorrt", "onnxruntime")

#: Fields holding a figure about the hardware or its software; each needs an entry in ``sources``.
FIGURE_FIELDS = (
    "compute_capability",
    "memory_gb",
    "fp16_tflops",
    "int8_tops",
    "dla_cores",
    "memory_bandwidth_gbps",
    "jetpack",
    "tensorrt",
    "workspace_mb",
)


@dataclass(frozen=True)
class Profile:
    """One kind of device. Immutable; ``sources`` maps each figure field to where it comes from."""

    id: str
    name: str
    kind: str  # "jetson" | "gpu" | "cpu"
    compute_capability: str | None  # "8.7"; None for CPUs
    memory_gb: float | None  # device memory (shared with the CPU on Jetson); None for CPUs
    fp16_tflops: float | None  # peak FP16; None where no figure was confirmed
    fp16_sparse: bool
    int8_tops: float | None  # peak INT8
    int8_sparse: bool
    dla_cores: int
    memory_bandwidth_gbps: float | None
    jetpack: str | None
    tensorrt: str | None  # typical TensorRT major.minor on this device
    default_backend: str  # "tensorrt" | "onnxruntime"
    workspace_mb: int | None  # TensorRT builder workspace cap; None where TensorRT is not used
    sources: Mapping[str, str]
    notes: str = ""

    @property
    def has_dla(self) -> bool:
        return self.dla_cores > 0

    @property
    def sm(self) -> str | None:
        """``"sm_87"`` for compute capability ``"8.7"``."""
        return None if self.compute_capability is None else "sm_" + self.compute_capability.replace(
            ".", "")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["sources"] = dict(self.sources)
        return d


_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "name": (str,),
    "kind": (str,),
    "compute_capability": (str, type(None)),
    "memory_gb": (int, float, type(None)),
    "fp16_tflops": (int, float, type(None)),
    "fp16_sparse": (bool,),
    "int8_tops": (int, float, type(None)),
    "int8_sparse": (bool,),
    "dla_cores": (int,),
    "memory_bandwidth_gbps": (int, float, type(None)),
    "jetpack": (str, type(None)),
    "tensorrt": (str, type(None)),
    "default_backend": (str,),
    "workspace_mb": (int, type(None)),
    "sources": (dict,),
    "notes": (str,),
}
_ID = re.compile(r"[a-z0-9][a-z0-9_-]*")
_CC = re.compile(r"\d+\.\d+")


def _validate(entry: object, where: str) -> Profile:
    if not isinstance(entry, dict):
        raise InternalError(f"{where}: a profile must be an object, got {type(entry).__name__}")
    names = [f.name for f in fields(Profile)]
    missing = [n for n in names if n not in entry]
    extra = sorted(set(entry) - set(names))
    if missing or extra:
        raise InternalError(f"{where}: missing fields {missing}, unknown fields {extra}")
    for name in names:
        value = entry[name]
        ok = _TYPES[name]
        if isinstance(value, bool) and bool not in ok:
            raise InternalError(f"{where}: field {name!r} must not be a bool")
        if not isinstance(value, ok):
            raise InternalError(f"{where}: field {name!r} has type {type(value).__name__}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise InternalError(f"{where}: field {name!r} is negative")
    where = f"{where} ({entry['id']})"
    if not _ID.fullmatch(entry["id"]):
        raise InternalError(f"{where}: id must be lower-case letters, digits, '-' or '_'")
    if entry["kind"] not in KINDS:
        raise InternalError(f"{where}: kind {entry['kind']!r} is not one of {KINDS}")
    if entry["default_backend"] not in BACKENDS:
        raise InternalError(f"{where}: default_backend must be one of {BACKENDS}")
    cc = entry["compute_capability"]
    if entry["kind"] == "cpu":
        if cc is not None or entry["default_backend"] != "onnxruntime" or entry["dla_cores"]:
            raise InternalError(f"{where}: a CPU profile has no compute capability, no DLA and "
                                "uses onnxruntime")
    elif cc is None or not _CC.fullmatch(cc):
        raise InternalError(f"{where}: compute_capability must look like '8.7'")
    if entry["default_backend"] == "tensorrt" and not entry["workspace_mb"]:
        raise InternalError(f"{where}: a TensorRT profile needs workspace_mb")
    sources = entry["sources"]
    lacking = [f for f in FIGURE_FIELDS if not (isinstance(sources.get(f), str) and
                                                sources[f].strip())]
    if lacking:
        raise InternalError(f"{where}: no source for {lacking}")
    data = dict(entry)
    data["sources"] = MappingProxyType(dict(sources))
    for name in ("memory_gb", "fp16_tflops", "int8_tops", "memory_bandwidth_gbps"):
        if data[name] is not None:
            data[name] = float(data[name])
    return Profile(**data)


def _load(path: Path) -> dict[str, Profile]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InternalError(f"cannot read device profiles from {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(
            doc.get("profiles"), list):
        raise InternalError(f"{path}: expected {{'version': 1, 'profiles': [...]}}")
    out: dict[str, Profile] = {}
    for i, entry in enumerate(doc["profiles"]):
        profile = _validate(entry, f"{path.name}: profiles[{i}]")
        if profile.id in out:
            raise InternalError(f"{path.name}: duplicate profile id {profile.id!r}")
        out[profile.id] = profile
    return out


@lru_cache(maxsize=8)
def _load_cached(path: str) -> MappingProxyType:
    return MappingProxyType(_load(Path(path)))


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    """All profiles by id, validated (the packaged profiles.json unless ``path`` is given)."""
    return dict(_load_cached(str(Path(path) if path else DATA_FILE)))


def get_profile(profile_id: str, path: str | Path | None = None) -> Profile:
    """The profile ``profile_id``; an unknown id raises :class:`NotFound` naming close matches."""
    profiles = load_profiles(path)
    try:
        return profiles[profile_id]
    except (KeyError, TypeError):
        pass
    key = str(profile_id).lower()
    close = difflib.get_close_matches(key, list(profiles), n=3, cutoff=0.5)
    close += [p for p in profiles if key and key in p and p not in close][: 5 - len(close)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise NotFound(f"no device profile {profile_id!r}{hint} (known: {', '.join(sorted(profiles))})")
