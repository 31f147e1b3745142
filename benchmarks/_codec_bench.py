"""Codec round trip, through the path a request takes, vs a numpy copy of the same bytes.

One round trip = ``codec.encode_parts(request)`` + the MQTT PUBLISH frame those parts are copied
into (what ``MqttTransport`` sends: one copy of the tensor bytes; built by the transport's
private ``_build_frame``, the function its client calls) + ``codec.decode`` of the
frame's payload + ``tensor.to_array()`` (a view of the frame). The baseline is ``arr.copy()``
of the same array: the least a sender must do is put the bytes into a new buffer once. Both are
timed interleaved (A B A B ...) after a warm-up, in this process only (the orchestrator runs it
in a fresh one):

* ``hot``: the same array every time (its bytes stay in the CPU caches);
The frame comes from a buffer pool as in ``MqttClient.frame`` (a client reuses its big packet
buffers once nothing references them), so steady same-size traffic does not pay page faults
for a fresh buffer per message (what glibc costs for that is in docs/deployment.md).

* ``cold``: cycling through 64 MiB of different arrays (64 at 1 MiB, more than the last-level
  cache), for the codec and the copy alike, the copy half a cycle behind the codec (never the
  array the codec has just read).

    python -m benchmarks._codec_bench [--quick]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from benchmarks._common import Result, interleaved, parser, print_table, stats
from tandem.protocol.codec import decode, encode_parts
from tandem.protocol.messages import InferenceRequest
from tandem.protocol.mqtt._wire import _BufferPool, _build_frame
from tandem.protocol.tensors import Tensor
from tandem.protocol.transport import PublishProperties

__all__ = ["run"]

# (label, bytes, repetitions quick, repetitions full, target ratio or None)
_SIZES = [
    ("1KiB", 1 << 10, 200, 2000, None),  # fixed per-message costs dominate: reported, no target
    ("1MiB", 1 << 20, 40, 300, 3.0),
    ("16MiB", 16 << 20, 15, 40, 3.0),
]
COLD_BYTES = 64 << 20
TOPIC = "tandem/v1/req/bench/m"


def _round_trip(msgs: list[InferenceRequest]):
    props = PublishProperties(response_topic="tandem/v1/resp/bench", correlation_data=bytes(16),
                              message_expiry_s=10)
    pool = _BufferPool()  # each MQTT client keeps one for its outgoing frames
    i = [0]

    def fn():
        msg = msgs[i[0] % len(msgs)]
        i[0] += 1
        parts, total = encode_parts(msg)
        frame = _build_frame(TOPIC, parts, total, 1, props, True, pool)
        return decode(frame.payload()).tensors[0].to_array()

    return fn


def _copy(arrays: list[np.ndarray]):
    # half a cycle away from the codec's array: interleaved, the copy must not read the array
    # the codec has just brought into the cache
    i = [len(arrays) // 2]

    def fn():
        a = arrays[i[0] % len(arrays)]
        i[0] += 1
        return a.copy()

    return fn


def run(quick: bool = False) -> list[Result]:
    """Measure every size, hot and cold; per size and mode the round-trip result (ratio to the
    copy) and the copy's own figure. Times in ms."""
    results: list[Result] = []
    rng = np.random.default_rng(0)
    for label, nbytes, reps_quick, reps_full, target in _SIZES:
        reps = reps_quick if quick else reps_full
        count = max(2, COLD_BYTES // nbytes)
        arrays = [rng.random(nbytes // 4, dtype=np.float32) for _ in range(count)]
        msgs = [InferenceRequest(bytes(16), "bench", "0" * 64, 1, 1000,
                                 (Tensor.from_array("x", a),)) for a in arrays]
        for mode in ("hot", "cold"):
            use_msgs, use_arrays = (msgs[:1], arrays[:1]) if mode == "hot" else (msgs, arrays)
            rt = _round_trip(use_msgs)
            assert np.array_equal(rt(), use_arrays[0])  # measure the right thing
            samples = interleaved({"codec": rt, "copy": _copy(use_arrays)}, repeats=reps,
                                  warmup=3 if nbytes >= 16 << 20 else 10)
            codec, copy = stats(samples["codec"]), stats(samples["copy"])
            base_name = f"numpy_copy_{label}" + ("_cold" if mode == "cold" else "")
            r = Result(
                metric=f"codec_roundtrip_{label}" + ("_cold" if mode == "cold" else ""),
                value=codec.median * 1e3, unit="ms", baseline=base_name,
                baseline_value=copy.median * 1e3,
                target=None if target is None else f"ratio <= {target}",
                p99=codec.p99 * 1e3, min=codec.min * 1e3, max=codec.max * 1e3, n=codec.n,
                notes=(f"encode_parts + PUBLISH frame + decode + to_array of one float32 "
                       f"tensor of {nbytes} bytes, {mode} "
                       f"({'one array' if mode == 'hot' else f'cycling {count} arrays'})"),
            )
            if target is not None:
                r.met = r.ratio is not None and r.ratio <= target
            results.append(r)
            results.append(Result(
                metric=base_name, value=copy.median * 1e3, unit="ms", p99=copy.p99 * 1e3,
                min=copy.min * 1e3, max=copy.max * 1e3, n=copy.n,
                notes=f"arr.copy(), {mode}",
            ))
        del arrays, msgs
    return results


if __name__ == "__main__":
    p = parser(__doc__ or "codec")
    p.add_argument("--emit", action="store_true", help="print the results as JSON lines only")
    args = p.parse_args()
    out = run(quick=args.quick)
    if args.emit:
        for r in out:
            print(json.dumps(r.to_json()))
        sys.exit(0)
    print_table("codec: encode+decode vs numpy copy", out)
