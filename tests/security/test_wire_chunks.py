"""Chunk attacks replayed: cross-device injection through a real mosquitto, tiny chunks that cost
more than they are charged (peak RSS of a process filling the limit), cheap eviction."""

from __future__ import annotations

import os
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from tandem.protocol import topics
from tandem.protocol.chunking import Reassembler, split
from tandem.protocol.codec import decode, encode
from tandem.protocol.messages import InferenceRequest
from tandem.protocol.tensors import Tensor
from tests.security.test_wire_bombs import measure

MiB = 1 << 20


def test_filling_the_limit_with_one_byte_chunks_stays_under_the_limit_in_rss():
    limit = 16 * MiB
    setup = f"""
        import os
        from tandem.protocol._codec import encode_chunk
        from tandem.protocol.chunking import CHUNK_COST, Reassembler
        r = Reassembler(max_total_bytes={limit}, max_bytes_per_origin={limit},
                        max_pending_sets=64, max_sets_per_origin=64)
    """
    attack = f"""
        # sets of one-byte chunks, never completed, from one sender: each a third of the limit,
        # five of them (the sender's quota drops its own oldest to stay under the limit)
        n = {limit} // 3 // (1 + CHUNK_COST)
        for _ in range(5):
            mid = os.urandom(16)
            for i in range(n - 1):
                r.feed(encode_chunk(mid, i, n, n, i, b"x"), origin="tandem/v1/req/evil/m")
        assert r.pending_bytes <= {limit}
        assert r.pending_bytes > {limit} * 0.6 and r.evicted >= 2, r.pending_bytes
    """
    result = measure(setup, attack)
    assert result["error"] is None, result
    assert result["peak_growth"] <= limit, (
        f"{result['peak_growth'] / MiB:.1f} MiB of RSS for a {limit / MiB:.0f} MiB limit")


def _request_frame(device: str, fill: float) -> tuple[InferenceRequest, bytes]:
    arr = np.full(64 * 1024, fill, np.float32)  # 256 KiB: several chunks at 64 KiB
    msg = InferenceRequest(b"\x07" * 16, device, "m", 1, 5000, (Tensor.from_array("x", arr),))
    return msg, encode(msg)


@pytest.mark.broker
def test_chunks_injected_from_another_device_never_join_its_set(mosquitto):
    """The attacker publishes, on its own request topic, chunks carrying the victim's set id
    (here: the request id, as the transport uses it), interleaved with the victim's chunks. The
    receiver keys sets by the topic they arrived on: the victim's request arrives intact."""
    victim_msg, victim_frame = _request_frame("cam-01", 1.0)
    _, evil_frame = _request_frame("evil", -666.0)
    victim_parts = split(victim_frame, 64 * 1024, victim_msg.id)
    evil_parts = split(evil_frame, 64 * 1024, victim_msg.id)  # the same set id
    assert len(victim_parts) == len(evil_parts) > 2

    reassembler = Reassembler()
    got: list[tuple[str, InferenceRequest]] = []
    done = threading.Event()

    def on_message(client, userdata, msg):  # paho's thread: the only feeder
        frame = reassembler.feed(msg.payload, origin=msg.topic)
        if frame is not None:
            got.append((msg.topic, decode(frame)))
            if len(got) == 2:
                done.set()

    clients = []
    for name in ("server", "cam-01", "evil"):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{name}",
                        protocol=mqtt.MQTTv5)
        c.connect("127.0.0.1", mosquitto.port)
        c.loop_start()
        clients.append(c)
    server, victim, evil = clients
    try:
        server.on_message = on_message
        subscribed = threading.Event()
        server.on_subscribe = lambda *a, **k: subscribed.set()
        server.subscribe(topics.request_filter(), qos=1)
        assert subscribed.wait(5)
        victim_topic = topics.request_topic("cam-01", "m")
        evil_topic = topics.request_topic("evil", "m")
        infos = []
        for v, e in zip(victim_parts, evil_parts, strict=True):  # evil's chunk first each time
            infos.append(evil.publish(evil_topic, e, qos=1))
            infos.append(victim.publish(victim_topic, v, qos=1))
        for info in infos:
            info.wait_for_publish(5)
        assert done.wait(10), f"only {len(got)} messages reassembled"
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
    by_topic = dict(got)
    arrived = by_topic[victim_topic]
    assert arrived.device_id == "cam-01"
    np.testing.assert_array_equal(arrived.tensors[0].to_array(), 1.0)
    assert by_topic[evil_topic].device_id == "evil"  # the attacker only got its own set
    assert reassembler.pending_sets == 0


def test_cheap_eviction_is_gone():
    """64 one-byte chunk sets from one sender used to evict any set in progress."""
    r = Reassembler()
    payload = os.urandom(200_000)
    parts = split(payload, 10_000)
    for p in parts[:-1]:
        r.feed(p, origin="tandem/v1/req/cam-01/m")
    for _ in range(1000):
        r.feed(split(os.urandom(200), 100)[0], origin="tandem/v1/req/evil/m")
    assert r.feed(parts[-1], origin="tandem/v1/req/cam-01/m") == payload
    assert r.held_by("tandem/v1/req/evil/m")[0] <= r.max_sets_per_origin
