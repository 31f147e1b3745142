from __future__ import annotations

import contextlib
import os
import random
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.protocol import chunking
from tandem.protocol._codec import encode_chunk
from tandem.protocol.chunking import (
    CHUNK_COST,
    CHUNK_PREFIX,
    SET_COST,
    Reassembler,
    is_chunk,
    split,
)
from tandem.protocol.codec import decode, encode
from tandem.protocol.errors import Code, InvalidArgument, MalformedMessage, PayloadTooLarge
from tandem.protocol.messages import DeviceStatus, InferenceRequest
from tandem.protocol.tensors import Tensor

MID = b"\x01" * 16


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def big_frame(n_floats: int = 3 * 2**20 // 4) -> bytes:
    arr = np.random.default_rng(7).random(n_floats, dtype=np.float32)
    return encode(InferenceRequest(bytes(16), "cam", "d", 1, 100, (Tensor.from_array("x", arr),)))


def test_public_surface():
    assert set(chunking.__all__) == {"CHUNK_COST", "CHUNK_PREFIX", "SET_COST", "Reassembler",
                                     "is_chunk", "split"}


def test_small_payload_is_returned_unchanged():
    payload = encode(DeviceStatus("d", "online", 1))
    parts = split(payload, 1024)
    assert parts == [payload] and parts[0] is payload
    r = Reassembler()
    assert r.feed(payload) is payload
    assert r.pending_bytes == 0


def test_big_payload_split_and_reassembled_in_order():
    payload = big_frame()
    parts = split(payload, 2**20)
    assert len(parts) == 4
    assert all(len(p) <= 2**20 and is_chunk(p) and p[:3] == CHUNK_PREFIX for p in parts)
    assert not is_chunk(payload)
    r = Reassembler()
    out = [r.feed(p) for p in parts]
    assert out[:-1] == [None] * 3
    assert out[-1] == payload
    assert decode(out[-1]).tensors[0].to_array().nbytes == 3 * 2**20
    assert r.pending_bytes == 0 and r.pending_sets == 0 and r.completed == 1


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 5000), max_size=st.integers(100, 700), seed=st.integers(0, 2**32 - 1))
def test_any_order_with_duplicates_reassembles(n, max_size, seed):
    rng = random.Random(seed)
    payload = rng.randbytes(n)
    parts = split(payload, max_size)
    assert all(len(p) <= max_size for p in parts)
    if n <= max_size:
        assert parts == [payload]
        return
    feed = parts + rng.sample(parts, k=min(3, len(parts)))  # duplicates
    rng.shuffle(feed)
    r = Reassembler()
    results = [r.feed(p) for p in feed]
    done = [x for x in results if x is not None]
    assert done == [payload]  # exactly once, late duplicates ignored
    assert r.pending_bytes == 0 and r.pending_sets == 0


def test_interleaved_sets():
    a, b = os.urandom(5000), os.urandom(7000)
    pa, pb = split(a, 500), split(b, 500)
    r = Reassembler()
    got = []
    for x, y in zip(pa, pb, strict=False):
        got += [r.feed(x), r.feed(y)]
    got += [r.feed(y) for y in pb[len(pa):]]
    assert [g for g in got if g is not None] == [a, b]


def test_mutable_buffers_are_copied_not_aliased():
    payload = os.urandom(3000)
    parts = [bytearray(p) for p in split(payload, 1000)]
    r = Reassembler()
    for p in parts[:-1]:
        assert r.feed(p) is None
        p[-1] ^= 0xFF  # the caller reuses its buffer
    assert r.feed(parts[-1]) == payload


def test_incomplete_set_expires_and_frees_its_memory():
    clock = FakeClock()
    r = Reassembler(timeout_s=5.0, clock=clock)
    parts = split(os.urandom(10_000), 1000)
    for p in parts[:-1]:
        r.feed(p)
    assert r.pending_sets == 1 and r.pending_bytes >= 9000
    clock.now += 4.9
    assert r.expire() == 0 and r.pending_sets == 1
    clock.now += 0.2
    assert r.expire() == 1
    assert r.pending_bytes == 0 and r.pending_sets == 0 and r.expired == 1
    # the last chunk alone now starts a new set instead of completing the old one
    assert r.feed(parts[-1]) is None
    assert r.pending_sets == 1


def test_expiry_also_happens_on_feed():
    clock = FakeClock()
    r = Reassembler(timeout_s=1.0, clock=clock)
    r.feed(split(os.urandom(3000), 1000)[0])
    assert r.pending_bytes > 0
    clock.now += 2
    other = encode(DeviceStatus("d", "online", 1))
    r.feed(split(os.urandom(3000), 1000)[0])  # a chunk of another set triggers the sweep
    assert r.pending_sets == 1 and r.expired == 1
    assert r.feed(other) is other


def test_declared_total_over_limit_is_refused_before_storing():
    r = Reassembler(max_total_bytes=10_000)
    chunk = encode_chunk(MID, 0, 2, 10**12, 0, b"x" * 100)
    with pytest.raises(PayloadTooLarge) as info:
        r.feed(chunk)
    assert info.value.code is Code.PAYLOAD_TOO_LARGE
    assert r.pending_bytes == 0 and r.pending_sets == 0


def test_a_senders_oldest_sets_are_evicted_to_stay_under_its_quota():
    budget = 12_000
    r = Reassembler(max_total_bytes=budget, max_bytes_per_origin=budget, max_pending_sets=2,
                    max_sets_per_origin=2)
    firsts = [split(os.urandom(4000), 1000)[0] for _ in range(3)]
    for p in firsts:
        r.feed(p)
    assert r.pending_sets == 2 and r.evicted == 1
    big = split(os.urandom(4900), 1000)
    for p in big[:4]:
        r.feed(p)
    assert r.pending_bytes <= budget
    assert r.evicted >= 2


@pytest.mark.parametrize("second, match", [
    (encode_chunk(MID, 1, 3, 300, 100, b"y" * 100), "3 chunks"),
    (encode_chunk(MID, 1, 2, 301, 100, b"y" * 100), "301 bytes"),
    (encode_chunk(MID, 0, 2, 300, 5, b"y" * 100), "index 0"),
])
def test_inconsistent_chunks_are_malformed_and_drop_the_set(second, match):
    r = Reassembler()
    r.feed(encode_chunk(MID, 0, 2, 300, 0, b"x" * 100))
    with pytest.raises(MalformedMessage, match=match):
        r.feed(second)
    assert r.pending_bytes == 0 and r.pending_sets == 0


def test_chunks_that_do_not_tile_the_payload_are_malformed():
    r = Reassembler()
    r.feed(encode_chunk(MID, 0, 2, 20, 0, b"a" * 10))
    with pytest.raises(MalformedMessage, match="starts at 5"):
        r.feed(encode_chunk(MID, 1, 2, 20, 5, b"b" * 10))
    r.feed(encode_chunk(MID, 0, 2, 20, 0, b"a" * 5))
    with pytest.raises(MalformedMessage, match="declared 20"):
        r.feed(encode_chunk(MID, 1, 2, 20, 5, b"b" * 10))
    assert r.pending_bytes == 0


@pytest.mark.parametrize("chunk, match", [
    (encode_chunk(MID, 2, 2, 100, 0, b"x"), "index 2 of 2"),
    (encode_chunk(MID, 0, 2, 100, 95, b"x" * 10), "past the payload"),
    (encode_chunk(MID, 0, 2, 100, 0, b""), "empty chunk"),
    (encode_chunk(MID, 0, 5, 3, 0, b"x"), "5 chunks for 3 bytes"),
    (encode_chunk(b"short", 0, 2, 100, 0, b"x"), "16 bytes"),
    (CHUNK_PREFIX + b"\x80", "missing field"),
    (CHUNK_PREFIX, "truncated"),
])
def test_malformed_chunk_frames(chunk, match):
    with pytest.raises(MalformedMessage, match=match):
        Reassembler().feed(chunk)


def test_split_arguments_are_checked():
    with pytest.raises(InvalidArgument):
        split(b"x" * 100, 0)
    with pytest.raises(InvalidArgument, match="no room"):
        split(b"x" * 100, 40)
    with pytest.raises(InvalidArgument, match="16 bytes"):
        split(b"x" * 1000, 100, b"short")
    with pytest.raises(InvalidArgument):
        split("text", 100)


def test_split_uses_the_given_id_so_retries_form_one_set():
    payload = os.urandom(2500)
    a = split(payload, 1000, MID)
    b = split(payload, 1000, MID)
    assert a == b
    r = Reassembler()
    assert r.feed(a[0]) is None and r.feed(b[1]) is None
    assert r.feed(a[2]) == payload


def test_tiny_chunks_are_charged_their_real_cost():
    # 1-byte chunks: the per-chunk bookkeeping, not the data, is what costs memory
    payload = os.urandom(3000)
    mid = os.urandom(16)
    chunks = [encode_chunk(mid, i, 3000, 3000, i, payload[i:i + 1]) for i in range(3000)]
    r = Reassembler(max_total_bytes=8 << 20)
    for c in chunks[:100]:
        r.feed(c)
    assert r.pending_bytes == 100 * (1 + CHUNK_COST) + SET_COST + sys.getsizeof("")
    tight = Reassembler(max_total_bytes=100_000)  # 3000 bytes of data, but 3000 chunks
    with pytest.raises(PayloadTooLarge, match="3000 chunks"):
        tight.feed(chunks[0])
    assert tight.pending_sets == 0


def test_a_set_that_fits_its_declared_budget_completes():
    payload = os.urandom(1000)
    parts = split(payload, 300)
    budget = len(payload) + len(parts) * CHUNK_COST + SET_COST + sys.getsizeof("")
    r = Reassembler(max_total_bytes=budget, max_bytes_per_origin=budget)
    out = [r.feed(p) for p in parts]
    assert out[-1] == payload and r.pending_bytes == 0
    with pytest.raises(PayloadTooLarge, match="one sender may hold"):
        Reassembler(max_total_bytes=budget, max_bytes_per_origin=budget - 1).feed(parts[0])


def test_split_counts_bytes_of_any_memoryview():
    arr = np.arange(1000, dtype=np.float32)
    parts = split(memoryview(arr), 1500)
    r = Reassembler()
    out = [r.feed(p) for p in parts]
    assert out[-1] == arr.tobytes()
    assert len(split(memoryview(arr[:300]), 1500)) == 1  # 1200 bytes fit


def test_expiry_runs_on_every_feed_even_for_whole_messages():
    now = [0.0]
    r = Reassembler(timeout_s=1.0, clock=lambda: now[0])
    r.feed(split(os.urandom(1000), 300)[0])
    now[0] = 5.0
    r.feed(encode(DeviceStatus("d", "online", 1)))
    assert r.pending_sets == 0 and r.pending_bytes == 0 and r.expired == 1


# -- attack review: per-sender quotas, sets bound to their origin, the real cost of a chunk -----


def _first_chunk(mid: bytes, total: int = 2, count: int = 2, data: bytes = b"x") -> bytes:
    return encode_chunk(mid, 0, count, total, 0, data)


def test_one_sender_cannot_evict_another_senders_set_with_many_tiny_sets():
    payload = os.urandom(5000)
    victim = split(payload, 1000, MID)
    r = Reassembler()  # defaults: 64 sets, 16 per sender
    for p in victim[:-1]:
        assert r.feed(p, origin="tandem/v1/req/cam-01/m") is None
    for _ in range(64):  # 64 one-byte sets from another device: each starts a set
        r.feed(_first_chunk(os.urandom(16)), origin="tandem/v1/req/evil/m")
    assert r.held_by("tandem/v1/req/evil/m")[0] == r.max_sets_per_origin == 16
    assert r.evicted == 64 - 16  # all of them the attacker's own
    assert r.feed(victim[-1], origin="tandem/v1/req/cam-01/m") == payload


def test_one_sender_cannot_evict_a_smaller_set_of_another_by_filling_bytes():
    legit = os.urandom(20_000)
    parts = split(legit, 2000)
    r = Reassembler(max_total_bytes=400_000, max_pending_sets=64)
    for p in parts[:-1]:
        r.feed(p, origin="good")
    for _ in range(2000):  # as many bytes as the attacker may hold, and more
        with contextlib.suppress(PayloadTooLarge):
            r.feed(_first_chunk(os.urandom(16), total=200, count=2, data=b"x" * 100),
                   origin="evil")
    assert r.held_by("evil")[1] <= r.max_bytes_per_origin
    assert r.pending_bytes <= r.max_total_bytes
    assert r.feed(parts[-1], origin="good") == legit


def test_under_total_pressure_the_sender_holding_the_most_loses():
    r = Reassembler(max_total_bytes=60_000, max_bytes_per_origin=30_000, max_pending_sets=64)
    small = split(os.urandom(6000), 1000)
    for p in small[:-1]:
        r.feed(p, origin="small")
    for o in ("big-1", "big-2"):  # two senders near their quota: the total is exceeded
        for _ in range(10):
            with contextlib.suppress(PayloadTooLarge):
                r.feed(_first_chunk(os.urandom(16), total=4000, count=2, data=b"x" * 2000),
                       origin=o)
    assert r.pending_bytes <= r.max_total_bytes
    assert r.held_by("small")[0] == 1  # never the smallest holder
    assert r.feed(small[-1], origin="small") is not None


def test_a_chunk_never_joins_a_set_of_another_origin():
    victim_payload, evil_payload = os.urandom(3000), os.urandom(3000)
    victim = split(victim_payload, 1000, MID)
    evil = split(evil_payload, 1000, MID)  # the victim's set id, from the attacker's topic
    assert len(victim) == len(evil) == 4
    r = Reassembler()
    assert r.feed(victim[0], origin="tandem/v1/req/cam-01/m") is None
    for p in evil[1:]:  # everything the victim has not sent yet
        assert r.feed(p, origin="tandem/v1/req/evil/m") is None
    for p in victim[1:-1]:
        assert r.feed(p, origin="tandem/v1/req/cam-01/m") is None
    assert r.feed(victim[-1], origin="tandem/v1/req/cam-01/m") == victim_payload
    assert r.pending_sets == 1 and r.held_by("tandem/v1/req/evil/m")[0] == 1
    # a conflicting chunk on the victim's own topic drops only the victim's set
    r.feed(victim[0], origin="tandem/v1/req/cam-01/m")  # late duplicate: ignored
    assert r.held_by("tandem/v1/req/cam-01/m") == (0, 0)


def test_tiny_chunks_cost_no_more_memory_than_they_are_charged():
    # 1-byte chunks: the per-chunk bookkeeping, not the data, is what costs memory
    mid = os.urandom(16)
    n = 20_000
    r = Reassembler(max_total_bytes=64 << 20)
    frames = (encode_chunk(mid, i, n + 1, n + 1, i, b"x") for i in range(n))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for f in frames:
            r.feed(f)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert r.pending_sets == 1
    assert grown <= r.pending_bytes, (grown / n, r.pending_bytes / n)


def test_quota_arguments_are_checked():
    with pytest.raises(InvalidArgument):
        Reassembler(max_total_bytes=100, max_bytes_per_origin=101)
    with pytest.raises(InvalidArgument):
        Reassembler(max_pending_sets=4, max_sets_per_origin=5)
    r = Reassembler(max_total_bytes=1000, max_pending_sets=8)
    assert (r.max_bytes_per_origin, r.max_sets_per_origin) == (500, 2)
