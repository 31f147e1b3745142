"""Files that change with the registry, written so that a failed command changes nothing.

A command stages every file it will change *before* its transaction commits (complete, fsynced,
under a temporary name next to its final place), and installs them (``os.replace`` / one
symlink swap) only *after* the commit. If anything fails before the commit, the staged files are
deleted and neither the registry nor any file has changed.

The broker's auth files (password file, ACL, CRL) form one set: each version lives in its own
directory ``mosquitto/auth.<generation>`` and the symlink ``mosquitto/auth`` (which the broker's
configuration names) is swapped to it in one atomic ``rename``, so the broker never reads a
password file of one version with the ACL of another.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "StagedAuth",
    "StagedFile",
    "StagedRemoval",
    "atomic_write",
    "current_generation",
    "stage_auth",
    "stage_file",
    "write_new",
]

_GEN = re.compile(r"auth\.(\d+)\Z")
KEEP_GENERATIONS = 3


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``data``, fsynced, with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` at once (temporary file in the same directory)."""
    staged = stage_file(path, data, mode)
    try:
        staged.install()
    except BaseException:
        staged.discard()
        raise


class StagedFile:
    """A complete file under a temporary name; :meth:`install` renames it into place."""

    def __init__(self, tmp: Path, final: Path) -> None:
        self.tmp = tmp
        self.final = final

    def install(self) -> None:
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def stage_file(path: Path, data: bytes, mode: int = 0o644) -> StagedFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        write_new(tmp, data, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StagedFile(tmp, path)


class StagedRemoval:
    """A file to delete once the change is committed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def install(self) -> None:
        self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        pass


def current_generation(link: Path) -> int | None:
    """The generation the ``auth`` symlink points at, or None."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    m = _GEN.match(Path(target).name)
    return int(m.group(1)) if m else None


class StagedAuth:
    """A complete set of auth files in ``mosquitto/.auth.<gen>.tmp-…``."""

    def __init__(self, tmp_dir: Path, link: Path, generation: int) -> None:
        self.tmp_dir = tmp_dir
        self.link = link
        self.generation = generation

    @property
    def final_dir(self) -> Path:
        return self.link.parent / f"auth.{self.generation:08d}"

    def install(self) -> None:
        parent = self.link.parent
        final = self.final_dir
        if final.exists():  # a leftover of an interrupted install of this same generation
            shutil.rmtree(final)
        os.rename(self.tmp_dir, final)
        new_link = parent / f".auth.link-{self.generation}"
        new_link.unlink(missing_ok=True)
        os.symlink(final.name, new_link)
        os.replace(new_link, self.link)  # the atomic switch
        _fsync_dir(parent)
        self._prune(parent)

    def _prune(self, parent: Path) -> None:
        generations = sorted(
            (int(m.group(1)), p) for p in parent.iterdir() if (m := _GEN.match(p.name))
        )
        for gen, path in generations[:-KEEP_GENERATIONS]:
            if gen != self.generation:
                shutil.rmtree(path, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def stage_auth(link: Path, generation: int, files: dict[str, tuple[bytes, int]]) -> StagedAuth:
    """Write ``files`` ({name: (data, mode)}) into a new staging directory beside ``link``."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".auth.{generation:08d}.tmp-", dir=link.parent))
    try:
        os.chmod(tmp_dir, 0o755)
        for name, (data, mode) in files.items():
            write_new(tmp_dir / name, data, mode)
        _fsync_dir(tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return StagedAuth(tmp_dir, link, generation)
