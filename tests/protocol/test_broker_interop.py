"""The transport against the MQTT brokers users deploy, each started here on a free port:
mosquitto over MQTT 3.1.1 (its MQTT 5 side is the contract suite's own broker), amqtt (PyPI),
NATS's MQTT gateway (Debian's nats-server, JetStream on) and Aedes (npm, with ``noDelay``).

The broker-dependent tests of the contract suite run against each with the default
configuration (``protocol="auto"``: MQTT 3.1.1 where the broker refuses 5; mosquitto's row is
pinned to 3.1.1), and each broker's known limits are asserted, so the deployment guide's table
(docs/deployment.md) is checked here: MQTT 5 refused and negotiated down, shared subscriptions
accepted and never delivered — which ``serve`` turns into a clear error within seconds —, QoS 2
dropping the connection. A broker that cannot run here is skipped with the reason (.ci/run
installs all of them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tandem.protocol import codec, topics
from tandem.protocol.errors import FailedPrecondition, Unavailable
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import IncomingMessage, TransportConfig
from tests._support.interop import (
    aedes_missing,
    amqtt_missing,
    nats_missing,
    require_broker,
)
from tests.protocol import test_transport_contract as contract

pytestmark = [pytest.mark.timeout(90)]


@dataclass(frozen=True)
class Broker:
    """One broker setup and what it does (the deployment guide's table says the same)."""

    name: str
    missing: Callable[[], str | None]
    make: Callable[..., object]  # (request, max_packet_bytes) -> a started broker handle
    mqtt5: bool
    shared_subscriptions: bool
    qos2: bool
    anonymous_backlog: bool = True  # queues QoS 1 for an anonymous client's persistent session
    protocol: int | None = None  # pinned for this row; None: the default ("auto")


def _mosquitto(request, max_packet_bytes):
    opts = {} if max_packet_bytes is None else {"max_packet_size": max_packet_bytes}
    return request.getfixturevalue("mosquitto_factory")(**opts)


def _amqtt(request, max_packet_bytes):
    return request.getfixturevalue("amqtt_factory")()


def _aedes(request, max_packet_bytes):
    return request.getfixturevalue("aedes_factory")()


def _nats_mqtt(request, max_packet_bytes):
    return request.getfixturevalue("nats_factory")(mqtt=True)


def _mosquitto_missing():
    from tests._support.broker import mosquitto_binary

    return None if mosquitto_binary() else "mosquitto not found (Debian package 'mosquitto')"


BROKERS = {
    b.name: b for b in (
        Broker("mosquitto-311", _mosquitto_missing, _mosquitto, mqtt5=True,
               shared_subscriptions=True, qos2=True, protocol=311),
        Broker("amqtt", amqtt_missing, _amqtt, mqtt5=False, shared_subscriptions=False,
               qos2=True, anonymous_backlog=False),
        Broker("nats-mqtt", nats_missing, _nats_mqtt, mqtt5=False, shared_subscriptions=False,
               qos2=False),
        Broker("aedes", aedes_missing, _aedes, mqtt5=False, shared_subscriptions=False,
               qos2=True),
    )
}


class BrokerNet(contract.Net):
    """The contract suite's ``net`` for one of these brokers, with the default configuration
    (or the row's pinned protocol)."""

    def __init__(self, broker: Broker, request) -> None:
        self.broker = broker
        self._request = request
        super().__init__("mqtt", None)

    def reset(self, max_packet_bytes: int | None = None) -> BrokerNet:
        self.mosquitto = self.broker.make(self._request, max_packet_bytes)
        return self

    def config(self, **kw) -> TransportConfig:
        if self.broker.protocol is not None:
            kw.setdefault("protocol", self.broker.protocol)
        return super().config(**kw)


@pytest.fixture(params=sorted(BROKERS))
def broker(request) -> Broker:
    b = BROKERS[request.param]
    require_broker(b.missing())  # skipped, or failed under TANDEM_REQUIRE_BROKERS=1
    return b


@pytest.fixture
def net(broker, request) -> BrokerNet:
    return BrokerNet(broker, request)


# -- the contract's broker-dependent tests, against each broker ---------------------------------

_CONTRACT = [
    "test_request_response_and_the_handlers_context",
    "test_the_sync_shell_over_each_transport",
    "test_a_reply_topic_other_than_the_senders_is_refused",
    "test_garbage_on_every_topic_never_stops_server_or_client",
    "test_publish_returns_a_handle_for_the_brokers_acknowledgement",
    "test_retained_messages_reach_later_subscribers",
    "test_big_messages_travel_in_chunks_through_a_capped_broker",
    "test_unsubscribe_stops_delivery_and_subscribe_replaces_a_handler",
    "test_an_outage_fails_fast_and_everything_comes_back",
    "test_the_last_will_is_published_when_a_client_is_lost",
    "test_dtypes_travel_unchanged",
]
for _name in _CONTRACT:
    globals()[_name] = getattr(contract, _name)


def test_a_shared_subscription_answers_each_request_once(net, broker):
    if not broker.shared_subscriptions:
        pytest.skip(f"{broker.name} has no shared subscriptions (asserted in "
                    "test_known_limits_shared_subscriptions)")
    contract.test_a_shared_subscription_answers_each_request_once(net)


def test_a_persistent_sessions_backlog_is_held_for_its_handler_within_bounds(net, broker):
    if not broker.anonymous_backlog:
        pytest.skip(f"{broker.name} queues nothing for anonymous clients (asserted in "
                    "test_known_limits_anonymous_backlog)")
    contract.test_a_persistent_sessions_backlog_is_held_for_its_handler_within_bounds(net)


# -- each broker's known limits ------------------------------------------------------------------


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def test_the_default_configuration_connects_and_serves(net, broker):
    """``TransportConfig()`` as it comes (protocol "auto") connects to every broker: MQTT 5
    where the broker has it, 3.1.1 where it refuses 5; a request goes round."""

    async def main() -> None:
        cfg = TransportConfig(host=net.mosquitto.host, port=net.mosquitto.port)
        async with MqttTransport(cfg) as server, MqttTransport(cfg) as client:
            assert server.protocol_version == (5 if broker.mqtt5 else 311)
            await server.serve(topics.request_filter(), contract.echo)
            req = contract.make_request()
            assert (await client.request(contract.REQ, req)).id == req.id

    run(main())


def test_known_limits_mqtt5(net, broker):
    """MQTT 5 where the broker has it; an explicit 5 is refused at once with the broker's 0x84
    otherwise, in one line that names the version and the way out ('auto')."""

    async def main() -> None:
        t = MqttTransport(net.config(protocol=5, connect_timeout_s=5))
        if broker.mqtt5:
            async with t:
                assert t.connected and t.protocol_version == 5
            return
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await t.connect()
        assert time.monotonic() - t0 < 5  # at once, not a timeout
        text = str(info.value)
        assert "0x84" in text and "MQTT 5" in text and "'auto'" in text and "\n" not in text
        assert not info.value.retryable

    run(main())


def test_known_limits_shared_subscriptions(net, broker):
    """Shared subscriptions: delivered to one member (mosquitto); the others accept the
    SUBSCRIBE and deliver nothing through it (asserted with a plain subscription, the
    self-check off), and ``serve`` on a shared filter turns that into a one-line
    FailedPrecondition within seconds, leaving nothing subscribed."""

    async def main() -> None:
        async with net.transport() as member, net.transport() as peer:
            shared: list[IncomingMessage] = []
            plain: list[IncomingMessage] = []
            await member.subscribe("$share/g/probe/x", shared.append)  # accepted
            await member.subscribe("probe/y", plain.append)
            await (await peer.publish("probe/x", b"1", qos=1))
            await (await peer.publish("probe/y", b"2", qos=1))
            await contract.until(lambda: plain)  # the broker routes; "probe/x" had its chance
            await asyncio.sleep(0.5)
            assert member.connected
            assert bool(shared) is broker.shared_subscriptions
        async with net.transport(share_check_timeout_s=2.0) as worker:
            flt = topics.request_filter("workers")
            t0 = time.monotonic()
            if broker.shared_subscriptions:
                await worker.serve(flt, contract.echo)
                assert worker.stats().serving[flt].probes >= 1  # dropped, never handled
                return
            with pytest.raises(FailedPrecondition) as info:
                await worker.serve(flt, contract.echo)
            assert time.monotonic() - t0 < 2.0 + 3.0  # the check's time, and a little
            text = str(info.value)
            assert "\n" not in text and "delivered nothing" in text
            assert "does not support shared subscriptions" in text and "nats://" in text
            assert worker.stats().serving == {} and worker.connected

    run(main())


def test_known_limits_qos2(net, broker):
    """QoS 2 round trips where the broker has it; NATS's gateway drops the connection on a
    QoS 2 PUBLISH (Tandem's default QoS is 1)."""

    async def main() -> None:
        async with net.transport(qos=2) as server, net.transport(qos=2) as client:
            await server.serve(topics.request_filter(), contract.echo)
            drops: list[bool] = []
            client.add_connection_listener(drops.append)
            if broker.qos2:
                req = contract.make_request()
                assert (await client.request(contract.REQ, req)).id == req.id
                assert drops == []
                return
            await client.publish("probe/qos2", codec.encode(contract.make_request()), qos=2)
            await contract.until(lambda: drops[:1] == [False])

    run(main())


def test_known_limits_anonymous_backlog(net, broker):
    """amqtt keeps a persistent session's subscriptions but queues nothing for it while an
    anonymous client is away (MQTT 3.1.2.4 as amqtt reads it); the others queue QoS 1."""
    if broker.anonymous_backlog:
        pytest.skip(f"{broker.name} queues the backlog (the contract test checks it)")

    async def main() -> None:
        cfg = dict(client_id="cam-away", clean_start=False, session_expiry_s=300)
        async with net.transport(**cfg) as device:
            await device.subscribe("tandem/v1/assign/cam-away", lambda m: None)
        async with net.transport() as fleet:
            await (await fleet.publish("tandem/v1/assign/cam-away", b"bundle", qos=1))
        async with net.transport(**cfg) as device:
            got: list[IncomingMessage] = []
            await device.subscribe("tandem/v1/assign/cam-away", got.append)
            async with net.transport() as fleet:
                await (await fleet.publish("tandem/v1/assign/cam-away", b"live", qos=1))
            await contract.until(lambda: got)
            await asyncio.sleep(0.3)
            assert [m.payload for m in got] == [b"live"]  # the one sent while away is gone

    run(main())


def test_a_missing_broker_skips_or_fails_under_tandem_require_brokers(monkeypatch):
    monkeypatch.delenv("TANDEM_REQUIRE_BROKERS", raising=False)
    require_broker(None)  # the broker runs here: nothing happens
    with pytest.raises(pytest.skip.Exception, match="no such broker"):
        require_broker("no such broker")
    monkeypatch.setenv("TANDEM_REQUIRE_BROKERS", "1")  # .ci/run, which installs every broker
    with pytest.raises(pytest.fail.Exception, match=r"no such broker.*TANDEM_REQUIRE_BROKERS=1"):
        require_broker("no such broker")
