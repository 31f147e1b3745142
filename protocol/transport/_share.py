"""The shared-subscription self-check: ``serve`` on a ``$share/<group>/<filter>`` proves that the
broker delivers through it before it returns.

Several MQTT brokers accept a ``$share/…`` SUBSCRIBE and then deliver nothing through it (amqtt,
Aedes, NATS's MQTT gateway, RabbitMQ: they take ``$share/g/…`` for an ordinary filter that no
topic matches). A worker serving such a filter would sit idle while every request times out. So
after the SUBSCRIBE is granted the transport sends a **probe**:

* its topic is the served filter with every wildcard level replaced by ``_probe``
  (:func:`tandem.protocol.topics.probe_topic`) — for the workers' filter ``tandem/v1/req/+/+``
  that is ``tandem/v1/req/_probe/_probe`` — so it travels the routes the served filter uses.
  ``_probe`` cannot be a fleet's device id (those start with a letter or digit). A worker needs
  write access to it (a fleet's ACL grants it; for a broker of your own, e.g. mosquitto:
  ``topic write tandem/v1/req/_probe/_probe``);
* its payload is :data:`PROBE_MARKER` and a random nonce: never a protocol frame (every v1
  frame starts with ``0x93``), so every worker that receives it drops it before decoding and
  no handler ever sees it (:meth:`Server.on_message` checks the marker on its error paths
  only: the fast path pays nothing); it carries no MQTT 5 properties, so even a worker of an
  older version just drops it as undecodable;
* the probing worker listens through a shared subscription of its own,
  ``$share/_probe-<nonce>/<probe topic>`` — a group only it belongs to. The served group may
  hand the probe to any of its members (another worker drops it), so the probing worker's own
  group is what it can count on; both are shared subscriptions on the same broker, and on every
  broker seen so far shared subscriptions work for every filter or for none.

The probe is re-sent at growing intervals until it arrives, for at most ``share_check_timeout_s``
(``TransportConfig``; 0 skips the check). If it never arrives — or the broker refuses the
SUBSCRIBE or closes the connection on it (ejabberd) — ``serve`` undoes the subscription and
raises FailedPrecondition with one line naming the limitation and the alternatives: a broker
with shared subscriptions (mosquitto, EMQX, HiveMQ), NATS queue groups
(``tandem cloud serve --broker nats://…``), or one worker on the unshared filter.

Transports whose shared subscriptions cannot fail this way (NATS queue groups, the in-memory
broker) skip the check (``Transport._checks_shared_subscriptions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any, Protocol

from tandem.protocol.errors import FailedPrecondition, PermissionDenied, TandemError, Unavailable
from tandem.protocol.topics import PROBE_LEVEL, probe_topic
from tandem.protocol.transport._config import TransportConfig

__all__ = ["PROBE_MARKER", "confirm_delivery", "explain_refusal", "is_probe", "is_shared"]

PROBE_MARKER = b"TANDEM-SHARE-PROBE/1 "


class Transport(Protocol):
    """What the check needs from its transport (the :class:`Transport` interface)."""

    config: TransportConfig
    _checks_shared_subscriptions: bool

    async def subscribe(self, topic_filter: str, handler: Any, *, qos: int | None = None
                        ) -> None: ...

    async def unsubscribe(self, topic_filter: str) -> None: ...

    async def publish(self, topic: str, payload: bytes, *, qos: int | None = None) -> Any: ...

    async def wait_connected(self, timeout_s: float) -> None: ...
_FIRST_RESEND_S = 0.25
_MAX_RESEND_S = 1.0
_CLEANUP_S = 2.0


def is_shared(topic_filter: str) -> bool:
    return topic_filter.startswith("$share/")


def is_probe(payload: Any) -> bool:
    """Whether a received payload is a shared-subscription probe (never a protocol frame)."""
    return bytes(payload[:len(PROBE_MARKER)]) == PROBE_MARKER


def _unshared(share_filter: str) -> str:
    return share_filter.split("/", 2)[2]


def _unsupported(transport: Transport, share_filter: str, what: str,
                 note: str = "") -> FailedPrecondition:
    c = transport.config
    return FailedPrecondition(
        f"the broker at {c.host}:{c.port} {what}: it does not support shared subscriptions. "
        "Use a broker that has them (mosquitto, EMQX, HiveMQ), NATS queue groups "
        "(tandem cloud serve --broker nats://…), or a single worker on the unshared filter "
        f"{_unshared(share_filter)!r} (tandem cloud serve --group ''){note}")


def explain_refusal(transport: Transport, topic_filter: str, err: TandemError) -> TandemError:
    """The error for a filter the broker refused (SUBACK code, or the connection closed on the
    SUBSCRIBE): for a shared subscription on a transport that checks them, the one line naming
    the limitation and the alternatives; ``err`` itself otherwise (an ACL refusal stays
    PermissionDenied)."""
    if not (transport._checks_shared_subscriptions and is_shared(topic_filter)) \
            or isinstance(err, (PermissionDenied, FailedPrecondition)):
        return err
    if isinstance(err, Unavailable):
        what = f"closed the connection on the shared subscription {topic_filter!r}"
    else:
        what = f"refused the shared subscription {topic_filter!r} ({err.message})"
    return _unsupported(transport, topic_filter, what)


async def confirm_delivery(transport: Transport, share_filter: str) -> None:
    """Send probes matching ``share_filter`` (already subscribed) until one comes back through
    a shared subscription, within ``config.share_check_timeout_s``; raise FailedPrecondition
    when none does, PermissionDenied when the broker refuses the probe's PUBLISH (MQTT 5 tells),
    and whatever the probe's own SUBSCRIBE is refused with."""
    loop = asyncio.get_running_loop()
    timeout_s = transport.config.share_check_timeout_s
    deadline = loop.time() + timeout_s
    topic = probe_topic(share_filter)
    nonce = secrets.token_hex(8)
    payload = PROBE_MARKER + nonce.encode()
    probe_filter = f"$share/{PROBE_LEVEL}-{nonce}/{topic}"
    arrived = asyncio.Event()

    def on_probe(msg: Any) -> None:
        if msg.payload == payload:
            arrived.set()

    try:
        await transport.subscribe(probe_filter, on_probe, qos=1)
    except FailedPrecondition:  # explained, but for the probe's filter: name the served one
        raise _unsupported(transport, share_filter,
                           f"refused a shared subscription next to {share_filter!r}") from None
    try:
        handles: list[Any] = []
        resend_s = _FIRST_RESEND_S
        while not arrived.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                handles.append(await transport.publish(topic, payload, qos=1))
            except Unavailable:  # the link is down: wait for it within the check's time
                with contextlib.suppress(TandemError):
                    await transport.wait_connected(max(0.01, deadline - loop.time()))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrived.wait(), min(resend_s, left))
            resend_s = min(resend_s * 2, _MAX_RESEND_S)
            await _check_acks(handles, topic)
    finally:
        with contextlib.suppress(TandemError, asyncio.TimeoutError):
            await asyncio.wait_for(transport.unsubscribe(probe_filter), _CLEANUP_S)
    if not arrived.is_set():
        raise _unsupported(
            transport, share_filter,
            f"accepted the shared subscription {share_filter!r} but delivered nothing through "
            f"it within {timeout_s:g}s",
            f" (a broker that has them but whose ACL drops the probe needs this client to "
            f"write {topic!r})")


async def _check_acks(handles: list[Any], topic: str) -> None:
    for handle in [h for h in handles if h.done()]:
        handles.remove(handle)
        try:
            await handle
        except PermissionDenied as exc:
            raise PermissionDenied(
                f"the broker does not let this client publish the shared-subscription probe to "
                f"{topic!r} ({exc.message}): allow it (mosquitto: 'topic write {topic}'), or "
                "set share_check_timeout_s=0 to skip the check") from exc
        except TandemError:
            pass  # a lost connection: the next probe goes out after the reconnect
