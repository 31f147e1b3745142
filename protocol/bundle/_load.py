"""Checking a bundle directory, and the loaded :class:`Bundle`.

A directory is a bundle when: manifest.json is a regular file that parses and validates; when a
public key is configured, manifest.sig exists and verifies over manifest.json's exact bytes;
every listed file exists as a regular file with the listed size (and sha256 unless
``verify_digests=False``); and nothing else is there (no unlisted file, no link, no device).
"""

from __future__ import annotations

import hashlib
import os
import stat
import weakref
from pathlib import Path
from types import TracebackType

from tandem.protocol.bundle._errors import (
    BundleError,
    BundleIntegrityError,
    BundleNotFound,
    ManifestError,
)
from tandem.protocol.bundle._files import check_rel_path, remove_tree, sha256_file
from tandem.protocol.bundle._schema import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest
from tandem.protocol.bundle._sign import KeySource, decode_signature, verify_bytes
from tandem.protocol.errors import UnsupportedVersion

__all__ = ["MAX_MANIFEST_BYTES", "Bundle", "verify_dir"]

MAX_MANIFEST_BYTES = 64 << 20


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
    ) -> None:
        self.manifest = manifest
        self.root = root
        self.digest = digest
        self.signature_verified = signature_verified
        self.signed = signed
        self._finalizer = (
            weakref.finalize(self, remove_tree, owned_dir) if owned_dir is not None else None
        )

    def entry(self, rel_path: str) -> FileEntry:
        check_rel_path(rel_path)
        return self.manifest.file(rel_path)

    def path_of(self, rel_path: str) -> Path:
        """Absolute path of a listed file; unlisted → :class:`BundleNotFound`."""
        return self.root / self.entry(rel_path).path

    def read(self, rel_path: str, *, verify: bool = True) -> bytes:
        """Bytes of a listed file, checked again against its size and sha256 unless told not to
        (so a change after loading is still caught)."""
        entry = self.entry(rel_path)
        path = self.root / entry.path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleNotFound(f"{self.root}: {entry.path}: listed but missing") from None
        if verify:
            _check_content(
                str(self.root), entry, len(data), lambda: hashlib.sha256(data).hexdigest()
            )
        return data

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


def _check_content(label: str, entry: FileEntry, size: int, digest) -> None:
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
) -> Bundle:
    """Check the bundle directory ``root`` (see the module docstring) and return it loaded.

    ``label`` names the bundle in error messages (the archive's path for an extracted one).
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
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{label}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    content = manifest_path.read_bytes()

    sig_path = root / SIGNATURE_NAME
    sig_st = _lstat(sig_path)
    if sig_st is not None and not stat.S_ISREG(sig_st.st_mode):
        raise BundleIntegrityError(f"{label}: {SIGNATURE_NAME} is {_kind(sig_st.st_mode)}")
    verified = False
    if public_key is not None:
        if sig_st is None:
            raise BundleIntegrityError(
                f"{label}: {SIGNATURE_NAME} is missing and a public key is configured; "
                "refusing an unsigned bundle"
            )
        if sig_st.st_size > 1024:
            raise BundleIntegrityError(f"{label}: {SIGNATURE_NAME} is not a signature (too big)")
        what = f"{label}: {SIGNATURE_NAME}"
        signature = decode_signature(sig_path.read_bytes(), what=what)
        verify_bytes(content, signature, public_key, what=what)
        verified = True

    try:
        manifest = Manifest.from_json(content)
        manifest.check_references()
    except ManifestError as exc:
        raise exc.from_source(f"{label}: {MANIFEST_NAME}") from None
    except UnsupportedVersion as exc:
        raise UnsupportedVersion(f"{label}: {exc}") from None

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
        path = root / entry.path
        entry_st = _lstat(path)
        if entry_st is None:
            raise BundleNotFound(f"{label}: {entry.path}: listed in the manifest but missing")
        if not stat.S_ISREG(entry_st.st_mode):
            raise BundleIntegrityError(f"{label}: {entry.path}: is {_kind(entry_st.st_mode)}")
        digest = (lambda p=path: sha256_file(p)[0]) if verify_digests else None
        _check_content(label, entry, entry_st.st_size, digest)

    return Bundle(
        manifest,
        root,
        hashlib.sha256(content).hexdigest(),
        signature_verified=verified,
        signed=sig_st is not None,
        owned_dir=owned_dir,
    )
