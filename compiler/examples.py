"""Seeded example ONNX models for tests, benchmarks and `tandem example`.

Opset 17, built with onnx.helper only (no torch).

Every builder returns an ``onnx.ModelProto`` that passes ``onnx.checker.check_model`` and runs in
ONNX Runtime on CPU. Weights come from ``numpy.random.default_rng(seed)`` so a builder called
twice with the same seed returns the same bytes.

- ``cnn_chain()``: Conv/Relu/MaxPool x2 -> Flatten -> Gemm. Input ``input`` [1,3,32,32].
- ``residual()``: stem conv + residual blocks (Add skips) -> GAP -> Gemm.
- ``unet()``: two-level U-Net with long skips (Concat), Resize and ConvTranspose upsampling, and
  many Constant nodes (Resize scales, Reshape shapes, Mul/Add scalars), interleaved.
- ``multi_io()``: inputs ``image`` and ``meta``; outputs ``logits`` and ``features`` (the latter
  produced early, so heads of most cuts produce a graph output).
- ``dynamic_batch()``: input ``x`` ["N",3,16,16] -> ... -> ``y`` ["N",10].
- ``dynamic_hw()``: input ``image`` [1,3,"H","W"] (any H, W >= 4) -> a convolutional trunk ->
  GlobalAveragePool -> Gemm -> ``logits`` [1,10]: every image size the convolutions take.
- ``big_model(n_nodes=700)``: residual CNN stem + transformer blocks (attention MatMul chains,
  Softmax, LayerNormalization), about ``n_nodes`` nodes, tens of ms in ORT.
- ``with_external_data(dir)``: saves ``residual()`` with all weights in one external data file.
- ``mobilenet()``: a MobileNet-style classifier with a light head ending in an 8-channel
  bottleneck and a heavy tail, so its cuts trade compute against bytes (the demo's model).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.protocol.lazy import lazy_module

# onnx loads on first use, so importing this module stays light (see tests/test_packaging.py).
if TYPE_CHECKING:
    import onnx
    from onnx import helper, numpy_helper
else:
    onnx = lazy_module("onnx")
    helper = lazy_module("onnx.helper")
    numpy_helper = lazy_module("onnx.numpy_helper")

__all__ = [
    "OPSET",
    "big_model",
    "cnn_chain",
    "dynamic_batch",
    "dynamic_hw",
    "mobilenet",
    "multi_io",
    "random_inputs",
    "residual",
    "save",
    "unet",
    "with_external_data",
]

OPSET = 17
F = 1  # onnx.TensorProto.FLOAT


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def weight(self, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        arr = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const_init(self, arr: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def constant(self, arr: np.ndarray) -> str:
        """A Constant node (not an initializer)."""
        out = self.name("const")
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=self.name("Constant"),
                value=numpy_helper.from_array(np.asarray(arr), out),
            )
        )
        return out

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: str | None = None,
           **attrs: Any) -> str:
        outs = [out or self.name(op_type.lower())] + [self.name(op_type.lower())
                                                       for _ in range(n_out - 1)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0]

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1,
             bias: bool = True, out: str | None = None) -> str:
        w = self.weight((c_out, c_in, k, k))
        ins = [x, w] + ([self.weight((c_out,), 0.1)] if bias else [])
        return self.op("Conv", ins, out=out, kernel_shape=[k, k], pads=[k // 2] * 4,
                       strides=[stride, stride])

    def model(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="tandem-tests")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def cnn_chain(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8)/Relu/MaxPool -> Conv(8->16)/Relu/MaxPool -> Flatten -> Gemm(1024->10)."""
    b = _Builder(seed)
    x = b.conv("input", 3, 8)
    x = b.op("Relu", [x])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv(x, 8, 16)
    x = b.op("Relu", [x])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [x], axis=1)
    b.op("Gemm", [x, b.weight((10, 16 * 8 * 8)), b.weight((10,), 0.1)], out="logits", transB=1)
    return b.model(
        "cnn_chain",
        [helper.make_tensor_value_info("input", F, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", F, [1, 10])],
    )


def _res_block(b: _Builder, x: str, c: int, branch_scale: float | None = None) -> str:
    y = b.conv(x, c, c)
    y = b.op("Relu", [y])
    if branch_scale is None:
        y = b.conv(y, c, c)
    else:  # damp the residual branch so deep stacks keep activations O(1)
        w = b.weight((c, c, 3, 3), branch_scale / np.sqrt(9 * c))
        y = b.op("Conv", [y, w, b.weight((c,), 0.01)], kernel_shape=[3, 3], pads=[1] * 4)
    y = b.op("Add", [x, y])
    return b.op("Relu", [y])


def residual(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """Input [1,3,16,16]: stem Conv(s2)/Relu, block, Conv(s2)/Relu, block, GAP, Flatten, Gemm.

    A block is [Conv, Relu, Conv, Add(skip), Relu]; activations shrink (2048 B after the stem,
    1024 B after the second stride-2 conv), so cuts after the downsampling convs beat cut 0.
    """
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("input", 3, channels, stride=2)])  # [1,8,8,8]
    x = _res_block(b, x, channels)
    x = b.op("Relu", [b.conv(x, channels, 2 * channels, stride=2)])  # [1,16,4,4]
    x = _res_block(b, x, 2 * channels)
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    b.op("Gemm", [x, b.weight((10, 2 * channels)), b.weight((10,), 0.1)], out="logits",
         transB=1)
    return b.model(
        "residual",
        [helper.make_tensor_value_info("input", F, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", F, [1, 10])],
    )


def unet(seed: int = 0) -> onnx.ModelProto:
    """Two-level U-Net on [1,3,32,32] with long skips and many interleaved Constant nodes."""
    b = _Builder(seed)
    # Constants defined up front (as exporters often do) and right before use.
    scale_in = b.constant(np.array(0.5, np.float32))
    resize_scales = b.constant(np.array([1, 1, 2, 2], np.float32))
    x = b.op("Mul", ["input", scale_in])
    enc1 = b.op("Relu", [b.conv(x, 3, 8)])  # [1,8,32,32] long skip
    p1 = b.op("MaxPool", [enc1], kernel_shape=[2, 2], strides=[2, 2])
    enc2 = b.op("Relu", [b.conv(p1, 8, 16)])  # [1,16,16,16] skip
    p2 = b.op("MaxPool", [enc2], kernel_shape=[2, 2], strides=[2, 2])
    bott = b.op("Relu", [b.conv(p2, 16, 32)])  # [1,32,8,8]
    # A flatten/unflatten round trip through Reshape with Constant shapes.
    flat = b.op("Reshape", [bott, b.constant(np.array([1, 32, 64], np.int64))])
    shift = b.constant(np.array(0.1, np.float32))
    flat = b.op("Add", [flat, shift])
    bott = b.op("Reshape", [flat, b.constant(np.array([1, 32, 8, 8], np.int64))])
    gain = b.constant(np.array(1.5, np.float32))
    bott = b.op("Mul", [bott, gain])
    # Decoder level 2: Resize (nearest) x2, Concat with enc2.
    up2 = b.op("Resize", [bott, "", resize_scales], mode="nearest")  # [1,32,16,16]
    cat2 = b.op("Concat", [up2, enc2], axis=1)  # [1,48,16,16]
    dec2 = b.op("Relu", [b.conv(cat2, 48, 16)])
    half = b.constant(np.array(0.5, np.float32))
    dec2 = b.op("Mul", [dec2, half])
    # Decoder level 1: ConvTranspose x2, Concat with enc1.
    wt = b.weight((16, 8, 2, 2))
    up1 = b.op("ConvTranspose", [dec2, wt], kernel_shape=[2, 2], strides=[2, 2])  # [1,8,32,32]
    cat1 = b.op("Concat", [up1, enc1], axis=1)  # [1,16,32,32]
    dec1 = b.op("Relu", [b.conv(cat1, 16, 8)])
    one = b.constant(np.array(1.0, np.float32))
    dec1 = b.op("Add", [dec1, one])
    head = b.conv(dec1, 8, 1, k=1)
    b.op("Sigmoid", [head], out="mask")
    return b.model(
        "unet",
        [helper.make_tensor_value_info("input", F, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("mask", F, [1, 1, 32, 32])],
    )


def multi_io(seed: int = 0) -> onnx.ModelProto:
    """Inputs image [1,3,16,16] and meta [1,4]; outputs logits [1,5] and features [1,4,8,8].

    ``meta`` is read only near the end and ``features`` (a graph output) early, so interior
    cuts carry both a raw input and a head-produced graph output.
    """
    b = _Builder(seed)
    feat = b.op("Relu", [b.conv("image", 3, 4, stride=2)], out="features")  # [1,4,8,8]
    x = b.op("Relu", [b.conv(feat, 4, 8, stride=2)])  # [1,8,4,4]
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)  # [1,8]
    m = b.op("Gemm", ["meta", b.weight((8, 4)), b.weight((8,), 0.1)], transB=1)
    m = b.op("Relu", [m])
    x = b.op("Concat", [x, m], axis=1)  # [1,16]
    b.op("Gemm", [x, b.weight((5, 16)), b.weight((5,), 0.1)], out="logits", transB=1)
    return b.model(
        "multi_io",
        [helper.make_tensor_value_info("image", F, [1, 3, 16, 16]),
         helper.make_tensor_value_info("meta", F, [1, 4])],
        [helper.make_tensor_value_info("logits", F, [1, 5]),
         helper.make_tensor_value_info("features", F, [1, 4, 8, 8])],
    )


def dynamic_batch(seed: int = 0) -> onnx.ModelProto:
    """Input x ["N",3,16,16] -> Conv/Relu -> Conv/Relu -> GAP -> Reshape([-1,8]) -> MatMul -> y."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("x", 3, 8)])
    x = b.op("Relu", [b.conv(x, 8, 8)])
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Reshape", [x, b.constant(np.array([-1, 8], np.int64))])
    x = b.op("MatMul", [x, b.weight((8, 10))])
    b.op("Add", [x, b.weight((10,), 0.1)], out="y")
    return b.model(
        "dynamic_batch",
        [helper.make_tensor_value_info("x", F, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", F, ["N", 10])],
    )


def dynamic_hw(seed: int = 0) -> onnx.ModelProto:
    """Input image [1,3,"H","W"]: Conv(s2)/Relu -> Conv(s2)/Relu -> Conv/Relu -> GAP -> Gemm.

    The strided convolutions shrink the activations (a cut after the second sends half the
    input's bytes), and nothing depends on H or W but the pooling, so any size >= 4 runs."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("image", 3, 8, stride=2)])  # [1,8,H/2,W/2]
    x = b.op("Relu", [b.conv(x, 8, 6, stride=2)])  # [1,6,H/4,W/4]: 1/2 the input's bytes
    x = b.op("Relu", [b.conv(x, 6, 16)])
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    b.op("Gemm", [x, b.weight((10, 16)), b.weight((10,), 0.1)], out="logits", transB=1)
    return b.model(
        "dynamic_hw",
        [helper.make_tensor_value_info("image", F, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", F, [1, 10])],
    )


def _transformer_block(b: _Builder, x: str, d: int, tokens: int, heads: int) -> str:
    """Pre-LN attention + MLP on x [1, tokens, d]; 26 nodes (Constants included)."""
    hd = d // heads
    ln = b.op("LayerNormalization", [x, b.const_init(np.ones(d, np.float32)),
                                     b.const_init(np.zeros(d, np.float32))], axis=-1)
    split_shape = b.constant(np.array([1, tokens, heads, hd], np.int64))
    q = b.op("MatMul", [ln, b.weight((d, d))])
    k = b.op("MatMul", [ln, b.weight((d, d))])
    v = b.op("MatMul", [ln, b.weight((d, d))])
    q = b.op("Transpose", [b.op("Reshape", [q, split_shape])], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [k, split_shape])], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [v, split_shape])], perm=[0, 2, 1, 3])
    scores = b.op("MatMul", [q, k])  # [1, h, T, T]
    scores = b.op("Mul", [scores, b.constant(np.array(1.0 / np.sqrt(hd), np.float32))])
    probs = b.op("Softmax", [scores], axis=-1)
    ctx = b.op("MatMul", [probs, v])  # [1, h, T, hd]
    ctx = b.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.constant(np.array([1, tokens, d], np.int64))])
    x = b.op("Add", [x, b.op("MatMul", [ctx, b.weight((d, d))])])
    ln2 = b.op("LayerNormalization", [x, b.const_init(np.ones(d, np.float32)),
                                      b.const_init(np.zeros(d, np.float32))], axis=-1)
    h = b.op("Relu", [b.op("MatMul", [ln2, b.weight((d, 2 * d))])])
    return b.op("Add", [x, b.op("MatMul", [h, b.weight((2 * d, d))])])


def big_model(n_nodes: int = 700, seed: int = 0, *, width: int = 16,
              image: int = 32) -> onnx.ModelProto:
    """About ``n_nodes`` nodes: residual CNN blocks then transformer blocks.

    Input ``input`` [1,3,image,image], output ``logits`` [1,10]; ``width`` channels (and the
    transformer width). 30% of the nodes are conv blocks (5 nodes each), the rest transformer
    blocks (26 nodes each); conv blocks fill the remainder. The defaults keep tensors small (a
    fast test model); ``width=32, image=64`` has about 1.6 GFLOP, a realistic edge workload.
    """
    if width % 2 or image % 4:
        raise ValueError("width must be even and image a multiple of 4")
    c, side = width, image // 4
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("input", 3, c, stride=2)])  # [1, c, image/2, image/2]
    fixed = 2 + 2 + 3 + 3  # stem, downsampling conv, to-tokens, classifier head
    tf_blocks = max(1, (n_nodes - fixed - int(0.3 * n_nodes)) // 26)
    conv_blocks = max(1, (n_nodes - fixed - 26 * tf_blocks) // 5)
    for _ in range(conv_blocks):
        x = _res_block(b, x, c, branch_scale=0.2)
    x = b.op("Relu", [b.conv(x, c, c, stride=2)])  # [1, c, image/4, image/4]
    tokens = side * side
    x = b.op("Reshape", [x, b.constant(np.array([1, c, tokens], np.int64))])
    x = b.op("Transpose", [x], perm=[0, 2, 1])  # [1, tokens, c]
    for _ in range(tf_blocks):
        x = _transformer_block(b, x, c, tokens, heads=2)
    x = b.op("ReduceMean", [x], axes=[1], keepdims=0)  # [1, c]
    x = b.op("MatMul", [x, b.weight((c, 10))])
    b.op("Add", [x, b.weight((10,), 0.1)], out="logits")
    return b.model(
        "big_model",
        [helper.make_tensor_value_info("input", F, [1, 3, image, image])],
        [helper.make_tensor_value_info("logits", F, [1, 10])],
    )


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save ``model`` to ``path`` (one file) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def with_external_data(directory: str | Path, model: onnx.ModelProto | None = None) -> Path:
    """Save ``model`` (default ``residual()``) as ``directory/model.onnx`` + ``model.onnx.data``.

    Every initializer goes to the one external file (``size_threshold=0``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = onnx.ModelProto.FromString((model or residual()).SerializeToString())
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded float32 inputs for every (float) graph input, symbolic dims = ``batch``."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _separable(b: _Builder, x: str, c_in: int, c_out: int, stride: int = 1) -> str:
    """MobileNet's depthwise-separable block: depthwise 3x3 (one filter per channel) -> Relu ->
    pointwise 1x1 -> Relu. He-scaled weights keep activations in range through deep stacks."""
    dw = b.weight((c_in, 1, 3, 3), np.sqrt(2.0 / 9))
    x = b.op("Conv", [x, dw, b.weight((c_in,), 0.1)], kernel_shape=[3, 3], pads=[1] * 4,
             strides=[stride, stride], group=c_in)
    x = b.op("Relu", [x])
    pw = b.weight((c_out, c_in, 1, 1), np.sqrt(2.0 / c_in))
    x = b.op("Conv", [x, pw, b.weight((c_out,), 0.1)], kernel_shape=[1, 1])
    return b.op("Relu", [x])


def mobilenet(seed: int = 0, image: int = 160, classes: int = 1000) -> onnx.ModelProto:
    """A MobileNet-style classifier whose cuts trade compute against bytes (the demo's model).

    Random weights (seeded): the answers mean nothing; the costs are what matter. Input
    ``image`` [1,3,image,image] (160: 307 KB float32), output ``logits`` [1,classes].

    A light head (stem conv and three depthwise-separable blocks down to 64x20x20, a few % of
    the multiply-adds) ends in a 1x1 bottleneck to 8 channels (8x20x20: 12.8 KB, 4 % of the
    input), as split-computing models put one (BottleNet, Matsubara et al.); the heavy tail
    expands it to 256 channels and runs eight depthwise-separable blocks (20x20x256, then
    10x10x512), then global average pooling and a fully connected layer (about 200 M
    multiply-adds in all, 7 MB of weights). So sending the input costs the most bytes and no
    edge compute, the bottleneck a little compute and few bytes, and all-local every
    multiply-add on the device.
    """
    b = _Builder(seed)
    x = b.op("Conv", ["image", b.weight((16, 3, 3, 3), np.sqrt(2.0 / 27)),
                      b.weight((16,), 0.1)], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2])
    x = b.op("Relu", [x])
    x = _separable(b, x, 16, 24, stride=2)
    x = _separable(b, x, 24, 32)
    x = _separable(b, x, 32, 64, stride=2)
    # the bottleneck: 64 -> 8 channels, no Relu (a linear bottleneck, as MobileNetV2's)
    x = b.op("Conv", [x, b.weight((8, 64, 1, 1), np.sqrt(1.0 / 64)), b.weight((8,), 0.1)],
             kernel_shape=[1, 1])
    x = b.op("Relu", [b.op("Conv", [x, b.weight((256, 8, 1, 1), np.sqrt(2.0 / 8)),
                                    b.weight((256,), 0.1)], kernel_shape=[1, 1])])
    for _ in range(4):
        x = _separable(b, x, 256, 256)
    x = _separable(b, x, 256, 512, stride=2)
    for _ in range(3):
        x = _separable(b, x, 512, 512)
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    b.op("Gemm", [x, b.weight((classes, 512)), b.weight((classes,), 0.1)], out="logits",
         transB=1)
    return b.model(
        "mobilenet",
        [helper.make_tensor_value_info("image", F, [1, 3, image, image])],
        [helper.make_tensor_value_info("logits", F, [1, classes])],
    )
