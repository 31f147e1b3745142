"""The one encode/decode boundary of the wire (byte layout in ``protocol/SPEC.md``).

No other module touches msgpack. A frame is a msgpack *envelope* ``[version, type, body]``
followed by a *data section* holding the tensor payloads (and nothing else), each starting at an
8-byte aligned offset from the start of the frame. Decoding is strict and never raises anything
but a :class:`~tandem.protocol.errors.ProtocolError`: every foreign exception is translated here, in
:func:`decode`, and chained with ``from``.

Every message type is described once, by a schema (a tuple of :class:`_Field`); the same schema
drives both directions, so encode and decode cannot drift apart.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from tandem.protocol.dtypes import DType, Encoding, storage_itemsize
from tandem.protocol.errors import (
    Code,
    InvalidArgument,
    MalformedMessage,
    PayloadTooLarge,
    ProtocolError,
    TandemError,
    UnsupportedVersion,
)
from tandem.protocol.messages import (
    PROTOCOL_VERSION,
    Assignment,
    CloudLoad,
    DeviceStatus,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Message,
    Timings,
)
from tandem.protocol.tensors import Tensor, _decompress

__all__ = [
    "CHUNK_PREFIX",
    "DEFAULT_LIMITS",
    "ChunkFrame",
    "Compression",
    "FrameInfo",
    "Limits",
    "MessageType",
    "decode",
    "decode_chunk",
    "encode",
    "encode_chunk",
    "is_chunk",
    "peek",
]

ALIGN = 8  # tensor payloads start at multiples of this many bytes from the frame start
ID_LEN = 16
_U32 = 2**32 - 1
_U63 = 2**63 - 1
_I64_MIN = -(2**63)
_ZEROS = bytes(ALIGN)
_FIRST_FEED = 4096  # envelope bytes handed to msgpack first (then x4 while it needs more)


class MessageType(enum.IntEnum):
    """Envelope type tags. Tags never change meaning; new types get new tags."""

    INFERENCE_REQUEST = 1
    INFERENCE_RESPONSE = 2
    DEVICE_STATUS = 3
    CLOUD_LOAD = 4
    ASSIGNMENT = 5
    CHUNK = 6  # one piece of a chunked frame (see protocol.chunking); not a Message


class Compression(enum.IntEnum):
    """Per-tensor compression codes."""

    NONE = 0
    ZSTD = 1


CHUNK_PREFIX = bytes([0x93, PROTOCOL_VERSION, MessageType.CHUNK])
"""First three bytes of every v1 chunk frame (fixarray(3), version 1, type 6)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a decoder accepts; everything is checked before anything of that size is allocated.

    ``max_message_bytes`` bounds the frame and also the total decoded (decompressed) size of
    all its tensors; ``max_tensor_bytes`` bounds one tensor's decoded size.
    """

    max_message_bytes: int = 256 * 2**20
    max_header_bytes: int = 1 * 2**20  # the msgpack envelope (everything but tensor payloads)
    max_tensors: int = 256
    max_tensor_bytes: int = 256 * 2**20
    max_rank: int = 8
    max_dim: int = 2**31 - 1
    max_string_len: int = 4096  # bytes of UTF-8
    max_list_len: int = 4096  # entries of CloudLoad.tail_ms
    max_fields: int = 64  # keys in one map

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"Limits.{name} must be an int >= 0, not {value!r}")


DEFAULT_LIMITS = Limits()


_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


class _Bad(Exception):
    """A schema violation; decode turns it into MalformedMessage, encode into InvalidArgument."""


# -- field kinds: check a Python value (decoded or about to be encoded) ----------------------


def _int_kind(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:
            if isinstance(v, int) and not isinstance(v, bool):  # IntEnum and friends
                v = int(v)
            else:
                raise _Bad(f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _Bad(f"{v} is out of range [{lo}, {hi}]")
        return v

    return check


def _str(v: Any) -> str:
    if type(v) is not str:
        raise _Bad(f"expected a string, got {type(v).__name__}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Bad(f"expected a bool, got {type(v).__name__}")
    return v


def _nonneg_float(v: Any) -> float:
    if type(v) is not float:
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            v = float(v)
        else:
            raise _Bad(f"expected a number, got {type(v).__name__}")
    if not (math.isfinite(v) and v >= 0.0):
        raise _Bad(f"expected a finite number >= 0, got {v!r}")
    return v


def _id(v: Any) -> bytes:
    if type(v) is not bytes:
        if isinstance(v, (bytearray, memoryview)):
            v = bytes(v)
        else:
            raise _Bad(f"expected {ID_LEN} bytes (bin), got {type(v).__name__}")
    if len(v) != ID_LEN:
        raise _Bad(f"expected {ID_LEN} bytes, got {len(v)}")
    return v


_u32 = _int_kind(0, _U32)
_u63 = _int_kind(0, _U63)
_i64 = _int_kind(_I64_MIN, _U63)


def _map(v: Any) -> dict:
    if type(v) is not dict:
        raise _Bad(f"expected a map, got {type(v).__name__}")
    return v


def _list(v: Any) -> list:
    if type(v) is not list:
        raise _Bad(f"expected an array, got {type(v).__name__}")
    return v


_REQUIRED = object()


class _Field(NamedTuple):
    key: str  # map key on the wire == attribute name of the message class
    check: Callable[[Any], Any]  # scalar check, or None for the special kinds below
    default: Any = _REQUIRED  # a value, a zero-argument factory (callable), or _REQUIRED
    # fields added after v1.0 are written only when not at their default, so every message an
    # older writer could write still encodes to the same bytes (SPEC.md §7)
    omit_default: bool = False


def _get(body: dict, f: _Field) -> Any:
    """The checked value of a field from a decoded map (defaults for absent optional keys)."""
    if f.key not in body:
        if f.default is _REQUIRED:
            raise _Bad(f"missing field {f.key!r}")
        return f.default() if callable(f.default) else f.default
    try:
        return f.check(body[f.key])
    except _Bad as exc:
        raise _Bad(f"field {f.key!r}: {exc}") from None


def _put(out: dict, msg: Any, f: _Field) -> None:
    try:
        out[f.key] = f.check(getattr(msg, f.key))
    except _Bad as exc:
        raise _Bad(f"field {f.key!r}: {exc}") from None


# -- tensors ----------------------------------------------------------------------------------
# A tensor map carries the metadata; its payload sits in the data section (see SPEC.md).

_DTYPES = {int(d): d for d in DType}
_ENCODINGS = {int(e): e for e in Encoding}
_T_NAME = _Field("name", _str)
_T_DTYPE = _Field("dtype", _u32)
_T_SHAPE = _Field("shape", _list)
_T_ENCODING = _Field("encoding", _u32, int(Encoding.RAW))
_T_COMPRESSION = _Field("compression", _u32, int(Compression.NONE))
_T_SIZE = _Field("size", _u63)
_T_SCALE = _Field("scale", _nonneg_float)
_T_ZERO_POINT = _Field("zero_point", _int_kind(-128, 127))


def _tensors_enc(tensors: Any) -> list[Tensor]:
    if not isinstance(tensors, tuple):
        raise _Bad(f"expected a tuple of Tensor, got {type(tensors).__name__}")
    for t in tensors:
        if not isinstance(t, Tensor):
            raise _Bad(f"expected a Tensor, got {type(t).__name__}")
    return list(tensors)


class _DecodeCtx:
    """State of one decode: the frame, where the data section has got to, limits, totals."""

    __slots__ = ("frame", "limits", "pos", "total")

    def __init__(self, frame: memoryview, pos: int, limits: Limits) -> None:
        self.frame = frame
        self.pos = pos
        self.limits = limits
        self.total = 0  # decoded bytes of all tensors so far

    def tensors(self, v: Any) -> tuple[Tensor, ...]:
        items = _list(v)
        if len(items) > self.limits.max_tensors:
            raise PayloadTooLarge(f"{len(items)} tensors (limit {self.limits.max_tensors})")
        return tuple(self.tensor(m) for m in items)

    def tensor(self, m: Any) -> Tensor:
        lim = self.limits
        m = _map(m)
        name = _get(m, _T_NAME)
        code = _get(m, _T_DTYPE)
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise _Bad(f"tensor {name!r}: unknown dtype code {code}")
        code = _get(m, _T_ENCODING)
        encoding = _ENCODINGS.get(code)
        if encoding is None:
            raise _Bad(f"tensor {name!r}: unknown encoding code {code}")
        code = _get(m, _T_COMPRESSION)
        if code not in (Compression.NONE, Compression.ZSTD):
            raise _Bad(f"tensor {name!r}: unknown compression code {code}")
        compressed = code == Compression.ZSTD
        item = storage_itemsize(dtype, encoding)
        if item is None:
            raise _Bad(f"tensor {name!r}: encoding {encoding.name} is not defined for {dtype.name}")
        shape = _get(m, _T_SHAPE)
        if len(shape) > lim.max_rank:
            raise PayloadTooLarge(f"tensor {name!r}: rank {len(shape)} (limit {lim.max_rank})")
        nbytes = item
        for d in shape:
            if type(d) is not int or d < 0:
                raise _Bad(f"tensor {name!r}: bad dimension {d!r}")
            if d > lim.max_dim:
                raise PayloadTooLarge(f"tensor {name!r}: dimension {d} (limit {lim.max_dim})")
            nbytes *= d
        if nbytes > lim.max_tensor_bytes:
            raise PayloadTooLarge(
                f"tensor {name!r}: {nbytes} bytes decoded (limit {lim.max_tensor_bytes})"
            )
        self.total += nbytes
        if self.total > lim.max_message_bytes:
            raise PayloadTooLarge(f"tensors decode to over {lim.max_message_bytes} bytes")
        size = _get(m, _T_SIZE)
        if not compressed and size != nbytes:
            raise _Bad(
                f"tensor {name!r}: shape {tuple(shape)} needs {nbytes} bytes, size says {size}"
            )
        scale, zero_point = 1.0, 0
        if encoding is Encoding.INT8_AFFINE:
            scale = _get(m, _T_SCALE)
            if not _F32_TINY <= scale <= _F32_MAX:
                raise _Bad(f"tensor {name!r}: scale {scale!r} is not a normal float32 > 0")
            zero_point = _get(m, _T_ZERO_POINT)
        # the payload: zero padding to the next aligned offset, then `size` bytes
        frame, pos = self.frame, self.pos
        pad = -pos % ALIGN
        end = pos + pad + size
        if end > len(frame):
            raise _Bad(f"tensor {name!r}: payload runs past the end of the frame (truncated?)")
        if pad and frame[pos : pos + pad] != _ZEROS[:pad]:
            raise _Bad("non-zero padding in the data section")
        data = frame[pos + pad : end]
        self.pos = end
        plain = _decompress(data, nbytes) if compressed else data
        if dtype is DType.BOOL and nbytes and np.frombuffer(plain, np.uint8).max() > 1:
            raise _Bad(f"tensor {name!r}: bool payload holds bytes other than 0 and 1")
        return Tensor._trusted(
            name, dtype, tuple(shape), data, encoding, compressed, scale, zero_point, plain
        )


# -- nested records ---------------------------------------------------------------------------

_ERROR_FIELDS = (
    _Field("code", _int_kind(1, _U32)),
    _Field("message", _str),
    _Field("retryable", _bool, False),
)
_TIMINGS_FIELDS = (_Field("queue_ms", _nonneg_float, 0.0), _Field("compute_ms", _nonneg_float, 0.0))


def _error_dec(v: Any) -> ErrorInfo | None:
    if v is None:
        return None
    m = _map(v)
    code, message, retryable = (_get(m, f) for f in _ERROR_FIELDS)
    if code in Code._value2member_map_:
        code = Code(code)  # else a newer peer's code, kept as a plain int
    return ErrorInfo(code, message, retryable)


def _error_enc(v: Any) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, ErrorInfo):
        raise _Bad(f"expected ErrorInfo or None, got {type(v).__name__}")
    out: dict[str, Any] = {}
    for f in _ERROR_FIELDS:
        _put(out, v, f)
    return out


def _timings_dec(v: Any) -> Timings:
    m = _map(v)
    return Timings(*(_get(m, f) for f in _TIMINGS_FIELDS))


def _timings_enc(v: Any) -> dict:
    if not isinstance(v, Timings):
        raise _Bad(f"expected Timings, got {type(v).__name__}")
    out: dict[str, Any] = {}
    for f in _TIMINGS_FIELDS:
        _put(out, v, f)
    return out


def _records(v: Any, checks: tuple[Callable[[Any], Any], ...], shape: str) -> tuple:
    """A list of fixed-length records, each entry checked by its kind: [[a, b, ...], ...]."""
    if isinstance(v, tuple):
        v = list(v)
    out = []
    for e in _list(v):
        if isinstance(e, tuple):
            e = list(e)
        if type(e) is not list or len(e) != len(checks):
            raise _Bad(f"entries are {shape}")
        out.append(tuple(check(x) for check, x in zip(checks, e, strict=True)))
    return tuple(out)


def _tail_ms(v: Any) -> tuple[tuple[str, int, float], ...]:
    """CloudLoad.tail_ms: [[model_digest: str, cut_id: uint, ms: float >= 0], ...]."""
    return _records(v, (_str, _u32, _nonneg_float), "[model_digest, cut_id, ms]")


def _plan_mix(v: Any) -> tuple[tuple[str, int], ...]:
    """DeviceStatus.plan_mix: [[plan: str, requests: uint], ...]."""
    return _records(v, (_str, _u63), "[plan, requests]")


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, tuple):
        v = list(v)
    return tuple(_str(e) for e in _list(v))


def _bin(v: Any) -> bytes:
    if type(v) is not bytes:
        if isinstance(v, (bytearray, memoryview)):
            return bytes(v)
        raise _Bad(f"expected bytes (bin), got {type(v).__name__}")
    return v


# -- message schemas --------------------------------------------------------------------------
# Keys are the dataclass field names; required fields are the ones without a default.

_TENSORS = "tensors"  # special kinds, handled by the frame-level code
_OUTPUTS = "outputs"

_SCHEMAS: dict[MessageType, tuple[type, tuple[_Field, ...]]] = {
    MessageType.INFERENCE_REQUEST: (InferenceRequest, (
        _Field("id", _id),
        _Field("device_id", _str),
        _Field("model_digest", _str),
        _Field("cut_id", _u32),
        _Field("budget_ms", _u63),
        _Field("priority", _i64, 0),
        _Field("reply_topic", _str, ""),
        _Field("sent_at_ms", _u63, 0),
        _Field(_TENSORS, None),  # type: ignore[arg-type]  # tensors: a special kind
    )),
    MessageType.INFERENCE_RESPONSE: (InferenceResponse, (
        _Field("id", _id),
        _Field("error", _error_dec, None),
        _Field("timings", _timings_dec, Timings),
        _Field("worker_id", _str, ""),
        _Field(_OUTPUTS, None, ()),  # type: ignore[arg-type]  # tensors: a special kind
        _Field("queue_depth", _u63, 0, omit_default=True),
    )),
    MessageType.DEVICE_STATUS: (DeviceStatus, (
        _Field("device_id", _str),
        _Field("state", _str),
        _Field("timestamp_ms", _u63),
        _Field("bundle_digest", _str, ""),
        _Field("uplink_bps", _nonneg_float, 0.0),
        _Field("rtt_ms", _nonneg_float, 0.0),
        _Field("queue_depth", _u63, 0),
        _Field("p50_ms", _nonneg_float, 0.0),
        _Field("p99_ms", _nonneg_float, 0.0),
        _Field("fallbacks", _u63, 0),
        _Field("plan_mix", _plan_mix, ()),
        _Field("refused_digest", _str, "", omit_default=True),
        _Field("refused_reason", _str, "", omit_default=True),
        _Field("escalation_ratio", _nonneg_float, 0.0, omit_default=True),
    )),
    MessageType.CLOUD_LOAD: (CloudLoad, (
        _Field("worker_id", _str),
        _Field("timestamp_ms", _u63),
        _Field("queue_depth", _u63, 0),
        _Field("inflight", _u63, 0),
        _Field("queue_ms", _nonneg_float, 0.0),
        _Field("tail_ms", _tail_ms, ()),
        _Field("state", _str, "online", omit_default=True),
        _Field("batch_size", _tail_ms, (), omit_default=True),
    )),
    MessageType.ASSIGNMENT: (Assignment, (
        _Field("device_id", _str),
        _Field("model_name", _str),
        _Field("bundle_digest", _str),
        _Field("bundle_uri", _str, ""),
        _Field("issued_at_ms", _u63, 0),
        _Field("model_version", _str, ""),
        _Field("archive_sha256", _str, ""),
        _Field("archive_size", _u63, 0),
        _Field("signature", _bin, b""),
        _Field("mirror_uris", _str_list, ()),
    )),
}
_TYPE_OF: dict[type, MessageType] = {cls: t for t, (cls, _) in _SCHEMAS.items()}
_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "error": _error_enc,
    "timings": _timings_enc,
}


# -- encode -----------------------------------------------------------------------------------


def _over_limits(value: Any, lim: Limits, depth: int = 0) -> str | None:
    """What in an encoded body a reader with ``lim`` would refuse (strings, map keys, bin,
    lists, maps), or None."""
    if isinstance(value, str):
        if len(value) > lim.max_string_len or (
                len(value) * 4 > lim.max_string_len
                and len(value.encode("utf-8", "surrogatepass")) > lim.max_string_len):
            return f"a string of over {lim.max_string_len} bytes"
    elif isinstance(value, bytes):
        if len(value) > lim.max_string_len:  # msgpack's bin limit is the string limit
            return f"a bin of over {lim.max_string_len} bytes"
    elif isinstance(value, dict):
        if len(value) > lim.max_fields:
            return f"a map of over {lim.max_fields} keys"
        short = lim.max_string_len // 4  # a str of this many characters fits in any case
        for k, v in value.items():
            if (type(k) is not str or len(k) > short) and \
                    (why := _over_limits(k, lim, depth + 1)) is not None:
                return f"{why} (a key)"
            t = type(v)
            if t in _SCALARS or (t is str and len(v) <= short) or (
                    t is bytes and len(v) <= lim.max_string_len):
                continue
            if (why := _over_limits(v, lim, depth + 1)) is not None:
                return why
    elif isinstance(value, list | tuple):
        if len(value) > lim.max_list_len and depth == 1:
            return f"a list of over {lim.max_list_len} entries"
        for v in value:
            if type(v) not in _SCALARS and (why := _over_limits(v, lim, depth + 1)) is not None:
                return why
    return None


# values no limit applies to: skipped without a call (exact types; subclasses are walked)
_SCALARS = frozenset((int, float, bool, type(None)))


def _check_tensors(tensors: list[Tensor], lim: Limits) -> None:
    if len(tensors) > lim.max_tensors:
        raise PayloadTooLarge(f"{len(tensors)} tensors (readers accept {lim.max_tensors})")
    total = 0
    for t in tensors:
        if len(t.shape) > lim.max_rank or any(d > lim.max_dim for d in t.shape):
            raise InvalidArgument(f"tensor {t.name!r}: shape {t.shape} is over the limits "
                                  f"(rank {lim.max_rank}, dim {lim.max_dim})")
        total += t.nbytes
        if t.nbytes > lim.max_tensor_bytes or total > lim.max_message_bytes:
            raise PayloadTooLarge(f"tensor {t.name!r}: {t.nbytes} bytes is over what readers "
                                  f"accept ({lim.max_tensor_bytes} per tensor, "
                                  f"{lim.max_message_bytes} per message)")


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The frame for ``msg``. Raises InvalidArgument if the message breaks the schema, and
    PayloadTooLarge/InvalidArgument if a reader with ``limits`` would refuse it: we never emit
    bytes our own decoder rejects."""
    parts, _ = encode_parts(msg, limits)
    if len(parts) == 1:
        return parts[0]  # type: ignore[return-value]  # the envelope alone: already bytes
    return b"".join(parts)  # one copy of each payload, into an exactly sized bytes


def encode_parts(msg: Message, limits: Limits = DEFAULT_LIMITS
                 ) -> tuple[list[bytes | memoryview], int]:
    """The frame for ``msg`` as pieces to be written one after another, and its total length:
    the msgpack envelope (bytes), then per tensor a zero pad (when needed for alignment) and
    the tensor's data (a view of it, not a copy). ``b"".join(parts)`` is :func:`encode`'s
    frame, byte for byte; same checks and errors. The views are valid as long as the
    message's tensors are (do not mutate their buffers until the parts are written)."""
    try:
        mtype = _TYPE_OF[type(msg)]
    except KeyError:
        raise InvalidArgument(f"not a protocol message: {type(msg).__name__}") from None
    if msg.version != PROTOCOL_VERSION:
        raise InvalidArgument(
            f"this codec writes protocol version {PROTOCOL_VERSION}, message says {msg.version}"
        )
    if type(msg) is InferenceResponse and msg.error is not None and msg.outputs:
        raise InvalidArgument("a response carries outputs or an error, not both")
    body: dict[str, Any] = {}
    tensors: list[Tensor] = []
    try:
        for f in _SCHEMAS[mtype][1]:
            if f.check is None:  # the tensor list
                try:
                    tensors = _tensors_enc(getattr(msg, f.key))
                except _Bad as exc:
                    raise _Bad(f"field {f.key!r}: {exc}") from None
                body[f.key] = [_tensor_map(t) for t in tensors]
            elif f.omit_default and getattr(msg, f.key) == f.default:
                continue
            elif f.key in _ENCODERS:
                body[f.key] = _ENCODERS[f.key](getattr(msg, f.key))
            else:
                _put(body, msg, f)
        why = _over_limits(body, limits)
        if why is not None:
            raise _Bad(f"holds {why} (readers refuse it)")
        _check_tensors(tensors, limits)
        header = msgpack.packb([PROTOCOL_VERSION, int(mtype), body], use_bin_type=True)
        if len(header) > limits.max_header_bytes:
            raise PayloadTooLarge(f"{type(msg).__name__}: envelope of {len(header)} bytes "
                                  f"(readers accept {limits.max_header_bytes})")
    except _Bad as exc:
        raise InvalidArgument(f"{type(msg).__name__}: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # msgpack's own complaints
        raise InvalidArgument(f"{type(msg).__name__} cannot be encoded: {exc}") from exc
    parts: list[bytes | memoryview] = [header]
    pos = len(header)
    for t in tensors:
        pad = -pos % ALIGN
        if pad:
            parts.append(_ZEROS[:pad])
        parts.append(t.data)
        pos += pad + len(t.data)
    if pos > limits.max_message_bytes:
        raise PayloadTooLarge(f"{type(msg).__name__}: frame of {pos} bytes (readers accept "
                              f"{limits.max_message_bytes})")
    return parts, pos


def _tensor_map(t: Tensor) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": t.name,
        "dtype": int(t.dtype),
        "shape": list(t.shape),
        "encoding": int(t.encoding),
        "compression": int(Compression.ZSTD if t.compressed else Compression.NONE),
        "size": len(t.data),
    }
    if t.encoding is Encoding.INT8_AFFINE:
        m["scale"] = t.scale
        m["zero_point"] = t.zero_point
    return m


# -- decode -----------------------------------------------------------------------------------


def _pairs(pairs: list[tuple[Any, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Bad("duplicate key in a map")
    return d


def _as_view(data: Any) -> memoryview:
    if isinstance(data, bytes):
        return memoryview(data)
    if isinstance(data, (bytearray, memoryview)):
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        return mv.toreadonly()
    raise MalformedMessage(f"a frame is bytes, bytearray or memoryview, not {type(data).__name__}")


def _read_envelope(mv: memoryview, limits: Limits) -> tuple[Any, int]:
    """Parse the msgpack envelope at the start of ``mv``; returns it and where it ends.

    One ``msgpack.unpackb`` over a window of the frame (no Unpacker, no copy of the frame):
    first :data:`_FIRST_FEED` bytes, which hold every ordinary envelope, then, only when the
    envelope is longer, up to ``max_header_bytes``. msgpack copies what follows the envelope
    in its window (``ExtraData.extra``), so the small first window keeps that copy small; the
    data section past the window is never read here.
    """
    n = len(mv)
    if n == 0:
        raise MalformedMessage("empty frame")
    if n > limits.max_message_bytes:
        raise PayloadTooLarge(f"frame of {n} bytes (limit {limits.max_message_bytes})")
    if n >= 2 and mv[0] == 0x93 and mv[1] < 0x80:  # [fixint version, ...]: the common case
        if mv[1] != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"frame has protocol version {mv[1]}; this peer speaks {PROTOCOL_VERSION}")
    else:
        _peek_version(mv)
    cap = min(n, limits.max_header_bytes)
    window = min(cap, _FIRST_FEED)
    options = _unpack_options(limits)
    while True:
        try:
            return msgpack.unpackb(mv[:window], **options), window
        except msgpack.ExtraData as exc:
            return exc.unpacked, window - len(exc.extra)
        except ValueError as exc:
            text = str(exc)
            if "exceeds max_" in text and "max_ext_len" not in text:  # msgpack's limits
                raise PayloadTooLarge(f"envelope over limits: {exc}") from exc
            if "incomplete input" not in text:
                raise
        if window < cap:  # a long envelope: parse again with all of it
            window = cap
            continue
        if cap >= n:
            why = _declared_over_limits(mv[:cap], limits)
            if why is not None:  # msgpack checks a str/bin length only once it holds it all
                raise PayloadTooLarge(f"envelope over limits: {why}") from None
            raise MalformedMessage(f"truncated frame ({n} bytes)") from None
        raise PayloadTooLarge(f"envelope longer than {limits.max_header_bytes} bytes") from None


@functools.lru_cache(maxsize=64)
def _unpack_options(limits: Limits) -> dict[str, Any]:
    """msgpack.unpackb's options for an envelope under ``limits``."""
    return dict(
        raw=False,
        strict_map_key=True,
        use_list=True,
        object_pairs_hook=_pairs,
        max_str_len=limits.max_string_len,
        max_bin_len=limits.max_string_len,  # ids and Assignment.signature are bin
        max_array_len=max(limits.max_tensors, limits.max_list_len, limits.max_rank, 3) + 1,
        max_map_len=limits.max_fields,
        max_ext_len=0,  # no ext types in v1 (this also refuses msgpack timestamps)
    )


# msgpack str/bin headers: first byte -> (kind, bytes of the length field)
_LENGTH_HEADERS = {0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
                   0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4)}
# other first bytes -> bytes that follow them (containers: just their header; ext: refused)
_FIXED_SIZES = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4,
                0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xDC: 2, 0xDD: 4, 0xDE: 2,
                0xDF: 4}


def _declared_over_limits(buf: memoryview, limits: Limits) -> str | None:
    """The first str or bin in ``buf`` whose *declared* length is over ``limits``, or None.

    msgpack checks ``max_str_len`` only once the whole string is buffered, so a truncated frame
    whose str32 declares 4 GiB would otherwise say "truncated". Hand-written: msgpack has no API
    that reads a str header alone. Walks the tokens in order (containers need no bookkeeping:
    their items follow inline) until the data ends or something it does not know appears.
    """
    pos, n = 0, len(buf)
    while pos < n:
        b = buf[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0 or 0x80 <= b <= 0x9F:  # fixint, fixmap, fixarray
            continue
        if 0xA0 <= b <= 0xBF:  # fixstr: at most 31 bytes
            pos += b & 0x1F
            continue
        header = _LENGTH_HEADERS.get(b)
        if header is not None:
            kind, width = header
            if pos + width > n:
                return None
            length = int.from_bytes(buf[pos:pos + width], "big")
            if length > limits.max_string_len:
                return f"a {kind} of {length} bytes (limit {limits.max_string_len})"
            pos += width + length
            continue
        size = _FIXED_SIZES.get(b)
        if size is None:  # ext types and 0xC1: the full parse says what is wrong
            return None
        pos += size
    return None


def _peek_version(mv: memoryview) -> None:
    """Another major version is UNSUPPORTED_VERSION "without looking further" (SPEC §1): read
    only the array header and the first element, before the body is parsed under v1 limits."""
    peek = msgpack.Unpacker(max_buffer_size=64, read_size=64)
    peek.feed(mv[:16])
    try:
        peek.read_array_header()
        version = peek.unpack()
    except Exception:  # not even that: the full parse says what is wrong
        return
    if type(version) is int and version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"frame has protocol version {version}; this peer speaks {PROTOCOL_VERSION}")


def _check_version(obj: Any) -> tuple[int, Any]:
    if type(obj) is not list or not obj:
        raise MalformedMessage("a frame starts with the envelope array [version, type, body]")
    version = obj[0]
    if type(version) is not int:
        raise MalformedMessage(f"protocol version must be an integer, got {type(version).__name__}")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"frame has protocol version {version}; this peer speaks {PROTOCOL_VERSION}"
        )
    if len(obj) != 3:
        raise MalformedMessage(f"envelope has {len(obj)} elements, expected 3")
    mtype = obj[1]
    if type(mtype) is not int:
        raise MalformedMessage(f"message type must be an integer, got {type(mtype).__name__}")
    return mtype, obj[2]


def _decode(data: Any, limits: Limits) -> Message:
    mv = _as_view(data)
    obj, pos = _read_envelope(mv, limits)
    return _decode_body(mv, obj, pos, limits)


def _decode_body(mv: memoryview, obj: Any, pos: int, limits: Limits) -> Message:
    mtype, body = _check_version(obj)
    if mtype == MessageType.CHUNK:
        raise MalformedMessage("this is a chunk frame: feed it to a chunking.Reassembler")
    try:
        cls, schema = _SCHEMAS[MessageType(mtype)]
    except (ValueError, KeyError):
        raise MalformedMessage(f"unknown message type {mtype}") from None
    body = _map(body)
    ctx = _DecodeCtx(mv, pos, limits)
    kwargs: dict[str, Any] = {}
    max_list_len = limits.max_list_len
    for f in schema:  # unknown keys are ignored (schema evolution, see SPEC.md)
        key, check = f.key, f.check
        if key not in body:  # absent: its default (the tensor list's is the dataclass's)
            if f.default is _REQUIRED:
                raise _Bad(f"missing field {key!r}")
            if check is not None:
                kwargs[key] = f.default() if callable(f.default) else f.default
            continue
        value = body[key]
        if check is None:
            kwargs[key] = ctx.tensors(value)
            continue
        if type(value) is list and len(value) > max_list_len:
            raise PayloadTooLarge(f"field {key!r}: {len(value)} entries "
                                  f"(limit {max_list_len})")
        try:
            kwargs[key] = check(value)
        except _Bad as exc:
            raise _Bad(f"field {key!r}: {exc}") from None
    if ctx.pos != len(mv):
        raise MalformedMessage(f"{len(mv) - ctx.pos} unexpected bytes after the last payload")
    if cls is InferenceResponse and kwargs.get("error") is not None and kwargs.get(_OUTPUTS):
        raise MalformedMessage("a response carries outputs or an error, not both")
    return cls(**kwargs, version=PROTOCOL_VERSION)


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message in a frame. Raises only ProtocolError subclasses.

    MalformedMessage (INVALID_ARGUMENT) for anything that breaks the spec, PayloadTooLarge
    (PAYLOAD_TOO_LARGE) for anything over ``limits``, UnsupportedVersion (UNSUPPORTED_VERSION) for
    another protocol major version. RAW tensors in the result are views of ``data``.
    """
    try:
        return _decode(data, limits)
    except ProtocolError:
        raise
    except Exception as exc:
        raise _decode_error(exc) from (None if isinstance(exc, _Bad) else exc)


def _decode_error(exc: Exception) -> Exception:
    """What :func:`decode` raises for ``exc``, which is not a ProtocolError."""
    if isinstance(exc, (_Bad, TandemError)):
        return MalformedMessage(str(exc))
    # the boundary: msgpack, zstd, numpy, unicode, recursion, ...
    return MalformedMessage(f"undecodable frame: {type(exc).__name__}: {exc}")


class FrameInfo(NamedTuple):
    """What :func:`peek` reads from a frame's envelope (nothing of its data section)."""

    type: MessageType
    id: bytes | None  # the message's 16-byte id (requests, responses); None for other types
    tensor_bytes: int  # declared decoded bytes of all its tensors (what decode would allocate)
    compressed: bool  # whether any tensor is zstd-compressed (decode inflates it)


_PEEK_TENSORS = {MessageType.INFERENCE_REQUEST: _TENSORS, MessageType.INFERENCE_RESPONSE: _OUTPUTS}


def peek(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> FrameInfo:
    """The type, id and declared tensor sizes of a frame, from its envelope alone: no tensor
    payload is read and nothing is decompressed, so a receiver can look up, refuse or budget a
    message (and answer it by id) before paying for it. Raises what :func:`decode` raises for
    a bad envelope (only ProtocolError subclasses); a frame ``peek`` accepts may still fail
    ``decode``."""
    return open_frame(data, limits).info


class OpenFrame:
    """A frame whose envelope has been parsed once (:func:`open_frame`): :attr:`info` is what
    :func:`peek` returns, :meth:`decode` what :func:`decode` returns, without parsing the
    envelope again."""

    __slots__ = ("_limits", "_mv", "_obj", "_pos", "info")

    def __init__(self, mv: memoryview, obj: Any, pos: int, limits: Limits,
                 info: FrameInfo) -> None:
        self._mv, self._obj, self._pos, self._limits = mv, obj, pos, limits
        self.info = info

    def decode(self) -> Message:
        """The message (raises what :func:`decode` raises; RAW tensors view the frame)."""
        try:
            return _decode_body(self._mv, self._obj, self._pos, self._limits)
        except ProtocolError:
            raise
        except Exception as exc:
            raise _decode_error(exc) from (None if isinstance(exc, _Bad) else exc)


def open_frame(data: bytes | bytearray | memoryview,
               limits: Limits = DEFAULT_LIMITS) -> OpenFrame:
    """:func:`peek` and :func:`decode` in one pass over the envelope: a receiver that looks a
    frame up or budgets it before decoding parses the envelope once. Raises what
    :func:`peek` raises."""
    try:
        mv = _as_view(data)
        obj, pos = _read_envelope(mv, limits)
        mtype, body = _check_version(obj)
        try:
            mtype = MessageType(mtype)
        except ValueError:
            raise MalformedMessage(f"unknown message type {mtype}") from None
        body = _map(body)
        key = _PEEK_TENSORS.get(mtype)
        if key is None:
            return OpenFrame(mv, obj, pos, limits, FrameInfo(mtype, None, 0, False))
        mid = _get(body, _ID_FIELD)
        total, compressed = 0, False
        for m in _list(body.get(key, [])):
            m = _map(m)
            dtype = _DTYPES.get(_get(m, _T_DTYPE))
            encoding = _ENCODINGS.get(_get(m, _T_ENCODING))
            item = storage_itemsize(dtype, encoding) if dtype and encoding is not None else None
            if item is None:
                raise _Bad("tensor with an unknown dtype or encoding")
            n = item
            for d in _get(m, _T_SHAPE):
                if type(d) is not int or d < 0:
                    raise _Bad(f"bad dimension {d!r}")
                n *= d
            total += n
            compressed = compressed or _get(m, _T_COMPRESSION) == Compression.ZSTD
        return OpenFrame(mv, obj, pos, limits, FrameInfo(mtype, mid, total, compressed))
    except ProtocolError:
        raise
    except _Bad as exc:
        raise MalformedMessage(str(exc)) from None
    except Exception as exc:
        raise MalformedMessage(f"undecodable frame: {type(exc).__name__}: {exc}") from exc


_ID_FIELD = _Field("id", _id)


# -- chunk frames (used by protocol.chunking) ---------------------------------------------------


class ChunkFrame(NamedTuple):
    message_id: bytes  # 16 bytes, shared by all chunks of one payload
    index: int  # type: ignore[assignment]  # 0 .. count-1 (shadows tuple.index)
    count: int  # type: ignore[assignment]  # (shadows tuple.count)
    total: int  # bytes of the whole payload
    offset: int  # where this chunk's data goes in the payload
    data: memoryview


_CHUNK_FIELDS = (
    _Field("id", _id),
    _Field("index", _u32),
    _Field("count", _u32),
    _Field("total", _u63),
    _Field("offset", _u63),
)


_CHUNK_LIMITS = Limits(max_message_bytes=_U63, max_header_bytes=4096)


def is_chunk(data: bytes | bytearray | memoryview) -> bool:
    """Whether a payload is a chunk frame (by its first three bytes)."""
    return bytes(data[:3]) == CHUNK_PREFIX


def encode_chunk(
    message_id: bytes, index: int, count: int, total: int, offset: int,
    data: bytes | memoryview,
) -> bytes:
    body = {"id": message_id, "index": index, "count": count, "total": total, "offset": offset}
    header = msgpack.packb([PROTOCOL_VERSION, int(MessageType.CHUNK), body], use_bin_type=True)
    return b"".join((header, data))


def chunk_overhead(message_id: bytes, total: int) -> int:
    """An upper bound on the envelope size of any chunk of a ``total``-byte payload."""
    return len(encode_chunk(message_id, total, total, total, total, b""))


def decode_chunk(data: bytes | bytearray | memoryview) -> ChunkFrame:
    """Parse a chunk frame; MalformedMessage if it is not a consistent one."""
    try:
        mv = _as_view(data)
        obj, pos = _read_envelope(mv, _CHUNK_LIMITS)
        mtype, body = _check_version(obj)
        if mtype != MessageType.CHUNK:
            raise MalformedMessage(f"not a chunk frame (message type {mtype})")
        body = _map(body)
        mid, index, count, total, offset = (_get(body, f) for f in _CHUNK_FIELDS)
        chunk = mv[pos:]
        if not index < count:
            raise _Bad(f"chunk index {index} of {count}")
        if offset + len(chunk) > total:
            raise _Bad(f"chunk [{offset}, {offset + len(chunk)}) past the payload's {total} bytes")
        if total and not chunk:
            raise _Bad("empty chunk")
        if count > max(total, 1):
            raise _Bad(f"{count} chunks for {total} bytes")
        return ChunkFrame(mid, index, count, total, offset, chunk)
    except ProtocolError:
        raise
    except _Bad as exc:
        raise MalformedMessage(f"chunk frame: {exc}") from None
    except Exception as exc:
        raise MalformedMessage(f"undecodable chunk frame: {type(exc).__name__}: {exc}") from exc

