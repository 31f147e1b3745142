"""Write the golden vectors of protocol/SPEC.md §9. Run by hand, never by the tests:

    .venv/bin/python tests/protocol/golden/make_golden.py [--force]

Golden vectors are never regenerated to match changed code (SPEC.md §7): without --force this
only writes files that do not exist yet. New vectors get new files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tandem.protocol.chunking import split
from tandem.protocol.codec import encode
from tandem.protocol.errors import Code
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

HERE = Path(__file__).resolve().parent
ID = bytes(range(16))
DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def vectors() -> dict[str, bytes]:
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    out: dict[str, bytes] = {}
    out["request_f32"] = encode(InferenceRequest(
        id=ID, device_id="cam-01", model_digest=DIGEST, cut_id=3, budget_ms=250,
        tensors=(Tensor.from_array("frontier.0", f32),), priority=2,
        reply_topic="tandem/v1/resp/cam-01", sent_at_ms=1_700_000_000_123,
    ))
    out["request_all_dtypes"] = encode(InferenceRequest(
        id=ID, device_id="cam-01", model_digest=DIGEST, cut_id=0, budget_ms=100, tensors=(
            Tensor.from_array("f32", np.array([1.5, -2.0], np.float32)),
            Tensor.from_array("f16", np.array([0.5, -1.0, 65504.0], np.float16)),
            Tensor.from_array("bf16", np.array([0x3F80, 0xC000], np.uint16),
                              dtype=DType.BFLOAT16),
            Tensor.from_array("i8", np.array([-128, 0, 127], np.int8)),
            Tensor.from_array("u8", np.array([[0, 255], [7, 8]], np.uint8)),
            Tensor.from_array("i32", np.array([-(2**31), 2**31 - 1], np.int32)),
            Tensor.from_array("i64", np.array([-(2**63), 2**63 - 1, 1], np.int64)),
            Tensor.from_array("b", np.array([True, False, True], np.bool_)),
        ),
    ))
    out["request_fp16"] = encode(InferenceRequest(
        ID, "cam-01", DIGEST, 1, 100,
        (Tensor.from_array("x", np.array([0.1, 1.0, -3.25, 1e5], np.float32), Encoding.FP16),),
    ))
    out["request_int8"] = encode(InferenceRequest(
        ID, "cam-01", DIGEST, 1, 100,
        (Tensor.from_array("x", np.array([-1.0, 0.0, 0.5, 2.0, 3.0], np.float32),
                           Encoding.INT8_AFFINE),),
    ))
    out["request_zstd"] = encode(InferenceRequest(
        ID, "cam-01", DIGEST, 1, 100, (
            Tensor.from_array("z", np.repeat(np.arange(8, dtype=np.float32), 8), compress=True),
            Tensor.from_array("q", np.linspace(-1, 1, 16, dtype=np.float32),
                              Encoding.INT8_AFFINE, compress=True),
        ),
    ))
    out["request_scalar_empty"] = encode(InferenceRequest(
        ID, "cam-01", DIGEST, 1, 100, (
            Tensor.from_array("s", np.array(7, np.int64)),
            Tensor.from_array("e", np.zeros((0, 3), np.float32)),
        ),
    ))
    # a newer v1 writer: unknown keys everywhere, optional fields left out
    body = {
        "id": ID, "device_id": "cam-01", "model_digest": DIGEST, "cut_id": 1, "budget_ms": 100,
        "trace_id": "abc", "tensors": [{"name": "x", "dtype": 6, "shape": [2], "size": 8,
                                        "layout": "nchw"}],
        "hints": {"a": [1, 2]},
    }
    head = msgpack.packb([1, 1, body], use_bin_type=True)
    head += bytes(-len(head) % 8)
    out["request_future_keys"] = head + np.array([5, -6], "<i4").tobytes()
    out["response_ok"] = encode(InferenceResponse(
        ID, outputs=(Tensor.from_array("logits", np.array([[0.25, 0.75]], np.float32)),),
        timings=Timings(queue_ms=1.5, compute_ms=3.25), worker_id="worker-a",
    ))
    out["response_error"] = encode(InferenceResponse(
        ID, error=ErrorInfo(Code.UNAVAILABLE, "no engine for cut 3", True),
        timings=Timings(queue_ms=0.5), worker_id="worker-a",
    ))
    out["response_unknown_code"] = encode(InferenceResponse(
        ID, error=ErrorInfo(42, "from the future", False),
    ))
    out["device_status"] = encode(DeviceStatus(
        "cam-01", "online", 1_700_000_000_000, bundle_digest=DIGEST, uplink_bps=12.5e6,
        rtt_ms=23.5, queue_depth=4,
    ))
    out["cloud_load"] = encode(CloudLoad(
        "worker-a", 1_700_000_000_000, queue_depth=3, inflight=2, queue_ms=7.5,
        tail_ms=((DIGEST, 3, 4.5), (DIGEST, 5, 2.0)),
    ))
    out["assignment"] = encode(Assignment(
        "cam-01", "resnet50", DIGEST, bundle_uri="https://bundles.example/resnet50.tar",
        issued_at_ms=1_700_000_000_000,
    ))
    # the fields added with the fleet tools (device_status.bin and assignment.bin predate them)
    out["device_status_fleet"] = encode(DeviceStatus(
        "cam-01", "degraded", 1_700_000_000_000, bundle_digest=DIGEST, uplink_bps=12.5e6,
        rtt_ms=23.5, queue_depth=4, p50_ms=18.25, p99_ms=61.5, fallbacks=7,
        plan_mix=(("local", 120), ("cut 3", 41), ("cloud", 2)),
    ))
    out["assignment_fleet"] = encode(Assignment(
        "cam-01", "resnet50", DIGEST, bundle_uri="https://bundles.example/resnet50.tar.zst",
        issued_at_ms=1_700_000_000_000, model_version="2.1", archive_sha256=DIGEST[::-1],
        archive_size=123_456_789, signature=bytes(range(64)),
        mirror_uris=("https://mirror-a.example/r.tar.zst", "http://10.0.0.2:8080/r.tar.zst"),
    ))
    for i, part in enumerate(split(out["request_f32"], 128, b"\xff" * 16)):
        out[f"chunk_{i}"] = part
    out["version_2"] = msgpack.packb([2, 1, {"anything": True}], use_bin_type=True)
    return out


def main() -> None:
    force = "--force" in sys.argv
    for name, data in vectors().items():
        path = HERE / f"{name}.bin"
        if path.exists() and not force:
            if path.read_bytes() != data:
                print(f"differs (kept): {path.name}")
            continue
        path.write_bytes(data)
        print(f"wrote {path.name} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
