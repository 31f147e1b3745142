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
* **Lazy load, LRU unload**: a part (the tail of one cut, as :meth:`Bundle.select` picks it
  for role ``tail``: the bundle's ORT-optimized artifact when there is one, else the part)
  becomes an ONNX Runtime session on its first request, in the compute thread — with the CUDA
  execution provider when this ONNX Runtime has it, else on the CPU. Its memory is estimated
  from its files (x2 for the session's own copies); when loading one would pass the memory
  budget, the least recently used idle parts are unloaded first. A load reserves its bytes
  before it starts, so loads on several compute threads at once never pass the budget together;
  when busy parts (a batch running) or other loads hold the memory, it waits for them (up to
  ``room_wait_s``, then RESOURCE_EXHAUSTED, retryable).
* **TensorRT per part**: with ``backend`` ``auto`` (default) or ``tensorrt``, a GPU profile
  (detected, or given) and ``tensorrt`` importable, a part whose bundle has a TensorRT artifact
  for this profile gets its engine — the bundled one when this TensorRT loads it, else built
  from the artifact's recipe into the engine cache — in a background thread while ONNX Runtime
  serves it, and switches to it atomically when it is ready (a batch already running finishes
  on ONNX Runtime): :class:`tandem.devices.backends.SwitchableBackend` and
  :class:`tandem.devices.engines.BackgroundEngineBuild`, the edge daemon's mechanism too.
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

from tandem.devices.backends.switchable import SwitchableBackend
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
_ROOM_WAIT_S = 30.0  # how long a load waits for busy parts to free memory before giving up
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
    backend: Any = None  # a SwitchableBackend while loaded
    engines: Any = None  # its BackgroundEngineBuild, while one runs or ran
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

    @property
    def backend_kind(self) -> str:
        """What runs it now: ``onnxruntime``, ``tensorrt``, or ``unloaded``."""
        backend = self.backend
        return "unloaded" if backend is None else backend.kind


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
                 backend_factory: BackendFactory | None = None, backend: str = "auto",
                 profile: Any = None, engine_cache: Path | None = None) -> None:
        """``backend``: ``auto`` (TensorRT where it can be had, else ONNX Runtime),
        ``onnxruntime`` or ``tensorrt`` (MissingDependency on the first load when ``tensorrt``
        does not import); ``profile``: this machine's :class:`~tandem.devices.Profile` (None:
        detected on the first load); ``engine_cache``: where built engines are kept (None:
        ``~/.cache/tandem/engines``)."""
        if backend not in ("auto", "onnxruntime", "tensorrt"):
            raise InvalidArgument(f"backend must be auto, onnxruntime or tensorrt, not "
                                  f"{backend!r}")
        self.root = Path(root)
        self.backend_choice = backend
        self._profile = profile
        self.engine_cache = engine_cache
        self.public_key = public_key
        self.memory_budget_bytes = memory_budget_bytes
        self.intra_op_threads = intra_op_threads
        self._backend_factory = backend_factory or self._onnxruntime
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)  # notified when memory may have freed
        self._entries: dict[Path, BundleEntry] = {}  # by repository path
        self._by_digest: dict[str, BundleEntry] = {}  # bundle digest -> entry
        self._rejected: dict[Path, tuple[tuple, str]] = {}  # path -> (signature, reason)
        self._loaded: collections.OrderedDict[tuple[str, int], Part] = collections.OrderedDict()
        self._loaded_bytes = 0
        self._reserved_bytes = 0  # parts being loaded right now (counted against the budget)
        self.room_wait_s = _ROOM_WAIT_S
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
        """A part per cut with a tail (cut 0's is the whole model), as ``Bundle.select`` picks
        it for ONNX Runtime (its verified cuts only; ``select`` checks the files it picks, which
        ``load_bundle`` already hashed: free for a directory, an extraction for an archive)."""
        m = entry.manifest
        root = entry.bundle.root
        selection = entry.bundle.select("tail", "onnxruntime", sources=False)
        parts = {}
        for cut_id, runnable in selection.tails.items():
            path = runnable.path.relative_to(root).as_posix()
            needs = m.closure([path])
            size = sum(m.file(p).size for p in needs)
            parts[cut_id] = Part(entry, m.cut(cut_id), path, runnable.optimized, needs,
                                 size * _SESSION_OVERHEAD)
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
                               f"{model_digest[:64]!r}{self._rejected_note()}")
            entry = max(candidates, key=lambda e: e.added_at)
            part = entry.parts.get(cut_id)
        if part is None:
            cuts = sorted(entry.parts)
            raise NotFound(f"unknown cut {cut_id} of model {entry.model_name!r} "
                           f"(the cloud runs cuts {cuts})")
        return part

    def _rejected_note(self) -> str:
        """For NOT_FOUND: a hint that the bundle asked for may be one that failed verification
        (the count only: repository paths stay in the worker's log)."""
        with self._lock:
            n = len(self._rejected)
        return f" ({n} bundle(s) in the repository were rejected: see the worker's log)" \
            if n else ""

    def by_name(self, name: str, version: str | None = None) -> BundleEntry:
        """The bundle serving model ``name`` (``version``, else the newest added)."""
        with self._lock:
            matches = [e for e in self._entries.values() if e.model_name == name]
        if version is not None:
            matches = [e for e in matches if e.model_version == version]
        if not matches:
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise NotFound(f"unknown {what}{self._rejected_note()}")
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
                if not exc.retryable:  # a retryable one (no room yet) may pass: not kept
                    part.load_error = exc
                self._room.notify_all()
            log.error("cannot load %s: %s", part.label, exc)
            raise
        except BaseException:
            with self._lock:
                part.busy -= 1
                self._room.notify_all()
            raise

    def release(self, part: Part) -> None:
        with self._lock:
            part.busy -= 1
            entry = part.bundle
            gone = self._by_digest.get(entry.digest) is not entry
            if gone and part.busy == 0 and part.key in self._loaded:
                self._unload(part)
            if part.busy == 0:
                self._room.notify_all()  # it may be unloaded now to make room for another

    def _load(self, part: Part) -> Any:
        if part.estimate_bytes > self.memory_budget_bytes:
            raise ResourceExhausted(
                f"{part.label} needs about {part.estimate_bytes >> 20} MiB, over the memory "
                f"budget of {self.memory_budget_bytes >> 20} MiB", retryable=False)
        need = part.estimate_bytes
        with self._lock:
            loaded = self._reserve(part, need)
            if loaded is not None:  # another thread loaded it while this one waited
                return loaded
        try:
            return self._load_reserved(part)
        except BaseException:
            with self._lock:
                self._reserved_bytes -= need
                self._room.notify_all()
            raise

    def _reserve(self, part: Part, need: int) -> Any:
        """Under the lock: make room for ``need`` bytes (unloading idle parts, least recently
        used first) and reserve them, so that loads running at once on several compute threads
        never pass the budget together. While busy parts (or other loads) hold the memory, wait
        for them, up to :attr:`room_wait_s` (then RESOURCE_EXHAUSTED, retryable). Returns the
        part's backend if another thread loaded it meanwhile, else None (reserved)."""
        deadline = time.monotonic() + self.room_wait_s
        while True:
            if part.backend is not None:
                self._loaded.move_to_end(part.key)
                return part.backend
            self._make_room(need)
            if self._loaded_bytes + self._reserved_bytes + need <= self.memory_budget_bytes:
                self._reserved_bytes += need
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResourceExhausted(
                    f"{part.label}: no room to load it within {self.room_wait_s:g} s (the "
                    f"memory budget of {self.memory_budget_bytes >> 20} MiB is held by parts "
                    "computing or loading)", retryable=True)
            self._room.wait(left)

    def _load_reserved(self, part: Part) -> Any:
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
        plan = self._engine_plan(part)  # before loading: MissingDependency for "tensorrt"
        backend = SwitchableBackend(self._backend_factory(part, source), "onnxruntime",
                                    name=part.label)
        log.info("loaded %s (%s, %s, %.0f ms)", part.label, part.path,
                 ", ".join(getattr(backend.backend, "providers", None) or ["onnxruntime"]),
                 (time.perf_counter() - started) * 1000)
        with self._lock:
            self._reserved_bytes -= part.estimate_bytes  # reserved: now loaded, or not needed
            if part.backend is not None:  # another thread won the race
                self._room.notify_all()
                backend.close()
                return part.backend
            part.backend = backend
            self._loaded[part.key] = part
            self._loaded_bytes += part.estimate_bytes
            if plan:
                part.engines = self._start_engine(part, plan[0], backend)
        return backend

    @property
    def profile(self) -> Any:
        """This machine's device profile (detected once, on first use)."""
        if self._profile is None:
            from tandem.devices import detect_profile

            self._profile = detect_profile()
            log.info("device profile %s", self._profile.id)
        return self._profile

    def _engine_plan(self, part: Part) -> list[Any]:
        """The TensorRT runnable of ``part`` for this GPU ([] when TensorRT is not wanted, not
        importable, or the bundle has none for this profile)."""
        from tandem.devices.engines import engine_plan, tensorrt_wanted

        if self.backend_choice == "onnxruntime" or \
                not tensorrt_wanted(self.backend_choice, self.profile):
            return []
        selection = part.bundle.bundle.select("tail", self.profile.id)
        runnable = selection.tails.get(part.cut.id)
        plan, skipped = engine_plan([runnable] if runnable is not None else [])
        for why in skipped.values():
            log.info("%s stays on ONNX Runtime: %s", part.label, why)
        return plan

    def _start_engine(self, part: Part, runnable: Any, target: SwitchableBackend) -> Any:
        from tandem.devices.engines import BackgroundEngineBuild, engine_backend

        cache = self.engine_cache or Path.home() / ".cache" / "tandem" / "engines"
        profile = self.profile
        log.info("%s: TensorRT engine for %s being prepared; ONNX Runtime serves meanwhile",
                 part.label, profile.id)
        return BackgroundEngineBuild(
            [(part.label, lambda: engine_backend(runnable, profile, cache, name=part.label),
              target)], name=f"tandem-engine-{part.cut.id}").start()

    def _make_room(self, need: int) -> None:
        for key in list(self._loaded):
            if self._loaded_bytes + self._reserved_bytes + need <= self.memory_budget_bytes:
                return
            victim = self._loaded[key]
            if victim.busy == 0:
                self._unload(victim)

    def _unload(self, part: Part) -> None:
        """Under the lock."""
        self._loaded.pop(part.key, None)
        self._loaded_bytes -= part.estimate_bytes
        self._room.notify_all()
        backend, part.backend = part.backend, None
        if part.engines is not None:
            part.engines.stop()  # an engine finished later is released unused
            part.engines = None
        if backend is not None:
            backend.close()
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
        """ONNX Runtime, with the CUDA provider when this onnxruntime has it (then the CPU)."""
        from tandem.devices.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(source, providers=_ort_providers(),
                                     intra_op_threads=self.intra_op_threads or None,
                                     optimized=part.optimized, name=part.label)
        backend.activate()
        return backend

    def wait_engines(self, timeout_s: float | None = None) -> bool:
        """Wait for the background engine builds of loaded parts; True when none runs."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for part in self.loaded:
            engines = part.engines
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if engines is not None and not engines.wait(left):
                return False
        return True

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


def _ort_providers() -> list[str]:
    """CUDA first where this onnxruntime build has it, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] \
        or ["CPUExecutionProvider"]


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
