"""The model repository: every bundle under ``--repo``, verified, its parts loaded on first use.

* **What is a bundle here**: a directory holding ``manifest.json``, or an archive file (tar,
  optionally zstd/gzip; detected by content, ``.tar.zst`` by convention), directly under the
  repository root. Names starting with ``.`` are skipped (``BundleWriter`` stages there before
  its atomic rename).
* **Verification**: each bundle is loaded with :func:`tandem.protocol.bundle.load_bundle`:
  every file's sha256 and size, no unlisted file, and with ``public_key`` the signature. A
  bundle that fails is rejected (logged once per version of the file) and the rest are served.
  A part's files are hashed again right before it is loaded, so a change on disk after the scan
  is caught (FAILED_PRECONDITION for the requests that needed it).
* **Lazy load, LRU unload**: a part (the tail of one cut) becomes an ONNX Runtime session on
  its first request, in the compute thread. Its memory is estimated from its files (x2 for the
  session's own copies); when loading one would pass the memory budget, the least recently used
  idle parts are unloaded first.
* **Hot add/remove**: :meth:`ModelRepository.scan` (run every ``repo_poll_s`` by the worker)
  adds new bundles, drops vanished ones and reloads changed ones.

Routing: requests name the source model digest (the manifest's ``source_digest``) and a cut id;
the topic's model level names the model. :meth:`ModelRepository.resolve` answers NOT_FOUND for an
unknown model or cut, FAILED_PRECONDITION when the model is known by name but under other
digests (the device and the cloud run different bundles).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.protocol.bundle import Bundle, CutSpec, Manifest, load_bundle
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TandemError,
)

__all__ = ["BundleEntry", "ModelRepository", "Part", "ScanReport"]

log = logging.getLogger("tandem.cloud.repository")

_SESSION_OVERHEAD = 2  # an ORT session holds about its model's size again
_ARCHIVE_MAGIC = (b"\x28\xb5\x2f\xfd", b"\x1f\x8b")  # zstd, gzip (plain tar: "ustar" at 257)


@dataclass
class Part:
    """The tail of one cut of one bundle: what a batcher runs."""

    bundle: BundleEntry
    cut: CutSpec
    path: str  # bundle path of the ONNX to run (an ORT-optimized artifact when there is one)
    optimized: bool
    needs: tuple[str, ...]  # every bundle path to verify before loading (part + its weights)
    estimate_bytes: int
    backend: Any = None  # an active Backend while loaded
    last_used: float = 0.0
    busy: int = 0  # batches running on it (never unloaded while > 0)
    load_error: TandemError | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.bundle.digest, self.cut.id)

    @property
    def label(self) -> str:
        return f"{self.bundle.model_name}@{self.bundle.digest[:12]}/cut{self.cut.id}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.cut.frontier)


@dataclass
class BundleEntry:
    """One verified bundle of the repository."""

    path: Path  # where it lies in the repository (directory or archive file)
    bundle: Bundle
    signature: tuple  # what the scan compares to notice a change
    added_at: float = field(default_factory=time.time)
    parts: dict[int, Part] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.bundle.digest

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def model_name(self) -> str:
        return self.bundle.manifest.model_name

    @property
    def model_version(self) -> str:
        return self.bundle.manifest.model_version

    @property
    def source_digest(self) -> str:
        return self.bundle.manifest.source_digest

    @property
    def is_archive(self) -> bool:
        return self.path.is_file()


@dataclass(frozen=True)
class ScanReport:
    added: tuple[str, ...] = ()  # bundle digests
    removed: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()  # repository paths (with the reason logged)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


BackendFactory = Callable[[Part, "bytes | str"], Any]


class ModelRepository:
    """Bundles under ``root``; thread-safe (the worker's loop scans and resolves, the compute
    threads load and unload parts)."""

    def __init__(self, root: Path | str, *, public_key: Any = None,
                 memory_budget_bytes: int = 4 << 30, intra_op_threads: int = 0,
                 backend_factory: BackendFactory | None = None) -> None:
        self.root = Path(root)
        self.public_key = public_key
        self.memory_budget_bytes = memory_budget_bytes
        self.intra_op_threads = intra_op_threads
        self._backend_factory = backend_factory or self._onnxruntime
        self._lock = threading.RLock()
        self._entries: dict[Path, BundleEntry] = {}  # by repository path
        self._by_digest: dict[str, BundleEntry] = {}  # bundle digest -> entry
        self._rejected: dict[Path, tuple[tuple, str]] = {}  # path -> (signature, reason)
        self._loaded: collections.OrderedDict[tuple[str, int], Part] = collections.OrderedDict()
        self._loaded_bytes = 0
        self.scans = 0
        self.on_unload: Callable[[Part], None] | None = None

    # -- scanning --------------------------------------------------------------------------------

    def scan(self) -> ScanReport:
        """Bring the repository in line with the directory (verifying what is new or changed)."""
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} is not a directory")
        found: dict[Path, tuple] = {}
        for child in sorted(self.root.iterdir()):
            if child.name.startswith("."):
                continue
            sig = _signature(child)
            if sig is not None:
                found[child] = sig
        added, removed, rejected = [], [], []
        with self._lock:
            for path in list(self._entries):
                entry = self._entries[path]
                if found.get(path) != entry.signature:
                    self._remove(path)
                    removed.append(entry.digest)
            for path in list(self._rejected):
                if path not in found:
                    del self._rejected[path]
        for path, sig in found.items():
            with self._lock:
                if path in self._entries:
                    continue
                old = self._rejected.get(path)
                if old is not None and old[0] == sig:
                    continue  # same bytes as last time: still rejected
            try:
                bundle = load_bundle(path, public_key=self.public_key)
            except TandemError as exc:
                with self._lock:
                    self._rejected[path] = (sig, str(exc))
                log.error("rejected bundle %s: %s", path, exc)
                rejected.append(str(path))
                continue
            except OSError as exc:  # vanished or unreadable while we looked
                log.warning("could not read %s: %s", path, exc)
                continue
            with self._lock:
                if bundle.digest in self._by_digest:
                    other = self._by_digest[bundle.digest]
                    log.warning("bundle %s is the same as %s (digest %s); serving the first",
                                path, other.path, bundle.digest[:12])
                    self._rejected[path] = (sig, f"duplicate of {other.path}")
                    bundle.close()
                    continue
                entry = BundleEntry(path, bundle, sig)
                entry.parts = self._parts_of(entry)
                self._entries[path] = entry
                self._by_digest[bundle.digest] = entry
                self._rejected.pop(path, None)
            added.append(bundle.digest)
            log.info("serving bundle %s: model %r version %r, digest %s, cuts %s", path.name,
                     entry.model_name, entry.model_version, bundle.digest[:12],
                     sorted(entry.parts))
        self.scans += 1
        return ScanReport(tuple(added), tuple(removed), tuple(rejected))

    def _remove(self, path: Path) -> None:
        entry = self._entries.pop(path)
        self._by_digest.pop(entry.digest, None)
        for part in entry.parts.values():
            if part.key in self._loaded and part.busy == 0:
                self._unload(part)
        log.info("bundle %s (digest %s) left the repository", path.name, entry.digest[:12])
        entry.bundle.close()

    def _parts_of(self, entry: BundleEntry) -> dict[int, Part]:
        m = entry.manifest
        parts = {}
        for cut in m.cuts:
            if cut.tail_part is None:
                continue  # all local: nothing for the cloud to run
            path, optimized = cut.tail_part, False
            ort = m.artifacts_for(cut.tail_part, target="onnxruntime")
            if ort:
                path, optimized = ort[0].path, True
            needs = _closure(m, path)
            size = sum(m.file(p).size for p in needs)
            parts[cut.id] = Part(entry, cut, path, optimized, needs, size * _SESSION_OVERHEAD)
        return parts

    # -- queries --------------------------------------------------------------------------------

    @property
    def entries(self) -> list[BundleEntry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def rejected(self) -> dict[str, str]:
        with self._lock:
            return {str(p): why for p, (_, why) in self._rejected.items()}

    def bundle(self, digest: str) -> BundleEntry:
        with self._lock:
            entry = self._by_digest.get(digest)
        if entry is None:
            raise NotFound(f"no bundle with digest {digest[:64]!r} in the repository")
        return entry

    def resolve(self, model_digest: str, cut_id: int, model: str | None = None) -> Part:
        """The part serving ``cut_id`` of the model compiled from ``model_digest`` (the newest
        bundle of it when several are there)."""
        with self._lock:
            candidates = [e for e in self._entries.values() if e.source_digest == model_digest]
            if not candidates:
                named = sorted({e.source_digest[:12] for e in self._entries.values()
                                if model is not None and e.model_name == model})
                if named:
                    raise FailedPrecondition(
                        f"model {model!r} is served here from source digest(s) "
                        f"{', '.join(named)}, not {model_digest[:12]}: the device and the cloud "
                        "run different bundles of it")
                raise NotFound(f"unknown model: no bundle here was compiled from source digest "
                               f"{model_digest[:64]!r}")
            entry = max(candidates, key=lambda e: e.added_at)
            part = entry.parts.get(cut_id)
        if part is None:
            cuts = sorted(entry.parts)
            raise NotFound(f"unknown cut {cut_id} of model {entry.model_name!r} "
                           f"(the cloud runs cuts {cuts})")
        return part

    def by_name(self, name: str, version: str | None = None) -> BundleEntry:
        """The bundle serving model ``name`` (``version``, else the newest added)."""
        with self._lock:
            matches = [e for e in self._entries.values() if e.model_name == name]
        if version is not None:
            matches = [e for e in matches if e.model_version == version]
        if not matches:
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise NotFound(f"unknown {what}")
        return max(matches, key=lambda e: e.added_at)

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted({e.model_version for e in self._entries.values()
                           if e.model_name == name})

    # -- loading (compute threads) ---------------------------------------------------------------

    def acquire(self, part: Part) -> Any:
        """The active backend of ``part`` (loading it now if needed); call :meth:`release`
        after the batch. Raises FAILED_PRECONDITION for files changed on disk,
        RESOURCE_EXHAUSTED when the part alone is over the memory budget."""
        with self._lock:
            if part.load_error is not None:  # it failed before: not again for every batch
                raise part.load_error
            part.busy += 1
            part.last_used = time.monotonic()
            if part.backend is not None:
                self._loaded.move_to_end(part.key)
                return part.backend
        try:
            return self._load(part)
        except TandemError as exc:
            with self._lock:
                part.busy -= 1
                part.load_error = exc
            log.error("cannot load %s: %s", part.label, exc)
            raise
        except BaseException:
            with self._lock:
                part.busy -= 1
            raise

    def release(self, part: Part) -> None:
        with self._lock:
            part.busy -= 1
            entry = part.bundle
            gone = self._by_digest.get(entry.digest) is not entry
            if gone and part.busy == 0 and part.key in self._loaded:
                self._unload(part)

    def _load(self, part: Part) -> Any:
        if part.estimate_bytes > self.memory_budget_bytes:
            raise ResourceExhausted(
                f"{part.label} needs about {part.estimate_bytes >> 20} MiB, over the memory "
                f"budget of {self.memory_budget_bytes >> 20} MiB", retryable=False)
        with self._lock:
            self._make_room(part.estimate_bytes)
        bundle = part.bundle.bundle
        try:
            data = bundle.read(part.path, verify=True)
            for extra in part.needs:
                if extra != part.path:
                    bundle.read(extra, verify=True)
        except TandemError as exc:
            raise FailedPrecondition(f"{part.label}: the bundle changed on disk after it was "
                                     f"verified: {exc}") from exc
        except OSError as exc:
            raise FailedPrecondition(f"{part.label}: cannot read {part.path}: {exc}") from exc
        source: bytes | str = data if len(part.needs) == 1 else str(bundle.path_of(part.path))
        started = time.perf_counter()
        backend = self._backend_factory(part, source)
        log.info("loaded %s (%s, %.0f ms)", part.label, part.path,
                 (time.perf_counter() - started) * 1000)
        with self._lock:
            if part.backend is not None:  # another thread won the race
                _deactivate(backend)
                return part.backend
            part.backend = backend
            self._loaded[part.key] = part
            self._loaded_bytes += part.estimate_bytes
        return backend

    def _make_room(self, need: int) -> None:
        for key in list(self._loaded):
            if self._loaded_bytes + need <= self.memory_budget_bytes:
                return
            victim = self._loaded[key]
            if victim.busy == 0:
                self._unload(victim)

    def _unload(self, part: Part) -> None:
        self._loaded.pop(part.key, None)
        self._loaded_bytes -= part.estimate_bytes
        backend, part.backend = part.backend, None
        if backend is not None:
            _deactivate(backend)
            log.info("unloaded %s", part.label)
            if self.on_unload is not None:
                self.on_unload(part)

    @property
    def loaded(self) -> list[Part]:
        with self._lock:
            return list(self._loaded.values())

    @property
    def loaded_bytes(self) -> int:
        return self._loaded_bytes

    def _onnxruntime(self, part: Part, source: bytes | str) -> Any:
        from tandem.devices.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(source, intra_op_threads=self.intra_op_threads or None,
                                     optimized=part.optimized, name=part.label)
        backend.activate()
        return backend

    def close(self) -> None:
        with self._lock:
            for path in list(self._entries):
                entry = self._entries[path]
                for part in entry.parts.values():
                    if part.key in self._loaded:
                        self._unload(part)
                self._entries.pop(path)
                self._by_digest.pop(entry.digest, None)
                entry.bundle.close()


def _deactivate(backend: Any) -> None:
    try:
        backend.deactivate()
    except TandemError as exc:
        log.warning("could not deactivate %s: %s", backend, exc)


def _closure(manifest: Any, path: str) -> tuple[str, ...]:
    """``path`` and every file it requires, transitively."""
    out, todo = [], [path]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(manifest.file(p).requires)
    return tuple(out)


def _signature(path: Path) -> tuple | None:
    """What identifies the current content of a repository entry cheaply, or None if it is
    not a bundle candidate."""
    try:
        st = path.stat()
        if path.is_dir():
            m = (path / "manifest.json").stat()
            # every file's size and mtime: a bundle copied in place (not renamed in) is seen
            # again when the copy completes
            files = []
            for dirpath, _, names in os.walk(path):
                for name in names:
                    fs = os.lstat(os.path.join(dirpath, name))
                    files.append((fs.st_mtime_ns, fs.st_size))
            return ("dir", m.st_ino, len(files), max(files), sum(s for _, s in files))
        if path.is_file() and _looks_like_archive(path):
            return ("file", st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return None
    return None


def _looks_like_archive(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"


def check_repo(root: Path) -> None:
    if not root.exists():
        raise NotFound(f"model repository {root} does not exist")
    if not root.is_dir():
        raise InvalidArgument(f"model repository {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise InvalidArgument(f"model repository {root} is not readable")
