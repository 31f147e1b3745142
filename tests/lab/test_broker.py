"""The embedded MQTT 3.1.1 broker: Tandem's transport and the real cloud worker work through it
(shared subscriptions included), MQTT 3.1.1 semantics hold (retained, wills, sessions, QoS),
MQTT 5 is refused the way a 3.1.1 broker refuses it, and a hostile client only ever closes its
own connection."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tandem.lab import EmbeddedBroker, SyncBroker, topic_matches
from tandem.protocol import (
    InferenceRequest,
    InferenceResponse,
    MqttTransport,
    SyncTransport,
    Tensor,
    TransportConfig,
    new_request_id,
)
from tandem.protocol.errors import InvalidArgument, Unavailable
from tests._support.tcp import run

ROOT = Path(__file__).resolve().parents[2]


def _cfg(port: int, **kw) -> TransportConfig:
    return TransportConfig(port=port, protocol=311, **kw)


def _request(x: np.ndarray) -> InferenceRequest:
    return InferenceRequest(id=new_request_id(), device_id="cam-01", model_digest="0" * 64,
                            cut_id=0, budget_ms=10_000, tensors=(Tensor.from_array("x", x),))


async def _echo_handler(request, context):
    return InferenceResponse(id=request.id, outputs=request.tensors)


# -- topic filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flt", "topic", "match"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True), ("+", "a/b", False),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
    ("a/b", "a/b/", False), ("a/+/", "a/b/", True), ("a/b/c", "a/b", False),
])
def test_topic_matches(flt, topic, match):
    assert topic_matches(flt, topic) is match


# -- through Tandem's transport --------------------------------------------------------------------


def test_requests_through_a_shared_subscription_reach_every_member_once():
    async def scenario():
        async with EmbeddedBroker() as broker:
            counts = {"a": 0, "b": 0}

            def handler(name):
                async def handle(request, context):
                    counts[name] += 1
                    return InferenceResponse(id=request.id, outputs=request.tensors)
                return handle

            async with MqttTransport(_cfg(broker.port)) as w1, \
                    MqttTransport(_cfg(broker.port)) as w2, \
                    MqttTransport(_cfg(broker.port)) as device:
                await w1.serve("$share/g/tandem/v1/req/+/+", handler("a"))
                await w2.serve("$share/g/tandem/v1/req/+/+", handler("b"))
                rng = np.random.default_rng(0)
                xs = [rng.standard_normal(shape).astype(np.float32)
                      for shape in [(4,), (3, 160, 160), (1000,)] * 10]
                answers = await asyncio.gather(*(
                    device.request("tandem/v1/req/cam-01/m", _request(x)) for x in xs))
                stats = broker.stats()
        return xs, answers, counts, stats

    xs, answers, counts, stats = run(scenario())
    for x, answer in zip(xs, answers, strict=True):
        assert np.array_equal(answer.outputs[0].to_array(), x)
    assert counts["a"] + counts["b"] == 30 and counts["a"] >= 10 and counts["b"] >= 10
    assert stats.dropped == 0 and stats.malformed == 0


def test_mqtt5_is_refused_as_a_311_broker_refuses_it():
    async def scenario():
        async with EmbeddedBroker() as broker:
            with pytest.raises(Unavailable, match=r"0x84|protocol version"):
                async with MqttTransport(TransportConfig(port=broker.port, protocol=5)):
                    pass
            # and the broker goes on serving 3.1.1 clients
            async with MqttTransport(_cfg(broker.port)) as t:
                got = asyncio.get_running_loop().create_future()
                await t.subscribe("x/#", lambda m: got.done() or got.set_result(bytes(m.payload)))
                await t.publish("x/1", b"hi")
                return await asyncio.wait_for(got, 5)

    assert run(scenario()) == b"hi"


def test_the_real_cloud_worker_serves_through_it(tmp_path):
    """``tandem cloud serve --mqtt-version 311`` behind the embedded broker answers a device."""
    pytest.importorskip("onnxruntime", reason="the cpu extra is not installed")
    pytest.importorskip("aiohttp", reason="the cloud extra is not installed")
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples
    from tandem.protocol.bundle import load_bundle

    model = examples.cnn_chain()
    path = examples.save(model, tmp_path / "cnn.onnx")
    (tmp_path / "repo").mkdir()
    BundleFromOnnx(path, tmp_path / "repo" / "cnn", CompileOptions(targets=("onnxruntime",)))()
    with load_bundle(tmp_path / "repo" / "cnn") as b:
        digest = b.manifest.source_digest
    x = examples.random_inputs(model)["input"]
    with SyncBroker() as broker:
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--repo",
                 str(tmp_path / "repo"), "--broker", f"mqtt://127.0.0.1:{broker.port}",
                 "--mqtt-version", "311", "--worker-id", "w1"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "serving $share" not in log.read_text():
                assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            with SyncTransport(MqttTransport(_cfg(broker.port))) as device:
                request = InferenceRequest(
                    id=new_request_id(), device_id="cam-01", model_digest=digest, cut_id=0,
                    budget_ms=10_000, tensors=(Tensor.from_array("input", x),))
                response = device.request("tandem/v1/req/cam-01/cnn", request, timeout_s=30)
        finally:
            worker.terminate()
            worker.wait(30)
    import onnxruntime as ort

    (want,) = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(response.outputs[0].to_array(), want, rtol=1e-4, atol=1e-5)


# -- MQTT 3.1.1 semantics, with paho directly ------------------------------------------------------


def _paho(port: int, client_id: str = "", clean: bool = True, will=None,
          reconnect: bool = True):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                    protocol=paho.MQTTv311, reconnect_on_failure=reconnect)
    c.received = []
    c.subacks = []
    c.on_message = lambda cl, ud, msg: c.received.append((msg.topic, msg.payload, msg.retain))
    c.on_subscribe = lambda cl, ud, mid, codes, props: c.subacks.append(mid)
    if will:
        c.will_set(*will, qos=1, retain=False)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    return c


def _sub(c, topic_filter: str, qos: int = 1) -> None:
    """Subscribe and wait for the broker's SUBACK."""
    _, mid = c.subscribe(topic_filter, qos=qos)
    _wait(lambda: mid in c.subacks)


def _close(*clients) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


def _wait(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_retained_messages_reach_late_subscribers_and_an_empty_payload_clears_them():
    with SyncBroker() as broker:
        pub = _paho(broker.port)
        pub.publish("tandem/v1/cloud/w1/load", b"busy", qos=1, retain=True).wait_for_publish(5)
        sub = _paho(broker.port)
        _sub(sub, "tandem/v1/cloud/+/load")
        _wait(lambda: sub.received)
        assert sub.received == [("tandem/v1/cloud/w1/load", b"busy", True)]
        pub.publish("tandem/v1/cloud/w1/load", b"", qos=1, retain=True).wait_for_publish(5)
        _wait(lambda: len(sub.received) == 2)  # the clear is delivered live, not retained
        late = _paho(broker.port)
        _sub(late, "tandem/v1/cloud/+/load")
        # a live marker on the same filter: what was retained would have come before it
        late.publish("tandem/v1/cloud/marker/load", b"m", qos=1)
        _wait(lambda: late.received)
        assert broker.stats().retained == 0
        assert all(t != "tandem/v1/cloud/w1/load" for t, _, _ in late.received)
        _close(pub, sub, late)


def test_a_will_is_published_when_a_connection_dies_not_when_it_disconnects():
    with SyncBroker() as broker:
        watcher = _paho(broker.port)
        _sub(watcher, "status/#")
        polite = _paho(broker.port, will=("status/polite", b"offline"))
        _close(polite)
        rude = _paho(broker.port, will=("status/rude", b"offline"))
        rude.loop_stop()
        rude.socket().close()  # no DISCONNECT: the broker sees the connection end
        _wait(lambda: watcher.received)
        time.sleep(0.2)
        assert [t for t, _, _ in watcher.received] == ["status/rude"]
        _close(watcher)


def test_a_persistent_session_gets_what_arrived_while_it_was_away():
    with SyncBroker() as broker:
        sub = _paho(broker.port, client_id="worker-1", clean=False)
        _sub(sub, "jobs/#")
        _close(sub)
        pub = _paho(broker.port)
        for i in range(5):
            pub.publish(f"jobs/{i}", str(i).encode(), qos=1).wait_for_publish(5)
        pub.publish("jobs/q0", b"lost", qos=0).wait_for_publish(5)  # QoS 0 is not kept
        again = _paho(broker.port, client_id="worker-1", clean=False)
        _wait(lambda: len(again.received) >= 5)
        time.sleep(0.1)
        assert [p for _, p, _ in again.received] == [b"0", b"1", b"2", b"3", b"4"]
        # a clean session forgets the subscription
        _close(again)
        clean = _paho(broker.port, client_id="worker-1", clean=True)
        pub.publish("jobs/9", b"9", qos=1).wait_for_publish(5)
        time.sleep(0.2)
        assert clean.received == []
        _close(pub, clean)


def test_a_second_connection_with_the_same_id_takes_over():
    with SyncBroker() as broker:
        watcher = _paho(broker.port)
        _sub(watcher, "status/#")
        # (paho would reconnect the first and take the id back: a ping-pong, not this test)
        first = _paho(broker.port, client_id="cam-01", will=("status/cam-01", b"gone"),
                      reconnect=False)
        _wait(lambda: broker.stats().connections == 2)
        second = _paho(broker.port, client_id="cam-01")
        _wait(lambda: watcher.received)  # the first connection's will
        _wait(lambda: broker.stats().connections == 2)  # watcher and the second cam-01
        assert [t for t, _, _ in watcher.received] == ["status/cam-01"]
        assert second.is_connected()
        _close(watcher, first, second)


def test_credentials_when_users_are_set():
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    async def scenario():
        async with EmbeddedBroker(users={"cam-01": "secret"}) as broker:
            results = []
            for user, password in (("cam-01", "secret"), ("cam-01", "wrong"), (None, None)):
                c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
                if user:
                    c.username_pw_set(user, password)
                codes = []
                c.on_connect = lambda cl, ud, flags, rc, props, codes=codes: codes.append(rc)
                await asyncio.to_thread(c.connect, "127.0.0.1", broker.port)
                c.loop_start()
                while not codes:
                    await asyncio.sleep(0.01)
                _close(c)
                results.append(codes[0].is_failure)
            return results

    assert run(scenario()) == [False, True, True]


# -- hostile clients -------------------------------------------------------------------------------


def _connect_packet(client_id: bytes = b"raw", level: int = 4, flags: int = 0x02) -> bytes:
    body = struct.pack(">H", 4) + b"MQTT" + bytes([level, flags]) + struct.pack(">H", 60) + \
        struct.pack(">H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(_connect_packet())
    assert s.recv(4) == b"\x20\x02\x00\x00"
    return s


def _is_closed(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("packet", [
    b"\xf0\x00",  # reserved packet type 15
    b"\x30\xff\xff\xff\xff\x01",  # remaining length of 5 bytes
    b"\x30\x05\x00\x09abc",  # topic length beyond the packet
    b"\x32\x05\x00\x01a\x00\x00",  # packet id 0
    b"\x30\x04\x00\x02a#",  # wildcard in a topic name
    b"\x36\x05\x00\x01a\x00\x01",  # QoS 3
    b"\x80\x06\x00\x01\x00\x01a\x00",  # SUBSCRIBE with flags 0
    b"\x82\x02\x00\x01",  # SUBSCRIBE without a filter
    b"\x30\x05\x00\x03\xff\xfe\xfd",  # topic not UTF-8
    b"\x10\x00",  # a second CONNECT
])
def test_a_malformed_packet_closes_only_its_connection(packet):
    with SyncBroker() as broker:
        bystander = _paho(broker.port)
        _sub(bystander, "ok")
        s = _raw(broker.port)
        s.sendall(packet)
        assert _is_closed(s)
        s.close()
        bystander.publish("ok", b"still here")
        _wait(lambda: bystander.received)
        assert broker.stats().malformed == 1
        _close(bystander)


def test_a_packet_over_the_limit_is_refused_before_it_is_read():
    async def scenario():
        async with EmbeddedBroker(max_packet_bytes=1024) as broker:
            s = await asyncio.to_thread(_raw, broker.port)
            # announce 100 MB and send 10 bytes: the broker must not wait for (or allocate) it
            s.sendall(b"\x30" + bytes([0x80, 0x80, 0x80, 0x30]) + b"\x00\x01a" + b"x" * 7)
            closed = await asyncio.to_thread(_is_closed, s)
            s.close()
            return closed, broker.stats().malformed

    assert run(scenario()) == (True, 1)


def test_invalid_filters_get_a_failure_code_and_the_connection_stays():
    with SyncBroker() as broker:
        s = _raw(broker.port)
        filters = [b"a/#/b", b"a+", b"$share/g", b"$share//x", b"ok/+"]
        body = struct.pack(">H", 7)
        for f in filters:
            body += struct.pack(">H", len(f)) + f + b"\x01"
        s.sendall(bytes([0x82, len(body)]) + body)
        assert _is_closed(s)  # '$share/g' names no filter: a protocol error, as for mosquitto
        s.close()
        s = _raw(broker.port)
        body = struct.pack(">H", 8)
        for f in (b"a/#/b", b"a+", b"ok/+"):
            body += struct.pack(">H", len(f)) + f + b"\x01"
        s.sendall(bytes([0x82, len(body)]) + body)
        assert s.recv(7) == b"\x90\x05\x00\x08\x80\x80\x01"
        s.sendall(b"\xc0\x00")  # PINGREQ: still connected
        assert s.recv(2) == b"\xd0\x00"
        s.close()


def test_a_client_that_never_sends_connect_or_goes_quiet_is_closed():
    async def scenario():
        async with EmbeddedBroker() as broker:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            body = struct.pack(">H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack(">H", 1) + \
                struct.pack(">H", 1) + b"q"
            writer.write(bytes([0x10, len(body)]) + body)  # keep-alive 1 s
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
            t0 = time.monotonic()
            assert await reader.read() == b""  # closed after 1.5 x keep-alive of silence
            writer.close()
            return time.monotonic() - t0

    assert run(scenario()) >= 1.4


def test_a_slow_reader_costs_dropped_messages_not_memory():
    async def scenario():
        async with EmbeddedBroker(max_queued_bytes=1 << 20) as broker:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            writer.write(_connect_packet(b"slow"))
            await reader.readexactly(4)
            f = b"big"
            writer.write(bytes([0x82, 2 + 2 + len(f) + 1]) + b"\x00\x01" +
                         struct.pack(">H", len(f)) + f + b"\x00")
            await reader.readexactly(5)
            # ... and never reads again, while 64 MB are published to it
            async with MqttTransport(_cfg(broker.port)) as pub:
                blob = os.urandom(256 * 1024)
                for _ in range(256):
                    await pub.publish("big", blob, qos=0)
                await pub.publish("flush", b"", qos=1)
            stats = broker.stats()
            writer.transport.abort()
            return stats

    stats = run(scenario())
    assert stats.dropped > 0


def test_random_and_mutated_packets_never_stop_the_broker():
    rng = np.random.default_rng(0)
    valid = [
        b"\x30\x07\x00\x03a/bxy",  # PUBLISH QoS 0
        b"\x32\x09\x00\x03a/b\x00\x01xy",  # PUBLISH QoS 1
        b"\x82\x08\x00\x02\x00\x03a/#\x01",  # SUBSCRIBE
        b"\xa2\x07\x00\x03\x00\x03a/#",  # UNSUBSCRIBE
        b"\x40\x02\x00\x01",  # PUBACK
        b"\x62\x02\x00\x01",  # PUBREL
    ]
    with SyncBroker() as broker:
        bystander = _paho(broker.port)
        _sub(bystander, "alive")
        for i in range(300):
            if i % 2:
                packet = bytes(rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8))
            else:  # a valid packet with a few bytes changed, cut or grown
                packet = bytearray(valid[int(rng.integers(len(valid)))])
                for _ in range(int(rng.integers(1, 4))):
                    packet[int(rng.integers(len(packet)))] = int(rng.integers(256))
                packet = bytes(packet[: int(rng.integers(1, len(packet) + 1))]) + \
                    bytes(rng.integers(0, 256, int(rng.integers(0, 8)), dtype=np.uint8))
            s = _raw(broker.port)
            s.sendall(packet + b"\xc0\x00")  # then a PINGREQ
            s.close()
        bystander.publish("alive", b"yes")
        _wait(lambda: bystander.received)
        _wait(lambda: broker.stats().connections == 1)  # every hostile connection ended
        _close(bystander)


def test_bad_options_are_refused():
    with pytest.raises(InvalidArgument):
        EmbeddedBroker(port=-1)
    with pytest.raises(InvalidArgument):
        EmbeddedBroker(max_packet_bytes=0)
