"""``tandem demo``: the README's main job runs as written, prints its table, exits 0 and leaves
nothing running or behind — also when it is interrupted; a short run on the embedded broker
reports what it measured; bad arguments are one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests._support.terminal import TANDEM, plain_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(240),
]


def _need_extras() -> None:
    pytest.importorskip("onnxruntime", reason="the demo needs the cpu extra")
    pytest.importorskip("aiohttp", reason="the demo needs the edge and cloud extras")
    pytest.importorskip("prometheus_client", reason="the demo needs the edge extra")


def _readme_main_job() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^# main job[^\n]*\n(?P<cmd>[^\n]+)$", readme, re.MULTILINE)
    assert match, "README has no '# main job' line followed by a command"
    return match.group("cmd")


def _ours_running(since: float) -> list[str]:
    """Processes this machine runs that a demo started after ``since`` (by their command lines:
    the demo's temporary directory, its launcher and worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            started = entry.stat().st_mtime
        except OSError:
            continue
        if started >= since and ("tandem-demo-" in cmd or "tandem.lab._launch" in cmd
                                 or "demo-worker" in cmd):
            found.append(cmd)
    return found


def _cgroups_left(pid: int) -> list[str]:
    root = Path("/sys/fs/cgroup/cpu")
    if not root.is_dir():
        return []
    return [p.name for p in root.glob(f"tandem-lab-{pid}-*")]


def _git_status() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                          capture_output=True, text=True, timeout=60).stdout


def test_the_readme_main_job_runs_as_written():
    _need_extras()
    cmd = _readme_main_job()
    assert cmd.startswith("tandem demo")
    before = _git_status()
    since = time.time() - 1
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=plain_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err
    for link in ("wired", "wifi", "3g"):
        assert re.search(rf"^{link} +auto +[\d.]+ +[\d.]+ +\d+ +auto chose ", out, re.M), out
        assert re.search(rf"^{link} +local ", out, re.M) and re.search(rf"^{link} +cloud ", out,
                                                                     re.M)
    assert re.search(r"^wired +split:15 ", out, re.M)
    assert "random" in out and "everything started was stopped" in out
    assert "compiling the demo model" in err  # progress goes to stderr, the table to stdout
    assert _ours_running(since) == [] and _cgroups_left(proc.pid) == []
    assert _git_status() == before


def test_a_short_run_on_the_embedded_broker_reports_what_it_measured(tmp_path):
    _need_extras()
    since = time.time() - 1
    result = tmp_path / "demo.json"
    proc = subprocess.run(
        [TANDEM, "demo", "--broker", "embedded", "--links", "wifi", "--requests", "2",
         "--work-dir", str(tmp_path / "work"), "--json", str(result)],
        env=plain_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(result.read_text())
    assert doc["broker"].startswith("the embedded MQTT 3.1.1 broker")
    assert doc["cuts"] == [3, 11, 15, 50]
    plans = [r["plan"] for r in doc["rows"]]
    assert plans == ["local", "cloud", "split:3", "split:11", "split:15", "split:50", "auto"]
    for row in doc["rows"]:
        assert row["link"] == "wifi" and row["n"] == (4 if row["plan"] == "auto" else 2)
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        if row["plan"] == "local":
            assert row["ran"] == {"local": 2}
        elif row["plan"] != "auto":
            assert row["ran"] == {"cloud": 2}  # forced offloads went to the worker
    auto = doc["rows"][-1]
    assert sum(auto["chosen"].values()) == 4 and set(auto["chosen"]) <= set(plans)
    assert doc["edge_full_ms"] > 0 and doc["cloud_full_ms"] > 0
    assert "cgroup" in doc["throttle"] or "duty cycle" in doc["throttle"]
    # --work-dir keeps the logs of everything it ran
    work = tmp_path / "work"
    assert {"worker.log", "edge.log"} <= {p.name for p in work.iterdir()}
    assert "serving $share" in (work / "worker.log").read_text()
    assert _ours_running(since) == []


def test_interrupted_it_stops_everything_it_started():
    _need_extras()
    since = time.time() - 1
    proc = subprocess.Popen([TANDEM, "demo"], env=plain_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # interrupt it once the processes run
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("link ") or not line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + err
    assert "Traceback" not in err
    assert _ours_running(since) == [] and _cgroups_left(proc.pid) == []
    assert not [p for p in Path("/tmp").glob("tandem-demo-*")
                if p.stat().st_mtime >= since and os.access(p, os.W_OK)]


@pytest.mark.parametrize(("args", "rc", "message"), [
    (["--links", "5g"], 1, "links must be among 3g, lte, wifi, wired, not 5g"),
    (["--links", ","], 1, "links must be among"),
    (["--edge-cpu", "0"], 2, "--edge-cpu"),
    (["--edge-cpu", "1.5"], 2, "--edge-cpu"),
    (["--requests", "0"], 2, "--requests"),
    (["--broker", "nats"], 2, "--broker"),
])
def test_bad_arguments_are_one_line(args, rc, message):
    proc = subprocess.run([TANDEM, "demo", *args], env=plain_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == rc and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
