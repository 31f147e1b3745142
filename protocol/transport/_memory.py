"""An in-process broker and the transport that talks to it, for tests of the components above
the transport (the edge daemon, the cloud endpoint) without a broker process.

:class:`MemoryBroker` does what the MQTT features Tandem uses do on a real broker: topic
filters with ``+``/``#``, shared subscriptions (``$share/<group>/…``, one member per message,
round robin), retained messages, last wills (published when a connection is lost, not on a
clean close), persistent sessions (a client with a fixed id, ``clean_start=False`` and
``session_expiry_s > 0`` keeps its subscriptions and gets the QoS ≥ 1 messages that arrived
while it was away, at most ``max_queued_messages``), message expiry, a packet size cap (a
client over it is disconnected, as mosquitto does; transports chunk below it), and an optional
ACL (``acl(client_id, "publish" | "subscribe", topic) -> bool``: a refused subscription is an
error to the subscriber, a refused publish is dropped silently). It is thread-safe: transports
on different event loops (or :class:`~tandem.protocol.transport.SyncTransport` threads) share
one broker, and each gets its messages on its own loop, in order.

:class:`MemoryTransport` is a :class:`~tandem.protocol.transport.Transport`: everything above
the link is the same code as the MQTT transport's, so the same contract tests hold for both.
Outages are simulated with :meth:`MemoryBroker.stop` / :meth:`MemoryBroker.start` (every client
loses its link and reconnects when the broker is back) and
:meth:`MemoryTransport.break_connection` / :meth:`MemoryTransport.restore_connection` (one
client, as if its network went away: its last will is published).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from tandem.protocol.transport._config import (
    DEFAULT_MAX_PAYLOAD_V5,
    IncomingMessage,
    PublishProperties,
    TransportConfig,
)
from tandem.protocol.transport._core import Transport, _running_loop
from tandem.protocol.transport._log import log
from tandem.protocol.transport._topics import topic_matches

__all__ = ["MemoryBroker", "MemoryTransport"]

Buffer = bytes | bytearray | memoryview
Acl = Callable[[str, str, str], bool]

_PACKET_OVERHEAD = 1024  # as the MQTT transport: room for topic and properties under a cap


class _Session:
    __slots__ = ("client_id", "link", "persistent", "queue", "subscriptions")

    def __init__(self, client_id: str, persistent: bool) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.subscriptions: dict[str, int] = {}  # filter → qos
        self.queue: collections.deque[tuple[float, IncomingMessage]] = collections.deque()
        self.link: MemoryTransport | None = None


class MemoryBroker:
    """An in-process MQTT-like broker (see the module docstring). Starts running."""

    def __init__(self, *, max_packet_bytes: int | None = None, max_queued_messages: int = 1000,
                 acl: Acl | None = None) -> None:
        self.max_packet_bytes = max_packet_bytes
        self.max_queued_messages = max_queued_messages
        self.acl = acl
        self._lock = threading.RLock()
        self._running = True
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, IncomingMessage] = {}
        self._links: set[MemoryTransport] = set()  # transports not closed (they reconnect)
        self._rr = itertools.count()

    @property
    def running(self) -> bool:
        return self._running

    def stop(self) -> None:
        """Every client loses its link (no last wills: the broker is gone). Sessions and
        retained messages survive, as on a broker with persistence."""
        with self._lock:
            self._running = False
            for session in self._sessions.values():
                if session.link is not None:
                    session.link._lost_from_broker("broker stopped")
                    session.link = None

    def start(self) -> None:
        """Run again: every transport that lost its link to the stop reconnects."""
        with self._lock:
            self._running = True
            links = list(self._links)
        for link in links:
            link._broker_back()

    def retained(self) -> dict[str, bytes]:
        """The retained messages, by topic."""
        with self._lock:
            return {t: bytes(m.payload) for t, m in self._retained.items()}

    def clients(self) -> list[str]:
        """Ids of the clients connected now."""
        with self._lock:
            return sorted(s.client_id for s in self._sessions.values() if s.link is not None)

    # -- for MemoryTransport (any thread) -------------------------------------------------------

    def _attach(self, link: MemoryTransport, clean: bool, persistent: bool) -> list[
            IncomingMessage]:
        """Connect ``link``; returns the messages its session queued while it was away."""
        with self._lock:
            if not self._running:
                raise Unavailable("the in-memory broker is stopped")
            session = self._sessions.get(link.client_id)
            if session is not None and session.link not in (None, link):
                session.link._lost_from_broker("session taken over by a new connection")
            if session is None or clean or not session.persistent:
                session = _Session(link.client_id, persistent)
                self._sessions[link.client_id] = session
            session.persistent = persistent
            session.link = link
            self._links.add(link)
            now = time.monotonic()
            backlog = [_aged(m, now - at) for at, m in session.queue]
            session.queue.clear()
            return [m for m in backlog if m is not None]

    def _detach(self, link: MemoryTransport, *, will: bool, forget: bool) -> None:
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is not None and session.link is link:
                session.link = None
                if not session.persistent:
                    del self._sessions[link.client_id]
            if forget:
                self._links.discard(link)
        if will and link.config.will is not None:
            w = link.config.will
            self._route(link.client_id, w.topic, bytes(w.payload), w.qos, w.retain, None,
                        as_broker=True)

    def _subscribe(self, link: MemoryTransport, topic_filter: str, qos: int) -> None:
        with self._lock:
            session = self._session_of(link)
            if self.acl is not None and not self.acl(link.client_id, "subscribe", topic_filter):
                raise PermissionDenied(f"broker refused the subscription {topic_filter!r}: "
                                       "not authorized")
            session.subscriptions[topic_filter] = qos
            if topic_filter.startswith("$share/"):
                return  # retained messages are not sent to shared subscriptions
            for topic, msg in self._retained.items():
                if topic_matches(topic_filter, topic):
                    link._receive_threadsafe(_with(msg, qos=min(qos, msg.qos), retain=True))

    def _unsubscribe(self, link: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            session = self._sessions.get(link.client_id)
            if session is not None and session.link is link:
                session.subscriptions.pop(topic_filter, None)

    def _publish(self, link: MemoryTransport, topic: str, payload: bytes, qos: int,
                 retain: bool, props: PublishProperties | None) -> None:
        with self._lock:
            self._session_of(link)
            cap = self.max_packet_bytes
            if cap is not None and len(payload) + len(topic) + 16 > cap:
                log.warning("in-memory broker: %s sent a packet over max_packet_bytes; "
                            "disconnecting it", link.client_id)
                self._detach(link, will=True, forget=False)
                link._lost_from_broker("packet over the broker's max_packet_bytes")
                raise Unavailable("the broker closed the connection: packet too large")
            if self.acl is not None and not self.acl(link.client_id, "publish", topic):
                return  # dropped silently, as brokers do (no information for the sender)
            self._route(link.client_id, topic, payload, qos, retain, props)

    def _session_of(self, link: MemoryTransport) -> _Session:
        session = self._sessions.get(link.client_id)
        if not self._running or session is None or session.link is not link:
            raise Unavailable("not connected to the in-memory broker")
        return session

    def _route(self, sender: str, topic: str, payload: bytes, qos: int, retain: bool,
               props: PublishProperties | None, as_broker: bool = False) -> None:
        p = props or PublishProperties(content_type=None)
        msg = IncomingMessage(topic=topic, payload=payload, qos=qos, retain=False,
                              response_topic=p.response_topic,
                              correlation_data=p.correlation_data,
                              content_type=p.content_type, message_expiry_s=p.message_expiry_s)
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = msg
                else:
                    self._retained.pop(topic, None)
            groups: dict[tuple[str, str], list[tuple[_Session, int]]] = {}
            for session in list(self._sessions.values()):
                best = -1
                for flt, sub_qos in session.subscriptions.items():
                    if not topic_matches(flt, topic):
                        continue
                    if flt.startswith("$share/"):
                        group = flt.split("/", 2)[1]
                        groups.setdefault((group, flt.split("/", 2)[2]), []).append(
                            (session, sub_qos))
                    else:
                        best = max(best, sub_qos)
                if best >= 0:
                    self._to(session, _with(msg, qos=min(qos, best)))
            for members in groups.values():
                live = [(s, q) for s, q in members if s.link is not None]
                if live:
                    session, sub_qos = live[next(self._rr) % len(live)]
                    self._to(session, _with(msg, qos=min(qos, sub_qos)))

    def _to(self, session: _Session, msg: IncomingMessage) -> None:
        if session.link is not None:
            session.link._receive_threadsafe(msg)
        elif session.persistent and msg.qos > 0 \
                and len(session.queue) < self.max_queued_messages:
            session.queue.append((time.monotonic(), msg))


def _with(msg: IncomingMessage, *, qos: int, retain: bool = False) -> IncomingMessage:
    if msg.qos == qos and msg.retain == retain:
        return msg
    return IncomingMessage(msg.topic, msg.payload, qos, retain, msg.response_topic,
                           msg.correlation_data, msg.content_type, msg.message_expiry_s)


def _aged(msg: IncomingMessage, waited_s: float) -> IncomingMessage | None:
    """A queued message as delivered after ``waited_s``: its expiry counted down, or None."""
    if msg.message_expiry_s is None:
        return msg
    left = msg.message_expiry_s - int(waited_s)
    if left <= 0:
        return None
    return IncomingMessage(msg.topic, msg.payload, msg.qos, msg.retain, msg.response_topic,
                           msg.correlation_data, msg.content_type, left)


class MemoryTransport(Transport):
    """:class:`~tandem.protocol.transport.Transport` over a :class:`MemoryBroker`.

    ``config`` is the same :class:`~tandem.protocol.transport.TransportConfig` as for MQTT;
    what only a network needs (host, port, credentials, TLS, protocol, keepalive) is ignored.
    Chunks are cut at ``max_payload_bytes`` (default 16 MiB), capped by the broker's
    ``max_packet_bytes``."""

    def __init__(self, broker: MemoryBroker, config: TransportConfig | None = None) -> None:
        super().__init__(TransportConfig() if config is None else config)
        if not isinstance(broker, MemoryBroker):
            raise InvalidArgument(f"broker must be a MemoryBroker, not {type(broker).__name__}")
        self.broker = broker
        self._client_id = self.config.client_id or f"tandem-{uuid.uuid4().hex[:16]}"
        self._up = False
        self._epoch = 0  # bumped on every link change: messages in flight to a dead link are lost
        self._broken = False  # break_connection(): stay down until restore_connection()
        self._table: dict[str, int] = {}  # our subscriptions, replayed on every reconnect
        self._reconnecting = False

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def client_id(self) -> str:
        return self._client_id

    def chunk_size(self) -> int:
        size = self.config.max_payload_bytes or DEFAULT_MAX_PAYLOAD_V5
        cap = self.broker.max_packet_bytes
        if cap is not None:
            size = min(size, max(1024, cap - _PACKET_OVERHEAD))
        return size

    # -- outages -----------------------------------------------------------------------------------

    def break_connection(self) -> None:
        """Lose the link as a network failure would (the broker publishes the last will); it
        stays down until :meth:`restore_connection`. From any thread; when it returns, the
        link is down and publishing raises Unavailable."""
        self._on_loop(self._break)

    def restore_connection(self) -> None:
        """End a :meth:`break_connection`: reconnect (re-subscribing everything), at once when
        the broker runs. From any thread; returns once the reconnect has been tried."""
        self._on_loop(self._restore)

    def _break(self) -> None:
        self._broken = True
        if self._up:
            self.broker._detach(self, will=True, forget=False)
            self._link_lost("connection lost (simulated)")

    def _restore(self) -> None:
        self._broken = False
        self._try_reconnect()

    def _on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or self._state != "open":
            raise FailedPrecondition("transport is not connected (call connect()) or is closed")
        if _running_loop() is loop:
            fn()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                fn()
                done.set_result(None)
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        done.result(10.0)

    # -- the link ----------------------------------------------------------------------------------

    async def _connect_impl(self) -> None:
        self._open_link()

    def _open_link(self) -> None:
        c = self.config
        persistent = bool(c.client_id) and not c.clean_start and c.session_expiry_s > 0
        backlog = self.broker._attach(self, clean=c.clean_start or not c.client_id,
                                      persistent=persistent)
        self._up = True
        self._epoch += 1
        for topic_filter, qos in list(self._table.items()):
            try:
                self.broker._subscribe(self, topic_filter, qos)
            except PermissionDenied as exc:
                self._table.pop(topic_filter, None)
                self._subscription_refused(topic_filter, exc)
        for msg in backlog:
            self._receive_threadsafe(msg)
        self._link_changed(True, "connected")

    async def _close_impl(self, timeout_s: float) -> None:
        was_up = self._up
        self._up = False
        self._epoch += 1
        self.broker._detach(self, will=False, forget=True)
        if was_up:
            self._link_changed(False, "closed")

    def _packet(self, topic: str, parts: Sequence[Buffer], total: int, qos: int,
                props: PublishProperties | None) -> bytes:
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]  # type: ignore[return-value]
        return b"".join(parts)  # a copy: the sender may reuse its buffers

    def _send_packet(self, packet: Any, topic: str, qos: int, retain: bool,
                     props: PublishProperties | None,
                     want_ack: bool) -> asyncio.Future | None:
        if not self._up:
            raise Unavailable(f"not connected to the broker; cannot publish to {topic!r}")
        self.broker._publish(self, topic, packet, qos, retain, props)
        if not want_ack:
            return None
        assert self._loop is not None
        ack: asyncio.Future[None] = self._loop.create_future()
        ack.set_result(None)  # the broker has it: acknowledged
        return ack

    def _subscribe_impl(self, topic_filter: str, qos: int) -> asyncio.Future:
        assert self._loop is not None
        answer: asyncio.Future[Any] = self._loop.create_future()
        self._table[topic_filter] = qos
        if not self._up:
            answer.set_result(None)  # sent on the next connect, as the MQTT client does
            return answer
        try:
            self.broker._subscribe(self, topic_filter, qos)
            answer.set_result(None)
        except (PermissionDenied, Unavailable) as exc:
            self._table.pop(topic_filter, None)
            answer.set_result(exc)
        return answer

    def _unsubscribe_impl(self, topic_filter: str) -> asyncio.Future:
        assert self._loop is not None
        self._table.pop(topic_filter, None)
        if self._up:
            self.broker._unsubscribe(self, topic_filter)
        done: asyncio.Future[None] = self._loop.create_future()
        done.set_result(None)
        return done

    # -- from the broker ---------------------------------------------------------------------------

    def _receive_threadsafe(self, msg: IncomingMessage) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._receive, self._epoch, msg)

    def _receive(self, epoch: int, msg: IncomingMessage) -> None:
        if epoch == self._epoch and self._up and self._state == "open":
            self._deliver(msg)

    def _lost_from_broker(self, reason: str) -> None:
        """The broker dropped this link (any thread, broker lock held)."""
        self._up = False  # publishing fails at once from now on
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._link_lost, reason)

    def _link_lost(self, reason: str) -> None:
        if self._state != "open":
            return
        self._up = False
        self._epoch += 1
        self._link_changed(False, reason)

    def _broker_back(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._try_reconnect)

    def _try_reconnect(self) -> None:
        if self._state != "open" or self._up or self._broken or not self.broker.running:
            return
        try:
            self._open_link()
        except Unavailable as exc:
            log.info("in-memory reconnect of %s failed: %s", self.client_id, exc)
