"""Regenerate the torch-exported fixtures in this folder (NOT run by the tests; torch is not a
dependency of Tandem). Real exporters emit patterns onnx.helper-built models do not: shape
arithmetic (Shape→Gather→Concat→Reshape) that shape inference cannot resolve, functions and
external data from the dynamo exporter, BatchNorm, fused attention.

    pip install torch==2.13.0 onnx onnxscript && python tests/compiler/data/export_torch_models.py
"""

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


def main() -> None:
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
