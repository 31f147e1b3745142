"""Regenerate the torch-exported fixtures in this folder (NOT run by the tests; torch is not a
dependency of Tandem). Real exporters emit patterns onnx.helper-built models do not: shape
arithmetic (Shape→Gather→Concat→Reshape) that shape inference cannot resolve, functions and
external data from the dynamo exporter, BatchNorm, fused attention.

    pip install torch==2.13.0 onnx onnxscript && python tests/compiler/data/export_torch_models.py

Small regressions of what the zoo (``benchmarks/zoo.py``) broke, from the same upstream code at a
toy size (torch 2.14.1, torchvision 0.29.1, transformers; ``... export_torch_models.py segish
bertish vitzero``):

- ``segish_dynamo.onnx``: DeepLab's pattern, dynamic batch, height and width; the output is
  resized to the input's size, which the exporter reads with ``Shape`` at the very end, and the
  sizes in between are shape arithmetic on it.
- ``bertish_dynamo.onnx``: transformers' ``BertModel`` (random config: vocab 100, width 16, two
  layers, 64 positions): integer inputs that must stay inside the embedding tables.
- ``vitzero_dynamo.onnx``: torchvision's ``VisionTransformer`` at 32x32, whose classifier is
  zero-initialised upstream: its outputs are constant.
"""

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, c, stride=1):
        super().__init__()
        cin = c if stride == 1 else c // 2
        self.c1, self.b1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.down = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, c, 1, stride,
                                                                     bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(Block(8), Block(16, 2), Block(32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ViTish(nn.Module):
    def __init__(self, d=32, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.enc(t).mean(1))


class Segish(nn.Module):
    """DeepLab's shape pattern at toy size: strided features, a residual block, a head, and the
    logits resized back to the input's height and width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.Hardswish())
        self.block = Block(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        size = x.shape[-2:]
        y = self.head(self.down(self.block(self.stem(x))))
        return nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)


class Bertish(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=64, type_vocab_size=2))

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.bert(input_ids=input_ids, token_type_ids=token_type_ids,
                        attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def _save_small(program, path: Path) -> None:
    """Save without the nodes' debug metadata (stack traces: most of a small export's bytes)."""
    import onnx

    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.ClearField("doc_string")
        node.ClearField("metadata_props")
    onnx.save_model(model, str(path))


def zoo_regressions(names) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    if "segish" in names:
        model = Segish().eval()
        dims = {0: batch, 2: torch.export.Dim("height", min=16, max=1024),
                3: torch.export.Dim("width", min=16, max=1024)}
        program = torch.onnx.export(model, (torch.randn(1, 3, 64, 48),), dynamo=True,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=(dims,), opset_version=18)
        _save_small(program, HERE / "segish_dynamo.onnx")
    if "bertish" in names:
        model = Bertish().eval()
        seq = torch.export.Dim("sequence", min=2, max=64)
        ids = torch.randint(0, 100, (1, 8))
        program = torch.onnx.export(
            model, (ids, torch.zeros_like(ids), torch.ones_like(ids)), dynamo=True,
            input_names=["input_ids", "token_type_ids", "attention_mask"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in range(3)), opset_version=18)
        _save_small(program, HERE / "bertish_dynamo.onnx")
    if "vitzero" in names:
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                  hidden_dim=16, mlp_dim=32, num_classes=10).eval()
        program = torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), dynamo=True,
                                    input_names=["input"], output_names=["logits"],
                                    opset_version=18)
        _save_small(program, HERE / "vitzero_dynamo.onnx")


def main() -> None:
    names = sys.argv[1:]
    if names:
        zoo_regressions(names)
        return
    for name, model in (("resnetish", ResNetish()), ("vitish", ViTish())):
        model.eval()
        x = torch.randn(1, 3, 32, 32)
        torch.onnx.export(model, (x,), HERE / f"{name}_torchscript.onnx", input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"],
                                    output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
        program.save(str(HERE / f"{name}_dynamo.onnx"), external_data=True)


if __name__ == "__main__":
    main()
