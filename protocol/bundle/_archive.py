"""The single-file form of a bundle: a tar archive, zstd- or gzip-compressed or plain.

Packing is deterministic: members in a fixed order (manifest.json, manifest.sig, then the listed
files sorted by path), no directory entries, mtime 0, uid/gid 0, no owner names, mode 0644,
gzip header mtime 0. The same bundle packs to the same bytes with the same zstandard version.

Unpacking never calls ``tarfile.extract``: each member is checked (a safe relative path, a
regular file, no duplicate, under the size limits; also ``tarfile.data_filter`` where Python
has it) and its bytes are copied by us into a staging directory that is renamed into place only
when everything passed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tandem.protocol.bundle._errors import (
    BundleError,
    BundleExists,
    BundleIntegrityError,
    BundleNotFound,
)
from tandem.protocol.bundle._files import CHUNK, check_target, install_dir, remove_tree, staging_dir
from tandem.protocol.bundle._load import verify_dir
from tandem.protocol.bundle._schema import MANIFEST_NAME, SIGNATURE_NAME, path_problem
from tandem.protocol.errors import MissingDependency

__all__ = [
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "extract_into",
    "is_bundle_archive",
    "pack",
    "unpack",
]

MAX_MEMBER_BYTES = 16 << 30
MAX_TOTAL_BYTES = 64 << 30
MAX_MEMBERS = 10_000

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_COMPRESSIONS = ("auto", "zstd", "gzip", "none")


def _zstandard():
    try:
        import zstandard
    except ImportError as exc:
        raise MissingDependency(
            f"zstandard is not installed: pip install zstandard (a tandem-rt dependency) ({exc})"
        ) from exc
    return zstandard


def _has_zstd() -> bool:
    try:
        _zstandard()
    except MissingDependency:
        return False
    return True


def _is_zstd_error(exc: BaseException) -> bool:
    if not _has_zstd():
        return False
    return isinstance(exc, _zstandard().ZstdError)


@contextlib.contextmanager
def _compressed_writer(raw: IO[bytes], compression: str) -> Iterator[IO[bytes]]:
    if compression == "zstd":
        with _zstandard().ZstdCompressor(level=3).stream_writer(raw, closefd=False) as writer:
            yield writer
    elif compression == "gzip":
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as writer:
            yield writer
    else:
        yield raw


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def pack(
    bundle_dir: Path | str,
    archive_path: Path | str,
    *,
    compression: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the bundle at ``bundle_dir`` as one archive file, atomically.

    The bundle is verified first (digests, no unlisted files), so a broken bundle is never
    shipped. ``compression``: "auto" (zstd if zstandard is importable, else gzip), "zstd",
    "gzip" or "none". An existing ``archive_path`` is refused unless ``overwrite``.
    """
    if compression not in _COMPRESSIONS:
        raise BundleError(f"compression must be one of {', '.join(_COMPRESSIONS)}")
    if compression == "auto":
        compression = "zstd" if _has_zstd() else "gzip"
    bundle_dir, archive_path = Path(bundle_dir), Path(archive_path).absolute()
    if os.path.lexists(archive_path):
        if not overwrite:
            raise BundleExists(f"{archive_path} exists (pass overwrite=True to replace it)")
        if archive_path.is_symlink() or not is_bundle_archive(archive_path):
            raise BundleExists(
                f"{archive_path} exists and is not a bundle archive; refusing to replace it")
    if not archive_path.parent.is_dir():
        raise BundleError(f"{archive_path.parent} is not an existing directory")
    bundle = verify_dir(bundle_dir)
    names = [MANIFEST_NAME]
    if bundle.signed:
        names.append(SIGNATURE_NAME)
    names += sorted(entry.path for entry in bundle.manifest.files)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive_path.name}.tmp-", dir=archive_path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with (
                _compressed_writer(raw, compression) as stream,
                tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name in names:
                    path = bundle.root / name
                    with open(path, "rb") as src:
                        tar.addfile(_member(name, os.fstat(src.fileno()).st_size), src)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return archive_path


MAX_EXTENDED_HEADER = 64 * 1024  # PAX / GNU long-name headers: names, not payloads
_EXTENDED_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})


class _OversizedHeader(tarfile.ReadError):
    pass


class _SafeTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header's whole payload into memory before any of
    our checks run; refuse a huge one first (a 24 KB zstd archive can declare gigabytes)."""

    def _proc_member(self, tar):
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise _OversizedHeader(
                f"extended header {self.name!r} declares {self.size} bytes "
                f"(over {MAX_EXTENDED_HEADER})")
        return super()._proc_member(tar)


@contextlib.contextmanager
def _open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed by the ExitStack below
    except FileNotFoundError:
        raise BundleNotFound(f"{archive}: no such archive") from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(raw)
        magic = raw.read(4)
        raw.seek(0)
        stream: IO[bytes] = raw
        if magic == _ZSTD_MAGIC:
            reader = _zstandard().ZstdDecompressor().stream_reader(raw, closefd=False)
            stream = stack.enter_context(reader)
        elif magic[:2] == _GZIP_MAGIC:
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        try:
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|",
                                                   tarinfo=_SafeTarInfo))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BundleError(f"{archive}: not a bundle archive ({exc})") from None
        yield tar


def is_bundle_archive(path: Path | str) -> bool:
    """Whether ``path`` is a regular file holding a tar archive (zstd, gzip or plain) whose first
    member is manifest.json, as :func:`pack` writes it. Reads only up to that first member; it
    does not verify the bundle."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with _open_tar(path) as tar:
            first = next(iter(tar), None)
    except (BundleError, BundleNotFound, tarfile.TarError, OSError, EOFError):
        return False
    except Exception as exc:
        if _is_zstd_error(exc):
            return False
        raise
    return first is not None and first.isreg() and first.name.removeprefix("./") == MANIFEST_NAME


def _refuse(archive: Path, name: str, why: str) -> BundleIntegrityError:
    return BundleIntegrityError(f"{archive}: member {name!r}: {why}; refusing the archive")


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"of unsupported tar type {member.type!r}"


def extract_into(
    archive: Path | str,
    dest: Path,
    *,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> None:
    """Safely extract ``archive`` into the existing empty directory ``dest`` (no verification
    of the bundle itself). Unsafe members raise :class:`BundleIntegrityError`."""
    archive = Path(archive)
    seen: set[str] = set()
    total = 0
    data_filter = getattr(tarfile, "data_filter", None)
    try:
        with _open_tar(archive) as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise _refuse(archive, member.name, f"more than {max_members} members")
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if name in ("", "."):
                    continue
                problem = path_problem(name.rstrip("/") if member.isdir() else name)
                if problem:
                    raise _refuse(archive, member.name, f"unsafe path ({problem})")
                if not (member.isreg() or member.isdir()):
                    raise _refuse(archive, member.name, f"is {_member_kind(member)}")
                if data_filter is not None:
                    try:
                        data_filter(member, str(dest))
                    except tarfile.FilterError as exc:
                        raise _refuse(archive, member.name, f"unsafe ({exc})") from None
                if name in seen:
                    raise _refuse(archive, member.name, "appears twice")
                seen.add(name)
                target = dest / name
                if member.isdir():
                    _mkdirs(archive, member.name, dest, name)
                    continue
                if member.size > max_member_bytes:
                    raise _refuse(
                        archive, member.name, f"{member.size} bytes, over {max_member_bytes}"
                    )
                total += member.size
                if total > max_total_bytes:
                    raise _refuse(archive, member.name, f"archive over {max_total_bytes} bytes")
                if "/" in name:
                    _mkdirs(archive, member.name, dest, name.rsplit("/", 1)[0])
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have data
                    raise _refuse(archive, member.name, "has no data")
                try:
                    out = open(target, "xb")  # noqa: SIM115
                except (FileExistsError, IsADirectoryError, NotADirectoryError):
                    raise _refuse(archive, member.name, "clashes with another member") from None
                with out:
                    written = 0
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > member.size:  # pragma: no cover - tarfile bounds reads
                            raise _refuse(archive, member.name, "longer than its header says")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation) as exc:
        raise BundleError(f"{archive}: corrupt archive ({exc})") from None
    except Exception as exc:
        if _is_zstd_error(exc):
            raise BundleError(f"{archive}: corrupt zstd archive ({exc})") from None
        raise


def _mkdirs(archive: Path, member: str, dest: Path, rel_dir: str) -> None:
    path = dest
    for segment in rel_dir.split("/"):
        path = path / segment
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise _refuse(archive, member, "clashes with another member")
        path.mkdir(exist_ok=True)


def unpack(
    archive_path: Path | str,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
    verify: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Extract an archive to the bundle directory ``out_dir``, atomically.

    Unsafe members (``..``, absolute paths, links, devices, oversized) raise
    :class:`BundleIntegrityError`; with ``verify`` the extracted bundle is checked (manifest,
    sizes, digests, no unlisted files; signatures are :func:`load_bundle`'s job) before it is
    renamed into place. An existing ``out_dir`` is refused unless ``overwrite``.
    """
    archive_path, out_dir = Path(archive_path), Path(out_dir).absolute()
    if not archive_path.is_file():
        raise BundleNotFound(f"{archive_path}: no such archive")
    check_target(out_dir, overwrite)
    staged = staging_dir(out_dir)
    try:
        extract_into(
            archive_path,
            staged,
            max_member_bytes=max_member_bytes,
            max_total_bytes=max_total_bytes,
            max_members=max_members,
        )
        if verify:
            verify_dir(staged, label=str(archive_path))
        install_dir(staged, out_dir, overwrite)
    except BaseException:
        remove_tree(staged)
        raise
    return out_dir
