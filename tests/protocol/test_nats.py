"""The NATS transport beyond the contract suite: the topic ↔ subject mapping and the ids NATS
cannot carry, hostile NATS peers, permissions, what core NATS lacks, MQTT devices meeting
NATS-native workers through NATS's MQTT gateway, and scale-out on a two-node NATS cluster
(devices on node A's MQTT gateway, two workers in one queue group on node B, one of them killed
mid-stream)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tandem.protocol import codec, topics
from tandem.protocol.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.nats import (
    NatsTransport,
    check_nats_id,
    filter_to_subjects,
    subject_to_topic,
    topic_to_subject,
)
from tandem.protocol.tensors import Tensor
from tandem.protocol.transport import IncomingMessage, PublishProperties, TransportConfig
from tests._support.interop import NatsCluster, NatsServer, nats_missing, require_broker

pytestmark = [pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 100))


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def make_request(device: str = "cam-01", budget_ms: int = 5000) -> InferenceRequest:
    return InferenceRequest(id=new_request_id(), device_id=device, model_digest="ab" * 32,
                            cut_id=1, budget_ms=budget_ms,
                            tensors=(Tensor.from_array("x", np.arange(4, dtype=np.float32)),))


def echo(request, ctx) -> InferenceResponse:
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id="echo")


# -- the mapping (no server) ---------------------------------------------------------------------


@pytest.mark.parametrize("topic,subject", [
    ("tandem/v1/req/cam-01/resnet", "tandem.v1.req.cam-01.resnet"),
    ("tandem/v1/resp/cam-01", "tandem.v1.resp.cam-01"),
    ("a", "a"),
    ("caméra/ü", "caméra.ü"),
    ("tandem/v1/status/cam_01-x", "tandem.v1.status.cam_01-x"),
])
def test_topics_map_to_subjects_and_back(topic, subject):
    assert topic_to_subject(topic) == subject
    assert subject_to_topic(subject) == topic


@pytest.mark.parametrize("topic", [
    "tandem/v1/req/cam.01/m",  # '.': refused by NATS 2.9's gateway, '//' from 2.10
    "tandem/v1/req/cam 01/m",  # space
    "tandem/v1/req/*/m",  # a NATS wildcard as an id
    "tandem/v1/req/>/m",
    "tandem/v1/req/x>/m",
    "/leading", "trailing/", "double//slash",  # escaped by the gateway
    "$JS/API/STREAM/DELETE/x",  # reserved subjects: a JetStream API call
    "a/+/b", "a/#", "",  # what MQTT itself refuses
])
def test_topics_nats_cannot_carry_are_refused(topic):
    with pytest.raises(InvalidArgument):
        topic_to_subject(topic)


@pytest.mark.parametrize("flt,subjects,group", [
    ("tandem/v1/req/+/+", ["tandem.v1.req.*.*"], None),
    ("$share/workers/tandem/v1/req/+/+", ["tandem.v1.req.*.*"], "workers"),
    ("tandem/v1/#", ["tandem.v1.>", "tandem.v1"], None),  # MQTT's # matches its parent too
    ("#", [">"], None),
    ("+/x", ["*.x"], None),
])
def test_filters_map_to_subjects_and_queue_groups(flt, subjects, group):
    assert filter_to_subjects(flt) == (subjects, group)


@pytest.mark.parametrize("flt", ["$share/a.b/x/#", "$share/a b/x", "x/a.b/+", "$SYS/#",
                                 "a/*/b", "$share//x"])
def test_filters_nats_cannot_carry_are_refused(flt):
    with pytest.raises(InvalidArgument):
        filter_to_subjects(flt)


@pytest.mark.parametrize("subject", ["tandem.v1.req.*.m", "tandem.v1.req.>.m", "a./.b",
                                     "a.b./", "x//y.z", "$SYS.ACCOUNT.x", "a.b+c", "a.#",
                                     "a..b"])
def test_subjects_no_topic_maps_to_are_recognised(subject):
    assert subject_to_topic(subject) is None


@pytest.mark.parametrize("good", ["cam-01", "cam_01", "Kamera-ü", "x" * 128])
def test_ids_nats_carries(good):
    assert check_nats_id(good) == good


@pytest.mark.parametrize("bad", ["cam.01", "cam 01", "cam*", "cam>", "$cam", "a/b", "a+b",
                                 "", "x" * 129, "cam\x00"])
def test_ids_nats_cannot_carry(bad):
    with pytest.raises(InvalidArgument):
        check_nats_id(bad)


# -- one server ----------------------------------------------------------------------------------


@pytest.fixture
def nats_server(nats_factory) -> NatsServer:
    return nats_factory()


def cfg(server: NatsServer, **kw) -> TransportConfig:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.5)
    return TransportConfig(host=server.host, port=server.nats_port, **kw)


async def raw_client(server: NatsServer, **kw):
    import nats

    return await nats.connect(server.url, allow_reconnect=False, **kw)


def test_ids_nats_cannot_carry_fail_the_call_never_the_connection(nats_server):
    async def main() -> None:
        async with NatsTransport(cfg(nats_server)) as t:
            drops: list[bool] = []
            t.add_connection_listener(drops.append)
            for bad in ("tandem/v1/resp/cam.01", "tandem/v1/resp/*", "$JS/API/INFO"):
                with pytest.raises(InvalidArgument):
                    await t.publish(bad, b"x")
            with pytest.raises(InvalidArgument):
                await t.request(topics.request_topic("cam-01", "m"), make_request("cam>"))
            with pytest.raises(InvalidArgument):
                await t.subscribe("$share/a.b/x", lambda m: None)
            await asyncio.sleep(0.2)
            assert t.connected and drops == []

    run(main())


def test_hostile_nats_peers_are_dropped_and_counted(nats_server):
    """A raw NATS client (outside Tandem) sends what no Tandem peer would: subjects with no
    topic, malformed Tandem headers, a wildcard token as a device id."""

    async def main() -> None:
        async with NatsTransport(cfg(nats_server)) as server:
            await server.serve(topics.request_filter("workers"), echo)
            seen: list[IncomingMessage] = []
            await server.subscribe("probe/#", seen.append)
            raw = await raw_client(nats_server)
            try:
                req = make_request()
                frame = codec.encode(req)
                # a subject no topic maps to: dropped and counted, never answered
                await raw.publish("tandem.v1.req.a/b.m", frame)
                await raw.publish("tandem.v1.req.*.m", frame)
                # hostile header values are ignored, the message still arrives
                await raw.publish("probe.x", b"1", headers={
                    "Tandem-Correlation-Data": "zz-not-hex", "Tandem-Message-Expiry": "9" * 40,
                    "Tandem-Response-Topic": "a/+/b" + "x" * 5000})
                await raw.publish("probe.y", b"2", headers={
                    "Tandem-Correlation-Data": "0011", "Tandem-Message-Expiry": "7",
                    "Tandem-Response-Topic": "tandem/v1/resp/cam-01", "Nmqtt-Pub": "1"})
                await raw.flush()
                await until(lambda: len(seen) == 2)
                bad, good = seen
                assert (bad.correlation_data, bad.message_expiry_s, bad.response_topic) == (
                    None, None, None)
                assert (good.correlation_data, good.message_expiry_s, good.response_topic,
                        good.qos) == (b"\x00\x11", 7, "tandem/v1/resp/cam-01", 1)
                await until(lambda: server.stats().dropped_messages >= 2)
                stats = server.stats().serving[topics.request_filter("workers")]
                assert stats.answered == 0 and server.connected
            finally:
                await raw.close()

    run(main())


def test_a_subscription_the_server_refuses_fails_that_call_only(nats_factory, tmp_path):
    server = nats_factory(start=False)
    server.config_path.write_text(server.config_path.read_text() + (
        "authorization { users = [\n"
        '  { user: worker, password: s3cret, permissions: { subscribe: { deny: ["secret.>"] } } }'
        "\n] }\n"))
    server.start()

    async def main() -> None:
        async with NatsTransport(cfg(server, username="worker", password="s3cret")) as t:
            drops: list[bool] = []
            t.add_connection_listener(drops.append)
            with pytest.raises(PermissionDenied, match="secret"):
                await t.subscribe("secret/x", lambda m: None)
            inbox: list[IncomingMessage] = []
            await t.subscribe("open/x", inbox.append)
            await (await t.publish("open/x", b"ok"))
            await until(lambda: inbox)
            assert drops == [] and t.connected
        t0 = time.monotonic()
        with pytest.raises(PermissionDenied):
            await NatsTransport(cfg(server, username="worker", password="wrong")).connect()
        assert time.monotonic() - t0 < 4

    run(main())


def test_connecting_to_nothing_fails_at_once(nats_server):
    nats_server.kill()

    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="cannot connect to NATS"):
            await NatsTransport(cfg(nats_server, connect_timeout_s=3)).connect()
        assert time.monotonic() - t0 < 2.5  # refused: not the whole connect timeout

    run(main())


def test_retained_wills_and_sessions_are_not_kept_and_say_so(nats_server, caplog):
    async def main() -> None:
        caplog.set_level(logging.WARNING)
        from tandem.protocol.transport import Will

        async with NatsTransport(cfg(nats_server, will=Will("tandem/v1/status/cam-01", b"off"),
                                     client_id="cam-01", clean_start=False,
                                     session_expiry_s=60)) as a:
            live: list[IncomingMessage] = []
            async with NatsTransport(cfg(nats_server)) as b:
                await b.subscribe("tandem/v1/assign/+", live.append)
                await (await a.publish("tandem/v1/assign/cam-01", b"bundle-1", retain=True))
                await until(lambda: live)
            async with NatsTransport(cfg(nats_server)) as late:
                later: list[IncomingMessage] = []
                await late.subscribe("tandem/v1/assign/+", later.append)
                await asyncio.sleep(0.3)
                assert later == []  # nothing kept
        text = caplog.text
        assert "no last will" in text and "no persistent sessions" in text
        assert "no retained messages" in text

    run(main())


def test_the_servers_max_payload_bounds_chunks_headers_included(nats_factory):
    server = nats_factory(max_payload=64 * 1024)

    async def main() -> None:
        async with NatsTransport(cfg(server)) as srv, NatsTransport(cfg(server)) as client:
            assert client.chunk_size() == 63 * 1024
            await srv.serve(topics.request_filter(), echo)
            arr = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
            req = InferenceRequest(new_request_id(), "cam-01", "ab" * 32, 1, 20_000,
                                   (Tensor.from_array("x", arr),))
            resp = await client.request(topics.request_topic("cam-01", "m"), req)
            np.testing.assert_array_equal(resp.outputs[0].to_array(), arr)
            # a packet whose headers would push it over the cap is refused before sending
            from tandem.protocol.errors import PayloadTooLarge

            with pytest.raises(PayloadTooLarge):
                await client.publish("x/y", b"z" * (63 * 1024), properties=PublishProperties(
                    response_topic="r/" + "y" * 2000))
            assert client.connected

    run(main())


# -- MQTT devices, NATS workers ------------------------------------------------------------------


def test_mqtt_devices_reach_nats_workers_through_the_gateway(nats_factory):
    server = nats_factory(mqtt=True)

    async def main() -> None:
        device_cfg = TransportConfig(host=server.host, port=server.port, protocol=311,
                                     client_id="cam-01", clean_start=True)
        async with NatsTransport(cfg(server)) as worker, MqttTransport(device_cfg) as device:
            await worker.serve(topics.request_filter("workers"), echo)
            for _ in range(20):
                req = make_request()
                assert (await device.request(topics.request_topic("cam-01", "m"), req)).id \
                    == req.id
            # 5 MB through the gateway: chunks of the 3.1.1 default fit its 1 MB max_payload
            big = np.random.default_rng(2).standard_normal(5 * 2**18).astype(np.float32)
            req = InferenceRequest(new_request_id(), "cam-01", "ab" * 32, 1, 30_000,
                                   (Tensor.from_array("x", big),))
            resp = await device.request(topics.request_topic("cam-01", "m"), req)
            np.testing.assert_array_equal(resp.outputs[0].to_array(), big)
            # a device publishing with a NATS wildcard as its id reaches no worker
            await device.publish("tandem/v1/req/*/m", codec.encode(make_request("x")))
            await until(lambda: worker.stats().dropped_messages >= 1)
            assert worker.stats().serving[topics.request_filter("workers")].answered == 21

    run(main())


# -- scale-out on a two-node cluster -------------------------------------------------------------

_WORKER = """
import asyncio, sys
from tandem.protocol import topics
from tandem.protocol.messages import InferenceResponse
from tandem.protocol.nats import NatsTransport
from tandem.protocol.transport import TransportConfig

name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def handler(request, ctx):
    await asyncio.sleep(0.005)  # requests are in flight when the worker dies
    return InferenceResponse(id=request.id, outputs=request.tensors, worker_id=name)

async def main():
    async with NatsTransport(TransportConfig(host=host, port=port)) as t:
        await t.serve(topics.request_filter("workers"), handler)
        print("ready", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def _start_worker(name: str, node: NatsServer) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, name, node.host,
                             str(node.nats_port)], stdout=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    assert line.strip() == b"ready", f"worker {name} did not start"
    return proc


@pytest.fixture
def cluster(tmp_path):
    require_broker(nats_missing())
    with NatsCluster(tmp_path / "cluster", nodes=2, mqtt_on=(0,)) as c:
        yield c


def test_scale_out_on_a_nats_cluster_with_a_queue_group(cluster):
    node_a, node_b = cluster.nodes
    workers = {name: _start_worker(name, node_b) for name in ("w1", "w2")}
    devices = [f"cam-{i:02d}" for i in range(4)]

    async def main() -> None:
        answers: dict[bytes, list[str]] = collections.defaultdict(list)

        def sniff(msg: IncomingMessage) -> None:
            resp = codec.decode(msg.payload)
            answers[resp.id].append(resp.worker_id)

        def device_cfg(dev: str) -> TransportConfig:
            return TransportConfig(host=node_a.host, port=node_a.port, protocol=311,
                                   client_id=dev, clean_start=True, reconnect_min_s=0.05)

        async with NatsTransport(TransportConfig(host=node_a.host,
                                                 port=node_a.nats_port)) as sniffer:
            await sniffer.subscribe("tandem/v1/resp/+", sniff)
            links = [MqttTransport(device_cfg(d)) for d in devices]
            for link in links:
                await link.connect()
            try:
                retried: set[bytes] = set()

                timeout_s = 20.0  # steady: nothing is lost, so nothing may time out

                async def ask(link: MqttTransport, dev: str, req: InferenceRequest) -> str:
                    topic = topics.request_topic(dev, "m")
                    for _attempt in range(10):  # a device retries by id, as the daemon does
                        try:
                            return (await link.request(topic, req, timeout_s=timeout_s)
                                    ).worker_id
                        except (DeadlineExceeded, Unavailable):
                            retried.add(req.id)
                    raise AssertionError(f"request {req.id.hex()} never answered")

                async def stream(n: int, on_answer=None) -> list[tuple[bytes, str]]:
                    got: list[tuple[bytes, str]] = []
                    sem = asyncio.Semaphore(16)

                    async def one(i: int) -> None:
                        async with sem:
                            dev = devices[i % len(devices)]
                            req = make_request(dev)
                            got.append((req.id, await ask(links[i % len(links)], dev, req)))
                            if on_answer is not None:
                                on_answer(len(got))

                    await asyncio.gather(*(one(i) for i in range(n)))
                    return got

                # steady: every request answered exactly once, the load split
                steady = await stream(200)
                await until(lambda: all(answers[rid] for rid, _ in steady))
                await asyncio.sleep(0.3)  # a second answer would have come by now
                assert not retried  # no loss on a stable cluster: nothing timed out
                counts = collections.Counter(len(answers[rid]) for rid, _ in steady)
                assert counts == {1: 200}, counts
                per_worker = collections.Counter(w for _, w in steady)
                assert set(per_worker) == {"w1", "w2"}, per_worker
                assert min(per_worker.values()) >= 30, per_worker  # both carry real load

                # w1 is killed mid-stream: every request is still answered (w2 takes over)
                killed_at: list[int] = []
                timeout_s = 1.5  # what w1 held is lost with it: asked again after this

                def kill_w1(count: int) -> None:
                    if count == 60 and not killed_at:
                        workers["w1"].kill()
                        killed_at.append(count)

                stream2 = await stream(300, kill_w1)
                assert killed_at and len(stream2) == 300
                await until(lambda: all(answers[rid] for rid, _ in stream2))
                assert retried  # the requests w1 held were lost with it, and asked again
                for rid, _ in stream2:  # never twice from one worker
                    assert max(collections.Counter(answers[rid]).values()) == 1
                tail = [w for _, w in stream2[150:]]
                assert set(tail) == {"w2"}, collections.Counter(tail)
            finally:
                for link in links:
                    await link.close()

    try:
        run(main())
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
