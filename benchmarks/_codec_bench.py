"""Codec round trip vs a numpy copy of the same bytes.

One round trip = ``encode(request)`` + ``decode(frame)`` + ``tensor.to_array()`` of an
InferenceRequest carrying one float32 RAW tensor (the message is built once, outside the timed
region). The baseline is ``arr.copy()`` of the same array: the least a sender must do is put the
bytes into a new buffer once. Both are timed interleaved (A B A B ...) after a warm-up.

    python -m benchmarks._codec_bench [--quick]
"""

from __future__ import annotations

import numpy as np

from benchmarks._common import Result, interleaved, parser, print_table, stats
from tandem.protocol.codec import decode, encode
from tandem.protocol.messages import InferenceRequest
from tandem.protocol.tensors import Tensor

__all__ = ["run"]

# (label, bytes, repetitions quick, repetitions full, target ratio or None)
_SIZES = [
    ("1KiB", 1 << 10, 200, 2000, None),  # fixed per-message costs dominate: reported, no target
    ("1MiB", 1 << 20, 40, 300, 3.0),
    ("16MiB", 16 << 20, 15, 40, 3.0),
]


def _round_trip(msg: InferenceRequest):
    def fn():
        return decode(encode(msg)).tensors[0].to_array()

    return fn


def run(quick: bool = False) -> list[Result]:
    """Measure every size; returns, per size, the round-trip result (ratio to the copy) and the
    baseline's own figure. Times in ms."""
    results: list[Result] = []
    rng = np.random.default_rng(0)
    for label, nbytes, reps_quick, reps_full, target in _SIZES:
        reps = reps_quick if quick else reps_full
        arr = rng.random(nbytes // 4, dtype=np.float32)
        msg = InferenceRequest(bytes(16), "bench-device", "0" * 64, 1, 1000,
                               (Tensor.from_array("x", arr),))
        rt = _round_trip(msg)
        back = rt()
        assert np.array_equal(back, arr)  # measure the right thing
        samples = interleaved({"codec": rt, "copy": arr.copy}, repeats=reps,
                              warmup=3 if nbytes >= 16 << 20 else 10)
        codec, copy = stats(samples["codec"]), stats(samples["copy"])
        base_name = f"numpy_copy_{label}"
        r = Result(
            metric=f"codec_roundtrip_{label}",
            value=codec.median * 1e3,
            unit="ms",
            baseline=base_name,
            baseline_value=copy.median * 1e3,
            target=None if target is None else f"ratio <= {target}",
            p99=codec.p99 * 1e3,
            min=codec.min * 1e3,
            max=codec.max * 1e3,
            n=codec.n,
            notes=f"encode+decode+to_array of one float32 tensor of {nbytes} bytes",
        )
        if target is not None:
            r.met = r.ratio is not None and r.ratio <= target
        results.append(r)
        results.append(Result(
            metric=base_name, value=copy.median * 1e3, unit="ms", p99=copy.p99 * 1e3,
            min=copy.min * 1e3, max=copy.max * 1e3, n=copy.n, notes="arr.copy()",
        ))
    return results


if __name__ == "__main__":
    args = parser(__doc__ or "codec").parse_args()
    print_table("codec: encode+decode vs numpy copy", run(quick=args.quick))
