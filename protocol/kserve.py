"""The Open Inference Protocol (KServe v2) over HTTP: JSON tensors and the binary tensor extension.

One codec for every HTTP API of Tandem (the cloud endpoint's ``/v2/models/<m>/infer`` and the
edge daemon's local API), written so that Triton's ``tritonclient.http`` and KServe clients work
unchanged. numpy, and orjson when it is installed (the ``edge`` and ``cloud`` extras bring it; the
standard library's ``json`` otherwise, with the same results); no HTTP library: the server passes
bodies and the ``Inference-Header-Content-Length`` header in, and gets bodies and headers back.

Server side::

    request = decode_request(body, header_length)      # InvalidArgument / PayloadTooLarge
    feeds = {t.name: t.data for t in request.inputs}    # numpy arrays (views of ``body``)
    ...
    response = InferResponse(model_name, outputs=tuple(InferTensor.from_array(n, a) ...))
    body, header_length = encode_response(response, request)  # JSON or binary, as asked
    headers = response_headers(header_length)
    # on error:  status = http_status(exc); body = error_body(exc)

Client side (the mirror image): :func:`encode_request` and :func:`decode_response`;
:func:`error_from_http` rebuilds the server's error.

Datatypes (:data:`DATATYPES`): BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64,
FP16, FP32, FP64, BF16 (binary only; numpy sees uint16 bit patterns, as the wire's BFLOAT16) and
BYTES (numpy object arrays of ``bytes``). Of these, FP32, FP16, BF16, INT8, UINT8, INT32, INT64 and
BOOL also travel on Tandem's wire (:func:`to_wire_tensor` / :func:`from_wire_tensor`).

Binary tensor extension (as Triton defines it): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the binary payloads of the tensors whose
``parameters.binary_data_size`` is set, in the order they appear in the header, little-endian,
row major, no padding; BOOL is one byte 0/1; a BYTES element is a 4-byte little-endian length
and the bytes. Outputs go binary when the request's output says ``"binary_data": true``, or the
request's parameters say ``"binary_data_output": true`` (an output's own flag wins).

Strictness: every field is type-checked; shapes must match the element count; JSON numbers must
fit the datatype (no silent truncation of 1.5 into an INT32, no 300 into an INT8); BOOL takes
``true``/``false`` only; BYTES takes strings; binary sizes must add up to the body exactly.
Everything is checked against :class:`Limits` before anything of that size is allocated. Errors
are :class:`~tandem.protocol.errors.InvalidArgument` (400) or
:class:`~tandem.protocol.errors.PayloadTooLarge` (413); :func:`http_status` maps every Tandem
error to its HTTP status.

Non-finite floats in JSON are written and read as the tokens ``NaN``, ``Infinity`` and
``-Infinity`` (as Python's ``json`` does); ask for binary outputs for strict JSON parsers.

Speed: with orjson, JSON tensor data is written straight from the numpy array (float32 values in
their shortest float32 form, which reads back to the same float32) and headers are parsed by
orjson; whatever orjson refuses (the non-finite tokens above, integers past 64 bits, lone
surrogates, bad JSON) goes through ``json`` as before, so the accepted bodies, the values and
the error messages do not depend on it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - the edge and cloud extras bring it
    _orjson = None  # type: ignore[assignment]

from tandem.protocol.errors import (
    Code,
    InvalidArgument,
    PayloadTooLarge,
    TandemError,
    error_class,
)
from tandem.protocol.tensors import DType, Tensor

__all__ = [
    "CONTENT_TYPE_BINARY",
    "CONTENT_TYPE_JSON",
    "DATATYPES",
    "DEFAULT_LIMITS",
    "HEADER_LENGTH",
    "InferRequest",
    "InferResponse",
    "InferTensor",
    "Limits",
    "RequestedOutput",
    "datatype_of",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_body",
    "error_from_http",
    "from_wire_tensor",
    "http_status",
    "metadata_shape",
    "model_metadata",
    "numpy_dtype",
    "response_headers",
    "server_metadata",
    "to_wire_tensor",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header giving the length of the JSON header when binary tensor data follows it."""
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_BINARY = "application/octet-stream"

#: KServe v2 datatype → numpy dtype (little-endian; BF16 as uint16 bit patterns, BYTES as object).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(object),
}
_BY_NUMPY: dict[np.dtype, str] = {
    dt.newbyteorder("="): name for name, dt in DATATYPES.items() if name not in ("BF16", "BYTES")
}
_WIRE: dict[str, DType] = {
    "FP32": DType.FLOAT32, "FP16": DType.FLOAT16, "BF16": DType.BFLOAT16, "INT8": DType.INT8,
    "UINT8": DType.UINT8, "INT32": DType.INT32, "INT64": DType.INT64, "BOOL": DType.BOOL,
}
_FROM_WIRE = {d: name for name, d in _WIRE.items()}
_INT_RANGE = {name: (int(np.iinfo(dt).min), int(np.iinfo(dt).max))
              for name, dt in DATATYPES.items() if dt.kind in "iu"}
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Limits:
    """What a decoder accepts; checked before anything of that size is allocated."""

    max_body_bytes: int = 256 * 2**20
    max_header_bytes: int = 64 * 2**20  # the JSON part (JSON tensor data lives here)
    max_tensors: int = 256
    max_rank: int = 8
    max_elements: int = 2**31 - 1  # per tensor
    max_string_len: int = 4096  # names, ids, parameter strings
    max_parameters: int = 64

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"kserve.Limits.{name} must be an int >= 0, not {value!r}")


DEFAULT_LIMITS = Limits()

Parameters = Mapping[str, "bool | int | float | str"]


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a KServe datatype; InvalidArgument for an unknown one."""
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"unknown datatype {datatype!r} (known: {', '.join(DATATYPES)})") from None


def datatype_of(dtype: np.dtype | type) -> str:
    """The KServe datatype of a numpy dtype (object and str/bytes arrays are BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    name = _BY_NUMPY.get(dt.newbyteorder("="))
    if name is None:
        raise InvalidArgument(f"numpy dtype {dt} has no KServe v2 datatype")
    return name


# -- data model -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferTensor:
    """A named tensor of a request's inputs or a response's outputs.

    ``data`` is a numpy array of ``numpy_dtype(datatype)`` with ``shape`` (BYTES: an object array
    of ``bytes``). Decoded binary tensors are read-only views of the body they came from."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_array(cls, name: str, array: Any, datatype: str | None = None,
                   parameters: Mapping[str, Any] | None = None) -> InferTensor:
        """A tensor from anything numpy takes; ``datatype`` defaults from the array's dtype
        (pass ``"BF16"`` for uint16 bit patterns of bfloat16)."""
        arr = np.asarray(array)
        if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:  # ml_dtypes
            arr, datatype = arr.view(np.uint16), datatype or "BF16"
        datatype = datatype or datatype_of(arr.dtype)
        want = numpy_dtype(datatype)
        if datatype == "BYTES":
            arr = _as_bytes_array(arr, name)
        elif arr.dtype != want:
            if arr.dtype.newbyteorder("=") != want.newbyteorder("="):
                raise InvalidArgument(
                    f"tensor {name!r}: array dtype {arr.dtype} is not {datatype}")
            arr = arr.astype(want)
        return cls(name, datatype, tuple(int(d) for d in arr.shape), arr, dict(parameters or {}))


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An entry of a request's ``outputs``: which output to return, binary or JSON."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def binary_data(self) -> bool | None:
        value = self.parameters.get("binary_data")
        return value if isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class InferRequest:
    inputs: tuple[InferTensor, ...]
    outputs: tuple[RequestedOutput, ...] = ()  # empty: every output
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def binary_data_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True

    def feeds(self) -> dict[str, np.ndarray]:
        """Inputs by name, as a backend takes them."""
        return {t.name: t.data for t in self.inputs}

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` should be returned as binary data."""
        for o in self.outputs:
            if o.name == output and o.binary_data is not None:
                return o.binary_data
        return self.binary_data_output

    def selects(self, output: str) -> bool:
        """Whether ``output`` is to be returned (all are when ``outputs`` is empty)."""
        return not self.outputs or any(o.name == output for o in self.outputs)


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    outputs: tuple[InferTensor, ...]
    model_version: str | None = None
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


# -- checks -----------------------------------------------------------------------------------


def _fail(msg: str) -> InvalidArgument:
    return InvalidArgument(msg)


def _obj(value: Any, what: str) -> dict:
    if type(value) is not dict:
        raise _fail(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _string(value: Any, what: str, limits: Limits) -> str:
    if type(value) is not str:
        raise _fail(f"{what} must be a string, not {_json_type(value)}")
    if len(value) > limits.max_string_len:
        raise PayloadTooLarge(f"{what} is longer than {limits.max_string_len} characters")
    return value


def _check_keys(obj: dict, allowed: frozenset[str], what: str) -> None:
    unknown = obj.keys() - allowed
    if unknown:
        raise _fail(f"{what} has unknown field(s) {sorted(unknown)} "
                    f"(allowed: {sorted(allowed)})")


def _parameters(value: Any, what: str, limits: Limits) -> dict[str, Any]:
    if value is None:
        return {}
    params = _obj(value, f"{what}.parameters")
    if len(params) > limits.max_parameters:
        raise PayloadTooLarge(f"{what}.parameters has over {limits.max_parameters} entries")
    for key, v in params.items():
        _string(key, f"{what}.parameters key", limits)
        if type(v) is str:
            _string(v, f"{what}.parameters[{key!r}]", limits)
        elif type(v) not in (bool, int, float):
            raise _fail(f"{what}.parameters[{key!r}] must be a boolean, number or string, "
                        f"not {_json_type(v)}")
    return params


def _shape(value: Any, what: str, limits: Limits) -> tuple[tuple[int, ...], int]:
    if type(value) is not list:
        raise _fail(f"{what}.shape must be an array of integers, not {_json_type(value)}")
    if len(value) > limits.max_rank:
        raise PayloadTooLarge(f"{what}.shape has rank {len(value)} (limit {limits.max_rank})")
    n = 1
    for d in value:
        if type(d) is not int or d < 0:
            raise _fail(f"{what}.shape must hold integers >= 0, found {d!r}")
        n *= d
    if n > limits.max_elements:
        raise PayloadTooLarge(f"{what} has {n} elements (limit {limits.max_elements})")
    return tuple(value), n


def _binary_size(params: Mapping[str, Any], what: str) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise _fail(f"{what}.parameters.binary_data_size must be an integer >= 0, not {size!r}")
    return size


_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 19


def _parse_json(header: bytes | memoryview, what: str) -> dict:
    if _orjson is not None:
        raw = bytes(header)
        # orjson reads an integer past 64 bits as a float; json keeps it exact (the checks
        # below then name it), so a run of 19+ digits anywhere goes to json (a few us per 8 KB)
        if _LONG_DIGIT_RUN not in raw.translate(_DIGITS_TO_ZERO):
            try:
                return _obj(_orjson.loads(raw), what)
            except _orjson.JSONDecodeError:
                pass  # NaN tokens, 1e400, bad JSON: json accepts or explains (below)
    try:
        text = bytes(header).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"{what} is not UTF-8: {exc}") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise _fail(f"{what} JSON nests too deeply") from None
    except ValueError as exc:
        raise _fail(f"{what} is not valid JSON: {exc}") from None
    return _obj(doc, what)


def _split_body(body: bytes | bytearray | memoryview, header_length: int | str | None,
                limits: Limits, what: str) -> tuple[memoryview, memoryview]:
    mv = memoryview(body)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) > limits.max_body_bytes:
        raise PayloadTooLarge(f"{what} body of {len(mv)} bytes (limit {limits.max_body_bytes})")
    if header_length is None or header_length == "":
        n = len(mv)
    else:
        if isinstance(header_length, str):
            if not header_length.isdigit() or len(header_length) > 20:
                raise _fail(f"{HEADER_LENGTH} must be a non-negative integer, "
                            f"not {header_length[:40]!r}")
            header_length = int(header_length)
        if type(header_length) is not int or header_length < 0:
            raise _fail(f"{HEADER_LENGTH} must be a non-negative integer")
        if header_length > len(mv):
            raise _fail(f"{HEADER_LENGTH} is {header_length} but the body has only "
                        f"{len(mv)} bytes")
        n = header_length
    if n > limits.max_header_bytes:
        raise PayloadTooLarge(f"{what} JSON header of {n} bytes "
                              f"(limit {limits.max_header_bytes})")
    return mv[:n], mv[n:]


# -- tensors: JSON and binary -----------------------------------------------------------------


def _as_bytes_array(arr: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat_in):
        if isinstance(v, str):
            v = v.encode("utf-8")
        elif isinstance(v, np.bytes_ | bytearray | memoryview):
            v = bytes(v)
        if type(v) is not bytes:
            raise InvalidArgument(f"tensor {name!r}: a BYTES element must be bytes or str, "
                                  f"not {type(v).__name__}")
        flat_out[i] = v
    return out


def _json_tensor_data(data: Any, datatype: str, shape: tuple[int, ...], n: int,
                      what: str) -> np.ndarray:
    """The array of a tensor given as JSON ``data`` (flat or nested, row major)."""
    if type(data) is not list:
        data = [data]  # a scalar: Triton accepts a bare value for one element
    if datatype == "BF16":
        raise _fail(f"{what}: BF16 has no JSON form; send it as binary data")
    if datatype == "BYTES":
        flat = _flatten(data, what)
        if len(flat) != n:
            raise _fail(f"{what}: shape {list(shape)} needs {n} elements, data has {len(flat)}")
        out = np.empty(n, dtype=object)
        for i, v in enumerate(flat):
            if type(v) is not str:
                raise _fail(f"{what}: BYTES data must be strings, found {_json_type(v)}")
            out[i] = v.encode("utf-8")
        return out.reshape(shape)
    try:
        raw = np.array(data)
    except ValueError as exc:  # ragged nesting
        raise _fail(f"{what}: data is not a regular (rectangular) array: {exc}") from None
    if raw.size != n:
        raise _fail(f"{what}: shape {list(shape)} needs {n} elements, data has {raw.size}")
    kind = raw.dtype.kind
    want = DATATYPES[datatype]
    if n == 0:
        return np.empty(shape, dtype=want)
    if datatype == "BOOL":
        if kind != "b":
            raise _fail(f"{what}: BOOL data must be true/false values")
    elif want.kind in "iu":
        if datatype == "UINT64" and kind in "fO":  # past int64: numpy guessed float/object
            raw = _uint64_exact(_flatten(data, what), what)
            kind = "u"
        if kind not in "iu":
            raise _fail(f"{what}: {datatype} data must be integers, found "
                        f"{_kind_name(raw)}")
        lo, hi = _INT_RANGE[datatype]
        if int(raw.min()) < lo or int(raw.max()) > hi:
            raise _fail(f"{what}: a value is out of the {datatype} range [{lo}, {hi}]")
    elif kind == "O":
        raise _fail(f"{what}: data holds mixed values or numbers out of any numeric range")
    elif kind not in "iuf":  # floats take JSON integers too, not booleans or strings
        raise _fail(f"{what}: {datatype} data must be numbers, found {_kind_name(raw)}")
    with np.errstate(over="ignore"):
        return raw.astype(want).reshape(shape)


def _uint64_exact(flat: list, what: str) -> np.ndarray:
    if not all(type(v) is int for v in flat):
        raise _fail(f"{what}: UINT64 data must be integers")
    if min(flat) < 0 or max(flat) >= 2**64:
        raise _fail(f"{what}: a value is out of the UINT64 range [0, {2**64 - 1}]")
    return np.array(flat, dtype=np.uint64)


def _kind_name(raw: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "f": "non-integer numbers", "O": "mixed values"}.get(
        raw.dtype.kind, str(raw.dtype))


def _flatten(data: list, what: str, depth: int = 0) -> list:
    if depth > 64:
        raise _fail(f"{what}: data nests too deeply")
    if not any(type(v) is list for v in data):
        return data
    out: list = []
    for v in data:
        if type(v) is list:
            out.extend(_flatten(v, what, depth + 1))
        else:
            out.append(v)
    return out


def _binary_tensor_data(buf: memoryview, datatype: str, shape: tuple[int, ...], n: int,
                        what: str) -> np.ndarray:
    want = DATATYPES[datatype]
    if datatype == "BYTES":
        return _decode_bytes_elements(buf, n, what).reshape(shape)
    if len(buf) != n * want.itemsize:
        raise _fail(f"{what}: shape {list(shape)} of {datatype} needs {n * want.itemsize} "
                    f"bytes, binary_data_size is {len(buf)}")
    arr = np.frombuffer(buf, dtype=want).reshape(shape)
    if datatype == "BOOL" and n and arr.view(np.uint8).max() > 1:
        raise _fail(f"{what}: BOOL bytes must be 0 or 1")
    return arr


def _decode_bytes_elements(buf: memoryview, n: int, what: str) -> np.ndarray:
    out = np.empty(n, dtype=object)
    pos, end = 0, len(buf)
    for i in range(n):
        if pos + 4 > end:
            raise _fail(f"{what}: BYTES data ends inside element {i} of {n}")
        (length,) = _U32.unpack_from(buf, pos)
        pos += 4
        if pos + length > end:
            raise _fail(f"{what}: BYTES element {i} of {length} bytes runs past its data")
        out[i] = bytes(buf[pos:pos + length])
        pos += length
    if pos != end:
        raise _fail(f"{what}: {end - pos} bytes left after the {n} BYTES elements")
    return out


def _encode_bytes_elements(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1):
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _tensor_payload(t: InferTensor) -> bytes | memoryview:
    """The binary-extension bytes of a tensor."""
    if t.datatype == "BYTES":
        return _encode_bytes_elements(t.data)
    arr = np.ascontiguousarray(t.data)
    want = DATATYPES[t.datatype]
    if arr.dtype != want:
        arr = arr.astype(want)
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _json_data(t: InferTensor) -> list | np.ndarray:
    """A tensor's data as a flat JSON list, or (with orjson) a flat contiguous array that
    :func:`_dumps` writes as one; never an array orjson would write differently from ``json``
    (non-finite floats: orjson writes ``null``)."""
    if t.datatype == "BF16":
        raise InvalidArgument(f"output {t.name!r}: BF16 has no JSON form; ask for binary_data")
    flat = np.asarray(t.data).reshape(-1)
    if t.datatype == "BYTES":
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError:
            raise InvalidArgument(f"output {t.name!r} holds bytes that are not UTF-8; "
                                  "ask for binary_data") from None
    if _orjson is not None and flat.dtype.kind in "biuf" and (
            flat.dtype.kind != "f" or bool(np.isfinite(flat).all())):
        return np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))
    return flat.tolist()


def _dumps(doc: dict[str, Any], non_finite: bool) -> bytes:
    """``doc`` as compact UTF-8 JSON (numpy arrays from :func:`_json_data` as lists).
    ``non_finite``: ``doc`` may hold a NaN or infinite float, which only ``json`` writes as a
    token (orjson writes ``null``)."""
    if _orjson is not None and not non_finite:
        try:
            return _orjson.dumps(doc, option=_orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # orjson.JSONEncodeError: huge integers, lone surrogates
            pass
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False,
                      default=_tolist).encode("utf-8")


def _has_non_finite(params: Mapping[str, Any] | None) -> bool:
    if not params:
        return False
    return any(type(v) is float and not math.isfinite(v) for v in params.values())


def _tolist(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _tensor_header(t: InferTensor, binary: bytes | memoryview | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
    params = dict(t.parameters)
    if binary is not None:
        params["binary_data_size"] = len(binary)
    else:
        params.pop("binary_data_size", None)
        entry["data"] = _json_data(t)
    if params:
        entry["parameters"] = params
    return entry


def _check_tensor(t: InferTensor) -> None:
    want = numpy_dtype(t.datatype)
    if not isinstance(t.data, np.ndarray):
        raise InvalidArgument(f"tensor {t.name!r}: data must be a numpy array")
    if tuple(t.data.shape) != tuple(t.shape):
        raise InvalidArgument(f"tensor {t.name!r}: shape {list(t.shape)} but the array is "
                              f"{list(t.data.shape)}")
    if t.datatype != "BYTES" and t.data.dtype.newbyteorder("=") != want.newbyteorder("="):
        raise InvalidArgument(f"tensor {t.name!r}: array dtype {t.data.dtype} is not "
                              f"{t.datatype}")


def _encode(doc: dict[str, Any], tensors: Sequence[InferTensor], binary: Sequence[bool],
            key: str) -> tuple[bytes, int | None]:
    entries, payloads = [], []
    for t, as_binary in zip(tensors, binary, strict=True):
        _check_tensor(t)
        payload = _tensor_payload(t) if as_binary else None
        entries.append(_tensor_header(t, payload))
        if payload is not None:
            payloads.append(payload)
    doc[key] = entries
    # a numeric tensor's data stays a list only when it holds a NaN or an infinity
    non_finite = _has_non_finite(doc.get("parameters")) or any(
        _has_non_finite(e.get("parameters"))
        or (type(e.get("data")) is list and e["datatype"] != "BYTES") for e in entries)
    header = _dumps(doc, non_finite)
    if not payloads:
        return header, None
    return b"".join([header, *payloads]), len(header)


def _decode_tensors(items: Any, binary: memoryview, what: str, limits: Limits,
                    pos: int) -> tuple[tuple[InferTensor, ...], int]:
    if type(items) is not list:
        raise _fail(f"{what} must be an array, not {_json_type(items)}")
    if len(items) > limits.max_tensors:
        raise PayloadTooLarge(f"{len(items)} {what} (limit {limits.max_tensors})")
    out, names = [], set()
    for i, item in enumerate(items):
        where = f"{what}[{i}]"
        obj = _obj(item, where)
        _check_keys(obj, _TENSOR_KEYS, where)
        name = _string(obj.get("name"), f"{where}.name", limits)
        where = f"{what[:-1]} {name!r}"
        if name in names:
            raise _fail(f"{where} appears twice")
        names.add(name)
        datatype = obj.get("datatype")
        if type(datatype) is not str or datatype not in DATATYPES:
            raise _fail(f"{where}: unknown datatype {datatype!r} "
                        f"(known: {', '.join(DATATYPES)})")
        shape, n = _shape(obj.get("shape"), where, limits)
        params = _parameters(obj.get("parameters"), where, limits)
        size = _binary_size(params, where)
        if size is not None:
            if "data" in obj:
                raise _fail(f"{where} has both data and binary_data_size")
            if pos + size > len(binary):
                raise _fail(f"{where}: binary_data_size {size} runs past the body "
                            f"({len(binary) - pos} bytes left)")
            data = _binary_tensor_data(binary[pos:pos + size], datatype, shape, n, where)
            pos += size
        else:
            if "data" not in obj:
                raise _fail(f"{where} has neither data nor parameters.binary_data_size")
            data = _json_tensor_data(obj["data"], datatype, shape, n, where)
        out.append(InferTensor(name, datatype, shape, data, params))
    return tuple(out), pos


_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "data", "parameters"})
_REQUEST_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_RESPONSE_KEYS = frozenset({"model_name", "model_version", "id", "outputs", "parameters"})


# -- requests ---------------------------------------------------------------------------------


def decode_request(body: bytes | bytearray | memoryview,
                   header_length: int | str | None = None,
                   limits: Limits = DEFAULT_LIMITS) -> InferRequest:
    """Parse an inference request body (``header_length``: the
    ``Inference-Header-Content-Length`` header, None when absent). Binary inputs are read-only
    views of ``body``. Raises InvalidArgument or PayloadTooLarge."""
    header, binary = _split_body(body, header_length, limits, "request")
    doc = _parse_json(header, "request")
    _check_keys(doc, _REQUEST_KEYS, "request")
    rid = doc.get("id")
    if rid is not None:
        rid = _string(rid, "request.id", limits)
    params = _parameters(doc.get("parameters"), "request", limits)
    if "inputs" not in doc:
        raise _fail("request has no inputs")
    inputs, used = _decode_tensors(doc["inputs"], binary, "inputs", limits, 0)
    if used != len(binary):
        raise _fail(f"the body has {len(binary) - used} bytes after the binary data of the "
                    "inputs (binary_data_size and Inference-Header-Content-Length disagree)")
    outputs: list[RequestedOutput] = []
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if type(raw_outputs) is not list:
            raise _fail(f"request.outputs must be an array, not {_json_type(raw_outputs)}")
        if len(raw_outputs) > limits.max_tensors:
            raise PayloadTooLarge(f"{len(raw_outputs)} outputs (limit {limits.max_tensors})")
        seen = set()
        for i, item in enumerate(raw_outputs):
            obj = _obj(item, f"outputs[{i}]")
            _check_keys(obj, _OUTPUT_KEYS, f"outputs[{i}]")
            name = _string(obj.get("name"), f"outputs[{i}].name", limits)
            if name in seen:
                raise _fail(f"output {name!r} is requested twice")
            seen.add(name)
            oparams = _parameters(obj.get("parameters"), f"output {name!r}", limits)
            if "binary_data" in oparams and type(oparams["binary_data"]) is not bool:
                raise _fail(f"output {name!r}: parameters.binary_data must be a boolean")
            outputs.append(RequestedOutput(name, oparams))
    if "binary_data_output" in params and type(params["binary_data_output"]) is not bool:
        raise _fail("request.parameters.binary_data_output must be a boolean")
    return InferRequest(inputs, tuple(outputs), rid, params)


def encode_request(request: InferRequest, *, binary: bool = True) -> tuple[bytes, int | None]:
    """The body of ``request`` and its ``Inference-Header-Content-Length`` (None: pure JSON).

    ``binary=True`` sends every input as binary data (BF16 always is)."""
    doc: dict[str, Any] = {}
    if request.id is not None:
        doc["id"] = request.id
    if request.parameters:
        doc["parameters"] = dict(request.parameters)
    if request.outputs:
        doc["outputs"] = [{"name": o.name, **({"parameters": dict(o.parameters)}
                                              if o.parameters else {})}
                          for o in request.outputs]
    flags = [binary or t.datatype == "BF16" for t in request.inputs]
    return _encode(doc, request.inputs, flags, "inputs")


# -- responses --------------------------------------------------------------------------------


def encode_response(response: InferResponse, request: InferRequest | None = None, *,
                    binary: bool | None = None) -> tuple[bytes, int | None]:
    """The body of ``response`` and its ``Inference-Header-Content-Length`` (None: pure JSON).

    Only the outputs ``request`` selects are written; each goes binary as the request asks
    (:meth:`InferRequest.wants_binary`) unless ``binary`` forces it one way; BF16 outputs are
    always binary. An output the request names that the response lacks is an InvalidArgument."""
    outputs = list(response.outputs)
    if request is not None and request.outputs:
        have = {t.name for t in outputs}
        missing = [o.name for o in request.outputs if o.name not in have]
        if missing:
            raise InvalidArgument(f"unknown output(s) {missing} requested "
                                  f"(the model has {sorted(have)})")
        outputs = [t for t in outputs if request.selects(t.name)]
    flags = []
    for t in outputs:
        want = binary if binary is not None else (
            request.wants_binary(t.name) if request is not None else False)
        flags.append(want or t.datatype == "BF16")
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    return _encode(doc, outputs, flags, "outputs")


def decode_response(body: bytes | bytearray | memoryview,
                    header_length: int | str | None = None,
                    limits: Limits = DEFAULT_LIMITS) -> InferResponse:
    """Parse an inference response body (the client side)."""
    header, binary = _split_body(body, header_length, limits, "response")
    doc = _parse_json(header, "response")
    _check_keys(doc, _RESPONSE_KEYS, "response")
    name = _string(doc.get("model_name"), "response.model_name", limits)
    version = doc.get("model_version")
    if version is not None:
        version = _string(version, "response.model_version", limits)
    rid = doc.get("id")
    if rid is not None:
        rid = _string(rid, "response.id", limits)
    params = _parameters(doc.get("parameters"), "response", limits)
    outputs, used = _decode_tensors(doc.get("outputs", []), binary, "outputs", limits, 0)
    if used != len(binary):
        raise _fail(f"the body has {len(binary) - used} bytes after the binary outputs")
    return InferResponse(name, outputs, version, rid, params)


def response_headers(header_length: int | None) -> dict[str, str]:
    """HTTP headers for a response body made by :func:`encode_response`."""
    if header_length is None:
        return {"Content-Type": CONTENT_TYPE_JSON}
    return {"Content-Type": CONTENT_TYPE_BINARY, HEADER_LENGTH: str(header_length)}


# -- errors -----------------------------------------------------------------------------------

_HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.UNSUPPORTED_VERSION: 400,
    Code.PERMISSION_DENIED: 403,
    Code.INTERNAL: 500,
    Code.UNKNOWN: 500,
    Code.HANDLER_FAILED: 500,
}
_CODE_OF_STATUS = {400: Code.INVALID_ARGUMENT, 404: Code.NOT_FOUND, 504: Code.DEADLINE_EXCEEDED,
                   429: Code.RESOURCE_EXHAUSTED, 503: Code.UNAVAILABLE,
                   413: Code.PAYLOAD_TOO_LARGE, 403: Code.PERMISSION_DENIED,
                   401: Code.PERMISSION_DENIED}


def http_status(exc: TandemError) -> int:
    """The HTTP status for a Tandem error (the gRPC→HTTP mapping: 400, 404, 429, 503, 504…)."""
    return _HTTP_STATUS.get(exc.code, 500)


def error_body(exc: TandemError | str) -> bytes:
    """The KServe v2 error body ``{"error": "<message>"}``, plus Tandem's ``code`` name and
    ``retryable`` flag (extra keys KServe clients ignore)."""
    if isinstance(exc, str):
        return json.dumps({"error": exc}, ensure_ascii=False).encode("utf-8")
    return json.dumps({"error": exc.message or type(exc).__name__, "code": exc.code.name,
                       "retryable": exc.retryable}, ensure_ascii=False).encode("utf-8")


def error_from_http(status: int, body: bytes | bytearray | memoryview) -> TandemError:
    """Rebuild the error a server sent (Tandem's ``code`` when present, else by status)."""
    message, code, retryable = f"HTTP {status}", None, None
    try:
        doc = json.loads(bytes(body[:65536]).decode("utf-8"))
        if type(doc) is dict:
            if type(doc.get("error")) is str:
                message = doc["error"]
            if type(doc.get("code")) is str and doc["code"] in Code.__members__:
                code = Code[doc["code"]]
            if type(doc.get("retryable")) is bool:
                retryable = doc["retryable"]
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    if code is None:
        code = _CODE_OF_STATUS.get(status, Code.INTERNAL if status >= 500 else
                                   Code.INVALID_ARGUMENT)
    return error_class(code)(message, retryable=retryable)


# -- metadata ---------------------------------------------------------------------------------


def metadata_shape(shape: Sequence[int | str | None]) -> list[int]:
    """A shape for model metadata: symbolic or unknown dims become -1."""
    return [d if type(d) is int and d >= 0 else -1 for d in shape]


def model_metadata(name: str, versions: Sequence[str], platform: str,
                   inputs: Sequence[tuple[str, str, Sequence[int | str | None]]],
                   outputs: Sequence[tuple[str, str, Sequence[int | str | None]]],
                   parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body of ``GET /v2/models/<name>``: ``inputs``/``outputs`` as (name, datatype, shape)
    with -1 for open dims."""
    doc: dict[str, Any] = {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [{"name": n, "datatype": d, "shape": metadata_shape(s)} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": metadata_shape(s)}
                    for n, d, s in outputs],
    }
    if parameters:
        doc["parameters"] = dict(parameters)
    return doc


def server_metadata(name: str, version: str, extensions: Sequence[str] = ("binary_tensor_data",)
                    ) -> dict[str, Any]:
    """The body of ``GET /v2``."""
    return {"name": name, "version": version, "extensions": list(extensions)}


# -- the Tandem wire --------------------------------------------------------------------------


def to_wire_tensor(t: InferTensor) -> Tensor:
    """The protocol :class:`~tandem.protocol.tensors.Tensor` of a KServe tensor (RAW encoding);
    InvalidArgument for a datatype the wire does not carry (UINT16/32/64, INT16, FP64, BYTES)."""
    dtype = _WIRE.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(f"tensor {t.name!r}: datatype {t.datatype} does not travel on the "
                              f"Tandem wire (it carries {', '.join(_WIRE)})")
    return Tensor.from_array(t.name, np.asarray(t.data), dtype=dtype)


def from_wire_tensor(t: Tensor) -> InferTensor:
    """A KServe tensor from a protocol tensor (FP16/INT8 encodings decoded to FP32)."""
    arr = t.to_array()
    datatype = "FP32" if arr.dtype == np.float32 else _FROM_WIRE[t.dtype]
    return InferTensor(t.name, datatype, tuple(arr.shape), arr)
