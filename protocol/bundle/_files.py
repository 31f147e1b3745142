"""Digests, atomic directory replacement, and :class:`BundleWriter`.

Atomicity: a bundle is built in a hidden sibling ``.<name>.tmp-XXXXXXXX`` (same parent, so the
final ``rename`` is atomic on one file system) and renamed into place only by ``finish``. Any
exception, or leaving the ``with`` block without ``finish``, removes the temporary directory.
Replacing an existing bundle renames it aside (``.<name>.old-XXXXXXXX``), renames the new one in,
then deletes the old one: a reader sees the old bundle, for a moment nothing, or the new bundle,
never a mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

from tandem.protocol.bundle._errors import BundleError, BundleExists
from tandem.protocol.bundle._schema import (
    MANIFEST_NAME,
    RESERVED_NAMES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    check_manifest_size,
    path_problem,
)
from tandem.protocol.bundle._sign import KeySource, encode_signature, sign_bytes

__all__ = [
    "BundleWriter",
    "check_rel_path",
    "fsync_dir",
    "install_dir",
    "is_bundle_dir",
    "remove_tree",
    "sha256_file",
    "sha256_stream",
]

CHUNK = 1 << 20


def sha256_stream(src: IO[bytes], dst: IO[bytes] | None = None) -> tuple[str, int]:
    """Hash ``src`` in 1 MiB chunks (copying into ``dst`` if given): (hex digest, size)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        return sha256_stream(f)


def check_rel_path(path: object, error: type[Exception] = BundleError) -> str:
    """``path`` if it is a safe bundle path (see ``path_problem``), else raise ``error``."""
    problem = path_problem(path)
    if problem:
        raise error(f"unsafe bundle path: {problem}")
    return path  # type: ignore[return-value]


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported here (e.g. Windows); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    """A new empty hidden sibling directory of ``final`` to build it in (mode 0755 like a
    directory made with mkdir, not mkdtemp's 0700, so other users can read the bundle)."""
    path = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(path, 0o755)
    return path


_MAX_MANIFEST_PEEK = 64 << 20


def is_bundle_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding a bundle manifest (a regular manifest.json whose
    JSON object has ``schema_version`` and ``files``), valid or not. Cheap: nothing else is
    read; :func:`load_bundle` is what verifies a bundle."""
    manifest = Path(path) / MANIFEST_NAME
    try:
        if Path(path).is_symlink():
            return False
        st = manifest.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_PEEK:
            return False
        doc = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "schema_version" in doc and "files" in doc


def check_target(final: Path, overwrite: bool) -> None:
    """``final`` may become a bundle: it does not exist, or ``overwrite`` is set and it is a
    bundle directory or an empty directory. Anything else is refused: overwriting never
    deletes what is not a bundle."""
    if not final.parent.is_dir():
        raise BundleError(f"{final.parent} is not an existing directory")
    if os.path.lexists(final):
        if not overwrite:
            raise BundleExists(f"{final} exists (pass overwrite=True to replace it)")
        if not final.is_dir() or final.is_symlink():
            raise BundleError(f"{final} exists and is not a directory; refusing to replace it")
        if not is_bundle_dir(final) and any(final.iterdir()):
            raise BundleExists(f"{final} exists and is not a bundle; refusing to replace it")


def install_dir(staged: Path, final: Path, overwrite: bool) -> None:
    """Rename ``staged`` to ``final`` atomically, replacing an existing ``final`` if allowed."""
    check_target(final, overwrite)
    fsync_dir(staged)
    old: Path | None = None
    if os.path.lexists(final):
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        try:
            os.rename(final, old / "b")  # move the old bundle into a fresh private directory
        except BaseException:
            remove_tree(old)
            raise
    try:
        os.rename(staged, final)
    except BaseException:
        if old is not None:
            os.rename(old / "b", final)
            remove_tree(old)
        raise
    fsync_dir(final.parent)
    if old is not None:
        remove_tree(old)


class BundleWriter:
    """Build a bundle directory atomically::

        with BundleWriter(out_dir) as w:
            w.add_file("parts/head_1.onnx", head_bytes)
            w.add_file("engines/tail_1.plan", Path("/tmp/tail_1.plan"))
            manifest = w.finish(manifest_without_files, sign_key=key_path)

    ``out_dir`` exists only after ``finish`` returns; see the module docstring.
    """

    def __init__(self, out_dir: Path | str, *, overwrite: bool = False) -> None:
        self.path = Path(out_dir).absolute()
        self.overwrite = overwrite
        self._staging: Path | None = None
        self._entries: dict[str, FileEntry] = {}
        self._dirs: set[str] = set()
        self._done = False
        self.manifest: Manifest | None = None

    def __enter__(self) -> BundleWriter:
        if self._staging is not None or self._done:
            raise BundleError("a BundleWriter can be entered only once")
        check_target(self.path, self.overwrite)
        self._staging = staging_dir(self.path)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        unfinished = not self._done
        self.abort()
        if exc_type is None and unfinished:
            raise BundleError(
                f"BundleWriter for {self.path} left without finish() or abort(); nothing written"
            )

    @property
    def entries(self) -> tuple[FileEntry, ...]:
        """Files added so far, sorted by path."""
        return tuple(self._entries[p] for p in sorted(self._entries))

    def _require_open(self) -> Path:
        if self._staging is None:
            raise BundleError("use BundleWriter as a context manager (with BundleWriter(...) as w)")
        return self._staging

    def add_file(self, rel_path: str, data: bytes | bytearray | memoryview | Path, *,
                 requires: tuple[str, ...] | list[str] = ()) -> FileEntry:
        """Add one file at bundle path ``rel_path``; ``data`` is its content or a file to copy
        (hashed while it streams). ``requires`` names the other bundle files this one cannot be
        used without (an ONNX part's shared weights): whoever selects it gets them too; they
        may be added before or after it (``finish`` checks they were). Returns its
        :class:`FileEntry`."""
        staging = self._require_open()
        check_rel_path(rel_path)
        if rel_path in RESERVED_NAMES:
            raise BundleError(f"{rel_path!r} is reserved for the manifest and its signature")
        if rel_path in self._entries or rel_path in self._dirs:
            raise BundleError(f"{rel_path!r} was already added")
        parents = rel_path.split("/")[:-1]
        for n in range(1, len(parents) + 1):
            if "/".join(parents[:n]) in self._entries:
                raise BundleError(f"{rel_path!r}: {'/'.join(parents[:n])!r} is a file")
        target = staging / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            if isinstance(data, (bytes, bytearray, memoryview)):
                content = bytes(data)
                out.write(content)
                digest, size = hashlib.sha256(content).hexdigest(), len(content)
            elif isinstance(data, (str, os.PathLike)):
                try:
                    with open(data, "rb") as src:
                        digest, size = sha256_stream(src, out)
                except FileNotFoundError:
                    raise BundleError(f"add_file {rel_path!r}: {data} does not exist") from None
                except IsADirectoryError:
                    raise BundleError(f"add_file {rel_path!r}: {data} is a directory") from None
            else:
                raise BundleError(
                    f"add_file {rel_path!r}: expected bytes or a Path, got {type(data).__name__}"
                )
            out.flush()
            os.fsync(out.fileno())
        entry = FileEntry(path=rel_path, sha256=digest, size=size, requires=tuple(requires))
        self._entries[rel_path] = entry
        self._dirs.update("/".join(parents[:n]) for n in range(1, len(parents) + 1))
        return entry

    def finish(
        self,
        manifest: Manifest,
        sign_key: KeySource | None = None,
        *,
        password: bytes | None = None,
    ) -> Manifest:
        """Fill ``manifest.files`` from the added files, write manifest.json (and manifest.sig
        when ``sign_key`` is given), and rename the bundle into place. Returns the manifest."""
        staging = self._require_open()
        if not isinstance(manifest, Manifest):
            raise BundleError(f"finish: expected a Manifest, got {type(manifest).__name__}")
        if manifest.files:
            raise BundleError(
                "finish: manifest.files must be empty; the writer fills it from add_file"
            )
        final = dataclasses.replace(manifest, files=self.entries)
        try:
            final.check_references()
        except ManifestError as exc:
            raise exc.from_source("finish") from None
        content = final.to_bytes()
        try:
            check_manifest_size(content)  # never write what readers refuse
        except ManifestError as exc:
            raise exc.from_source("finish") from None
        _write(staging / MANIFEST_NAME, content)
        if sign_key is not None:
            signature = sign_bytes(content, sign_key, password=password)
            _write(staging / SIGNATURE_NAME, encode_signature(signature))
        install_dir(staging, self.path, self.overwrite)
        self._staging = None
        self._done = True
        self.manifest = final
        return final

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if self._staging is not None:
            remove_tree(self._staging)
            self._staging = None
        self._done = True


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
