"""Broker URLs select the transport: mqtt[s]:// → MqttTransport, nats:// and tls:// →
NatsTransport (several seeds for a cluster); bad URLs are one-line errors without the
password."""

from __future__ import annotations

import asyncio

import pytest

from tandem.protocol import topics
from tandem.protocol.broker_url import BrokerUrl, parse_broker_url, transport_for_url
from tandem.protocol.errors import InvalidArgument
from tandem.protocol.messages import InferenceResponse
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.nats import NatsTransport
from tandem.protocol.transport import TlsConfig, TransportConfig
from tests.protocol.test_nats import make_request


@pytest.mark.parametrize("url,expected", [
    ("mqtt://broker", BrokerUrl("mqtt", (("broker", 1883),))),
    ("mqtts://broker:8884/", BrokerUrl("mqtts", (("broker", 8884),))),
    ("MQTT://u:p%40ss@10.0.0.1:1884", BrokerUrl("mqtt", (("10.0.0.1", 1884),), "u", "p@ss")),
    ("nats://a:4222,b:4223,c", BrokerUrl("nats", (("a", 4222), ("b", 4223), ("c", 4222)))),
    ("tls://worker@nats.example", BrokerUrl("tls", (("nats.example", 4222),), "worker")),
    ("nats://[::1]:4222", BrokerUrl("nats", (("::1", 4222),))),
])
def test_urls_parse(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url,match", [
    ("broker:1883", "like mqtt://"),
    ("http://broker", "scheme"),
    ("mqtt://broker/path", "no path"),
    ("nats://broker?x=1", "no path"),
    ("mqtt://broker:99999", "bad host or port"),
    ("mqtt://broker:abc", "bad host or port"),
    ("mqtt://", "no host"),
    ("mqtt://a,b", "one broker"),
    ("nats://:secret@broker", "without a user name"),
])
def test_bad_urls_are_one_line_errors(url, match):
    with pytest.raises(InvalidArgument, match=match) as info:
        parse_broker_url(url)
    assert "\n" not in str(info.value)


def test_the_password_never_shows():
    url = "nats://worker:hunter2@a:1,b:2"
    assert "hunter2" not in str(parse_broker_url(url))
    with pytest.raises(InvalidArgument) as info:
        parse_broker_url("mqtt://worker:hunter2@broker/x")
    assert "hunter2" not in str(info.value)
    assert parse_broker_url(url).server_urls() == ["nats://a:1", "nats://b:2"]


def test_transport_for_url_picks_and_configures_the_transport():
    base = TransportConfig(client_id="w1", keepalive_s=7, username="cfg-user")
    t = transport_for_url("mqtts://broker:8883", base)
    assert isinstance(t, MqttTransport)
    assert (t.config.host, t.config.port, t.config.client_id, t.config.keepalive_s,
            t.config.username, t.config.tls) == ("broker", 8883, "w1", 7, "cfg-user",
                                                 TlsConfig())
    t = transport_for_url("nats://u:p@a:1,b:2", base)
    assert isinstance(t, NatsTransport)
    assert t.servers == ["nats://a:1", "nats://b:2"]
    assert (t.config.username, t.config.password, t.config.client_id) == ("u", "p", "w1")
    own = TlsConfig(ca_file="/etc/ca.pem")
    assert transport_for_url("nats://a", TransportConfig(tls=own)).config.tls == own
    assert transport_for_url("mqtts://a", TransportConfig(tls=own)).config.tls == own


def test_a_nats_url_serves_and_an_mqtt_url_requests(nats_factory):
    """The scale-out setup from URLs alone: the worker from nats://, the device from mqtt://
    to the same server's MQTT gateway."""
    server = nats_factory(mqtt=True)

    def echo(request, ctx):
        return InferenceResponse(id=request.id, worker_id="w")

    async def main() -> None:
        worker = transport_for_url(server.url)
        device = transport_for_url(f"mqtt://{server.host}:{server.port}",
                                   TransportConfig(protocol=311))
        async with worker, device:
            await worker.serve(topics.request_filter("workers"), echo)
            req = make_request()
            assert (await device.request(topics.request_topic("cam-01", "m"), req)).id == req.id

    asyncio.run(asyncio.wait_for(main(), 30))
