"""The MQTT connection's lifecycle against a broker stand-in (tests/_support/mqtt_standin.py)
that misbehaves as real brokers do: version negotiation (MQTT 5 refused by CONNACK, or the
socket closed before it), flapping connections and the reconnect backoff, filters refused on
re-subscribe (by SUBACK, or by dropping the connection on the SUBSCRIBE as ejabberd does with
``$share/``) and the error their owner gets.

The timing assertions are one-sided on purpose: a loaded machine can only make reconnects
later, so the tests bound connection counts from above and gaps from below.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tandem.protocol import topics
from tandem.protocol.errors import FailedPrecondition, PermissionDenied, TandemError, Unavailable
from tandem.protocol.messages import InferenceResponse
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import TransportConfig
from tests._support.mqtt_standin import StandIn

pytestmark = [pytest.mark.timeout(60)]


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 45))


def config(broker: StandIn, **kw) -> TransportConfig:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 2.0)
    kw.setdefault("connect_timeout_s", 3.0)
    return TransportConfig(host=broker.host, port=broker.port, **kw)


async def until(cond, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def echo(request, context) -> InferenceResponse:
    return InferenceResponse(id=request.id)


# -- version negotiation -----------------------------------------------------------------------

# 0x84 (MQTT 5 form), return code 1, the socket closed, the CONNECT never answered
REFUSALS = ["connack", "connack-311", "close", "silent"]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_auto_falls_back_to_311_and_keeps_it_for_reconnects(refusal, caplog):
    async def main() -> None:
        async with StandIn(versions=(4,), version_refusal=refusal) as broker:
            t = MqttTransport(config(broker, connect_timeout_s=1.0))
            assert t.config.protocol == "auto"  # the default
            with caplog.at_level(logging.INFO, logger="tandem.protocol.mqtt"):
                async with t:
                    assert t.protocol_version == 311
                    assert broker.levels == [5, 4]
                    broker.kick_all()
                    await until(lambda: len(broker.connections) == 3 and t.connected)
                    assert broker.levels == [5, 4, 4]  # remembered: no MQTT 5 attempt again
                    assert t.chunk_size() == 1024 * 1024 - 1024  # the 3.1.1 default
            used = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
            assert len(used) == 1 and "with MQTT 3.1.1" in used[0]  # logged once

    run(main())


def test_auto_uses_mqtt5_where_the_broker_has_it(caplog):
    async def main() -> None:
        async with StandIn() as broker:
            with caplog.at_level(logging.INFO, logger="tandem.protocol.mqtt"):
                async with MqttTransport(config(broker)) as t:
                    assert t.protocol_version == 5
            assert broker.levels == [5]
            assert any("with MQTT 5" in r.getMessage() for r in caplog.records)

    run(main())


@pytest.mark.parametrize("refusal", REFUSALS)
def test_an_explicit_version_is_honoured_and_its_refusal_is_one_clear_line(refusal):
    async def main() -> None:
        async with StandIn(versions=(4,), version_refusal=refusal) as broker:
            t = MqttTransport(config(broker, protocol=5, connect_timeout_s=1.0))
            with pytest.raises(Unavailable) as info:
                await t.connect()
            text = str(info.value)
            assert broker.levels == [5]  # no fallback
            assert "\n" not in text
            if refusal == "silent":
                assert "no CONNACK" in text
                return
            assert "MQTT 5" in text and "'auto'" in text and "311" in text
            if refusal != "close":
                assert "0x84" in text and not info.value.retryable
            else:
                assert "RabbitMQ" in text
        async with StandIn(versions=(5,), version_refusal=refusal) as broker:
            t = MqttTransport(config(broker, protocol="311"))  # strings are taken too
            with pytest.raises(Unavailable) as info:
                await t.connect()
            text = str(info.value)
            assert broker.levels == [4]
            assert "\n" not in text and "MQTT 3.1.1" in text and "'auto'" in text
        async with StandIn(versions=(4,)) as broker, \
                MqttTransport(config(broker, protocol=311)) as t:
            assert t.protocol_version == 311 and broker.levels == [4]

    run(main())


def test_auto_against_a_broker_that_takes_neither_names_both():
    async def main() -> None:
        async with StandIn(versions=(3,)) as broker:
            with pytest.raises(Unavailable) as info:
                await MqttTransport(config(broker)).connect()
            assert broker.levels == [5, 4]
            assert "MQTT 5" in str(info.value) and "MQTT 3.1.1" in str(info.value)

    run(main())


def test_protocol_settings_are_checked():
    from tandem.protocol.errors import InvalidArgument
    from tandem.protocol.transport import parse_protocol

    assert [parse_protocol(v) for v in ("auto", " AUTO ", 5, "5", 311, " 311")] == \
        ["auto", "auto", 5, 5, 311, 311]
    for bad in (4, "3", True, None, 5.0, "mqtt5"):
        with pytest.raises(InvalidArgument):
            TransportConfig(protocol=bad)
    for bad in dict(stable_after_s=-1), dict(share_check_timeout_s=float("nan")):
        with pytest.raises(InvalidArgument):
            TransportConfig(**bad)


# -- flap-proof reconnects ---------------------------------------------------------------------


def test_a_flapping_broker_meets_a_growing_backoff():
    """Every connection is dropped 50 ms after its CONNACK: with the delay reset on each CONNACK
    that was a reconnect every ~0.1 s (about 30 in 3 s); now each wait doubles."""

    async def main() -> None:
        async with StandIn(drop_after_s=0.05) as broker:
            t = MqttTransport(config(broker, stable_after_s=1.0))
            async with t:
                loop = asyncio.get_running_loop()
                start = broker.connections[0]
                await asyncio.sleep(max(0.0, start + 3.0 - loop.time()))
                n = broker.connections_between(start, start + 3.0)
            gaps = [b - a for a, b in zip(broker.connections, broker.connections[1:], strict=False)]
            # from the first connection on: 50 ms up, then a delay of 0.05 * 2**k
            assert 3 <= n <= 8, broker.connections
            for k, gap in enumerate(gaps):
                assert gap >= 0.05 + 0.05 * 2 ** k - 0.01, gaps

    run(main())


def test_the_backoff_starts_over_only_once_a_connection_stayed_up():
    async def main() -> None:
        async with StandIn(drop_after_s=0.05, drops=4) as broker:  # then it settles
            t = MqttTransport(config(broker, stable_after_s=2.0))
            async with t:
                client = t._mqtt
                await until(lambda: len(broker.connections) == 5 and t.connected)
                # ready, but not up for stable_after_s yet: the delay is still the grown one
                assert client._reconnect_delay == 0.05 * 2 ** 4
                await until(lambda: client._reconnect_delay == 0.05)  # after stable_after_s
                assert t.connected and len(broker.connections) == 5

    run(main())


# -- filters refused on re-subscribe -------------------------------------------------------------


def test_a_filter_the_broker_drops_the_connection_for_is_dropped_with_an_error_to_its_owner():
    """Subscribed while the broker took it; after a reconnect the broker drops the connection on
    its SUBSCRIBE (ejabberd on $share/): two strikes, then it leaves the table, its owner hears
    why, and the connection stays up — a bounded number of connections, not a storm."""

    async def main() -> None:
        async with StandIn() as broker:
            t = MqttTransport(config(broker, stable_after_s=0.2))
            async with t:
                refused: list[TandemError] = []
                await t.subscribe("$share/g/jobs/+", lambda m: None, on_refused=refused.append)
                await t.subscribe("plain/topic", lambda m: None)
                broker.drop_on_subscribe = lambda f: f.startswith("$share/")
                broker.kick_all()
                await until(lambda: refused)
                await until(lambda: t.connected)
                loop = asyncio.get_running_loop()
                settled = loop.time()
                await asyncio.sleep(1.0)
                assert t.connected
                assert broker.connections_between(settled, loop.time() + 1) == 0
                assert len(broker.connections) == 4  # first, two strikes, then up without it
                err = refused[0]
                assert isinstance(err, FailedPrecondition)
                assert "does not support shared subscriptions" in str(err)
                assert "NATS queue groups" in str(err) and "\n" not in str(err)
                assert t.stats().refused_subscriptions == 1
                # the other filter stays: sent again once the refused one is gone
                assert broker.subscribes[-1] == "plain/topic"
                assert broker.subscribes.count("$share/g/jobs/+") == 3

    run(main())


def test_a_filter_refused_by_suback_on_re_subscribe_is_dropped_with_an_error_to_its_owner():
    async def main() -> None:
        async with StandIn() as broker, MqttTransport(config(broker)) as t:
            refused: list[TandemError] = []
            await t.serve("tandem/v1/req/+/+", echo, on_refused=refused.append)
            broker.refuse_filter = lambda f: f.startswith("tandem/v1/req/")
            broker.kick_all()
            await until(lambda: refused)
            assert isinstance(refused[0], PermissionDenied)
            assert "tandem/v1/req/+/+" in str(refused[0])
            assert t.stats().serving == {}  # the server stopped
            await until(lambda: t.connected)
            assert len(broker.connections) == 2

    run(main())


def test_a_refusal_without_an_owner_callback_is_logged(caplog):
    async def main() -> None:
        async with StandIn() as broker, MqttTransport(config(broker)) as t:
            await t.subscribe("a/b", lambda m: None)
            broker.refuse_filter = lambda f: True
            broker.kick_all()
            await until(lambda: t.stats().refused_subscriptions == 1)

    with caplog.at_level(logging.ERROR, logger="tandem.protocol.transport"):
        run(main())
    assert any("'a/b'" in r.getMessage() for r in caplog.records)


# -- ejabberd: the connection dropped on a $share SUBSCRIBE --------------------------------------


def test_serve_on_ejabberd_fails_at_once_with_one_line_and_no_reconnect_storm():
    async def main() -> None:
        async with StandIn.ejabberd() as broker:
            t = MqttTransport(config(broker))
            async with t:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with pytest.raises(FailedPrecondition) as info:
                    await t.serve(topics.request_filter("workers"), echo)
                assert loop.time() - t0 < t.config.connect_timeout_s  # no timeout waited
                text = str(info.value)
                assert "\n" not in text
                assert "closed the connection on the shared subscription" in text
                assert "does not support shared subscriptions" in text
                for alternative in ("mosquitto", "EMQX", "HiveMQ", "--broker nats://",
                                    "'tandem/v1/req/+/+'"):
                    assert alternative in text
                assert t.stats().serving == {}
                await until(lambda: t.connected)
                window = loop.time()
                await asyncio.sleep(1.5)
                assert broker.connections_between(window, loop.time()) == 0
                assert len(broker.connections) == 2  # the first, and one reconnect after it
                await t.subscribe("tandem/v1/resp/cam-01", lambda m: None)  # still useful
                assert broker.subscribes.count(topics.request_filter("workers")) == 1

    run(main())
