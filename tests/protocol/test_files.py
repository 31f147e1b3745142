"""tandem.protocol.files: atomic writes leave the old file or the whole new one; the lock excludes
other processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from tandem.protocol.files import atomic_write, file_lock, sha256_file


def test_atomic_write_replaces_whole_and_sets_the_mode(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    atomic_write(path, b"\x00" * 10, mode=0o600)
    assert path.read_bytes() == b"\x00" * 10
    assert (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temp left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "x").write_bytes(data)
    assert sha256_file(tmp_path / "x") == hashlib.sha256(data).hexdigest()


def test_the_lock_excludes_another_process(tmp_path):
    target = tmp_path / "cache.bin"
    log = tmp_path / "log"
    child = textwrap.dedent(f"""
        import pathlib, time
        from tandem.protocol.files import file_lock
        log = pathlib.Path({str(log)!r})
        with file_lock(pathlib.Path({str(target)!r})):
            with log.open("a") as f:
                f.write("child-in\\n")
    """)
    with file_lock(target):
        proc = subprocess.Popen([sys.executable, "-c", child])
        try:
            proc.wait(timeout=1.0)  # it must block on the lock we hold
            blocked = False
        except subprocess.TimeoutExpired:
            blocked = True
        with log.open("a") as f:
            f.write("parent-out\n")
    assert proc.wait(timeout=30) == 0
    assert blocked
    assert log.read_text().splitlines() == ["parent-out", "child-in"]
