"""Opening bundles: :func:`open_bundle` (selective) and :func:`load_bundle` (everything).

An archive opened either way is extracted into a private temporary directory named
``tandem-bundle-<pid>-…`` that the bundle's ``close()`` removes (also when it is garbage
collected). Nothing is created before the archive's manifest has been read and checked, so a
file that is not an archive (a FIFO, garbage, a bomb) never leaves a directory behind; and a
process killed while it held one leaves a directory that the next opener removes (its pid is
gone).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from tandem.protocol.bundle._archive import (
    ArchiveHead,
    extract_members,
    read_head,
    unpack,
    write_head,
)
from tandem.protocol.bundle._errors import BundleNotFound
from tandem.protocol.bundle._files import remove_tree
from tandem.protocol.bundle._load import Bundle, verify_dir
from tandem.protocol.bundle._sign import KeySource

__all__ = ["TEMP_PREFIX", "load_bundle", "open_bundle"]

TEMP_PREFIX = "tandem-bundle-"
_OURS = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


def _sweep_stale_temp_dirs() -> int:
    """Remove ``tandem-bundle-<pid>-*`` directories of ours whose process is gone (it was
    killed before it could clean up). Returns how many were removed."""
    removed = 0
    tmp = Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return 0
    for entry in entries:
        match = _OURS.match(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
                continue
            os.kill(int(match.group(1)), 0)  # raises when no such process exists
        except ProcessLookupError:
            remove_tree(Path(entry.path))
            removed += 1
        except (OSError, OverflowError):
            continue
    return removed


def _temp_dir() -> Path:
    _sweep_stale_temp_dirs()
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))


def _archive_bundle(path: Path, head: ArchiveHead, tmp: Path, *, verified: bool) -> Bundle:
    def fetch(paths: list[str]) -> None:
        extract_members(path, tmp, head, paths)

    return Bundle(
        head.manifest, tmp, head.digest, signature_verified=head.signature_verified,
        signed=head.signature is not None, owned_dir=tmp, fetch=fetch, source=path,
        verified=[f.path for f in head.manifest.files] if verified else (),
    )


def open_bundle(path: Path | str, public_key: KeySource | None = None) -> Bundle:
    """Open a bundle directory or archive for selective use.

    Reads and checks the manifest (and, with ``public_key``, its signature, before the manifest
    is parsed); for a directory also that every listed file is there with its size and nothing
    else is. A file's sha256 is checked — and, from an archive, the file extracted — only when
    it is selected or asked for (:meth:`Bundle.select`, :meth:`Bundle.verify`, ``path_of``,
    ``read``), so a device extracts and hashes the parts it runs, not every profile's.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise BundleNotFound(f"{path}: no bundle directory or archive here")
    if path.is_dir():
        return verify_dir(path, public_key=public_key, verify_digests=False, mark_verified=False)
    head = read_head(path, public_key=public_key)
    tmp = _temp_dir()
    try:
        write_head(tmp, head)
        return _archive_bundle(path, head, tmp, verified=False)
    except BaseException:
        remove_tree(tmp)
        raise


def load_bundle(
    path: Path | str,
    public_key: KeySource | None = None,
    verify_digests: bool = True,
    *,
    extract_to: Path | str | None = None,
) -> Bundle:
    """Load and verify a whole bundle directory or archive file.

    With ``public_key`` (PEM path, PEM bytes, raw 32 bytes or a key object) the bundle must
    carry a manifest.sig that verifies. ``verify_digests=False`` still checks that every listed
    file exists with its size and that nothing unlisted is there, but skips hashing.

    An archive is extracted (every member checked as it streams: see ``unpack``) to
    ``extract_to`` (which must not exist; it stays after the bundle is closed) or else to a
    temporary directory that ``Bundle.close()`` removes. To use only some files of a bundle,
    :func:`open_bundle` and :meth:`Bundle.select` are cheaper.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise BundleNotFound(f"{path}: no bundle directory or archive here")
    if path.is_dir():
        return verify_dir(path, public_key=public_key, verify_digests=verify_digests,
                          mark_verified=True)
    if extract_to is not None:
        target = unpack(path, extract_to, verify=verify_digests, public_key=public_key)
        try:
            return verify_dir(target, public_key=public_key, verify_digests=False,
                              label=str(path), mark_verified=True)
        except BaseException:
            remove_tree(target)
            raise
    head = read_head(path, public_key=public_key)
    tmp = _temp_dir()
    try:
        write_head(tmp, head)
        extract_members(path, tmp, head, verify_digests=verify_digests)
        verify_dir(tmp, label=str(path), verify_digests=False)  # layout: nothing else there
        return _archive_bundle(path, head, tmp, verified=True)
    except BaseException:
        remove_tree(tmp)
        raise
