"""The KServe v2 (Open Inference Protocol) codec: JSON tensors, the binary tensor extension, errors,
and compatibility with Triton's own client library in both directions."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tandem.protocol import kserve
from tandem.protocol.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
    Unavailable,
)
from tandem.protocol.kserve import InferRequest, InferResponse, InferTensor, RequestedOutput
from tandem.protocol.tensors import DType, Encoding, Tensor

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64"]


@pytest.fixture(autouse=True, params=["orjson", "json"])
def json_library(request, monkeypatch):
    """Every test runs with orjson (the extras' fast path) and with the standard library's json
    (the fallback when orjson is not installed): the codec must behave the same with both."""
    if request.param == "orjson":
        if kserve._orjson is None:
            pytest.skip("orjson is not installed (the edge and cloud extras bring it)")
    else:
        monkeypatch.setattr(kserve, "_orjson", None)
    return request.param


def sample(datatype: str, shape=(2, 3), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = kserve.DATATYPES[datatype]
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if datatype == "BYTES":
        return np.array([bytes(rng.integers(0, 256, i % 5)) for i in range(n)],
                        dtype=object).reshape(shape)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        vals = rng.integers(max(info.min, -1000), min(info.max, 1000), n).astype(dt)
        vals[0] = info.max  # extremes survive both encodings
        vals[-1] = info.min
        return vals.reshape(shape)
    if datatype == "BF16":
        return rng.integers(0, 2**16, n).astype(np.uint16).reshape(shape)
    return (rng.standard_normal(n) * 100).astype(dt).reshape(shape)


def roundtrip_request(req: InferRequest, binary: bool) -> InferRequest:
    body, n = kserve.encode_request(req, binary=binary)
    return kserve.decode_request(body, n)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_every_datatype_round_trips(datatype, binary):
    arr = sample(datatype)
    if datatype == "BYTES" and not binary:  # JSON BYTES are strings: UTF-8 only
        arr = np.array(["ä", "b", "", "cd", "e", "f"], dtype=object).reshape(2, 3)
    req = InferRequest((InferTensor.from_array("t", arr, datatype),), id="r1")
    got = roundtrip_request(req, binary).inputs[0]
    assert got.datatype == datatype and got.shape == (2, 3)
    assert got.data.dtype == kserve.DATATYPES[datatype]
    if datatype == "BYTES":
        arr = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(arr)
    np.testing.assert_array_equal(got.data, arr)


def test_bf16_travels_binary_even_when_json_is_asked():
    arr = sample("BF16")
    body, n = kserve.encode_request(
        InferRequest((InferTensor.from_array("b", arr, "BF16"),)), binary=False)
    assert n is not None
    got = kserve.decode_request(body, n).inputs[0]
    assert got.datatype == "BF16"
    np.testing.assert_array_equal(got.data, arr)
    bad = {"inputs": [{"name": "b", "datatype": "BF16", "shape": [1], "data": [1]}]}
    with pytest.raises(InvalidArgument, match="BF16 has no JSON form"):
        kserve.decode_request(json.dumps(bad).encode())


def test_binary_inputs_are_views_of_the_body():
    arr = np.arange(1000, dtype=np.float32)
    body, n = kserve.encode_request(InferRequest((InferTensor.from_array("x", arr),)))
    got = kserve.decode_request(body, n).inputs[0].data
    assert not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(body, np.uint8))


def test_json_data_may_be_nested_or_flat_and_bytes_are_strings():
    doc = {"inputs": [
        {"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        {"name": "b", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]},
        {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", ""]},
        {"name": "f", "datatype": "FP32", "shape": [3], "data": [1, 2.5, -3]},
        {"name": "z", "datatype": "FP32", "shape": [], "data": 7.0},
    ]}
    req = kserve.decode_request(json.dumps(doc).encode())
    a, b, s, f, z = req.inputs
    np.testing.assert_array_equal(a.data, b.data)
    assert list(s.data) == ["héllo".encode(), b""]
    assert f.data.dtype == np.float32 and f.data.tolist() == [1, 2.5, -3]
    assert z.data.shape == () and float(z.data) == 7.0


@pytest.mark.parametrize(("tensor", "match"), [
    ({"datatype": "INT32", "shape": [2], "data": [1.5, 2]}, "must be integers"),
    ({"datatype": "INT8", "shape": [1], "data": [300]}, "out of the INT8 range"),
    ({"datatype": "UINT8", "shape": [1], "data": [-1]}, "out of the UINT8 range"),
    ({"datatype": "BOOL", "shape": [2], "data": [1, 0]}, "true/false"),
    ({"datatype": "FP32", "shape": [1], "data": [True]}, "must be numbers"),
    ({"datatype": "FP32", "shape": [1], "data": ["1"]}, "must be numbers"),
    ({"datatype": "FP32", "shape": [3], "data": [1, 2]}, "needs 3 elements"),
    ({"datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}, "rectangular"),
    ({"datatype": "BYTES", "shape": [1], "data": [1]}, "must be strings"),
    ({"datatype": "FP33", "shape": [1], "data": [1]}, "unknown datatype"),
    ({"datatype": "FP32", "shape": [-1], "data": [1]}, "integers >= 0"),
    ({"datatype": "FP32", "shape": "1", "data": [1]}, "array of integers"),
    ({"datatype": "FP32", "shape": [1]}, "neither data nor"),
    ({"datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}},
     "both data and binary_data_size"),
    ({"datatype": "FP32", "shape": [1], "data": [1], "extra": 1}, "unknown field"),
    ({"datatype": "FP32", "shape": [1], "data": [1], "parameters": {"p": [1]}},
     "boolean, number or string"),
    ({"datatype": "INT64", "shape": [1], "data": [2**70]}, "must be integers, found mixed"),
    ({"datatype": "FP32", "shape": [2], "data": [1, "a"]}, "must be numbers"),
])
def test_bad_json_tensors_are_invalid_arguments(tensor, match):
    doc = {"inputs": [{"name": "x", **tensor}]}
    with pytest.raises(InvalidArgument, match=match):
        kserve.decode_request(json.dumps(doc).encode())


def _binary_body(header: dict, payload: bytes) -> tuple[bytes, int]:
    h = json.dumps(header).encode()
    return h + payload, len(h)


def test_uint64_beyond_int64_in_json():
    doc = {"inputs": [{"name": "u", "datatype": "UINT64", "shape": [2], "data": [2**64 - 1, 1]}]}
    assert kserve.decode_request(json.dumps(doc).encode()).inputs[0].data.tolist() == [
        2**64 - 1, 1]
    doc["inputs"][0]["data"] = [2**64, 1]
    with pytest.raises(InvalidArgument, match="UINT64 range"):
        kserve.decode_request(json.dumps(doc).encode())


@pytest.mark.parametrize(("header", "payload", "hlen", "match"), [
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                  "parameters": {"binary_data_size": 8}}]}, b"\0" * 4, None,
     "runs past the body"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 4, None, "needs 8 bytes"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 8, None, "4 bytes after"),
    ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1],
                  "parameters": {"binary_data_size": 1}}]}, b"\x02", None, "0 or 1"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 9) + b"ab",
     None, "runs past its data"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2],
                  "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 2) + b"ab",
     None, "ends inside element 1"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                  "parameters": {"binary_data_size": -4}}]}, b"", None, "binary_data_size"),
    ({"inputs": []}, b"", 10_000, "only"),
    ({"inputs": []}, b"", "12x", "non-negative integer"),
])
def test_bad_binary_bodies_are_invalid_arguments(header, payload, hlen, match):
    body, n = _binary_body(header, payload)
    with pytest.raises(InvalidArgument, match=match):
        kserve.decode_request(body, n if hlen is None else hlen)


@pytest.mark.parametrize(("body", "match"), [
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1]", "must be a JSON object"),
    (b"{}", "no inputs"),
    (b'{"inputs": {}}', "must be an array"),
    (b'{"inputs": [], "id": 5}', "request.id must be a string"),
    (b'{"inputs": [], "bogus": 1}', "unknown field"),
    (b'{"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}', "requested twice"),
    (b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}',
     "must be a boolean"),
    (b'{"inputs": [], "parameters": {"binary_data_output": "yes"}}', "must be a boolean"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [0], "data": []},'
     b' {"name": "x", "datatype": "FP32", "shape": [0], "data": []}]}', "appears twice"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply|must be a JSON object"),
])
def test_malformed_requests(body, match):
    with pytest.raises(InvalidArgument, match=match):
        kserve.decode_request(body)


def test_limits_are_enforced_before_allocation():
    lim = kserve.Limits(max_body_bytes=1000, max_header_bytes=200, max_tensors=2, max_rank=3,
                        max_elements=100, max_string_len=10)
    with pytest.raises(PayloadTooLarge, match="body"):
        kserve.decode_request(b" " * 1001, limits=lim)
    with pytest.raises(PayloadTooLarge, match="JSON header"):
        kserve.decode_request(b" " * 300, limits=lim)
    huge = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [10**6, 10**6],
                        "parameters": {"binary_data_size": 0}}]}
    with pytest.raises(PayloadTooLarge, match="elements"):
        kserve.decode_request(json.dumps(huge).encode(), limits=lim)
    rank = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 4, "data": [1]}]}
    with pytest.raises(PayloadTooLarge, match="rank"):
        kserve.decode_request(json.dumps(rank).encode(), limits=lim)
    many = {"inputs": [{"name": str(i), "datatype": "FP32", "shape": [0], "data": []}
                       for i in range(3)]}
    with pytest.raises(PayloadTooLarge, match="limit 2"):
        kserve.decode_request(json.dumps(many).encode(), limits=lim)
    with pytest.raises(PayloadTooLarge, match="longer than"):
        kserve.decode_request(b'{"id": "' + b"a" * 11 + b'", "inputs": []}', limits=lim)
    with pytest.raises(InvalidArgument):
        kserve.Limits(max_tensors=-1)


def test_response_outputs_follow_the_request():
    y = np.arange(4, dtype=np.float32).reshape(2, 2)
    z = np.array([True, False])
    resp = InferResponse("m", (InferTensor.from_array("y", y), InferTensor.from_array("z", z)),
                         model_version="1", id="abc", parameters={"plan": "cloud"})
    # every output, JSON by default
    body, n = kserve.encode_response(resp)
    assert n is None
    doc = json.loads(body)
    assert doc["model_name"] == "m" and doc["model_version"] == "1" and doc["id"] == "abc"
    assert doc["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 2],
                                 "data": [0.0, 1.0, 2.0, 3.0]}
    # binary_data_output for all, except an output that says otherwise
    req = InferRequest((), (RequestedOutput("z", {"binary_data": False}), RequestedOutput("y")),
                       parameters={"binary_data_output": True})
    body, n = kserve.encode_response(resp, req)
    assert n is not None
    back = kserve.decode_response(body, n)
    assert [t.name for t in back.outputs] == ["y", "z"]
    assert back.outputs[0].parameters["binary_data_size"] == 16
    assert "binary_data_size" not in back.outputs[1].parameters
    np.testing.assert_array_equal(back.outputs[0].data, y)
    np.testing.assert_array_equal(back.outputs[1].data, z)
    # only the selected outputs; an unknown one is the client's mistake
    only = kserve.decode_response(*kserve.encode_response(
        resp, InferRequest((), (RequestedOutput("z"),))))
    assert [t.name for t in only.outputs] == ["z"]
    with pytest.raises(InvalidArgument, match="unknown output"):
        kserve.encode_response(resp, InferRequest((), (RequestedOutput("nope"),)))
    assert kserve.response_headers(None) == {"Content-Type": "application/json"}
    assert kserve.response_headers(12)[kserve.HEADER_LENGTH] == "12"


def test_non_finite_floats_in_json_use_python_tokens():
    resp = InferResponse("m", (InferTensor.from_array("y", np.array([np.nan, np.inf, -np.inf],
                                                                     np.float32)),))
    body, _ = kserve.encode_response(resp)
    assert b"NaN" in body and b"-Infinity" in body
    back = kserve.decode_response(body)
    assert np.isnan(back.outputs[0].data[0]) and np.isinf(back.outputs[0].data[1:]).all()


@pytest.mark.parametrize(("exc", "status"), [
    (InvalidArgument("x"), 400), (NotFound("x"), 404), (FailedPrecondition("x"), 400),
    (DeadlineExceeded("x"), 504), (ResourceExhausted("x"), 429), (Unavailable("x"), 503),
    (PayloadTooLarge("x"), 413), (InternalError("x"), 500),
])
def test_errors_map_to_http_and_back(exc, status):
    assert kserve.http_status(exc) == status
    body = kserve.error_body(exc)
    assert json.loads(body)["error"] == "x"
    back = kserve.error_from_http(status, body)
    assert type(back) is type(exc) and back.retryable == exc.retryable
    # a plain KServe server's error (no Tandem code) maps by status
    plain = kserve.error_from_http(status, b'{"error": "y"}')
    assert plain.message == "y"
    assert kserve.error_from_http(502, b"<html>").code is Code.INTERNAL


def test_metadata_marks_open_dims():
    doc = kserve.model_metadata("m", ["1"], "onnxruntime_onnx",
                                [("x", "FP32", ("N", 3, None, 16))], [("y", "FP32", (-1, 10))])
    assert doc["inputs"][0]["shape"] == [-1, 3, -1, 16]
    assert doc["outputs"][0]["shape"] == [-1, 10]
    assert kserve.server_metadata("tandem", "0.1")["extensions"] == ["binary_tensor_data"]


def test_wire_tensor_conversion():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = kserve.to_wire_tensor(InferTensor.from_array("x", arr))
    assert t.dtype is DType.FLOAT32 and t.shape == (2, 3)
    back = kserve.from_wire_tensor(Tensor.from_array("x", arr, Encoding.FP16))
    assert back.datatype == "FP32"
    np.testing.assert_allclose(back.data, arr)
    assert kserve.from_wire_tensor(Tensor.from_array("b", np.array([1], np.uint16),
                                                     dtype=DType.BFLOAT16)).datatype == "BF16"
    with pytest.raises(InvalidArgument, match="does not travel"):
        kserve.to_wire_tensor(InferTensor.from_array("d", np.zeros(2, np.float64)))


def test_datatype_helpers():
    assert kserve.datatype_of(np.float32) == "FP32"
    assert kserve.datatype_of(np.dtype(">i4")) == "INT32"
    assert kserve.datatype_of(np.dtype("U3")) == "BYTES"
    with pytest.raises(InvalidArgument):
        kserve.datatype_of(np.complex64)
    with pytest.raises(InvalidArgument):
        kserve.numpy_dtype("FLOAT")
    with pytest.raises(InvalidArgument, match="is not FP32"):
        InferTensor.from_array("x", np.zeros(2, np.int32), "FP32")


# -- Triton's own client library builds the bodies we parse, and parses the bodies we build -----

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_request_bodies_decode(binary):
    arrays = {"FP32": sample("FP32"), "INT64": sample("INT64"), "BOOL": sample("BOOL"),
              "FP16": sample("FP16"), "UINT8": sample("UINT8"),
              "BYTES": np.array([b"a", b"bc", b"", b"d", b"e", b"f"], dtype=object).reshape(2, 3)}
    inputs = []
    for dt, arr in arrays.items():
        inp = httpclient.InferInput(f"in_{dt}", list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary or dt == "FP16")
        inputs.append(inp)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=True)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-7", parameters={"deadline_ms": 50})
    req = kserve.decode_request(body, json_size)
    assert req.id == "req-7" and req.parameters["deadline_ms"] == 50
    assert req.wants_binary("y")
    for t in req.inputs:
        np.testing.assert_array_equal(t.data, arrays[t.datatype])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_parses_our_responses(binary):
    y = sample("FP32", (3, 4))
    s = np.array([b"x", b"yz"], dtype=object)
    resp = InferResponse("m", (InferTensor.from_array("y", y), InferTensor.from_array("s", s)),
                         model_version="2", id="r")
    body, n = kserve.encode_response(resp, binary=binary)
    result = httpclient.InferResult.from_response_body(body, header_length=n)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    # tritonclient gives JSON BYTES back as str, binary ones as bytes
    assert list(result.as_numpy("s")) == ([b"x", b"yz"] if binary else ["x", "yz"])
    assert result.get_response()["model_version"] == "2"


@pytest.mark.parametrize("datatype", NUMERIC)
def test_json_bodies_hold_the_same_values_with_either_library(datatype, json_library):
    """What one library writes, the other reads to the same array: the values in a JSON body do
    not depend on whether orjson is installed on either side."""
    arr = sample(datatype, shape=(4, 50), seed=3)
    req = InferRequest((InferTensor.from_array("x", arr, datatype),), id="r",
                       parameters={"p": 1.5, "s": "é"})
    body, n = kserve.encode_request(req, binary=False)
    assert n is None
    with_json = json.loads(body)  # the standard library reads the body either way
    assert with_json["id"] == "r" and with_json["parameters"] == {"p": 1.5, "s": "é"}
    np.testing.assert_array_equal(
        np.array(with_json["inputs"][0]["data"], dtype=arr.dtype).reshape(arr.shape), arr)
    np.testing.assert_array_equal(kserve.decode_request(body).inputs[0].data, arr)


def test_float32_json_is_exact_for_any_value(json_library):
    """orjson writes float32 values in their shortest float32 form (0.1, not
    0.10000000149011612); read back, every one is the same float32 bit pattern."""
    bits = np.random.default_rng(7).integers(0, 2**32, 200_000, dtype=np.uint64)
    arr = bits.astype(np.uint32).view(np.float32)
    arr = arr[np.isfinite(arr)]
    req = InferRequest((InferTensor.from_array("x", arr),))
    back = kserve.decode_request(kserve.encode_request(req, binary=False)[0]).inputs[0].data
    np.testing.assert_array_equal(back.view(np.uint32), arr.view(np.uint32))
    short = kserve.encode_request(InferRequest((InferTensor.from_array(
        "x", np.array([0.1], np.float32)),)), binary=False)[0]
    assert (b"[0.1]" in short) == (json_library == "orjson")


@pytest.mark.parametrize("body, match", [
    (b'{"inputs":[{"name":"x","datatype":"UINT64","shape":[1],"data":[18446744073709551616]}]}',
     "out of the UINT64 range"),
    (b'{"inputs":[{"name":"x","datatype":"INT64","shape":[1],"data":[-9223372036854775809]}]}',
     "out of the INT64 range|must be integers"),
    (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1e400]}]}', None),
    (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[NaN]}]}', None),
    (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],"id":"\\ud800"}',
     None),
])
def test_what_orjson_refuses_reads_as_json_does(body, match, json_library):
    """Integers past 64 bits (orjson would make them floats), NaN/Infinity tokens, 1e400 and lone
    surrogates: read exactly as the standard library reads them, either way."""
    if match is not None:
        with pytest.raises(InvalidArgument, match=match):
            kserve.decode_request(body)
        return
    got = kserve.decode_request(body)
    want = json.loads(body)
    assert got.id == want.get("id")
    np.testing.assert_array_equal(got.inputs[0].data,
                                  np.array(want["inputs"][0]["data"], np.float32))
