"""Rollout in the daemon: an assignment on the device's retained topic switches bundles under
load without failing a request; tampered, unsigned, older and other devices' bundles are refused
and the running one keeps serving; a restart serves the assigned bundle, and rolls back to the
previous one when it no longer loads.

The download is the fleet's job (``tandem.devices.fleet.fetch_bundle``, exercised end to end in
tests/e2e); here ``fetch_bundle`` hands over a local copy of the signed bundle, so the daemon's
own checks (signature, digests, version, loading) are what is tested."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil

import numpy as np
import pytest

from tandem.edge import EdgeDaemon, RequestOptions
from tandem.protocol import codec, topics
from tandem.protocol.bundle import MANIFEST_NAME, Manifest, generate_keypair, sign_bundle
from tandem.protocol.messages import Assignment
from tandem.protocol.transport import MemoryBroker, MemoryTransport, TransportConfig
from tests.edge.conftest import MemoryCloud, compile_example, make_config, reference


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """residual v1 and v2 (bundle_version 1 and 2) signed with one key, a tampered and an
    unsigned copy of v2, and a v0 (older)."""
    d = tmp_path_factory.mktemp("releases")
    generate_keypair(d / "key.pem", d / "key.pub")
    base = compile_example(d, "residual")
    out = {}
    for name, version in (("v0", 0), ("v1", 1), ("v2", 2)):
        target = d / name
        shutil.copytree(base, target)
        m = Manifest.from_json((target / MANIFEST_NAME).read_bytes())
        m = dataclasses.replace(m, bundle_version=version, model_version=str(version))
        (target / MANIFEST_NAME).write_bytes(m.to_bytes())
        sign_bundle(target, d / "key.pem")
        out[name] = target
    tampered = d / "tampered"
    shutil.copytree(out["v2"], tampered)
    (tampered / MANIFEST_NAME).write_bytes((tampered / MANIFEST_NAME).read_bytes()
                                           .replace(b'"model_version": "2"',
                                                    b'"model_version": "9"'))
    out["tampered"] = tampered
    unsigned = d / "unsigned"
    shutil.copytree(out["v2"], unsigned)
    (unsigned / "manifest.sig").unlink()
    out["unsigned"] = unsigned
    out["public_key"] = d / "key.pub"
    return out


def _digest(bundle):
    import hashlib

    return hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()


class _Fetch:
    """Hands over a copy of the bundle whose digest the assignment names (what the fleet's
    download returns once it verified the archive)."""

    def __init__(self, bundles):
        self.by_digest = {_digest(b): b for b in bundles}
        self.calls = 0

    def __call__(self, assignment, dest, public_key):
        self.calls += 1
        target = dest / assignment.bundle_digest
        if not target.exists():
            shutil.copytree(self.by_digest[assignment.bundle_digest], target)
        return target


def _assignment(bundle, device="cam-test"):
    return Assignment(device_id=device, model_name="residual", bundle_digest=_digest(bundle),
                      bundle_uri="http://example.invalid/b")


async def _until(cond, timeout_s=20.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


def _x(seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((1, 3, 16, 16))
            .astype(np.float32)}


def _daemon(tmp_path, broker, bundle, releases, fetch, **overrides):
    return EdgeDaemon(make_config(tmp_path, bundle, **overrides),
                      transport_factory=lambda: MemoryTransport(broker, TransportConfig(
                          client_id="edge-cam-test")),
                      fetch_bundle=fetch, public_key=releases["public_key"], progress=False)


@contextlib.asynccontextmanager
async def _running(daemon):
    """The daemon started and connected for the block, stopped after it."""
    await daemon.start()
    try:
        await _until(lambda: daemon.transport is not None)
        yield daemon
    finally:
        await daemon.stop()


async def _publish(broker, assignment):
    t = MemoryTransport(broker, TransportConfig(client_id="operator"))
    await t.connect()
    await (await t.publish_message(topics.assign_topic(assignment.device_id), assignment,
                                   retain=True))
    await t.close()


def test_an_assignment_switches_bundles_under_load(tmp_path, releases):
    async def main():
        broker = MemoryBroker()
        cloud = MemoryCloud(broker, releases["v1"])
        await cloud.start()
        fetch = _Fetch([releases["v2"]])
        d = _daemon(tmp_path, broker, releases["v1"], releases, fetch)
        await d.start()
        try:
            await _until(lambda: d.transport is not None)
            v1 = d.model.digest
            want = reference(releases["v1"], _x())
            results, errors = [], []
            stop = asyncio.Event()

            async def load(mode):
                while not stop.is_set():
                    try:
                        r = await d.infer(_x(), RequestOptions(mode=mode, deadline_ms=2000))
                        np.testing.assert_allclose(r.outputs["logits"], want["logits"],
                                                   rtol=1e-2, atol=1e-2)
                        results.append(r.parameters["bundle"])
                    except Exception as exc:
                        errors.append(exc)
                        return
                    await asyncio.sleep(0)

            tasks = [asyncio.ensure_future(load(m)) for m in ("local", "cloud", "auto", "local")]
            await _until(lambda: len(results) > 20)
            await _publish(broker, _assignment(releases["v2"]))
            await _until(lambda: d.model.digest == _digest(releases["v2"]))
            n = len(results)
            await _until(lambda: len(results) > n + 20)
            stop.set()
            await asyncio.gather(*tasks)
            assert not errors, errors[0]
            assert {v1[:16], d.model.digest[:16]} <= set(results)  # served by both, none failed
            assert d.last_rollout["result"] == "applied"
            await d._heartbeat()
            status = codec.decode(broker.retained()[topics.status_topic("cam-test")])
            assert status.bundle_digest == d.model.digest
            await _until(lambda: d.previous is None)  # the old bundle closed once drained
            # the retained assignment again (a reconnect): nothing to do, nothing downloaded
            calls = fetch.calls
            d._rollout.submit(_assignment(releases["v2"]))
            await _until(lambda: d.last_rollout["result"] == "current")
            assert fetch.calls == calls
        finally:
            await d.stop()
            await cloud.stop()
        # a restart serves the assigned bundle, not --bundle
        d2 = _daemon(tmp_path, broker, releases["v1"], releases, fetch)
        await d2.start()
        try:
            assert d2.model.digest == _digest(releases["v2"])
        finally:
            await d2.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize("name,reason", [("tampered", "signature"), ("unsigned", "unsigned"),
                                         ("v0", "older")])
def test_bad_bundles_are_refused_and_the_old_one_keeps_serving(tmp_path, releases, name,
                                                                reason):
    async def main():
        broker = MemoryBroker()
        fetch = _Fetch([releases[name]])
        async with _running(_daemon(tmp_path, broker, releases["v1"], releases, fetch,
                                    heartbeat_s=600.0)) as d:
            v1 = d.model.digest
            await _publish(broker, _assignment(releases[name]))
            await _until(lambda: d.last_rollout.get("result") == "refused")
            assert reason in d.last_rollout["detail"], d.last_rollout
            assert d.model.digest == v1
            r = await d.infer(_x(), RequestOptions(mode="local"))
            assert r.parameters["bundle"] == v1[:16]
            assert d.metrics.rollouts.labels("refused")._value.get() == 1
            d._rollout.submit(_assignment(releases[name]))  # again: not downloaded again
            await asyncio.sleep(0.1)
            assert fetch.calls == 1 and "refused before" in d.last_rollout["detail"]
            # the fleet hears of it in a heartbeat sent at once (not the periodic one)
            status = await _until_status(broker, lambda s: s.refused_digest)
            assert status.refused_digest == _assignment(releases[name]).bundle_digest
            assert reason in status.refused_reason and status.bundle_digest == v1

    asyncio.run(asyncio.wait_for(main(), 60))


async def _until_status(broker, cond, timeout_s=10.0):
    """The device's retained heartbeat, once ``cond`` holds for it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        got: list = []
        t = MemoryTransport(broker, TransportConfig(client_id="fleet-status"))
        await t.connect()
        await t.subscribe(topics.status_topic("cam-test"),
                          lambda m, got=got: got.append(codec.decode(m.payload)))
        await asyncio.sleep(0.05)
        await t.close()
        if got and cond(got[-1]):
            return got[-1]
        assert loop.time() < end, f"no such heartbeat in time: {got}"


def test_assignments_for_other_devices_and_garbage_are_ignored(tmp_path, releases):
    async def main():
        broker = MemoryBroker()
        fetch = _Fetch([releases["v2"]])
        async with _running(_daemon(tmp_path, broker, releases["v1"], releases, fetch)) as d:
            t = MemoryTransport(broker, TransportConfig(client_id="operator"))
            await t.connect()
            wrong = dataclasses.replace(_assignment(releases["v2"]), device_id="cam-other")
            await t.publish(topics.assign_topic("cam-test"), codec.encode(wrong), retain=True)
            await t.publish(topics.assign_topic("cam-test"), b"\x00garbage", retain=True)
            await t.close()
            await asyncio.sleep(0.2)
            assert fetch.calls == 0 and d.last_rollout == {}

    asyncio.run(asyncio.wait_for(main(), 60))


def test_without_a_public_key_assignments_are_refused(tmp_path, releases):
    async def main():
        broker = MemoryBroker()
        d = EdgeDaemon(make_config(tmp_path, releases["v1"]),
                       transport_factory=lambda: MemoryTransport(broker),
                       fetch_bundle=_Fetch([releases["v2"]]), progress=False)
        async with _running(d):
            await _publish(broker, _assignment(releases["v2"]))
            await _until(lambda: d.last_rollout.get("result") == "refused")
            assert "no bundle-signing public key" in d.last_rollout["detail"]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_recorded_bundle_that_no_longer_loads_rolls_back(tmp_path, releases):
    async def main():
        broker = MemoryBroker()
        fetch = _Fetch([releases["v2"]])
        async with _running(_daemon(tmp_path, broker, releases["v1"], releases, fetch)) as d:
            await _publish(broker, _assignment(releases["v2"]))
            await _until(lambda: d.model.digest == _digest(releases["v2"]))
        # the assigned bundle is damaged on disk: the restart falls back to the previous one
        installed = d.state_dir / "bundles" / _digest(releases["v2"])
        (installed / "parts" / "full.onnx").write_bytes(b"garbage")
        d2 = _daemon(tmp_path, broker, None, releases, fetch)
        await d2.start()
        try:
            assert d2.model.digest == _digest(releases["v1"])
        finally:
            await d2.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_download_that_fails_on_the_way_is_tried_again(tmp_path, releases, monkeypatch):
    import tandem.edge._rollout as rollout
    from tandem.protocol.errors import Unavailable

    monkeypatch.setattr(rollout, "_RETRY_MIN_S", 0.05)

    class Flaky(_Fetch):
        def __call__(self, assignment, dest, public_key):
            if self.calls < 2:
                self.calls += 1
                raise Unavailable("connection refused by the bundle server")
            return super().__call__(assignment, dest, public_key)

    async def main():
        broker = MemoryBroker()
        fetch = Flaky([releases["v2"]])
        async with _running(_daemon(tmp_path, broker, releases["v1"], releases, fetch)) as d:
            await _publish(broker, _assignment(releases["v2"]))
            await _until(lambda: d.model.digest == _digest(releases["v2"]))
            assert fetch.calls == 3 and d.last_rollout["result"] == "applied"

    asyncio.run(asyncio.wait_for(main(), 60))
