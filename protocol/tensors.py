"""Tensors on the wire: (name, dtype code, shape, encoding, raw bytes) — never lists of numbers.

OWNED BY the protocol-codec work: to be completed (dtype codes, encodings fp16/int8-affine, zstd,
zero-copy decode). Public API that other modules rely on:

    Tensor.from_array(name, array, encoding=Encoding.RAW, compress=False) -> Tensor
    tensor.to_array() -> numpy.ndarray   (decoded/dequantized to the logical dtype)
    tensor.name, tensor.dtype (DType), tensor.shape (tuple[int, ...]), tensor.encoding
"""
