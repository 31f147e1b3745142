"""``tandem cloud serve`` as a real process: startup, graceful shutdown that drains, and the
at-least-once contract after SIGKILL (a client that retries by id gets every answer)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request

import pytest

from tandem.protocol import (
    DeadlineExceeded,
    InferenceResponse,
    MqttTransport,
    TransportConfig,
    Unavailable,
)
from tests.cloud.conftest import broker_url, request_for, topic_for

pytestmark = pytest.mark.broker


def test_cli_errors_are_one_line(tmp_path):
    from tandem.cli import main

    assert main(["cloud", "serve", "--repo", str(tmp_path / "none")]) == 1
    assert main(["cloud", "serve", "--repo", str(tmp_path), "--broker", "http://x"]) == 1
    assert main(["cloud", "serve", "--repo", str(tmp_path), "--max-batch", "0"]) == 1


def test_unreachable_broker_is_a_one_line_error(serve_process, repo):
    from tests._support.broker import free_port

    p = serve_process("--repo", str(repo), "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert p.wait(60) == 1
    log = p.log()
    assert "Traceback" not in log and "error:" in log.splitlines()[-1]


async def _stream(port: int, requests: list, *, timeout: float) -> list:
    async with MqttTransport(TransportConfig(host="127.0.0.1", port=port)) as t:
        return await asyncio.gather(
            *(t.request(topic_for(r, "dynamic_batch"), r, timeout_s=timeout) for r in requests),
            return_exceptions=True)


def test_sigterm_drains_the_queue_then_disconnects(mosquitto, serve_process, repo, compiled):
    # a long batch delay keeps requests queued when SIGTERM arrives
    p = serve_process("--repo", str(repo), "--broker", broker_url(mosquitto), "--worker-id",
                      "drainer", "--max-batch", "64", "--max-delay-ms", "3000",
                      "--http-port", "0", env={"TANDEM_LOAD_INTERVAL_S": "0.05"})
    p.wait_for_log("serving $share/tandem")
    port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", p.log()).group(1))
    requests = [request_for(compiled["dynamic_batch"], 0, seed=i)[0] for i in range(20)]

    def queued() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        return float(re.search(r"^tandem_cloud_queue_depth (\S+)$", text, re.M).group(1))

    async def main() -> list:
        task = asyncio.ensure_future(_stream(mosquitto.port, requests, timeout=15))
        while queued() < 20:  # all queued, waiting for the batch delay
            await asyncio.sleep(0.02)
        p.signal(signal.SIGTERM)
        return await task

    results = asyncio.run(main())
    assert p.wait(30) == 0, p.log()
    failed = [r for r in results if not isinstance(r, InferenceResponse)]
    assert not failed, (len(failed), mosquitto.log_tail(60))  # drained: every queued one computed
    log = p.log()
    assert "draining" in log and "stopped (answered 20" in log


def test_after_sigkill_a_client_retrying_by_id_gets_every_answer(mosquitto, serve_process, repo,
                                                                 compiled):
    """The documented contract: the worker's requests die with it; the device retries the same
    ids on a timeout, another worker (or the restarted one) answers them."""
    args = ("--repo", str(repo), "--broker", broker_url(mosquitto), "--max-batch", "2",
            "--max-delay-ms", "20")
    victim = serve_process(*args, "--worker-id", "victim")
    survivor = serve_process(*args, "--worker-id", "survivor")
    victim.wait_for_log("serving $share/tandem")
    survivor.wait_for_log("serving $share/tandem")
    requests = [request_for(compiled["dynamic_batch"], 0, seed=i)[0] for i in range(300)]

    retries = [0]

    async def main() -> dict[bytes, InferenceResponse]:
        answers: dict[bytes, InferenceResponse] = {}
        async with MqttTransport(TransportConfig(host="127.0.0.1", port=mosquitto.port)) as t:
            async def one(r) -> None:
                for _ in range(20):  # retry by id until answered (at least once)
                    try:
                        answers[r.id] = await t.request(topic_for(r, "dynamic_batch"), r,
                                                        timeout_s=1.5)
                        return
                    except (DeadlineExceeded, Unavailable):
                        retries[0] += 1

            async def killer() -> None:
                while len(answers) < 10:  # mid-stream: answers have started to come back
                    await asyncio.sleep(0.001)
                victim.signal(signal.SIGKILL)

            await asyncio.gather(killer(), *(one(r) for r in requests))
        return answers

    started = time.monotonic()
    answers = asyncio.run(main())
    assert victim.wait(10) == -signal.SIGKILL
    assert len(answers) == len(requests), f"{len(requests) - len(answers)} never answered"
    assert retries[0] > 0  # the kill did take requests down with it
    assert {a.worker_id for a in answers.values()} <= {"victim", "survivor"}
    assert time.monotonic() - started < 60
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0


# -- brokers in the wild (issue #15): version negotiation, shared subscriptions, refusals --------


def test_a_broker_without_shared_subscriptions_is_a_one_line_error_not_an_idle_worker(
        amqtt_factory, serve_process, repo):
    """amqtt refuses MQTT 5 (the default 'auto' falls back to 3.1.1) and accepts the $share
    SUBSCRIBE without ever delivering through it: serve exits 1 within seconds, one line naming
    the limitation and the ways out."""
    broker = amqtt_factory()
    p = serve_process("--repo", str(repo), "--broker", f"mqtt://127.0.0.1:{broker.port}")
    assert p.wait(60) == 1
    log = p.log()
    last = log.splitlines()[-1]
    assert "Traceback" not in log and last.startswith("error: ")
    assert "with MQTT 3.1.1" in log  # negotiated down, said once
    assert "does not support shared subscriptions" in last
    for way_out in ("mosquitto, EMQX, HiveMQ", "--broker nats://", "--group ''"):
        assert way_out in last


def test_an_explicit_mqtt_version_the_broker_refuses_names_auto(amqtt_factory, serve_process,
                                                                 repo):
    broker = amqtt_factory()
    p = serve_process("--repo", str(repo), "--broker", f"mqtt://127.0.0.1:{broker.port}",
                      "--mqtt-version", "5", "--group", "")
    assert p.wait(60) == 1
    last = p.log().splitlines()[-1]
    assert last.startswith("error: ") and "MQTT 5" in last and "'auto'" in last


def test_without_a_group_one_worker_serves_on_a_broker_without_shared_subscriptions(
        amqtt_factory, run_worker, repo, compiled):
    broker = amqtt_factory()
    run_worker(repo=repo, broker=broker_url(broker), group="")
    request, _ = request_for(compiled["residual"], 1)

    async def main() -> InferenceResponse:
        async with MqttTransport(TransportConfig(host="127.0.0.1", port=broker.port)) as t:
            assert t.protocol_version == 311
            return await t.request(topic_for(request, "residual"), request)

    assert asyncio.run(main()).worker_id == "w1"


def test_a_worker_whose_subscription_is_refused_after_a_reconnect_stops_with_the_error(repo):
    """The broker takes the request filter, later refuses it on the re-subscribe after a
    reconnect: the worker does not idle on — it drains, stops, and serve raises the error."""
    from tandem.cloud import load_config, serve_async
    from tandem.protocol import PermissionDenied
    from tests._support.mqtt_standin import StandIn

    async def main() -> None:
        async with StandIn() as broker:
            config = load_config({"repo": str(repo), "group": "", "worker_id": "w1",
                                  "broker": f"mqtt://127.0.0.1:{broker.port}"}, env={})
            started = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(serve_async(config, started=started))
            worker, _ = await asyncio.wait_for(started, 30)
            assert worker.ready
            broker.refuse_filter = lambda f: f.startswith("tandem/v1/req/")
            broker.kick_all()
            with pytest.raises(PermissionDenied, match="tandem/v1/req/"):
                await asyncio.wait_for(task, 30)
            assert worker.state == "stopped" and not worker.ready

    asyncio.run(main())
