"""The dynamic batcher: one queue per (bundle digest, cut), batches formed when a compute slot is
free, inference in compute threads (never on the event loop).

Per batcher (all on the worker's event loop):

* requests wait in a priority queue (higher ``priority`` first, FIFO within a priority);
* a batch is formed when a compute slot is free and either ``max_batch`` rows are waiting or the
  oldest request has waited ``max_delay_ms`` — except that while recent waits brought no other
  request (closed-loop low load: one request in flight), it is formed at once, with a probing
  wait every 16th batch (so ``max_delay_ms`` never becomes pure latency at concurrency 1);
* ``max_batch`` is a ceiling: the batch size formed is the one with the lowest measured compute
  time per row so far, probing the powers of two above and below (:meth:`_Batcher.limit`);
* at formation, a request whose deadline has passed — or that cannot finish before it given the
  part's measured compute time — is answered DEADLINE_EXCEEDED without being computed;
* a batch holds requests of one input signature only (names, dtypes, every dim but the leading
  one): tensors of different shapes are never stacked; the others wait for the next batch;
* a batch runs ``Backend.infer_batch`` in a compute thread; each request succeeds or fails on its
  own (a request's bad tensor fails that request only).

Admission (:meth:`Dispatcher.submit`) is immediate: over ``queue_limit`` queued requests across
the worker → RESOURCE_EXHAUSTED (retryable) at once; while draining → UNAVAILABLE (retryable).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.cloud._repository import ModelRepository, Part
from tandem.protocol.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from tandem.protocol.tensors import Tensor

__all__ = ["BatchPolicy", "Dispatcher", "Outcome", "WorkItem"]

log = logging.getLogger("tandem.cloud.batcher")

_EWMA = 0.2
_MIN_SAMPLES_TO_PREDICT = 5


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 8  # rows (sum of leading dims) per batch
    max_delay_ms: float = 2.0  # how long the oldest request may wait for a batch to fill
    queue_limit: int = 256  # queued requests across the worker
    compute_slots: int = 1  # batches computing at once across the worker


@dataclass(eq=False)
class WorkItem:
    """One request waiting for compute. ``inputs`` are wire tensors (``wire=True``: outputs come
    back as wire tensors) or numpy arrays by name (outputs as arrays by name)."""

    part: Part
    inputs: Sequence[Tensor] | dict[str, np.ndarray]
    deadline: float  # on the loop's clock; math.inf for none
    priority: int = 0
    wire: bool = True
    signature: tuple = ()
    rows: int = 1
    enqueued: float = 0.0
    future: asyncio.Future | None = None
    on_start: Callable[[], None] | None = None  # called when its batch starts computing

    def feeds(self) -> dict[str, np.ndarray]:
        if isinstance(self.inputs, dict):
            return self.inputs
        return {t.name: t.to_array() for t in self.inputs}


@dataclass(frozen=True)
class Outcome:
    """What became of a request: outputs or an error, and its timings."""

    outputs: tuple[Tensor, ...] | dict[str, np.ndarray] | None
    error: TandemError | None
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PartStats:
    """Measured per (bundle digest, cut): EWMA of a batch's compute time and of batch size."""

    compute_ms: float = 0.0
    batch_size: float = 0.0
    per_row_ms: float = 0.0
    samples: int = 0

    def add(self, compute_ms: float, batch_size: int, rows: int) -> None:
        if self.samples == 0:
            self.compute_ms, self.batch_size = compute_ms, float(batch_size)
            self.per_row_ms = compute_ms / max(rows, 1)
        else:
            self.compute_ms += _EWMA * (compute_ms - self.compute_ms)
            self.batch_size += _EWMA * (batch_size - self.batch_size)
            self.per_row_ms += _EWMA * (compute_ms / max(rows, 1) - self.per_row_ms)
        self.samples += 1


def signature_of(part: Part, inputs: Sequence[Tensor] | dict[str, np.ndarray]) -> tuple[tuple,
                                                                                        int]:
    """(input signature, rows) of a request, checking its tensor names against the part.
    Rows = the leading dim (1 for scalars)."""
    if isinstance(inputs, dict):
        metas = sorted((name, str(a.dtype), tuple(a.shape)) for name, a in inputs.items())
    else:
        metas = sorted((t.name, t.dtype.name, t.shape) for t in inputs)
        if len({m[0] for m in metas}) != len(metas):
            raise InvalidArgument(f"{part.label}: a tensor name appears twice")
    names = tuple(m[0] for m in metas)
    expected = tuple(sorted(part.input_names))
    if names != expected:
        raise InvalidArgument(f"{part.label} takes tensors {list(expected)}, the request has "
                              f"{list(names)}")
    rows = metas[0][2][0] if metas and metas[0][2] else 1
    return tuple((n, d, s[1:]) for n, d, s in metas), rows


class _Batcher:
    """The queue and batch formation of one part (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, part: Part) -> None:
        self.d = dispatcher
        self.part = part
        self.heap: list[tuple[int, int, WorkItem]] = []
        self.rows = 0
        self.wake = asyncio.Event()
        # did waiting for company bring any? (EWMA of 1/0 per wait): see _should_wait
        self.join_rate = 1.0
        self.batches = 0
        # per-row compute time by batch-size bucket (powers of two): see limit()
        self.per_row: dict[int, float] = {}
        self.task = asyncio.get_running_loop().create_task(self._run(),
                                                           name=f"batcher {part.label}")

    def push(self, item: WorkItem) -> None:
        heapq.heappush(self.heap, (-item.priority, next(self.d._seq), item))
        self.rows += item.rows
        self.wake.set()
        self.d._tick.set()

    def oldest(self) -> float:
        return min(entry[2].enqueued for entry in self.heap)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        policy = self.d.policy
        delay = policy.max_delay_ms / 1000
        while True:
            if not self.heap:
                if self.d._closing:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            # let the batch fill up to max_batch rows, or until the oldest has waited max_delay
            rows_before = self.rows
            waited = False
            target = self.limit()
            while self.rows < target and not self.d._closing and self._should_wait():
                left = self.oldest() + delay - loop.time()
                if left <= 0:
                    break
                waited = True
                self.wake.clear()
                timer = loop.call_at(loop.time() + left, self.wake.set)
                try:
                    await self.wake.wait()
                finally:
                    timer.cancel()
            if waited:
                joined = 1.0 if self.rows > rows_before else 0.0
                self.join_rate += _EWMA * (joined - self.join_rate)
            await self.d._acquire_slot(self)
            try:
                batch = self._form(loop.time())
            except BaseException:
                self.d._release_slot()
                raise
            if not batch:
                self.d._release_slot()
                continue
            self.batches += 1
            self.d._spawn(self._compute(batch))

    def limit(self) -> int:
        """The batch size to form now: the bucket with the lowest measured compute time per
        row, and every 8th batch the bucket above it (to find out whether larger batches pay)
        and, four batches later, the one below.
        Larger batches are not always faster per row on a CPU (a convolution's working set
        leaves the cache), so ``max_batch`` is a ceiling, not a goal."""
        top = self.d.policy.max_batch
        if not self.per_row:
            return top if self.batches == 0 else 1
        best = min(self.per_row, key=self.per_row.__getitem__)
        if best < top and (self.batches % 8 == 0 or best * 2 not in self.per_row):
            return min(best * 2, top)
        if best > 1 and self.batches % 8 == 4:
            return best // 2
        return min(best, top)

    def record(self, rows: int, compute_ms: float) -> None:
        bucket = 1 << max(rows - 1, 0).bit_length()
        cost = compute_ms / max(rows, 1)
        old = self.per_row.get(bucket)
        self.per_row[bucket] = cost if old is None else old + _EWMA * (cost - old)

    def _should_wait(self) -> bool:
        """Wait for a batch to fill only while waiting brings company: under closed-loop low
        load (one request in flight) nobody can join, and max_delay would be pure latency.
        While recent waits stayed alone, dispatch at once, probing with a wait every 16th
        batch so batching resumes when load returns."""
        return self.join_rate >= 0.1 or self.batches % 16 == 0

    def _form(self, now: float) -> list[WorkItem]:
        """Pop the next batch: one signature, highest priority first, at most max_batch rows
        (a single request over max_batch runs alone); late requests are answered here."""
        stats = self.d.stats.get(self.part.key)
        predict = stats.per_row_ms / 1000 if stats and stats.samples >= _MIN_SAMPLES_TO_PREDICT \
            else 0.0
        batch: list[WorkItem] = []
        aside: list[tuple[int, int, WorkItem]] = []
        rows, signature = 0, None
        limit = self.limit()
        while self.heap:
            entry = self.heap[0]
            item = entry[2]
            if now >= item.deadline or (predict and now + predict * item.rows > item.deadline):
                heapq.heappop(self.heap)
                self.rows -= item.rows
                self.d._queued -= 1
                waited = (now - item.enqueued) * 1000
                why = ("its budget ran out" if now >= item.deadline else
                       "it cannot finish before its deadline")
                self.d._finish(item, Outcome(None, DeadlineExceeded(
                    f"{self.part.label}: {why} after {waited:.1f} ms in the queue; "
                    "not computed"), waited))
                continue
            if signature is not None and item.signature != signature:
                aside.append(heapq.heappop(self.heap))
                continue
            if batch and rows + item.rows > limit:
                break
            heapq.heappop(self.heap)
            self.rows -= item.rows
            self.d._queued -= 1
            batch.append(item)
            rows += item.rows
            signature = item.signature
            if rows >= limit:
                break
        for entry in aside:
            heapq.heappush(self.heap, entry)
        return batch

    async def _compute(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for item in batch:  # MQTT: its PUBACK now (the broker may send the next one)
            if item.on_start is not None:
                try:
                    item.on_start()
                except Exception:
                    log.exception("start hook failed")
        self.d._computing += len(batch)
        try:
            try:
                results, compute_s = await loop.run_in_executor(
                    self.d._executor, _run_batch, self.d.repo, self.part, batch)
            except TandemError as exc:
                results, compute_s = [exc] * len(batch), 0.0
            except Exception as exc:  # our bug: every request still gets an answer
                log.exception("batch on %s failed", self.part.label)
                results = [InternalError(f"{type(exc).__name__}: {exc}")] * len(batch)
                compute_s = 0.0
        finally:
            self.d._computing -= len(batch)
            self.d._release_slot()
        compute_ms = compute_s * 1000
        if compute_s > 0:
            rows = sum(item.rows for item in batch)
            self.record(rows, compute_ms)
            self.d.stats.setdefault(self.part.key, PartStats()).add(compute_ms, len(batch), rows)
            if self.d.on_batch is not None:
                self.d.on_batch(self.part, len(batch), compute_s)
        for item, result in zip(batch, results, strict=True):
            queue_ms = (started - item.enqueued) * 1000
            if isinstance(result, TandemError):
                outcome = Outcome(None, result, queue_ms, compute_ms, len(batch))
            else:
                outcome = Outcome(result, None, queue_ms, compute_ms, len(batch))
            self.d._finish(item, outcome)


def _run_batch(repo: ModelRepository, part: Part, batch: list[WorkItem]
               ) -> tuple[list[Any], float]:
    """In a compute thread: load (if needed) and run one batch; one result or error per item."""
    backend = repo.acquire(part)
    try:
        results: list[Any] = [None] * len(batch)
        feeds, where = [], []
        for i, item in enumerate(batch):
            try:
                feeds.append(item.feeds())
                where.append(i)
            except TandemError as exc:
                results[i] = exc
        started = time.perf_counter()
        outs = backend.infer_batch(feeds) if feeds else []
        compute_s = time.perf_counter() - started
        names = [t.name for t in backend.outputs]
        for i, out in zip(where, outs, strict=True):
            if isinstance(out, TandemError) or not batch[i].wire:
                results[i] = out
                continue
            try:
                results[i] = tuple(Tensor.from_array(n, np.ascontiguousarray(out[n]))
                                   for n in names)
            except TandemError as exc:
                results[i] = exc
        return results, compute_s
    finally:
        repo.release(part)


class Dispatcher:
    """Routes work items to a batcher per part; the admission and drain points."""

    def __init__(self, repo: ModelRepository, policy: BatchPolicy) -> None:
        self.repo = repo
        self.policy = policy
        self.stats: dict[tuple[str, int], PartStats] = {}
        self.on_batch: Callable[[Part, int, float], None] | None = None
        self.on_outcome: Callable[[WorkItem, Outcome], None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=policy.compute_slots, thread_name_prefix="tandem-compute")
        self._batchers: dict[tuple[str, int], _Batcher] = {}
        self._out = 0  # batches formed and not finished (computing, or queued for a thread)
        self._tick = asyncio.Event()  # a batch finished or a request arrived: see _acquire_slot
        self._seq = itertools.count()
        self._queued = 0
        self._computing = 0
        self._closing = False
        self._tasks: set[asyncio.Task] = set()

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet computing)."""
        return self._queued

    async def _acquire_slot(self, batcher: _Batcher) -> None:
        """Wait until ``batcher`` may form a batch: while fewer than ``compute_slots`` batches
        are out, and — formed ahead and queued behind the running ones, so a compute thread
        goes straight on to it instead of waiting for a trip through the event loop — one more
        per slot when a full batch is already waiting (never a partial one: what arrives
        meanwhile could still join it)."""
        slots = self.policy.compute_slots
        while True:
            if self._out < slots or (self._out < 2 * slots and batcher.heap
                                     and batcher.rows >= batcher.limit()):
                self._out += 1
                return
            self._tick.clear()
            await self._tick.wait()

    def _release_slot(self) -> None:
        self._out -= 1
        self._tick.set()

    @property
    def computing(self) -> int:
        return self._computing

    def expected_wait_ms(self) -> float:
        """A rough wait for a new request: queued rows x the mean per-row compute time."""
        total = 0.0
        for key, batcher in self._batchers.items():
            stats = self.stats.get(key)
            if stats is not None:
                total += batcher.rows * stats.per_row_ms
        return total / max(self.policy.compute_slots, 1)

    def submit(self, part: Part, inputs: Sequence[Tensor] | dict[str, np.ndarray], *,
               deadline: float = math.inf, priority: int = 0, wire: bool = True,
               on_start: Callable[[], None] | None = None) -> asyncio.Future[Outcome]:
        """Queue a request; the future resolves to its :class:`Outcome` (never raises). Raises
        at once: UNAVAILABLE while draining, RESOURCE_EXHAUSTED when the queue is full,
        DEADLINE_EXCEEDED for a spent budget, INVALID_ARGUMENT for tensors the part does not
        take."""
        loop = asyncio.get_running_loop()
        if self._closing:
            raise Unavailable("this worker is shutting down; retry on another", retryable=True)
        now = loop.time()
        if now >= deadline:
            raise DeadlineExceeded("the request's budget was spent before it reached the queue")
        signature, rows = signature_of(part, inputs)
        if self._queued >= self.policy.queue_limit:
            raise ResourceExhausted(
                f"queue full ({self._queued} requests waiting, limit {self.policy.queue_limit})",
                retryable=True)
        item = WorkItem(part, inputs, deadline, priority, wire, signature, rows, now,
                        loop.create_future(), on_start)
        batcher = self._batchers.get(part.key)
        if batcher is None or batcher.part is not part:
            batcher = self._batchers[part.key] = _Batcher(self, part)
        self._queued += 1
        batcher.push(item)
        assert item.future is not None
        return item.future

    def _finish(self, item: WorkItem, outcome: Outcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(item, outcome)
            except Exception:
                log.exception("outcome hook failed")
        if item.future is not None and not item.future.done():
            item.future.set_result(outcome)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, key: tuple[str, int]) -> None:
        """Drop the batcher of a part that left the repository once it has nothing queued."""
        batcher = self._batchers.get(key)
        if batcher is not None and not batcher.heap:
            batcher.task.cancel()
            del self._batchers[key]

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting, let queued and running batches finish for up to ``timeout_s``, then
        answer what is still queued with UNAVAILABLE (retryable). Returns how many were."""
        self._closing = True
        for b in self._batchers.values():
            b.wake.set()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while (self._queued or self._tasks) and loop.time() < end:
            await asyncio.sleep(0.005)
        cancelled = 0
        for b in self._batchers.values():
            while b.heap:
                _, _, item = heapq.heappop(b.heap)
                self._queued -= 1
                cancelled += 1
                self._finish(item, Outcome(None, Unavailable(
                    "the worker shut down before this request was computed; retry",
                    retryable=True)))
            b.rows = 0
        if self._tasks:  # batches still computing: they answer when they end
            await asyncio.wait(self._tasks, timeout=max(end - loop.time(), 0) + 5.0)
        return cancelled

    async def close(self) -> None:
        self._closing = True
        for b in self._batchers.values():
            b.task.cancel()
        await asyncio.gather(*(b.task for b in self._batchers.values()), return_exceptions=True)
        self._batchers.clear()
        self._executor.shutdown(wait=True, cancel_futures=False)
