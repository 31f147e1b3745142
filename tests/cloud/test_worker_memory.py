"""The worker on the in-memory transport (no broker process): results, dedup, routing errors,
draining, load reports and the last will."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tandem.cloud import Worker, load_config
from tandem.protocol import (
    MemoryBroker,
    MemoryTransport,
    NotFound,
    TransportConfig,
    Unavailable,
)
from tandem.protocol.codec import decode
from tests.cloud.conftest import request_for, topic_for


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _worker(broker: MemoryBroker, repo, **options) -> Worker:
    config = load_config({"repo": repo, "worker_id": "mem", "load_interval_s": 0.05,
                          **options}, env={})
    transport = MemoryTransport(broker, Worker(config).transport_config())
    await transport.connect()
    worker = Worker(config, transport=transport)
    await worker.start()
    return worker


def test_results_dedup_and_errors_without_a_broker(repo, compiled):
    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo)
        async with MemoryTransport(broker, TransportConfig()) as client:
            request, expected = request_for(compiled["residual"], 8)
            topic = topic_for(request, "residual")
            first = await client.request(topic, request)
            np.testing.assert_allclose(first.outputs[0].to_array(),
                                       next(iter(expected.values())), rtol=1e-5, atol=1e-5)
            again = await client.request(topic, request)  # same id: answered, not recomputed
            assert again.timings == first.timings
            assert worker.metrics.value("tandem_cloud_duplicates_total") == 1
            from dataclasses import replace

            with pytest.raises(NotFound):
                await client.request(topic, replace(request, cut_id=99,
                                                    id=bytes(16)))
            # many at once: every one answered, batched where the part allows
            reqs = [request_for(compiled["dynamic_batch"], 0, seed=i)[0] for i in range(24)]
            answers = await asyncio.gather(
                *(client.request(topic_for(r, "dynamic_batch"), r) for r in reqs))
            assert len({a.id for a in answers}) == 24
        await worker.stop()
        await worker.transport.close()
        assert worker.state == "stopped"

    run(main())


def test_stop_drains_and_marks_offline_and_the_will_does_too(repo, compiled):
    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo, max_batch=64, max_delay_ms=2000)
        async with MemoryTransport(broker, TransportConfig()) as client:
            reqs = [request_for(compiled["dynamic_batch"], 0, seed=i)[0] for i in range(6)]
            pending = [asyncio.ensure_future(client.request(topic_for(r, "dynamic_batch"), r))
                       for r in reqs]
            while worker.queue_depth < 6:
                await asyncio.sleep(0.01)
            await worker.stop()  # computes what is queued instead of waiting 2 s
            answers = await asyncio.gather(*pending)
            assert all(a.outputs for a in answers)
            load = decode(broker.retained()["tandem/v1/cloud/mem/load"])
            assert load.state == "offline"
            # after the stop, new requests are not served by it
            with pytest.raises((Unavailable, Exception)):
                await client.request(topic_for(reqs[0], "dynamic_batch"), reqs[0], timeout_s=0.3)
        await worker.transport.close()
        # a crash: the broker publishes the last will
        broker2 = MemoryBroker()
        crashed = await _worker(broker2, repo)
        await asyncio.sleep(0.15)  # a load report or two
        assert decode(broker2.retained()["tandem/v1/cloud/mem/load"]).state == "online"
        crashed.transport.break_connection()
        assert decode(broker2.retained()["tandem/v1/cloud/mem/load"]).state == "offline"
        await crashed.stop()
        await crashed.transport.close()

    run(main())



def test_every_response_carries_the_queue_depth_and_compute_time(repo, compiled):
    """The compute thread runs one batch per permit (its backend waits on a semaphore), with
    max_batch 1: the first request computes, one more batch is formed ahead, the rest queue.
    Releasing one batch at a time, each answer tells how many requests were still waiting when
    it was sent (one fewer per answer, down to 0; the batcher may or may not have formed the
    next batch ahead by then, hence a range of one) and its compute time (the first one's
    includes the hold); at idle a response says 0."""
    import threading
    import time

    permits = threading.Semaphore(0)
    hold_s = 0.3

    class Gated:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def infer_batch(self, requests):
            assert permits.acquire(timeout=30)
            return self.inner.infer_batch(requests)

    async def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.005)

    async def main() -> None:
        broker = MemoryBroker()
        config = load_config({"repo": repo, "worker_id": "depth", "max_batch": 1,
                              "max_delay_ms": 0, "compute_threads": 1}, env={})
        transport = MemoryTransport(broker, Worker(config).transport_config())
        await transport.connect()
        worker = Worker(config, transport=transport)
        make = worker.repo._backend_factory
        worker.repo._backend_factory = lambda part, source: Gated(make(part, source))
        await worker.start()
        n = 6
        try:
            async with MemoryTransport(broker, TransportConfig()) as client:
                reqs = [request_for(compiled["dynamic_batch"], 0, seed=i)[0] for i in range(n)]
                answers: list = []

                async def ask(r):
                    answers.append(await client.request(topic_for(r, "dynamic_batch"), r))

                pending = [asyncio.ensure_future(ask(r)) for r in reqs]
                # one computing (held), one formed ahead of it, the rest waiting
                await wait_for(lambda: worker.queue_depth == n - 2, "requests queued")
                # the part loaded: the first batch's compute clock runs from here
                await wait_for(lambda: worker.repo.loaded, "part loaded")
                await asyncio.sleep(hold_s)
                assert worker.queue_depth == n - 2 and answers == []  # nothing moves
                for k in range(n):
                    permits.release()  # one batch computes
                    await wait_for(lambda k=k: len(answers) == k + 1, f"answer {k}")
                    depth = answers[k].queue_depth
                    assert max(n - 3 - k, 0) <= depth <= max(n - 2 - k, 0), (k, depth)
                await asyncio.gather(*pending)
                assert answers[0].queue_depth > 0 and answers[-1].queue_depth == 0
                assert all(a.outputs and a.worker_id == "depth" for a in answers)
                assert answers[0].timings.compute_ms >= hold_s * 1000
                assert all(a.timings.compute_ms > 0 for a in answers)
                assert answers[-1].timings.queue_ms >= hold_s * 1000  # it waited the hold out
                # at idle: nothing waits behind a lone request
                lone, _ = request_for(compiled["dynamic_batch"], 0, seed=99)
                permits.release()
                idle = await client.request(topic_for(lone, "dynamic_batch"), lone)
                assert idle.queue_depth == 0 and idle.timings.compute_ms > 0
        finally:
            for _ in range(n + 2):
                permits.release()
            await worker.stop()
            await worker.transport.close()

    run(main())
