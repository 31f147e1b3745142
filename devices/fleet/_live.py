"""The fleet tools on the broker: publishing retained assignments, clearing a removed device's
retained topics, and reading the devices' retained heartbeats — all as the fleet's admin
client, through :class:`tandem.protocol.mqtt.MqttTransport`.

**Knowing that the broker is done.** Publishes wait for the broker's PUBACK (MQTT 5: a refusal
by the ACL raises PermissionDenied). Retained messages arrive some time after the SUBACK, so
after subscribing the admin client publishes a random marker to its own sync topic (see
:func:`._auth.sync_topic`) and waits for it to come back: the broker queues a client's
deliveries in order, so once the marker is back every retained message queued before it has
been delivered. No sleeping, no guessing a quiet period.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from tandem.devices.fleet._auth import sync_topic
from tandem.devices.fleet._enroll import Enrollment
from tandem.protocol import codec, topics
from tandem.protocol.errors import DeadlineExceeded, ProtocolError, TandemError
from tandem.protocol.messages import Assignment, DeviceStatus

__all__ = ["HISTORY_SAMPLES", "AdminSession", "StatusBoard", "admin_session"]

log = logging.getLogger("tandem.devices.fleet")

HISTORY_SAMPLES = 60  # latency samples kept per device for the dashboard's sparkline
SYNC_TIMEOUT_S = 10.0
# what the admin client accepts from devices: a heartbeat is a few hundred bytes, so a device
# sending megabytes on its status topic is refused before anything of that size is decoded
STATUS_LIMITS = codec.Limits(max_message_bytes=256 * 1024, max_header_bytes=256 * 1024,
                             max_tensors=0, max_tensor_bytes=0, max_list_len=1024)
_ADMIN_REASSEMBLY_BYTES = 1 << 20


class StatusBoard:
    """The latest :class:`DeviceStatus` of each device, from ``tandem/v1/status/+``.

    A heartbeat counts only when it decodes as a DeviceStatus whose ``device_id`` is the device
    named by its topic (the broker's ACL lets a device write only its own status topic; a
    payload naming another device is dropped and counted in ``rejected``). An empty retained
    message (a cleared topic) forgets the device."""

    def __init__(self, history: int = HISTORY_SAMPLES) -> None:
        self.statuses: dict[str, DeviceStatus] = {}
        self.history: dict[str, collections.deque[tuple[int, float, float]]] = {}
        self.rejected = 0
        self._history_len = history

    def feed(self, topic: str, payload: bytes | memoryview) -> None:
        try:
            device = topics.parse_status_topic(topic)
        except TandemError:
            self.rejected += 1
            return
        if len(payload) == 0:
            self.statuses.pop(device, None)
            self.history.pop(device, None)
            return
        try:
            status = codec.decode(payload, STATUS_LIMITS)
        except ProtocolError as exc:
            log.warning("dropped an undecodable status on %s: %s", topic, exc)
            self.rejected += 1
            return
        if not isinstance(status, DeviceStatus) or status.device_id != device:
            log.warning("dropped a status on %s that is not %s's own", topic, device)
            self.rejected += 1
            return
        previous = self.statuses.get(device)
        self.statuses[device] = status
        if previous is None or previous.timestamp_ms != status.timestamp_ms:
            samples = self.history.setdefault(device,
                                              collections.deque(maxlen=self._history_len))
            if status.p50_ms or status.p99_ms:
                samples.append((status.timestamp_ms, status.p50_ms, status.p99_ms))


class AdminSession:
    """A connected admin client (see :func:`admin_session`)."""

    def __init__(self, transport, admin: str) -> None:
        self.transport = transport
        self.admin = admin
        self._waiting: dict[bytes, asyncio.Future[None]] = {}
        self._sync_ready = False

    async def _ensure_sync(self) -> None:
        if not self._sync_ready:
            await self.transport.subscribe(sync_topic(self.admin), self._on_marker, qos=1)
            self._sync_ready = True

    def _on_marker(self, msg) -> None:
        future = self._waiting.pop(bytes(msg.payload), None)
        if future is not None and not future.done():
            future.set_result(None)

    async def sync(self, timeout_s: float = SYNC_TIMEOUT_S) -> None:
        """Return once the broker has handled everything this client sent before, and this
        client has received everything the broker queued for it before."""
        await self._ensure_sync()
        nonce = os.urandom(16)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[nonce] = future
        try:
            await self.transport.publish(sync_topic(self.admin), nonce, qos=1)
            await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the broker did not answer within {timeout_s:g}s") \
                from None
        finally:
            self._waiting.pop(nonce, None)

    async def publish_assignments(self, assignments: Iterable[Assignment]) -> int:
        """Publish each assignment retained (QoS 1) to its device's topic; waits until the
        broker has stored them. Returns how many."""
        handles = [await self.transport.publish_message(topics.assign_topic(a.device_id), a,
                                                        qos=1, retain=True)
                   for a in assignments]
        for handle in handles:  # the broker's PUBACK: stored (or refused: PermissionDenied)
            await handle
        return len(handles)

    async def clear_retained(self, device: str) -> None:
        """Clear a device's retained assignment and heartbeat."""
        for topic in (topics.assign_topic(device), topics.status_topic(device)):
            await (await self.transport.publish(topic, b"", qos=1, retain=True))

    async def watch_statuses(self, board: StatusBoard) -> None:
        """Feed ``board`` from now on; returns once the retained heartbeats are in."""
        await self.transport.subscribe(f"{topics.PREFIX}/status/+",
                                       lambda msg: board.feed(msg.topic, msg.payload), qos=1)
        await self.sync()


@contextlib.asynccontextmanager
async def admin_session(enrollment: Enrollment, *, broker_url: str | None = None,
                        connect_timeout_s: float = 5.0) -> AsyncIterator[AdminSession]:
    """Connect as the fleet's admin client (username/password over the password listener, or
    ``broker_url``), with a fresh client id so several admin tools can run at once."""
    from tandem.protocol.mqtt import MqttTransport

    if broker_url:
        enrollment = dataclasses.replace(enrollment, password_urls=(broker_url,))
    with tempfile.TemporaryDirectory(prefix="tandem-admin-") as secrets_dir:
        config = enrollment.transport_config(
            Path(secrets_dir), auth="password",
            client_id=f"{enrollment.id}-{os.urandom(4).hex()}",
            connect_timeout_s=connect_timeout_s, clean_start=True,
            max_reassembly_bytes=_ADMIN_REASSEMBLY_BYTES)
        transport = MqttTransport(config)
        try:
            await transport.connect()
            yield AdminSession(transport, enrollment.id)
        finally:
            await transport.close()
