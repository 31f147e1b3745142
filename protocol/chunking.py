"""Split frames bigger than a broker's packet limit into chunk frames, and put them back together.

    for part in split(frame, max_size=1_000_000):      # sender, before publish
        publish(part)
    frame = reassembler.feed(payload)                    # receiver, on every payload
    if frame is not None:
        msg = codec.decode(frame)

A chunk frame is an ordinary envelope with message type ``CHUNK`` (its first three bytes are
:data:`CHUNK_PREFIX`), so :meth:`Reassembler.feed` can pass whole messages through untouched.
Byte layout in ``protocol/SPEC.md`` ("Chunk frames").

Memory is bounded, per sender and in total, and checked before anything is stored:

- every stored chunk is charged its data plus :data:`CHUNK_COST` bytes (what CPython keeps
  per chunk, measured with margin: small chunks are copied out of their frame, so a tiny chunk
  never keeps a whole frame, a view and its bookkeeping alive for one byte of data), and every
  set :data:`SET_COST` plus its origin string; a set whose declared data plus per-chunk cost
  exceeds ``max_bytes_per_origin`` is refused before anything is stored;
- a set belongs to the *origin* it arrived on (the transport passes the MQTT topic, so broker
  ACLs decide who can add to a set): sets are keyed by (origin, set id), a chunk never joins a
  set of another origin, and a chunk that disagrees with its set drops that set;
- quotas per origin (``max_sets_per_origin``, ``max_bytes_per_origin``): a sender over its
  quota loses its own oldest sets, never another sender's;
- over the totals (``max_pending_sets``, ``max_total_bytes``) the oldest set of the origin
  holding the most is dropped — so chunks from one sender never evict a set of a sender that
  holds less (with the default ``max_bytes_per_origin`` of half the total, two senders can never
  push each other out at all);
- a set not complete ``timeout_s`` after its first chunk is dropped, by :meth:`Reassembler.expire`
  (call it from a timer) and on every :meth:`~Reassembler.feed`.

A lost chunk therefore costs its set, never the receiver's memory.
"""

from __future__ import annotations

import os
import sys
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

__all__ = ["CHUNK_COST", "CHUNK_PREFIX", "SET_COST", "Reassembler", "is_chunk", "split"]

#: Bytes charged per stored chunk on top of its data. Measured with tracemalloc on CPython 3.11
#: (64-bit): a chunk kept as a view of its frame costs about 540 bytes beyond its data (the
#: frame's envelope, the view, its buffer, the (offset, data) tuple, two ints, a dict slot); a
#: copied small chunk about 180. ``tests/protocol/test_chunking.py`` (traced memory) and
#: ``tests/security/test_wire_chunks.py`` (RSS of a process filling the limit) check it.
CHUNK_COST = 768
#: Bytes charged per pending set on top of its chunks (its records and its origin's bookkeeping).
SET_COST = 2048
#: Chunks with less data than this are copied out of their frame instead of viewed.
COPY_BELOW = 64 * 1024

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
    __slots__ = ("count", "deadline", "held", "origin", "parts", "total")

    def __init__(self, origin: str, count: int, total: int, deadline: float) -> None:
        self.origin = origin  # the set is bound to the origin of its first chunk
        self.count = count
        self.total = total
        self.deadline = deadline
        self.parts: dict[int, tuple[int, Buffer]] = {}  # index -> (offset, data)
        self.held = 0  # bytes charged to this set


class Reassembler:
    """Collects chunk frames into whole frames. Not thread-safe: feed it from one thread (and
    call :meth:`expire` from that thread's timer).

    ``max_bytes_per_origin`` defaults to half of ``max_total_bytes`` and ``max_sets_per_origin``
    to a quarter of ``max_pending_sets``; a message larger than ``max_bytes_per_origin`` (less
    its chunks' cost) cannot be reassembled. ``clock`` (seconds, monotonic) is injectable for
    tests.
    """

    def __init__(
        self,
        timeout_s: float = 30.0,
        max_total_bytes: int = 256 * 2**20,
        max_pending_sets: int = 64,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes_per_origin: int | None = None,
        max_sets_per_origin: int | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0, not {timeout_s!r}")
        if max_total_bytes < 1 or max_pending_sets < 1:
            raise InvalidArgument("max_total_bytes and max_pending_sets must be >= 1")
        if max_bytes_per_origin is None:
            max_bytes_per_origin = max(1, max_total_bytes // 2)
        if max_sets_per_origin is None:
            max_sets_per_origin = max(1, max_pending_sets // 4)
        if not 1 <= max_bytes_per_origin <= max_total_bytes:
            raise InvalidArgument("max_bytes_per_origin must be in [1, max_total_bytes]")
        if not 1 <= max_sets_per_origin <= max_pending_sets:
            raise InvalidArgument("max_sets_per_origin must be in [1, max_pending_sets]")
        self.timeout_s = float(timeout_s)
        self.max_total_bytes = int(max_total_bytes)
        self.max_pending_sets = int(max_pending_sets)
        self.max_bytes_per_origin = int(max_bytes_per_origin)
        self.max_sets_per_origin = int(max_sets_per_origin)
        self._clock = clock
        # keyed by (origin, set id); oldest first == first to expire
        self._sets: OrderedDict[tuple[str, bytes], _Set] = OrderedDict()
        # origin -> [pending sets, bytes charged]; only origins with a pending set
        self._origins: dict[str, list[int]] = {}
        # recently completed (hash of origin, set id) -> until when a late duplicate is ignored
        self._done: OrderedDict[tuple[int, bytes], float] = OrderedDict()
        self._pending_bytes = 0
        self.completed = 0
        self.expired = 0  # sets dropped by the timeout
        self.evicted = 0  # sets dropped to make room (quotas per origin, totals)
        self.refused = 0  # sets refused: larger than an origin may hold, or no room for them

    @property
    def pending_bytes(self) -> int:
        """Bytes charged to incomplete sets (chunks kept alive, plus their bookkeeping)."""
        return self._pending_bytes

    @property
    def pending_sets(self) -> int:
        return len(self._sets)

    def held_by(self, origin: str) -> tuple[int, int]:
        """``(pending sets, bytes charged)`` of one origin."""
        sets, held = self._origins.get(origin, (0, 0))
        return sets, held

    def expire(self) -> int:
        """Drop the sets whose timeout has passed; returns how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._sets:
            key, s = next(iter(self._sets.items()))
            if s.deadline > now:
                break
            self._drop(key)
            dropped += 1
        self.expired += dropped
        while self._done and next(iter(self._done.values())) <= now:
            self._done.popitem(last=False)
        return dropped

    def feed(self, payload: Buffer, origin: str = "") -> Buffer | None:
        """A whole frame: ``payload`` itself if it is not a chunk, the reassembled frame when this
        chunk completes its set, else None. Raises MalformedMessage for an inconsistent chunk
        (its set is dropped) and PayloadTooLarge for a set the quotas cannot hold.

        ``origin`` names where the chunk came from (the transport passes the MQTT topic it
        arrived on): a set is bound to the origin of its first chunk, so chunks that arrive on
        one device's topic never join a set begun on another's, and quotas are per origin."""
        if self._sets or self._done:
            self.expire()
        if not is_chunk(payload):
            return payload
        f = decode_chunk(payload)
        key = (origin, f.message_id)
        if (hash(origin), f.message_id) in self._done:
            return None  # a late duplicate of a set already delivered
        s = self._sets.get(key)
        if s is None:
            s = self._start(key, f.count, f.total)
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
        # A view keeps an immutable frame alive (no copy of big chunks); a small chunk is copied
        # so it does not keep its frame and a view alive; a mutable buffer may be reused.
        data: Buffer = f.data
        if not isinstance(payload, bytes) or len(data) < COPY_BELOW:
            data = bytes(data)
        held = len(data) + CHUNK_COST
        self._make_room(origin, held, keep=key)
        s.parts[f.index] = (f.offset, data)
        self._charge(s, held)
        if len(s.parts) < s.count:
            return None
        return self._complete(key, s)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _start(self, key: tuple[str, bytes], count: int, total: int) -> _Set:
        origin = key[0]
        set_cost = SET_COST + sys.getsizeof(origin)
        need = total + count * CHUNK_COST + set_cost
        if need > self.max_bytes_per_origin:
            self.refused += 1
            raise PayloadTooLarge(
                f"chunked frame of {total} bytes in {count} chunks needs {need} bytes, over "
                f"the {self.max_bytes_per_origin} one sender may hold")
        sets = self._origins.get(origin, (0, 0))[0]
        while sets >= self.max_sets_per_origin:  # over its own quota: its own oldest set goes
            self._evict(self._oldest_of(origin))
            sets -= 1
        while len(self._sets) >= self.max_pending_sets:  # the busiest sender loses a set
            busiest = max(self._origins, key=lambda o: (
                self._origins[o][0] + (o == origin), self._origins[o][1]))
            self._evict(self._oldest_of(busiest) or next(iter(self._sets)))
        s = _Set(origin, count, total, self._clock() + self.timeout_s)
        self._make_room(origin, set_cost, keep=None)
        self._sets[key] = s
        self._origins.setdefault(origin, [0, 0])[0] += 1
        self._charge(s, set_cost)
        return s

    def _make_room(self, origin: str, held: int, keep: tuple[str, bytes] | None) -> None:
        """Evict until ``held`` more bytes for ``origin`` fit its quota and the total; the set
        ``keep`` is dropped and PayloadTooLarge raised when they cannot."""
        while self.held_by(origin)[1] + held > self.max_bytes_per_origin:
            victim = self._oldest_of(origin, exclude=keep)
            if victim is None:
                self._refuse(keep, f"over the {self.max_bytes_per_origin} bytes one sender "
                                   "may hold")
            self._evict(victim)
        while self._pending_bytes + held > self.max_total_bytes:
            heaviest = max(self._origins, key=lambda o: self._origins[o][1] + (
                held if o == origin else 0))
            victim = self._oldest_of(heaviest, exclude=keep)
            if victim is None:  # this sender holds the most: it does not push others out
                self._refuse(keep, f"over the {self.max_total_bytes} bytes of all pending "
                                   "sets, and this sender holds the most")
            self._evict(victim)

    def _refuse(self, key: tuple[str, bytes] | None, why: str) -> None:
        if key is not None and key in self._sets:
            self._drop(key)
        self.refused += 1
        raise PayloadTooLarge(f"chunked frame refused: {why}")

    def _oldest_of(self, origin: str, exclude: tuple[str, bytes] | None = None
                   ) -> tuple[str, bytes] | None:
        for key in self._sets:
            if key[0] == origin and key != exclude:
                return key
        return None

    def _charge(self, s: _Set, held: int) -> None:
        s.held += held
        self._origins[s.origin][1] += held
        self._pending_bytes += held

    def _complete(self, key: tuple[str, bytes], s: _Set) -> bytes:
        self._drop(key)
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
        self._done[(hash(key[0]), key[1])] = self._clock() + self.timeout_s
        while len(self._done) > 4 * self.max_pending_sets:
            self._done.popitem(last=False)
        return b"".join(pieces)

    def _drop(self, key: tuple[str, bytes]) -> None:
        s = self._sets.pop(key)
        self._pending_bytes -= s.held
        counts = self._origins[s.origin]
        counts[0] -= 1
        counts[1] -= s.held
        if counts[0] == 0:
            del self._origins[s.origin]

    def _evict(self, key: tuple[str, bytes] | None) -> None:
        if key is None:  # pragma: no cover - callers only evict when a set exists
            return
        self._drop(key)
        self.evicted += 1
