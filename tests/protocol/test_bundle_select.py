"""``Bundle.select(role, profile)``: what to run per cut, verifying (or extracting) only that."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.protocol.bundle import (
    Artifact,
    BundleIntegrityError,
    BundleNotFound,
    BundleWriter,
    CutSpec,
    EngineRecipe,
    Manifest,
    Role,
    TensorSpec,
    Verification,
    load_bundle,
    open_bundle,
    pack,
)
from tandem.protocol.errors import InvalidArgument

PARTS = ["parts/full.onnx", "parts/head_1.onnx", "parts/tail_1.onnx", "parts/head_2.onnx",
         "parts/tail_2.onnx"]
RECIPE = EngineRecipe(workspace_mb=1024, shapes={"x": ((1, 4), (4, 4), (8, 4))},
                      shape_profile="x:1x4/4x4/8x4", compute_capability="8.7")


def _spec(name: str) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=("N", 4))


def _cut(i: int, head: str | None, tail: str | None, passed: bool = True) -> CutSpec:
    return CutSpec(id=i, position=i, frontier=(_spec(f"h{i}"),), frontier_bytes=16,
                   head_flops=i, tail_flops=10 - i, head_part=head, tail_part=tail,
                   verification=Verification(samples=2, passed=passed))


def _artifacts() -> tuple[Artifact, ...]:
    out = []
    for part in PARTS:
        stem = Path(part).stem
        out.append(Artifact(part=part, target="onnxruntime", path=f"ort/{stem}.onnx"))
        out.append(Artifact(part=part, target="tensorrt", path=f"trt/t4/{stem}.engine",
                            precision="fp16", device_profile="cloud-t4",
                            engine_recipe=EngineRecipe(workspace_mb=4096,
                                                       tensorrt_version="10.3")))
        out.append(Artifact(part=part, target="tensorrt", path=part, precision="fp16",
                            device_profile="jetson-orin-nano-8gb", engine_recipe=RECIPE))
    out.append(Artifact(part="parts/full.onnx", target="coreml", path="ort/full.onnx",
                        device_profile="jetson-orin-nano-8gb"))  # a target we cannot run
    return tuple(out)


def _files() -> dict[str, bytes]:
    files = {p: f"onnx {p}".encode() for p in PARTS}
    files["weights/shared.bin"] = b"W" * 1000
    files["weights/extra.bin"] = b"E" * 10
    for a in _artifacts():
        files.setdefault(a.path, f"artifact {a.path}".encode())
    return files


REQUIRES = {p: ("weights/shared.bin",) for p in PARTS}
REQUIRES["weights/shared.bin"] = ("weights/extra.bin",)  # transitively


def _write(out: Path, artifacts=None, cuts=None) -> Path:
    manifest = Manifest(
        model_name="m", model_version="1", source_digest="ab" * 32,
        created_at="2025-01-02T03:04:05Z", inputs=(_spec("x"),), outputs=(_spec("y"),),
        cuts=cuts if cuts is not None else (
            _cut(0, None, "parts/full.onnx"), _cut(1, "parts/head_1.onnx", "parts/tail_1.onnx"),
            _cut(2, "parts/head_2.onnx", "parts/tail_2.onnx", passed=False),
            _cut(3, "parts/full.onnx", None)),
        artifacts=_artifacts() if artifacts is None else artifacts,
    )
    with BundleWriter(out) as w:
        for rel, data in sorted(_files().items()):
            w.add_file(rel, data, requires=REQUIRES.get(rel, ()))
        w.finish(manifest)
    return out


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return _write(tmp_path / "b")


def test_the_cloud_gets_every_tail_as_a_prebuilt_engine(bundle_dir: Path):
    with open_bundle(bundle_dir) as b:
        sel = b.select(Role.TAIL, "cloud-t4")
        assert sorted(sel.tails) == [0, 1]  # cut 2 failed verification; cut 3 has no tail
        assert sel.heads == {} and sel.full is None
        t0 = sel.tails[0]
        assert (t0.role, t0.cut_id, t0.part) == (Role.TAIL, 0, "parts/full.onnx")
        assert t0.backend == "tensorrt" and t0.path == b.root / "trt/t4/full.engine"
        assert t0.recipe == EngineRecipe(workspace_mb=4096, tensorrt_version="10.3")
        assert not t0.build_on_device and t0.precision == "fp16"
        assert t0.source == b.root / "parts/full.onnx"
        assert set(sel.files) == {"trt/t4/full.engine", "trt/t4/tail_1.engine",
                                  "parts/full.onnx", "parts/tail_1.onnx",
                                  "weights/shared.bin", "weights/extra.bin"}
        assert b.verified_files == set(sel.files)


def test_the_edge_gets_heads_tails_and_the_full_model_in_one_call(bundle_dir: Path):
    with open_bundle(bundle_dir) as b:
        sel = b.select(("head", "tail", "full"), "jetson-orin-nano-8gb")
        assert sorted(sel.heads) == [1, 3] and sorted(sel.tails) == [0, 1]
        head = sel.heads[1]
        assert head.backend == "tensorrt" and head.build_on_device
        assert head.recipe == RECIPE and head.path == head.source == b.root / "parts/head_1.onnx"
        assert sel.full is not None and sel.full.part == "parts/full.onnx"
        assert sel.for_cut(1) == (sel.heads[1], sel.tails[1])
        assert sel.for_cut(3) == (sel.heads[3], None)
        with pytest.raises(BundleNotFound, match="cut 2"):
            sel.for_cut(2)
        # the whole model is cut 0's tail, cut 3's head and `full`: loaded once
        paths = [r.path for r in sel.distinct()]
        assert len(paths) == len(set(paths)) == 3


@pytest.mark.parametrize("profile", ["onnxruntime", "cpu", "raspberry-pi-5"])
def test_cpu_and_unknown_profiles_get_the_onnx_runtime_models(bundle_dir: Path, profile):
    with open_bundle(bundle_dir) as b:
        sel = b.select(Role.HEAD, profile)
        head = sel.heads[1]
        assert head.backend == "onnxruntime" and head.optimized
        assert head.path == b.root / "ort/head_1.onnx" and head.recipe is None


def test_a_part_without_artifacts_runs_from_its_onnx(tmp_path: Path):
    b = open_bundle(_write(tmp_path / "bare", artifacts=()))
    tail = b.select("tail", "cloud-t4").tails[1]
    assert tail.backend == "onnxruntime" and not tail.optimized and tail.artifact is None
    assert tail.path == tail.source == b.root / "parts/tail_1.onnx"


def test_sources_false_leaves_out_the_onnx_parts(bundle_dir: Path):
    with open_bundle(bundle_dir) as b:
        sel = b.select(Role.TAIL, "cloud-t4", sources=False)
        assert set(sel.files) == {"trt/t4/full.engine", "trt/t4/tail_1.engine"}
        assert all(r.source is None for r in sel.distinct())


def test_select_verifies_only_what_it_picks(bundle_dir: Path):
    engine = bundle_dir / "trt/t4/head_1.engine"
    engine.write_bytes(b"x" * engine.stat().st_size)  # same size (checked on open), other bytes
    with open_bundle(bundle_dir) as b:
        b.select(Role.TAIL, "cloud-t4")  # the tampered head engine is not picked
        with pytest.raises(BundleIntegrityError, match=r"head_1\.engine"):
            b.select(Role.HEAD, "cloud-t4")
    (bundle_dir / "weights/extra.bin").write_bytes(b"e" * 10)  # required, transitively
    with pytest.raises(BundleIntegrityError, match=r"extra\.bin"):
        open_bundle(bundle_dir).select(Role.TAIL, "onnxruntime")


def test_an_archive_is_opened_without_extracting_what_is_not_selected(tmp_path, bundle_dir):
    archive = pack(bundle_dir, tmp_path / "b.tar.zst")
    with open_bundle(archive) as b:
        sel = b.select(Role.TAIL, "cloud-t4")
        on_disk = {p.relative_to(b.root).as_posix() for p in b.root.rglob("*") if p.is_file()}
        assert on_disk == {*sel.files, "manifest.json"}
        assert sel.tails[1].path.read_bytes() == b"artifact trt/t4/tail_1.engine"
        more = b.select(Role.HEAD, "cloud-t4")  # a second pass extracts only what is new
        assert more.heads[1].path.exists()
    assert not b.root.exists()
    with load_bundle(archive) as everything:  # and loading everything still works
        assert everything.verified_files == {f.path for f in everything.manifest.files}


def test_bad_roles_profiles_and_bundles_without_a_full_model(tmp_path, bundle_dir):
    b = open_bundle(bundle_dir)
    for role in ("body", (), ["head", "nope"]):
        with pytest.raises(InvalidArgument, match="role"):
            b.select(role, "cpu")
    for profile in ("", None):
        with pytest.raises(InvalidArgument, match="profile"):
            b.select("head", profile)
    partial = open_bundle(_write(tmp_path / "p", cuts=(
        _cut(1, "parts/head_1.onnx", "parts/tail_1.onnx"),)))
    assert partial.manifest.full_part is None
    with pytest.raises(BundleNotFound, match="no whole model"):
        partial.select(Role.FULL, "cpu")


def test_closure_follows_requires_transitively(bundle_dir: Path):
    m = open_bundle(bundle_dir).manifest
    assert m.closure(["parts/head_1.onnx"]) == ("parts/head_1.onnx", "weights/shared.bin",
                                                "weights/extra.bin")
    with pytest.raises(BundleNotFound):
        m.closure(["parts/nope.onnx"])
