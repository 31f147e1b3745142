"""Split frames bigger than a broker's packet limit into chunk frames, and put them back together.

    for part in split(frame, max_size=1_000_000):      # sender, before publish
        publish(part)
    frame = reassembler.feed(payload)                    # receiver, on every payload
    if frame is not None:
        msg = codec.decode(frame)

A chunk frame is an ordinary envelope with message type ``CHUNK`` (its first three bytes are
:data:`CHUNK_PREFIX`), so :meth:`Reassembler.feed` can pass whole messages through untouched.
Byte layout in ``protocol/SPEC.md`` ("Chunk frames").

Memory is bounded: every chunk is charged its data plus :data:`CHUNK_COST` bytes (what Python
keeps per chunk: the view, its tuple, the dict slot, the frame's envelope), so many tiny chunks
cannot hide their real size; a set whose declared data plus per-chunk cost exceeds
``max_total_bytes`` is refused before anything is stored; when pending sets together would hold
more than ``max_total_bytes``, or there are more than ``max_pending_sets``, the oldest sets are
dropped; a set not complete ``timeout_s`` after its
first chunk arrived is dropped (on :meth:`Reassembler.expire` and on every :meth:`feed`). A lost
chunk therefore costs its set, never the receiver's memory.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable

from tandem.protocol._codec import (
    CHUNK_PREFIX,
    ID_LEN,
    chunk_overhead,
    decode_chunk,
    encode_chunk,
    is_chunk,
)
from tandem.protocol.errors import InvalidArgument, MalformedMessage, PayloadTooLarge

__all__ = ["CHUNK_COST", "CHUNK_PREFIX", "Reassembler", "is_chunk", "split"]

CHUNK_COST = 512  # bytes charged per stored chunk on top of its data (measured: ~480 with CPython)

Buffer = bytes | bytearray | memoryview


def split(payload: bytes, max_size: int, message_id: bytes | None = None) -> list[bytes]:
    """``[payload]`` itself if it fits in ``max_size`` bytes, else chunk frames of at most
    ``max_size`` bytes each (envelope included), in order.

    ``message_id`` (16 bytes; random if None) names the set; use the request id to make
    retransmissions of one request reassemble as one set.
    """
    if type(max_size) is not int or max_size <= 0:
        raise InvalidArgument(f"max_size must be a positive int, not {max_size!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"payload must be bytes-like, not {type(payload).__name__}")
    mv = memoryview(payload).cast("B")  # bytes, whatever the view's item type
    n = mv.nbytes
    if n <= max_size:
        return [payload]
    mid = os.urandom(ID_LEN) if message_id is None else bytes(message_id)
    if len(mid) != ID_LEN:
        raise InvalidArgument(f"message_id must be {ID_LEN} bytes, not {len(mid)}")
    room = max_size - chunk_overhead(mid, n)
    if room < 1:
        raise InvalidArgument(f"max_size {max_size} leaves no room for data after the header")
    count = -(-n // room)
    return [
        encode_chunk(mid, i, count, n, i * room, mv[i * room : (i + 1) * room])
        for i in range(count)
    ]


class _Set:
    __slots__ = ("count", "deadline", "held", "parts", "total")

    def __init__(self, count: int, total: int, deadline: float) -> None:
        self.count = count
        self.total = total
        self.deadline = deadline
        self.parts: dict[int, tuple[int, Buffer]] = {}  # index -> (offset, data)
        self.held = 0  # bytes of memory this set keeps alive


class Reassembler:
    """Collects chunk frames into whole frames. Not thread-safe: feed it from one thread.

    ``clock`` (seconds, monotonic) is injectable for tests.
    """

    def __init__(
        self,
        timeout_s: float = 30.0,
        max_total_bytes: int = 256 * 2**20,
        max_pending_sets: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0, not {timeout_s!r}")
        if max_total_bytes < 1 or max_pending_sets < 1:
            raise InvalidArgument("max_total_bytes and max_pending_sets must be >= 1")
        self.timeout_s = float(timeout_s)
        self.max_total_bytes = int(max_total_bytes)
        self.max_pending_sets = int(max_pending_sets)
        self._clock = clock
        # keyed by (origin, set id); oldest first == first to expire
        self._sets: OrderedDict[tuple[str, bytes], _Set] = OrderedDict()
        # recently completed (origin, set id) -> until when a late duplicate is ignored
        self._done: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._pending_bytes = 0
        self.completed = 0
        self.expired = 0  # sets dropped by the timeout
        self.evicted = 0  # sets dropped to stay under max_total_bytes / max_pending_sets

    @property
    def pending_bytes(self) -> int:
        """Bytes held by incomplete sets (chunk frames kept alive)."""
        return self._pending_bytes

    @property
    def pending_sets(self) -> int:
        return len(self._sets)

    def expire(self) -> int:
        """Drop the sets whose timeout has passed; returns how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._sets:
            mid, s = next(iter(self._sets.items()))
            if s.deadline > now:
                break
            self._drop(mid)
            dropped += 1
        self.expired += dropped
        while self._done and next(iter(self._done.values())) <= now:
            self._done.popitem(last=False)
        return dropped

    def feed(self, payload: Buffer, origin: str = "") -> Buffer | None:
        """A whole frame: ``payload`` itself if it is not a chunk, the reassembled frame when this
        chunk completes its set, else None. Raises MalformedMessage for an inconsistent chunk
        (its set is dropped) and PayloadTooLarge for a set over ``max_total_bytes``.

        ``origin`` names where the chunk came from (the transport passes the MQTT topic it
        arrived on): sets are keyed by (origin, set id), so chunks that arrive on one device's
        topic never join a set begun on another's."""
        if self._sets or self._done:
            self.expire()
        if not is_chunk(payload):
            return payload
        f = decode_chunk(payload)
        if f.total + f.count * CHUNK_COST > self.max_total_bytes:
            raise PayloadTooLarge(
                f"chunked frame of {f.total} bytes in {f.count} chunks needs over "
                f"{self.max_total_bytes} bytes"
            )
        key = (origin, f.message_id)
        if key in self._done:
            return None  # a late duplicate of a set already delivered
        s = self._sets.get(key)
        if s is None:
            while len(self._sets) >= self.max_pending_sets:
                self._evict_oldest()
            s = _Set(f.count, f.total, self._clock() + self.timeout_s)
            self._sets[key] = s
        elif f.count != s.count or f.total != s.total:
            self._drop(key)
            raise MalformedMessage(
                f"chunk says {f.count} chunks / {f.total} bytes, its set said "
                f"{s.count} / {s.total}"
            )
        prev = s.parts.get(f.index)
        if prev is not None:
            if prev[0] != f.offset or len(prev[1]) != len(f.data):
                self._drop(key)
                raise MalformedMessage(f"two different chunks with index {f.index}")
            return None  # a duplicate (QoS 1 redelivery): harmless
        # a view keeps an immutable frame alive; a mutable buffer may be reused by the caller
        data: Buffer = f.data if isinstance(payload, bytes) else bytes(f.data)
        held = len(data) + CHUNK_COST
        while self._pending_bytes + held > self.max_total_bytes and len(self._sets) > 1:
            self._evict_oldest(keep=key)
        if self._pending_bytes + held > self.max_total_bytes:
            self._drop(key)
            raise PayloadTooLarge(f"chunked frame needs over {self.max_total_bytes} bytes")
        s.parts[f.index] = (f.offset, data)
        s.held += held
        self._pending_bytes += held
        if len(s.parts) < s.count:
            return None
        return self._complete(key, s)

    def _complete(self, mid: tuple[str, bytes], s: _Set) -> bytes:
        del self._sets[mid]
        self._pending_bytes -= s.held
        pieces = []
        pos = 0
        for i in range(s.count):
            offset, data = s.parts[i]
            if offset != pos:
                raise MalformedMessage(f"chunk {i} starts at {offset}, expected {pos}")
            pieces.append(data)
            pos += len(data)
        if pos != s.total:
            raise MalformedMessage(f"chunks hold {pos} bytes, the set declared {s.total}")
        self.completed += 1
        self._done[mid] = self._clock() + self.timeout_s
        while len(self._done) > 4 * self.max_pending_sets:
            self._done.popitem(last=False)
        return b"".join(pieces)

    def _drop(self, mid: tuple[str, bytes]) -> None:
        s = self._sets.pop(mid)
        self._pending_bytes -= s.held
        s.parts.clear()

    def _evict_oldest(self, keep: tuple[str, bytes] | None = None) -> None:
        for mid in self._sets:
            if mid != keep:
                self._drop(mid)
                self.evicted += 1
                return
