"""``tandem compile / inspect / keygen / example`` as a user runs them: one-line errors, exit
codes, no traceback, and no half-written output."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import onnx
import pytest

from tandem.cli import main
from tandem.compiler.cli import _human_bytes
from tests._support.models import cnn_chain, residual, save, with_external_data
from tests._support.terminal import TANDEM, into_head, on_terminal, piped, plain_env, stdout_closed


def _tandem(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]


def test_compile_then_inspect(tmp_path, capsys):
    src = save(residual(), tmp_path / "m.onnx")
    rc, out, _ = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--json")
    assert rc == 0
    summary = json.loads(out)
    assert summary["cuts"][0]["id"] == 0 and summary["cuts"][-1]["bytes"]["raw"] == 0
    rc, out, _ = _tandem(capsys, "inspect", tmp_path / "b", "--json")
    assert rc == 0
    assert json.loads(out)["source_digest"] == summary["source_digest"]
    rc, out, _ = _tandem(capsys, "inspect", tmp_path / "b")
    assert rc == 0 and "unsigned" in out and "cuts" in out


def test_bundle_version_orders_compiles_so_a_device_refuses_the_older(tmp_path, capsys):
    from tandem.protocol.bundle import BundleRollback, check_not_older, load_bundle

    src = save(residual(), tmp_path / "m.onnx")
    rc, _, _ = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "old",
                       "--bundle-version", "7")
    assert rc == 0
    rc, _, _ = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o",
                       tmp_path / "new")  # default: the UTC time
    assert rc == 0
    old = load_bundle(tmp_path / "old").manifest
    new = load_bundle(tmp_path / "new").manifest
    assert old.bundle_version == 7 and new.bundle_version > 1_700_000_000
    check_not_older(old, new)
    with pytest.raises(BundleRollback):
        check_not_older(new, old)
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o",
                         tmp_path / "neg", "--bundle-version", "-1")
    assert rc == 2 and "Traceback" not in err


def test_signed_archive_round_trip_and_tampering(tmp_path, capsys):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    assert _tandem(capsys, "keygen", priv, pub)[0] == 0
    archive = tmp_path / "m.tar.zst"
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", archive,
                         "--sign-key", priv)
    assert rc == 0, err
    rc, out, _ = _tandem(capsys, "inspect", archive, "--public-key", pub)
    assert rc == 0 and "signature verified" in out

    other_priv, other_pub = tmp_path / "o.pem", tmp_path / "o.pub"
    _tandem(capsys, "keygen", other_priv, other_pub)
    rc, _, err = _tandem(capsys, "inspect", archive, "--public-key", other_pub)
    _assert_one_line_error(rc, err, "signature")

    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "d",
                         "--sign-key", priv)
    assert rc == 0, err
    part = tmp_path / "d" / "parts" / "full.onnx"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rc, _, err = _tandem(capsys, "inspect", tmp_path / "d", "--public-key", pub)
    _assert_one_line_error(rc, err, "parts/full.onnx")


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    rc, _, err = _tandem(capsys, "compile", bad, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "bad.onnx")
    assert not (tmp_path / "out").exists()


def test_missing_external_data(tmp_path, capsys):
    src = with_external_data(tmp_path / "src")
    (src.parent / "model.onnx.data").unlink()
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "model.onnx.data")
    assert not (tmp_path / "out").exists()


def test_op_the_target_cannot_run(tmp_path, capsys):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [h.make_node("Relu", ["x"], ["a"]),
             h.make_node("FancyOp", ["a"], ["b"], domain="com.example"),
             h.make_node("Relu", ["b"], ["y"])]
    model = h.make_model(ir_version=8, graph=h.make_graph(nodes, "g", [x], [y]),
                         opset_imports=[
        h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    src = save(model, tmp_path / "custom.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "FancyOp")
    assert not (tmp_path / "out").exists()


def test_model_with_no_valid_cut(tmp_path, capsys):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = h.make_model(ir_version=8, graph=graph,
                         opset_imports=[h.make_opsetid("", 17)])
    src = save(model, tmp_path / "tiny.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "no valid split point")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["jetson-orin-nano-16gb", "tpu"])
def test_unknown_target(tmp_path, capsys, target):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", target, "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, f"unknown target {target!r}")
    assert not (tmp_path / "out").exists()


def test_missing_model_file(tmp_path, capsys):
    rc, _, err = _tandem(capsys, "compile", tmp_path / "nope.onnx", "-t", "onnxruntime",
                         "-o", tmp_path / "out")
    _assert_one_line_error(rc, err, "nope.onnx")


def test_inspect_of_a_missing_bundle(tmp_path, capsys):
    rc, _, err = _tandem(capsys, "inspect", tmp_path / "nothing")
    _assert_one_line_error(rc, err, "nothing")


def test_example_writes_a_valid_model(tmp_path, capsys):
    rc, _, _ = _tandem(capsys, "example", "unet", tmp_path / "u.onnx")
    assert rc == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "u.onnx")))


@pytest.mark.parametrize("part, total, shown", [
    (0, 10, "0%"), (10, 10, "100%"), (5, 10, "50%"), (999, 1000, ">99%"), (1, 1000, "<1%"),
    (3, 0, "-"),
])
def test_flop_share_never_rounds_a_split_to_all_or_nothing(part, total, shown):
    from tandem.compiler.cli import _share

    assert _share(part, total) == shown


def test_cloud_only_and_all_local_cuts_show_exactly_0_and_100_percent(tmp_path):
    # The TorchScript ViT counts 4 FLOPs outside any cut's head + tail: shares of the model's
    # total made its all-local cut ">99%".
    src = ROOT / "tests" / "compiler" / "data" / "vitish_torchscript.onnx"
    proc = piped(["compile", src, "-t", "onnxruntime", "-o", tmp_path / "b", "--json"])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    first, last = summary["cuts"][0], summary["cuts"][-1]
    assert first["head_flops"] == 0 and last["tail_flops"] == 0
    assert last["head_flops"] != summary["total_flops"]  # the case that used to show >99%
    for args in (["inspect", tmp_path / "b"],
                 ["compile", src, "-t", "onnxruntime", "-o", tmp_path / "c"]):
        out = piped(args).stdout
        header = _split_row(next(ln for ln in out.splitlines() if ln.startswith("cut ")))
        head, tail = header.index("head"), header.index("tail")
        rows = {r[0]: r for r in _table_rows(out, "cut")}
        assert [rows[str(first["id"])][i] for i in (head, tail)] == ["0%", "100%"]
        assert [rows[str(last["id"])][i] for i in (head, tail)] == ["100%", "0%"]


def test_one_truth_for_encodings(tmp_path):
    from tandem.protocol.bundle import load_bundle

    src = save(cnn_chain(), tmp_path / "m.onnx")
    proc = piped(["compile", src, "-t", "onnxruntime", "-o", tmp_path / "b", "--json"])
    summary = json.loads(proc.stdout)
    with load_bundle(tmp_path / "b") as b:
        allowed = {c.id: list(b.manifest.allowed_encodings(c.id)) for c in b.manifest.cuts}
    assert {c["id"]: c["encodings"] for c in summary["cuts"]} == allowed
    assert all(enc[0] == "raw" for enc in allowed.values())  # raw: always, for a passed cut
    shown = {int(r[0]): r[6].split(",") for r in _table_rows(
        piped(["inspect", tmp_path / "b"]).stdout, "cut")}
    assert shown == allowed


# --- helpers for the tests below ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content (to show nothing was deleted or changed)."""
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """Rows of the plain (piped) table whose header line starts with ``first_header``: the
    lines up to the next blank one."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:1] == [first_header])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(_split_row(line))
    return rows


def _split_row(line: str) -> list[str]:
    """Cells of a plain table row, split on runs of 2+ spaces (cells hold single spaces)."""
    return re.split(r"\s{2,}", line.strip())


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the compile starts loading the model (inputs must be checked first)."""
    import tandem.compiler._pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the compile started before every input was checked")

    monkeypatch.setattr(pipeline, "load_model", refuse)


# --- item 1: --overwrite replaces only a bundle ------------------------------------------------


@pytest.fixture
def compiled(tmp_path, capsys):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b")
    assert rc == 0, err
    return src, tmp_path / "b"


def test_overwrite_replaces_a_bundle_directory(tmp_path, capsys, compiled):
    src, bundle = compiled
    before = (bundle / "manifest.json").read_bytes()
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", bundle,
                         "--overwrite", "--version", "2")
    assert rc == 0, err
    assert (bundle / "manifest.json").read_bytes() != before
    assert json.loads((bundle / "manifest.json").read_text())["model_version"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "m.onnx"]  # nothing left over


def test_overwrite_replaces_a_bundle_archive_and_an_empty_directory(tmp_path, capsys, compiled):
    src, _ = compiled
    archive = tmp_path / "b.tar.zst"
    assert _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", archive)[0] == 0
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", archive,
                         "--overwrite", "--version", "3")
    assert rc == 0, err
    assert _tandem(capsys, "inspect", archive, "--json")[1].count('"model_version": "3"') == 1
    (tmp_path / "empty").mkdir()
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "empty",
                         "--overwrite")
    assert rc == 0, err
    assert (tmp_path / "empty" / "manifest.json").is_file()


def _refused(capsys, tmp_path, args, needle, watch: Path | None = None):
    watch = watch or tmp_path
    before = _tree(watch)
    rc, _, err = _tandem(capsys, *args)
    _assert_one_line_error(rc, err, needle)
    assert rc == 1
    assert _tree(watch) == before  # nothing deleted, nothing changed
    assert not [p for p in watch.rglob(".*tmp-*")]  # and no staging left behind
    return err


def test_overwrite_never_replaces_what_is_not_a_bundle(tmp_path, capsys, compiled):
    src, _ = compiled
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (tmp_path / "fake.tar.zst").write_bytes(b"not an archive at all")
    for out, needle in [("notes.txt", "it is not a Tandem bundle"),
                        ("photos", "it is not a Tandem bundle"),
                        ("fake.tar.zst", "it is not a Tandem bundle archive")]:
        _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", tmp_path / out,
                                    "--overwrite"], needle)


def test_overwrite_never_replaces_the_current_directory_or_its_parents(
        tmp_path, capsys, compiled, monkeypatch):
    src, bundle = compiled
    (bundle / "parts" / "keep.txt").write_text("x")  # the tree must stay exactly as it is
    monkeypatch.chdir(bundle)  # even when the current directory is itself a bundle
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", ".", "--overwrite"],
             "it is the current directory")
    monkeypatch.chdir(bundle / "parts")
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", "..", "--overwrite"],
             "it is a parent of the current directory")
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", "../parts/..",
                                "--overwrite"], "it is a parent of the current directory")
    (tmp_path / "s").mkdir()
    monkeypatch.chdir(tmp_path / "s")  # the case: an empty directory is no exception
    _refused(capsys, tmp_path, ["compile", "../m.onnx", "-t", "onnxruntime", "-o", ".",
                                "--overwrite"], "it is the current directory")


def test_overwrite_never_replaces_a_directory_holding_an_input(tmp_path, capsys, compiled):
    src, bundle = compiled
    d = tmp_path / "d"
    d.mkdir()
    model = save(cnn_chain(), d / "m.onnx")
    (d / "other.txt").write_text("beside the model")
    _refused(capsys, tmp_path, ["compile", model, "-t", "onnxruntime", "-o", d, "--overwrite"],
             "it holds the input")
    # a bundle that holds an input (here the signing key) is not replaced either
    assert _tandem(capsys, "keygen", bundle / "k.pem", tmp_path / "k.pub")[0] == 0
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", bundle, "--overwrite",
                                "--sign-key", bundle / "k.pem"], "it holds the input")


def test_overwrite_refuses_a_symbolic_link(tmp_path, capsys, compiled):
    src, bundle = compiled
    (tmp_path / "link").symlink_to(bundle)
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", tmp_path / "link",
                                "--overwrite"], "symbolic link")


# --- item 2: messages and exit codes -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "directory", "bundle", "archive"])
def test_an_existing_output_is_one_rule_whatever_its_kind(tmp_path, capsys, compiled, kind):
    src, bundle = compiled
    out = {"file": tmp_path / "existing.txt", "directory": tmp_path / "dir",
           "bundle": bundle, "archive": tmp_path / "x.tar.zst"}[kind]
    if kind == "file":
        out.write_text("x")
    elif kind == "directory":
        out.mkdir()
        (out / "a").write_text("a")
    elif kind == "archive":
        assert _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", out)[0] == 0
    err = _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", out],
                   "already exists; pass --overwrite to replace it")
    assert "Usage" not in err


def test_an_archive_name_other_than_tar_is_refused(tmp_path, capsys, compiled):
    src, _ = compiled
    for name in ("y.zip", "y.tar.xz", "y.7z", "y.onnx"):
        _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", tmp_path / name],
                 "a bundle is written as a directory")
    assert not (tmp_path / "y.zip").exists()


def test_archive_suffix_decides_the_compression(tmp_path, capsys, compiled):
    src, _ = compiled
    for name, magic in (("z.tar.zst", b"\x28\xb5\x2f\xfd"), ("g.tar.gz", b"\x1f\x8b")):
        assert _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / name)[0] == 0
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic
    assert _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "p.tar")[0] == 0
    assert (tmp_path / "p.tar").read_bytes()[257:262] == b"ustar"


def test_a_missing_output_directory_is_said_before_work(tmp_path, capsys, compiled, no_work):
    src, _ = compiled
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o",
                                tmp_path / "nowhere" / "b"], "does not exist (create it first)")


@pytest.mark.parametrize("option, value, needle", [
    ("--sign-key", "missing.pem", "--sign-key"),
    ("--sign-key", "notes.txt", "not a readable PEM private key"),
    ("--sign-key", "k.pub", "not a readable PEM private key"),
    ("--samples", "missing.npz", "--samples"),
    ("--samples", "notes.txt", "not an .npz file"),
    ("--samples", ".", "is a directory"),
    ("--timing-cache", "nowhere/t.cache", "does not exist"),
    ("--engine-cache", "notes.txt", "is not a directory"),
])
def test_every_input_is_checked_before_any_work(tmp_path, capsys, compiled, no_work, option,
                                                value, needle):
    src, _ = compiled
    (tmp_path / "notes.txt").write_text("not a key")
    assert _tandem(capsys, "keygen", tmp_path / "k.pem", tmp_path / "k.pub")[0] == 0
    _refused(capsys, tmp_path, ["compile", src, "-t", "onnxruntime", "-o", tmp_path / "out",
                                option, tmp_path / value], needle)


def test_a_missing_model_is_checked_before_any_work(tmp_path, capsys, no_work):
    _refused(capsys, tmp_path, ["compile", tmp_path / "nope.onnx", "-t", "onnxruntime", "-o",
                                tmp_path / "out"], "no model file at")


def test_a_read_only_output_directory_is_the_users_error(tmp_path):
    """Exit 1 in plain words (it was ``internal error: OSError … (exit 70)``), on a real
    read-only file system: a bind mount remounted read-only in a private mount namespace."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to make a read-only mount")
    src = save(cnn_chain(), tmp_path / "m.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 99; "
              f"exec {TANDEM} compile {src} -t onnxruntime -o {ro}/b")
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True,
                          text=True, env=plain_env(), timeout=120)
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()}")
    _assert_one_line_error(proc.returncode, proc.stderr, "Read-only file system")
    assert proc.returncode == 1 and "internal error" not in proc.stderr
    assert list(ro.iterdir()) == []


def test_os_refusals_while_writing_are_said_in_plain_words(tmp_path, capsys, monkeypatch):
    """A refusal after the up-front checks (a disk that fills, a permission that changes)."""
    import errno

    import tandem.protocol.bundle._files as files

    src = save(cnn_chain(), tmp_path / "m.onnx")

    def full(final):
        raise OSError(errno.ENOSPC, "No space left on device", str(final.parent / ".b.tmp-x"))

    monkeypatch.setattr(files, "staging_dir", full)
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b")
    _assert_one_line_error(rc, err, f"cannot write {tmp_path}: No space left on device")
    assert rc == 1


def test_dla_core_on_a_profile_without_dla_says_so(tmp_path, capsys, no_work):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "jetson-orin-nano-8gb", "-o",
                         tmp_path / "b", "--dla-core", "0")
    _assert_one_line_error(rc, err, "--dla-core 0: jetson-orin-nano-8gb has no DLA")
    assert "jetson-agx-orin-64gb" in err  # and which profiles have one
    rc, _, err = _tandem(capsys, "compile", src, "-t", "jetson-orin-nx-8gb", "-o",
                         tmp_path / "b", "--dla-core", "1")
    _assert_one_line_error(rc, err, "jetson-orin-nx-8gb has 1 DLA core (0-0)")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--dla-core", "0")
    _assert_one_line_error(rc, err, "no TensorRT target was given")


def test_dla_core_applies_where_it_can_and_warns_for_the_rest(tmp_path, capsys):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "jetson-orin-nano-8gb", "-t",
                         "jetson-agx-orin-64gb", "-o", tmp_path / "b", "--dla-core", "0")
    assert rc == 0, err
    assert "warning: --dla-core 0 is used for jetson-agx-orin-64gb only: " \
           "jetson-orin-nano-8gb has no DLA" in err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    dla = {a["device_profile"]: a["engine_recipe"]["dla_core"] for a in manifest["artifacts"]
           if a["target"] == "tensorrt"}
    assert dla == {"jetson-orin-nano-8gb": None, "jetson-agx-orin-64gb": 0}


def test_engines_build_without_tensorrt_gives_a_command_that_works_here(tmp_path, capsys,
                                                                         no_work):
    from tandem.protocol.lazy import install_command

    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "compile", src, "-t", "cloud-t4", "-o", tmp_path / "b",
                         "--engines", "build")
    _assert_one_line_error(rc, err, "tensorrt is not installed")
    assert f"cd {ROOT} && pip install -e '.[tensorrt]'" in err  # this test runs from a checkout
    assert install_command("tensorrt") in err
    assert "JetPack" in err and "tandem-rt[tensorrt]" not in err


def test_keygen_on_an_existing_key_names_the_flag(tmp_path, capsys):
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    assert _tandem(capsys, "keygen", priv, pub)[0] == 0
    _refused(capsys, tmp_path, ["keygen", priv, pub], "pass --overwrite to replace it")
    assert "overwrite=True" not in capsys.readouterr().err
    old = priv.read_bytes()
    assert _tandem(capsys, "keygen", priv, pub, "--overwrite")[0] == 0
    assert priv.read_bytes() != old
    (tmp_path / "notes.txt").write_text("not a key")
    _refused(capsys, tmp_path, ["keygen", tmp_path / "notes.txt", pub, "--overwrite"],
             "it is not a PEM key file")
    _refused(capsys, tmp_path, ["keygen", priv, priv, "--overwrite"], "two different files")


def test_example_refuses_to_overwrite_what_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("precious")
    _refused(capsys, tmp_path, ["example", "cnn", tmp_path / "notes.txt"], "--overwrite")
    _refused(capsys, tmp_path, ["example", "cnn", tmp_path / "notes.txt", "--overwrite"],
             "it is not an ONNX model")
    assert _tandem(capsys, "example", "cnn", tmp_path / "sub" / "m.onnx")[0] == 0
    assert _tandem(capsys, "example", "unet", tmp_path / "sub" / "m.onnx", "--overwrite")[0] == 0
    assert len(onnx.load(str(tmp_path / "sub" / "m.onnx")).graph.node) > 20  # the unet


def test_inspect_of_an_onnx_model_says_what_it_is(tmp_path, capsys):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, _, err = _tandem(capsys, "inspect", src)
    _assert_one_line_error(rc, err, "is an ONNX model, not a bundle")
    assert "tandem compile" in err and "checksum" not in err
    renamed = tmp_path / "model.bin"  # known by its content too
    renamed.write_bytes(src.read_bytes())
    rc, _, err = _tandem(capsys, "inspect", renamed)
    _assert_one_line_error(rc, err, "is an ONNX model, not a bundle")
    (tmp_path / "notes.txt").write_text("hello")
    rc, _, err = _tandem(capsys, "inspect", tmp_path / "notes.txt")
    _assert_one_line_error(rc, err, "is not a Tandem bundle")
    rc, _, err = _tandem(capsys, "inspect", tmp_path, "--public-key", tmp_path / "none.pub")
    _assert_one_line_error(rc, err, "--public-key")


# --- item 3: tables at 80 columns and in pipes -------------------------------------------------


def _long_names(model):
    """The same model with torch-exporter-length intermediate tensor names."""
    graph = model.graph
    keep = {o.name for o in graph.output} | {i.name for i in graph.input}
    renames = {}
    for i, node in enumerate(graph.node):
        for j, out in enumerate(node.output):
            if out not in keep:
                renames[out] = f"/encoder/layers.{i}/self_attention/output_projection/" \
                               f"{node.op_type}_output_{j}"
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for vi in graph.value_info:
        vi.name = renames.get(vi.name, vi.name)
    return model


@pytest.fixture
def long_named(tmp_path):
    src = save(_long_names(residual()), tmp_path / "long.onnx")
    proc = piped(["compile", src, "-t", "onnxruntime", "-t", "jetson-orin-nano-8gb",
                  "-o", tmp_path / "b", "--json"])
    assert proc.returncode == 0, proc.stderr
    return src, tmp_path / "b", json.loads(proc.stdout)


def test_piped_tables_lose_nothing(tmp_path, long_named):
    src, bundle, summary = long_named
    names = {n for c in summary["cuts"] for n in c["frontier"]}
    assert max(len(n) for n in names) > 60
    for args in (["inspect", bundle],
                 ["compile", src, "-t", "onnxruntime", "-t", "jetson-orin-nano-8gb", "-o",
                  tmp_path / "again"]):
        proc = piped(args)
        assert proc.returncode == 0, proc.stderr
        assert "…" not in proc.stdout and "..." not in proc.stdout
        for name in names:
            assert name in proc.stdout  # every tensor name in full
        rows = _table_rows(proc.stdout, "cut")
        header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("cut "))
        assert all(len(r) == len(_split_row(header)) for r in rows), rows
    out = piped(["inspect", bundle]).stdout
    for a in summary["artifacts"]:  # the widest table: every builder string in full
        assert a["builder"] in out and a["path"] in out


def test_tables_fit_80_columns_on_a_terminal(tmp_path, long_named):
    from rich.cells import cell_len

    src, bundle, summary = long_named
    for args in (["inspect", bundle],
                 ["compile", src, "-t", "onnxruntime", "-o", tmp_path / "c"]):
        rc, shown, err = on_terminal(args, columns=80)
        assert rc == 0, shown + err
        lines = shown.splitlines()
        assert max(cell_len(ln) for ln in lines) <= 80, "\n".join(lines)
        assert "long names shortened in the middle" in " ".join(shown.split())
        rows = [ln for ln in lines if re.match(r"\s*\d+\s", ln)]
        assert len(rows) >= len(summary["cuts"])
        for cut in summary["cuts"]:  # numbers are never cut: every byte count in full
            row = next(ln for ln in rows if ln.split()[0] == str(cut["id"]))
            assert _human_bytes(cut["bytes"]["raw"]) in row
            for name in (n for n in cut["frontier"] if len(n) > 32):
                # a long name keeps its start and its end
                assert name[:8] in row and name[-8:] in row and "…" in row
        for ln in rows:  # the last column is intact
            assert re.search(r"  (raw(,fp16)?(,int8)?|-)\s*$", ln), ln
    rc, shown, _ = on_terminal(["inspect", bundle], columns=200)
    assert rc == 0 and "…" not in shown  # room enough: nothing shortened


def test_compile_at_80_columns_folds_the_least_important_columns(tmp_path):
    src = save(cnn_chain(), tmp_path / "m.onnx")
    rc, shown, err = on_terminal(["compile", src, "-t", "onnxruntime", "-o", tmp_path / "b"])
    assert rc == 0, err
    header = next(ln for ln in shown.splitlines() if ln.split()[:2] == ["cut", "frontier"])
    assert "encodings" in header and "head" in header and "fp16 bytes" not in header
    assert "left out: fp16 bytes, int8 bytes" in shown


# --- item 4: a closed stdout is a normal end ---------------------------------------------------


@pytest.mark.parametrize("args", [
    ["inspect", "{b}"], ["inspect", "{b}", "--json"], ["devices"], ["devices", "--json"],
    ["devices", "--detect"], ["--help"], ["compile", "--help"], ["--version"],
    ["compile", "{m}", "-t", "onnxruntime", "-o", "{b}", "--overwrite"],
    ["compile", "{m}", "-t", "onnxruntime", "-o", "{b}", "--overwrite", "--json"],
    ["keygen", "{d}/k.pem", "{d}/k.pub", "--overwrite"], ["example", "cnn", "{d}/e.onnx"],
])
def test_a_closed_stdout_is_a_normal_end(tmp_path, compiled, args):
    src, bundle = compiled
    argv = [a.format(b=bundle, m=src, d=tmp_path) for a in args]
    rc, err = stdout_closed(argv)
    assert (rc, err) == (0, "")


@pytest.mark.parametrize("args", [["inspect", "{b}"], ["devices"], ["--help"]])
def test_piping_into_head_is_a_normal_end(compiled, args):
    _, bundle = compiled
    rc, first, err = into_head([a.format(b=bundle) for a in args])
    assert rc == 0 and err == "" and first.strip()


def test_compile_verifies_on_the_users_samples(tmp_path, capsys):
    import numpy as np

    src = save(cnn_chain(), tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "s.npz", **{f"sample{i}/input": rng.standard_normal(
        (1, 3, 32, 32)).astype(np.float32) for i in range(3)})
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "b",
                         "--samples", tmp_path / "s.npz")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {c["verification"]["samples"] for c in manifest["cuts"]} == {3}
    np.savez(tmp_path / "wrong.npz", image=np.zeros((1, 3, 32, 32), np.float32))
    rc, _, err = _tandem(capsys, "compile", src, "-t", "onnxruntime", "-o", tmp_path / "c",
                         "--samples", tmp_path / "wrong.npz")
    _assert_one_line_error(rc, err, "wrong.npz")
    assert not (tmp_path / "c").exists()
