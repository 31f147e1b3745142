from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.protocol import codec
from tandem.protocol.codec import DEFAULT_LIMITS, Limits, MessageType, decode, encode
from tandem.protocol.errors import (
    Code,
    InvalidArgument,
    MalformedMessage,
    PayloadTooLarge,
    ProtocolError,
    UnsupportedVersion,
)
from tandem.protocol.messages import (
    Assignment,
    CloudLoad,
    DeviceStatus,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Timings,
)
from tandem.protocol.tensors import DType, Encoding, Tensor
from tests._support.strategies import (
    assignments,
    error_responses,
    frame,
    loads,
    messages,
    ok_responses,
    request_body,
    requests,
    statuses,
)

RID = bytes(range(16))


def request(*tensors: Tensor, **kw) -> InferenceRequest:
    return InferenceRequest(RID, "cam-01", "d" * 64, 1, 100, tuple(tensors), **kw)


def malformed(data, match: str | None = None, limits: Limits = DEFAULT_LIMITS):
    with pytest.raises(MalformedMessage, match=match) as info:
        decode(data, limits)
    assert info.value.code is Code.INVALID_ARGUMENT
    return info.value


def too_large(data, match: str | None = None, limits: Limits = DEFAULT_LIMITS):
    with pytest.raises(PayloadTooLarge, match=match) as info:
        decode(data, limits)
    assert info.value.code is Code.PAYLOAD_TOO_LARGE
    return info.value


def test_public_surface():
    assert set(codec.__all__) == {"DEFAULT_LIMITS", "Compression", "FrameInfo", "Limits",
                                  "MessageType", "OpenFrame", "decode", "encode",
                                  "encode_parts", "open_frame", "peek"}
    assert {t.name: int(t) for t in MessageType} == {
        "INFERENCE_REQUEST": 1, "INFERENCE_RESPONSE": 2, "DEVICE_STATUS": 3, "CLOUD_LOAD": 4,
        "ASSIGNMENT": 5, "CHUNK": 6,
    }


def test_open_frame_is_peek_and_decode_in_one_pass():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    frame = encode(request(Tensor.from_array("x", arr)))
    opened = codec.open_frame(frame)
    assert opened.info == codec.peek(frame)
    assert opened.info.type is MessageType.INFERENCE_REQUEST and opened.info.tensor_bytes == 48
    msg = opened.decode()
    assert msg == decode(frame)
    np.testing.assert_array_equal(msg.tensors[0].to_array(), arr)
    # a data section that does not hold what the envelope declares: open_frame (envelope
    # only) accepts it, decode() raises what codec.decode raises
    cut = frame[:-4]
    opened = codec.open_frame(cut)
    with pytest.raises(MalformedMessage) as via_open:
        opened.decode()
    with pytest.raises(MalformedMessage) as via_decode:
        decode(cut)
    assert str(via_open.value) == str(via_decode.value)
    with pytest.raises(UnsupportedVersion):
        codec.open_frame(msgpack.packb([2, 1, {}]))


def test_peek_reads_the_envelope_only():
    # a compressed tensor declaring 16 MiB (its zstd frame cut short) and a RAW one:
    # peek reports type, id and declared sizes without touching the data section
    big = np.zeros((4, 1024, 1024, 4), np.uint8)
    frame_bytes = zstandard.ZstdCompressor().compress(big.tobytes())
    bomb = Tensor("b", DType.UINT8, big.shape, frame_bytes, compressed=True)
    data = encode(request(bomb, Tensor.from_array("r", np.ones(3, np.float32))))
    cut = data[: len(data) - 8]  # its payload no longer decodes...
    info = codec.peek(cut)  # ...but its envelope is whole
    assert info == codec.FrameInfo(MessageType.INFERENCE_REQUEST, RID, big.nbytes + 12, True)
    with pytest.raises(MalformedMessage):
        decode(cut)
    assert codec.peek(encode(InferenceResponse(id=RID))) == codec.FrameInfo(
        MessageType.INFERENCE_RESPONSE, RID, 0, False)
    assert codec.peek(encode(DeviceStatus("d", "online", 1))).id is None
    for junk in (b"", b"\xc1", msgpack.packb([1, 1, {"id": b"short"}])):
        with pytest.raises(MalformedMessage):
            codec.peek(junk)


# -- property round trips: every message type, every dtype and encoding, with/without zstd --


@pytest.mark.parametrize("strategy", [requests, ok_responses, error_responses, statuses, loads,
                                      assignments],
                         ids=["request", "response_ok", "response_error", "status", "load",
                              "assignment"])
@settings(max_examples=60, deadline=None)
@given(data=__import__("hypothesis").strategies.data())
def test_round_trip_every_message_type(strategy, data):
    msg = data.draw(strategy)
    frame_bytes = encode(msg)
    assert isinstance(frame_bytes, bytes)
    back = decode(frame_bytes)
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == frame_bytes  # canonical: re-encoding is byte-identical
    for mine, theirs in zip(getattr(back, "tensors", ()) or getattr(back, "outputs", ()),
                            getattr(msg, "tensors", ()) or getattr(msg, "outputs", ()),
                            strict=True):
        np.testing.assert_array_equal(mine.to_array(), theirs.to_array())


@pytest.mark.parametrize("strategy", [requests, ok_responses, error_responses, statuses, loads,
                                      assignments],
                         ids=["request", "response_ok", "response_error", "status", "load",
                              "assignment"])
@settings(max_examples=60, deadline=None)
@given(data=__import__("hypothesis").strategies.data())
def test_encode_parts_joins_to_encode(strategy, data):
    msg = data.draw(strategy)
    parts, total = codec.encode_parts(msg)
    assert isinstance(parts[0], bytes)
    assert b"".join(parts) == encode(msg)
    assert total == sum(memoryview(p).nbytes for p in parts)


_GOLDEN = __import__("pathlib").Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("path", sorted(p for p in _GOLDEN.glob("*.bin")
                                        if not p.name.startswith(("chunk_", "version_"))),
                         ids=lambda p: p.stem)
def test_encode_parts_of_golden_messages(path):
    golden = path.read_bytes()
    msg = decode(golden)
    parts, total = codec.encode_parts(msg)
    frame = encode(msg)
    assert b"".join(parts) == frame and total == len(frame)
    # canonical files re-encode byte-exact; the others were written by an older or newer writer
    if path.stem not in ("request_future_keys", "device_status", "assignment"):
        assert frame == golden


def test_encode_parts_views_tensor_data_without_copying():
    data = np.arange(1000, dtype=np.float32)
    msg = request(Tensor.from_array("x", data), Tensor.from_array("y", data[:3]))
    parts, total = codec.encode_parts(msg)
    assert total == len(encode(msg))
    views = [p for p in parts if isinstance(p, memoryview)]
    assert views and all(v.nbytes in (4000, 12) for v in views)
    assert all(len(p) < 8 for p in parts[1:] if isinstance(p, bytes))  # only pads are bytes


def test_encode_parts_checks_like_encode():
    with pytest.raises(InvalidArgument):
        codec.encode_parts(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_bytearray_memoryview(kind):
    msg = request(Tensor.from_array("x", np.arange(5, dtype=np.int64)))
    assert decode(kind(encode(msg))) == msg


def test_tensor_payloads_are_8_byte_aligned_and_in_order():
    ts = [Tensor.from_array(f"t{i}", np.arange(i + 1, dtype=np.int8)) for i in range(4)]
    data = encode(request(*ts))
    out = decode(data).tensors
    base = np.frombuffer(data, np.uint8).ctypes.data
    for t in out:
        arr = t.to_array()
        assert (arr.ctypes.data - base) % 8 == 0
    assert [t.to_array().tolist() for t in out] == [list(range(i + 1)) for i in range(4)]


def test_decode_of_raw_tensor_does_not_copy():
    arr = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    data = encode(request(Tensor.from_array("x", arr)))
    out = decode(data).tensors[0].to_array()
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))
    assert not out.flags.writeable
    # a mutable input buffer is still exposed read-only
    buf = bytearray(data)
    view = decode(buf).tensors[0].to_array()
    assert np.shares_memory(view, np.frombuffer(buf, np.uint8))
    assert not view.flags.writeable


def test_unknown_keys_are_ignored_everywhere():
    body = request_body(future="x", layout=[1, 2])
    body["trace"] = {"nested": [1, 2, 3]}
    msg = decode(frame(body, payloads=(np.array([1, 2], "<f4").tobytes(),)))
    assert msg.tensors[0].to_array().tolist() == [1.0, 2.0]
    resp = {"id": RID, "error": {"code": 6, "message": "m", "retryable": True, "hint": 1},
            "timings": {"queue_ms": 1, "compute_ms": 2.5, "gpu_ms": 3.0}, "zone": "eu"}
    out = decode(frame(resp, mtype=2))
    assert out.error == ErrorInfo(Code.UNAVAILABLE, "m", True)
    assert out.timings == Timings(1.0, 2.5)


def test_absent_optional_fields_take_their_defaults():
    out = decode(frame({"id": RID}, mtype=2))
    assert out == InferenceResponse(RID)
    st = decode(frame({"device_id": "d", "state": "online", "timestamp_ms": 5}, mtype=3))
    assert st == DeviceStatus("d", "online", 5)


def test_a_cascades_escalation_ratio_is_written_only_when_set():
    plain = DeviceStatus("d", "online", 5)
    assert b"escalation_ratio" not in encode(plain)  # older writers' bytes are unchanged
    st = DeviceStatus("d", "online", 5, escalation_ratio=0.25,
                      plan_mix=(("small", 3), ("escalate:cloud", 1)))
    assert b"escalation_ratio" in encode(st) and decode(encode(st)) == st


# -- encode refuses messages that break the schema --------------------------------------------


@pytest.mark.parametrize("msg, match", [
    (InferenceRequest(b"short", "d", "m", 0, 1, ()), "16 bytes"),
    (InferenceRequest(RID, "d", "m", -1, 1, ()), "cut_id"),
    (InferenceRequest(RID, "d", "m", 0, -5, ()), "budget_ms"),
    (InferenceRequest(RID, 5, "m", 0, 1, ()), "device_id"),
    (InferenceRequest(RID, "d", "m", 0, 1, [1, 2]), "tensors"),
    (InferenceRequest(RID, "d", "m", 0, 1, (), version=2), "version"),
    (InferenceResponse(RID, timings=Timings(math.nan)), "queue_ms"),
    (InferenceResponse(RID, outputs=(Tensor.from_array("x", np.zeros(1, np.int8)),),
                       error=ErrorInfo(Code.INTERNAL, "x")), "not both"),
    (CloudLoad("w", 1, tail_ms=(("d", 1),)), "tail_ms"),
    (DeviceStatus("d", "online", 1, rtt_ms=-1.0), "rtt_ms"),
    (DeviceStatus("d", "online", 1, escalation_ratio=-0.5), "escalation_ratio"),
    (DeviceStatus("d", "online", 1, plan_mix=(("local", -1),)), "plan_mix"),
    (DeviceStatus("d", "online", 1, plan_mix=(("local",),)), "plan_mix"),
    (Assignment("d", "m", "b", signature="not bytes"), "signature"),
    (Assignment("d", "m", "b", mirror_uris=("u", 5)), "mirror_uris"),
    (Assignment("d", "m", "b", signature=bytes(5000)), "bin of over"),
    ("not a message", "not a protocol message"),
])
def test_encode_rejects_invalid_messages(msg, match):
    with pytest.raises(InvalidArgument, match=match):
        encode(msg)


# -- strict decoding: one test per class of malformed input ----------------------------------


def test_empty_frame():
    malformed(b"", "empty")


def test_truncated_envelope():
    data = encode(request(Tensor.from_array("x", np.arange(4, dtype=np.float32))))
    for cut in (1, 2, 10, 60):
        malformed(data[:cut], "truncated")


def test_truncated_payload():
    data = encode(request(Tensor.from_array("x", np.arange(4, dtype=np.float32))))
    malformed(data[:-1], "past the end")


def test_trailing_bytes_after_the_last_payload():
    data = encode(request(Tensor.from_array("x", np.arange(4, dtype=np.float32))))
    malformed(data + b"\0", "unexpected bytes")
    malformed(encode(DeviceStatus("d", "online", 1)) + b"x", "unexpected bytes")


def test_not_an_envelope():
    malformed(msgpack.packb(5), "envelope")
    malformed(msgpack.packb({"v": 1}), "envelope")
    malformed(msgpack.packb([1, 1]), "elements")
    malformed(msgpack.packb([1, 1, {}, 4]), "elements")
    malformed(b"\xc1", "undecodable")  # msgpack's never-used byte


def test_non_integer_version_or_type():
    malformed(msgpack.packb(["1", 1, {}]), "version")
    malformed(msgpack.packb([1.0, 1, {}]), "version")
    malformed(msgpack.packb([1, "request", {}]), "type")


@pytest.mark.parametrize("version", [0, 2, 3, 255, 2**40])
def test_other_versions_are_version_mismatch(version):
    with pytest.raises(UnsupportedVersion) as info:
        decode(frame({"whatever": 1}, version=version))
    assert info.value.code is Code.UNSUPPORTED_VERSION
    # decided by the first element alone, whatever follows
    with pytest.raises(UnsupportedVersion):
        decode(msgpack.packb([version, "new", "layout", 4]))


def test_unknown_message_type():
    malformed(frame({}, mtype=99), "unknown message type 99")
    malformed(frame({}, mtype=0), "unknown message type")


def test_chunk_frame_is_not_a_message():
    malformed(frame({}, mtype=6), "chunk")


def test_body_not_a_map():
    malformed(frame([1, 2, 3]), "map")


def test_missing_required_field():
    body = request_body()
    del body["budget_ms"]
    malformed(frame(body, payloads=(bytes(8),)), "missing field 'budget_ms'")
    body = request_body()
    del body["tensors"][0]["size"]
    malformed(frame(body, payloads=(bytes(8),)), "missing field 'size'")


@pytest.mark.parametrize("key, value, match", [
    ("id", "0123456789abcdef", "id"),
    ("device_id", 7, "device_id"),
    ("model_digest", b"bytes", "model_digest"),
    ("cut_id", -1, "cut_id"),
    ("cut_id", 2**32, "cut_id"),
    ("cut_id", 1.0, "cut_id"),
    ("budget_ms", math.nan, "budget_ms"),
    ("budget_ms", -1, "budget_ms"),
    ("budget_ms", True, "budget_ms"),
    ("priority", None, "priority"),
    ("reply_topic", ["a"], "reply_topic"),
    ("tensors", {"x": 1}, "array"),
])
def test_wrong_field_types(key, value, match):
    body = request_body()
    body[key] = value
    malformed(frame(body, payloads=(bytes(8),)), match)


@pytest.mark.parametrize("n", [0, 15, 17, 32])
def test_bad_id_length(n):
    body = request_body()
    body["id"] = bytes(n)
    malformed(frame(body, payloads=(bytes(8),)), "16 bytes")


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, "1"])
def test_bad_durations(value):
    malformed(frame({"id": RID, "timings": {"queue_ms": value}}, mtype=2), "queue_ms")
    malformed(frame({"worker_id": "w", "timestamp_ms": 1, "queue_ms": value}, mtype=4),
              "queue_ms")


def test_bad_nested_records():
    malformed(frame({"id": RID, "error": "boom"}, mtype=2), "error")
    malformed(frame({"id": RID, "error": {"code": 0, "message": "m"}}, mtype=2), "code")
    malformed(frame({"id": RID, "error": {"code": 1}}, mtype=2), "message")
    malformed(frame({"worker_id": "w", "timestamp_ms": 1, "tail_ms": [["d", 1]]}, mtype=4),
              "tail_ms")
    malformed(frame({"device_id": "d", "state": "s", "timestamp_ms": 1,
                     "plan_mix": [["local", "many"]]}, mtype=3), "plan_mix")
    malformed(frame({"device_id": "d", "model_name": "m", "bundle_digest": "b",
                     "signature": "text, not bin"}, mtype=5), "signature")
    malformed(frame({"device_id": "d", "model_name": "m", "bundle_digest": "b",
                     "mirror_uris": "one"}, mtype=5), "mirror_uris")


def test_error_and_outputs_together():
    body = {"id": RID, "error": {"code": 1, "message": "m"},
            "outputs": request_body()["tensors"]}
    malformed(frame(body, mtype=2, payloads=(bytes(8),)), "not both")


def test_duplicate_map_key():
    # {"id": ..., "id": ...} written by hand: msgpack's packer cannot produce it
    entry = msgpack.packb("device_id") + msgpack.packb("a")
    raw = b"\x93\x01\x03" + b"\x83" + entry + entry + msgpack.packb("state") + msgpack.packb("x")
    malformed(raw, "duplicate")


def test_invalid_utf8():
    raw = b"\x93\x01\x03\x83" + msgpack.packb("device_id") + b"\xa2\xff\xfe"
    raw += msgpack.packb("state") + msgpack.packb("x")
    raw += msgpack.packb("timestamp_ms") + msgpack.packb(1)
    err = malformed(raw)
    assert isinstance(err.__cause__, UnicodeDecodeError)


def test_ext_types_are_refused():
    body = request_body()
    body["device_id"] = msgpack.ExtType(5, b"x")
    malformed(frame(body, payloads=(bytes(8),)))
    ts = msgpack.Timestamp(1, 0)  # ext -1
    malformed(msgpack.packb([1, 3, {"device_id": "d", "state": "s", "timestamp_ms": ts}]))


def test_unknown_dtype_code():
    malformed(frame(request_body(dtype=99), payloads=(bytes(8),)), "unknown dtype code 99")
    malformed(frame(request_body(dtype=0), payloads=(bytes(8),)), "unknown dtype")


def test_unknown_encoding_code():
    malformed(frame(request_body(encoding=7), payloads=(bytes(8),)), "unknown encoding code 7")


def test_unknown_compression_code():
    malformed(frame(request_body(compression=2), payloads=(bytes(8),)), "compression")


def test_encoding_not_defined_for_dtype():
    malformed(frame(request_body(dtype=6, encoding=1, size=4), payloads=(bytes(4),)),
              "FP16 is not defined for INT32")


def test_shape_disagrees_with_byte_count():
    malformed(frame(request_body(shape=[3]), payloads=(bytes(8),)), "needs 12 bytes")
    malformed(frame(request_body(size=12), payloads=(bytes(12),)), "needs 8 bytes")


@pytest.mark.parametrize("dims", [[-1], [2, -3], [1.5], ["2"], [None], [True]])
def test_bad_dimensions(dims):
    malformed(frame(request_body(shape=dims), payloads=(bytes(8),)), "dimension")


def test_non_zero_padding():
    body = request_body()
    head = msgpack.packb([1, 1, body], use_bin_type=True)
    pad = -len(head) % 8
    assert pad, "test needs an envelope length that is not a multiple of 8"
    malformed(head + b"\x01" * pad + bytes(8), "padding")


def test_bool_payload_must_hold_0_or_1():
    body = request_body(dtype=8, shape=[3], size=3)
    malformed(frame(body, payloads=(b"\x00\x01\x02",)), "bool")
    assert decode(frame(body, payloads=(b"\x00\x01\x01",))).tensors[0].to_array().tolist() == [
        False, True, True]


@pytest.mark.parametrize("extra, match", [
    ({}, "scale"),
    ({"scale": 0.0, "zero_point": 0}, "scale"),
    ({"scale": -1.0, "zero_point": 0}, "scale"),
    ({"scale": math.nan, "zero_point": 0}, "scale"),
    ({"scale": math.inf, "zero_point": 0}, "scale"),
    ({"scale": 1.0}, "zero_point"),
    ({"scale": 1.0, "zero_point": 128}, "zero_point"),
    ({"scale": 1.0, "zero_point": 0.5}, "zero_point"),
])
def test_bad_int8_parameters(extra, match):
    body = request_body(encoding=2, size=2, **extra)
    malformed(frame(body, payloads=(bytes(2),)), match)


def _zstd_tensor_frame(payload: bytes, shape: list[int]) -> bytes:
    body = request_body(shape=shape, compression=1, size=len(payload))
    return frame(body, payloads=(payload,))


def test_zstd_garbage_and_mismatches():
    good = zstandard.ZstdCompressor().compress(np.arange(4, dtype="<f4").tobytes())
    assert decode(_zstd_tensor_frame(good, [4])).tensors[0].to_array().tolist() == [0, 1, 2, 3]
    malformed(_zstd_tensor_frame(b"definitely not zstd", [4]), "zstd")
    malformed(_zstd_tensor_frame(good, [5]), "declares 16 bytes, tensor needs 20")
    malformed(_zstd_tensor_frame(good + b"junk", [4]), "exactly one")
    malformed(_zstd_tensor_frame(good + good, [4]), "exactly one")
    malformed(_zstd_tensor_frame(good[:-3], [4]), "zstd")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16))
    malformed(_zstd_tensor_frame(no_size, [4]), "declares")


def test_zstd_bomb_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * 2**20))
    assert len(bomb) < 64 * 1024
    limits = Limits(max_tensor_bytes=2**20)
    too_large(_zstd_tensor_frame(bomb, [16 * 2**20]), "limit 1048576", limits=limits)
    # a small declared shape with a big content size: refused by the declared-size check
    malformed(_zstd_tensor_frame(bomb, [4]), "declares")


def test_declared_sizes_over_limits_are_refused_before_allocating():
    huge = request_body(shape=[2**31 - 1] * 8, size=0)
    too_large(frame(huge), "decoded")
    too_large(frame(request_body(shape=[2**31])), "dimension")
    too_large(frame(request_body(shape=[1] * 9)), "rank 9")
    small = Limits(max_tensor_bytes=4)
    too_large(frame(request_body(), payloads=(bytes(8),)), "limit 4", limits=small)


def test_total_decoded_bytes_over_limit():
    ts = [Tensor.from_array(f"t{i}", np.zeros(400, np.uint8), compress=True) for i in range(3)]
    data = encode(request(*ts))
    assert len(data) < 1000
    too_large(data, "decode to over 1000", limits=Limits(max_message_bytes=1000,
                                                         max_tensor_bytes=400))


def test_frame_over_max_message_bytes():
    data = encode(request(Tensor.from_array("x", np.zeros(1000, np.uint8))))
    too_large(data, "frame of", limits=Limits(max_message_bytes=500))


def test_envelope_over_max_header_bytes():
    data = encode(request(reply_topic="r" * 3000))
    too_large(data, "envelope", limits=Limits(max_header_bytes=1000))


def test_string_over_max_string_len():
    data = encode(request(reply_topic="r" * 300))
    too_large(data, "max_str_len", limits=Limits(max_string_len=100))


def test_too_many_tensors():
    data = encode(request(*(Tensor.from_array(str(i), np.zeros(1, np.int8)) for i in range(5))))
    too_large(data, "5 tensors", limits=Limits(max_tensors=4))
    too_large(data, limits=Limits(max_tensors=2, max_list_len=2))  # msgpack's array limit


def test_too_many_map_keys():
    body = request_body()
    body.update({f"k{i}": i for i in range(100)})
    too_large(frame(body, payloads=(bytes(8),)), "max_map_len")


def test_deep_nesting():
    malformed(b"\x93\x01\x01" + b"\x91" * 100_000 + b"\x01")


@pytest.mark.parametrize("data", ["a string", 12, None, [1, 2]])
def test_not_a_buffer(data):
    malformed(data, "bytes")


def test_only_protocol_errors_escape():
    assert issubclass(MalformedMessage, ProtocolError)
    assert issubclass(PayloadTooLarge, ProtocolError)
    assert issubclass(UnsupportedVersion, ProtocolError)


def test_limits_validate_themselves():
    with pytest.raises(InvalidArgument):
        Limits(max_tensors=-1)
    with pytest.raises(InvalidArgument):
        Limits(max_rank=2.5)


def test_round_trip_of_a_big_tensor_is_exact():
    arr = np.random.default_rng(1).standard_normal((512, 1024), dtype=np.float32)
    msg = request(Tensor.from_array("x", arr), Tensor.from_array("y", arr, Encoding.FP16),
                  Tensor.from_array("z", arr, Encoding.INT8_AFFINE, compress=True))
    x, y, z = decode(encode(msg)).tensors
    np.testing.assert_array_equal(x.to_array(), arr)
    np.testing.assert_allclose(y.to_array(), arr, rtol=2**-11, atol=2**-24)
    assert np.abs(z.to_array() - arr).max() <= z.scale / 2 + 1e-6
    assert z.dtype is DType.FLOAT32


# -- found in review: never emit what we refuse; versions first ---------------------------------


def test_encode_refuses_what_a_default_reader_refuses():
    with pytest.raises(InvalidArgument, match="string of over 4096"):
        encode(DeviceStatus("x" * 5000, "online", 1))
    many = tuple(Tensor.from_array(f"t{i}", np.zeros(1, np.float32)) for i in range(257))
    with pytest.raises(PayloadTooLarge, match="257 tensors"):
        encode(request(*many))
    deep = Tensor.from_array("deep", np.zeros((1,) * 9, np.float32))
    with pytest.raises(InvalidArgument, match="rank"):
        encode(request(deep))
    loads_ = tuple(("d", 1, 1.0) for _ in range(4097))
    with pytest.raises(InvalidArgument, match="list of over 4096"):
        encode(CloudLoad("w", 1, tail_ms=loads_))
    # and a reader with larger limits gets what it allows
    big = Limits(max_string_len=10_000)
    assert decode(encode(DeviceStatus("x" * 5000, "online", 1), big), big).device_id == "x" * 5000


def test_decoded_int8_scale_must_be_a_normal_float32():
    t = Tensor.from_array("q", np.array([0.5, -1.0], np.float32), Encoding.INT8_AFFINE)
    good = encode(request(t))
    packed = msgpack.packb(t.scale)
    assert good.count(packed) == 1
    for bad in (1e300, 1e-300):
        frame_ = good.replace(packed, msgpack.packb(bad))
        with pytest.raises(MalformedMessage, match="normal float32"):
            decode(frame_)


@pytest.mark.parametrize("body", [
    {"x": msgpack.ExtType(5, b"ab")},  # ext types v1 forbids
    {str(i): i for i in range(100)},  # more keys than v1 allows
    "x" * 10_000,  # a longer string than v1 allows
])
def test_another_major_version_is_reported_before_the_body_is_parsed(body):
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode(msgpack.packb([2, 1, body]))


# -- attack review: the encoder never emits what the decoder refuses; lists and lengths -------


def _refused_by_encoder(build) -> None:
    """``build()`` makes a tensor or a frame; either it or encoding it raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        t = build()
        encode(request(t))


def test_encode_refuses_a_compressed_bool_tensor_holding_a_2():
    payload = zstandard.ZstdCompressor().compress(b"\x01\x00\x02\x01")
    malformed(frame(request_body(dtype=int(DType.BOOL), shape=[4], compression=1,
                                 size=len(payload)), payloads=(payload,)), "bool")
    _refused_by_encoder(lambda: Tensor("b", DType.BOOL, (4,), payload, compressed=True))


@pytest.mark.parametrize("how", ["two frames", "junk after", "truncated"])
def test_encode_refuses_zstd_payloads_the_decoder_refuses(how):
    good = zstandard.ZstdCompressor().compress(np.arange(4, dtype="<f4").tobytes())
    payload = {"two frames": good + good, "junk after": good + b"junk",
               "truncated": good[:-3]}[how]
    malformed(_zstd_tensor_frame(payload, [4]))
    _refused_by_encoder(lambda: Tensor("x", DType.FLOAT32, (4,), payload, compressed=True))


def test_encode_refuses_a_frame_longer_than_max_message_bytes():
    # tensors of exactly the limit: the envelope and padding make the frame longer
    lim = Limits(max_message_bytes=1000, max_tensor_bytes=1000)
    msg = request(Tensor.from_array("x", np.zeros(1000, np.uint8)))
    too_large(encode(msg), "frame of", limits=lim)
    with pytest.raises(PayloadTooLarge, match="1000"):
        encode(msg, lim)


def _cloud_load_frame(n: int) -> bytes:
    return frame({"worker_id": "w", "timestamp_ms": 1, "tail_ms": [["d", 1, 1.0]] * n},
                 mtype=int(MessageType.CLOUD_LOAD))


def test_max_list_len_is_enforced_when_decoding():
    assert len(decode(_cloud_load_frame(4096)).tail_ms) == 4096
    too_large(_cloud_load_frame(4097), "tail_ms.*4097 entries.*4096")
    small = Limits(max_list_len=3)
    too_large(_cloud_load_frame(4), "tail_ms", limits=small)
    assert len(decode(_cloud_load_frame(3), small).tail_ms) == 3
    # the encoder agrees at the same limit
    with pytest.raises(InvalidArgument, match="list of over 3"):
        encode(CloudLoad("w", 1, tail_ms=(("d", 1, 1.0),) * 4), small)


@pytest.mark.parametrize(("head", "what"), [(b"\xdb", "str"), (b"\xc6", "bin")])
def test_a_truncated_length_over_the_limit_is_too_large_not_truncated(head, what):
    declared = (2**32 - 1).to_bytes(4, "big")
    data = b"\x93\x01\x03\x81\xa9device_id" + head + declared + b"abc"
    too_large(data, f"{what} of 4294967295 bytes")
    # ext types are never allowed in v1, whatever their length
    ext = b"\x93\x01\x03\x81\xa9device_id\xc9" + declared + b"\x05abc"
    assert "truncated" not in str(malformed(ext))
    # a short declared length that the frame does not hold is still "truncated"
    short = b"\x93\x01\x03\x81\xa9device_id" + b"\xd9\x20" + b"abc"
    malformed(short, "truncated")


_small_limits = st.builds(
    Limits, max_message_bytes=st.integers(0, 4096), max_header_bytes=st.integers(0, 512),
    max_tensors=st.integers(0, 4), max_tensor_bytes=st.integers(0, 512),
    max_rank=st.integers(0, 3), max_dim=st.integers(0, 6), max_string_len=st.integers(0, 32),
    max_list_len=st.integers(0, 4), max_fields=st.integers(0, 10),
)


@settings(max_examples=300, deadline=None)
@given(msg=messages, limits=_small_limits)
def test_whatever_encode_emits_decodes_under_the_same_limits(msg, limits):
    try:
        data = encode(msg, limits)
    except (InvalidArgument, PayloadTooLarge):
        return
    assert decode(data, limits) == msg


def test_v1_1_fields_round_trip_and_are_written_only_when_set():
    """queue_depth (responses), state and batch_size (cloud load) came after v1.0: a message
    that leaves them at their defaults encodes to exactly what a v1.0 writer wrote."""
    rid = bytes(range(16))
    plain = InferenceResponse(id=rid, worker_id="w")
    assert b"queue_depth" not in encode(plain)
    busy = InferenceResponse(id=rid, worker_id="w", queue_depth=7)
    assert decode(encode(busy)) == busy and b"queue_depth" in encode(busy)
    load = CloudLoad(worker_id="w", timestamp_ms=1, tail_ms=(("d" * 64, 2, 1.5),))
    assert b"state" not in encode(load) and b"batch_size" not in encode(load)
    offline = CloudLoad(worker_id="w", timestamp_ms=1, state="offline",
                        batch_size=(("d" * 64, 2, 3.25),))
    assert decode(encode(offline)) == offline
    assert decode(encode(load)).state == "online"
