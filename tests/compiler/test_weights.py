"""compiler._weights: every initializer stored once in parts/weights.bin, parts read only their
own ranges, the bundle stays within 1.5x the model whatever the number of cuts."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from tandem.compiler import BundleFromOnnx, CompileOptions, _pipeline
from tandem.compiler._weights import MIN_EXTERNAL_BYTES, WEIGHTS_DIGEST_KEY, WeightStore
from tandem.devices.backends import OnnxRuntimeBackend
from tandem.protocol.bundle import load_bundle
from tests.compiler.test_pipeline import _check_bundle_reproduces

F = onnx.TensorProto.FLOAT


def mlp(width: int = 512, depth: int = 8, seed: int = 0, step: int = 32) -> onnx.ModelProto:
    """A chain of MatMul+Relu layers narrowing by ``step`` from ``width`` (4.4 MiB of weights at
    the defaults): every layer a cut that sends less than the one before."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        w_in, w_out = width - i * step, width - (i + 1) * step
        w = (rng.standard_normal((w_in, w_out)) / np.sqrt(w_in)).astype(np.float32)
        inits.append(nh.from_array(w, f"w{i}"))
        nodes += [h.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  h.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(h.make_node("Identity", [x], ["y"]))
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", F, ["N", width])],
                         [h.make_tensor_value_info("y", F, ["N", width - depth * step])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _compile(tmp_path, model, **options):
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    opts = CompileOptions(**{"targets": ("onnxruntime",), "max_cuts": 8, **options})
    return src, BundleFromOnnx(src, tmp_path / "b", opts)()


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_bundle_is_at_most_one_and_a_half_times_the_model(tmp_path):
    src, result = _compile(tmp_path, mlp())
    interior = [r for r in result.cuts if r.cut.head_flops and r.cut.tail_flops]
    assert len(interior) == 8  # 8 cuts: 17 ONNX parts and as many ORT-optimized ones
    assert _size(tmp_path / "b") <= 1.5 * src.stat().st_size
    weights = tmp_path / "b" / "parts" / "weights.bin"
    model_weights = sum(len(t.raw_data) for t in mlp().graph.initializer)
    assert model_weights <= weights.stat().st_size < 1.01 * model_weights + 64 * 16


def test_every_onnx_file_reads_the_shared_file_and_only_its_own_weights(tmp_path):
    _compile(tmp_path, mlp())
    root = tmp_path / "b"
    with load_bundle(root) as bundle:
        m = bundle.manifest
        assert m.weights == "parts/weights.bin"
        onnx_files = [f for f in m.files if f.path.endswith(".onnx")]
        assert onnx_files and all(f.requires == ("parts/weights.bin",) for f in onnx_files)
        assert m.file("parts/weights.bin").requires == ()
        for cut in m.cuts:
            if not (cut.head_part and cut.tail_part):
                continue
            head = onnx.load(str(bundle.path_of(cut.head_part)), load_external_data=False)
            ranges = []
            for t in head.graph.initializer:
                info = {e.key: e.value for e in t.external_data}
                assert t.data_location == onnx.TensorProto.EXTERNAL, t.name
                assert info["location"] == "weights.bin"
                ranges.append((int(info["offset"]), int(info["length"])))
            own = {t.name for t in head.graph.initializer}
            assert own == {f"w{i}" for i in range(len(own))}  # the head's layers only
            sizes = {t.name: nh.to_array(t).nbytes for t in mlp().graph.initializer}
            assert sum(length for _, length in ranges) == sum(sizes[n] for n in own)
        _check_bundle_reproduces(bundle, mlp())


def test_a_part_runs_from_the_shared_file(tmp_path):
    _compile(tmp_path, mlp())
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    ref = mlp().graph
    expected = x
    for init in ref.initializer:
        expected = np.maximum(expected @ nh.to_array(init), 0)
    with OnnxRuntimeBackend(tmp_path / "b" / "parts" / "full.onnx") as full:
        np.testing.assert_allclose(full.infer({"x": x})["y"], expected, rtol=1e-4, atol=1e-5)


def test_same_content_is_stored_once_and_parts_name_their_weights(tmp_path):
    store = WeightStore(tmp_path / "weights.bin")
    model = mlp(width=96, depth=2)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for t in twin.graph.initializer:
        t.name = "copy_" + t.name  # other names, same bytes
    for n in twin.graph.node:
        n.input[:] = ["copy_" + i if i.startswith("w") else i for i in n.input]
    store.save(model, tmp_path / "a.onnx")
    size = store.size
    store.save(twin, tmp_path / "b.onnx")
    assert store.size == size  # deduplicated by content
    other = mlp(width=96, depth=2, seed=1)
    store.save(other, tmp_path / "c.onnx")
    assert store.size > size

    def weights_digest(path):
        props = onnx.load(str(path), load_external_data=False).metadata_props
        return {p.key: p.value for p in props}[WEIGHTS_DIGEST_KEY]

    # a part file's own bytes change with its weights (engine caches key on them)
    assert weights_digest(tmp_path / "a.onnx") != weights_digest(tmp_path / "c.onnx")
    assert hashlib.sha256((tmp_path / "a.onnx").read_bytes()).digest() != \
        hashlib.sha256((tmp_path / "c.onnx").read_bytes()).digest()
    small = [t for t in onnx.load(str(tmp_path / "a.onnx"), load_external_data=False)
             .graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < MIN_EXTERNAL_BYTES for t in small)


def test_rollback_forgets_what_was_added(tmp_path):
    store = WeightStore(tmp_path / "weights.bin")
    store.save(mlp(width=96, depth=1), tmp_path / "a.onnx")
    mark = store.mark()
    store.save(mlp(width=96, depth=1, seed=5), tmp_path / "b.onnx")
    assert store.size > mark
    store.rollback(mark)
    assert store.size == mark == (tmp_path / "weights.bin").stat().st_size
    store.save(mlp(width=96, depth=1, seed=5), tmp_path / "b.onnx")  # written again
    with OnnxRuntimeBackend(tmp_path / "b.onnx") as b:
        assert b.infer({"x": np.ones((1, 96), np.float32)})["y"].shape == (1, 64)


def test_store_refuses_a_model_outside_its_directory(tmp_path):
    store = WeightStore(tmp_path / "w" / "weights.bin")
    with pytest.raises(ValueError, match="must be in"):
        store.save(mlp(width=64, depth=1), tmp_path / "elsewhere.onnx")


def test_optimizer_weights_beyond_the_budget_are_optimized_on_load(tmp_path, monkeypatch):
    real = WeightStore.adopt

    def grows(self, path):  # as if ONNX Runtime had folded every weight into a new one
        out = real(self, path)
        with open(self.path, "ab") as f:
            f.write(b"\0" * 10**6)
        self.size += 10**6
        return out

    monkeypatch.setattr(WeightStore, "adopt", grows)
    src, result = _compile(tmp_path, mlp(width=96, depth=3))
    arts = [a for a in result.manifest.artifacts if a.target == "onnxruntime"]
    assert arts and all(a.path == a.part and a.extra["optimize"] == "on-load" for a in arts)
    assert _size(tmp_path / "b") <= _pipeline.MAX_BUNDLE_RATIO * src.stat().st_size + 20_000
    with load_bundle(tmp_path / "b") as bundle:
        assert not any(f.path.endswith(".ort.onnx") for f in bundle.manifest.files)
