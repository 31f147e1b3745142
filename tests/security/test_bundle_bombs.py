"""Bundle attacks replayed: archive bombs (peak RSS and bytes written measured in a fresh
process), manifest JSON bombs, a FIFO handed to ``tandem inspect``, a process killed while it
held an extracted bundle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from tandem.protocol.bundle import (
    BundleWriter,
    CutSpec,
    Manifest,
    TensorSpec,
    Verification,
    generate_keypair,
    pack,
)
from tests.security.test_wire_bombs import measure

MiB = 1 << 20
GiB = 1 << 30


def _manifest() -> Manifest:
    x = TensorSpec(name="x", dtype="float32", shape=(1, 4))
    return Manifest(model_name="m", model_version="1", source_digest="ab" * 32,
                    created_at="2025-01-02T03:04:05Z", inputs=(x,), outputs=(x,),
                    cuts=(CutSpec(id=0, position=0, frontier=(x,), frontier_bytes=16,
                                  head_flops=0, tail_flops=1, head_part=None,
                                  tail_part="parts/full.onnx",
                                  verification=Verification(samples=1, passed=True)),))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "k.pem", d / "k.pub")
    return {"priv": d / "k.pem", "pub": d / "k.pub"}


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory, keys) -> Path:
    out = tmp_path_factory.mktemp("src") / "b"
    with BundleWriter(out) as w:
        w.add_file("parts/full.onnx", b"model bytes")
        w.finish(_manifest(), sign_key=keys["priv"])
    return out


def _member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _zstd_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A .tar.zst whose members are given bytes, or that many zero bytes (streamed, so a 4 GiB
    member costs ~130 KB of archive and no memory here)."""
    zeros = bytes(4 * MiB)
    with open(path, "wb") as raw, \
            zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as out:
        for name, data in members:
            size = data if isinstance(data, int) else len(data)
            out.write(_member(name, size))
            if isinstance(data, int):
                for _ in range(data // len(zeros)):
                    out.write(zeros)
                out.write(bytes(data % len(zeros)))
            else:
                out.write(data)
            out.write(bytes(-size % 512))
        out.write(bytes(1024))
    return path


@pytest.fixture(scope="module")
def archive_bomb(tmp_path_factory, signed_bundle) -> Path:
    """The review's bomb: a valid signed manifest, then an unlisted 4 GiB member."""
    d = tmp_path_factory.mktemp("bomb")
    members: list[tuple[str, bytes | int]] = [
        ("manifest.json", (signed_bundle / "manifest.json").read_bytes()),
        ("manifest.sig", (signed_bundle / "manifest.sig").read_bytes()),
        ("parts/huge.bin", 4 * GiB),
        ("parts/full.onnx", b"model bytes"),
    ]
    return _zstd_tar(d / "bomb.tar.zst", members)


def _load(archive: Path, tmpdir: Path, **kwargs) -> dict:
    setup = f"""
        import tempfile
        from pathlib import Path
        from tandem.protocol.bundle import load_bundle, open_bundle, unpack
        tempfile.tempdir = {str(tmpdir)!r}
        archive = Path({str(archive)!r})
    """
    call = kwargs.pop("call", "load_bundle(archive)")
    return measure(setup, call, **kwargs)


def _leftover_dirs(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir())


def test_an_unlisted_4_gib_member_is_refused_before_a_byte_of_it_is_written(
        archive_bomb: Path, tmp_path: Path, keys):
    assert archive_bomb.stat().st_size < 256 * 1024
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    for call in ("load_bundle(archive)", f"load_bundle(archive, public_key={str(keys['pub'])!r})",
                 f"unpack(archive, Path({str(tmp_path / 'out')!r}))"):
        result = _load(archive_bomb, tmpdir, call=call, timeout_s=60)
        assert result["error"][0] == "BundleIntegrityError", result
        assert "huge.bin: file is not listed" in result["error"][1]
        assert result["written"] < MiB, result  # the manifest, the signature: nothing else
        assert result["peak_growth"] < 64 * MiB, result
    assert _leftover_dirs(tmpdir) == [] and not (tmp_path / "out").exists()


def test_a_listed_member_cannot_grow_past_its_listed_size(tmp_path: Path, signed_bundle, keys):
    archive = _zstd_tar(tmp_path / "grown.tar.zst", [
        ("manifest.json", (signed_bundle / "manifest.json").read_bytes()),
        ("manifest.sig", (signed_bundle / "manifest.sig").read_bytes()),
        ("parts/full.onnx", 2 * GiB),  # listed with 11 bytes
    ])
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = _load(archive, tmpdir, call=f"load_bundle(archive, public_key={str(keys['pub'])!r})")
    assert result["error"][0] == "BundleIntegrityError", result
    assert "the manifest lists 11" in result["error"][1]
    assert result["written"] < MiB and result["peak_growth"] < 64 * MiB, result
    assert _leftover_dirs(tmpdir) == []


def test_an_unsigned_archive_is_refused_before_extraction_when_a_key_is_set(
        tmp_path: Path, keys):
    src = tmp_path / "evil"
    with BundleWriter(src) as w:
        w.add_file("parts/full.onnx", b"model bytes")
        w.finish(_manifest())  # unsigned: anyone can list anything here
    archive = _zstd_tar(tmp_path / "unsigned.tar.zst", [
        ("manifest.json", (src / "manifest.json").read_bytes()),
        ("parts/full.onnx", b"model bytes"),
    ])
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = _load(archive, tmpdir, call=f"open_bundle(archive, public_key={str(keys['pub'])!r})")
    assert result["error"][0] == "BundleIntegrityError" and "unsigned" in result["error"][1]
    assert result["written"] == 0, result
    assert _leftover_dirs(tmpdir) == []


def test_a_manifest_json_bomb_in_an_archive_costs_nothing(tmp_path: Path):
    # the review's bomb: a 6 KB archive whose manifest is 60 MiB of {}
    archive = _zstd_tar(tmp_path / "json.tar.zst", [("manifest.json", b"[" + b"{}," * (20 * MiB)
                                                     + b"{}]")])
    assert archive.stat().st_size < 64 * 1024
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = _load(archive, tmpdir)
    assert result["error"][0] == "BundleIntegrityError" and "over 4194304" in result["error"][1]
    assert result["peak_growth"] < 16 * MiB, result
    # and one inside the byte limit: refused by its element count, before it is parsed
    small = _zstd_tar(tmp_path / "json2.tar.zst", [("manifest.json", b"[" + b"{}," * (MiB + 1)
                                                    + b"{}]")])
    result = _load(small, tmpdir)
    assert result["error"][0] == "ManifestError" and "JSON elements" in result["error"][1]
    assert result["peak_growth"] < 32 * MiB, result
    assert _leftover_dirs(tmpdir) == []


def test_a_manifest_json_bomb_in_a_directory_costs_nothing(tmp_path: Path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_bytes(b"[" + b"{}," * (20 * MiB) + b"{}]")
    setup = f"""
        from tandem.protocol.bundle import load_bundle
        path = {str(bundle)!r}
    """
    result = measure(setup, "load_bundle(path)")
    assert result["error"][0] == "BundleError" and "larger than" in result["error"][1]
    assert result["peak_growth"] < 8 * MiB, result


def _tandem() -> str:
    return str(Path(sys.executable).parent / "tandem")


def test_tandem_inspect_on_a_fifo_fails_at_once_and_leaves_nothing(tmp_path: Path):
    fifo = tmp_path / "bundle.tar.zst"
    os.mkfifo(fifo)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    done = subprocess.run([_tandem(), "inspect", str(fifo)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: {fifo}: is a FIFO; a bundle is a directory or an archive file"]
    assert _leftover_dirs(tmpdir) == []


def test_a_killed_reader_leaves_a_temp_dir_that_the_next_one_removes(tmp_path: Path,
                                                                     signed_bundle):
    archive = pack(signed_bundle, tmp_path / "b.tar.zst")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, tempfile, time\n"
         f"tempfile.tempdir = {str(tmpdir)!r}\n"
         "from tandem.protocol.bundle import open_bundle\n"
         f"b = open_bundle({str(archive)!r})\n"
         "b.path_of('parts/full.onnx')\n"
         "print(b.root, flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        root = Path(child.stdout.readline().strip())
        assert root.is_dir() and root.parent == tmpdir
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    assert root.exists()  # SIGKILL: nothing could clean up...
    done = subprocess.run([_tandem(), "inspect", str(archive)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert done.returncode == 0, done.stderr
    assert not root.exists()  # ...the next reader did
    assert _leftover_dirs(tmpdir) == []
