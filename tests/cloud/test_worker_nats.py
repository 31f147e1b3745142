"""``tandem cloud serve --broker nats://…``: workers attached natively to NATS in one queue
group, devices speaking MQTT 3.1.1 to the same server's MQTT gateway (docs/deployment.md)."""

from __future__ import annotations

import collections
import time

import pytest

from tandem.protocol import MqttTransport, SyncTransport, TransportConfig
from tandem.protocol.codec import decode
from tandem.protocol.messages import CloudLoad
from tandem.protocol.nats import NatsTransport
from tests.cloud.conftest import request_for, topic_for

pytestmark = pytest.mark.broker


def test_workers_on_nats_share_the_requests_of_mqtt_devices(nats_factory, run_worker, repo,
                                                             compiled):
    server = nats_factory(mqtt=True)
    url = f"nats://{server.host}:{server.nats_port}"
    w1 = run_worker(repo=repo, broker=url, worker_id="a")
    w2 = run_worker(repo=repo, broker=url, worker_id="b")
    loads: list[CloudLoad] = []
    watcher = SyncTransport(NatsTransport(TransportConfig(host=server.host,
                                                          port=server.nats_port)))
    device = SyncTransport(MqttTransport(TransportConfig(host=server.host, port=server.port,
                                                         protocol=311)))
    with watcher, device:
        watcher.subscribe("tandem/v1/cloud/+/load", lambda m: loads.append(decode(m.payload)))
        seen: collections.Counter[str] = collections.Counter()
        for i in range(40):
            request, _ = request_for(compiled["dynamic_batch"], 0, seed=i)
            response = device.request(topic_for(request, "dynamic_batch"), request,
                                      timeout_s=20)
            assert response.id == request.id and response.ok
            seen[response.worker_id] += 1
        assert set(seen) == {"a", "b"} and sum(seen.values()) == 40, seen
        deadline = time.monotonic() + 5
        while w1.worker.answered + w2.worker.answered < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w1.worker.answered + w2.worker.answered == 40  # each request answered once
        deadline = time.monotonic() + 10
        while {ld.worker_id for ld in loads} != {"a", "b"} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {ld.worker_id for ld in loads} == {"a", "b"}  # live load reports over NATS
