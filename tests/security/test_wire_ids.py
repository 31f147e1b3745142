"""Bad ids replayed on a real mosquitto: :func:`topics.validate_id` refuses exactly the
characters the broker refuses, so no id we accept can make the broker drop our connection
(a refused SUBSCRIBE filter is replayed on every reconnect: the transport would stay dead).

The MQTT packets are written by hand here (a few bytes each), so the test sees the broker's
own verdict and nothing a client library might check or fix first.
"""

from __future__ import annotations

import socket
import struct

import pytest

from tandem.protocol import topics
from tandem.protocol.errors import InvalidArgument
from tandem.protocol.transport import check_topic
from tests.protocol.test_topics import BROKER_REFUSED

BROKER_ACCEPTED = ["cam-01", "cam\u00a0", "cam\ufdcf", "cam\ufdf0", "cam\ufffd", "cam\U0001fffd",
                   "\U0001f4f7-01", "kamera-ü", "模型"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


class RawClient:
    """An MQTT 5 client of a few lines: CONNECT, then one SUBSCRIBE or PUBLISH, and read what
    the broker answers (a packet type) or whether it closed the connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect = _string(b"MQTT") + bytes([5, 0x02]) + struct.pack(">H", 30) + b"\x00"
        self.sock.sendall(_packet(0x10, connect + _string(b"")))
        assert self.answer() == 0x20  # CONNACK

    def answer(self) -> int | None:
        """The type byte of the broker's next packet (its body read and dropped), or None when
        the broker closed the connection instead."""
        try:
            head = self.sock.recv(1)
            if not head:
                return None
            length, shift = 0, 0
            while True:
                byte = self.sock.recv(1)[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            while length:
                length -= len(self.sock.recv(length))
            return head[0] & 0xF0
        except (ConnectionResetError, IndexError):
            return None

    def subscribe(self, topic: bytes) -> int | None:
        body = struct.pack(">H", 1) + b"\x00" + _string(topic) + b"\x01"
        self.sock.sendall(_packet(0x82, body))
        return self.answer()

    def publish(self, topic: bytes) -> int | None:
        body = _string(topic) + struct.pack(">H", 1) + b"\x00" + b"payload"
        self.sock.sendall(_packet(0x32, body))  # QoS 1: the broker answers PUBACK or disconnects
        return self.answer()

    def close(self) -> None:
        self.sock.close()


def _broker_takes(port: int, topic: str) -> tuple[bool, bool]:
    raw = topic.encode("utf-8")
    results = []
    for action in ("subscribe", "publish"):
        client = RawClient(port)
        try:
            answer = getattr(client, action)(raw)
        finally:
            client.close()
        results.append(answer in (0x90, 0x40))  # SUBACK / PUBACK: taken; DISCONNECT or EOF: not
    return results[0], results[1]


@pytest.mark.broker
def test_validate_id_refuses_exactly_what_mosquitto_refuses(mosquitto):
    for bad in BROKER_REFUSED:
        with pytest.raises(InvalidArgument):
            topics.validate_id(bad, "device_id")
        topic = f"tandem/v1/resp/{bad}"  # what response_topic() would have built
        with pytest.raises(InvalidArgument):
            check_topic(topic)
        assert _broker_takes(mosquitto.port, topic) == (False, False), (
            f"mosquitto accepted {bad!r}: validate_id is stricter than the broker")
    for good in BROKER_ACCEPTED:
        topic = topics.response_topic(good)
        assert check_topic(topic) == topic  # the transport's whole-topic check agrees
        assert _broker_takes(mosquitto.port, topic) == (True, True), (
            f"mosquitto refused {good!r}, which validate_id accepts")
        assert topics.parse_response_topic(topic) == good
