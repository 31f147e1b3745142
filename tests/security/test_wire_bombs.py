"""Codec bombs replayed at the codec level, each in a fresh process whose peak RSS (and bytes
written) are measured around the attack: small frames that declare or decompress to huge sizes
must be refused before anything of that size is allocated.

:func:`measure` is shared with the bundle attack tests (``test_bundle_*.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import msgpack
import numpy as np
import pytest
import zstandard

from tandem.protocol.codec import Limits, encode
from tandem.protocol.messages import InferenceRequest
from tandem.protocol.tensors import Tensor

MiB = 1 << 20

_HARNESS = """
import json, sys, traceback

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def _wchar():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])

{setup}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak-RSS high-water mark here
_rss0, _w0 = _status("VmRSS"), _wchar()
_error = None
try:
{attack}
except BaseException as exc:  # reported, not raised: the parent asserts on it
    _error = [type(exc).__name__, str(exc)[:400]]
_peak, _w1 = _status("VmHWM"), _wchar()
sys.stdout.flush()
print("\\n" + json.dumps({{"error": _error, "peak_growth": _peak - _rss0,
                          "written": _w1 - _w0}}))
"""


def measure(setup: str, attack: str, *, timeout_s: float = 120.0,
            env: dict[str, str] | None = None) -> dict:
    """Run ``setup`` then ``attack`` (Python source) in a fresh interpreter; return
    ``{"error": [class name, message] or None, "peak_growth": bytes of RSS above the level
    before the attack at its peak, "written": bytes passed to write() during the attack}``."""
    code = _HARNESS.format(setup=textwrap.dedent(setup),
                           attack=textwrap.indent(textwrap.dedent(attack), "    "))
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    error = result["error"][0] if result["error"] else "no error"
    print(f"\n  measured: {error}, peak RSS +{result['peak_growth'] / MiB:.2f} MiB, "
          f"{result['written']} bytes written (pytest -s shows this)")
    return result


def _limits_kwargs(limits: Limits) -> dict:
    return {name: getattr(limits, name) for name in limits.__dataclass_fields__}


def _decode(frame: bytes, limits: Limits) -> dict:
    setup = f"""
        from tandem.protocol.codec import Limits, decode
        frame = {frame!r}
        limits = Limits(**{_limits_kwargs(limits)!r})
    """
    return measure(setup, "decode(frame, limits)")


def _zstd_request(declared_elems: int, payload: bytes) -> bytes:
    body = {"id": bytes(16), "device_id": "d", "model_digest": "m", "cut_id": 0,
            "budget_ms": 10, "tensors": [{"name": "x", "dtype": 5, "shape": [declared_elems],
                                          "compression": 1, "size": len(payload)}]}
    out = msgpack.packb([1, 1, body], use_bin_type=True)
    return out + bytes(-len(out) % 8) + payload


UNTRUSTED = Limits(max_message_bytes=4 * MiB, max_tensor_bytes=4 * MiB,
                   max_header_bytes=64 * 1024)


def test_a_zstd_bomb_is_refused_before_it_is_decompressed():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 * MiB))
    assert len(bomb) < 16 * 1024  # ~8 KB on the wire...
    frame = _zstd_request(256 * MiB, bomb)
    result = _decode(frame, UNTRUSTED)  # ...to a peer that accepts 4 MiB
    assert result["error"][0] == "PayloadTooLarge"
    assert result["peak_growth"] < 2 * MiB, result
    # lying about the size to pass the limit: refused on the declared content size
    result = _decode(_zstd_request(1024, bomb), UNTRUSTED)
    assert result["error"][0] == "MalformedMessage" and "declares" in result["error"][1]
    assert result["peak_growth"] < 2 * MiB, result


def test_declared_sizes_are_refused_before_allocating():
    body = {"id": bytes(16), "device_id": "d", "model_digest": "m", "cut_id": 0,
            "budget_ms": 10, "tensors": [{"name": "x", "dtype": 7, "shape": [2**31 - 1] * 8,
                                          "size": 0}]}
    huge_shape = msgpack.packb([1, 1, body], use_bin_type=True)
    str32 = b"\x93\x01\x03\x81\xa9device_id\xdb\xff\xff\xff\xffabc"
    array32 = b"\x93\x01\x03\x81\xa9device_id\xdd\xff\xff\xff\xff"
    for frame in (huge_shape, str32, array32):
        result = _decode(frame, UNTRUSTED)
        assert result["error"][0] == "PayloadTooLarge", result
        assert result["peak_growth"] < 2 * MiB, result


def test_an_envelope_of_tiny_objects_stays_within_its_documented_bound():
    # SPEC §6: ignored keys are parsed, so an envelope of many tiny objects costs up to ~70x
    # max_header_bytes while it is decoded; lowering max_header_bytes bounds it
    junk = {f"k{i}": [[0] * 60] * 60 for i in range(40)}  # nested tiny objects in ignored keys
    body = {"worker_id": "w", "timestamp_ms": 1, **junk}
    frame = msgpack.packb([1, 4, body], use_bin_type=True)
    limits = Limits(max_header_bytes=len(frame) + 16, max_list_len=60, max_fields=64)
    result = _decode(frame, limits)
    assert result["error"] is None  # a legal (if silly) CloudLoad
    assert result["peak_growth"] < 100 * len(frame) + 2 * MiB, (result, len(frame))


def test_the_encoder_never_emits_a_bomb_the_decoder_would_refuse():
    arr = np.zeros(2 * MiB, np.uint8)
    msg = InferenceRequest(bytes(16), "d", "m", 0, 10,
                           (Tensor.from_array("x", arr, compress=True),))
    with pytest.raises(Exception, match="readers accept"):
        encode(msg, Limits(max_message_bytes=MiB, max_tensor_bytes=MiB))
