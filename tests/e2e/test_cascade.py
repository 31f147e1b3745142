"""A cascade bundle in the whole system: a real mosquitto, a real ``tandem cloud serve`` worker
and a real ``tandem edge run`` daemon, each its own process.

* through the local API (``mode=cascade`` and ``auto``), held-out rows escalate at the rate the
  calibration recorded (within a binomial tolerance), escalated rows carry the large model's
  answer and the others the small model's, and the response parameters say so;
* a stalled worker (SIGSTOP): an escalation falls back to the small model's answer within the
  deadline, and escalations resume once the worker runs again;
* the escalation ratio reaches ``/metrics`` and the retained heartbeat.
"""

from __future__ import annotations

import math
import signal
import time
import urllib.request

import numpy as np
import pytest

from tandem.compiler import CascadeBundleFromOnnx, CascadeOptions, CompileOptions
from tandem.protocol.bundle import load_bundle
from tests._support.cascade import make_pair, save

pytestmark = pytest.mark.broker

_TARGET_RATE = 0.2


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory):
    pair = make_pair(0)
    d = tmp_path_factory.mktemp("e2e-cascade")
    np.savez(d / "s.npz", x=pair.rows(600, 1))
    out = d / "digits-cascade"
    CascadeBundleFromOnnx(save(pair.small, d / "small.onnx"), save(pair.large, d / "large.onnx"),
                          out, CompileOptions(samples=d / "s.npz", targets=("onnxruntime",)),
                          CascadeOptions(escalation_rate=_TARGET_RATE))()
    with load_bundle(out) as b:
        cascade = b.manifest.cascade
    return pair, out, cascade


def _tolerance(p: float, n: int) -> float:
    """Four binomial standard deviations (plus the calibration's own sampling error)."""
    return 4 * math.sqrt(p * (1 - p) / n) + 4 * math.sqrt(p * (1 - p) / 600)


def _close(got, want, params, bundle):
    tol = 1e-4
    if params.get("ran") == "cloud" and params.get("encoding", "raw") != "raw":
        with load_bundle(bundle) as b:
            tol = b.manifest.cut(params["cut_id"]).verification.encodings[
                params["encoding"]].tolerance
    np.testing.assert_allclose(got, want, rtol=max(tol, 1e-4), atol=tol)


def test_held_out_rows_escalate_at_the_calibrated_rate_through_the_api(system,
                                                                       cascade_bundle):
    pair, bundle, cascade = cascade_bundle
    bundle = system.add_to_repo(bundle)
    system.start_worker("w1")
    system.start_edge(bundle)
    recorded = cascade.calibration.chosen.escalation_rate
    assert abs(recorded - _TARGET_RATE) < 0.05

    held_out = pair.rows(400, 99)  # rows the calibration never saw
    small, large = pair.small_logits(held_out), pair.large_logits(held_out)
    with system.client() as client:
        # one request of 400 rows: only the escalated rows go to the cloud
        r = client.infer({"x": held_out}, mode="cascade", deadline_ms=5000)
        p = r.parameters
        assert p["rows"] == 400 and p["ran"] == "cloud" and p["escalated"] is True
        rate = p["escalated_rows"] / 400
        assert abs(rate - recorded) <= _tolerance(recorded, 400), (rate, recorded)
        got = r.outputs["logits"]
        is_small = np.all(np.isclose(got, small, rtol=1e-4, atol=1e-4), axis=1)
        assert abs(int((~is_small).sum()) - p["escalated_rows"]) <= 1  # rows may agree by chance
        _close(got[~is_small], large[~is_small], p, bundle)

        # one row a request, as a camera would send them, in both modes that cascade
        escalated = 0
        for i in range(60):
            row = held_out[i:i + 1]
            r = client.infer({"x": row}, mode="cascade" if i % 2 else "auto", deadline_ms=5000)
            p = r.parameters
            assert {"escalated", "score", "plan", "ran", "threshold"} <= set(p)
            assert p["threshold"] == pytest.approx(cascade.rule.threshold)
            if p["escalated"]:
                escalated += 1
                assert p["ran"] == "cloud" and p["plan"].startswith("escalate:"), p
                assert p["score"] < cascade.rule.threshold
                _close(r.outputs["logits"], large[i:i + 1], p, bundle)
            else:
                assert p["ran"] == "local" and p["plan"] == "small", p
                assert p["score"] >= cascade.rule.threshold
                np.testing.assert_allclose(r.outputs["logits"], small[i:i + 1], rtol=1e-4,
                                           atol=1e-4)
        assert 0 < escalated < 60
        st = client.status()
    assert st["cascade"]["requests"] == 61 and st["cascade"]["escalated"] == escalated + 1
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{system.api_port}/metrics",
                                     timeout=10).read().decode()
    ratio = (escalated + 1) / 61
    line = next(m for m in metrics.splitlines() if m.startswith("tandem_edge_escalation_ratio "))
    assert float(line.split()[1]) == pytest.approx(ratio, abs=1e-6)
    assert 'tandem_edge_cascade_requests_total{path="escalated"}' in metrics
    assert 'tandem_edge_cascade_latency_seconds_count{path="small"}' in metrics
    _heartbeat_carries(system, ratio)


def _heartbeat_carries(system, ratio: float) -> None:
    """The retained heartbeat on the real broker carries the window's escalation ratio."""
    from tandem.protocol import MqttTransport, SyncTransport, TransportConfig, codec, topics

    got = []
    t = SyncTransport(MqttTransport(TransportConfig(host="127.0.0.1", port=system.broker.port,
                                                    client_id="heartbeat-reader")))
    with t:
        t.subscribe(topics.status_topic("cam-e2e"), lambda msg: got.append(
            codec.decode(msg.payload)))
        end = time.monotonic() + 10
        while not any(abs(s.escalation_ratio - ratio) < 1e-3 for s in got):
            assert time.monotonic() < end, got[-1:]
            time.sleep(0.1)


def test_a_stalled_worker_means_the_small_answer_within_the_deadline(system, cascade_bundle):
    pair, bundle, cascade = cascade_bundle
    bundle = system.add_to_repo(bundle)
    worker = system.start_worker("w1")
    system.start_edge(bundle)
    x = pair.rows(2000, 7)
    top = pair.small_logits(x)
    z = np.exp(top - top.max(axis=1, keepdims=True))
    unsure = x[(z / z.sum(axis=1, keepdims=True)).max(axis=1) < cascade.rule.threshold][:1]
    with system.client() as client:
        assert client.infer({"x": unsure}, mode="cascade").ran == "cloud"
        worker.signal(signal.SIGSTOP)
        try:
            deadline_ms = 400
            t0 = time.monotonic()
            r = client.infer({"x": unsure}, mode="cascade", deadline_ms=deadline_ms)
            waited_ms = (time.monotonic() - t0) * 1e3
            p = r.parameters
            assert p["ran"] == "fallback" and p["escalation"] == "failed", p
            assert p["fallback_reason"] == "timeout" and p["escalated"] is True
            np.testing.assert_allclose(r.outputs["logits"], pair.small_logits(unsure),
                                       rtol=1e-4, atol=1e-4)
            # the daemon gave up on the cloud in time; a generous bound on the client's wall
            # time catches a daemon that waits for the worker instead
            assert waited_ms < deadline_ms + 1000, waited_ms
        finally:
            worker.signal(signal.SIGCONT)
        system.wait_link(True)
        end = time.monotonic() + 30
        while client.infer({"x": unsure}, mode="cascade").ran != "cloud":
            assert time.monotonic() < end, "escalations did not resume"
            time.sleep(0.2)
