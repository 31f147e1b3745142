"""Hypothesis strategies for protocol messages and a raw frame builder (shared by the codec,
chunking and fuzz tests)."""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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

NUMPY_OF = {
    DType.FLOAT32: np.float32,
    DType.FLOAT16: np.float16,
    DType.BFLOAT16: np.uint16,
    DType.INT8: np.int8,
    DType.UINT8: np.uint8,
    DType.INT32: np.int32,
    DType.INT64: np.int64,
    DType.BOOL: np.bool_,
}

ids = st.binary(min_size=16, max_size=16)
texts = st.text(max_size=24)
u32 = st.integers(0, 2**32 - 1)
u63 = st.integers(0, 2**63 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
durations = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def tensors(draw) -> Tensor:
    dtype = draw(st.sampled_from(list(DType)))
    encodings = [Encoding.RAW]
    if dtype is DType.FLOAT32:
        encodings += [Encoding.FP16, Encoding.INT8_AFFINE]
    encoding = draw(st.sampled_from(encodings))
    elements = None
    if encoding is Encoding.INT8_AFFINE:
        elements = st.floats(-1e6, 1e6, width=32)
    arr = draw(hnp.arrays(NUMPY_OF[dtype], shapes, elements=elements))
    extra = {"dtype": DType.BFLOAT16} if dtype is DType.BFLOAT16 else {}
    return Tensor.from_array(draw(texts), arr, encoding, compress=draw(st.booleans()), **extra)


tensor_tuples = st.lists(tensors(), max_size=3).map(tuple)
error_codes = st.one_of(st.sampled_from(list(Code)), st.integers(11, 2**32 - 1))

requests = st.builds(
    InferenceRequest, id=ids, device_id=texts, model_digest=texts, cut_id=u32, budget_ms=u63,
    tensors=tensor_tuples, priority=i64, reply_topic=texts, sent_at_ms=u63,
)
timings = st.builds(Timings, queue_ms=durations, compute_ms=durations)
ok_responses = st.builds(InferenceResponse, id=ids, outputs=tensor_tuples, error=st.none(),
                         timings=timings, worker_id=texts)
error_responses = st.builds(
    InferenceResponse, id=ids, outputs=st.just(()),
    error=st.builds(ErrorInfo, code=error_codes, message=texts, retryable=st.booleans()),
    timings=timings, worker_id=texts,
)
statuses = st.builds(
    DeviceStatus, device_id=texts, state=st.sampled_from(["online", "offline", "degraded"]),
    timestamp_ms=u63, bundle_digest=texts, uplink_bps=durations, rtt_ms=durations,
    queue_depth=u63, p50_ms=durations, p99_ms=durations, fallbacks=u63,
    plan_mix=st.lists(st.tuples(texts, u63), max_size=4).map(tuple),
)
loads = st.builds(
    CloudLoad, worker_id=texts, timestamp_ms=u63, queue_depth=u63, inflight=u63,
    queue_ms=durations,
    tail_ms=st.lists(st.tuples(texts, u32, durations), max_size=4).map(tuple),
)
assignments = st.builds(Assignment, device_id=texts, model_name=texts, bundle_digest=texts,
                        bundle_uri=texts, issued_at_ms=u63, model_version=texts,
                        archive_sha256=texts, archive_size=u63,
                        signature=st.binary(max_size=64),
                        mirror_uris=st.lists(texts, max_size=3).map(tuple))
messages = st.one_of(requests, ok_responses, error_responses, statuses, loads, assignments)


def frame(body: object, mtype: int = 1, version: int = 1, payloads: tuple = ()) -> bytes:
    """A frame built by hand: envelope, then each payload after zero padding to 8 bytes."""
    out = msgpack.packb([version, mtype, body], use_bin_type=True)
    for p in payloads:
        out += bytes(-len(out) % 8) + p
    return out


def request_body(**tensor_map) -> dict:
    """A valid request body with one tensor map (defaults: float32 [2], 8 bytes)."""
    t = {"name": "x", "dtype": 1, "shape": [2], "encoding": 0, "compression": 0, "size": 8}
    t.update(tensor_map)
    return {"id": bytes(16), "device_id": "d", "model_digest": "m", "cut_id": 0,
            "budget_ms": 10, "tensors": [t]}
