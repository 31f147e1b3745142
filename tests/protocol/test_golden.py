"""Golden vectors (protocol/SPEC.md §9): stored bytes must keep decoding to these exact values,
and encoding the same messages must reproduce the stored bytes. The expected messages here are
written out independently of golden/make_golden.py on purpose."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from tandem.protocol.chunking import Reassembler, split
from tandem.protocol.codec import decode, encode
from tandem.protocol.errors import Code, MalformedMessage, UnsupportedVersion
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

GOLDEN = Path(__file__).resolve().parent / "golden"
SPEC = Path(__file__).resolve().parents[2] / "protocol" / "SPEC.md"
ID = bytes(range(16))
DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def load(name: str) -> bytes:
    return (GOLDEN / f"{name}.bin").read_bytes()


def check_tensor(t: Tensor, name: str, dtype: DType, shape: tuple, encoding: Encoding,
                 compressed: bool, values: np.ndarray) -> None:
    assert t.name == name
    assert t.dtype is dtype
    assert t.shape == shape
    assert t.encoding is encoding
    assert t.compressed is compressed
    arr = t.to_array()
    assert arr.shape == shape
    np.testing.assert_array_equal(arr, values)


def test_every_golden_file_is_listed_in_the_spec_and_tested():
    files = {p.stem for p in GOLDEN.glob("*.bin")}
    spec = SPEC.read_text()
    tested = {
        "request_f32", "request_all_dtypes", "request_fp16", "request_int8", "request_zstd",
        "request_scalar_empty", "request_future_keys", "response_ok", "response_error",
        "response_unknown_code", "device_status", "cloud_load", "assignment", "version_2",
        "device_status_fleet", "assignment_fleet",
        *(f"chunk_{i}" for i in range(5)),
    }
    assert files == tested
    for name in files - {f"chunk_{i}" for i in range(5)}:
        assert f"`{name}.bin`" in spec
    assert re.search(r"`chunk_0\.bin` … `chunk_4\.bin`", spec)


def test_request_f32():
    data = load("request_f32")
    assert data[:3] == b"\x93\x01\x01"
    msg = decode(data)
    assert type(msg) is InferenceRequest
    assert msg.id == ID
    assert msg.device_id == "cam-01"
    assert msg.model_digest == DIGEST
    assert msg.cut_id == 3
    assert msg.budget_ms == 250
    assert msg.priority == 2
    assert msg.reply_topic == "tandem/v1/resp/cam-01"
    assert msg.sent_at_ms == 1_700_000_000_123
    assert msg.version == 1
    (t,) = msg.tensors
    expected = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    check_tensor(t, "frontier.0", DType.FLOAT32, (2, 3), Encoding.RAW, False, expected)
    # the payload is the last 24 bytes, 8-byte aligned, little-endian
    assert len(data) % 8 == 0 and data[-24:] == expected.astype("<f4").tobytes()
    assert encode(msg) == data
    built = InferenceRequest(
        id=ID, device_id="cam-01", model_digest=DIGEST, cut_id=3, budget_ms=250,
        tensors=(Tensor.from_array("frontier.0", expected),), priority=2,
        reply_topic="tandem/v1/resp/cam-01", sent_at_ms=1_700_000_000_123,
    )
    assert encode(built) == data
    assert msg == built


ALL_DTYPES = [
    ("f32", DType.FLOAT32, np.array([1.5, -2.0], np.float32)),
    ("f16", DType.FLOAT16, np.array([0.5, -1.0, 65504.0], np.float16)),
    ("bf16", DType.BFLOAT16, np.array([0x3F80, 0xC000], np.uint16)),
    ("i8", DType.INT8, np.array([-128, 0, 127], np.int8)),
    ("u8", DType.UINT8, np.array([[0, 255], [7, 8]], np.uint8)),
    ("i32", DType.INT32, np.array([-(2**31), 2**31 - 1], np.int32)),
    ("i64", DType.INT64, np.array([-(2**63), 2**63 - 1, 1], np.int64)),
    ("b", DType.BOOL, np.array([True, False, True], np.bool_)),
]


def test_request_all_dtypes():
    data = load("request_all_dtypes")
    msg = decode(data)
    assert (msg.cut_id, msg.budget_ms, msg.priority, msg.reply_topic, msg.sent_at_ms) == (
        0, 100, 0, "", 0)
    assert len(msg.tensors) == len(ALL_DTYPES)
    for t, (name, dtype, values) in zip(msg.tensors, ALL_DTYPES, strict=True):
        check_tensor(t, name, dtype, values.shape, Encoding.RAW, False, values)
        assert t.to_array().dtype == values.dtype
    tensors = tuple(
        Tensor.from_array(n, v, dtype=DType.BFLOAT16 if d is DType.BFLOAT16 else None)
        for n, d, v in ALL_DTYPES
    )
    built = InferenceRequest(ID, "cam-01", DIGEST, 0, 100, tensors)
    assert encode(msg) == data
    assert encode(built) == data


def test_request_fp16():
    data = load("request_fp16")
    (t,) = decode(data).tensors
    src = np.array([0.1, 1.0, -3.25, 1e5], np.float32)
    fp16 = np.array([0.1, 1.0, -3.25, np.inf], np.float16)
    check_tensor(t, "x", DType.FLOAT32, (4,), Encoding.FP16, False, fp16.astype(np.float32))
    assert t.to_array()[3] == np.inf  # 1e5 overflows float16
    assert t.to_array().dtype == np.float32
    assert bytes(t.data) == fp16.astype("<f2").tobytes()
    assert encode(decode(data)) == data
    built = InferenceRequest(ID, "cam-01", DIGEST, 1, 100,
                             (Tensor.from_array("x", src, Encoding.FP16),))
    assert encode(built) == data


def test_request_int8():
    data = load("request_int8")
    (t,) = decode(data).tensors
    # lo=-1, hi=3: scale=float32(4/255), zero_point=round(-128 + 1/scale)=round(-64.25)=-64
    scale = float(np.float32(4.0 / 255.0))
    assert t.scale == scale
    assert t.zero_point == -64
    q = np.array([-128, -64, -32, 63, 127], np.int8)  # 2/scale = 127.4999.. in float32
    assert bytes(t.data) == q.tobytes()
    expected = (q.astype(np.float32) + np.float32(64)) * np.float32(scale)
    check_tensor(t, "x", DType.FLOAT32, (5,), Encoding.INT8_AFFINE, False, expected)
    src = np.array([-1.0, 0.0, 0.5, 2.0, 3.0], np.float32)
    assert np.abs(t.to_array() - src).max() <= scale / 2 + 1e-6
    assert encode(decode(data)) == data
    built = InferenceRequest(ID, "cam-01", DIGEST, 1, 100,
                             (Tensor.from_array("x", src, Encoding.INT8_AFFINE),))
    assert encode(built) == data


def test_request_zstd():
    data = load("request_zstd")
    z, q = decode(data).tensors
    check_tensor(z, "z", DType.FLOAT32, (64,), Encoding.RAW, True,
                 np.repeat(np.arange(8, dtype=np.float32), 8))
    assert len(z.data) < 64 * 4
    src = np.linspace(-1, 1, 16, dtype=np.float32)
    assert q.name == "q" and q.compressed and q.encoding is Encoding.INT8_AFFINE
    assert np.abs(q.to_array() - src).max() <= q.scale / 2 + 1e-6
    # compressed bytes depend on the zstd library version: re-encode what was decoded
    assert encode(decode(data)) == data


def test_request_scalar_empty():
    data = load("request_scalar_empty")
    s, e = decode(data).tensors
    check_tensor(s, "s", DType.INT64, (), Encoding.RAW, False, np.array(7, np.int64))
    check_tensor(e, "e", DType.FLOAT32, (0, 3), Encoding.RAW, False, np.zeros((0, 3)))
    built = InferenceRequest(ID, "cam-01", DIGEST, 1, 100, (
        Tensor.from_array("s", np.array(7, np.int64)),
        Tensor.from_array("e", np.zeros((0, 3), np.float32)),
    ))
    assert encode(built) == data


def test_request_future_keys_are_ignored_and_defaults_filled():
    data = load("request_future_keys")
    msg = decode(data)
    assert msg.id == ID and msg.device_id == "cam-01" and msg.model_digest == DIGEST
    assert (msg.cut_id, msg.budget_ms) == (1, 100)
    assert (msg.priority, msg.reply_topic, msg.sent_at_ms) == (0, "", 0)
    (t,) = msg.tensors
    check_tensor(t, "x", DType.INT32, (2,), Encoding.RAW, False, np.array([5, -6]))
    # re-encoding writes today's canonical form (unknown keys are not kept)
    canonical = encode(InferenceRequest(ID, "cam-01", DIGEST, 1, 100,
                                        (Tensor.from_array("x", np.array([5, -6], np.int32)),)))
    assert encode(msg) == canonical != data


def test_response_ok():
    data = load("response_ok")
    msg = decode(data)
    assert type(msg) is InferenceResponse
    assert msg.id == ID and msg.ok and msg.error is None
    assert msg.timings == Timings(queue_ms=1.5, compute_ms=3.25)
    assert msg.worker_id == "worker-a"
    (t,) = msg.outputs
    check_tensor(t, "logits", DType.FLOAT32, (1, 2), Encoding.RAW, False,
                 np.array([[0.25, 0.75]], np.float32))
    built = InferenceResponse(
        ID, outputs=(Tensor.from_array("logits", np.array([[0.25, 0.75]], np.float32)),),
        timings=Timings(1.5, 3.25), worker_id="worker-a",
    )
    assert encode(msg) == data
    assert encode(built) == data


def test_response_error():
    data = load("response_error")
    msg = decode(data)
    assert not msg.ok and msg.outputs == ()
    assert msg.error == ErrorInfo(Code.UNAVAILABLE, "no engine for cut 3", True)
    assert msg.error.code is Code.UNAVAILABLE
    assert msg.timings == Timings(queue_ms=0.5, compute_ms=0.0)
    built = InferenceResponse(ID, error=ErrorInfo(Code.UNAVAILABLE, "no engine for cut 3", True),
                              timings=Timings(queue_ms=0.5), worker_id="worker-a")
    assert encode(built) == data


def test_response_unknown_error_code_is_kept_as_int():
    data = load("response_unknown_code")
    msg = decode(data)
    assert msg.error.code == 42 and not isinstance(msg.error.code, Code)
    assert msg.error.message == "from the future" and msg.error.retryable is False
    assert encode(InferenceResponse(ID, error=ErrorInfo(42, "from the future"))) == data


def test_device_status():
    # written before the request statistics were added: they decode as their defaults
    data = load("device_status")
    msg = decode(data)
    assert msg == DeviceStatus("cam-01", "online", 1_700_000_000_000, bundle_digest=DIGEST,
                               uplink_bps=12.5e6, rtt_ms=23.5, queue_depth=4)
    assert (msg.p50_ms, msg.p99_ms, msg.fallbacks, msg.plan_mix) == (0.0, 0.0, 0, ())
    assert decode(encode(msg)) == msg


def test_device_status_with_request_statistics():
    data = load("device_status_fleet")
    msg = decode(data)
    assert msg == DeviceStatus("cam-01", "degraded", 1_700_000_000_000, bundle_digest=DIGEST,
                               uplink_bps=12.5e6, rtt_ms=23.5, queue_depth=4, p50_ms=18.25,
                               p99_ms=61.5, fallbacks=7,
                               plan_mix=(("local", 120), ("cut 3", 41), ("cloud", 2)))
    assert encode(msg) == data
    assert (msg.refused_digest, msg.refused_reason) == ("", "")  # v1.1: absent, not written


def test_device_status_with_a_refusal():
    # v1.1 fields: written only when set (so the vectors above keep their bytes), decoded back
    old = load("device_status_fleet")
    msg = dataclasses.replace(decode(old), refused_digest="ef" * 32,
                              refused_reason="signature does not verify")
    data = encode(msg)
    assert decode(data) == msg
    assert len(data) > len(old) and b"refused_reason" in data and b"refused_" not in old


def test_cloud_load():
    data = load("cloud_load")
    msg = decode(data)
    assert msg == CloudLoad("worker-a", 1_700_000_000_000, queue_depth=3, inflight=2,
                            queue_ms=7.5, tail_ms=((DIGEST, 3, 4.5), (DIGEST, 5, 2.0)))
    assert encode(msg) == data


def test_assignment():
    # written before the archive and signature fields were added: they decode as defaults
    data = load("assignment")
    msg = decode(data)
    assert msg == Assignment("cam-01", "resnet50", DIGEST,
                             bundle_uri="https://bundles.example/resnet50.tar",
                             issued_at_ms=1_700_000_000_000)
    assert (msg.model_version, msg.archive_sha256, msg.archive_size, msg.signature,
            msg.mirror_uris) == ("", "", 0, b"", ())
    assert decode(encode(msg)) == msg


def test_assignment_with_archive_and_signature():
    data = load("assignment_fleet")
    msg = decode(data)
    assert msg == Assignment(
        "cam-01", "resnet50", DIGEST, bundle_uri="https://bundles.example/resnet50.tar.zst",
        issued_at_ms=1_700_000_000_000, model_version="2.1", archive_sha256=DIGEST[::-1],
        archive_size=123_456_789, signature=bytes(range(64)),
        mirror_uris=("https://mirror-a.example/r.tar.zst", "http://10.0.0.2:8080/r.tar.zst"))
    assert encode(msg) == data


def test_chunks_reassemble_to_the_request_and_split_reproduces_them():
    whole = load("request_f32")
    chunks = [load(f"chunk_{i}") for i in range(5)]
    assert all(c[:3] == b"\x93\x01\x06" and len(c) <= 128 for c in chunks)
    assert split(whole, 128, b"\xff" * 16) == chunks
    r = Reassembler()
    results = [r.feed(c) for c in reversed(chunks)]
    assert results[:-1] == [None] * 4
    assert results[-1] == whole
    with pytest.raises(MalformedMessage, match="chunk"):
        decode(chunks[0])


def test_version_2_is_unsupported():
    with pytest.raises(UnsupportedVersion) as info:
        decode(load("version_2"))
    assert info.value.code is Code.UNSUPPORTED_VERSION
