"""The shared-subscription self-check of ``serve`` (protocol/transport/_share.py) on a real
mosquitto: a probe confirms delivery before ``serve`` returns, never reaches a handler (the
prober's or another worker's of the group), is never answered, and a broker ACL that drops it
is named. The brokers without shared subscriptions are in test_broker_interop.py, ejabberd's
disconnect in test_mqtt_connection.py, the fleet's generated ACL in
tests/devices/fleet/test_broker.py.
"""

from __future__ import annotations

import asyncio

import pytest

from tandem.protocol import topics
from tandem.protocol.errors import FailedPrecondition, PermissionDenied
from tandem.protocol.messages import InferenceRequest, InferenceResponse
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import (
    IncomingMessage,
    MemoryBroker,
    MemoryTransport,
    TransportConfig,
)
from tandem.protocol.transport._share import PROBE_MARKER, confirm_delivery
from tests.protocol import test_transport_contract as contract

pytestmark = [pytest.mark.timeout(60)]

GROUP_FILTER = topics.request_filter("workers")


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 45))


def cfg(broker, **kw) -> TransportConfig:
    return TransportConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, **kw)


class CountingWorker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[InferenceRequest] = []

    def __call__(self, request: InferenceRequest, context) -> InferenceResponse:
        self.requests.append(request)
        return InferenceResponse(id=request.id, worker_id=self.name)


def test_workers_of_a_group_confirm_delivery_and_no_handler_sees_a_probe(mosquitto):
    async def main() -> None:
        workers = [CountingWorker(f"w{i}") for i in range(3)]
        replies: list[IncomingMessage] = []
        async with MqttTransport(cfg(mosquitto)) as watcher, \
                MqttTransport(cfg(mosquitto)) as a, MqttTransport(cfg(mosquitto)) as b, \
                MqttTransport(cfg(mosquitto)) as c, MqttTransport(cfg(mosquitto)) as device:
            await watcher.subscribe("tandem/v1/resp/+", replies.append)
            for transport, worker in zip((a, b, c), workers, strict=True):  # each probes the group
                await transport.serve(GROUP_FILTER, worker)
            probes = sum(t.stats().serving[GROUP_FILTER].probes for t in (a, b, c))
            assert probes >= 3  # each server dropped what came to it, before decoding
            assert all(w.requests == [] for w in workers)
            sent = [contract.make_request() for _ in range(30)]
            answers = await asyncio.gather(*(device.request(contract.REQ, r) for r in sent))
            assert [x.id for x in answers] == [r.id for r in sent]
            handled = [r.id for w in workers for r in w.requests]
            assert sorted(handled) == sorted(r.id for r in sent)  # each request once
            await contract.until(lambda: len(replies) >= len(sent))
            await asyncio.sleep(0.2)
            assert all(m.topic == contract.RESP for m in replies)  # no answer to a probe
            for t in (a, b, c):
                s = t.stats().serving[GROUP_FILTER]
                assert s.undecodable == 0 and s.refused == 0

    run(main())


def test_a_probe_that_another_member_receives_is_dropped_there_not_answered(mosquitto):
    """The served group hands a probe to any one member: here the only member is another
    worker, which must drop it silently (no handler, no reply, nothing counted as bad)."""

    async def main() -> None:
        worker = CountingWorker("w1")
        replies: list[IncomingMessage] = []
        async with MqttTransport(cfg(mosquitto)) as member, \
                MqttTransport(cfg(mosquitto)) as prober, \
                MqttTransport(cfg(mosquitto)) as watcher:
            await watcher.subscribe("tandem/v1/#", replies.append)
            await member.serve(GROUP_FILTER, worker)
            before = member.stats().serving[GROUP_FILTER].probes
            await confirm_delivery(prober, GROUP_FILTER)  # the prober is not in the group
            await contract.until(
                lambda: member.stats().serving[GROUP_FILTER].probes > before)
            await asyncio.sleep(0.2)
            s = member.stats().serving[GROUP_FILTER]
            assert worker.requests == [] and s.answered == 0
            assert s.undecodable == 0 and s.refused == 0
            assert {m.topic for m in replies} == {topics.probe_topic()}  # only the probes
            assert all(m.payload.startswith(PROBE_MARKER) for m in replies)
            assert prober.stats().serving == {}  # nothing left behind by the check
            assert set(prober._subs) == set()

    run(main())


@pytest.mark.parametrize("protocol", [5, 311])
def test_a_probe_the_broker_acl_drops_is_named(mosquitto_factory, tmp_path, protocol):
    """A worker whose ACL reads the requests but may not write the probe topic: MQTT 5 hears
    the broker's 0x87 and says so; over 3.1.1 the broker drops the probe silently, and the
    error says that an ACL may be why. Nothing stays subscribed; with the check off, serve
    returns."""
    acl = tmp_path / "acl"
    acl.write_text("user worker\ntopic read tandem/v1/req/+/+\ntopic write tandem/v1/resp/+\n")
    broker = mosquitto_factory(users={"worker": "pw"}, extra_config=f"acl_file {acl}\n")

    async def main() -> None:
        config = cfg(broker, username="worker", password="pw", protocol=protocol,
                     share_check_timeout_s=1.5)
        async with MqttTransport(config) as t:
            with pytest.raises((PermissionDenied, FailedPrecondition)) as info:
                await t.serve(GROUP_FILTER, CountingWorker("w"))
            text = str(info.value)
            assert "\n" not in text and topics.probe_topic() in text
            if protocol == 5:
                assert isinstance(info.value, PermissionDenied) and "0x87" in text
            else:
                assert isinstance(info.value, FailedPrecondition) and "ACL" in text
            assert t.stats().serving == {} and not t._subs
        off = cfg(broker, username="worker", password="pw", share_check_timeout_s=0)
        async with MqttTransport(off) as t:
            await t.serve(GROUP_FILTER, CountingWorker("w"))
            assert GROUP_FILTER in t.stats().serving

    run(main())


def test_transports_whose_shared_subscriptions_cannot_fail_do_not_probe():
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker) as t:
            await t.serve(GROUP_FILTER, CountingWorker("w"))
            assert t.stats().serving[GROUP_FILTER].probes == 0

    run(main())
