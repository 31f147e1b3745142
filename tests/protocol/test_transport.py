"""The MQTT transport against a real mosquitto (no mocks of the broker): what is specific to
MQTT (properties on the wire, packets, chunking through a capped broker, auth, TLS, broker
restarts). The semantics every transport shares are in test_transport_contract.py.

Every wait is on an event with a timeout; every test is bounded by pytest-timeout.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tandem.protocol import codec
from tandem.protocol.errors import (
    DeadlineExceeded,
    HandlerFailed,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.tensors import Tensor
from tandem.protocol.transport import (
    CONTENT_TYPE,
    RequestContext,
    SyncTransport,
    TlsConfig,
    TransportConfig,
    topic_matches,
)
from tests._support.broker import mosquitto_passwd_binary

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

REQ = "tandem/v1/req/cam-01/model-a"
REQ_FILTER = "tandem/v1/req/+/+"
SLACK_S = 0.5  # scheduling slack on a loaded 2-core machine


def make_request(budget_ms: int = 3000, payload: np.ndarray | None = None) -> InferenceRequest:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) if payload is None else payload
    return InferenceRequest(
        id=new_request_id(), device_id="cam-01", model_digest="ab" * 32, cut_id=1,
        budget_ms=budget_ms, tensors=(Tensor.from_array("x", arr),),
    )


def echo(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
    arr = request.tensors[0].to_array()
    return InferenceResponse(id=request.id, outputs=(Tensor.from_array("y", arr * 2),),
                             worker_id="echo")


def config(broker, **kw) -> TransportConfig:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.5)
    kw.setdefault("connect_timeout_s", 5.0)
    return TransportConfig(host=broker.host, port=broker.port, **kw)


def Transport(cfg: TransportConfig) -> SyncTransport:
    """The blocking shell over an MQTT transport."""
    return SyncTransport(MqttTransport(cfg))


class RawClient:
    """A plain paho client for checking what is on the wire (test code may use paho)."""

    def __init__(self, broker, protocol=paho.MQTTv5) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.got = threading.Event()
        self._connected = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.c.on_connect = lambda *a: self._connected.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self._connected.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        self.messages.append(msg)
        self.got.set()

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic_filter, 1)
        assert done.wait(5)

    def publish(self, topic: str, payload: bytes, **kw) -> None:
        self.c.publish(topic, payload, 1, **kw).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# -- the broker fixture itself ----------------------------------------------------------------


def test_broker_restarts_on_the_same_port(mosquitto):
    port, pid = mosquitto.port, mosquitto.pid
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.running and mosquitto.port == port and mosquitto.pid != pid


# -- request / response -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [5, 311])
def test_request_response(mosquitto, protocol):
    with Transport(config(mosquitto, protocol=protocol)) as server, \
            Transport(config(mosquitto, protocol=protocol)) as client:
        server.serve(REQ_FILTER, echo)
        for _ in range(3):
            req = make_request()
            resp = client.request(REQ, req, timeout_s=5)
            assert resp.id == req.id and resp.worker_id == "echo"
            np.testing.assert_array_equal(resp.outputs[0].to_array(),
                                          req.tensors[0].to_array() * 2)


def test_async_request_response_with_async_handler(mosquitto):
    async def handler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        await asyncio.sleep(0)
        return echo(request, ctx)

    async def main() -> None:
        async with MqttTransport(config(mosquitto)) as server, \
                MqttTransport(config(mosquitto)) as client:
            await server.serve(REQ_FILTER, handler)
            reqs = [make_request() for _ in range(20)]
            resps = await asyncio.gather(*(client.request(REQ, r, timeout_s=5) for r in reqs))
            assert [r.id for r in resps] == [r.id for r in reqs]

    asyncio.run(main())


def test_error_responses_raise_typed_errors(mosquitto):
    def handler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        if request.cut_id == 1:
            raise NotFound("no such model")
        raise RuntimeError("boom")

    with Transport(config(mosquitto)) as server, Transport(config(mosquitto)) as client:
        server.serve(REQ_FILTER, handler)
        with pytest.raises(NotFound, match="no such model"):
            client.request(REQ, make_request(), timeout_s=5)
        req = make_request()
        other = InferenceRequest(id=req.id, device_id=req.device_id, model_digest="x",
                                 cut_id=2, budget_ms=3000, tensors=())
        with pytest.raises(HandlerFailed, match="boom"):
            client.request(REQ, other, timeout_s=5)


def test_mqtt5_properties_on_the_wire(mosquitto):
    raw = RawClient(mosquitto)
    try:
        raw.subscribe(REQ_FILTER)
        with Transport(config(mosquitto)) as client:
            req = make_request(budget_ms=2500)
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.request(REQ, req, timeout_s=0.5)  # nobody answers
            assert time.monotonic() - t0 < 0.5 + SLACK_S
        assert raw.got.wait(5)
        msg = raw.messages[0]
        props = msg.properties
        assert props.ResponseTopic == "tandem/v1/resp/cam-01"
        assert props.CorrelationData == req.id
        # the broker forwards the remaining lifetime: ceil(2.5 s) = 3, maybe 2 a second later
        assert props.MessageExpiryInterval in (math.ceil(2500 / 1000), math.ceil(2500 / 1000) - 1)
        assert props.ContentType == CONTENT_TYPE == "application/x-tandem+msgpack"
        decoded = codec.decode(msg.payload)
        assert decoded.id == req.id and decoded.reply_topic == "tandem/v1/resp/cam-01"
    finally:
        raw.close()


def test_serve_replies_with_correlation_data_to_the_response_topic(mosquitto):
    raw = RawClient(mosquitto)
    try:
        raw.subscribe("tandem/v1/resp/cam-01")
        with Transport(config(mosquitto)) as server:
            server.serve(REQ_FILTER, echo)
            req = make_request()
            props = paho.Properties(paho.PacketTypes.PUBLISH)
            props.ResponseTopic = "tandem/v1/resp/cam-01"  # the only one a server answers on
            props.CorrelationData = b"corr-123"
            # reply_topic left empty in the payload: the ResponseTopic property is used
            raw.publish(REQ, codec.encode(req), properties=props)
            assert raw.got.wait(5)
        msg = raw.messages[0]
        assert msg.properties.CorrelationData == b"corr-123"
        resp = codec.decode(msg.payload)
        assert isinstance(resp, InferenceResponse) and resp.id == req.id and resp.ok
    finally:
        raw.close()


# -- chunking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [5, 311])
def test_5mb_through_a_1mb_broker_is_chunked_and_bit_exact(mosquitto_factory, protocol):
    broker = mosquitto_factory(max_packet_size=1 << 20)
    payload = os.urandom(5 * 1024 * 1024)
    with Transport(config(broker, protocol=protocol)) as sub, \
            Transport(config(broker, protocol=protocol)) as pub:
        got = threading.Event()
        received: list[bytes] = []
        sub.subscribe("bulk/data", lambda m: (received.append(m.payload), got.set()))
        assert pub.chunk_size() < 1 << 20
        pub.publish("bulk/data", payload)
        assert got.wait(20), "reassembled payload never arrived"
        assert len(received) == 1 and received[0] == payload

    # the premise: this broker really drops a single packet over 1 MB
    raw = RawClient(broker)
    try:
        lost = threading.Event()
        raw.c.on_disconnect = lambda *a: lost.set()
        raw.c.publish("bulk/data", os.urandom(2 * 1024 * 1024), 1)
        assert lost.wait(5)
    finally:
        raw.close()


def test_large_request_response_round_trip(mosquitto_factory):
    broker = mosquitto_factory(max_packet_size=1 << 20)
    arr = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)  # 4 MiB
    with Transport(config(broker)) as server, Transport(config(broker)) as client:
        server.serve(REQ_FILTER, echo)
        resp = client.request(REQ, make_request(payload=arr), timeout_s=20)
        np.testing.assert_array_equal(resp.outputs[0].to_array(), arr * 2)


# -- failures -----------------------------------------------------------------------------------


def test_timeout_without_responder_raises_deadline_exceeded(mosquitto):
    with Transport(config(mosquitto)) as client:
        for timeout in (0.3, 0.8):
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.request(REQ, make_request(), timeout_s=timeout)
            elapsed = time.monotonic() - t0
            assert timeout - 0.05 <= elapsed <= timeout + SLACK_S


def test_budget_is_the_default_timeout(mosquitto):
    with Transport(config(mosquitto)) as client:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.request(REQ, make_request(budget_ms=400))
        assert 0.35 <= time.monotonic() - t0 <= 0.4 + SLACK_S


def test_malformed_payloads_do_not_kill_server_or_client(mosquitto):
    raw = RawClient(mosquitto)
    try:
        with Transport(config(mosquitto)) as server, Transport(config(mosquitto)) as client:
            server.serve(REQ_FILTER, echo)
            assert client.request(REQ, make_request(), timeout_s=5).ok
            for junk in (b"", b"\x00garbage", b"\xc1" * 100, os.urandom(4096),
                         codec.encode(InferenceResponse(id=b"\x01" * 16))):
                raw.publish(REQ, junk)
                raw.publish("tandem/v1/resp/cam-01", junk)  # the client's reply topic
            # duplicate and late responses for ids nobody waits for
            raw.publish("tandem/v1/resp/cam-01",
                        codec.encode(InferenceResponse(id=new_request_id())))
            for _ in range(3):
                req = make_request()
                assert client.request(REQ, req, timeout_s=5).id == req.id
    finally:
        raw.close()


def test_duplicate_responses_are_ignored(mosquitto):
    raw = RawClient(mosquitto)
    try:
        raw.c.subscribe(REQ_FILTER, 1)

        def reply_twice(client, userdata, msg):
            req = codec.decode(msg.payload)
            resp = codec.encode(InferenceResponse(id=req.id, worker_id="raw"))
            client.publish(req.reply_topic, resp, 1)
            client.publish(req.reply_topic, resp, 1)

        raw.c.on_message = reply_twice
        with Transport(config(mosquitto)) as client:
            for _ in range(5):
                req = make_request()
                assert client.request(REQ, req, timeout_s=5).id == req.id
    finally:
        raw.close()


def test_publish_while_disconnected_raises_unavailable_fast(mosquitto):
    with Transport(config(mosquitto, reconnect_min_s=5.0, reconnect_max_s=5.0)) as client:
        lost = threading.Event()
        client.add_connection_listener(lambda up: None if up else lost.set())
        mosquitto.kill()
        assert lost.wait(5)
        assert not client.connected
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            client.publish("a/b", b"x")
        assert info.value.retryable
        with pytest.raises(Unavailable):
            client.request(REQ, make_request(), timeout_s=3)
        assert time.monotonic() - t0 < 0.5


def test_connect_to_nothing_raises_unavailable(mosquitto_factory):
    broker = mosquitto_factory(start=False)  # a free port nobody listens on
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        Transport(config(broker)).connect()
    assert time.monotonic() - t0 < 5


def test_broker_restart_mid_stream(mosquitto):
    timeout = 2.0

    async def main() -> None:
        async with MqttTransport(config(mosquitto)) as server, \
                MqttTransport(config(mosquitto)) as client:
            await server.serve(REQ_FILTER, echo)
            outcomes: list[tuple[str, float]] = []
            stop = asyncio.Event()
            first_ok = asyncio.Event()

            async def stream() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        await client.request(REQ, make_request(), timeout_s=timeout)
                        outcomes.append(("ok", time.monotonic() - t0))
                        first_ok.set()
                    except Unavailable:
                        outcomes.append(("unavailable", time.monotonic() - t0))
                        await asyncio.sleep(0.01)  # the stream's pacing while the broker is gone
                    except DeadlineExceeded:
                        outcomes.append(("deadline", time.monotonic() - t0))

            workers = [asyncio.create_task(stream()) for _ in range(4)]
            await asyncio.wait_for(first_ok.wait(), 5)
            await asyncio.get_running_loop().run_in_executor(None, mosquitto.kill)
            n_before_restart = len(outcomes)
            await asyncio.sleep(0.3)  # broker down for a while, requests keep coming
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout + SLACK_S)

            kinds = {k for k, _ in outcomes}
            assert "unavailable" in kinds, outcomes[-10:]
            assert kinds <= {"ok", "unavailable"}, outcomes
            assert max(e for _, e in outcomes) <= timeout + SLACK_S
            assert n_before_restart > 0

            await asyncio.get_running_loop().run_in_executor(None, mosquitto.start)
            # both sides reconnect and re-subscribe by themselves (fresh broker: no session)
            await client.wait_connected(10)
            await server.wait_connected(10)
            for _ in range(5):
                req = make_request()
                assert (await client.request(REQ, req, timeout_s=timeout)).id == req.id

    asyncio.run(main())


def test_pending_requests_fail_fast_when_the_connection_drops(mosquitto):
    async def main() -> None:
        async with MqttTransport(config(mosquitto)) as client:
            t0 = time.monotonic()
            tasks = [asyncio.create_task(client.request(REQ, make_request(), timeout_s=5))
                     for _ in range(3)]
            await asyncio.sleep(0.1)  # let them be published; nobody answers
            await asyncio.get_running_loop().run_in_executor(None, mosquitto.kill)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, Unavailable) and r.retryable for r in results), results
            assert time.monotonic() - t0 < 2.0  # well before the 5 s timeout

    asyncio.run(main())


# -- auth and TLS -------------------------------------------------------------------------------


@pytest.mark.skipif(mosquitto_passwd_binary() is None, reason="mosquitto_passwd not installed")
@pytest.mark.parametrize("protocol", [5, 311])
def test_username_password(mosquitto_factory, protocol):
    broker = mosquitto_factory(users={"alice": "s3cret"})
    with Transport(config(broker, protocol=protocol, username="alice", password="s3cret")) as t:
        assert t.connected
    for user, pw in (("alice", "wrong"), ("mallory", "s3cret")):
        t0 = time.monotonic()
        with pytest.raises(PermissionDenied):
            Transport(config(broker, protocol=protocol, username=user, password=pw)).connect()
        assert time.monotonic() - t0 < 5
    with pytest.raises(PermissionDenied):  # anonymous is off
        Transport(config(broker, protocol=protocol)).connect()


def test_tls(mosquitto_factory, tmp_path):
    broker = mosquitto_factory(tls=True)
    files = broker.tls_files
    tls_cfg = dict(host=broker.host, port=broker.tls_port)
    with Transport(TransportConfig(**tls_cfg, tls=TlsConfig(ca_file=str(files.ca_file)))) as a, \
            Transport(TransportConfig(**tls_cfg, tls=TlsConfig(ca_file=str(files.ca_file)))) as b:
        a.serve(REQ_FILTER, echo)
        assert b.request(REQ, make_request(), timeout_s=5).ok
    # a client that does not trust the broker's CA is refused with a typed error
    from tests._support.broker import make_tls_files

    other = make_tls_files(tmp_path / "other-ca")
    with pytest.raises(PermissionDenied):
        Transport(TransportConfig(**tls_cfg, tls=TlsConfig(ca_file=str(other.ca_file)))).connect()


# -- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(("flt", "topic", "expected"), [
    ("a/b", "a/b", True),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("+/+/req/+", "x/y/req/z", True),
    ("$share/g/tandem/v1/req/+/+", "tandem/v1/req/cam/m", True),
    ("#", "$SYS/broker", False),
    ("a/b", "a/c", False),
])
def test_topic_matches(flt, topic, expected):
    assert topic_matches(flt, topic) is expected


# -- fast paths ---------------------------------------------------------------------------------


def _publish_packet(topic: bytes, mid: int, props: bytes, payload: bytes) -> bytearray:
    """The variable header + payload of an MQTT 5 QoS 1 PUBLISH (what paho hands a decoder)."""
    assert len(props) < 128
    return bytearray(len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")
                     + bytes([len(props)]) + props + payload)


def test_our_publish_decoder_agrees_with_paho():
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion

    from tandem.protocol.mqtt._wire import _decode_publish_v5

    def s16(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    props = (b"\x01\x00" + b"\x02\x00\x00\x00\x07" + b"\x03" + s16(b"application/x")
             + b"\x08" + s16(b"reply/here") + b"\x09" + s16(b"\x00corr\xff")
             + b"\x26" + s16(b"k") + s16(b"v") + b"\x0b\x81\x01")
    for payload in (b"", b"abc", os.urandom(70_000)):
        packet = _publish_packet(b"a/b", 7, props, payload)
        topic, mid, ours, data = _decode_publish_v5(packet, 1)
        theirs = _packet.decode_publish(0x32, bytes(packet), MQTTProtocolVersion.MQTTv5)
        assert (topic, mid, data) == (theirs.topic, theirs.mid, theirs.payload)
        for name in ("ContentType", "ResponseTopic", "CorrelationData",
                     "MessageExpiryInterval"):
            assert getattr(ours, name) == getattr(theirs.properties, name)
    no_props = _publish_packet(b"t", 1, b"", b"xyz")
    _topic, _mid, ours, data = _decode_publish_v5(no_props, 1)
    assert data == b"xyz" and ours.ResponseTopic is None and ours.CorrelationData is None
    for bad in (_publish_packet(b"t", 1, b"\x7f\x00", b""),  # not a PUBLISH property
                _publish_packet(b"t", 1, b"\x08\x00\x09ab", b""),  # string past the end
                bytearray(b"\x00\x09ab")):  # topic past the end
        with pytest.raises((ValueError, IndexError, struct.error)):
            _decode_publish_v5(bad, 1)


@pytest.mark.parametrize("protocol", [5, 311])
def test_default_chunk_size_by_protocol(mosquitto, protocol):
    with Transport(config(mosquitto, protocol=protocol)) as t:
        size = t.chunk_size()
    if protocol == 5:  # mosquitto announces no Maximum Packet Size here: 1 MB is one PUBLISH
        assert size == 16 * 1024 * 1024
    else:  # 3.1.1 cannot learn the broker's cap: stay under a 1 MB one (EMQX's default)
        assert 1 << 19 < size < 1 << 20


def test_sync_fast_path_fails_fast_when_the_connection_drops(mosquitto):
    with Transport(config(mosquitto)) as server, Transport(config(mosquitto)) as client:
        server.serve(REQ_FILTER, echo)
        assert client.request(REQ, make_request(), timeout_s=5).ok  # reply topic subscribed
        errors: list[BaseException] = []

        def silent_request() -> None:
            try:
                client.request("nobody/answers", make_request(), timeout_s=5)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=silent_request)
        t0 = time.monotonic()
        worker.start()
        time.sleep(0.2)
        mosquitto.kill()
        worker.join(5)
        assert len(errors) == 1 and isinstance(errors[0], Unavailable), errors
        assert errors[0].retryable and time.monotonic() - t0 < 2.0
        with pytest.raises(Unavailable):  # still down: refused at once, not after 3 s
            client.request(REQ, make_request(), timeout_s=3)
        assert time.monotonic() - t0 < 2.5


def test_handlers_that_suspend_and_handlers_cancelled_on_close(mosquitto):
    never = threading.Event()

    async def handler(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        if request.cut_id == 2:  # suspends forever: cancelled by close()
            while not never.is_set():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        if request.cut_id == 3:
            raise NotFound("after a suspension")
        return echo(request, ctx)

    async def main() -> None:
        server = MqttTransport(config(mosquitto))
        await server.connect()
        async with MqttTransport(config(mosquitto)) as client:
            await server.serve(REQ_FILTER, handler)
            assert (await client.request(REQ, make_request(), timeout_s=5)).ok
            req = make_request()
            with pytest.raises(NotFound, match="after a suspension"):
                await client.request(REQ, InferenceRequest(
                    id=req.id, device_id=req.device_id, model_digest="x", cut_id=3,
                    budget_ms=3000, tensors=()), timeout_s=5)
            with pytest.raises(DeadlineExceeded):
                await client.request(REQ, InferenceRequest(
                    id=new_request_id(), device_id=req.device_id, model_digest="x", cut_id=2,
                    budget_ms=3000, tensors=()), timeout_s=0.3)
            assert server.stats().serving[REQ_FILTER].running == 1  # the stuck handler ...
            t0 = time.monotonic()
            await server.close()  # ... and close() cancels it
            assert server.stats().serving[REQ_FILTER].running == 0
            assert time.monotonic() - t0 < 3

    asyncio.run(main())


# -- zero-copy packets: frames built in place, received packets viewed, pooled buffers ----------


class _Capture:
    """A paho client (ours or stock) whose queued packets are captured instead of written."""

    @staticmethod
    def make(cls: type, protocol: int):
        class C(cls):  # type: ignore[misc, valid-type]
            def _packet_queue(self, command, packet, mid, qos, info=None):
                self.queued = bytes(packet)
                return 0

        c = C(CallbackAPIVersion.VERSION2, protocol=protocol)
        c._sock = _Capture  # "connected": _send_publish only checks that a socket exists
        return c

    @staticmethod
    def close() -> None:  # paho closes its "socket" when the client is collected
        pass


@pytest.mark.parametrize("protocol", [5, 311])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", [0, 100, 70_000])
def test_frame_is_byte_for_byte_the_packet_paho_builds(protocol, qos, size):
    from tandem.protocol.errors import InvalidArgument as InvalidArgumentError
    from tandem.protocol.mqtt._client import PublishProperties
    from tandem.protocol.mqtt._wire import (
        Frame,
        _build_frame,
        _PackedProperties,
        _PahoClient,
    )

    v5 = protocol == 5
    pv = paho.MQTTv5 if v5 else paho.MQTTv311
    payload = os.urandom(size)
    parts = [payload[:7], memoryview(payload)[7:size // 2], payload[size // 2:]]
    for props in (None, PublishProperties(response_topic="r/t", correlation_data=b"\x01" * 16,
                                          message_expiry_s=3)):
        frame = _build_frame("a/b/c", parts, size, qos, props, v5)
        assert type(frame) is Frame and bytes(frame.payload()) == payload
        for retain, dup in ((False, False), (True, True)):
            ours = _Capture.make(_PahoClient, pv)
            ours._send_publish(9, b"a/b/c", frame, qos, retain, dup)
            theirs = _Capture.make(paho.Client, pv)
            packed = _PackedProperties(props) if v5 and props else None
            theirs._send_publish(9, b"a/b/c", payload, qos, retain, dup, None, packed)
            assert ours.queued == theirs.queued
    with pytest.raises(InvalidArgumentError):
        _build_frame("t", [b"abc"], 4, 1, None, v5)  # parts shorter than announced


def test_buffer_pool_reuses_a_buffer_only_once_nothing_views_it():
    from tandem.protocol.mqtt._wire import Frame, _BufferPool

    n = 100_000
    pool = _BufferPool(max_buffers=2, max_bytes=250_000)
    a = pool.take(bytearray, n)
    id_a = id(a)
    view = memoryview(a)[10:]
    arr = np.frombuffer(a, dtype=np.uint8)
    del a
    b = pool.take(bytearray, n)
    assert id(b) != id_a  # a is still viewed
    id_b = id(b)
    del b
    c = pool.take(bytearray, n)
    assert id(c) == id_b  # b is free again
    del view
    d = pool.take(bytearray, n)
    assert id(d) != id_a  # the array still holds a
    del arr
    assert type(pool.take(Frame, n)) is Frame  # another type: never a bytearray of the pool
    assert len(pool._bufs) <= 2 and sum(map(len, pool._bufs)) <= 250_000
    assert pool.take(bytearray, 1000) not in pool._bufs  # small buffers are not pooled
    assert pool.take(bytearray, 300_000) not in pool._bufs  # nor ones over max_bytes
    del c, d


def test_received_tensors_keep_their_bytes_while_later_packets_arrive(mosquitto):
    """Big payloads are decoded in place (RAW tensors view the packet buffer) and buffers are
    reused for later packets of the same size: a response the caller keeps must not change."""
    def tag(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        arr = request.tensors[0].to_array()
        return InferenceResponse(id=request.id, outputs=(Tensor.from_array("y", arr + 1),))

    got: list[bytes] = []
    with Transport(config(mosquitto)) as server, Transport(config(mosquitto)) as client:
        server.serve(REQ_FILTER, tag)
        server.subscribe("bulk/#", lambda m: got.append(m.payload))
        kept = []
        for i in range(6):
            arr = np.full(256 * 1024, i, dtype=np.float32)  # 1 MiB: one PUBLISH, a view
            resp = client.request(REQ, make_request(payload=arr), timeout_s=10)
            kept.append(resp.outputs[0])
        for i, t in enumerate(kept):
            np.testing.assert_array_equal(t.to_array(), np.full(256 * 1024, i + 1, np.float32))
        kept.clear()
        for _ in range(3):  # and again once nothing holds the buffers any more
            resp = client.request(REQ, make_request(payload=np.full(256 * 1024, 7.0, np.float32)),
                                  timeout_s=10)
            assert float(resp.outputs[0].to_array()[-1]) == 8.0
        payload = os.urandom(200_000)
        client.publish("bulk/x", payload)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [payload] and type(got[0]) is bytes  # subscribers' handlers get bytes


@pytest.mark.parametrize("protocol", [5, 311])
def test_stock_paho_client_fallback_behaves_the_same(mosquitto_factory, monkeypatch, protocol):
    # On a paho release the fast path was not tested with, the stock client is used: requests,
    # big payloads and chunking through a 1 MB-capped broker must work the same way.
    from tandem.protocol.mqtt import _client as _mqtt

    monkeypatch.setattr(_mqtt, "_FAST_PUBLISH", False)
    broker = mosquitto_factory(max_packet_size=1 << 20)
    big = np.random.default_rng(7).standard_normal(5 * 2**20 // 4).astype(np.float32)
    with Transport(config(broker, protocol=protocol)) as server, \
            Transport(config(broker, protocol=protocol)) as client:
        assert type(client.transport._mqtt._client) is paho.Client
        server.serve(REQ_FILTER, echo)
        small = make_request()
        assert client.request(REQ, small, timeout_s=5).id == small.id
        req = make_request(budget_ms=20_000, payload=big)
        resp = client.request(REQ, req, timeout_s=20)
        np.testing.assert_array_equal(resp.outputs[0].to_array(), big * 2)


def test_a_frozen_broker_never_hangs_a_request_past_its_timeout(mosquitto):
    # The broker keeps the TCP connection open but stops answering (SIGSTOP): nothing tells
    # the client the connection is dead, yet every request ends by its timeout.
    import signal

    with Transport(config(mosquitto)) as server, Transport(config(mosquitto)) as client:
        server.serve(REQ_FILTER, echo)
        assert client.request(REQ, make_request(), timeout_s=5).worker_id == "echo"
        os.kill(mosquitto.pid, signal.SIGSTOP)
        try:
            for timeout in (0.5, 1.0):
                t0 = time.monotonic()
                with pytest.raises((DeadlineExceeded, Unavailable)):
                    client.request(REQ, make_request(), timeout_s=timeout)
                assert time.monotonic() - t0 <= timeout + SLACK_S
        finally:
            os.kill(mosquitto.pid, signal.SIGCONT)
        # once the broker runs again, requests succeed (on this or a re-established connection)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.request(REQ, make_request(), timeout_s=2).worker_id == "echo"
                break
            except (DeadlineExceeded, Unavailable):
                assert time.monotonic() < deadline, "no answer 20 s after the broker resumed"


def test_a_long_stream_leaves_nothing_behind(mosquitto):
    # 1,000 requests (a tenth of them timing out because the server drops them): afterwards
    # no pending request, no held message, no half-reassembled chunk set on either side
    seen = 0

    def flaky(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse | None:
        nonlocal seen
        seen += 1
        if seen % 10 == 0:
            raise DeadlineExceeded("dropped on purpose")  # answered as an error
        return echo(request, ctx)

    with Transport(config(mosquitto)) as server, Transport(config(mosquitto)) as client:
        server.serve(REQ_FILTER, flaky)
        ok = failed = 0
        for _ in range(1000):
            try:
                client.request(REQ, make_request(), timeout_s=5)
                ok += 1
            except DeadlineExceeded:
                failed += 1
        assert (ok, failed) == (900, 100)
        for t in (client, server):
            deadline = time.monotonic() + 5
            while t.stats().unacked_publishes and time.monotonic() < deadline:
                time.sleep(0.01)  # the last PUBACKs may still be on their way
            stats = t.stats()
            assert stats.pending_requests == 0 and stats.unclaimed_messages == 0
            assert stats.reassembly_sets == 0 and stats.reassembly_bytes == 0
            assert stats.unacked_publishes == 0  # every QoS 1 publish got its PUBACK
            assert not t.transport._mqtt._client._in_messages  # paho holds nothing received
        serving = server.stats().serving[REQ_FILTER]
        assert serving.answered == 1000 and serving.queued == serving.running == 0
        assert serving.held_bytes == 0


# -- acknowledgements, MQTT 3.1.1 answers, Nagle -----------------------------------------------


def test_a_publish_handle_waits_for_the_puback_and_fails_when_the_link_drops_first(mosquitto):
    import signal

    with Transport(config(mosquitto)) as client:
        client.publish("a/b", b"x", qos=1).wait(5)  # acknowledged
        os.kill(mosquitto.pid, signal.SIGSTOP)  # the broker stops answering
        try:
            handle = client.publish("a/b", b"y", qos=1)
            with pytest.raises(DeadlineExceeded):
                handle.wait(0.3)  # no PUBACK
            assert not handle.done()
        except BaseException:
            os.kill(mosquitto.pid, signal.SIGCONT)
            raise
        mosquitto.kill()  # still stopped: it never answers that publish
        with pytest.raises(Unavailable, match="before the broker acknowledged"):
            handle.wait(5)


def test_mqtt311_answers_a_request_that_does_not_decode_by_the_id_in_its_envelope(mosquitto):
    # no properties on 3.1.1: the request id comes from the frame's envelope (codec.peek)
    req = InferenceRequest(id=new_request_id(), device_id="cam-01", model_digest="ab" * 32,
                           cut_id=1, budget_ms=3000,
                           tensors=(Tensor.from_array("m", np.array([True, False])),))
    frame = bytearray(codec.encode(req))
    frame[-1] = 2  # a bool byte of 2: the envelope is fine, the tensor is not
    raw = RawClient(mosquitto, protocol=paho.MQTTv311)
    try:
        raw.subscribe("tandem/v1/resp/cam-01")
        with Transport(config(mosquitto, protocol=311)) as server:
            server.serve(REQ_FILTER, echo)
            raw.publish(REQ, bytes(frame))
            assert raw.got.wait(5)
        answer = codec.decode(raw.messages[0].payload)
        assert answer.id == req.id and answer.error.code == 1  # INVALID_ARGUMENT
    finally:
        raw.close()


@pytest.mark.parametrize("nodelay", [False, True], ids=["nagle", "nodelay"])
def test_round_trips_that_look_like_nagle_are_reported_once(mosquitto_factory, caplog, nodelay):
    # a broker without set_tcp_nodelay: Nagle + delayed ACK make a small round trip ~40 ms
    broker = mosquitto_factory(tcp_nodelay=nodelay)

    async def fast(request: InferenceRequest, ctx: RequestContext) -> InferenceResponse:
        return InferenceResponse(id=request.id)

    with caplog.at_level("WARNING", logger="tandem.protocol.transport"), \
            Transport(config(broker)) as server, Transport(config(broker)) as client:
        server.serve(REQ_FILTER, fast)
        for _ in range(24):
            client.request(REQ, make_request(), timeout_s=5)
    warnings = [r.getMessage() for r in caplog.records if "Nagle" in r.getMessage()]
    if nodelay:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "set_tcp_nodelay true" in warnings[0], warnings
