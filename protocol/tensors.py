"""Tensors on the wire: (name, dtype code, shape, encoding, raw bytes) — never lists of numbers.

A :class:`Tensor` holds the bytes exactly as they travel (see ``protocol/SPEC.md``, "Tensors"):
little-endian, C order, after the optional lossy *encoding* (fp16 cast or int8 affine
quantization) and the optional zstd *compression*. :meth:`Tensor.to_array` turns them back into
a numpy array of the logical dtype.

Zero copy: :meth:`Tensor.from_array` keeps a read-only view of a C-contiguous little-endian
array instead of copying it (do not mutate the array while the tensor is in use), and a tensor
decoded from a frame is a view of the received buffer; ``to_array()`` of an uncompressed RAW
tensor is then a read-only ``np.frombuffer`` view of that buffer.

INT8_AFFINE (per tensor, deterministic; ``lo``, ``hi``, ``scale`` and ``zero_point`` are computed in
float64 from the float32 extremes, ``q`` and the dequantized values in float32)::

    lo = min(x.min(), 0);  hi = max(x.max(), 0)
    scale = float32((hi - lo) / 255), or 1.0 when hi == lo, and at least the smallest
            normal float32 (a subnormal scale would lose the precision the bound needs)
    zero_point = clip(round_half_even(-128 - lo / scale), -128, 127)
    q = clip(round_half_even(x / scale) + zero_point, -128, 127)        as int8
    dequant(q) = (float32(q) - zero_point) * float32(scale)             as float32, clamped
                 to the finite float32 range (only matters within 1 ulp of its top)

Every finite ``x`` comes back within ``scale / 2`` (plus float32 rounding). Non-finite input is
an :class:`~tandem.protocol.errors.InvalidArgument`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tandem.protocol.dtypes import DType, Encoding, by_numpy, storage_itemsize
from tandem.protocol.errors import InvalidArgument, MalformedMessage, UnsupportedDType

__all__ = ["DType", "Encoding", "Tensor"]


_NUMPY: dict[DType, np.dtype] = {d: d.numpy_dtype for d in DType}
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("i1")
_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32
_F32_MAX = float(np.finfo(np.float32).max)

_ZSTD_LEVEL = 3


def _readonly_bytes_view(buf: object) -> bytes | memoryview:
    if isinstance(buf, bytes):
        return buf
    mv = memoryview(buf)  # type: ignore[arg-type]
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv.toreadonly()


def _zstd():
    import zstandard  # light, but only needed when compression is used

    return zstandard


def _decompress(data: bytes | memoryview, expected: int) -> bytes:
    """Decompress one zstd frame of exactly ``expected`` bytes; MalformedMessage otherwise.

    The frame must declare its content size and it must equal ``expected`` (which the caller
    has already checked against its limits), so nothing larger is ever allocated.
    """
    zstandard = _zstd()
    try:
        declared = zstandard.frame_content_size(data)
        if declared != expected:
            raise MalformedMessage(
                f"zstd frame declares {declared} bytes, tensor needs {expected}"
            )
        dobj = zstandard.ZstdDecompressor().decompressobj(write_size=max(expected, 1))
        out = dobj.decompress(data)
        if not dobj.eof or dobj.unused_data or len(out) != expected:
            raise MalformedMessage("zstd payload is not exactly one complete frame")
        return out
    except zstandard.ZstdError as exc:
        raise MalformedMessage(f"bad zstd payload: {exc}") from exc


def _quantize(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """INT8 affine quantization of a float32 array (formula in the module docstring)."""
    if x.size and not np.isfinite(x).all():
        raise InvalidArgument("INT8_AFFINE needs finite values (found NaN or inf)")
    lo = min(float(x.min()), 0.0) if x.size else 0.0
    hi = max(float(x.max()), 0.0) if x.size else 0.0
    scale = 1.0 if hi == lo else max(float(np.float32((hi - lo) / 255.0)), _TINY)
    zero_point = int(np.clip(np.rint(-128.0 - lo / scale), -128, 127))
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(x / np.float32(scale)) + np.float32(zero_point)
    q = np.clip(q, -128, 127).astype(_I8)
    return q, scale, zero_point


@dataclass(frozen=True, slots=True, repr=False)
class Tensor:
    """One named tensor as it travels on the wire.

    ``data`` is the wire payload (after encoding, and zstd-compressed if ``compressed``).
    Build tensors with :meth:`from_array`; the constructor checks consistency and raises
    :class:`~tandem.protocol.errors.InvalidArgument` on a mismatch.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    data: bytes | memoryview
    encoding: Encoding = Encoding.RAW
    compressed: bool = False
    scale: float = 1.0  # INT8_AFFINE only
    zero_point: int = 0  # INT8_AFFINE only
    _plain: bytes | memoryview | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidArgument(f"tensor name must be a str, not {type(self.name).__name__}")
        try:
            dtype = self.dtype if type(self.dtype) is DType else DType(self.dtype)
            encoding = self.encoding if type(self.encoding) is Encoding else Encoding(self.encoding)
        except ValueError as exc:
            raise InvalidArgument(f"tensor {self.name!r}: {exc}") from exc
        shape = tuple(self.shape)
        for d in shape:
            if type(d) is not int or d < 0:
                raise InvalidArgument(f"tensor {self.name!r}: bad dimension {d!r} in {shape}")
        item = storage_itemsize(dtype, encoding)
        if item is None:
            raise InvalidArgument(
                f"tensor {self.name!r}: encoding {encoding.name} needs a FLOAT32 tensor, "
                f"not {dtype.name}"
            )
        if encoding is Encoding.INT8_AFFINE:
            if not _TINY <= self.scale <= _F32_MAX:  # a normal float32, or dequant breaks
                raise InvalidArgument(
                    f"tensor {self.name!r}: scale must be a normal float32 in "
                    f"[{_TINY:g}, {_F32_MAX:g}], not {self.scale!r}")
            if type(self.zero_point) is not int or not -128 <= self.zero_point <= 127:
                raise InvalidArgument(f"tensor {self.name!r}: zero_point must be in [-128, 127]")
        try:
            data = _readonly_bytes_view(self.data)
        except TypeError as exc:
            raise InvalidArgument(f"tensor {self.name!r}: data is not bytes-like") from exc
        plain = self._plain
        nbytes = math.prod(shape) * item
        if not self.compressed:
            if len(data) != nbytes:
                raise InvalidArgument(
                    f"tensor {self.name!r}: shape {shape} x {item} bytes = {nbytes} bytes, "
                    f"data has {len(data)}"
                )
            plain = data
        elif plain is not None and len(plain) != nbytes:
            raise InvalidArgument(f"tensor {self.name!r}: decompressed size disagrees with shape")
        elif plain is None:  # compressed bytes from outside: hold them to what decoders accept
            try:  # one zstd frame declaring our size, nothing after it (SPEC §3)
                plain = _decompress(data, nbytes)
            except MalformedMessage as exc:
                raise InvalidArgument(f"tensor {self.name!r}: {exc}") from exc
        if dtype is DType.BOOL and plain is not None and len(plain) and \
                np.frombuffer(plain, np.uint8).max() > 1:
            raise InvalidArgument(f"tensor {self.name!r}: bool bytes must be 0 or 1")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "encoding", encoding)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "compressed", bool(self.compressed))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "_plain", plain)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def _trusted(
        cls, name: str, dtype: DType, shape: tuple[int, ...], data: bytes | memoryview,
        encoding: Encoding, compressed: bool, scale: float, zero_point: int,
        plain: bytes | memoryview | None,
    ) -> Tensor:
        """Build without re-checking: for the codec, which has checked every field already."""
        self = object.__new__(cls)
        for attr, value in (
            ("name", name), ("dtype", dtype), ("shape", shape), ("data", data),
            ("encoding", encoding), ("compressed", compressed), ("scale", scale),
            ("zero_point", zero_point), ("_plain", plain),
        ):
            object.__setattr__(self, attr, value)
        return self

    @classmethod
    def from_array(
        cls,
        name: str,
        array: np.ndarray,
        encoding: Encoding = Encoding.RAW,
        compress: bool = False,
        *,
        dtype: DType | None = None,
    ) -> Tensor:
        """A tensor from a numpy array.

        ``encoding`` FP16 and INT8_AFFINE apply to float32 arrays only. ``compress`` adds zstd
        (level 3) on top. ``dtype=DType.BFLOAT16`` marks a uint16 array as bfloat16 bit
        patterns (an ``ml_dtypes`` bfloat16 array is recognised by itself).
        """
        arr = np.asarray(array)
        encoding = Encoding(encoding)
        if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:
            arr = arr.view(np.uint16)
            dtype = DType.BFLOAT16 if dtype is None else dtype
        if dtype is None:  # uint16 is not a wire dtype: bfloat16 bit patterns must be asked for
            try:
                found = by_numpy(arr.dtype).wire
            except UnsupportedDType:
                found = None
            if found is None:
                raise InvalidArgument(
                    f"tensor {name!r}: numpy dtype {arr.dtype} has no Tandem dtype "
                    f"(supported: {', '.join(d.name.lower() for d in DType)})"
                )
            dtype = found
        dtype = DType(dtype)
        if arr.dtype.newbyteorder("=") != _NUMPY[dtype].newbyteorder("="):
            raise InvalidArgument(f"tensor {name!r}: array dtype {arr.dtype} is not {dtype.name}")
        if storage_itemsize(dtype, encoding) is None:
            raise InvalidArgument(
                f"tensor {name!r}: encoding {encoding.name} needs a FLOAT32 tensor, "
                f"not {dtype.name}"
            )
        shape = tuple(int(d) for d in arr.shape)
        scale, zero_point = 1.0, 0
        if encoding is Encoding.RAW:
            stored = np.ascontiguousarray(arr, dtype=_NUMPY[dtype])
        elif encoding is Encoding.FP16:
            with np.errstate(over="ignore"):
                stored = np.ascontiguousarray(arr, dtype=_F16)
        else:
            x = np.ascontiguousarray(arr, dtype=_F32)
            stored, scale, zero_point = _quantize(x)
        plain = memoryview(stored.reshape(-1).view(np.uint8)).toreadonly()  # type: ignore[arg-type]
        data: bytes | memoryview = plain
        if compress:
            data = _zstd().ZstdCompressor(level=_ZSTD_LEVEL).compress(plain)
        return cls(name, dtype, shape, data, encoding, bool(compress), scale, zero_point, plain)

    # -- decoding -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the stored elements before compression (shape product x storage size)."""
        return math.prod(self.shape) * storage_itemsize(self.dtype, self.encoding)  # type: ignore[operator]

    def plain(self) -> bytes | memoryview:
        """The stored elements, decompressed if needed (still fp16/int8 if so encoded)."""
        plain = self._plain
        if plain is None:
            try:
                plain = _decompress(self.data, self.nbytes)
            except MalformedMessage as exc:
                raise InvalidArgument(f"tensor {self.name!r}: {exc}") from exc
            object.__setattr__(self, "_plain", plain)
        return plain

    def to_array(self) -> np.ndarray:
        """The tensor as a numpy array of its logical dtype.

        FP16 and INT8_AFFINE come back as float32 (INT8 dequantized); BFLOAT16 as uint16 bit
        patterns. An uncompressed RAW tensor is a read-only view of the buffer it came from.
        """
        plain = self.plain()
        if self.encoding is Encoding.RAW:
            return np.frombuffer(plain, dtype=_NUMPY[self.dtype]).reshape(self.shape)
        if self.encoding is Encoding.FP16:
            return np.frombuffer(plain, dtype=_F16).astype(_F32).reshape(self.shape)
        q = np.frombuffer(plain, dtype=_I8).astype(_F32)
        q -= np.float32(self.zero_point)
        if self.scale * 256 < _F32_MAX:
            q *= np.float32(self.scale)
        else:  # near the top of the float32 range 255 * scale can round past it: clamp
            with np.errstate(over="ignore"):
                q *= np.float32(self.scale)
            np.clip(q, -_F32_MAX, _F32_MAX, out=q)
        return q.reshape(self.shape)

    def __repr__(self) -> str:
        extra = ""
        if self.encoding is Encoding.INT8_AFFINE:
            extra = f", scale={self.scale!r}, zero_point={self.zero_point}"
        return (
            f"Tensor(name={self.name!r}, dtype={self.dtype.name}, shape={self.shape}, "
            f"encoding={self.encoding.name}, compressed={self.compressed}, "
            f"wire_bytes={len(self.data)}{extra})"
        )

    def __hash__(self) -> int:  # consistent with ==, without hashing (or pinning) the payload
        return hash((self.name, self.dtype, self.shape, self.encoding, self.compressed,
                     len(self.data)))

    def __reduce__(self):  # memoryviews do not pickle; ship the bytes
        return (
            Tensor,
            (self.name, self.dtype, self.shape, bytes(self.data), self.encoding,
             self.compressed, self.scale, self.zero_point),
        )
