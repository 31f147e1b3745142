"""Fuzz the decoders: random bytes, mutated valid frames (bit flips, truncation, splices,
byte insertions), and random msgpack objects. Only ProtocolError subclasses may come out."""

from __future__ import annotations

import random
import time

import msgpack
import numpy as np
import pytest

from tandem.protocol.chunking import Reassembler, split
from tandem.protocol.codec import Limits, decode, encode
from tandem.protocol.errors import Code, ProtocolError
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
from tests._support.strategies import frame, request_body

RID = bytes(range(16))
SEED = 20240611


def seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    tensors = (
        Tensor.from_array("raw", x),
        Tensor.from_array("fp16", x, Encoding.FP16),
        Tensor.from_array("int8", x, Encoding.INT8_AFFINE, compress=True),
        Tensor.from_array("zstd", np.arange(40, dtype=np.int64), compress=True),
        Tensor.from_array("bool", np.array([True, False, True])),
        Tensor.from_array("bf16", np.array([1, 2], np.uint16), dtype=DType.BFLOAT16),
        Tensor.from_array("scalar", np.array(3, np.int32)),
    )
    msgs = [
        InferenceRequest(RID, "cam-01", "d" * 64, 3, 250, tensors, priority=-4,
                         reply_topic="tandem/v1/resp/cam-01", sent_at_ms=123),
        InferenceResponse(RID, outputs=tensors[:2], timings=Timings(1.0, 2.0), worker_id="w"),
        InferenceResponse(RID, error=ErrorInfo(Code.UNAVAILABLE, "busy", True)),
        DeviceStatus("cam-01", "online", 5, "b", 1e6, 20.0, 3),
        CloudLoad("w", 5, 1, 2, 3.0, (("d", 1, 2.0),)),
        Assignment("cam-01", "m", "b", "uri", 9),
    ]
    return [encode(m) for m in msgs]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    op = rng.randrange(7)
    if op == 0 and b:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncation
        del b[rng.randrange(len(b) + 1):]
    elif op == 2:  # splice two valid frames
        other = rng.choice(pool)
        b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]
    elif op == 3 and b:  # random byte overwrite, biased to msgpack type markers
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice([0xC0, 0xC1, 0xC4, 0xCF, 0xD9, 0xDC, 0xDE,
                                                   0xFF, 0x00, 0x7F, 0x90, 0x80,
                                                   rng.randrange(256)])
    elif op == 4:  # insertion
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 5 and len(b) > 2:  # deletion
        i = rng.randrange(len(b) - 1)
        del b[i : i + rng.randint(1, 8)]
    else:  # overwrite a big-endian length or int field with extremes
        if len(b) > 8:
            i = rng.randrange(len(b) - 8)
            b[i : i + rng.choice([1, 2, 4, 8])] = rng.choice(
                [b"\xff" * 8, b"\x7f" + b"\xff" * 7, b"\x00" * 8, b"\x80" + b"\x00" * 7]
            )[: rng.choice([1, 2, 4, 8])]
    return bytes(b)


def random_object(rng: random.Random, depth: int = 0):
    kinds = ["int", "bigint", "neg", "float", "nan", "str", "bin", "bool", "none"]
    if depth < 4:
        kinds += ["list", "map", "list", "map"]
    k = rng.choice(kinds)
    if k == "int":
        return rng.randint(0, 300)
    if k == "bigint":
        return rng.choice([2**63 - 1, 2**64 - 1, 2**32, 2**31])
    if k == "neg":
        return rng.randint(-(2**63), -1)
    if k == "float":
        return rng.uniform(-1e9, 1e9)
    if k == "nan":
        return rng.choice([float("nan"), float("inf"), -0.0])
    if k == "str":
        return rng.choice(["id", "tensors", "shape", "dtype", "size", "name", "x", ""])
    if k == "bin":
        return rng.randbytes(rng.choice([0, 15, 16, 17]))
    if k == "bool":
        return rng.random() < 0.5
    if k == "none":
        return None
    if k == "list":
        return [random_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["id", "device_id", "model_digest", "cut_id", "budget_ms", "tensors", "outputs",
            "error", "timings", "name", "dtype", "shape", "encoding", "compression", "size",
            "scale", "zero_point", "state", "timestamp_ms", "tail_ms", "code", "message"]
    return {rng.choice(keys): random_object(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def random_envelope(rng: random.Random) -> bytes:
    """A structurally plausible frame with random field values (reaches the schema checks)."""
    mtype = rng.choice([1, 1, 1, 2, 3, 4, 5, 6, 7])
    if mtype == 1 and rng.random() < 0.7:
        t = {k: random_object(rng) if rng.random() < 0.3 else v
             for k, v in request_body()["tensors"][0].items()}
        body = request_body()
        body["tensors"] = [t]
        for k in list(body):
            if rng.random() < 0.15:
                body[k] = random_object(rng)
    else:
        body = random_object(rng)
    if rng.random() < 0.5:
        payloads: tuple = (rng.randbytes(8),)
    else:
        payloads = tuple(rng.randbytes(rng.choice([0, 2, 8, 12])) for _ in range(rng.randint(0, 2)))
    return frame(body, mtype=mtype, version=rng.choice([1, 1, 1, 1, 2]), payloads=payloads)


def check(data: bytes, limits: Limits, counts: dict) -> None:
    try:
        decode(data, limits)
        counts["ok"] += 1
    except ProtocolError as exc:
        assert isinstance(exc.code, Code)
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1


SMALL = Limits(max_message_bytes=1 << 16, max_header_bytes=1 << 14, max_tensor_bytes=1 << 14,
               max_string_len=256, max_list_len=64, max_tensors=16)


@pytest.mark.parametrize("limits", [Limits(), SMALL], ids=["default", "small"])
def test_decode_never_raises_anything_but_protocol_errors(limits):
    rng = random.Random(SEED)
    pool = seeds()
    for s in pool:
        decode(s, limits)
    counts = {"ok": 0}
    n = 0
    start = time.monotonic()
    for _ in range(1500):  # random bytes
        check(rng.randbytes(rng.randint(0, 300)), limits, counts)
        n += 1
    for _ in range(1500):  # random bytes behind a valid-looking prefix
        check(rng.choice([b"\x93\x01\x01", b"\x93\x01\x02", b"\x93\x01"]) +
              rng.randbytes(rng.randint(0, 200)), limits, counts)
        n += 1
    for _ in range(5000):  # mutations of valid frames, sometimes stacked
        data = rng.choice(pool)
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = mutate(rng, data, pool)
        check(data, limits, counts)
        n += 1
    for _ in range(1500):  # random msgpack objects
        check(msgpack.packb(random_object(rng), use_bin_type=True), limits, counts)
        n += 1
    for _ in range(1500):  # random field values in a plausible envelope
        check(random_envelope(rng), limits, counts)
        n += 1
    assert n >= 11_000
    # the fuzzer reaches deep: some mutations still decode, and every error kind shows up
    assert counts["ok"] > 0
    assert counts.get("MalformedMessage", 0) > n // 2
    assert counts.get("UnsupportedVersion", 0) > 0
    assert time.monotonic() - start < 30


def test_reassembler_never_raises_anything_but_protocol_errors():
    rng = random.Random(SEED + 1)
    pool = seeds()
    chunks = [c for s in pool for c in split(s * 3, 200, rng.randbytes(16))]
    r = Reassembler(max_total_bytes=1 << 20)
    for _ in range(3000):
        data = mutate(rng, rng.choice(chunks), chunks)
        try:
            out = r.feed(data)
        except ProtocolError:
            continue
        if out is not None and out is not data:
            assert isinstance(out, bytes)
        assert r.pending_bytes <= 1 << 20
