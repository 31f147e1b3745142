"""ONNX in, verified split bundle out: analysis, cuts, extraction, verification, lowering."""

__all__: list[str] = []
