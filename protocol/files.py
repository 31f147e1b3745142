"""Small file helpers every package uses: atomic writes, an exclusive lock, a file's sha256.

The lock is ``fcntl.flock`` on a ``<file>.lock`` beside the file, as Polygraphy's ``LockFile``
does with ``fcntl.lockf`` (``polygraphy/util/util.py``): ten lines of standard library, so no
dependency is added for it. Where ``fcntl`` does not exist (Windows) the lock is a no-op; Tandem's
TensorRT targets are Linux.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "file_lock", "sha256_file"]


def atomic_write(path: Path, data: bytes | memoryview | str, *, mode: int | None = None) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` so readers see the old file or the whole new
    one, also after a crash: written aside, fsynced, renamed over ``path``; ``mode`` sets the
    permission bits (else those of a new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (across processes) for the block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
