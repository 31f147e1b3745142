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
