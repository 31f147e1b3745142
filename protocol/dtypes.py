"""The one table of element types and wire encodings, shared by every package.

One row per element type names it five ways — the bundle manifest's name (``"float32"``), the
ONNX ``TensorProto`` code (1), ONNX Runtime's type string (``"tensor(float)"``), the numpy
dtype, and the wire's :class:`DType` code when a tensor of that type can travel in a
:class:`~tandem.protocol.tensors.Tensor` — with its size in bytes::

    by_onnx(11).name                 # "float64"
    by_ort("tensor(float)").wire     # DType.FLOAT32
    by_name("bfloat16").onnx         # 16
    wire_dtype_for(11)               # UnsupportedDType: float64 cannot travel on the wire ...
    encodings_for(DType.FLOAT32)     # (Encoding.RAW, Encoding.FP16, Encoding.INT8_AFFINE)
    encoding_by_name("int8")         # Encoding.INT8_AFFINE (the manifest's name for it)

The codec and tensors, the bundle schema (``TensorSpec.dtype``, the lossy encodings a cut's
verification records), the ONNX Runtime backend and the compiler all read this table; none keeps
a table of its own. Adding a type or an encoding is one row here (plus, for a new wire code, a
line in ``protocol/SPEC.md`` and a golden vector).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from tandem.protocol.errors import UnsupportedDType

__all__ = [
    "DTYPES",
    "LOSSY_ENCODINGS",
    "DType",
    "DTypeInfo",
    "Encoding",
    "UnsupportedDType",
    "by_name",
    "by_numpy",
    "by_onnx",
    "by_ort",
    "by_wire",
    "encoding_by_name",
    "encoding_name",
    "encodings_for",
    "storage_itemsize",
    "wire_dtype_for",
]


class DType(enum.IntEnum):
    """Element type of a tensor on the wire. Codes never change meaning; new types get new codes."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3  # raw 16-bit patterns; numpy sees them as uint16
    INT8 = 4
    UINT8 = 5
    INT32 = 6
    INT64 = 7
    BOOL = 8

    @property
    def itemsize(self) -> int:
        return _WIRE_STORAGE[self].itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        """The little-endian numpy dtype of a RAW tensor of this type (uint16 for bfloat16)."""
        return _WIRE_STORAGE[self]


class Encoding(enum.IntEnum):
    """How a tensor's elements are stored on the wire. Codes never change meaning."""

    RAW = 0  # the logical dtype's little-endian bytes
    FP16 = 1  # a float32 tensor cast to float16 (decoded back to float32)
    INT8_AFFINE = 2  # a float32 tensor quantized per tensor with (scale, zero_point)


@dataclass(frozen=True, slots=True)
class DTypeInfo:
    """One element type, named every way Tandem meets it.

    ``itemsize`` is bytes per element (the 4-bit types are rounded up to 1; ``string`` counts a
    pointer, 8). ``numpy`` is the numpy dtype that holds the values, None where numpy has none
    (bfloat16, the float8 and 4-bit types without ``ml_dtypes``, strings). ``wire`` is the wire
    code, None when a tensor of this type cannot travel (cast it first, or cut elsewhere).
    """

    name: str
    onnx: int
    ort: str
    itemsize: int
    numpy: np.dtype | None
    wire: DType | None
    is_float: bool = False

    @property
    def encodings(self) -> tuple[Encoding, ...]:
        """The wire encodings a tensor of this type may use (none when it cannot travel)."""
        return () if self.wire is None else encodings_for(self.wire)


def _row(name: str, onnx: int, itemsize: int, numpy: str | None, wire: DType | None = None,
         *, ort: str | None = None, is_float: bool = False) -> DTypeInfo:
    return DTypeInfo(name, onnx, ort or f"tensor({name})", itemsize,
                     None if numpy is None else np.dtype(numpy), wire, is_float)


#: Every element type a bundle may describe, in ONNX code order.
DTYPES: tuple[DTypeInfo, ...] = (
    _row("float32", 1, 4, "<f4", DType.FLOAT32, ort="tensor(float)", is_float=True),
    _row("uint8", 2, 1, "u1", DType.UINT8),
    _row("int8", 3, 1, "i1", DType.INT8),
    _row("uint16", 4, 2, "<u2"),
    _row("int16", 5, 2, "<i2"),
    _row("int32", 6, 4, "<i4", DType.INT32),
    _row("int64", 7, 8, "<i8", DType.INT64),
    _row("string", 8, 8, None),
    _row("bool", 9, 1, "?", DType.BOOL),
    _row("float16", 10, 2, "<f2", DType.FLOAT16, is_float=True),
    _row("float64", 11, 8, "<f8", ort="tensor(double)", is_float=True),
    _row("uint32", 12, 4, "<u4"),
    _row("uint64", 13, 8, "<u8"),
    _row("complex64", 14, 8, "<c8"),
    _row("complex128", 15, 16, "<c16"),
    _row("bfloat16", 16, 2, None, DType.BFLOAT16, is_float=True),
    _row("float8e4m3fn", 17, 1, None),
    _row("float8e4m3fnuz", 18, 1, None),
    _row("float8e5m2", 19, 1, None),
    _row("float8e5m2fnuz", 20, 1, None),
    _row("uint4", 21, 1, None),
    _row("int4", 22, 1, None),
)  # fmt: skip

# Storage of a RAW wire tensor per wire code (bfloat16 travels as its uint16 bit patterns).
_WIRE_STORAGE: dict[DType, np.dtype] = {
    info.wire: info.numpy for info in DTYPES if info.wire is not None and info.numpy is not None
}
_WIRE_STORAGE[DType.BFLOAT16] = np.dtype("<u2")

#: The lossy wire encodings, by the name the bundle manifest records their verification under.
LOSSY_ENCODINGS: Mapping[str, Encoding] = MappingProxyType(
    {"fp16": Encoding.FP16, "int8": Encoding.INT8_AFFINE})

# bytes per stored element of each (wire dtype, encoding) that exists; nothing else does
_STORAGE: dict[tuple[DType, Encoding], int] = {(d, Encoding.RAW): d.itemsize for d in DType}
_STORAGE[(DType.FLOAT32, Encoding.FP16)] = 2
_STORAGE[(DType.FLOAT32, Encoding.INT8_AFFINE)] = 1

_BY_NAME = {info.name: info for info in DTYPES}
_BY_ONNX = {info.onnx: info for info in DTYPES}
_BY_ORT = {info.ort: info for info in DTYPES}
_BY_WIRE = {info.wire: info for info in DTYPES if info.wire is not None}
_BY_NUMPY = {info.numpy: info for info in DTYPES if info.numpy is not None}
_WIRE_NAMES = ", ".join(_BY_WIRE[d].name for d in DType)


def _find(table: Mapping, key: object, kind: type | tuple[type, ...], what: str) -> DTypeInfo:
    info = table.get(key) if isinstance(key, kind) and not isinstance(key, bool) else None
    if info is None:
        raise UnsupportedDType(f"{what} {key!r} is not one Tandem knows")
    return info


def by_name(name: str) -> DTypeInfo:
    """The row of a manifest dtype name (``"float32"``); UnsupportedDType if unknown."""
    return _find(_BY_NAME, name, str, "dtype")


def by_onnx(code: int) -> DTypeInfo:
    """The row of an ONNX ``TensorProto`` data type code; UnsupportedDType if unknown."""
    return _find(_BY_ONNX, int(code) if isinstance(code, np.integer) else code, int,
                 "ONNX element type")


def by_ort(type_str: str) -> DTypeInfo:
    """The row of an ONNX Runtime type string (``NodeArg.type``, e.g. ``"tensor(float)"``)."""
    return _find(_BY_ORT, type_str, str, "ONNX Runtime type")


def by_numpy(dtype: object) -> DTypeInfo:
    """The row of a numpy dtype (any byte order; an ``ml_dtypes`` bfloat16 is bfloat16)."""
    try:
        nd = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        raise UnsupportedDType(f"{dtype!r} is not a numpy dtype") from None
    if nd.name == "bfloat16" and nd.itemsize == 2:
        return _BY_NAME["bfloat16"]
    return _find(_BY_NUMPY, nd.newbyteorder("<"), np.dtype, "numpy dtype")


def by_wire(dtype: DType | int) -> DTypeInfo:
    """The row of a wire dtype code."""
    try:
        return _BY_WIRE[DType(dtype)]
    except ValueError:
        raise UnsupportedDType(f"unknown wire dtype code {dtype!r}") from None


def wire_dtype_for(onnx_code: int) -> DType:
    """The wire dtype a tensor of ONNX element type ``onnx_code`` travels as, or
    :class:`UnsupportedDType` naming the type when it cannot travel (the compiler refuses such
    a frontier, or casts it to a wire type and verifies the cast)."""
    info = by_onnx(onnx_code)
    if info.wire is None:
        raise UnsupportedDType(
            f"{info.name} tensors cannot travel on the wire (wire dtypes: {_WIRE_NAMES})")
    return info.wire


def encodings_for(dtype: DType) -> tuple[Encoding, ...]:
    """The encodings a wire tensor of ``dtype`` may use: RAW always; FP16 and INT8_AFFINE only
    for FLOAT32."""
    return tuple(e for e in Encoding if (dtype, e) in _STORAGE)


def storage_itemsize(dtype: DType, encoding: Encoding) -> int | None:
    """Bytes per stored element of a ``dtype`` tensor in ``encoding``; None where that
    encoding is not defined for that dtype."""
    return _STORAGE.get((dtype, encoding))


def encoding_by_name(name: str) -> Encoding:
    """The wire encoding of a lossy encoding's manifest name (``"fp16"``, ``"int8"``)."""
    enc = LOSSY_ENCODINGS.get(name) if isinstance(name, str) else None
    if enc is None:
        raise UnsupportedDType(f"unknown encoding {name!r} (known: {', '.join(LOSSY_ENCODINGS)})")
    return enc


def encoding_name(encoding: Encoding) -> str:
    """The manifest name of a lossy wire encoding (``Encoding.FP16`` -> ``"fp16"``)."""
    for name, enc in LOSSY_ENCODINGS.items():
        if enc == encoding:
            return name
    raise UnsupportedDType(f"{Encoding(encoding).name} is not a lossy encoding")
