"""The daemon's request path against an in-process cloud (MemoryBroker + a responder running
the bundle's tails): every mode, fallback from the split point, degraded mode and recovery,
the spool, exactly one answer per request."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tandem.edge import Answer, Deferred, EdgeDaemon, RequestOptions
from tandem.protocol import codec, topics
from tandem.protocol.errors import Code, InvalidArgument, NotFound
from tandem.protocol.transport import MemoryBroker, MemoryTransport, TransportConfig
from tests.edge.conftest import MemoryCloud, assert_matches, make_config, reference


def _x(seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((1, 3, 16, 16))
            .astype(np.float32)}


def _run(coro, timeout_s=60):
    asyncio.run(asyncio.wait_for(coro, timeout_s))


async def _until(cond, timeout_s=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class _Env:
    """A daemon on a MemoryBroker with a MemoryCloud beside it."""

    def __init__(self, tmp_path, bundle, **overrides):
        self.broker = MemoryBroker()
        self.cloud = MemoryCloud(self.broker, bundle)
        self.bundle = bundle
        self.daemon = EdgeDaemon(
            make_config(tmp_path, bundle, **overrides),
            transport_factory=lambda: MemoryTransport(self.broker, TransportConfig(
                client_id="edge-cam-test")), progress=False)

    async def __aenter__(self):
        await self.cloud.start()
        await self.daemon.start()
        await _until(lambda: self.daemon.transport is not None)
        return self

    async def __aexit__(self, *exc):
        await self.daemon.stop()
        await self.cloud.stop()


def _counting(runtime):
    """Count calls per part path."""
    calls = {}
    for path, runner in runtime.parts.items():
        original = runner.infer

        def infer(feeds, _path=path, _orig=original):
            calls[_path] = calls.get(_path, 0) + 1
            return _orig(feeds)

        runner.infer = infer
    return calls


def test_every_mode_matches_the_full_model(tmp_path, residual_bundle):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            d = env.daemon
            x = _x()
            want = reference(residual_bundle, x)
            manifest = d.model.bundle.manifest
            cuts = [c.id for c in d.model.runtime.interior]
            modes = [("local", None), ("cloud", None)] + [("split", c) for c in cuts]
            for mode, cut in modes:
                ans = await d.infer(x, RequestOptions(mode=mode, cut_id=cut))
                assert isinstance(ans, Answer)
                expect_ran = "local" if mode == "local" else "cloud"
                assert ans.parameters["ran"] == expect_ran, (mode, cut, ans.parameters)
                assert_matches(ans.outputs, want, manifest, ans.parameters)
                assert ans.parameters["plan"] == (f"split:{cut}" if cut else mode)
                assert ans.parameters["expected_ms"] > 0 and ans.parameters["actual_ms"] > 0
            sent_cuts = {r.cut_id for r in env.cloud.requests if r.tensors}
            assert sent_cuts == {0, *cuts}
            auto = await d.infer(x, RequestOptions(mode="auto"))
            assert_matches(auto.outputs, want, manifest, auto.parameters)
            assert auto.parameters["reason"]

    _run(main())


def test_a_stalled_cloud_falls_back_from_the_frontier_without_rerunning_the_head(
        tmp_path, residual_bundle):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            d = env.daemon
            cut = d.model.runtime.interior[-1]
            calls = _counting(d.model.runtime)
            env.cloud.stalled = True
            x = _x(3)
            ans = await d.infer(x, RequestOptions(mode="split", cut_id=cut.id, deadline_ms=300))
            assert ans.parameters["ran"] == "fallback"
            assert ans.parameters["fallback_reason"] == "timeout"
            assert calls == {cut.head_part: 1, cut.tail_part: 1}  # head once, tail here
            np.testing.assert_allclose(ans.outputs["logits"],
                                       reference(residual_bundle, x)["logits"], rtol=1e-4,
                                       atol=1e-5)
            env.cloud.stalled = False
            await asyncio.sleep(0.1)
            # the late answer was dropped by the transport: nobody waited for it
            assert d.transport.stats().late_responses >= 1

    _run(main())


@pytest.mark.parametrize("code,reason", [(Code.UNAVAILABLE, "unavailable"),
                                         (Code.RESOURCE_EXHAUSTED, "resource_exhausted"),
                                         (Code.INTERNAL, "error")])
def test_cloud_errors_fall_back_locally(tmp_path, residual_bundle, code, reason):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            env.cloud.error = code
            ans = await env.daemon.infer(_x(), RequestOptions(mode="cloud"))
            assert ans.parameters["ran"] == "fallback"
            assert ans.parameters["fallback_reason"] == reason

    _run(main())


def test_degraded_while_the_broker_is_down_then_offloading_resumes(tmp_path, residual_bundle):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            d = env.daemon
            ans = await d.infer(_x(), RequestOptions(mode="cloud"))
            assert ans.parameters["ran"] == "cloud"
            env.broker.stop()
            await _until(lambda: not d.link.available)
            results = [await d.infer(_x(i), RequestOptions(mode="auto")) for i in range(5)]
            assert all(r.parameters["ran"] == "local" for r in results)
            assert all("cloud unavailable" in r.parameters["reason"] for r in results)
            forced = await d.infer(_x(), RequestOptions(mode="cloud"))
            assert forced.parameters["ran"] == "fallback"  # forced, answered all the same
            env.broker.start()
            await _until(lambda: d.link.available, 10)
            ans = await d.infer(_x(), RequestOptions(mode="cloud"))
            assert ans.parameters["ran"] == "cloud"

    _run(main())


def test_idle_probes_measure_the_round_trip_and_stop_while_offloading(tmp_path, residual_bundle):
    """With nothing to offload the daemon probes every ``probe_interval_s`` (a request without
    tensors, which the cloud answers empty without computing): the RTT becomes measured, no
    inference reaches the cloud. While offloads run they are the samples: no probes."""
    interval = 0.2

    async def main():
        async with _Env(tmp_path, residual_bundle, probe_interval_s=interval) as env:
            d, link = env.daemon, env.daemon.link
            await _until(lambda: link.probes_answered >= 3)
            loop = asyncio.get_running_loop()
            sent0, t0 = link.probes_sent, loop.time()
            await asyncio.sleep(1.0)
            idle_s, idle_sent = loop.time() - t0, link.probes_sent - sent0
            assert 2 <= idle_sent <= idle_s / interval + 1  # rate-limited to one per interval
            assert link.probes_answered >= link.probes_sent - 1  # one may be in flight
            assert link.rtt.samples >= link.probes_answered and d.status()["link"]["rtt_measured"]
            assert env.cloud.requests == [] and env.cloud.probes >= link.probes_answered
            text = d.metrics.exposition()[0].decode()
            assert 'tandem_edge_probes_total{result="answered"}' in text
            busy0 = link.probes_sent
            end = loop.time() + 1.0
            while loop.time() < end:  # offloads back to back: each one is an RTT sample
                ans = await d.infer(_x(), RequestOptions(mode="cloud"))
                assert ans.parameters["ran"] == "cloud"
            assert link.probes_sent - busy0 <= 1  # at most the one that was due at the start
            assert env.cloud.requests and all(r.tensors for r in env.cloud.requests)

    _run(main())


def test_deferrable_cloud_requests_are_spooled_and_delivered_once(tmp_path, residual_bundle):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            d = env.daemon
            env.broker.stop()
            await _until(lambda: not d.link.available)
            x = _x(7)
            got = await d.infer(x, RequestOptions(mode="cloud", deferrable=True))
            assert isinstance(got, Deferred)
            state, _ = await d.spooler.result(got.id)
            assert state == "pending"
            env.broker.start()
            await _until(lambda: d.link.available, 10)

            for _ in range(200):
                if (await d.spooler.call(d.spool.counts))["done"] == 1:
                    break
                await asyncio.sleep(0.05)
            state, (outputs, info, _) = await d.spooler.result(got.id)
            assert state == "done" and info["ran"] == "cloud"
            np.testing.assert_allclose(outputs["logits"], reference(residual_bundle, x)["logits"],
                                       rtol=1e-4, atol=1e-5)
            state, _ = await d.spooler.result(got.id)
            assert state == "delivered"
            with pytest.raises(NotFound):
                await d.spooler.result("0" * 32)
            assert sum(1 for r in env.cloud.requests if r.id.hex() == got.id) == 1

    _run(main())


def test_bad_inputs_are_refused_before_anything_runs(tmp_path, residual_bundle):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            d = env.daemon
            bad = [
                {"nope": np.zeros((1, 3, 16, 16), np.float32)},
                {"input": np.zeros((1, 3, 16, 16), np.float64)},
                {"input": np.zeros((1, 3, 16), np.float32)},
                {"input": np.zeros((1, 3, 16, 17), np.float32)},
            ]
            for feeds in bad:
                with pytest.raises(InvalidArgument):
                    await d.infer(feeds)
            with pytest.raises(InvalidArgument, match="not a plan"):
                await d.infer(_x(), RequestOptions(mode="split", cut_id=999))
            assert isinstance(await d.infer(_x()), Answer)

    _run(main())


def test_heartbeat_and_last_will(tmp_path, residual_bundle):
    async def main():
        async with _Env(tmp_path, residual_bundle) as env:
            d = env.daemon
            await d.infer(_x(), RequestOptions(mode="local"))
            await _until(lambda: topics.status_topic("cam-test") in env.broker.retained())
            status = codec.decode(env.broker.retained()[topics.status_topic("cam-test")])
            assert status.device_id == "cam-test" and status.bundle_digest == d.model.digest
            assert status.state in ("online", "degraded")
        status = codec.decode(env.broker.retained()[topics.status_topic("cam-test")])
        assert status.state == "offline"

    _run(main())
