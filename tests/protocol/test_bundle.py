"""The bundle format: manifest schema, atomic writer, loader checks, signatures, archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import tandem.protocol.bundle as bundle_mod
from tandem.protocol.bundle import (
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_ELEMENTS,
    Artifact,
    BundleError,
    BundleExists,
    BundleIntegrityError,
    BundleNotFound,
    BundleRollback,
    BundleWriter,
    CutSpec,
    EncodingCheck,
    EngineRecipe,
    FileEntry,
    Manifest,
    ManifestError,
    TensorSpec,
    Verification,
    check_not_older,
    generate_keypair,
    key_fingerprint,
    load_bundle,
    open_bundle,
    pack,
    sign_bundle,
    unpack,
)
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    UnsupportedVersion,
)

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "ab" * 32

# --- helpers ----------------------------------------------------------------------------------


def _tensor(name: str = "x") -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=("batch", 3, 8, 8))


def _manifest(**overrides) -> Manifest:
    check16 = EncodingCheck(
        encoding="fp16", max_abs_err=1e-3, max_rel_err=2e-3, tolerance=1e-2, passed=True
    )
    check8 = EncodingCheck(
        encoding="int8", max_abs_err=0.5, max_rel_err=0.4, tolerance=1e-2, passed=False
    )
    verified = Verification(
        samples=8,
        max_abs_err={"y": 1e-6},
        max_rel_err={"y": 2e-6},
        passed=True,
        encodings={"fp16": check16, "int8": check8},
    )
    fields = dict(
        model_name="tiny",
        model_version="3",
        source_digest=DIGEST,
        created_at="2025-01-02T03:04:05Z",
        inputs=(_tensor("x"),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 10)),),
        cuts=(
            CutSpec(
                id=0, position=0, frontier=(_tensor("x"),), frontier_bytes=768,
                head_flops=0, tail_flops=1000, head_part=None, tail_part="parts/full.onnx",
                verification=Verification(samples=0, passed=True),
            ),
            CutSpec(
                id=1, position=4, frontier=(_tensor("h"),), frontier_bytes=768,
                head_flops=400, tail_flops=600, head_part="parts/head_1.onnx",
                tail_part="parts/tail_1.onnx", verification=verified,
            ),
        ),
        artifacts=(
            Artifact(
                part="parts/tail_1.onnx", target="onnxruntime", path="ort/tail_1.ort.onnx",
                precision="fp32", device_profile="", builder="onnxruntime 1.20 level=extended",
                extra={"opset": 17},
            ),
        ),
        tool_version="tandem 0.1.0",
        extra={"note": "test"},
    )  # fmt: skip
    fields.update(overrides)
    return Manifest(**fields)


FILES = {
    "parts/full.onnx": b"full model bytes",
    "parts/head_1.onnx": b"head bytes",
    "parts/tail_1.onnx": b"tail bytes",
    "ort/tail_1.ort.onnx": b"optimized tail",
}


def _write(out: Path, sign_key=None, **kwargs) -> Manifest:
    with BundleWriter(out, **kwargs) as writer:
        for rel, data in FILES.items():
            writer.add_file(rel, data)
        return writer.finish(_manifest(), sign_key=sign_key)


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    _write(out)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "a.pem", d / "a.pub")
    generate_keypair(d / "b.pem", d / "b.pub")
    return {"priv": d / "a.pem", "pub": d / "a.pub", "other_pub": d / "b.pub"}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- manifest schema ---------------------------------------------------------------------------

_names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=8)
_segment = st.text("abcXYZ019_-.", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_segment, min_size=1, max_size=3).map("/".join)
_floats = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _floats | _names,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=3),
    max_leaves=6,
)
_tensors = st.builds(
    TensorSpec,
    name=_names,
    dtype=st.sampled_from(sorted(bundle_mod.DTYPES)),
    shape=st.lists(st.integers(0, 4096) | _names, max_size=4).map(tuple),
)
_checks = st.sampled_from(["fp16", "int8", "q4"]).flatmap(
    lambda enc: st.builds(
        EncodingCheck, encoding=st.just(enc), max_abs_err=_floats, max_rel_err=_floats,
        tolerance=_floats, passed=st.booleans(),
    )
)  # fmt: skip
_verifications = st.builds(
    Verification,
    samples=st.integers(0, 1000),
    max_abs_err=st.dictionaries(_names, _floats, max_size=3),
    max_rel_err=st.dictionaries(_names, _floats, max_size=3),
    passed=st.booleans(),
    encodings=st.lists(_checks, max_size=3).map(lambda cs: {c.encoding: c for c in cs}),
)
_cuts = st.builds(
    CutSpec,
    id=st.integers(0, 100), position=st.integers(0, 10**6),
    frontier=st.lists(_tensors, max_size=3).map(tuple),
    frontier_bytes=st.integers(0, 2**40), head_flops=st.integers(0, 2**50),
    tail_flops=st.integers(0, 2**50), head_part=st.none() | _paths, tail_part=_paths,
    verification=_verifications,
)  # fmt: skip
_files = st.builds(
    FileEntry,
    path=_paths.map(lambda p: f"f/{p}.bin"),
    sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
    size=st.integers(0, 2**40),
)
_artifacts = st.builds(
    Artifact, part=_paths, target=_names, path=_paths, precision=_names,
    device_profile=st.just("") | _names, builder=st.text(max_size=20),
    extra=st.dictionaries(_names, _json_values, max_size=3),
)  # fmt: skip
_manifests = st.builds(
    Manifest,
    model_name=_names,
    model_version=_names,
    source_digest=st.binary(min_size=32, max_size=32).map(bytes.hex),
    created_at=st.datetimes(timezones=st.just(__import__("datetime").timezone.utc)).map(
        lambda d: d.isoformat()
    ),
    inputs=st.lists(_tensors, max_size=3, unique_by=lambda t: t.name).map(tuple),
    outputs=st.lists(_tensors, max_size=3, unique_by=lambda t: t.name).map(tuple),
    cuts=st.lists(_cuts, max_size=3, unique_by=lambda c: c.id).map(tuple),
    files=st.lists(_files, max_size=3, unique_by=lambda f: f.path).map(tuple),
    artifacts=st.lists(_artifacts, max_size=2).map(tuple),
    tool_version=st.text(max_size=10),
    extra=st.dictionaries(_names, _json_values, max_size=3),
)


@settings(max_examples=60, deadline=None)
@given(_manifests)
def test_manifest_json_round_trip(manifest: Manifest):
    text = manifest.to_json()
    again = Manifest.from_json(text)
    assert again == manifest
    assert again.to_json() == text  # deterministic bytes (what gets signed)
    assert Manifest.from_json(text.encode()) == manifest


@settings(max_examples=40, deadline=None)
@given(st.one_of(_tensors, _checks, _verifications, _cuts, _files, _artifacts))
def test_parts_round_trip_through_dicts(obj):
    data = json.loads(json.dumps(obj.to_dict()))
    assert type(obj)._from_dict(data, "x") == obj


def _mutated(path: list, value) -> str:
    data = json.loads(_manifest(files=(FileEntry(path="a", sha256=DIGEST, size=1),)).to_json())
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("path", "value", "field", "needle"),
    [
        (["model_name"], 3, "model_name", "expected str, got int"),
        (["model_name"], KeyError, "model_name", "missing required field"),
        (["source_digest"], "abc", "source_digest", "sha256"),
        (["created_at"], "yesterday", "created_at", "ISO 8601"),
        (["created_at"], "2025-01-01T00:00:00+02:00", "created_at", "not UTC"),
        (["inputs"], {}, "inputs", "expected a list"),
        (["inputs", 0, "shape", 1], 1.5, "inputs[0].shape[1]", "expected int, got float"),
        (["inputs", 0, "dtype"], "float33", "inputs[0].dtype", "unknown dtype"),
        (["cuts", 1, "verification", "passed"], 1, "cuts[1].verification.passed", "bool"),
        (["cuts", 1, "frontier_bytes"], -1, "cuts[1].frontier_bytes", ">= 0"),
        (["cuts", 1, "head_flops"], True, "cuts[1].head_flops", "expected int, got bool"),
        (["cuts", 1, "head_part"], "../x.onnx", "cuts[1].head_part", "'..'"),
        (["cuts", 1, "verification", "encodings", "fp16", "tolerance"], "0.1",
         "cuts[1].verification.encodings['fp16'].tolerance", "expected float"),
        (["cuts", 1, "verification", "encodings", "fp16", "encoding"], "int8",
         "cuts[1].verification.encodings['fp16'].encoding", "does not match"),
        (["cuts", 1, "verification", "max_abs_err", "y"], None,
         "cuts[1].verification.max_abs_err['y']", "got null"),
        (["cuts", 0, "verification"], KeyError, "cuts[0].verification", "missing required"),
        (["files", 0, "path"], "/etc/passwd", "files[0].path", "absolute"),
        (["files", 0, "path"], "manifest.json", "files[0].path", "reserved"),
        (["files", 0, "size"], "1", "files[0].size", "expected int"),
        (["artifacts", 0, "extra"], [], "artifacts[0].extra", "expected an object"),
    ],
)  # fmt: skip
def test_manifest_field_errors_name_the_field(path, value, field, needle):
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(_mutated(path, value))
    assert info.value.field == field
    assert needle in str(info.value)
    assert str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, InvalidArgument)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "not valid JSON"),
        ("[]", "expected an object"),
        ('{"schema_version": 1, "x": NaN}', "NaN"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_manifest_text(text, needle):
    with pytest.raises(ManifestError, match=needle):
        Manifest.from_json(text)


@pytest.mark.parametrize("version", [0, 2, 99])
def test_unknown_schema_version_is_refused(version):
    with pytest.raises(UnsupportedVersion, match=f"schema_version {version} is not supported"):
        Manifest.from_json(_mutated(["schema_version"], version))
    assert issubclass(UnsupportedVersion, UnsupportedVersion)


def test_schema_version_must_be_an_int():
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(_mutated(["schema_version"], "1"))
    assert info.value.field == "schema_version"


def test_unknown_fields_are_ignored_for_forward_compatibility():
    data = json.loads(_manifest().to_json())
    data["added_in_1_1"] = {"x": 1}
    data["cuts"][1]["verification"]["new_metric"] = 3
    assert Manifest.from_json(json.dumps(data)) == _manifest()


def test_constructors_validate_and_normalize():
    t = TensorSpec(name="x", dtype="int64", shape=["n", 4])
    assert t.shape == ("n", 4)
    assert EncodingCheck(
        encoding="fp16", max_abs_err=0, max_rel_err=1, tolerance=1, passed=True
    ).max_abs_err == 0.0  # fmt: skip
    with pytest.raises(ManifestError) as info:
        FileEntry(path="a\\b", sha256=DIGEST, size=1)
    assert info.value.field == "path"
    with pytest.raises(ManifestError, match="head_part, a tail_part or both"):
        CutSpec(
            id=0, position=0, frontier=(), frontier_bytes=0, head_flops=0, tail_flops=0,
            head_part=None, tail_part=None, verification=Verification(),
        )  # fmt: skip
    with pytest.raises(ManifestError, match="finite"):
        Verification(max_abs_err={"y": float("inf")})
    with pytest.raises(ManifestError, match="duplicate id 1"):
        _manifest(cuts=(_manifest().cuts[1], _manifest().cuts[1]))
    with pytest.raises(ManifestError, match="under another file"):
        _manifest(
            files=(FileEntry(path="a", sha256=DIGEST, size=1),
                   FileEntry(path="a/b", sha256=DIGEST, size=1))
        )  # fmt: skip
    with pytest.raises(ManifestError, match="JSON-serializable"):
        _manifest(extra={"x": object()})


def test_queries_for_the_edge_daemon():
    m = _manifest()
    assert m.cut(1).head_part == "parts/head_1.onnx"
    assert m.cut(0).cloud_only and not m.cut(0).local_only
    assert m.allowed_encodings(1) == ("raw", "fp16")  # int8 failed its check
    assert m.allowed_encodings(0) == ("raw",)  # verified, no lossy encoding checked
    failed = Verification(samples=1, passed=False, encodings=m.cut(1).verification.encodings)
    cut = CutSpec(**{**vars(m.cut(1)), "verification": failed})
    assert _manifest(cuts=(cut,)).allowed_encodings(1) == ()  # cut itself not verified
    with pytest.raises(BundleNotFound, match=r"cut 7 is not in model 'tiny' \(cuts: 0, 1\)"):
        m.allowed_encodings(7)
    assert [a.target for a in m.artifacts_for("parts/tail_1.onnx")] == ["onnxruntime"]
    assert m.artifacts_for("parts/tail_1.onnx", target="tensorrt") == ()
    assert len(m.artifacts_for("parts/tail_1.onnx", device_profile="jetson-orin-nano")) == 1


# --- writer and loader -------------------------------------------------------------------------


def test_write_and_load(tmp_path: Path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((1 << 20) * 2 + 123))  # > 2 chunks: streamed hashing
    out = tmp_path / "bundle"
    with BundleWriter(out) as writer:
        for rel, data in FILES.items():
            writer.add_file(rel, data)
        entry = writer.add_file("engines/big.plan", big)
        manifest = writer.finish(_manifest())
    assert entry.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    assert entry.size == big.stat().st_size
    assert [f.path for f in manifest.files] == sorted([*FILES, "engines/big.plan"])
    assert sorted(os.listdir(out)) == ["engines", "manifest.json", "ort", "parts"]
    assert _leftovers(tmp_path) == []

    b = load_bundle(out)
    assert b.manifest == manifest
    assert b.root == out.resolve()
    assert b.digest == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert not b.signed and not b.signature_verified
    assert b.read("parts/head_1.onnx") == b"head bytes"
    assert b.path_of("engines/big.plan").read_bytes() == big.read_bytes()
    with pytest.raises(BundleNotFound, match=r"nope\.onnx"):
        b.path_of("nope.onnx")
    with pytest.raises(BundleError, match="unsafe bundle path"):
        b.read("../bundle/manifest.json")
    assert (out / "manifest.json").read_bytes() == manifest.to_bytes()


def test_tampered_file_is_refused_naming_the_file(bundle_dir: Path):
    target = bundle_dir / "parts" / "head_1.onnx"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"parts/head_1\.onnx: sha256 .* differs"):
        load_bundle(bundle_dir)
    assert issubclass(BundleIntegrityError, PermissionDenied)
    # Without hashing a same-size change passes (documented); a size change never does.
    assert load_bundle(bundle_dir, verify_digests=False).manifest.model_name == "tiny"
    target.write_bytes(bytes(data) + b"x")
    with pytest.raises(BundleIntegrityError, match=r"parts/head_1\.onnx: size"):
        load_bundle(bundle_dir, verify_digests=False)


def test_read_rechecks_after_load(bundle_dir: Path):
    b = load_bundle(bundle_dir)
    (bundle_dir / "parts" / "tail_1.onnx").write_bytes(b"TAIL bytes")
    with pytest.raises(BundleIntegrityError, match=r"tail_1\.onnx"):
        b.read("parts/tail_1.onnx")
    assert b.read("parts/tail_1.onnx", verify=False) == b"TAIL bytes"


def test_missing_file_is_refused(bundle_dir: Path):
    (bundle_dir / "ort" / "tail_1.ort.onnx").unlink()
    with pytest.raises(BundleNotFound, match=r"ort/tail_1\.ort\.onnx: listed in the manifest"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("extra", ["extra.bin", "parts/extra.onnx", ".hidden"])
def test_unlisted_file_is_refused(bundle_dir: Path, extra: str):
    (bundle_dir / extra).write_bytes(b"surprise")
    with pytest.raises(BundleIntegrityError, match=f"{extra}: file is not listed"):
        load_bundle(bundle_dir)


def test_links_inside_a_bundle_are_refused(bundle_dir: Path, tmp_path: Path):
    (bundle_dir / "link").symlink_to(bundle_dir / "parts" / "head_1.onnx")
    with pytest.raises(BundleIntegrityError, match="link: is a symbolic link"):
        load_bundle(bundle_dir)
    (bundle_dir / "link").unlink()
    real = bundle_dir / "parts" / "head_1.onnx"
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(real.read_bytes())
    real.unlink()
    real.symlink_to(outside)  # a listed file replaced by a link, same content
    with pytest.raises(BundleIntegrityError, match=r"head_1\.onnx: is a symbolic link"):
        load_bundle(bundle_dir)


def test_missing_or_malformed_manifest(tmp_path: Path, bundle_dir: Path):
    with pytest.raises(BundleNotFound, match="no bundle"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleNotFound, match=r"manifest\.json is missing"):
        load_bundle(tmp_path / "empty")
    data = json.loads((bundle_dir / "manifest.json").read_text())
    data["cuts"][1]["tail_flops"] = "many"
    (bundle_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        load_bundle(bundle_dir)
    assert info.value.field == "cuts[1].tail_flops"
    assert str(info.value).startswith(f"{bundle_dir}: manifest.json: cuts[1].tail_flops:")
    data["cuts"][1]["tail_flops"] = 1
    data["schema_version"] = 2
    (bundle_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedVersion, match="schema_version 2"):
        load_bundle(bundle_dir)


# --- signatures ----------------------------------------------------------------------------------


def test_keypair_files(keys):
    assert stat.S_IMODE(keys["priv"].stat().st_mode) == 0o600
    assert keys["pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_fingerprint(keys["pub"]).startswith("sha256:")
    assert key_fingerprint(keys["pub"]) != key_fingerprint(keys["other_pub"])
    with pytest.raises(BundleExists):
        generate_keypair(keys["priv"], keys["pub"])
    assert issubclass(BundleExists, FailedPrecondition)


def test_good_signature_verifies(tmp_path: Path, keys):
    out = tmp_path / "signed"
    _write(out, sign_key=keys["priv"])
    sig = (out / "manifest.sig").read_bytes()
    assert sig.endswith(b"\n") and len(sig) == 89  # base64 of 64 bytes + newline
    b = load_bundle(out, public_key=keys["pub"])
    assert b.signed and b.signature_verified
    assert load_bundle(out, public_key=keys["pub"].read_bytes()).signature_verified
    unverified = load_bundle(out)  # no key configured: loads, but says it did not verify
    assert unverified.signed and not unverified.signature_verified


def test_wrong_key_is_refused(tmp_path: Path, keys):
    out = tmp_path / "signed"
    _write(out, sign_key=keys["priv"])
    with pytest.raises(BundleIntegrityError, match=r"manifest\.sig: signature does not verify"):
        load_bundle(out, public_key=keys["other_pub"])


def test_modified_manifest_breaks_the_signature(tmp_path: Path, keys):
    out = tmp_path / "signed"
    _write(out, sign_key=keys["priv"])
    text = (out / "manifest.json").read_text()
    text = text.replace('"model_version": "3"', '"model_version": "4"')
    (out / "manifest.json").write_text(text)
    load_bundle(out)  # still a valid, consistent bundle without a key...
    with pytest.raises(BundleIntegrityError, match="signature does not verify"):
        load_bundle(out, public_key=keys["pub"])  # ...but not the one that was signed


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"not base64!!\n", "not base64"), (b"AAAA\n", "64-byte"), (b"A" * 86 + b"==\n", "verify")],
)
def test_bad_signature_file_is_refused(tmp_path: Path, keys, content: bytes, needle: str):
    out = tmp_path / "signed"
    _write(out, sign_key=keys["priv"])
    (out / "manifest.sig").write_bytes(content)
    with pytest.raises(BundleIntegrityError, match=needle):
        load_bundle(out, public_key=keys["pub"])


def test_missing_signature_with_key_configured(bundle_dir: Path, keys):
    with pytest.raises(BundleIntegrityError, match=r"manifest\.sig is missing"):
        load_bundle(bundle_dir, public_key=keys["pub"])


def test_sign_bundle_after_the_fact(bundle_dir: Path, keys):
    digest = sign_bundle(bundle_dir, keys["priv"])
    b = load_bundle(bundle_dir, public_key=keys["pub"])
    assert b.signature_verified and b.digest == digest
    assert _leftovers(bundle_dir.parent) == []


def test_bad_key_material(tmp_path: Path, bundle_dir: Path, keys):
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    sign_bundle(bundle_dir, keys["priv"])
    with pytest.raises(BundleError, match=r"junk\.pem: not a readable PEM public key"):
        load_bundle(bundle_dir, public_key=junk)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(bundle_dir, public_key=tmp_path / "absent.pub")
    with pytest.raises(BundleError, match="not a readable PEM private key"):
        _write(tmp_path / "never", sign_key=keys["pub"])
    assert not (tmp_path / "never").exists()
    assert _leftovers(tmp_path) == []


# --- atomicity and overwrite -------------------------------------------------------------------


class Boom(Exception):
    pass


def test_exception_mid_write_leaves_nothing(tmp_path: Path):
    out = tmp_path / "bundle"
    with pytest.raises(Boom), BundleWriter(out) as writer:
        writer.add_file("parts/head_1.onnx", b"head")
        assert _leftovers(tmp_path)  # the staging directory exists while writing
        raise Boom
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failing_finish_leaves_nothing(tmp_path: Path):
    out = tmp_path / "bundle"
    missing = r"cuts\[1\]\.head_part: 'parts/head_1\.onnx' is not in files"
    with pytest.raises(ManifestError, match=missing), BundleWriter(out) as w:
        w.add_file("parts/full.onnx", b"full")
        w.add_file("parts/tail_1.onnx", b"tail")
        w.add_file("ort/tail_1.ort.onnx", b"ort")
        w.finish(_manifest())
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_finish_is_an_error_and_writes_nothing(tmp_path: Path):
    with pytest.raises(BundleError, match=r"without finish\(\)"), BundleWriter(tmp_path / "b") as w:
        w.add_file("a.bin", b"a")
    assert list(tmp_path.iterdir()) == []
    with BundleWriter(tmp_path / "b") as w:
        w.add_file("a.bin", b"a")
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_add_file_refuses_bad_paths(tmp_path: Path):
    with BundleWriter(tmp_path / "b") as w:
        w.add_file("dir/a.bin", b"a")
        for bad in ["../escape", "/abs", "a//b", "./a", "c:/x", "manifest.json"]:
            with pytest.raises(BundleError):
                w.add_file(bad, b"x")
        with pytest.raises(BundleError, match="already added"):
            w.add_file("dir/a.bin", b"again")
        with pytest.raises(BundleError, match="already added"):
            w.add_file("dir", b"a dir already")
        with pytest.raises(BundleError, match="is a file"):
            w.add_file("dir/a.bin/under", b"x")
        with pytest.raises(BundleError, match="does not exist"):
            w.add_file("b.bin", tmp_path / "absent")
        with pytest.raises(BundleError, match="must be empty"):
            w.finish(_manifest(files=(FileEntry(path="x", sha256=DIGEST, size=1),)))
        w.abort()
    assert not (tmp_path / "escape").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path: Path, bundle_dir: Path):
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(BundleExists, match="overwrite=True"):
        _write(bundle_dir)
    assert (bundle_dir / "manifest.json").read_bytes() == before
    with BundleWriter(bundle_dir, overwrite=True) as w:
        w.add_file("parts/full.onnx", b"v2")
        w.finish(_manifest(model_version="4", cuts=(_manifest().cuts[0],), artifacts=()))
    b = load_bundle(bundle_dir)
    assert b.manifest.model_version == "4"
    assert sorted(os.listdir(bundle_dir)) == ["manifest.json", "parts"]  # old files gone
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_bundle(bundle_dir: Path):
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(Boom), BundleWriter(bundle_dir, overwrite=True) as w:
        w.add_file("parts/full.onnx", b"v2")
        raise Boom
    assert (bundle_dir / "manifest.json").read_bytes() == before
    load_bundle(bundle_dir)
    assert _leftovers(bundle_dir.parent) == []


def test_overwrite_refuses_a_non_directory(tmp_path: Path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(BundleError, match="not a directory"):
        BundleWriter(tmp_path / "file", overwrite=True).__enter__()


# --- archives ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_archive_round_trip(tmp_path: Path, keys, compression: str):
    src = tmp_path / "src"
    _write(src, sign_key=keys["priv"])
    archive = pack(src, tmp_path / "b.tandem", compression=compression)
    again = pack(src, tmp_path / "b2.tandem", compression=compression)
    assert archive.read_bytes() == again.read_bytes()  # deterministic
    out = unpack(archive, tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [*FILES, "manifest.json", "manifest.sig"]
    )
    assert load_bundle(out, public_key=keys["pub"]).signature_verified
    with load_bundle(archive, public_key=keys["pub"]) as b:
        extracted = b.root
        assert b.read("parts/head_1.onnx") == b"head bytes"
        assert b.digest == load_bundle(src).digest
    assert not extracted.exists()  # close() removed the temporary extraction
    with pytest.raises(BundleExists):
        unpack(archive, out)
    assert _leftovers(tmp_path) == []


def test_load_archive_into_a_chosen_directory(tmp_path: Path, bundle_dir: Path):
    archive = pack(bundle_dir, tmp_path / "b.tar.zst")
    b = load_bundle(archive, extract_to=tmp_path / "x")
    b.close()
    assert (tmp_path / "x" / "manifest.json").exists()  # caller-chosen directory stays


def test_pack_refuses_a_tampered_bundle_and_an_existing_archive(tmp_path: Path, bundle_dir: Path):
    archive = pack(bundle_dir, tmp_path / "b.tar.zst")
    with pytest.raises(BundleExists):
        pack(bundle_dir, archive)
    pack(bundle_dir, archive, overwrite=True)
    (bundle_dir / "parts" / "full.onnx").write_bytes(b"FULL model bytes")
    with pytest.raises(BundleIntegrityError, match=r"full\.onnx"):
        pack(bundle_dir, tmp_path / "c.tar.zst")
    assert not (tmp_path / "c.tar.zst").exists()
    assert _leftovers(tmp_path) == []


def _evil_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (_info("../evil"), "unsafe path"),
        (_info("ABSOLUTE"), "unsafe path"),  # becomes an absolute path under tmp_path
        (_info("parts/../../evil"), "unsafe path"),
        (_info("evil", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_info("evil", tarfile.LNKTYPE, "manifest.json"), "hard link"),
        (_info("evil", tarfile.CHRTYPE), "device file"),
        (_info("evil", tarfile.FIFOTYPE), "FIFO"),
        (_info("manifest.json"), "appears twice"),
    ],
)
def test_malicious_archives_are_refused(tmp_path: Path, bundle_dir: Path, member, needle):
    if member.name == "ABSOLUTE":
        member = _info(str(tmp_path / "evil-abs"))
    members = [(_info("manifest.json"), (bundle_dir / "manifest.json").read_bytes())]
    members += [(_info(rel), data) for rel, data in FILES.items()]
    members.insert(1, (member, b"payload"))
    archive = _evil_tar(tmp_path / "evil.tar", members)
    out = tmp_path / "out"
    with pytest.raises(BundleIntegrityError, match=needle):
        unpack(archive, out)
    with pytest.raises(BundleIntegrityError, match=needle):
        load_bundle(archive)
    assert not out.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "evil-abs").exists()
    assert _leftovers(tmp_path) == []


def test_oversized_members_are_refused(tmp_path: Path, bundle_dir: Path):
    archive = pack(bundle_dir, tmp_path / "b.tar", compression="none")
    with pytest.raises(BundleIntegrityError, match="over 8"):
        unpack(archive, tmp_path / "out", max_member_bytes=8)
    with pytest.raises(BundleIntegrityError, match="archive over 100"):
        unpack(archive, tmp_path / "out", max_total_bytes=100)
    with pytest.raises(BundleIntegrityError, match="more than 2 members"):
        unpack(archive, tmp_path / "out", max_members=2)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_archive_with_an_unlisted_member_is_refused(tmp_path: Path, bundle_dir: Path):
    members = [(_info("manifest.json"), (bundle_dir / "manifest.json").read_bytes())]
    members += [(_info(rel), data) for rel, data in FILES.items()]
    members.append((_info("parts/trojan.onnx"), b"x"))
    archive = _evil_tar(tmp_path / "extra.tar", members)
    with pytest.raises(BundleIntegrityError, match=r"trojan\.onnx: file is not listed"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\x28\xb5\x2f\xfd" + b"\0" * 50])
def test_corrupt_archive(tmp_path: Path, content: bytes):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(content)
    with pytest.raises(BundleError):
        unpack(archive, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [archive]


# --- package surface ----------------------------------------------------------------------------


def test_public_surface_is_all():
    public = {
        n for n, v in vars(bundle_mod).items()
        if not n.startswith("_") and not isinstance(v, type(sys)) and n != "annotations"
    }  # fmt: skip
    assert public - {"Path"} == set(bundle_mod.__all__)
    assert issubclass(BundleError, InvalidArgument) and issubclass(BundleNotFound, NotFound)


def test_importing_the_bundle_module_does_not_load_cryptography():
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, protocol.bundle;"
         "print('cryptography' in sys.modules, 'onnx' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


# -- found in review ----------------------------------------------------------------------------


def test_oversized_pax_header_is_refused_before_it_is_read(tmp_path):
    import tarfile as _tarfile

    header = _tarfile.TarInfo("././@PaxHeader")
    header.type = _tarfile.XHDTYPE
    header.size = 1 << 30  # declared 1 GiB; tarfile would read it all into memory
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(header.tobuf(format=_tarfile.USTAR_FORMAT) + bytes(4096))
    with pytest.raises(BundleError, match="extended header"):
        load_bundle(archive)


def test_manifest_paths_below_reserved_names_are_refused():
    with pytest.raises(ManifestError, match="reserved"):
        FileEntry(path="manifest.json/x", sha256="0" * 64, size=1)


def test_duplicate_keys_and_deep_nesting_in_manifest_json():
    with pytest.raises(ManifestError, match="duplicate key 'model_name'"):
        Manifest.from_json('{"model_name": "evil", "model_name": "m"}')
    with pytest.raises(ManifestError, match="nested too deeply"):
        Manifest.from_json('{"extra": ' + "[" * 100_000 + "]" * 100_000 + "}")


# -- attack review: archives are read manifest first; bounded manifests; rollback ----------------


def _tar_bytes(members: list[tuple[str, bytes]], compression: str = "none") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    return data


def _bundle_members(bundle_dir: Path) -> list[tuple[str, bytes]]:
    return [("manifest.json", (bundle_dir / "manifest.json").read_bytes()),
            *((rel, data) for rel, data in sorted(FILES.items()))]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """tempfile's directory for this test only (where tandem-bundle-* directories go)."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_manifest_must_be_the_first_member(tmp_path: Path, bundle_dir: Path, private_tmp):
    members = _bundle_members(bundle_dir)
    archive = tmp_path / "late.tar"
    archive.write_bytes(_tar_bytes(members[1:] + members[:1]))
    for call in (load_bundle, open_bundle):
        with pytest.raises(BundleError, match="first member"):
            call(archive)
    with pytest.raises(BundleError, match="first member"):
        unpack(archive, tmp_path / "out")
    assert list(private_tmp.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_member_whose_size_differs_from_the_listed_one_is_refused_before_writing(
        tmp_path: Path, bundle_dir: Path):
    members = [(n, d + b"!" if n == "parts/full.onnx" else d)
               for n, d in _bundle_members(bundle_dir)]
    archive = tmp_path / "grown.tar"
    archive.write_bytes(_tar_bytes(members))
    with pytest.raises(BundleIntegrityError, match="17 bytes, the manifest lists 16"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_member_whose_sha256_differs_is_deleted_and_refused(tmp_path: Path, bundle_dir: Path):
    members = [(n, d.upper() if n == "parts/head_1.onnx" else d)
               for n, d in _bundle_members(bundle_dir)]
    archive = tmp_path / "swapped.tar"
    archive.write_bytes(_tar_bytes(members))
    with pytest.raises(BundleIntegrityError, match=r"head_1\.onnx: sha256"):
        unpack(archive, tmp_path / "out")
    with open_bundle(archive) as b:
        assert b.read("parts/tail_1.onnx") == FILES["parts/tail_1.onnx"]  # others still fine
        with pytest.raises(BundleIntegrityError, match="sha256"):
            b.path_of("parts/head_1.onnx")
        assert not (b.root / "parts" / "head_1.onnx").exists()


def test_the_signature_is_checked_before_anything_is_extracted(tmp_path: Path, keys,
                                                               private_tmp):
    src = tmp_path / "src"
    _write(src, sign_key=keys["priv"])
    archive = pack(src, tmp_path / "b.tar.zst")
    for call in (load_bundle, open_bundle):
        with pytest.raises(BundleIntegrityError, match="does not verify"):
            call(archive, public_key=keys["other_pub"])
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        unpack(archive, tmp_path / "out", public_key=keys["other_pub"])
    assert list(private_tmp.iterdir()) == [] and not (tmp_path / "out").exists()
    unsigned = pack(bundle_dir_of(tmp_path), tmp_path / "u.tar.zst")
    with pytest.raises(BundleIntegrityError, match="unsigned"):
        open_bundle(unsigned, public_key=keys["pub"])
    with open_bundle(archive, public_key=keys["pub"]) as b:
        assert b.signature_verified and b.signed


def bundle_dir_of(tmp_path: Path) -> Path:
    out = tmp_path / "plain"
    if not out.exists():
        _write(out)
    return out


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_a_truncated_archive_says_truncated(tmp_path: Path, bundle_dir: Path, compression,
                                            private_tmp):
    whole = pack(bundle_dir, tmp_path / "b.tar", compression=compression).read_bytes()
    plain = pack(bundle_dir, tmp_path / "b.raw.tar", compression="none").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        last = tar.getmembers()[-1]
        content_end = last.offset_data + last.size  # then only the end marker and padding
    cuts = sorted({len(whole) * k // 29 for k in range(1, 29)} | {len(whole) - 1, 10, 700})
    for n in cuts:
        archive = tmp_path / f"cut-{n}"
        archive.write_bytes(whole[:n])
        for call in (load_bundle, lambda p: unpack(p, tmp_path / "out")):
            try:
                call(archive)
            except BundleError as exc:
                if compression == "none" and n < 512:  # not even a tar header: not an archive
                    assert "not a bundle archive" in str(exc), (n, str(exc))
                else:
                    assert "truncated archive" in str(exc), (n, len(whole), str(exc))
            else:  # only a cut in the end-of-archive padding leaves every file whole
                assert compression == "none" and n >= content_end, (n, len(whole))
                shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert list(private_tmp.iterdir()) == []


def test_a_fifo_is_refused_without_blocking_and_without_a_temp_dir(tmp_path: Path, private_tmp):
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    for call in (load_bundle, open_bundle, lambda p: unpack(p, tmp_path / "out")):
        with pytest.raises(BundleError, match="FIFO"):
            call(fifo)
    assert list(private_tmp.iterdir()) == []


def test_temp_dirs_of_killed_processes_are_swept(tmp_path: Path, bundle_dir: Path, private_tmp):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = private_tmp / f"tandem-bundle-{int(gone.stdout)}-abc"
    (stale / "parts").mkdir(parents=True)
    mine = private_tmp / f"tandem-bundle-{os.getpid()}-live"
    mine.mkdir()
    other = private_tmp / "tandem-bundle-notapid"
    other.mkdir()
    archive = pack(bundle_dir, tmp_path / "b.tar.zst")
    with open_bundle(archive) as b:
        assert b.root.parent == private_tmp and b.root.name.startswith(
            f"tandem-bundle-{os.getpid()}-")
        assert not stale.exists() and mine.exists() and other.exists()
    assert not b.root.exists()


def test_an_archive_changed_after_it_was_opened_is_refused(tmp_path: Path, bundle_dir: Path):
    archive = pack(bundle_dir, tmp_path / "b.tar", compression="none")
    with open_bundle(archive) as b:
        archive.write_bytes(archive.read_bytes())  # same bytes, but another file now
        os.utime(archive, ns=(1, 1))
        with pytest.raises(BundleIntegrityError, match="changed since it was opened"):
            b.path_of("parts/full.onnx")


def test_open_bundle_verifies_a_file_only_when_it_is_used(bundle_dir: Path):
    (bundle_dir / "parts" / "tail_1.onnx").write_bytes(b"TAIL bytes")  # same size, tampered
    with pytest.raises(BundleIntegrityError, match=r"tail_1\.onnx"):
        load_bundle(bundle_dir)
    b = open_bundle(bundle_dir)
    assert b.verified_files == frozenset()
    assert b.path_of("parts/head_1.onnx").read_bytes() == b"head bytes"
    assert b.verified_files == {"parts/head_1.onnx"}
    with pytest.raises(BundleIntegrityError, match=r"tail_1\.onnx"):
        b.path_of("parts/tail_1.onnx")
    (bundle_dir / "parts" / "stray.onnx").write_bytes(b"x")  # the layout is still checked
    with pytest.raises(BundleIntegrityError, match="not listed"):
        open_bundle(bundle_dir)


def test_an_archive_opened_lazily_extracts_only_what_is_used(tmp_path: Path, bundle_dir: Path):
    archive = pack(bundle_dir, tmp_path / "b.tar.zst")
    with open_bundle(archive) as b:
        on_disk = lambda: sorted(  # noqa: E731
            p.relative_to(b.root).as_posix() for p in b.root.rglob("*") if p.is_file())
        assert on_disk() == ["manifest.json"]
        assert b.read("parts/head_1.onnx") == b"head bytes"
        assert on_disk() == ["manifest.json", "parts/head_1.onnx"]
        b.verify(["parts/head_1.onnx", "parts/tail_1.onnx"])
        assert on_disk() == ["manifest.json", "parts/head_1.onnx", "parts/tail_1.onnx"]
        assert b.digest == load_bundle(bundle_dir).digest
    assert b.closed
    with pytest.raises(BundleError, match="closed"):
        b.path_of("parts/full.onnx")
    assert not open_bundle(bundle_dir).closed


# -- manifest bombs -------------------------------------------------------------------------------


def test_manifest_json_bombs_are_refused_before_parsing():
    bomb = b'{"extra": [' + b"{}," * (MAX_MANIFEST_ELEMENTS // 2 + 10) + b"{}]}"
    assert len(bomb) < MAX_MANIFEST_BYTES
    with pytest.raises(ManifestError, match="JSON elements"):
        Manifest.from_json(bomb)
    with pytest.raises(ManifestError, match=f"at most {MAX_MANIFEST_BYTES}"):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestError, match="JSON elements"):
        Manifest.from_json(bomb.decode())


@pytest.mark.parametrize(("field", "value", "match"), [
    ("cuts", [{}] * 1025, "cuts: 1025 entries, at most 1024"),
    ("files", [{}] * 10_001, "files: 10001 entries, at most 10000"),
    ("inputs", [{}] * 1025, "inputs: 1025 entries"),
])
def test_manifest_element_counts_are_bounded(field, value, match):
    data = json.loads(_manifest().to_json())
    data[field] = value
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(data)
    with pytest.raises(ManifestError, match="shape: 65 entries, at most 64"):
        TensorSpec(name="x", dtype="float32", shape=(1,) * 65)


def test_a_signed_directory_checks_the_signature_before_parsing(tmp_path, keys):
    src = tmp_path / "src"
    _write(src, sign_key=keys["priv"])
    (src / "manifest.json").write_bytes(b"[" * 1000 + b"]" * 1000)  # not even a manifest
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        load_bundle(src, public_key=keys["pub"])
    with pytest.raises(ManifestError):
        load_bundle(src)


def test_the_writer_refuses_a_manifest_readers_would_refuse(tmp_path):
    huge = {f"k{i}": list(range(40)) for i in range(6000)}  # ~250,000 elements
    with pytest.raises(BundleError, match="JSON elements"), BundleWriter(tmp_path / "b") as w:
        w.add_file("parts/full.onnx", b"x")
        w.finish(_manifest(cuts=(), artifacts=(), extra=huge))
    assert not (tmp_path / "b").exists()


# -- rollback ---------------------------------------------------------------------------------


def test_bundle_version_round_trips_and_is_omitted_when_zero():
    m = _manifest(bundle_version=7)
    assert Manifest.from_json(m.to_json()).bundle_version == 7
    assert "bundle_version" not in _manifest().to_dict()  # older manifests keep their bytes
    assert Manifest.from_json(_manifest().to_json()).bundle_version == 0
    with pytest.raises(ManifestError, match="bundle_version"):
        _manifest(bundle_version=-1)


def test_check_not_older_refuses_a_rollback_unless_forced(tmp_path):
    v3, v5 = _manifest(bundle_version=3), _manifest(bundle_version=5)
    check_not_older(v3, v5)
    check_not_older(v5, v5)  # reinstalling the same release
    with pytest.raises(BundleRollback, match="version 3 is older than the installed") as info:
        check_not_older(v5, v3)
    assert isinstance(info.value, PermissionDenied)
    check_not_older(v5, v3, force=True)
    check_not_older(3, v5)
    with pytest.raises(BundleRollback):
        check_not_older(6, v5)
    with pytest.raises(InvalidArgument, match="different models"):
        check_not_older(_manifest(model_name="other", bundle_version=1), v3)
    with pytest.raises(InvalidArgument):
        check_not_older(v3, "v5")
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        for rel, data in FILES.items():
            w.add_file(rel, data)
        w.finish(v3)
    with pytest.raises(BundleRollback):
        check_not_older(v5, load_bundle(out))  # a Bundle works too


# -- engine recipes -------------------------------------------------------------------------


def test_engine_recipe_is_typed_and_round_trips():
    recipe = EngineRecipe(workspace_mb=1024, shapes={"x": ((1, 3), (4, 3), (8, 3))},
                          shape_profile="x:1x3/4x3/8x3", unresolved_dims={"s": ("N", "S", 16)},
                          compute_capability="8.7", version_compatible=True, dla_core=0)
    deferred = Artifact(part="parts/tail_1.onnx", target="tensorrt", path="parts/tail_1.onnx",
                        precision="fp16", device_profile="jetson-orin-nano-8gb",
                        engine_recipe=recipe)
    assert deferred.build_on_device
    m = _manifest(artifacts=(deferred,))
    again = Manifest.from_json(m.to_json())
    assert again.artifacts[0].engine_recipe == recipe and again == m
    with pytest.raises(ManifestError, match=r"shapes\['x'\]"):
        EngineRecipe(shapes={"x": ((1,), (2,))})
    with pytest.raises(ManifestError, match="workspace_mb"):
        EngineRecipe(workspace_mb=0)
    assert "engine_recipe" not in _manifest().artifacts[0].to_dict()


def test_engine_recipes_written_into_extra_by_older_compilers_are_read():
    data = json.loads(_manifest().to_json())
    data["artifacts"].append({
        "part": "parts/tail_1.onnx", "target": "tensorrt", "path": "parts/tail_1.onnx",
        "precision": "fp16", "device_profile": "cloud-t4", "builder": "deferred",
        "extra": {"build": "on-device", "workspace_mb": 2048, "shapes": {"h": [[1], [4], [8]]},
                  "shape_profile": "h:1/4/8", "unresolved_dims": {}, "compute_capability": "7.5",
                  "version_compatible": False, "dla_core": None},
    })
    art = Manifest.from_dict(data).artifacts[-1]
    assert art.build_on_device
    assert art.engine_recipe == EngineRecipe(workspace_mb=2048, shapes={"h": ((1,), (4,), (8,))},
                                             shape_profile="h:1/4/8", compute_capability="7.5")


def test_add_file_records_what_a_file_requires(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        w.add_file("parts/full.onnx", b"x", requires=["weights/w.bin"])
        w.add_file("weights/w.bin", b"w")
        m = w.finish(_manifest(cuts=(_manifest().cuts[0],), artifacts=()))
    assert m.file("parts/full.onnx").requires == ("weights/w.bin",)
    assert load_bundle(tmp_path / "b").manifest == m
    with pytest.raises(ManifestError, match="requires"), BundleWriter(tmp_path / "c") as w:
        w.add_file("parts/full.onnx", b"x", requires=["weights/missing.bin"])
        w.finish(_manifest(cuts=(_manifest().cuts[0],), artifacts=()))
    assert not (tmp_path / "c").exists()
