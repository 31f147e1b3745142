"""What a TensorRT engine depends on (:class:`EngineKey`, :class:`DeviceIdentity`) and the on-disk
cache of built engines (:class:`EngineCache`). Public through :mod:`tandem.devices.engines`.

TensorRT engines are not portable: a plan is specific to the TensorRT version and, beyond the
compute capability, to the device model (TensorRT warns "Using an engine plan file across
different models of devices is not recommended"; an Orin Nano and an AGX Orin are both 8.7, an
A10, A40 and RTX 3090 all 8.6). So the key holds what is read from the device itself (name,
compute capability, multiprocessor count, and on Jetson the L4T release from
``/etc/nv_tegra_release``), the TensorRT version, the ONNX part and every external-data file it
names, the calibration data of an INT8 build, the precision, the shape profile and the builder
options.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tandem.devices._cuda import translate
from tandem.devices.profiles import Profile
from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
)
from tandem.protocol.files import atomic_write, file_lock, sha256_file
from tandem.protocol.lazy import require

__all__ = [
    "TEGRA_RELEASE",
    "DeviceIdentity",
    "EngineCache",
    "EngineKey",
    "calibration_digest",
    "external_data_digests",
    "read_l4t_release",
    "shape_profile_id",
    "static_shapes",
]

Shape = tuple[int, ...]
Shapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: ..."
_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def read_l4t_release(path: str | os.PathLike = TEGRA_RELEASE) -> str:
    """``"R36.4.0"`` on a Jetson, ``""`` where the file does not exist (not a Jetson).

    An unreadable or unexpected file still gives a distinct, stable value (``"unparsed:<hash>"``)
    so it can never match another release's engines.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"unreadable:{type(exc).__name__}"
    m = _L4T.search(head.decode("utf-8", "replace"))
    if m:
        return f"R{m[1]}.{m[2]}"
    return "unparsed:" + hashlib.sha256(head).hexdigest()[:16]


@dataclass(frozen=True)
class DeviceIdentity:
    """The GPU an engine is built for or loaded on, as the device itself reports it."""

    name: str
    compute_capability: str  # "8.7"
    multiprocessor_count: int
    l4t_release: str = ""  # "R36.4.0" on Jetson, "" elsewhere

    @classmethod
    def read(cls, device: int = 0, *,
             tegra_release: str | os.PathLike = TEGRA_RELEASE) -> DeviceIdentity:
        """Read CUDA device ``device`` through pycuda (no context needed) and the L4T release."""
        cuda = require("pycuda.driver", "tensorrt")
        try:
            cuda.init()
            count = cuda.Device.count()
            if not 0 <= device < count:
                raise FailedPrecondition(f"no CUDA device {device} ({count} present)")
            dev = cuda.Device(device)
            major, minor = dev.compute_capability()
            sms = int(dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT))
            name = str(dev.name()).strip()
        except Exception as exc:
            raise translate(exc, f"cannot read CUDA device {device}", cuda) from exc
        return cls(name, f"{int(major)}.{int(minor)}", sms, read_l4t_release(tegra_release))

    @property
    def slug(self) -> str:
        """A file-name-safe label: ``"NVIDIA-Jetson-AGX-Orin.sm87"``."""
        name = _UNSAFE.sub("-", self.name).strip("-") or "gpu"
        return f"{name}.sm{self.compute_capability.replace('.', '')}"


def shape_profile_id(shapes: Shapes | None) -> str:
    """Canonical text of a shape profile: ``"x:1x3x224x224/4x3x224x224/8x3x224x224;..."``."""
    if not shapes:
        return "static"
    parts = []
    for name in sorted(shapes):
        dims = "/".join("x".join(str(int(d)) for d in s) for s in shapes[name])
        parts.append(f"{name}:{dims}")
    return ";".join(parts)


def static_shapes(shapes: Shapes | None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Every (min, opt, max) collapsed to (opt, opt, opt): what DLA needs.

    NVIDIA: "DLA does not support dynamic dimensions, so the profile's min, max, and opt values
    must be equal for wildcard dimensions" (DLA Supported Layers and Restrictions).
    """
    out = {}
    for name, (_lo, opt, _hi) in (shapes or {}).items():
        s = tuple(int(d) for d in opt)
        out[name] = (s, s, s)
    return out


def calibration_digest(samples: Sequence[Mapping[str, np.ndarray]] | None) -> str:
    """sha256 over every calibration sample (names, dtypes, shapes and bytes, in order)."""
    if not samples:
        return ""
    h = hashlib.sha256()
    for sample in samples:
        for name in sorted(sample):
            arr = np.ascontiguousarray(sample[name])
            h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
            h.update(arr.tobytes())
        h.update(b"\x00")
    return h.hexdigest()


def iter_tensors(graph):
    """Every TensorProto of an ONNX graph and its subgraphs: initializers, sparse initializers'
    values and indices, and attribute tensors."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for g in attr.graphs:
                yield from iter_tensors(g)


def external_data_digests(onnx_path: str | os.PathLike) -> tuple[str, ...]:
    """``("weights.bin:<sha256>", ...)`` for every external-data file the model names, sorted.

    A location outside the model's folder (absolute, or with ``..``) is an
    :class:`~tandem.protocol.errors.InvalidArgument`; a missing file is
    :class:`~tandem.protocol.errors.NotFound`.
    """
    onnx = require("onnx", "tensorrt")
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidArgument(f"cannot read {path.name} as an ONNX model: {exc}") from exc
    locations = set()
    for tensor in iter_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    out = []
    for location in sorted(locations):
        rel = Path(location)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise InvalidArgument(f"{path.name}: external data location {location!r} is "
                                  "outside the model's folder")
        try:
            out.append(f"{location}:{sha256_file(path.parent / rel)}")
        except FileNotFoundError as exc:
            raise NotFound(f"{path.name} names external data {location!r}, which is "
                           "missing") from exc
    return tuple(out)


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on; any difference means a different engine."""

    part_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: str
    shape_profile: str = "static"
    # other builder settings that change the engine ("dla1", "version-compatible"), sorted
    build_options: tuple[str, ...] = ()
    device_name: str = ""
    multiprocessor_count: int = 0
    l4t_release: str = ""
    calibration_sha256: str = ""
    external_data: tuple[str, ...] = ()  # "location:sha256" per external-data file, sorted

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    @classmethod
    def for_part(cls, onnx_path: str | os.PathLike, profile: Profile, precision: str,
                 tensorrt_version: str, shapes: Shapes | None = None, *,
                 dla_core: int | None = None, version_compatible: bool = False,
                 device: int = 0, identity: DeviceIdentity | None = None,
                 calibration: Sequence[Mapping[str, np.ndarray]] | None = None) -> EngineKey:
        """The key of building ``onnx_path`` on CUDA device ``device`` (read unless ``identity``
        is given). DLA builds are keyed by their static profile (see :func:`static_shapes`)."""
        if profile.compute_capability is None:
            raise InvalidArgument(f"profile {profile.id} has no GPU compute capability")
        path = Path(onnx_path)
        try:
            digest = sha256_file(path)
        except FileNotFoundError as exc:
            raise InvalidArgument(f"no ONNX file at {path}") from exc
        external = external_data_digests(path)
        identity = identity if identity is not None else DeviceIdentity.read(device)
        if dla_core is not None and shapes:
            shapes = static_shapes(shapes)
        return cls(
            part_sha256=digest, tensorrt_version=str(tensorrt_version),
            compute_capability=identity.compute_capability, precision=precision,
            shape_profile=shape_profile_id(shapes),
            build_options=build_options(dla_core, version_compatible),
            device_name=identity.name, multiprocessor_count=identity.multiprocessor_count,
            l4t_release=identity.l4t_release,
            calibration_sha256=calibration_digest(calibration) if precision == "int8" else "",
            external_data=external)


def build_options(dla_core: int | None, version_compatible: bool) -> tuple[str, ...]:
    options = [f"dla{dla_core}"] if dla_core is not None else []
    if version_compatible:
        options.append("version-compatible")
    return tuple(sorted(options))


class EngineCache:
    """Engines on disk under ``root``: ``<digest>.engine`` plus a ``<digest>.json`` sidecar.

    A lookup returns an engine only when its sidecar holds the same key and the engine's sha256;
    anything else (another key, a half-written or tampered file) is a miss and is rebuilt.
    Builds of one key are serialized across processes by a file lock, so two daemons starting at
    once build an engine once.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path_for(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()[:40]}.engine"

    def _sidecar(self, path: Path) -> Path:
        return path.with_suffix(".json")

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached engine for ``key``, only if its sidecar matches ``key`` and its bytes."""
        path = self.path_for(key)
        try:
            meta = json.loads(self._sidecar(path).read_text())
            data = path.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        if meta.get("key") != json.loads(json.dumps(asdict(key))):  # as stored: lists
            return None
        if meta.get("engine_sha256") != hashlib.sha256(data).hexdigest():
            return None
        return path

    def evict(self, key: EngineKey) -> None:
        """Forget ``key``'s engine (e.g. TensorRT called it foreign to this device)."""
        path = self.path_for(key)
        with file_lock(path):
            self._sidecar(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> Path:
        """The engine for ``key``, building (and storing) it when absent or not matching.

        When ``build`` knows more about the engine than the caller put in the key (an
        :class:`~tandem.devices.engines.EngineFromOnnx` knows its calibration data), its
        ``complete_key(key)`` fills that in, and refuses a key that describes another build.
        """
        complete = getattr(build, "complete_key", None)
        if complete is not None:
            key = complete(key)
        hit = self.lookup(key)
        if hit is not None:
            return hit
        path = self.path_for(key)
        with file_lock(path):
            hit = self.lookup(key)  # built by another process while we waited
            if hit is not None:
                return hit
            data = build()
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise InternalError("engine build returned no bytes")
            self._sidecar(path).unlink(missing_ok=True)  # never a sidecar for other bytes
            atomic_write(path, bytes(data))
            meta = {"key": asdict(key), "engine_sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data)}
            atomic_write(self._sidecar(path), (json.dumps(meta, indent=2) + "\n").encode())
        return path
