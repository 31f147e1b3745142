"""Fleet commands that talk to the broker as well as the registry: assign, republish, clear a
removed device's retained topics, and read the devices' heartbeats.

``assign`` keeps "one command, one transaction, nothing half-done": the bundle is verified
(signed) and its archive staged first, then the broker is reached (an unreachable broker stops
the command here, with nothing changed), then the registry records the assignment in one
transaction and the archive is installed, and only then are the retained assignments published.
If publishing fails after the commit, the error says so and ``tandem fleet sync --publish``
publishes every recorded assignment again (retained messages are idempotent).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from tandem.devices.fleet._bundles import prepare_bundle
from tandem.devices.fleet._fleet import Fleet, assignment_message
from tandem.devices.fleet._live import StatusBoard, admin_session
from tandem.devices.fleet._status import DEFAULT_STALE_S, DeviceRow, build_rows
from tandem.protocol.errors import InvalidArgument, TandemError, Unavailable
from tandem.protocol.messages import Assignment

__all__ = [
    "AssignResult",
    "CheckResult",
    "assign",
    "check_enrollment",
    "clear_retained",
    "collect_rows",
    "publish_all",
]


@dataclass
class AssignResult:
    digest: str
    model: str
    devices: list[str]
    uris: list[str]
    assignments: list[Assignment]


def _bundle_uris(fleet: Fleet, digest: str, archive: str, urls: Sequence[str]) -> list[str]:
    """The archive's URLs: ``urls`` with ``{digest}`` replaced (e.g. the cloud endpoint's
    ``http://HOST:8080/v2/bundles/{digest}``), else ``bundles.base_url`` + ``/bundles/NAME``
    (what ``tandem fleet dashboard`` serves)."""
    if urls:
        out = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise InvalidArgument(f"--url must be an http(s) URL, not {url!r}")
            out.append(url.replace("{digest}", digest))
        return out
    base = fleet.settings.bundle_base_url
    if not base:
        raise InvalidArgument(
            "no URL to fetch the bundle from: pass --url (where fleet/bundles/ is served), or "
            "set bundles.base_url in fleet.toml (e.g. the dashboard's http://HOST:PORT)")
    return [f"{base}/bundles/{quote(archive)}"]


async def assign(fleet: Fleet, bundle_path: str, *, devices: Sequence[str] = (),
                 group: str | None = None, sign: bool = False, urls: Sequence[str] = (),
                 broker_url: str | None = None) -> AssignResult:
    """Assign a bundle to devices and/or a group and publish the retained assignments."""
    # cheap checks of the targets before any work on the bundle
    fleet._read(lambda tx: fleet.resolve_targets(tx, devices, group))
    prepared = prepare_bundle(fleet.layout, bundle_path, sign=sign)
    try:
        uris = _bundle_uris(fleet, prepared.row["digest"], prepared.row["archive_name"], urls)
        enrollment = fleet.admin_enrollment()
        async with admin_session(enrollment, broker_url=broker_url) as session:
            targets, at = fleet.record_assignment(
                lambda tx: fleet.resolve_targets(tx, devices, group), prepared.row, uris,
                prepared.staged)
            prepared.staged = None  # installed (or discarded) by the transaction
            row = dict(prepared.row, uris=uris, issued_ms=at)
            messages = [assignment_message(dict(row, device=d, digest=row["digest"]))
                        for d in targets]
            try:
                await session.publish_assignments(messages)
            except TandemError as exc:
                raise Unavailable(
                    f"the assignment is recorded but publishing it failed ({exc}); run "
                    "'tandem fleet sync --publish' to publish it again") from exc
    finally:
        if prepared.staged is not None:
            prepared.staged.discard()
    return AssignResult(prepared.row["digest"], prepared.row["model_name"], targets, uris,
                        messages)


async def publish_all(fleet: Fleet, *, broker_url: str | None = None) -> int:
    """Publish every recorded assignment again (retained); how many."""
    messages = [assignment_message(r) for r in fleet.current_assignments()]
    async with admin_session(fleet.admin_enrollment(), broker_url=broker_url) as session:
        return await session.publish_assignments(messages)


async def clear_retained(fleet: Fleet, device: str, *, broker_url: str | None = None,
                         connect_timeout_s: float = 3.0) -> None:
    async with admin_session(fleet.admin_enrollment(), broker_url=broker_url,
                             connect_timeout_s=connect_timeout_s) as session:
        await session.clear_retained(device)


async def collect_rows(fleet: Fleet, *, broker_url: str | None = None,
                       stale_after_s: float = DEFAULT_STALE_S) -> list[DeviceRow]:
    """The status rows from the retained heartbeats, read once."""
    board = StatusBoard()
    clients = fleet.clients(kind="device")
    async with admin_session(fleet.admin_enrollment(), broker_url=broker_url) as session:
        await session.watch_statuses(board)
    return build_rows(clients, board.statuses, board.history, now_ms=int(time.time() * 1000),
                      stale_after_s=stale_after_s)


@dataclass
class CheckResult:
    auth: str  # "certificate" | "password"
    url: str
    ok: bool
    detail: str


async def check_enrollment(enrollment, *, wait_s: float = 0.0,
                           assignment_wait_s: float = 2.0) -> tuple[list[CheckResult],
                                                                     Assignment | None]:
    """Connect with each of the enrollment's broker URLs (certificate ones with its client
    certificate, password ones with its password); a device also reads its retained
    assignment, an admin client makes a round trip. ``wait_s``: keep retrying a refused or
    unreachable broker this long (a broker that is starting or reloading)."""
    import asyncio
    import dataclasses
    import tempfile
    from pathlib import Path

    from tandem.devices.fleet._live import AdminSession
    from tandem.protocol import codec, topics
    from tandem.protocol.mqtt import MqttTransport

    results: list[CheckResult] = []
    assignment: Assignment | None = None
    deadline = time.monotonic() + wait_s
    plan = [("certificate", i, u) for i, u in enumerate(enrollment.urls)]
    plan += [("password", i, u) for i, u in enumerate(enrollment.password_urls)]
    with tempfile.TemporaryDirectory(prefix="tandem-check-") as secrets:
        for auth, index, url in plan:
            config = enrollment.transport_config(Path(secrets), auth=auth, url_index=index,
                                                 connect_timeout_s=3.0, clean_start=True)
            if enrollment.kind == "admin":  # never take over a running admin tool's session
                config = dataclasses.replace(config,
                                             client_id=f"{enrollment.id}-check-{time.time_ns()}")
            while True:
                transport = MqttTransport(config)
                try:
                    await transport.connect()
                    detail = f"connected as {enrollment.id}"
                    if enrollment.kind == "device" and assignment is None:
                        got: asyncio.Future = asyncio.get_running_loop().create_future()

                        def on_assignment(msg, got=got) -> None:
                            if not got.done() and len(msg.payload):
                                got.set_result(msg.payload)

                        await transport.subscribe(topics.assign_topic(enrollment.id),
                                                  on_assignment)
                        try:
                            payload = await asyncio.wait_for(got, assignment_wait_s)
                            decoded = codec.decode(payload)
                            if isinstance(decoded, Assignment):
                                assignment = decoded
                        except (asyncio.TimeoutError, TandemError):
                            pass
                    elif enrollment.kind == "admin":
                        await AdminSession(transport, enrollment.id).sync()
                        detail += ", round trip through the broker"
                    results.append(CheckResult(auth, url, True, detail))
                    break
                except TandemError as exc:
                    if time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        continue
                    results.append(CheckResult(auth, url, False, str(exc)))
                    break
                finally:
                    await transport.close()
    return results, assignment
