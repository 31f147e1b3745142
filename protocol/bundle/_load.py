"""Checking a bundle directory, and the loaded :class:`Bundle`.

A directory is a bundle when: manifest.json is a regular file that parses and validates; when a
public key is configured, manifest.sig exists and verifies over manifest.json's exact bytes
(checked before the manifest is parsed); every listed file exists as a regular file with the
listed size (and sha256 unless ``verify_digests=False``); and nothing else is there (no unlisted
file, no link, no device).

A :class:`Bundle` knows which of its files it has verified. One loaded with every digest checked
(``load_bundle``) has verified them all; one opened for selective use (``open_bundle``) hashes a
file — or, from an archive, extracts it — the first time it is selected or asked for
(:meth:`Bundle.select`, :meth:`Bundle.verify`, :meth:`Bundle.path_of`, :meth:`Bundle.read`).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from tandem.protocol.bundle._errors import (
    BundleError,
    BundleIntegrityError,
    BundleNotFound,
    ManifestError,
)
from tandem.protocol.bundle._files import check_rel_path, remove_tree, sha256_file
from tandem.protocol.bundle._schema import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
)
from tandem.protocol.bundle._select import Role, Selection, select_from
from tandem.protocol.bundle._sign import KeySource, decode_signature, verify_bytes
from tandem.protocol.errors import UnsupportedVersion

__all__ = ["MAX_SIGNATURE_BYTES", "Bundle", "check_content", "checked_manifest", "verify_dir"]

MAX_SIGNATURE_BYTES = 1024

#: Writes the listed files it is given (verified) into a bundle's root: how an archive bundle
#: extracts what is selected (set by the opener, so this module does not import the archive's).
Fetch = Callable[[list[str]], Any]


class Bundle:
    """A verified bundle on disk.

    ``manifest``: the parsed :class:`Manifest`; ``root``: its directory; ``digest``: sha256 hex of
    manifest.json's bytes (identifies the whole bundle, since the manifest covers every file);
    ``signature_verified``: True when a public key was configured and the signature verified.
    A bundle loaded from an archive lives in a temporary directory that :meth:`close` (or leaving
    ``with``) removes.
    """

    def __init__(
        self,
        manifest: Manifest,
        root: Path,
        digest: str,
        *,
        signature_verified: bool = False,
        signed: bool = False,
        owned_dir: Path | None = None,
        verified: Iterable[str] = (),
        fetch: Fetch | None = None,
        source: Path | None = None,
    ) -> None:
        self.manifest = manifest
        self.root = root
        self.digest = digest
        self.signature_verified = signature_verified
        self.signed = signed
        self.source = source or root  # the directory or archive it was opened from
        self._verified: set[str] = set(verified)
        self._fetch = fetch
        self._lock = threading.Lock()
        self._finalizer = (
            weakref.finalize(self, remove_tree, owned_dir) if owned_dir is not None else None
        )

    @property
    def verified_files(self) -> frozenset[str]:
        """Bundle paths whose size and sha256 have been checked (and, for an archive, that
        have been extracted under :attr:`root`)."""
        return frozenset(self._verified)

    def entry(self, rel_path: str) -> FileEntry:
        check_rel_path(rel_path)
        return self.manifest.file(rel_path)

    def verify(self, paths: Iterable[str]) -> tuple[str, ...]:
        """Make sure each bundle path, and every file it ``requires``, is present under
        :attr:`root` and matches the manifest: hashed (a directory) or extracted and hashed
        (an archive) the first time, free afterwards. Returns those paths (the closure).
        Raises BundleIntegrityError on a mismatch, BundleNotFound for an unlisted path."""
        closure = self.manifest.closure(paths)
        with self._lock:
            if self.closed:
                raise BundleError(f"{self.source}: the bundle was closed (its extracted files "
                                  "are gone); open it again")
            todo = [p for p in closure if p not in self._verified]
            if not todo:
                return closure
            if self._fetch is not None:
                self._fetch(todo)
            else:
                for rel in todo:
                    _check_file(str(self.root), self.root, self.manifest.file(rel), True)
            self._verified.update(todo)
        return closure

    def path_of(self, rel_path: str) -> Path:
        """Absolute path of a listed file, verified (see :meth:`verify`); unlisted →
        :class:`BundleNotFound`."""
        entry = self.entry(rel_path)
        self.verify([entry.path])
        return self.root / entry.path

    def select(self, role: Role | str | Iterable[Role | str], profile: str, *,
               sources: bool = True) -> Selection:
        """What to run, per cut, for ``role`` (one or several of :class:`Role`: ``"head"``,
        ``"tail"``, ``"full"``) on ``profile`` (a device profile id, or ``"onnxruntime"`` /
        ``"cpu"`` for ONNX Runtime on a CPU): see :class:`Selection`. Verifies (from an archive:
        extracts) only the files it picks, the source ONNX parts (for a fallback backend)
        unless ``sources=False``, and what they ``require``."""
        selection = select_from(self.manifest, self.root, role, profile, sources=sources)
        self.verify(selection.files)
        return selection

    def read(self, rel_path: str, *, verify: bool = True) -> bytes:
        """Bytes of a listed file, checked again against its size and sha256 unless told not to
        (so a change after loading is still caught)."""
        entry = self.entry(rel_path)
        self.verify([entry.path])
        path = self.root / entry.path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleNotFound(f"{self.root}: {entry.path}: listed but missing") from None
        if verify:
            check_content(
                str(self.root), entry, len(data), lambda: hashlib.sha256(data).hexdigest()
            )
        return data

    @property
    def closed(self) -> bool:
        """True once :meth:`close` removed an archive's extraction (never for a directory)."""
        return self._finalizer is not None and not self._finalizer.alive

    def close(self) -> None:
        """Remove the temporary extraction of an archive (no-op for a directory bundle)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Bundle({m.model_name!r} {m.model_version!r}, root={str(self.root)!r}, "
            f"digest={self.digest[:12]}, cuts={[c.id for c in m.cuts]})"
        )


def check_content(label: str, entry: FileEntry, size: int, digest) -> None:
    """BundleIntegrityError unless ``size`` (and ``digest()``, when given) match ``entry``."""
    if size != entry.size:
        raise BundleIntegrityError(
            f"{label}: {entry.path}: size {size} differs from the manifest's {entry.size}; "
            "the bundle was modified after it was written"
        )
    if digest is not None:
        actual = digest()
        if actual != entry.sha256:
            raise BundleIntegrityError(
                f"{label}: {entry.path}: sha256 {actual[:16]}… differs from the manifest's "
                f"{entry.sha256[:16]}…; the bundle was modified after it was written"
            )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def verify_dir(
    root: Path,
    *,
    public_key: KeySource | None = None,
    verify_digests: bool = True,
    label: str | None = None,
    owned_dir: Path | None = None,
    mark_verified: bool | None = None,
) -> Bundle:
    """Check the bundle directory ``root`` (see the module docstring) and return it loaded.

    ``label`` names the bundle in error messages (the archive's path for an extracted one).
    ``mark_verified`` (default: ``verify_digests``) says whether the returned bundle counts
    its files as verified; when False they are hashed on first use.
    """
    label = label or str(root)
    if not root.is_dir():
        raise BundleNotFound(f"{label}: not a bundle directory")
    root = root.resolve()
    manifest_path = root / MANIFEST_NAME
    st = _lstat(manifest_path)
    if st is None:
        raise BundleNotFound(f"{label}: {MANIFEST_NAME} is missing; not a bundle")
    if not stat.S_ISREG(st.st_mode):
        raise BundleIntegrityError(f"{label}: {MANIFEST_NAME} is {_kind(st.st_mode)}")
    if st.st_size > MAX_MANIFEST_BYTES:  # before reading it (Manifest.from_json checks again)
        raise BundleError(f"{label}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    content = manifest_path.read_bytes()

    sig_path = root / SIGNATURE_NAME
    sig_st = _lstat(sig_path)
    if sig_st is not None and not stat.S_ISREG(sig_st.st_mode):
        raise BundleIntegrityError(f"{label}: {SIGNATURE_NAME} is {_kind(sig_st.st_mode)}")
    signature = None
    if public_key is not None and sig_st is not None:
        if sig_st.st_size > MAX_SIGNATURE_BYTES:
            raise BundleIntegrityError(f"{label}: {SIGNATURE_NAME} is not a signature (too big)")
        signature = sig_path.read_bytes()
    manifest, verified = checked_manifest(content, signature, public_key, label)

    listed = {entry.path: entry for entry in manifest.files}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        for name in (*dirnames, *filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel_dir == "." and name in (MANIFEST_NAME, SIGNATURE_NAME):
                continue
            entry_st = (here / name).lstat()
            if stat.S_ISDIR(entry_st.st_mode):
                continue
            if not stat.S_ISREG(entry_st.st_mode):
                raise BundleIntegrityError(
                    f"{label}: {rel}: is {_kind(entry_st.st_mode)}; bundles hold regular files only"
                )
            if rel not in listed:
                raise BundleIntegrityError(
                    f"{label}: {rel}: file is not listed in the manifest; refusing the bundle"
                )

    for entry in manifest.files:
        _check_file(label, root, entry, verify_digests)

    return Bundle(
        manifest,
        root,
        hashlib.sha256(content).hexdigest(),
        signature_verified=verified,
        signed=sig_st is not None,
        owned_dir=owned_dir,
        verified=[f.path for f in manifest.files] if (
            verify_digests if mark_verified is None else mark_verified) else (),
    )


def checked_manifest(content: bytes, signature: bytes | None, public_key: KeySource | None,
                     label: str) -> tuple[Manifest, bool]:
    """Verify ``signature`` over ``content`` when a key is configured — before anything of the
    manifest is parsed — then parse and check the manifest: ``(manifest, signature verified)``.
    """
    verified = False
    if public_key is not None:
        what = f"{label}: {SIGNATURE_NAME}"
        if signature is None:
            raise BundleIntegrityError(
                f"{label}: {SIGNATURE_NAME} is missing and a public key is configured; "
                "refusing an unsigned bundle")
        verify_bytes(content, decode_signature(signature, what=what), public_key, what=what)
        verified = True
    try:
        manifest = Manifest.from_json(content)
        manifest.check_references()
    except ManifestError as exc:
        raise exc.from_source(f"{label}: {MANIFEST_NAME}") from None
    except UnsupportedVersion as exc:
        raise UnsupportedVersion(f"{label}: {exc}") from None
    return manifest, verified


def _check_file(label: str, root: Path, entry: FileEntry, hash_it: bool) -> None:
    path = root / entry.path
    entry_st = _lstat(path)
    if entry_st is None:
        raise BundleNotFound(f"{label}: {entry.path}: listed in the manifest but missing")
    if not stat.S_ISREG(entry_st.st_mode):
        raise BundleIntegrityError(f"{label}: {entry.path}: is {_kind(entry_st.st_mode)}")
    check_content(label, entry, entry_st.st_size,
                  (lambda: sha256_file(path)[0]) if hash_it else None)
