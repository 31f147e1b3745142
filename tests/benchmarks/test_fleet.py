"""benchmarks.fleet's fleet counts what it must: against a worker that answers some requests
twice, leaves some unanswered and fails some, the fleet reports exactly those numbers as
duplicated, lost and errors (so a 0 in the benchmark's results means 0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tandem.protocol import (
    Code,
    ErrorInfo,
    InferenceResponse,
    MqttTransport,
    SyncTransport,
    Tensor,
    TransportConfig,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_fleet_counts_lost_duplicated_and_failed_answers(mosquitto):
    seen: list[bytes] = []
    verdicts = {"answered": 0, "twice": 0, "dropped": 0, "failed": 0}

    async def worker(msg) -> None:  # on the transport's loop: the async core publishes
        request = decode(msg.payload)
        seen.append(request.id)
        n = len(seen)
        reply = f"tandem/v1/resp/{request.device_id}"
        if n % 5 == 0:
            verdicts["dropped"] += 1
            return
        if n % 3 == 0:
            verdicts["failed"] += 1
            answer = InferenceResponse(id=request.id, error=ErrorInfo(
                Code.RESOURCE_EXHAUSTED, "busy", retryable=True))
        else:
            answer = InferenceResponse(id=request.id, outputs=(
                Tensor.from_array("logits", np.zeros((1, 10), np.float32)),))
        times = 2 if n % 7 == 0 else 1
        verdicts["twice"] += times - 1
        verdicts["answered"] += 1
        for _ in range(times):
            await worker_t.transport.publish(reply, encode(answer))

    spec = {"digest": "ab" * 32, "model": "m", "cloud_only_share": 0.5,
            "kinds": [{"cut": 3, "input": "f", "shape": [1, 8, 4, 4], "bytes": 512},
                      {"cut": 0, "input": "image", "shape": [1, 3, 16, 16], "bytes": 3072}]}
    with SyncTransport(MqttTransport(TransportConfig(port=mosquitto.port))) as worker_t:
        worker_t.subscribe("tandem/v1/req/+/+", worker)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.fleet", "--role", "fleet", "--port",
             str(mosquitto.port), "--spec", json.dumps(spec), "--devices", "6", "--rate", "10",
             "--seconds", "1", "--warmup", "0.2", "--drain-s", "1.5"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["sent"] == len(seen) >= 60  # 6 devices x 10/s x 1.2 s, every one delivered
    assert report["lost"] == verdicts["dropped"] > 0
    assert report["duplicated"] == verdicts["twice"] > 0
    assert report["errors"] == {"RESOURCE_EXHAUSTED": verdicts["failed"]}
    assert report["answered"] == verdicts["answered"]
    assert report["unknown_answers"] == 0 and report["refused_by_broker"] == 0
    assert 0 < report["ok_in_window"] <= report["sent_in_window"]
    assert all(0 < x < 5 for x in report["latencies"])


def test_each_device_publishes_on_its_own_topic_and_refusals_are_counted(mosquitto_factory,
                                                                        tmp_path):
    """Behind an ACL that lets only dev-0000 publish its requests (and only on its own topic),
    dev-0000's requests all arrive and dev-0001's are refused by the broker (MQTT 5 PUBACK
    0x87) and counted as such: a device that sent on another device's topic would show."""
    acl = tmp_path / "acl"
    acl.write_text("topic write tandem/v1/req/dev-0000/+\ntopic readwrite tandem/v1/resp/#\n"
                   "topic read tandem/v1/req/#\n")
    broker = mosquitto_factory(extra_config=f"acl_file {acl}")
    got: list[str] = []

    async def worker(msg) -> None:
        request = decode(msg.payload)
        got.append(msg.topic)
        await worker_t.transport.publish(
            f"tandem/v1/resp/{request.device_id}",
            encode(InferenceResponse(id=request.id, outputs=request.tensors)))

    spec = {"digest": "ab" * 32, "model": "m", "cloud_only_share": 0.0,
            "kinds": [{"cut": 3, "input": "f", "shape": [1, 4], "bytes": 16},
                      {"cut": 0, "input": "image", "shape": [1, 4], "bytes": 16}]}
    with SyncTransport(MqttTransport(TransportConfig(port=broker.port))) as worker_t:
        worker_t.subscribe("tandem/v1/req/+/+", worker)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.fleet", "--role", "fleet", "--port",
             str(broker.port), "--spec", json.dumps(spec), "--devices", "2", "--rate", "10",
             "--seconds", "1", "--warmup", "0", "--drain-s", "1.5"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got) == {"tandem/v1/req/dev-0000/m"}
    assert report["answered"] == len(got) > 0
    assert report["refused_by_broker"] == report["lost"] == report["sent"] - len(got) > 0
    assert any("0x87" in r or "authori" in r.lower() for r in report["refusals"])
