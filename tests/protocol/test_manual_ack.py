"""TransportConfig.manual_ack and receive_maximum against a real mosquitto: a served request is
acknowledged when its handler starts it (``ctx.started()``) or answers it, so the broker sends
no more than Receive Maximum unstarted requests; everything else is acknowledged on arrival."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tandem.protocol import (
    InferenceRequest,
    InferenceResponse,
    MqttTransport,
    Tensor,
    TransportConfig,
    new_request_id,
)
from tandem.protocol.errors import InvalidArgument

pytestmark = pytest.mark.broker


def test_receive_maximum_is_checked():
    with pytest.raises(InvalidArgument, match="receive_maximum"):
        TransportConfig(receive_maximum=0)
    assert TransportConfig(receive_maximum=3, manual_ack=True).receive_maximum == 3


def _request() -> InferenceRequest:
    x = (Tensor.from_array("x", np.zeros(2, np.float32)),)
    return InferenceRequest(id=new_request_id(), device_id="d", model_digest="a" * 64,
                            cut_id=0, budget_ms=30_000, tensors=x)


def test_the_broker_sends_no_more_than_receive_maximum_unstarted_requests(mosquitto):
    async def main() -> None:
        server_cfg = TransportConfig(port=mosquitto.port, protocol=5, receive_maximum=2,
                                     manual_ack=True, client_id="acker")
        release = asyncio.Event()
        arrived: list[bytes] = []
        other: list[bytes] = []

        async def handler(request, ctx):
            arrived.append(request.id)
            await release.wait()  # neither started nor answered until released
            return InferenceResponse(id=request.id)

        async with MqttTransport(server_cfg) as server, \
                MqttTransport(TransportConfig(port=mosquitto.port)) as client:
            await server.subscribe("side/#", lambda msg: other.append(bytes(msg.payload)),
                                   qos=1)
            await server.serve("tandem/v1/req/+/+", handler, max_concurrency=100)
            requests = [_request() for _ in range(8)]
            for r in requests:
                await client.publish_message("tandem/v1/req/d/m", r, qos=1)
            for i in range(5):  # another subscription: acknowledged on arrival, never held
                await client.publish(f"side/{i}", b"x", qos=1)
            await asyncio.sleep(0.5)
            assert len(arrived) == 2  # the window: Receive Maximum unacknowledged requests
            release.set()  # answered (and so acknowledged): the broker sends the rest
            for _ in range(100):
                if len(arrived) == 8:
                    break
                await asyncio.sleep(0.05)
            assert sorted(arrived) == sorted(r.id for r in requests)
            assert len(other) == 5

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_handler_that_starts_a_request_opens_the_window_before_answering(mosquitto):
    async def main() -> None:
        server_cfg = TransportConfig(port=mosquitto.port, protocol=5, receive_maximum=2,
                                     manual_ack=True, client_id="starter")
        release = asyncio.Event()
        arrived: list[bytes] = []

        async def handler(request, ctx):
            arrived.append(request.id)
            ctx.started()  # a queueing handler: started now, answered later
            await release.wait()
            return InferenceResponse(id=request.id)

        async with MqttTransport(server_cfg) as server, \
                MqttTransport(TransportConfig(port=mosquitto.port)) as client:
            await server.serve("tandem/v1/req/+/+", handler, max_concurrency=100)
            for _ in range(6):
                await client.publish_message("tandem/v1/req/d/m", _request(), qos=1)
            for _ in range(100):
                if len(arrived) == 6:
                    break
                await asyncio.sleep(0.05)
            assert len(arrived) == 6  # every one started, none answered yet
            release.set()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_sync_handler_on_its_thread_acknowledges_through_the_loop(mosquitto):
    import threading

    async def main() -> None:
        server_cfg = TransportConfig(port=mosquitto.port, protocol=5, receive_maximum=2,
                                     manual_ack=True, client_id="threaded")
        release = threading.Event()
        arrived: list[bytes] = []

        def handler(request, ctx):  # sync: runs on the server's handler threads
            arrived.append(request.id)
            if len(arrived) <= 2:
                ctx.started()  # from a handler thread: the PUBACK still goes out on the loop
            assert release.wait(20)
            return InferenceResponse(id=request.id)

        async with MqttTransport(server_cfg) as server, \
                MqttTransport(TransportConfig(port=mosquitto.port)) as client:
            await server.serve("tandem/v1/req/+/+", handler, max_concurrency=8)
            requests = [_request() for _ in range(6)]
            for r in requests:
                await client.publish_message("tandem/v1/req/d/m", r, qos=1)
            try:
                await asyncio.sleep(0.6)
                # the two started ones were acknowledged (from their threads), which opened
                # the window for more (mosquitto 2.0.11 sends two per PUBACK: #2301)
                assert len(arrived) > 2
            finally:
                release.set()
            for _ in range(100):
                if len(arrived) == 6:
                    break
                await asyncio.sleep(0.05)
            assert sorted(arrived) == sorted(r.id for r in requests)

    asyncio.run(asyncio.wait_for(main(), 30))
