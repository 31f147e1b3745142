"""``tandem fleet dashboard``: the fleet's status as a live web page, server-rendered.

One aiohttp application on the same event loop as the admin client's MQTT subscription:

    GET /               the page: one row per device, refreshed by the browser every few
                        seconds (<meta http-equiv="refresh">), with an inline SVG sparkline of
                        the device's recent p50/p99 latency. No JavaScript, no build step.
    GET /status.json    the same rows as JSON
    GET /bundles/NAME   the fleet's signed bundle archives (fleet/bundles/), with range
                        requests, so devices can fetch (and resume) their assignments here
    GET /healthz        "ok"

Everything a device reports is escaped before it reaches the page. The registry is read at most
every ``registry_ttl_s`` in a worker thread (never on the event loop). When the broker cannot be
reached the page says so and the dashboard keeps trying in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import html
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from tandem.devices.fleet._fleet import Fleet
from tandem.devices.fleet._live import AdminSession, StatusBoard, admin_session
from tandem.devices.fleet._status import (
    DEFAULT_STALE_S,
    DeviceRow,
    age_text,
    build_rows,
    plan_text,
)
from tandem.protocol.errors import TandemError
from tandem.protocol.lazy import require

__all__ = ["Dashboard", "render_page", "sparkline"]

log = logging.getLogger("tandem.devices.fleet.dashboard")

_ARCHIVE = re.compile(r"[0-9a-f]{64}\.tar\.zst")
_RETRY_S = 5.0


def sparkline(samples: list[tuple[int, float, float]], width: int = 120, height: int = 24) -> str:
    """An inline SVG of p50 (solid) and p99 (faint) over the samples; "" without samples."""
    if not samples:
        return ""
    top = max(max(s[1], s[2]) for s in samples) or 1.0
    n = len(samples)

    def points(idx: int) -> str:
        step = width / max(n - 1, 1)
        return " ".join(f"{i * step:.1f},{height - 1 - (s[idx] / top) * (height - 2):.1f}"
                        for i, s in enumerate(samples))

    last = samples[-1]
    title = (f"p50 {last[1]:.1f} ms, p99 {last[2]:.1f} ms (last {n} heartbeats, "
             f"max {top:.1f} ms)")
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} '
            f'{height}" role="img" aria-label="{html.escape(title)}"><title>'
            f'{html.escape(title)}</title>'
            f'<polyline fill="none" stroke="#c9a0a0" stroke-width="1" points="{points(2)}"/>'
            f'<polyline fill="none" stroke="#1f5f9f" stroke-width="1.5" points="{points(1)}"/>'
            "</svg>")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}
.summary{color:#555;margin:0 0 1em}
.banner{background:#fde2e1;border:1px solid #e0a0a0;padding:.4em .8em;margin-bottom:1em}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.state-online .state{color:#1a7f37}.state-offline .state,.state-unseen .state{color:#888}
.state-degraded .state,.state-stale .state{color:#b35900}
.pending{color:#b35900}
.refused{color:#b00020;white-space:normal}
code{font-size:.95em}
"""


def _ms(value: float) -> str:
    return f"{value:.1f}" if value else "–"


def render_page(fleet_name: str, rows: list[DeviceRow], *, now_ms: int, refresh_s: int,
                banner: str = "") -> str:
    """The whole page."""
    esc = html.escape
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no devices"
    stamp = dt.datetime.fromtimestamp(now_ms / 1000, dt.timezone.utc).strftime("%H:%M:%S UTC")
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        f"<title>Tandem fleet {esc(fleet_name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Tandem fleet <code>{esc(fleet_name)}</code></h1>",
        f'<p class="summary">{len(rows)} device(s): {esc(summary)} · updated {stamp}</p>',
    ]
    if banner:
        out.append(f'<p class="banner">{esc(banner)}</p>')
    out.append('<table id="devices"><thead><tr>' + "".join(
        f"<th>{h}</th>" for h in ("Device", "State", "Last seen", "Profile", "Group", "Bundle",
                                  "Plan mix", "p50 ms", "p99 ms", "Fallbacks", "Escalated",
                                  "Latency"))
        + "</tr></thead><tbody>")
    for r in rows:
        bundle = esc(r.bundle_digest[:12]) if r.bundle_digest else "–"
        if r.rollout == "pending":
            bundle += (f' <span class="pending" title="assigned {esc(r.assigned_digest)}">'
                       f"→ {esc(r.assigned_digest[:12])}</span>")
        elif r.rollout == "refused":
            bundle += (f' <span class="refused" title="{esc(r.refused_reason)}">refused '
                       f"{esc(r.assigned_digest[:12])}: {esc(r.refused_reason)}</span>")
        state_class = re.sub(r"[^a-z]", "", r.state.lower()) or "unknown"
        out.append(
            f'<tr class="device state-{state_class}" data-device="{esc(r.id)}">'
            f'<td class="id">{esc(r.id)}</td>'
            f'<td class="state">{esc(r.state)}</td>'
            f'<td class="seen">{esc(age_text(r.last_seen_ms, now_ms))}</td>'
            f'<td class="profile">{esc(r.profile)}</td>'
            f'<td class="group">{esc(r.group)}</td>'
            f'<td class="bundle"><code>{bundle}</code></td>'
            f'<td class="plans">{esc(plan_text(r.plan_mix))}</td>'
            f'<td class="num p50">{_ms(r.p50_ms)}</td>'
            f'<td class="num p99">{_ms(r.p99_ms)}</td>'
            f'<td class="num fallbacks">{r.fallbacks}</td>'
            f'<td class="num escalated">'
            f'{f"{100 * r.escalation_ratio:.0f}%" if r.cascading else "–"}</td>'
            f'<td class="latency">{sparkline(r.history)}</td></tr>')
    out.append("</tbody></table></body></html>")
    return "\n".join(out)


class Dashboard:
    """The dashboard's state: the admin session (reconnected in the background), the status
    board, and a short-lived cache of the registry."""

    def __init__(self, fleet: Fleet, *, broker_url: str | None = None, refresh_s: int = 5,
                 stale_after_s: float = DEFAULT_STALE_S, registry_ttl_s: float = 2.0) -> None:
        self.fleet = fleet
        self.broker_url = broker_url
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.registry_ttl_s = registry_ttl_s
        self.board = StatusBoard()
        self.broker_problem = "connecting to the broker…"
        self._clients: list[dict[str, Any]] = []
        self._clients_at = 0.0
        self._clients_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._session: AdminSession | None = None

    async def _registry(self) -> list[dict[str, Any]]:
        async with self._clients_lock:
            if time.monotonic() - self._clients_at > self.registry_ttl_s:
                self._clients = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: self.fleet.clients(kind="device"))
                self._clients_at = time.monotonic()
            return self._clients

    async def rows(self) -> list[DeviceRow]:
        clients = await self._registry()
        return build_rows(clients, self.board.statuses, self.board.history,
                          now_ms=int(time.time() * 1000), stale_after_s=self.stale_after_s)

    async def _watch(self) -> None:
        enrollment = self.fleet.admin_enrollment()
        while True:
            try:
                async with admin_session(enrollment, broker_url=self.broker_url) as session:
                    self._session = session
                    session.transport.add_connection_listener(self._note_connection)
                    await session.watch_statuses(self.board)
                    self.broker_problem = ""
                    # until cancelled: the transport reconnects and re-subscribes by itself
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise
            except TandemError as exc:
                self.broker_problem = f"broker unreachable: {exc}"
                log.warning("%s (retrying in %gs)", self.broker_problem, _RETRY_S)
            finally:
                self._session = None
            await asyncio.sleep(_RETRY_S)

    def _note_connection(self, up: bool) -> None:
        self.broker_problem = "" if up else "connection to the broker lost; reconnecting…"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def app(self):
        web = require("aiohttp.web", "fleet")
        bundles_dir = self.fleet.layout.bundles_dir

        async def page(request):
            rows = await self.rows()
            body = render_page(self.fleet.settings.name, rows, now_ms=int(time.time() * 1000),
                               refresh_s=self.refresh_s, banner=self.broker_problem)
            return web.Response(text=body, content_type="text/html", charset="utf-8",
                                headers={"Cache-Control": "no-store"})

        async def status_json(request):
            rows = await self.rows()
            return web.json_response({"fleet": self.fleet.settings.name,
                                      "broker_problem": self.broker_problem,
                                      "devices": [r.to_json() for r in rows]})

        async def bundle(request):
            name = request.match_info["name"]
            path = bundles_dir / name
            if not _ARCHIVE.fullmatch(name) or not path.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(path, headers={"Content-Type": "application/zstd"})

        async def healthz(request):
            return web.Response(text="ok\n")

        async def on_startup(app):
            self.start()

        async def on_cleanup(app):
            await self.stop()

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/status.json", status_json)
        app.router.add_get("/bundles/{name}", bundle)
        app.router.add_get("/healthz", healthz)
        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app


async def serve(dashboard: Dashboard, host: str, port: int,
                ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled; ``ready(url)`` once listening."""
    web = require("aiohttp.web", "fleet")
    runner = web.AppRunner(dashboard.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            from tandem.protocol.errors import Unavailable

            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") \
                from exc
        if ready is not None:
            ready(f"http://{host}:{port}/")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
