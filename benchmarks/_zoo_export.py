"""Export the zoo of real architectures used by ``python -m benchmarks.zoo`` (random weights).

torch, torchvision and transformers are NOT dependencies of Tandem: run this with an
interpreter that has them, for example a separate virtual environment::

    python3 -m venv ../torchenv
    ../torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers onnx onnxscript
    ../torchenv/bin/python benchmarks/_zoo_export.py benchmarks/zoo_models

(``python -m benchmarks.zoo --torch-python ../torchenv/bin/python`` runs it for you when the
models are missing.) The output folder is git-ignored; nothing here is committed but this script.

Every model comes from its upstream definition (torchvision's model builders, transformers'
``BertModel``) with seeded random weights, in eval mode, exported by torch's default ONNX
exporter (``torch.onnx.export(..., dynamo=True)``, opset 18) with the weights in the ``.onnx``
file. Input sizes:

======================================  ===================================================
resnet18, mobilenet_v3_small,           ``input`` [batch, 3, 224, 224]
efficientnet_b0
deeplabv3_mobilenet_v3_large            ``input`` [batch, 3, H, W] (dynamic height and width)
vit_small (torchvision VisionTransformer ``input`` [batch, 3, 224, 224]
image 224, patch 16, 6 layers, width 384, 6 heads, MLP 1536)
bert_small (transformers BertModel,     ``input_ids``, ``token_type_ids``, ``attention_mask``
vocab 8192, 4 layers, width 256,        [batch, sequence]
4 heads, intermediate 1024)
======================================  ===================================================

torchvision zero-initialises ViT's classifier: its outputs are constant whatever the weights
before it, which verification must warn about, so ``vit_small`` keeps that upstream head on
purpose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _vision(name: str):
    import torchvision

    if name == "vit_small":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=224, patch_size=16, num_layers=6, num_heads=6,
                                 hidden_dim=384, mlp_dim=1536)
    if name == "deeplabv3_mobilenet_v3_large":
        return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, aux_loss=False)
    return getattr(torchvision.models, name)(weights=None)


class _Bert(torch.nn.Module):
    """transformers' BertModel with a random config; outputs the last hidden state and the
    pooled output as plain tensors."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=1024,
                            max_position_embeddings=512, type_vocab_size=2)
        self.bert = BertModel(config)

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.bert(input_ids=input_ids, token_type_ids=token_type_ids,
                        attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state, out.pooler_output


MODELS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "deeplabv3_mobilenet_v3_large",
          "vit_small", "bert_small")


class _Segmentation(torch.nn.Module):
    """torchvision's segmentation models return a dict; export its ``out`` tensor."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def export(name: str, out_dir: Path) -> dict:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    if name == "bert_small":
        model = _Bert().eval()
        seq = torch.export.Dim("sequence", min=2, max=512)
        ids = torch.randint(0, 8192, (1, 16))
        args = (ids, torch.zeros_like(ids), torch.ones_like(ids))
        names = ["input_ids", "token_type_ids", "attention_mask"]
        outputs = ["last_hidden_state", "pooler_output"]
        dynamic = tuple({0: batch, 1: seq} for _ in names)
    else:
        model = _vision(name).eval()
        if name.startswith("deeplab"):
            model = _Segmentation(model).eval()
            height = torch.export.Dim("height", min=64, max=2048)
            width = torch.export.Dim("width", min=64, max=2048)
            args = (torch.randn(1, 3, 224, 224),)
            dynamic = ({0: batch, 2: height, 3: width},)
            outputs = ["out"]
        else:
            args = (torch.randn(1, 3, 224, 224),)
            dynamic = ({0: batch},)
            outputs = ["logits"]
        names = ["input"]
    path = out_dir / f"{name}.onnx"
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, input_names=names,
                                    output_names=outputs, dynamic_shapes=dynamic,
                                    opset_version=18)
        program.save(str(path), external_data=False)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "file": path.name, "bytes": path.stat().st_size,
            "parameters": params, "export_s": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--only", nargs="*", choices=MODELS, help="export only these models")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name in args.only or MODELS:
        info = export(name, args.out_dir)
        print(json.dumps(info), flush=True)
        done.append(info)
    (args.out_dir / "zoo_export.json").write_text(json.dumps(done, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
