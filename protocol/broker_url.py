"""Broker URLs: which transport a URL selects, and the transport made from it.

    mqtt://[user[:password]@]host[:port]     MQTT over TCP (port 1883)     → MqttTransport
    mqtts://[user[:password]@]host[:port]    MQTT over TLS (port 8883)     → MqttTransport
    nats://[user[:password]@]host[:port][,host[:port]…]
                                             core NATS (port 4222)         → NatsTransport
    tls://…                                  NATS over TLS (port 4222)     → NatsTransport

A NATS URL may name several seed servers of a cluster (the client learns the others from them);
an MQTT URL names one broker. The password never appears in ``str()``. Everything else about the
connection (client id, protocol version, keepalive, limits) comes from the
:class:`~tandem.protocol.transport.TransportConfig` given to :func:`transport_for_url`; the URL
sets host, port, TLS and — when it carries them — the credentials. Bad URLs are one-line
InvalidArgument errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from tandem.protocol.errors import InvalidArgument
from tandem.protocol.transport import TlsConfig, Transport, TransportConfig

__all__ = ["DEFAULT_PORTS", "BrokerUrl", "parse_broker_url", "transport_for_url"]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "nats": 4222, "tls": 4222}
_KIND = {"mqtt": "mqtt", "mqtts": "mqtt", "nats": "nats", "tls": "nats"}


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """A parsed broker URL (see the module docstring)."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    @property
    def kind(self) -> str:
        """``"mqtt"`` or ``"nats"``: the transport it selects."""
        return _KIND[self.scheme]

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "tls")

    @property
    def host(self) -> str:
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]

    def server_urls(self) -> list[str]:
        """One URL per host, with this URL's scheme and no credentials."""
        return [f"{self.scheme}://{_netloc(h, p)}" for h, p in self.hosts]

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}" + ",".join(_netloc(h, p) for h, p in self.hosts)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse ``url``; InvalidArgument (one line, without the password) when it is not one of
    the forms above."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument(f"broker must be a URL like mqtt://HOST:PORT or "
                              f"nats://HOST:PORT, not {_redact(url)!r}")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise InvalidArgument(f"broker URL scheme must be mqtt, mqtts, nats or tls, not "
                              f"{scheme!r} ({_redact(url)})")
    cut = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    rest, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/"):
        raise InvalidArgument(f"broker URL takes no path or query: {_redact(url)}")
    userinfo, at, hostlist = rest.rpartition("@")
    if not at:
        userinfo, hostlist = "", rest
    hosts = []
    for part in hostlist.split(","):
        try:
            parsed = urlsplit(f"{scheme}://{part}")
            port = parsed.port
        except ValueError:
            raise InvalidArgument(f"broker URL has a bad host or port: {_redact(url)}") from None
        if not parsed.hostname:
            raise InvalidArgument(f"broker URL has no host: {_redact(url)}")
        hosts.append((parsed.hostname, port or DEFAULT_PORTS[scheme]))
    if len(hosts) > 1 and _KIND[scheme] != "nats":
        raise InvalidArgument(f"an MQTT broker URL names one broker: {_redact(url)}")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if password is not None and username is None:
            raise InvalidArgument(f"broker URL has a password without a user name: "
                                  f"{_redact(url)}")
    return BrokerUrl(scheme, tuple(hosts), username, password)


def _redact(url: object) -> str:
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        userinfo, _, hosts = rest.rpartition("@")
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}"
    return text


def transport_for_url(url: str | BrokerUrl,
                      config: TransportConfig | None = None) -> Transport:
    """The transport ``url`` selects (not connected yet), configured by ``config`` with the
    URL's host, port and credentials (when it carries them); ``mqtts://`` and ``tls://`` add TLS
    with the system trust store unless ``config.tls`` says more (a TLS config is used with any
    scheme). An
    :class:`~tandem.protocol.mqtt.MqttTransport` for ``mqtt://``/``mqtts://``, a
    :class:`~tandem.protocol.nats.NatsTransport` for ``nats://``/``tls://`` (needs the ``nats``
    extra when it connects)."""
    broker = url if isinstance(url, BrokerUrl) else parse_broker_url(url)
    config = TransportConfig() if config is None else config
    changes: dict = {"host": broker.host, "port": broker.port}
    if broker.username is not None:
        changes.update(username=broker.username, password=broker.password)
    if broker.tls and config.tls is None:
        changes["tls"] = TlsConfig()  # the system trust store
    config = dataclasses.replace(config, **changes)
    if broker.kind == "nats":
        from tandem.protocol.nats import NatsTransport

        return NatsTransport(config, servers=broker.server_urls())
    from tandem.protocol.mqtt import MqttTransport

    return MqttTransport(config)
