"""`tandem fleet dashboard`, run as a real process: a real headless Chromium loads the page and
the test reads the device rows from the DOM it rendered; the same server hands devices their
bundle archives with range requests (a device resumes a partial download from it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tandem.devices.fleet import Fleet, fetch_bundle, load_enrollment
from tandem.devices.fleet._dashboard import render_page, sparkline
from tandem.devices.fleet._operations import assign
from tandem.devices.fleet._status import DeviceRow
from tandem.protocol import codec, topics
from tandem.protocol.messages import DeviceStatus
from tests._support.broker import free_port
from tests.devices.fleet.test_broker import Inbox, apply, client

pytestmark = pytest.mark.broker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")


class Rows(HTMLParser):
    """The device rows of the page: {device: {cell class: text}}, and each row's SVG points."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.points: dict[str, list[str]] = {}
        self.scripts = 0
        self._row: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "tr" and "device" in (a.get("class") or "").split():
            self._row = a["data-device"]
            self.rows[self._row] = {}
            self.points[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = (a.get("class") or "").split()[-1]
            self.rows[self._row][self._cell] = ""
        elif tag == "polyline" and self._row is not None:
            self.points[self._row].append(a.get("points", ""))

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._cell is not None:
            self.rows[self._row][self._cell] += data


class DashboardProcess:
    def __init__(self, fleet, port: int, log: Path) -> None:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                    f"{os.environ['PATH']}")
        self.url = f"http://127.0.0.1:{port}/"
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "fleet", "dashboard", "--port", str(port),
             "--refresh", "2", "--fleet-dir", str(fleet.layout.root), "--db", fleet.db.url],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(self.url + "status.json", timeout=1) as r:
                    if b'"broker_problem": ""' in r.read():
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling interval of the readiness probe

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def dashboard(fleet, fleet_broker, tmp_path):
    fleet.add_group("lobby")
    fleet.add_device("cam-01", profile="jetson-orin-nano-8gb", group="lobby")
    fleet.add_device("cam-02", profile="cpu-x86_64")
    apply(fleet_broker)
    port = free_port()
    settings = fleet.layout.settings.read_text()
    fleet.layout.settings.write_text(settings.replace(
        'base_url = ""', f'base_url = "http://127.0.0.1:{port}"'))
    process = DashboardProcess(fleet, port, tmp_path / "dashboard.log")
    process.fleet = Fleet.open(fleet.layout.root, fleet.db.url)  # with the new base URL
    yield process
    process.stop()


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)  # polling interval


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                    "chromium; .ci/run installs it)")
def test_chromium_renders_one_row_per_device_with_a_sparkline(fleet, dashboard, tmp_path):
    now = int(time.time() * 1000)
    with client(fleet, "cam-01", tmp_path) as device:
        for i, p50 in enumerate((10.0, 30.0, 20.0)):
            device.publish_message(topics.status_topic("cam-01"), DeviceStatus(
                "cam-01", "online", now - 3000 + i * 1000, bundle_digest="ab" * 32,
                p50_ms=p50, p99_ms=p50 * 2, fallbacks=i,
                plan_mix=(("local", 3), ("<script>alert(1)</script>", 1))), retain=True)

        def seen() -> bool:
            with urllib.request.urlopen(dashboard.url + "status.json", timeout=2) as r:
                return b'"fallbacks": 2' in r.read()

        wait_until(seen)
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
         dashboard.url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = Rows()
    page.feed(proc.stdout)
    assert set(page.rows) == {"cam-01", "cam-02"}
    cam = page.rows["cam-01"]
    assert cam["state"] == "online" and cam["profile"] == "jetson-orin-nano-8gb"
    assert cam["group"] == "lobby" and cam["p50"] == "20.0" and cam["p99"] == "40.0"
    assert cam["fallbacks"] == "2" and cam["bundle"] == "ab" * 6
    assert cam["plans"].startswith("local 75%")
    # the device's text arrives escaped: no script element was created from it
    assert page.scripts == 0 and "<script>" in cam["plans"]
    # p99 and p50 lines, three heartbeats each
    assert len(page.points["cam-01"]) == 2
    assert all(len(p.split()) == 3 for p in page.points["cam-01"])
    assert page.rows["cam-02"]["state"] == "unseen" and page.points["cam-02"] == []
    assert 'http-equiv="refresh"' in urllib.request.urlopen(dashboard.url).read().decode()


@pytest.mark.parametrize("db_url", [None])  # SQLite only: the database plays no part here
def test_a_device_fetches_its_assignment_from_the_dashboard_resuming(fleet, dashboard,
                                                                     compiled_bundle,
                                                                     tmp_path):
    shutil.copytree(compiled_bundle, tmp_path / "bundle")
    result = asyncio.run(assign(dashboard.fleet, str(tmp_path / "bundle"), group="lobby",
                                sign=True))
    inbox = Inbox()
    with client(fleet, "cam-01", tmp_path) as device:
        device.subscribe(topics.assign_topic("cam-01"), inbox)
        inbox.wait_for(topics.assign_topic("cam-01"))
    a = codec.decode(inbox.payloads[0])
    assert a.bundle_uri == f"{dashboard.url}bundles/{result.digest}.tar.zst"
    # half of the archive was fetched before an interruption
    archive = (fleet.layout.bundles_dir / f"{result.digest}.tar.zst").read_bytes()
    store = tmp_path / "device-store"
    (store / ".partial").mkdir(parents=True)
    half = len(archive) // 2
    (store / ".partial" / f"{a.archive_sha256}.part").write_bytes(archive[:half])
    progress: list[int] = []
    enrollment = load_enrollment(fleet.layout.enrollment("cam-01"))
    path = fetch_bundle(a, store, enrollment.bundle_public_key_pem,
                        progress=lambda done, total: progress.append(done))
    assert progress[0] > half and progress[-1] == len(archive)  # continued, not restarted
    assert path == store / result.digest and (path / "manifest.json").is_file()
    # only archive names are served
    for bad in ("bundles/../fleet.toml", "bundles/x.tar.zst", "bundles/%2e%2e%2ffleet.toml"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(dashboard.url + bad, timeout=5)
        assert info.value.code == 404


def test_the_page_escapes_and_draws_without_a_browser():
    row = DeviceRow(id="cam-01", profile="p", group="", state="<b>on</b>", last_seen_ms=1,
                    bundle_digest="", assigned_digest="ab" * 32,
                    history=[(1, 1.0, 2.0), (2, 3.0, 4.0)])
    page = render_page("f&co", [row], now_ms=2000, refresh_s=5, banner="<i>down</i>")
    assert "<b>on</b>" not in page and "&lt;b&gt;on&lt;/b&gt;" in page
    assert "&lt;i&gt;down&lt;/i&gt;" in page and "f&amp;co" in page
    assert 'class="pending"' in page  # assigned, not yet running
    refused = DeviceRow(id="cam-02", profile="p", group="", state="online", last_seen_ms=1,
                        bundle_digest="cd" * 32, assigned_digest="ab" * 32,
                        refused_digest="ab" * 32, refused_reason="signature <bad>")
    page = render_page("f", [refused], now_ms=2000, refresh_s=5)
    assert 'class="refused"' in page and "refused abababababab: signature &lt;bad&gt;" in page
    assert 'class="pending"' not in page
    assert sparkline([]) == ""
    assert sparkline([(1, 0.0, 0.0)]).count("<polyline") == 2
    cascade = DeviceRow(id="cam-02", profile="p", group="", state="online", last_seen_ms=1,
                        bundle_digest="", assigned_digest="", escalation_ratio=0.157,
                        plan_mix=[("small", 84), ("escalate:cloud", 16)])
    rows = Rows()
    rows.feed(render_page("f", [row, cascade], now_ms=2000, refresh_s=5))
    assert rows.rows["cam-02"]["escalated"] == "16%" and rows.rows["cam-01"]["escalated"] == "–"
