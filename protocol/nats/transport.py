"""The NATS transport: :class:`NatsTransport`, the :class:`~tandem.protocol.transport.Transport`
interface over core NATS (nats-py, imported on :meth:`~NatsTransport.connect`).

It is how cloud workers scale out on a NATS cluster while devices keep speaking MQTT to NATS's
MQTT gateway: ``serve(topics.request_filter("workers"), …)`` becomes a subscription to
``tandem.v1.req.*.*`` in the NATS queue group ``workers`` — NATS hands each request to one
member of the group, on whichever server of the cluster the member is attached to — and the
answer is published on ``tandem.v1.resp.<device>``, the subject the gateway delivers to the
device's MQTT subscription of ``tandem/v1/resp/<device>``. The payloads are the same protocol
v1 frames as over MQTT (chunked the same way); topics map to subjects as in
:mod:`._subjects`.

What core NATS does differently from an MQTT broker, and what the transport does about it:

* **No broker acknowledgement.** A :class:`~tandem.protocol.transport.PublishHandle` completes
  when the server has answered a PING sent after the message (so the server has it); delivery
  is at most once (a QoS is accepted and ignored).
* **Properties** travel as NATS headers (``Tandem-Response-Topic``,
  ``Tandem-Correlation-Data`` in hex, ``Tandem-Message-Expiry`` in seconds) between NATS
  clients; the MQTT gateway drops headers toward devices and sends none from MQTT 3.1.1.
* **Packet cap**: the server's ``max_payload`` (1 MB by default), announced on connect; chunks
  are cut below it (headers included), as over MQTT 5.
* **No retained messages, last wills or persistent sessions** in core NATS: a retained
  publish reaches the subscribers present and is not kept; a configured ``will`` or
  persistent session is accepted and logged once as not available on NATS.
* **Reconnects**: nats-py reconnects (to any server of the cluster it has learned of) and
  re-subscribes; the delay grows from ``reconnect_min_s`` to ``reconnect_max_s`` and starts
  over only after a connection stayed up for :data:`STABLE_LINK_S`. Publishing while
  disconnected raises Unavailable at once (nats-py's reconnect buffer is never used).
* A subscription the server refuses (permissions) fails its ``subscribe`` call with
  PermissionDenied; refused again after a reconnect, it is dropped with an error to its owner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import ssl
import time
import uuid
from collections.abc import Sequence
from typing import Any

from tandem.protocol.errors import (
    InvalidArgument,
    PayloadTooLarge,
    PermissionDenied,
    TandemError,
    Unavailable,
)
from tandem.protocol.lazy import require
from tandem.protocol.nats._subjects import filter_to_subjects, subject_to_topic, topic_to_subject
from tandem.protocol.transport import (
    DEFAULT_MAX_PAYLOAD_V5,
    MAX_EXPIRY_S,
    IncomingMessage,
    PublishProperties,
    Transport,
    TransportConfig,
    check_topic,
    topic_matches,
)
from tandem.protocol.transport._log import Throttled

__all__ = ["DEFAULT_NATS_PORT", "STABLE_LINK_S", "NatsTransport"]

log = logging.getLogger("tandem.protocol.nats")

DEFAULT_NATS_PORT = 4222
STABLE_LINK_S = 10.0
"""A connection that stayed up this long resets the reconnect delay to ``reconnect_min_s``."""

H_RESPONSE_TOPIC = "Tandem-Response-Topic"
H_CORRELATION = "Tandem-Correlation-Data"
H_EXPIRY = "Tandem-Message-Expiry"
H_MQTT_QOS = "Nmqtt-Pub"  # set by NATS's MQTT gateway on what MQTT clients publish
_MAX_HEADER_VALUE = 1024  # longer Tandem header values from a peer are ignored
_PACKET_OVERHEAD = 1024  # room under max_payload for the headers (checked exactly per packet)

Buffer = bytes | bytearray | memoryview


class _Packet:
    __slots__ = ("headers", "payload", "size", "subject")

    def __init__(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.size = len(payload) + (sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
                                    if headers else 0)


class _Filter:
    """One filter of our table: its NATS subscriptions and whether it is a queue group."""

    __slots__ = ("queue", "subjects", "subs")

    def __init__(self, subjects: list[str], queue: str | None) -> None:
        self.subjects = subjects
        self.queue = queue
        self.subs: list[Any] = []


def _headers(props: PublishProperties | None) -> dict[str, str] | None:
    if props is None:
        return None
    h: dict[str, str] = {}
    if props.response_topic:
        h[H_RESPONSE_TOPIC] = check_topic(props.response_topic)
    if props.correlation_data:
        h[H_CORRELATION] = bytes(props.correlation_data).hex()
    if props.message_expiry_s is not None:
        h[H_EXPIRY] = str(int(props.message_expiry_s))
    return h or None


def _incoming(topic: str, data: bytes, headers: dict[str, str] | None) -> IncomingMessage:
    """A NATS message as the interface's IncomingMessage; headers from a peer are read
    defensively (a bad one is ignored, never fatal)."""
    if not headers:
        return IncomingMessage(topic=topic, payload=data)
    qos = 1 if headers.get(H_MQTT_QOS) in ("1", "2") else 0
    response_topic = correlation = expiry = None
    value = headers.get(H_RESPONSE_TOPIC)
    if value and len(value) <= _MAX_HEADER_VALUE:
        with contextlib.suppress(InvalidArgument):
            response_topic = check_topic(value)
    value = headers.get(H_CORRELATION)
    if value and len(value) <= _MAX_HEADER_VALUE:
        with contextlib.suppress(ValueError):
            correlation = bytes.fromhex(value)
    value = headers.get(H_EXPIRY)
    if value and len(value) <= 10 and value.isdigit() and int(value) <= MAX_EXPIRY_S:
        expiry = int(value)
    return IncomingMessage(topic=topic, payload=data, qos=qos, response_topic=response_topic,
                           correlation_data=correlation, message_expiry_s=expiry)


def _ssl_context(config: TransportConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"TLS files cannot be used: {exc}") from exc
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


class NatsTransport(Transport):
    """:class:`~tandem.protocol.transport.Transport` over core NATS (see the module docstring).

    ``config`` is the same :class:`~tandem.protocol.transport.TransportConfig` as for MQTT:
    ``host``/``port`` name the server (``servers`` — ``nats://host:port`` URLs — overrides
    them with a list of seeds; the client learns the rest of the cluster from the server),
    with ``username``/``password``, ``tls``, ``keepalive_s`` (the PING interval),
    ``connect_timeout_s`` and the reconnect delays. ``protocol`` and ``qos`` have no meaning on
    NATS. Needs nats-py (``pip install 'tandem-rt[nats]'``)."""

    def __init__(self, config: TransportConfig | None = None, *,
                 servers: Sequence[str] | None = None) -> None:
        super().__init__(TransportConfig(port=DEFAULT_NATS_PORT) if config is None else config)
        c = self.config
        if servers is None:
            servers = [f"{'tls' if c.tls else 'nats'}://{c.host}:{c.port}"]
        if isinstance(servers, str) or not servers:
            raise InvalidArgument("servers must be a non-empty list of nats:// URLs")
        self.servers = list(servers)
        self._client_id = c.client_id or f"tandem-{uuid.uuid4().hex[:16]}"
        self._nc: Any = None
        self._errors: Any = None  # nats.errors, once imported
        self._up = False
        self._table: dict[str, _Filter] = {}
        self._out: collections.deque[tuple[_Packet, asyncio.Future | None]] = \
            collections.deque()
        self._out_wake: asyncio.Event | None = None
        self._sender: asyncio.Task | None = None
        self._acks: set[asyncio.Future] = set()
        self._refusals: list[str] = []  # permission errors the server sent, newest last
        self._backoff_s = c.reconnect_min_s
        self._turn = 0
        self._up_since = 0.0
        self._rtt_s: float | None = None
        self._nats_warn = Throttled()
        self._dropped_unmappable = 0
        self._retain_warned = False
        if c.will is not None:
            log.warning("NATS has no last will: %r is not published when this client is lost "
                        "(consumers must judge staleness by age)", c.will.topic)
        if c.client_id and not c.clean_start and c.session_expiry_s > 0:
            log.warning("NATS has no persistent sessions: messages published while %s is away "
                        "are not kept for it", c.client_id)

    # -- what the interface asks -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up and self._nc is not None and self._nc.is_connected

    @property
    def client_id(self) -> str:
        return self._client_id

    def chunk_size(self) -> int:
        size = self.config.max_payload_bytes or DEFAULT_MAX_PAYLOAD_V5
        if self._nc is not None and self._nc.max_payload:
            size = min(size, max(1024, self._nc.max_payload - _PACKET_OVERHEAD))
        return size

    def _unacked_count(self) -> int:
        return len(self._acks)

    def _link_rtt_s(self) -> float | None:
        return self._rtt_s

    # -- connection --------------------------------------------------------------------------

    async def _connect_impl(self) -> None:
        nats = require("nats", "nats")
        self._errors = require("nats.errors", "nats")
        c = self.config
        self._out_wake = asyncio.Event()
        nc = nats.aio.client.Client()
        failures: list[BaseException] = []
        gave_up = asyncio.Event()

        async def on_error(exc: BaseException) -> None:
            if not self._up and self._state == "open" and self._nc is None:
                failures.append(exc)  # the first connect: every seed failed once → give up
                if len(failures) >= len(self.servers) or _is_auth_failure(exc):
                    gave_up.set()
                return
            self._on_error(exc)

        options: dict[str, Any] = dict(
            servers=self.servers, name=self._client_id, error_cb=on_error,
            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed, allow_reconnect=True, max_reconnect_attempts=-1,
            connect_timeout=c.connect_timeout_s, reconnect_time_wait=c.reconnect_min_s,
            ping_interval=c.keepalive_s, max_outstanding_pings=2, user=c.username,
            password=c.password, tls=_ssl_context(c),
            reconnect_to_server_handler=self._next_server)
        if c.tls is not None and c.tls.insecure:
            options["tls_hostname"] = c.host
        connecting = asyncio.ensure_future(nc.connect(**options))
        giving_up = asyncio.ensure_future(gave_up.wait())
        try:
            done, _ = await asyncio.wait({connecting, giving_up}, timeout=c.connect_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            giving_up.cancel()
        if connecting not in done or connecting.exception() is not None:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            with contextlib.suppress(Exception):
                await nc.close()
            raise self._connect_error(connecting, failures)
        self._nc = nc
        self._up = True
        self._up_since = time.monotonic()
        t0 = time.monotonic()
        try:
            await nc.flush(c.connect_timeout_s)
            self._rtt_s = time.monotonic() - t0
        except Exception as exc:  # lost at once: the reconnect logic takes over
            log.debug("first NATS flush failed: %s", exc)
        self._sender = asyncio.ensure_future(self._send_loop())
        self._link_changed(True, "connected")

    def _connect_error(self, connecting: asyncio.Future, failures: list[BaseException]
                       ) -> TandemError:
        where = ", ".join(self.servers)
        seen = list(failures)
        if connecting.done() and not connecting.cancelled():
            failure = connecting.exception()
            if failure is not None:
                seen.append(failure)
        # credentials refused is the answer that matters (the server then resets the socket)
        exc = next((e for e in seen if _is_auth_failure(e)), seen[-1] if seen else None)
        if exc is None:
            return Unavailable(f"no NATS server at {where} answered within "
                               f"{self.config.connect_timeout_s:g}s")
        err = self._translate(exc, f"cannot connect to NATS at {where}")
        err.__cause__ = exc
        return err

    def _translate(self, exc: BaseException, what: str) -> TandemError:
        """The boundary: a nats-py, socket or TLS exception → our error."""
        e = self._errors
        if isinstance(exc, TandemError):
            return exc
        text = str(exc) or type(exc).__name__
        if _is_auth_failure(exc):
            return PermissionDenied(f"{what}: authorization violation (user name or password)")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PermissionDenied(f"{what}: TLS certificate rejected: {exc.verify_message}")
        if isinstance(exc, ssl.SSLError):
            return Unavailable(f"{what}: TLS failure: {exc}", retryable=False)
        if e is not None and isinstance(exc, e.MaxPayloadError):
            return PayloadTooLarge(f"{what}: over the server's max_payload")
        if isinstance(exc, OSError):
            return Unavailable(f"{what}: {exc.strerror or exc}")
        return Unavailable(f"{what}: {text}")

    def _next_server(self, servers: list[Any], info: dict) -> tuple[Any, float]:
        """nats-py's reconnect hook: the next server in turn, after a delay that doubles up to
        ``reconnect_max_s`` (with jitter) and starts over only after a stable connection."""
        delay = self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.config.reconnect_max_s)
        self._turn += 1
        chosen = servers[self._turn % len(servers)] if servers else None
        return chosen, delay * random.uniform(0.8, 1.0)

    async def _on_disconnected(self) -> None:
        if not self._up:
            return
        self._up = False
        if time.monotonic() - self._up_since >= STABLE_LINK_S:
            self._backoff_s = self.config.reconnect_min_s
        self._fail_acks(Unavailable("connection to NATS lost before the server confirmed"))
        if self._state == "open":
            log.warning("NATS connection to %s lost; reconnecting", self._where())
            self._link_changed(False, "connection lost")

    async def _on_reconnected(self) -> None:
        if self._state != "open":
            return
        self._up = True
        self._up_since = time.monotonic()
        log.info("NATS reconnected to %s", self._where())
        self._link_changed(True, "reconnected")

    async def _on_closed(self) -> None:
        if self._state == "open":  # nats-py gave up (e.g. the server revoked our credentials)
            err = self._nc.last_error if self._nc is not None else None
            log.error("NATS closed the connection for good (%s): this transport will not "
                      "reconnect", err)
            if self._up:
                self._up = False
                self._fail_acks(Unavailable("NATS connection closed"))
                self._link_changed(False, f"closed the connection ({err})")

    def _where(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return url.netloc if url is not None else ", ".join(self.servers)

    def _on_error(self, exc: BaseException) -> None:
        e = self._errors
        text = str(exc)
        if "permissions violation" in text.lower():  # nats-py lowercases the server's -ERR
            self._refusals.append(text)
            del self._refusals[:-64]
            if "subscription to" in text.lower():
                self._check_refused_after_reconnect(text)
            else:
                self._nats_warn.warning("publish-denied", "NATS refused a publish: %s", text)
            return
        if e is not None and isinstance(exc, e.SlowConsumerError):
            self._dropped += 1
            self._nats_warn.warning("slow", "NATS: messages dropped for a slow subscription "
                                    "(%s)", text)
            return
        self._nats_warn.warning("error", "NATS: %s", text or type(exc).__name__)

    def _check_refused_after_reconnect(self, text: str) -> None:
        """A permission error for a filter of the table that is not being subscribed right
        now: the server refused it on a re-subscribe. It leaves the table, its owner hears."""
        for topic_filter, entry in list(self._table.items()):
            if entry.subs and any(f'"{s}"' in text for s in entry.subjects):
                self._table.pop(topic_filter, None)
                for sub in entry.subs:
                    self._spawn(_quiet(sub.unsubscribe()))
                self._subscription_refused(topic_filter, PermissionDenied(
                    f"NATS refused the subscription {topic_filter!r}: {text}"))

    async def _close_impl(self, timeout_s: float) -> None:
        nc, self._nc = self._nc, None
        was_up, self._up = self._up, False
        if self._sender is not None:
            self._sender.cancel()
        # what is queued (e.g. the answers close() just gave to requests being served) goes
        # out before the connection closes, within the time left
        deadline = time.monotonic() + timeout_s / 2
        while self._out and nc is not None and nc.is_connected and time.monotonic() < deadline:
            packet, ack = self._out.popleft()
            try:
                await asyncio.wait_for(nc.publish(packet.subject, packet.payload,
                                                  headers=packet.headers),
                                       max(0.01, deadline - time.monotonic()))
            except (asyncio.TimeoutError, Exception) as exc:
                log.debug("publish to %r on close failed: %s", packet.subject, exc)
            self._settle(ack, Unavailable("transport closed"))
        self._fail_acks(Unavailable("transport closed"))
        self._out.clear()
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), max(0.01, timeout_s))
            except (asyncio.TimeoutError, Exception) as exc:
                log.debug("closing the NATS connection: %s", exc)
        if was_up:
            self._link_changed(False, "closed")

    # -- publishing --------------------------------------------------------------------------

    def _packet(self, topic: str, parts: Sequence[Buffer], total: int, qos: int,
                props: PublishProperties | None) -> _Packet:
        subject = topic_to_subject(topic)
        payload = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        packet = _Packet(subject, payload, _headers(props))  # type: ignore[arg-type]
        nc = self._nc
        cap = nc.max_payload if nc is not None else None
        if cap and packet.size > cap:
            raise PayloadTooLarge(f"a {packet.size}-byte packet is over the NATS server's "
                                  f"max_payload ({cap})")
        return packet

    def _send_packet(self, packet: Any, topic: str, qos: int, retain: bool,
                     props: PublishProperties | None,
                     want_ack: bool) -> asyncio.Future | None:
        if not self.connected:
            raise Unavailable(f"not connected to NATS; cannot publish to {topic!r}")
        if retain and not self._retain_warned:
            self._retain_warned = True  # once: a load report is retained every second
            log.warning("NATS keeps no retained messages: %s (and any later retained "
                        "publish) reaches the subscribers present only", topic)
        ack = None
        if want_ack:
            assert self._loop is not None
            ack = self._loop.create_future()
            self._acks.add(ack)
        self._out.append((packet, ack))
        assert self._out_wake is not None
        self._out_wake.set()
        return ack

    async def _send_loop(self) -> None:
        """Writes queued packets in order (nats-py's publish is a coroutine; the interface's
        send is not), then confirms the acknowledged ones with one PING/PONG per batch."""
        assert self._out_wake is not None
        while True:
            await self._out_wake.wait()
            self._out_wake.clear()
            acks: list[asyncio.Future] = []
            while self._out:
                packet, ack = self._out.popleft()
                nc = self._nc
                if nc is None or not nc.is_connected:
                    self._settle(ack, Unavailable("connection to NATS lost before sending"))
                    continue
                try:
                    await nc.publish(packet.subject, packet.payload, headers=packet.headers)
                except Exception as exc:
                    err = self._translate(exc, f"publish to {packet.subject!r} failed")
                    if ack is None:
                        log.debug("%s", err)
                    self._settle(ack, err)
                    continue
                if ack is not None:
                    acks.append(ack)
            if acks:
                self._spawn(self._confirm(acks))

    async def _confirm(self, acks: list[asyncio.Future]) -> None:
        nc = self._nc
        err: TandemError | None = None
        try:
            if nc is None:
                raise Unavailable("transport closed")
            await _server_has_all(nc, self.config.connect_timeout_s)
        except asyncio.CancelledError:
            err = Unavailable("transport closed")
            raise
        except Exception as exc:
            err = self._translate(exc, "the NATS server did not confirm the publish")
        finally:
            for ack in acks:
                self._settle(ack, err)

    def _settle(self, ack: asyncio.Future | None, err: TandemError | None) -> None:
        if ack is None:
            return
        self._acks.discard(ack)
        if not ack.done():
            ack.set_result(err)

    def _fail_acks(self, err: TandemError) -> None:
        acks, self._acks = self._acks, set()
        for ack in acks:
            if not ack.done():
                ack.set_result(err)

    # -- subscriptions -----------------------------------------------------------------------

    def _subscribe_impl(self, topic_filter: str, qos: int) -> asyncio.Future:
        assert self._loop is not None
        answer: asyncio.Future[TandemError | None] = self._loop.create_future()
        try:
            subjects, queue = filter_to_subjects(topic_filter)
        except InvalidArgument as exc:
            answer.set_result(exc)
            return answer
        self._spawn(self._nats_subscribe(topic_filter, _Filter(subjects, queue), answer))
        return answer

    async def _nats_subscribe(self, topic_filter: str, entry: _Filter,
                         answer: asyncio.Future) -> None:
        nc = self._nc
        old = self._table.get(topic_filter)
        err: TandemError | None = None
        seen = len(self._refusals)
        try:
            if nc is None:
                raise Unavailable("transport closed")
            cb = functools.partial(self._on_nats_message, topic_filter)
            for subject in entry.subjects:
                entry.subs.append(await nc.subscribe(subject, queue=entry.queue or "", cb=cb))
            self._table[topic_filter] = entry
            if nc.is_connected:
                await _server_has_all(nc, self.config.connect_timeout_s)
            refused = [t for t in self._refusals[seen:]
                       if any(f'"{s}"' in t for s in entry.subjects)]
            if refused:
                err = PermissionDenied(f"NATS refused the subscription {topic_filter!r}: "
                                       f"{refused[0]}")
        except Exception as exc:
            err = self._translate(exc, f"subscribing {topic_filter!r} failed")
        if err is not None:
            if self._table.get(topic_filter) is entry:
                if old is not None:
                    self._table[topic_filter] = old
                else:
                    del self._table[topic_filter]
            for sub in entry.subs:
                await _quiet(sub.unsubscribe())
        elif old is not None and old is not entry:
            for sub in old.subs:
                await _quiet(sub.unsubscribe())
        if not answer.done():
            answer.set_result(err)

    def _unsubscribe_impl(self, topic_filter: str) -> asyncio.Future:
        assert self._loop is not None
        entry = self._table.pop(topic_filter, None)
        done: asyncio.Future[None] = self._loop.create_future()

        async def run() -> None:
            for sub in entry.subs if entry is not None else ():
                await _quiet(sub.unsubscribe())
            if self._nc is not None and self._nc.is_connected:
                await _quiet(self._nc.flush(max(1, self.config.connect_timeout_s)))
            if not done.done():
                done.set_result(None)

        self._spawn(run())
        return done

    async def _on_nats_message(self, topic_filter: str, msg: Any) -> None:
        if self._state != "open":
            return
        entry = self._table.get(topic_filter)
        if entry is None:
            return
        topic = subject_to_topic(msg.subject)
        if topic is None:
            self._dropped_unmappable += 1
            self._drop("subject", "dropped a message on NATS subject %r: no MQTT topic maps "
                       "to it", msg.subject)
            return
        if len(self._table) > 1 and not self._owns(topic_filter, entry, topic):
            return
        self._deliver(_incoming(topic, msg.data, msg.headers))

    def _owns(self, topic_filter: str, entry: _Filter, topic: str) -> bool:
        """NATS delivers a message once per matching subscription; MQTT once per client. The
        copy that counts is the one of the first plain filter that matches (a queue group's
        copy only when no plain filter matches); the interface then hands it to every
        matching handler."""
        for flt, other in self._table.items():
            if other.queue is None and topic_matches(flt, topic):
                return flt == topic_filter
        return entry.queue is not None


def _is_auth_failure(exc: BaseException) -> bool:
    return type(exc).__name__ == "AuthorizationError" or \
        "authorization violation" in str(exc).lower()


async def _server_has_all(nc: Any, timeout_s: float) -> None:
    """Return once the server has processed everything sent so far (and answered it: a
    refusal arrives before this returns). nats-py's ``flush()`` writes its PING straight to the
    socket while earlier commands may still wait for its flusher task, so the PONG can come
    before the server saw them: the first round trip gets them written, the second is the
    barrier."""
    await nc.flush(max(1, timeout_s))
    await nc.flush(max(1, timeout_s))


async def _quiet(awaitable: Any) -> None:
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("ignored while cleaning up a NATS subscription: %s", exc)
