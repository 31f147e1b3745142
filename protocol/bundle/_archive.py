"""The single-file form of a bundle: a tar archive, zstd- or gzip-compressed or plain.

Packing is deterministic: members in a fixed order (manifest.json, manifest.sig, then the listed
files sorted by path), no directory entries, mtime 0, uid/gid 0, no owner names, mode 0644,
gzip header mtime 0. The same bundle packs to the same bytes with the same zstandard version.

Reading never trusts the archive before its manifest: ``manifest.json`` must be the first member
(and ``manifest.sig``, when present, the second); both are read with small size caps, the
signature is verified over the manifest's bytes when a key is configured, and only then is the
manifest parsed (itself bounded, see ``MAX_MANIFEST_BYTES``). Every later member must then be a
file the manifest lists, with the listed size, or the archive is refused before a byte of it is
written; a member is written only when it was asked for (all of them to unpack, the selected
ones for ``Bundle.select``), hashed while it streams and deleted again if its sha256 differs.
Nothing unlisted is ever written, nothing listed grows past its listed size, and what is written
must fit the free space of the target file system. ``tarfile.extract`` is never called: each
member is checked (a safe relative path, a regular file, no duplicate, under the size limits;
also ``tarfile.data_filter`` where Python has it) and copied by us. A FIFO or other non-regular
file is refused before it is read (opening one would block).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tandem.protocol.bundle._errors import (
    BundleError,
    BundleExists,
    BundleIntegrityError,
    BundleNotFound,
)
from tandem.protocol.bundle._files import CHUNK, check_target, install_dir, remove_tree, staging_dir
from tandem.protocol.bundle._load import (
    MAX_SIGNATURE_BYTES,
    check_content,
    checked_manifest,
    verify_dir,
)
from tandem.protocol.bundle._schema import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    path_problem,
)
from tandem.protocol.bundle._sign import KeySource
from tandem.protocol.errors import MissingDependency, ResourceExhausted

__all__ = [
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "MAX_WINDOW_BYTES",
    "ArchiveHead",
    "extract_members",
    "is_bundle_archive",
    "open_regular",
    "pack",
    "read_head",
    "unpack",
    "write_head",
]

MAX_MEMBER_BYTES = 16 << 30
MAX_TOTAL_BYTES = 64 << 30
MAX_MEMBERS = 10_000
MAX_WINDOW_BYTES = 1 << 25  # zstd window a reader allocates at most (our packer uses 2 MiB)

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
            yield writer  # type: ignore[misc]
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

    @classmethod
    def fromtarfile(cls, tar):
        # tarfile ends the member list quietly where its stream runs dry instead of holding a
        # header (or the end-of-archive marker): remember it, so a cut archive says so
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.tandem_cut_short = True
            raise


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file; BundleNotFound or BundleError (never
    blocking: a FIFO is refused, not opened for a writer that never comes)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BundleNotFound(f"{path}: no such archive") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BundleError(f"{path}: is {_kind(mode)}; a bundle is a directory or an "
                              "archive file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Tracked(io.RawIOBase):
    """A readable that remembers whether its source ran dry (so a tar error can be told apart:
    the archive ended early, or it holds garbage)."""

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self._src.read(len(b))
        if not data:
            self.ended = True
            return 0
        b[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _open_tar(archive: Path) -> Iterator[tuple[tarfile.TarFile, _Tracked]]:
    raw = open_regular(archive)
    with contextlib.ExitStack() as stack:
        stack.enter_context(raw)
        magic = raw.read(4)
        raw.seek(0)
        stream: IO[bytes] = raw
        if magic == _ZSTD_MAGIC:
            reader = _zstandard().ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES) \
                .stream_reader(raw, closefd=False)
            stream = stack.enter_context(reader)
        elif magic[:2] == _GZIP_MAGIC:
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[arg-type]
        tracked = _Tracked(stream)
        try:
            try:
                tar = stack.enter_context(tarfile.open(fileobj=tracked, mode="r|",
                                                       tarinfo=_SafeTarInfo))
            except (tarfile.TarError, OSError, EOFError) as exc:
                if stream is raw:  # not even one tar header, and no compression: not ours
                    why = "empty file" if magic == b"" else exc
                    raise BundleError(f"{archive}: not a bundle archive ({why})") from None
                raise _corrupt(archive, exc, tracked) from None
            yield tar, tracked
        except _OversizedHeader as exc:
            raise BundleError(f"{archive}: corrupt archive ({exc})") from None
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation) as exc:
            raise _corrupt(archive, exc, tracked) from None
        except Exception as exc:
            if _is_zstd_error(exc):
                raise _corrupt(archive, exc, tracked) from None
            raise


def _corrupt(archive: Path, exc: BaseException, tracked: _Tracked) -> BundleError:
    """The error for an archive tar or the decompressor gave up on: truncated, or corrupt."""
    if isinstance(exc, EOFError) or (tracked.ended and isinstance(exc, tarfile.ReadError)):
        return _truncated(archive)
    kind = "zstd archive" if _is_zstd_error(exc) else "archive"
    return BundleError(f"{archive}: corrupt {kind} ({exc})")


def _truncated(archive: Path) -> BundleError:
    return BundleError(f"{archive}: truncated archive (it ends before its end-of-archive "
                       "marker; was the download or copy cut short?)")


def is_bundle_archive(path: Path | str) -> bool:
    """Whether ``path`` is a regular file holding a tar archive (zstd, gzip or plain) whose first
    member is manifest.json, as :func:`pack` writes it. Reads only up to that first member; it
    does not verify the bundle."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with _open_tar(path) as (tar, _):
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


def _name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, cap: int) -> bytes:
    if not member.isreg():
        raise _refuse(archive, member.name, f"is {_member_kind(member)}")
    if member.size > cap:
        raise _refuse(archive, member.name, f"{member.size} bytes, over {cap}")
    src = tar.extractfile(member)
    data = src.read() if src is not None else b""
    if len(data) != member.size:
        raise BundleError(f"{archive}: truncated archive (the archive ends inside "
                          f"{member.name!r})")
    return data


@dataclass(frozen=True)
class ArchiveHead:
    """What an archive says about itself before any file of it is trusted."""

    content: bytes  # manifest.json's exact bytes
    signature: bytes | None  # manifest.sig's bytes, if the archive has one
    manifest: Manifest
    signature_verified: bool
    identity: tuple[int, int, int, int]  # (device, inode, size, mtime_ns) of the archive file

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def _identity(archive: Path) -> tuple[int, int, int, int]:
    with open_regular(archive) as f:
        st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_head(archive: Path, *, public_key: KeySource | None = None) -> ArchiveHead:
    """Read ``manifest.json`` (the first member) and ``manifest.sig`` (the second, if any),
    verify the signature over the manifest's bytes when ``public_key`` is given — before the
    manifest is parsed — then parse and check it. Reads a few MiB at most; writes nothing."""
    label = str(archive)
    identity = _identity(archive)
    with _open_tar(archive) as (tar, _):
        first = tar.next()
        if first is None:
            raise BundleError(f"{label}: not a bundle archive (no members)")
        if _name(first) != MANIFEST_NAME:
            raise BundleError(f"{label}: {MANIFEST_NAME} must be the archive's first member, "
                              f"found {first.name!r} (pack bundles with tandem's pack)")
        content = _read_small(tar, first, archive, MAX_MANIFEST_BYTES)
        second = tar.next()
        signature = None
        if second is not None and _name(second) == SIGNATURE_NAME:
            signature = _read_small(tar, second, archive, MAX_SIGNATURE_BYTES)
    manifest, verified = checked_manifest(content, signature, public_key, label)
    return ArchiveHead(content, signature, manifest, verified, identity)


def extract_members(
    archive: Path,
    dest: Path,
    head: ArchiveHead,
    wanted: Iterable[str] | None = None,
    *,
    verify_digests: bool = True,
    fsync: bool = False,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> set[str]:
    """Write the listed files ``wanted`` (all of them when None) from ``archive`` into the
    existing directory ``dest``, checking every member on the way (module docstring). With
    ``wanted`` the pass stops once they are all written; without, it reads the whole archive
    (so an unlisted member anywhere is refused). Returns the paths written."""
    label = str(archive)
    if _identity(archive) != head.identity:
        raise BundleIntegrityError(f"{label}: the archive changed since it was opened")
    listed = {entry.path: entry for entry in head.manifest.files}
    full_pass = wanted is None
    todo = set(listed) if wanted is None else set(wanted)
    unknown = todo - listed.keys()
    if unknown:
        raise BundleNotFound(f"{label}: {sorted(unknown)[0]!r} is not listed in the manifest")
    need = sum(listed[p].size for p in todo)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise ResourceExhausted(f"{label}: extracting needs {need} bytes, {dest} has {free} "
                                "free")
    done: set[str] = set()
    seen: set[str] = set()
    total = 0
    data_filter = getattr(tarfile, "data_filter", None)
    with _open_tar(archive) as (tar, tracked):
        count = 0
        while full_pass or done != todo:
            member = tar.next()
            if member is None:
                break
            count += 1
            if count > max_members:
                raise _refuse(archive, member.name, f"more than {max_members} members")
            name = _name(member)
            if member.isreg():
                total += member.size
                if total > max_total_bytes:
                    raise _refuse(archive, member.name, f"archive over {max_total_bytes} bytes")
            if count == 1:  # read_head checked it; it must still be the same bytes
                if _read_small(tar, member, archive, MAX_MANIFEST_BYTES) != head.content:
                    raise BundleIntegrityError(f"{label}: the archive changed since it was "
                                               "opened")
                seen.add(MANIFEST_NAME)
                continue
            if count == 2 and name == SIGNATURE_NAME and head.signature is not None:
                if _read_small(tar, member, archive, MAX_SIGNATURE_BYTES) != head.signature:
                    raise BundleIntegrityError(f"{label}: the archive changed since it was "
                                               "opened")
                seen.add(SIGNATURE_NAME)
                continue
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
            if member.isdir():
                continue
            if member.size > max_member_bytes:
                raise _refuse(archive, member.name, f"{member.size} bytes, over {max_member_bytes}")
            entry = listed.get(name)
            if entry is None:
                raise BundleIntegrityError(
                    f"{label}: {name}: file is not listed in the manifest; refusing the archive")
            if member.size != entry.size:
                raise _refuse(archive, member.name,
                              f"{member.size} bytes, the manifest lists {entry.size}")
            if name not in todo:
                continue  # not asked for: tarfile skips its data, nothing is written
            _write_member(tar, member, archive, dest, name, entry, verify_digests, fsync)
            done.add(name)
        cut_short = getattr(tar, "tandem_cut_short", False)
        if full_pass and not cut_short:
            _drain(archive, tracked)
    if cut_short and (full_pass or todo - done):
        raise _truncated(archive)
    missing = todo - done
    if missing:
        raise BundleNotFound(f"{label}: {sorted(missing)[0]}: listed in the manifest but missing "
                             "from the archive")
    return done


_MAX_TRAILER = 1 << 20


def _drain(archive: Path, stream: _Tracked) -> None:
    """Read what follows the tar's end marker (its padding), so the decompressor checks its own
    framing too (gzip's CRC and length): a cut trailer is a truncated archive."""
    left = _MAX_TRAILER
    while chunk := stream.read(min(left, CHUNK)):
        left -= len(chunk)
        if left <= 0:
            raise BundleIntegrityError(f"{archive}: over {_MAX_TRAILER} bytes after the end of "
                                       "the tar archive; refusing the archive")


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, dest: Path,
                  name: str, entry, verify_digests: bool, fsync: bool) -> None:
    if "/" in name:
        _mkdirs(archive, member.name, dest, name.rsplit("/", 1)[0])
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - isreg() members always have data
        raise _refuse(archive, member.name, "has no data")
    target = dest / name
    try:
        out = open(target, "xb")  # noqa: SIM115
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise _refuse(archive, member.name, "clashes with another member") from None
    digest = hashlib.sha256()
    written = 0
    try:
        with out:
            while written < entry.size and (chunk := src.read(min(CHUNK, entry.size - written))):
                written += len(chunk)
                digest.update(chunk)
                out.write(chunk)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        if written != entry.size:
            raise BundleError(f"{archive}: truncated archive (the archive ends inside "
                              f"{member.name!r})")
        check_content(str(archive), entry, written,
                      (lambda: digest.hexdigest()) if verify_digests else None)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _mkdirs(archive: Path, member: str, dest: Path, rel_dir: str) -> None:
    path = dest
    for segment in rel_dir.split("/"):
        path = path / segment
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise _refuse(archive, member, "clashes with another member")
        path.mkdir(exist_ok=True)


def write_head(dest: Path, head: ArchiveHead, *, fsync: bool = False) -> None:
    """Write manifest.json (and manifest.sig) of ``head`` into ``dest``."""
    for name, data in ((MANIFEST_NAME, head.content), (SIGNATURE_NAME, head.signature)):
        if data is None:
            continue
        with open(dest / name, "xb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def unpack(
    archive_path: Path | str,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
    verify: bool = True,
    public_key: KeySource | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Extract an archive to the bundle directory ``out_dir``, atomically.

    The manifest is read first (and, with ``public_key``, its signature verified) before
    anything is written; unlisted, oversized or unsafe members (``..``, absolute paths, links,
    devices) raise :class:`BundleIntegrityError`; with ``verify`` each file's sha256 is checked
    as it streams, and the result is checked as a bundle directory before it is renamed into
    place. An existing ``out_dir`` is refused unless ``overwrite``.
    """
    archive_path, out_dir = Path(archive_path), Path(out_dir).absolute()
    check_target(out_dir, overwrite)
    head = read_head(archive_path, public_key=public_key)
    staged = staging_dir(out_dir)
    try:
        write_head(staged, head, fsync=True)
        extract_members(
            archive_path, staged, head, verify_digests=verify, fsync=True,
            max_member_bytes=max_member_bytes, max_total_bytes=max_total_bytes,
            max_members=max_members)
        if verify:
            verify_dir(staged, label=str(archive_path), verify_digests=False)
        install_dir(staged, out_dir, overwrite)
    except BaseException:
        remove_tree(staged)
        raise
    return out_dir
