"""The edge daemon in the whole system: a real mosquitto, a real ``tandem cloud serve`` worker
and a real ``tandem edge run`` daemon, each its own process.

* results equal the full model (within the tolerance the compiler verified for the encoding
  used) in every mode, and for two input sizes of a dynamic-H/W model, through
  ``tritonclient.http`` with binary and JSON tensors;
* the broker killed mid-stream: every request is answered (locally), none lost, and offloading
  resumes after the broker restarts;
* a stalled worker (SIGSTOP): the daemon finishes locally from the split point within the
  deadline, and drops the worker's late answer;
* the spool survives a SIGKILL of the daemon and delivers after the restart, each result once;
* 1,000 malformed API requests each get a 4xx while valid requests keep succeeding;
* idle link probes reach the worker, measure the round trip and are never counted as requests.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from tandem.edge import Deferred, InferResult
from tandem.protocol.bundle import open_bundle
from tests.edge.conftest import RequestStream, assert_matches, reference, send_malformed
from tests.edge.test_api import _bad_requests

httpclient = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.broker


def _inputs(bundle, shape=None, seed=0):
    with open_bundle(bundle) as b:
        spec = b.manifest.inputs[0]
        manifest = b.manifest
    shape = shape or [d if isinstance(d, int) else 16 for d in spec.shape]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return {spec.name: x}, manifest


def _triton(system, x, mode, binary):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{system.api_port}")
    try:
        (name, arr), = x.items()
        inp = httpclient.InferInput(name, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr, binary_data=binary)
        model = system.status()["bundle"]["model"]
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer(model, [inp], outputs=[out], parameters={"mode": mode})
        return {"logits": result.as_numpy("logits")}, result.get_response()["parameters"]
    finally:
        client.close()


@pytest.mark.parametrize("kind,shapes", [("residual", [None]),
                                         ("dynamic_hw", [[1, 3, 16, 16], [1, 3, 24, 40]])])
def test_every_mode_equals_the_full_model(system, e2e_bundles, kind, shapes):
    bundle = system.add_to_repo(e2e_bundles[kind])
    system.start_worker("w1")
    system.start_edge(bundle)
    st = system.status()
    cuts = sorted({p["plan"] for p in st["plans"]})
    modes = ["local", "cloud", "auto"] + [p for p in cuts if p.startswith("split:")]
    for shape in shapes:
        x, manifest = _inputs(bundle, shape)
        want = reference(bundle, x)
        for mode in modes:
            for binary in (True, False):
                outputs, params = _triton(system, x, mode, binary)
                assert_matches(outputs, want, manifest, params)
                if mode not in ("auto", "local"):
                    assert params["ran"] == "cloud", params
                    assert params["worker_id"] == "w1"
                if mode == "local":
                    assert params["ran"] == "local"


def test_the_broker_dies_mid_stream(system, e2e_bundles):
    bundle = system.add_to_repo(e2e_bundles["residual"])
    system.start_worker("w1")
    system.start_edge(bundle)
    x, manifest = _inputs(bundle)
    want = reference(bundle, x)
    url = f"http://127.0.0.1:{system.api_port}"
    with RequestStream(url, x, lambda r: assert_matches(r.outputs, want, manifest, r.parameters),
                       mode="cloud", deadline_ms=500) as stream:
        answers = stream.answers
        _wait(lambda: sum(a["ran"] == "cloud" for a in answers) >= 5)
        system.broker.kill()
        n = len(answers)
        _wait(lambda: len(answers) >= n + 20)
        during = answers[n + 5:]  # after the daemon noticed
        assert during and all(a["ran"] in ("fallback", "local") for a in during)
        system.broker.start()
        m = len(answers)
        _wait(lambda: any(a["ran"] == "cloud" for a in answers[m:]), 30)
    assert len(answers) == stream.sent  # every request answered, exactly once
    assert system.status()["link"]["available"]


def test_a_stalled_worker_means_local_fallback_within_the_deadline(system, e2e_bundles):
    bundle = system.add_to_repo(e2e_bundles["residual"])
    worker = system.start_worker("w1")
    system.start_edge(bundle)
    x, manifest = _inputs(bundle)
    want = reference(bundle, x)
    st = system.status()
    split = max((p["plan"] for p in st["plans"] if p["plan"].startswith("split:")),
                key=lambda s: int(s.split(":")[1]))
    with system.client() as client:
        assert client.infer(x, mode=split).ran == "cloud"
        worker.signal(signal.SIGSTOP)
        try:
            deadline_ms = 400
            for _ in range(3):
                t0 = time.monotonic()
                r = client.infer(x, mode=split, deadline_ms=deadline_ms)
                waited_ms = (time.monotonic() - t0) * 1e3
                assert r.ran == "fallback" and r.parameters["fallback_reason"] == "timeout"
                assert_matches(r.outputs, want, manifest, r.parameters)
                # the daemon gave up on the cloud in time to finish here; a generous bound on
                # the client's wall time catches a daemon that waits for the worker instead
                assert waited_ms < deadline_ms + 1000, waited_ms
            auto = client.infer(x, mode="auto")
            assert auto.ran == "local"  # degraded after the failures: everything local
        finally:
            worker.signal(signal.SIGCONT)
        system.wait_link(True)
        assert client.infer(x, mode=split).ran == "cloud"


def test_the_spool_survives_a_daemon_sigkill_and_delivers_each_result_once(system, e2e_bundles):
    bundle = system.add_to_repo(e2e_bundles["residual"])
    system.broker.stop()  # no broker: the cloud is unreachable
    edge = system.start_edge(bundle, wait_cloud=False)
    x, _ = _inputs(bundle)
    with system.client() as client:
        ids = []
        for i in range(5):
            r = client.infer({k: v + i for k, v in x.items()}, mode="cloud", deferrable=True)
            assert isinstance(r, Deferred)
            ids.append(r.id)
        assert client.result(ids[0]) is None
    edge.signal(signal.SIGKILL)
    edge.wait(10)
    system.broker.start()
    system.start_worker("w1")
    edge = system.start_edge(bundle)
    got: dict[str, InferResult] = {}

    def fetch(wanted: list[str]) -> None:
        with system.client() as client:
            deadline = time.monotonic() + 60
            while not all(rid in got for rid in wanted):
                assert time.monotonic() < deadline, f"delivered {len(got)} of {len(wanted)}"
                for rid in wanted:
                    if rid not in got:
                        r = client.result(rid)
                        if r is not None:
                            got[rid] = r
                time.sleep(0.05)

    fetch(ids[:2])
    # killed again with two results delivered and three (answered or not) waiting: after the
    # restart the three are delivered, and the two are not delivered a second time
    edge.signal(signal.SIGKILL)
    edge.wait(10)
    system.start_edge(bundle)
    fetch(ids)
    with system.client() as client:
        for i, rid in enumerate(ids):
            r = got[rid]
            assert r.parameters["deferred"] and r.parameters["ran"] == "cloud"
            shifted = {k: v + i for k, v in x.items()}
            np.testing.assert_allclose(r.outputs["logits"], reference(bundle, shifted)["logits"],
                                       rtol=1e-4, atol=1e-5)
            with pytest.raises(Exception, match="already delivered"):
                client.result(rid)  # once


def test_idle_probes_reach_a_real_worker_and_are_not_requests(system, e2e_bundles):
    """Idle, the daemon probes the real worker through mosquitto every probe_interval_s (0.2 s
    here): the RTT becomes measured, and the worker answers the probes without counting any
    request; an offload afterwards is counted as one."""
    import urllib.request

    from tests._support.broker import free_port

    bundle = system.add_to_repo(e2e_bundles["residual"])
    port = free_port()
    system.start_worker("w1", "--http-port", str(port))
    system.start_edge(bundle)

    def worker_metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    def counter(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    _wait(lambda: system.status()["link"]["probes_answered"] >= 3)
    link = system.status()["link"]
    assert link["rtt_measured"] and link["rtt_ms"] < 1000
    text = worker_metrics()
    assert counter(text, "tandem_cloud_link_probes_total") >= 3
    assert counter(text, "tandem_cloud_requests_total") == 0  # no probe is a request
    x, _ = _inputs(bundle)
    with system.client() as client:
        assert client.infer(x, mode="cloud").ran == "cloud"
    assert counter(worker_metrics(), "tandem_cloud_requests_total") == 1


def test_a_killed_daemon_is_marked_offline_by_its_last_will(system, e2e_bundles):
    """The retained heartbeat says online while the daemon runs; after a SIGKILL (no clean
    stop, no goodbye) mosquitto publishes the daemon's last will: offline, retained."""
    import paho.mqtt.client as mqtt

    from tandem.protocol import codec, topics

    bundle = system.add_to_repo(e2e_bundles["residual"])
    system.start_worker("w1")
    edge = system.start_edge(bundle)
    states: list[str] = []

    def on_message(client, userdata, message):
        if message.payload:
            states.append(codec.decode(message.payload).state)

    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = on_message
    watcher.connect("127.0.0.1", system.broker.port)
    watcher.subscribe(topics.status_topic("cam-e2e"), qos=1)
    watcher.loop_start()
    try:
        _wait(lambda: bool(states) and states[-1] in ("online", "degraded"))
        edge.signal(signal.SIGKILL)
        edge.wait(10)
        _wait(lambda: states[-1] == "offline")
    finally:
        watcher.loop_stop()
        watcher.disconnect()


def test_malformed_requests_never_disturb_valid_ones(system, e2e_bundles):
    bundle = system.add_to_repo(e2e_bundles["residual"])
    system.start_worker("w1")
    system.start_edge(bundle)
    x, manifest = _inputs(bundle)
    want = reference(bundle, x)
    url = f"http://127.0.0.1:{system.api_port}"
    with RequestStream(url, x, lambda r: assert_matches(r.outputs, want, manifest, r.parameters),
                       mode="auto", deadline_ms=1000) as stream:
        assert len(send_malformed(system.api_port, _bad_requests(x["input"]))) == 1000
    assert stream.answers


def _wait(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
