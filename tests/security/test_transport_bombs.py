"""zstd bombs against a serving transport, replayed through a real mosquitto: the server runs in
a process of its own (tests/security/_transport_target.py) whose peak RSS is measured around
each attack.

Before the fix, transport decoding always used the codec's default limits (256 MiB a message),
decoded every bomb on the event loop, and kept each queued request's decoded tensors: 12 bombs
of ~8 KB took a server from 41 MB to 3.1 GB, and bombs on a reply topic were decoded in full
before the request id was looked up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from tandem.protocol import codec
from tandem.protocol.errors import Code
from tandem.protocol.messages import InferenceRequest, InferenceResponse, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.tensors import DType, Tensor
from tandem.protocol.transport import IncomingMessage, SyncTransport, TransportConfig

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
REQ = "tandem/v1/req/evil/m"


def zeros_frame(n: int) -> bytes:
    """A zstd frame of ``n`` zero bytes that declares its size (a few KB for any ``n``),
    compressed piece by piece: nothing of size ``n`` is allocated here."""
    out = zstandard.ZstdCompressor().compressobj(size=n)
    piece = bytes(MiB)
    parts = [out.compress(piece[: min(MiB, n - i)]) for i in range(0, n, MiB)]
    return b"".join(parts) + out.flush()


def bombs(n: int, count: int = 12) -> list[bytes]:
    """``count`` requests (distinct ids) each with one tensor that inflates to ``n`` bytes."""
    t = Tensor("x", DType.UINT8, (n,), zeros_frame(n), compressed=True)
    return [codec.encode(InferenceRequest(new_request_id(), "evil", "m", 1, 30_000, (t,)))
            for _ in range(count)]


def response_bombs(n: int, count: int = 12) -> list[bytes]:
    t = Tensor("y", DType.UINT8, (n,), zeros_frame(n), compressed=True)
    return [codec.encode(InferenceResponse(id=new_request_id(), outputs=(t,)))
            for _ in range(count)]


class Target:
    """The server process and its command channel."""

    def __init__(self, broker, **options) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.security._transport_target", broker.host,
             str(broker.port), json.dumps(options)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"target process ended (rc {self.proc.poll()})"
        return line

    def command(self, cmd: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def wait_for(self, predicate, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.command("stats")
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()


def attacker(broker) -> SyncTransport:
    return SyncTransport(MqttTransport(TransportConfig(host=broker.host, port=broker.port)))


def test_bombs_over_the_handlers_limits_are_refused_before_inflating(mosquitto):
    target = Target(mosquitto, limits={"max_message_bytes": 32 * MiB,
                                       "max_tensor_bytes": 32 * MiB})
    try:
        with attacker(mosquitto) as evil:
            answers: list[IncomingMessage] = []
            evil.subscribe("tandem/v1/resp/evil", answers.append)
            before = target.command("reset_peak")
            # 100 MiB each: within the byte budget (256 MiB), so only the handler's limits
            # stand between these and the allocator
            frames = bombs(100 * MiB)
            assert len(frames[0]) < 8 * 1024  # a few KB on the wire: 100 MiB inflated
            for frame in frames:
                evil.publish(REQ, frame)
            stats = target.wait_for(lambda s: s["serving"]["undecodable"] == 12)
            growth = stats["peak"] - before["rss"]
            assert growth < 24 * MiB, f"{growth / MiB:.0f} MiB of RSS for 12 refused bombs"
            deadline = time.monotonic() + 10
            while len(answers) < 12 and time.monotonic() < deadline:
                time.sleep(0.02)
            errors = [codec.decode(m.payload).error for m in answers]
            assert len(errors) == 12 and all(e.code == Code.PAYLOAD_TOO_LARGE for e in errors)
            assert stats["connected"]
    finally:
        target.close()


def test_bombs_within_the_limits_are_bounded_by_the_byte_budget(mosquitto):
    # a stuck handler, 12 bombs of 24 MiB each (inside the handler's limits): only what fits the
    # 64 MiB budget is inflated and held; the rest is answered RESOURCE_EXHAUSTED at once
    target = Target(mosquitto, stuck=True, max_concurrency=1, max_queued_bytes=64 * MiB,
                    limits={"max_message_bytes": 32 * MiB, "max_tensor_bytes": 32 * MiB})
    try:
        with attacker(mosquitto) as evil:
            before = target.command("reset_peak")
            for frame in bombs(24 * MiB):
                evil.publish(REQ, frame)
            stats = target.wait_for(lambda s: s["serving"]["busy"] == 10)
            assert stats["serving"]["held_bytes"] <= 64 * MiB
            assert stats["serving"]["running"] + stats["serving"]["queued"] == 2
            time.sleep(1.0)  # the two admitted ones are inflated (in a decoding thread)
            target.command("release")
            stats = target.wait_for(lambda s: s["serving"]["answered"] == 12)
            assert stats["serving"]["held_bytes"] == 0 and stats["connected"]
            growth = stats["peak"] - before["rss"]  # the high-water mark of the whole attack
            # two inflated bombs (48 MiB) and the decompressor's working room; unbounded it
            # was 12 x 24 MiB
            assert growth < 128 * MiB, f"{growth / MiB:.0f} MiB of RSS"
    finally:
        target.close()


def test_bombs_on_a_reply_topic_are_never_inflated(mosquitto):
    # responses for ids nobody waits for: looked up by the id in their envelope, dropped
    # without decoding a byte of their tensors
    target = Target(mosquitto)
    try:
        with attacker(mosquitto) as evil:
            before = target.command("reset_peak")
            for frame in response_bombs(48 * MiB):
                evil.publish("tandem/v1/resp/victim", frame)
            stats = target.wait_for(lambda s: s["client"]["late_responses"] == 12)
            growth = stats["peak"] - before["rss"]
            assert growth < 24 * MiB, f"{growth / MiB:.0f} MiB of RSS for 12 reply bombs"
    finally:
        target.close()


def test_a_legitimate_compressed_request_still_round_trips(mosquitto):
    # the other side of the limits: a compressible tensor big enough to be inflated off the loop
    arr = np.zeros((1024, 1024), np.float32)  # 4 MiB, compresses to a few KB
    with attacker(mosquitto) as server, attacker(mosquitto) as client:
        server.serve("tandem/v1/req/+/+", lambda req, ctx: InferenceResponse(
            id=req.id, outputs=(Tensor.from_array("y", req.tensors[0].to_array() + 1,
                                                  compress=True),)))
        t = Tensor.from_array("x", arr, compress=True)
        req = InferenceRequest(new_request_id(), "cam-01", "m", 1, 10_000, (t,))
        resp = client.request("tandem/v1/req/cam-01/m", req)
        np.testing.assert_array_equal(resp.outputs[0].to_array(), arr + 1)
