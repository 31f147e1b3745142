"""EngineKey, DeviceIdentity, EngineCache and activate_cached (tandem.devices.engines)."""

import json
import threading

import numpy as np
import pytest

from tandem.devices.engines import (
    DeviceIdentity,
    EngineCache,
    EngineFromOnnx,
    EngineKey,
    activate_cached,
    external_data_digests,
    read_l4t_release,
    shape_profile_id,
)
from tandem.devices.profiles import get_profile
from tandem.protocol.errors import InternalError, InvalidArgument, NotFound
from tests._support import fake_pycuda, onnx_small

SHAPES = {"x": ((1, 8), (4, 8), (16, 8))}
ORIN = DeviceIdentity("Orin", "8.7", 8, "R36.4.0")


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(onnx_small.mlp(seed=11))
    return path


def _key(**kw):
    base = dict(part_sha256="ab" * 32, tensorrt_version="10.3.0.26", compute_capability="8.7",
                precision="fp16", shape_profile=shape_profile_id(SHAPES))
    return EngineKey(**(base | kw))


# ------------------------------------------------------------------------------ the cache
def test_cache_builds_once_then_loads(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    calls = []

    def build():
        calls.append(1)
        return b"engine-bytes"

    p1 = cache.get_or_build(_key(), build)
    p2 = cache.get_or_build(_key(), build)
    assert p1 == p2 and p1.read_bytes() == b"engine-bytes" and len(calls) == 1
    meta = json.loads(p1.with_suffix(".json").read_text())
    assert meta["key"]["tensorrt_version"] == "10.3.0.26"
    assert sorted(x.name for x in p1.parent.iterdir()) == sorted(
        [p1.name, p1.stem + ".json", p1.name + ".lock"])


def test_key_fields_all_matter(tmp_path):
    cache = EngineCache(tmp_path)
    keys = (_key(), _key(tensorrt_version="10.4"), _key(compute_capability="9.0"),
            _key(precision="int8"), _key(shape_profile="static"), _key(part_sha256="cd"),
            _key(build_options=("dla0",)), _key(device_name="NVIDIA Jetson AGX Orin"),
            _key(multiprocessor_count=16), _key(l4t_release="R36.4.0"),
            _key(calibration_sha256="ef"), _key(external_data=("w.bin:00",)))
    assert len({cache.path_for(k) for k in keys}) == len(keys)


def test_mismatching_sidecar_is_rebuilt_not_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.get_or_build(_key(), lambda: b"old")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["key"]["tensorrt_version"] = "8.6.1"  # stored engine says: built by another TRT
    meta_path.write_text(json.dumps(meta))
    assert cache.lookup(_key()) is None
    assert cache.get_or_build(_key(), lambda: b"new").read_bytes() == b"new"
    assert cache.lookup(_key()) == path


def test_tampered_half_written_or_odd_entries_are_rebuilt(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.get_or_build(_key(), lambda: b"good")
    path.write_bytes(b"truncat")
    assert cache.get_or_build(_key(), lambda: b"rebuilt").read_bytes() == b"rebuilt"
    for sidecar in ("[]", "null", "{not json", ""):
        path.with_suffix(".json").write_text(sidecar)
        assert cache.lookup(_key()) is None
    path.with_suffix(".json").unlink()
    assert cache.lookup(_key()) is None
    with pytest.raises(InternalError, match="no bytes"):
        cache.get_or_build(_key(), lambda: b"")


def test_concurrent_builds_of_one_key_build_once(tmp_path):
    cache = EngineCache(tmp_path)
    started, calls, paths = threading.Event(), [], []

    def build():
        calls.append(1)
        started.set()
        return b"engine"

    def worker():
        paths.append(cache.get_or_build(_key(), build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 4


# ---------------------------------------------------------------- 8. what the key holds
def test_device_identity_is_read_from_the_device(fake_trt, tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, "
                       "EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n# KERNEL_VARIANT: oot\n")
    fake_pycuda.STATE.device_count = 2
    fake_pycuda.STATE.devices[1].name = "NVIDIA Jetson AGX Orin"
    fake_pycuda.STATE.devices[1].multiprocessor_count = 16
    identity = DeviceIdentity.read(1, tegra_release=release)
    assert identity == DeviceIdentity("NVIDIA Jetson AGX Orin", "8.7", 16, "R36.4.0")
    assert identity.slug == "NVIDIA-Jetson-AGX-Orin.sm87"
    assert DeviceIdentity.read(0, tegra_release=tmp_path / "absent").l4t_release == ""
    assert fake_pycuda.driver_stack() == []


def test_l4t_release_parsing_survives_odd_files(tmp_path):
    odd = tmp_path / "odd"
    odd.write_bytes(b"\xff\xfe not a release line" + b"x" * (1 << 20))
    assert read_l4t_release(odd).startswith("unparsed:")
    assert read_l4t_release(odd) == read_l4t_release(odd)  # stable
    assert read_l4t_release(tmp_path) == "unreadable:IsADirectoryError"
    assert read_l4t_release(tmp_path / "none") == ""
    line = tmp_path / "r35"
    line.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref\n")
    assert read_l4t_release(line) == "R35.4.1"


def test_key_for_part_reads_the_device_and_tells_device_models_apart(fake_trt, mlp_path):
    profile = get_profile("jetson-agx-orin-64gb")
    key = EngineKey.for_part(mlp_path, profile, "fp16", "10.3.0.26", SHAPES)
    assert (key.device_name, key.compute_capability, key.multiprocessor_count) == (
        "Fake NVIDIA GPU", "8.7", 8)
    assert key.shape_profile == "x:1x8/4x8/16x8" and len(key.part_sha256) == 64
    nano = DeviceIdentity("NVIDIA Jetson Orin Nano", "8.7", 8, "R36.4.0")
    agx = DeviceIdentity("NVIDIA Jetson AGX Orin", "8.7", 16, "R36.4.0")
    keys = {EngineKey.for_part(mlp_path, profile, "fp16", "10.3.0.26", SHAPES, identity=i)
            for i in (nano, agx, DeviceIdentity(nano.name, "8.7", 8, "R35.4.1"))}
    assert len(keys) == 3  # same compute capability, three different engines
    with pytest.raises(InvalidArgument, match="no GPU compute capability"):
        EngineKey.for_part(mlp_path, get_profile("cpu-arm64"), "fp32", "10.3", identity=ORIN)


def test_key_holds_the_calibration_data_of_int8_builds(mlp_path):
    profile = get_profile("cloud-t4")

    def key(precision, samples):
        return EngineKey.for_part(mlp_path, profile, precision, "10.3.0.26", SHAPES,
                                  identity=ORIN, calibration=samples)

    a = [{"x": np.ones((2, 8), np.float32)}]
    b = [{"x": np.full((2, 8), 2, np.float32)}]
    assert key("int8", a) != key("int8", b) and key("int8", a) == key("int8", a)
    assert key("fp16", a) == key("fp16", b) == key("fp16", None)  # unused outside int8


def test_key_holds_every_external_data_file(tmp_path):
    import onnx

    model = onnx.load_from_string(onnx_small.mlp(seed=3))
    part = tmp_path / "part.onnx"
    onnx.save_model(model, str(part), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    digests = external_data_digests(part)
    assert len(digests) == 1 and digests[0].startswith("weights.bin:")
    key = EngineKey.for_part(part, get_profile("cloud-t4"), "fp16", "10.3", SHAPES,
                             identity=ORIN)
    assert key.external_data == digests
    data = bytearray((tmp_path / "weights.bin").read_bytes())
    data[0] ^= 1
    (tmp_path / "weights.bin").write_bytes(bytes(data))
    assert EngineKey.for_part(part, get_profile("cloud-t4"), "fp16", "10.3", SHAPES,
                              identity=ORIN) != key
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(NotFound, match=r"weights\.bin"):
        external_data_digests(part)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "a/../../b"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, location):
    import onnx

    model = onnx.load_from_string(onnx_small.mlp(seed=3))
    part = tmp_path / "part.onnx"
    onnx.save_model(model, str(part), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    proto = onnx.load(str(part), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    part.write_bytes(proto.SerializeToString())
    with pytest.raises(InvalidArgument, match="outside the model's folder"):
        external_data_digests(part)


def test_a_file_that_is_not_onnx_is_invalid_argument(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf\xff")
    with pytest.raises(InvalidArgument, match="as an ONNX model"):
        external_data_digests(bad)
    with pytest.raises(InvalidArgument, match="no ONNX file"):
        EngineKey.for_part(tmp_path / "none.onnx", get_profile("cloud-t4"), "fp16", "10",
                           identity=ORIN)


def test_dla_keys_describe_the_static_profile_the_build_uses(mlp_path):
    profile = get_profile("jetson-agx-orin-64gb")
    key = EngineKey.for_part(mlp_path, profile, "fp16", "10.3", SHAPES, dla_core=1,
                             identity=ORIN)
    assert key.shape_profile == "x:4x8/4x8/4x8" and key.build_options == ("dla1",)
    step = EngineFromOnnx(mlp_path, profile, "fp16", SHAPES, dla_core=1)
    assert step.complete_key(key) == key


def test_the_cache_completes_and_checks_a_key_against_its_build(fake_trt, mlp_path, tmp_path):
    profile = get_profile("cloud-t4")
    samples = [{"x": np.ones((2, 8), np.float32)}]
    step = EngineFromOnnx(mlp_path, profile, "int8", SHAPES, calibration=samples)
    bare = EngineKey.for_part(mlp_path, profile, "int8", "10.3.0.26", SHAPES)  # no samples
    cache = EngineCache(tmp_path / "c")
    path = cache.get_or_build(bare, step)
    assert cache.lookup(step.engine_key()) == path  # stored under the completed key
    other = EngineFromOnnx(mlp_path, profile, "int8", SHAPES,
                           calibration=[{"x": np.zeros((2, 8), np.float32)}])
    assert cache.get_or_build(bare, other) != path  # other samples, other engine
    with pytest.raises(InternalError, match="does not describe this build"):
        cache.get_or_build(EngineKey.for_part(mlp_path, profile, "fp16", "10.3.0.26", SHAPES),
                           step)


# -------------------------------------------------------------------- activate_cached
def test_activate_cached_builds_then_loads(fake_trt, mlp_path, tmp_path):
    import onnxruntime as ort

    recipe = {"workspace_mb": 256, "shapes": {"x": [[1, 8], [4, 8], [16, 8]]},
              "version_compatible": True, "dla_core": None}
    step = EngineFromOnnx.from_recipe(mlp_path, get_profile("jetson-orin-nano-8gb"), "fp16",
                                      recipe)
    cache = EngineCache(tmp_path / "c")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    for _ in range(2):
        backend = activate_cached(cache, step.engine_key(), step)
        try:
            np.testing.assert_allclose(backend.infer({"x": x})["y"], ref, rtol=1e-6)
        finally:
            backend.deactivate()
    assert len(fake_trt.BUILDS) == 1  # the second came from the cache
    assert fake_pycuda.driver_stack() == []


def test_a_cached_engine_tensorrt_calls_foreign_is_a_miss(fake_trt, mlp_path, tmp_path, caplog):
    # fake_tensorrt docstring: another device model of the same compute capability only warns
    step = EngineFromOnnx(mlp_path, get_profile("jetson-agx-orin-64gb"), "fp16", SHAPES)
    cache = EngineCache(tmp_path / "c")
    key = step.engine_key()
    activate_cached(cache, key, step).deactivate()
    # The same key (an older key format, a copied cache, a board swap the key cannot see), but
    # TensorRT now warns the plan comes from another device model.
    fake_pycuda.STATE.devices[0].name = "NVIDIA Jetson AGX Orin (swapped)"
    backend = activate_cached(cache, key, step)
    assert backend.infer({"x": np.ones((2, 8), np.float32)})["y"].shape == (2, 4)
    backend.deactivate()
    assert len(fake_trt.BUILDS) == 2 and "rebuilding it on this device" in caplog.text
    header_names = [b["device"]["name"] for b in fake_trt.BUILDS]
    assert header_names == ["Fake NVIDIA GPU", "NVIDIA Jetson AGX Orin (swapped)"]
    activate_cached(cache, key, step).deactivate()  # the rebuilt engine is at home here
    assert len(fake_trt.BUILDS) == 2
