"""``tandem cloud serve --broker nats://…``: workers attached natively to NATS in one queue
group, devices speaking MQTT 3.1.1 to the same server's MQTT gateway (docs/deployment.md); and
scale-out on a two-node NATS cluster: devices on node A, two ``tandem cloud serve`` processes
on node B."""

from __future__ import annotations

import collections
import dataclasses
import signal
import time

import pytest

from tandem.protocol import MqttTransport, SyncTransport, TransportConfig, new_request_id
from tandem.protocol.codec import decode
from tandem.protocol.errors import DeadlineExceeded, Unavailable
from tandem.protocol.messages import CloudLoad
from tandem.protocol.nats import NatsTransport
from tests._support.interop import NatsCluster, nats_missing, require_broker
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


@pytest.fixture
def cluster(tmp_path):
    """Two nats-servers joined by routes; node 0 runs the MQTT gateway."""
    require_broker(nats_missing())
    with NatsCluster(tmp_path / "cluster", nodes=2, mqtt_on=(0,)) as c:
        yield c


def test_two_serve_processes_on_a_nats_cluster_share_a_devices_requests(cluster, serve_process,
                                                                        repo, compiled):
    node_a, node_b = cluster.nodes
    url = f"nats://{node_b.host}:{node_b.nats_port}"
    env = {"TANDEM_CONFIG": "", "TANDEM_LOAD_INTERVAL_S": "0.2"}
    workers = {name: serve_process("--repo", str(repo), "--broker", url, "--worker-id", name,
                                   env=env) for name in ("w1", "w2")}
    for name, w in workers.items():
        w.wait_for_log(f"worker {name} serving")
    answers: collections.defaultdict[bytes, list[str]] = collections.defaultdict(list)
    sniffer = SyncTransport(NatsTransport(TransportConfig(host=node_a.host,
                                                          port=node_a.nats_port)))
    device = SyncTransport(MqttTransport(TransportConfig(
        host=node_a.host, port=node_a.port, protocol=311, client_id="cam-01",
        reconnect_min_s=0.05)))
    template, expected = request_for(compiled["dynamic_batch"], 0, device="cam-01")
    topic = topic_for(template, "dynamic_batch")

    def ask(retries: int = 0) -> str:
        """One request, retried by id as the daemon does (only when ``retries``)."""
        request = dataclasses.replace(template, id=new_request_id())
        for attempt in range(retries + 1):
            try:
                response = device.request(topic, request, timeout_s=5 if retries else 20)
            except (DeadlineExceeded, Unavailable):
                if attempt == retries:
                    raise
                continue
            assert response.ok and response.id == request.id, response.error
            got = response.outputs[0].to_array()
            assert abs(got - expected[response.outputs[0].name]).max() < 1e-3
            return response.worker_id
        raise AssertionError("unreachable")

    with sniffer, device:
        sniffer.subscribe("tandem/v1/resp/+",
                          lambda m: answers[decode(m.payload).id].append(
                              decode(m.payload).worker_id))
        # steady: every request answered once, by one of the two, and both get work
        served = collections.Counter(ask() for _ in range(60))
        assert set(served) == {"w1", "w2"} and sum(served.values()) == 60, served
        deadline = time.monotonic() + 5
        while sum(len(v) for v in answers.values()) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a second answer to any request would have come by now
        assert len(answers) == 60 and all(len(v) == 1 for v in answers.values()), answers
        # one worker killed: the other takes every request from then on
        workers["w1"].signal(signal.SIGKILL)
        workers["w1"].wait()
        after = collections.Counter(ask(retries=3) for _ in range(20))
        assert after == {"w2": 20}, after
