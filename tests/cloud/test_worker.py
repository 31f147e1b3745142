"""The worker against a real mosquitto: results, routing errors, dedup, fuzzing, hot add,
load reports. Clients are Tandem's own transport (and raw paho for hostile payloads)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tandem.protocol import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MqttTransport,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SyncTransport,
    Tensor,
    TransportConfig,
    new_request_id,
)
from tandem.protocol.codec import decode, encode
from tandem.protocol.messages import CloudLoad, InferenceResponse
from tests.cloud.conftest import broker_url, request_for, topic_for

pytestmark = pytest.mark.broker


def client(broker) -> SyncTransport:
    return SyncTransport(MqttTransport(TransportConfig(host="127.0.0.1", port=broker.port)))


@pytest.mark.parametrize("model", ["residual", "multi_io"])
def test_outputs_equal_the_full_model_for_cut_0_and_every_interior_cut(
        mosquitto, run_worker, compiled, tmp_path, model):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled[model], repo / model)
    run_worker(repo=repo, broker=broker_url(mosquitto))
    from tandem.protocol.bundle import load_bundle

    with load_bundle(compiled[model]) as b:
        cuts = [c.id for c in b.manifest.cuts if c.tail_part is not None]
    assert len(cuts) >= 2 and 0 in cuts
    with client(mosquitto) as t:
        for cut in cuts:
            request, expected = request_for(compiled[model], cut, seed=cut)
            response = t.request(topic_for(request, model), request)
            assert response.worker_id == "w1" and response.timings.compute_ms > 0
            got = {o.name: o.to_array() for o in response.outputs}
            assert got, f"cut {cut} returned nothing"
            for name, value in got.items():
                np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-5,
                                           err_msg=f"cut {cut} output {name}")


def test_routing_errors_have_the_right_codes(mosquitto, run_worker, repo, compiled):
    run_worker(repo=repo, broker=broker_url(mosquitto))
    request, _ = request_for(compiled["residual"], 1)
    topic = topic_for(request, "residual")
    with client(mosquitto) as t:
        from dataclasses import replace

        with pytest.raises(NotFound, match="unknown model"):
            t.request(topic_for(request, "other"), replace(request, id=new_request_id(),
                                                             model_digest="0" * 64))
        with pytest.raises(NotFound, match="unknown cut 3"):
            t.request(topic, replace(request, id=new_request_id(), cut_id=3))
        with pytest.raises(NotFound, match="unknown cut 17"):  # all-local: no cloud tail
            t.request(topic, replace(request, id=new_request_id(), cut_id=17))
        with pytest.raises(FailedPrecondition, match="different bundles"):
            t.request(topic, replace(request, id=new_request_id(), model_digest="1" * 64))
        with pytest.raises(DeadlineExceeded, match=r"budget|deadline"):
            t.request(topic, replace(request, id=new_request_id(), budget_ms=0), timeout_s=5)
        wrong = (Tensor.from_array("nope", np.zeros((1, 2), np.float32)),)
        with pytest.raises(InvalidArgument, match="takes tensors"):
            t.request(topic, replace(request, id=new_request_id(), tensors=wrong))
        bad_shape = (Tensor.from_array(request.tensors[0].name, np.zeros((1, 2), np.float32)),)
        with pytest.raises(InvalidArgument):
            t.request(topic, replace(request, id=new_request_id(), tensors=bad_shape))
        # the answer goes to the device of the topic, whatever the payload says
        spoof = SyncTransport(MqttTransport(TransportConfig(host="127.0.0.1",
                                                            port=mosquitto.port)))
        with spoof, pytest.raises(PermissionDenied, match="says device"):
            spoof.request(topic_for(replace(request, device_id="cam-02"), "residual"),
                          replace(request, id=new_request_id(),
                                  reply_topic="tandem/v1/resp/cam-02"))
        # and it still serves
        assert t.request(topic, replace(request, id=new_request_id())).outputs


def test_full_queue_answers_resource_exhausted_at_once(mosquitto, run_worker, repo, compiled):
    # one compute slot, a queue of 2 and a long batch delay: the third request waiting is refused
    run_worker(repo=repo, broker=broker_url(mosquitto), queue_limit=2, max_batch=64,
               max_delay_ms=1500)
    import asyncio

    async def main() -> list:
        async with MqttTransport(TransportConfig(host="127.0.0.1", port=mosquitto.port)) as t:
            reqs = [request_for(compiled["dynamic_batch"], 0, seed=i)[0] for i in range(4)]
            started = time.monotonic()
            results = await asyncio.gather(
                *(t.request(topic_for(r, "dynamic_batch"), r, timeout_s=10) for r in reqs),
                return_exceptions=True)
            return [(r, time.monotonic() - started) for r in results]

    results = asyncio.run(main())
    refused = [r for r, _ in results if isinstance(r, ResourceExhausted)]
    answered = [r for r, _ in results if isinstance(r, InferenceResponse)]
    assert len(refused) == 2 and len(answered) == 2, results
    assert all(e.retryable for e in refused)


def test_duplicate_ids_are_answered_again_without_recompute(mosquitto, run_worker, repo,
                                                            compiled):
    rw = run_worker(repo=repo, broker=broker_url(mosquitto))
    request, _ = request_for(compiled["residual"], 8)
    with client(mosquitto) as t:
        first = t.request(topic_for(request, "residual"), request)
        again = t.request(topic_for(request, "residual"), request)
    assert again.outputs[0].to_array().tobytes() == first.outputs[0].to_array().tobytes()
    assert again.timings == first.timings  # the same response, not a new computation
    m = rw.worker.metrics
    assert m.value("tandem_cloud_duplicates_total") == 1
    assert m.value("tandem_cloud_compute_seconds_count", {"model": "residual", "cut": "8"}) == 1


def test_two_workers_in_one_group_both_receive_work(mosquitto, run_worker, repo, compiled):
    w1 = run_worker(repo=repo, broker=broker_url(mosquitto), worker_id="a")
    w2 = run_worker(repo=repo, broker=broker_url(mosquitto), worker_id="b")
    seen: dict[str, int] = {}
    with client(mosquitto) as t:
        for i in range(40):
            request, _ = request_for(compiled["dynamic_batch"], 0, seed=i)
            response = t.request(topic_for(request, "dynamic_batch"), request)
            seen[response.worker_id] = seen.get(response.worker_id, 0) + 1
    assert set(seen) == {"a", "b"} and sum(seen.values()) == 40, seen
    deadline = time.monotonic() + 5  # the counter moves just after the publish
    while w1.worker.answered + w2.worker.answered < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w1.worker.answered + w2.worker.answered == 40  # each request answered once


def _paho(broker, client_id: str) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_malformed_payloads_are_answered_when_their_id_is_known(mosquitto, run_worker, repo):
    rw = run_worker(repo=repo, broker=broker_url(mosquitto))
    got: list[InferenceResponse] = []
    arrived = threading.Event()
    c = _paho(mosquitto, "hostile")

    def on_message(client, userdata, msg):
        got.append(decode(msg.payload))
        arrived.set()

    c.on_message = on_message
    c.subscribe("tandem/v1/resp/cam-09", qos=1)
    time.sleep(0.2)
    rid = os.urandom(16)
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = rid
    c.publish("tandem/v1/req/cam-09/residual", b"\x93\x01\x01garbage", qos=1,
              properties=props).wait_for_publish(5)
    c.publish("tandem/v1/req/cam-09/residual", b"no id, no answer", qos=1).wait_for_publish(5)
    assert arrived.wait(10)
    time.sleep(0.3)
    c.loop_stop()
    c.disconnect()
    assert len(got) == 1 and got[0].id == rid
    assert got[0].error is not None and got[0].error.code == 1  # INVALID_ARGUMENT
    m = rw.worker.metrics
    assert m.value("tandem_cloud_decode_errors_total") == 2  # answered or not


def request_with_retry(t: SyncTransport, topic: str, request, *, timeout: float = 2.0,
                       tries: int = 10) -> InferenceResponse:
    """What a device does: retry with the same id until an answer comes (at least once)."""
    for _ in range(tries - 1):
        try:
            return t.request(topic, request, timeout_s=timeout)
        except DeadlineExceeded:
            continue
    return t.request(topic, request, timeout_s=timeout)


def _mutations(valid: bytes, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        kind = i % 4
        if kind == 0:  # random bytes
            yield bytes(rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8))
        elif kind == 1:  # flipped bytes
            b = bytearray(valid)
            for pos in rng.integers(0, len(b), rng.integers(1, 8)):
                b[pos] = int(rng.integers(0, 256))
            yield bytes(b)
        elif kind == 2:  # truncated
            yield valid[: int(rng.integers(0, len(valid)))]
        else:  # extended / spliced
            yield valid[: int(rng.integers(0, len(valid)))] + bytes(
                rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8))


def test_worker_keeps_serving_during_and_after_10000_hostile_payloads(
        mosquitto, run_worker, repo, compiled):
    rw = run_worker(repo=repo, broker=broker_url(mosquitto))
    valid_req, _ = request_for(compiled["dynamic_batch"], 0, device="fuzz")
    valid = encode(valid_req)
    c = _paho(mosquitto, "fuzzer")
    stop = threading.Event()
    sent = [0]

    def fuzz() -> None:
        for payload in _mutations(valid, 10_000):
            if stop.is_set():
                return
            # half at QoS 1: the worker acknowledges those itself (when it starts or answers
            # a request, at once for what it refuses); one ack missed on any path would close
            # its Receive Maximum window and starve the valid requests below
            c.publish("tandem/v1/req/fuzz/dynamic_batch", payload, qos=sent[0] % 2)
            sent[0] += 1
            if sent[0] % 500 == 0:
                time.sleep(0.01)  # let the broker breathe: 10,000 in a few seconds

    thread = threading.Thread(target=fuzz)
    deadline = time.monotonic() + 120
    with client(mosquitto) as t:
        thread.start()
        ok = 0
        while thread.is_alive() and time.monotonic() < deadline:
            request, expected = request_for(compiled["dynamic_batch"], 0, seed=ok)
            # under the flood mosquitto may drop a message (its per-client queue is bounded):
            # the device contract is to retry by id
            response = request_with_retry(t, topic_for(request, "dynamic_batch"), request)
            np.testing.assert_allclose(response.outputs[0].to_array(), expected["y"],
                                       rtol=1e-5, atol=1e-5)
            ok += 1
        stop.set()
        thread.join(30)
        for i in range(5):  # and after
            request, _ = request_for(compiled["dynamic_batch"], 0, seed=1000 + i)
            assert t.request(topic_for(request, "dynamic_batch"), request, timeout_s=10).outputs
    c.loop_stop()
    c.disconnect()
    assert sent[0] == 10_000 and ok >= 1
    assert rw.worker.state == "serving"
    assert rw.worker.metrics.value("tandem_cloud_decode_errors_total") > 0


def test_a_bundle_dropped_into_the_repo_is_served_without_restart(
        mosquitto, run_worker, compiled, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["residual"], repo / "residual")
    rw = run_worker(repo=repo, broker=broker_url(mosquitto))
    request, expected = request_for(compiled["multi_io"], 0)
    with client(mosquitto) as t:
        with pytest.raises(NotFound):
            t.request(topic_for(request, "multi_io"), request)
        # the way a deployment drops one in: build aside, rename into place
        shutil.copytree(compiled["multi_io"], repo / ".incoming")
        os.rename(repo / ".incoming", repo / "multi_io")
        deadline = time.monotonic() + 20
        while True:
            try:
                response = t.request(topic_for(request, "multi_io"),
                                     request.__class__(**{**_fields(request),
                                                          "id": new_request_id()}))
                break
            except NotFound:
                assert time.monotonic() < deadline, "the new bundle was not picked up"
                time.sleep(0.1)
        np.testing.assert_allclose(response.outputs[0].to_array(),
                                   expected[response.outputs[0].name], rtol=1e-5, atol=1e-5)
        # and removed again: unknown once more
        shutil.rmtree(repo / "multi_io")
        deadline = time.monotonic() + 20
        while len(rw.worker.repo.entries) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(NotFound):
            t.request(topic_for(request, "multi_io"),
                      request.__class__(**{**_fields(request), "id": new_request_id()}))


def _fields(msg) -> dict:
    from dataclasses import fields

    return {f.name: getattr(msg, f.name) for f in fields(msg)}


def test_load_reports_are_retained_and_the_last_will_marks_offline(mosquitto, run_worker, repo,
                                                                  compiled):
    rw = run_worker(repo=repo, broker=broker_url(mosquitto), worker_id="loady")
    request, _ = request_for(compiled["residual"], 1)
    with client(mosquitto) as t:
        t.request(topic_for(request, "residual"), request)
    reports: list[CloudLoad] = []
    c = _paho(mosquitto, "planner")
    c.on_message = lambda cl, u, msg: reports.append(decode(msg.payload))
    c.subscribe("tandem/v1/cloud/+/load", qos=1)
    deadline = time.monotonic() + 10
    while not any(r.tail_ms for r in reports):
        assert time.monotonic() < deadline, reports
        time.sleep(0.05)
    report = next(r for r in reports if r.tail_ms)
    assert report.worker_id == "loady" and report.state == "online"
    (digest, cut, ms), = report.tail_ms
    assert cut == 1 and ms > 0 and digest == request.model_digest
    assert report.batch_size[0][2] >= 1
    rw.stop()  # a graceful stop publishes offline itself
    deadline = time.monotonic() + 10
    while reports[-1].state != "offline":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
