"""`tandem fleet status`: the devices' retained heartbeats read through the real broker, joined
with the registry; forged, malformed and hostile heartbeats; the table at 80 columns and piped."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tandem.cli import main
from tandem.devices.fleet._live import StatusBoard
from tandem.devices.fleet._operations import collect_rows
from tandem.protocol import codec, topics
from tandem.protocol.messages import DeviceStatus
from tests.devices.fleet.test_broker import apply, client

pytestmark = pytest.mark.broker


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def devices(fleet, fleet_broker):
    fleet.add_group("lobby")
    fleet.add_device("cam-01", profile="jetson-orin-nano-8gb", group="lobby")
    fleet.add_device("cam-02", profile="cpu-x86_64")
    fleet.add_device("a-device-with-a-rather-long-name-01", profile="cpu-x86_64")
    apply(fleet_broker)
    return fleet


def heartbeat(fleet, tmp_path, name: str, **fields) -> None:
    status = DeviceStatus(name, fields.pop("state", "online"), fields.pop("at", now_ms()),
                          **fields)
    with client(fleet, name, tmp_path) as device:
        device.publish_message(topics.status_topic(name), status, retain=True)


def cli(fleet, *args: str) -> list[str]:
    return ["fleet", *args, "--fleet-dir", str(fleet.layout.root), "--db", fleet.db.url]


def test_status_reads_the_retained_heartbeats(devices, tmp_path, capsys):
    heartbeat(devices, tmp_path, "cam-01", bundle_digest="ab" * 32, p50_ms=12.5, p99_ms=48.0,
              fallbacks=3, plan_mix=(("local", 30), ("cut 2", 10)), rtt_ms=20.0)
    heartbeat(devices, tmp_path, "cam-02", state="offline", at=now_ms() - 3_600_000)
    rows = {r.id: r for r in asyncio.run(collect_rows(devices))}
    assert set(rows) == {"cam-01", "cam-02", "a-device-with-a-rather-long-name-01"}
    r = rows["cam-01"]
    assert (r.state, r.bundle_digest, r.p50_ms, r.p99_ms, r.fallbacks) == \
        ("online", "ab" * 32, 12.5, 48.0, 3)
    assert r.plan_mix == [("local", 30), ("cut 2", 10)]
    assert (r.profile, r.group) == ("jetson-orin-nano-8gb", "lobby")
    assert rows["cam-02"].state == "offline"
    assert rows["a-device-with-a-rather-long-name-01"].state == "unseen"

    assert main(cli(devices, "status", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    by_id = {d["id"]: d for d in doc["devices"]}
    assert by_id["cam-01"]["p99_ms"] == 48.0 and by_id["cam-01"]["fallbacks"] == 3
    assert by_id["cam-01"]["plan_mix"] == [["local", 30], ["cut 2", 10]]


def test_the_status_table_fits_a_terminal_and_is_complete_in_a_pipe(devices, tmp_path):
    from tests._support.terminal import on_terminal, piped

    heartbeat(devices, tmp_path, "cam-01", bundle_digest="cd" * 32, p50_ms=12.5, p99_ms=48.0,
              plan_mix=(("local", 74), ("cut 3", 25), ("cloud", 1), ("cut 1", 1)))
    args = cli(devices, "status")[1:]
    args = ["fleet", *args]
    for columns in (80, 60):
        rc, shown, err = on_terminal(args, columns=columns)
        assert rc == 0, err
        lines = shown.splitlines()
        assert lines[0].split()[:3] == ["DEVICE", "STATE", "SEEN"], shown
        assert all(len(line) <= columns for line in lines), shown
        assert "a-device-with-a-rather-long-name-01" in shown  # a name is never cut
        assert "unseen" in shown and "never" in shown
        assert "3 device(s): 1 online, 2 unseen" in shown
    proc = piped(args)
    assert proc.returncode == 0, proc.stderr
    # in a pipe every value is there in full, whatever the width
    assert "48.0" in proc.stdout and "local 73% cut 3 25% cloud 1% …" in proc.stdout, \
        proc.stdout
    assert proc.stdout.splitlines()[-1] == "3 device(s): 1 online, 2 unseen"


def test_a_cascades_escalation_ratio_shows_per_device(devices, tmp_path):
    from tests._support.terminal import on_terminal, piped

    heartbeat(devices, tmp_path, "cam-01", bundle_digest="cd" * 32, p50_ms=3.5, p99_ms=41.0,
              plan_mix=(("small", 84), ("escalate:cloud", 16)), escalation_ratio=0.16)
    heartbeat(devices, tmp_path, "cam-02", bundle_digest="ab" * 32, p50_ms=9.0,
              plan_mix=(("local", 10),))
    rows = {r.id: r for r in asyncio.run(collect_rows(devices))}
    assert rows["cam-01"].escalation_ratio == pytest.approx(0.16) and rows["cam-01"].cascading
    assert not rows["cam-02"].cascading
    args = ["fleet", *cli(devices, "status")[1:]]
    proc = piped(args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[-1] == "ESC"
    cam1 = next(line for line in lines if line.startswith("cam-01"))
    cam2 = next(line for line in lines if line.startswith("cam-02"))
    assert cam1.split()[-1] == "16%" and cam2.split()[-1] == "-"
    rc, shown, err = on_terminal(args, columns=80)
    assert rc == 0, err
    assert all(len(line) <= 80 for line in shown.splitlines()), shown


def test_a_pending_rollout_and_a_stale_heartbeat_show(devices, tmp_path):
    with devices.db.transaction() as tx:  # an assignment as `assign` records it
        tx.execute("INSERT INTO bundles VALUES (?, 'm', '1', 'x', ?, 1, '', 0)",
                   ("ef" * 32, "00" * 32))
        tx.execute("INSERT INTO assignments VALUES ('cam-01', ?, '[]', 0)", ("ef" * 32,))
    heartbeat(devices, tmp_path, "cam-01", bundle_digest="ab" * 32, at=now_ms() - 600_000)
    rows = {r.id: r for r in asyncio.run(collect_rows(devices, stale_after_s=90))}
    assert rows["cam-01"].state == "stale"
    assert rows["cam-01"].rollout == "pending" and rows["cam-01"].assigned_digest == "ef" * 32


def test_a_refused_assignment_shows_with_the_devices_reason(devices, tmp_path, capsys):
    from tests._support.terminal import on_terminal, piped

    with devices.db.transaction() as tx:  # an assignment as `assign` records it
        tx.execute("INSERT INTO bundles VALUES (?, 'm', '1', 'x', ?, 1, '', 0)",
                   ("ef" * 32, "00" * 32))
        tx.execute("INSERT INTO assignments VALUES ('cam-01', ?, '[]', 0)", ("ef" * 32,))
        tx.execute("INSERT INTO assignments VALUES ('cam-02', ?, '[]', 0)", ("ef" * 32,))
    reason = ("archive sha256 is 3b0c…, not the assigned 9a1f…: the download is corrupt or "
              "was tampered with \x1b[31m")
    heartbeat(devices, tmp_path, "cam-01", bundle_digest="ab" * 32, refused_digest="ef" * 32,
              refused_reason=reason)
    # a refusal of an older assignment says nothing about the current one: still pending
    heartbeat(devices, tmp_path, "cam-02", bundle_digest="ab" * 32, refused_digest="cd" * 32,
              refused_reason="old news")
    rows = {r.id: r for r in asyncio.run(collect_rows(devices))}
    assert rows["cam-01"].rollout == "refused" and rows["cam-02"].rollout == "pending"
    assert rows["cam-01"].refused_reason.startswith("archive sha256 is 3b0c…")
    assert "\x1b" not in rows["cam-01"].refused_reason

    assert main(cli(devices, "status", "--json")) == 0
    by_id = {d["id"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
    assert by_id["cam-01"]["rollout"] == "refused"
    assert by_id["cam-01"]["refused_digest"] == "ef" * 32
    assert "tampered with" in by_id["cam-01"]["refused_reason"]

    args = ["fleet", *cli(devices, "status")[1:]]
    rc, shown, err = on_terminal(args, columns=80)
    assert rc == 0, err
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    flat = " ".join(shown.split())  # the reason's line wraps on a terminal, nothing is cut
    assert "cam-01 refused bundle efefefefefef: archive sha256 is 3b0c…" in flat, shown
    assert "tampered with" in flat and "old news" not in flat
    proc = piped(args)
    assert proc.returncode == 0, proc.stderr
    assert "abababab refused efefefef" in proc.stdout
    assert f"cam-01 refused bundle efefefefefef: {reason[:-5]}" in proc.stdout, proc.stdout


def test_forged_malformed_and_hostile_heartbeats(devices, tmp_path):
    """The admin account may write status topics (to clear them): use it as the worst sender
    the ACL allows there."""
    from tandem.devices.fleet import load_enrollment
    from tests.devices.fleet.test_broker import mqtt_client

    admin = load_enrollment(devices.layout.enrollment("tandem-admin"))
    with mqtt_client(admin.transport_config(tmp_path / "admin", auth="password")) as t:
        # on cam-01's topic, a heartbeat naming cam-02
        t.publish_message(topics.status_topic("cam-01"),
                          DeviceStatus("cam-02", "online", now_ms()), retain=True)
        t.publish(topics.status_topic("cam-02"), b"\x93\x01\x03garbage", retain=True)
        t.publish(f"{topics.PREFIX}/status/not/a/device", b"x", retain=False)
        t.publish_message(topics.status_topic("a-device-with-a-rather-long-name-01"),
                          DeviceStatus("a-device-with-a-rather-long-name-01",
                                       "\x1b[31monline\x1b[0m", now_ms(),
                                       plan_mix=(("<b>x</b>\x07", 1),)), retain=True)
    rows = {r.id: r for r in asyncio.run(collect_rows(devices))}
    assert rows["cam-01"].state == "unseen" and rows["cam-02"].state == "unseen"
    hostile = rows["a-device-with-a-rather-long-name-01"]
    assert "\x1b" not in hostile.state and "\x07" not in hostile.plan_mix[0][0]


def test_the_status_board_keeps_a_bounded_history_and_forgets_cleared_devices():
    board = StatusBoard(history=3)
    for i in range(5):
        board.feed(topics.status_topic("cam-01"), codec.encode(
            DeviceStatus("cam-01", "online", 1000 + i, p50_ms=float(i), p99_ms=2.0 * i + 1)))
    board.feed(topics.status_topic("cam-01"), codec.encode(  # the same heartbeat again
        DeviceStatus("cam-01", "online", 1004, p50_ms=4.0, p99_ms=9.0)))
    assert [s[0] for s in board.history["cam-01"]] == [1002, 1003, 1004]
    board.feed(topics.status_topic("cam-01"), b"")
    assert "cam-01" not in board.statuses and "cam-01" not in board.history
    board.feed("tandem/v1/status/x/y", b"")
    board.feed(topics.status_topic("cam-02"), b"\xc1")
    huge = DeviceStatus("cam-02", "online", 1, plan_mix=tuple((f"p{i}", 1) for i in range(3000)))
    board.feed(topics.status_topic("cam-02"), codec.encode(huge))  # over the status limits
    assert board.rejected == 3 and "cam-02" not in board.statuses


def test_status_with_the_broker_down_is_one_line(devices, fleet_broker, capsys):
    fleet_broker.broker.stop()
    assert main(cli(devices, "status")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
