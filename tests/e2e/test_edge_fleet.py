"""Rollout through the real fleet tools (issue 12 item 4 and its tests): ``tandem fleet`` makes
the fleet, the broker runs the fleet's TLS listeners, password file and ACL, the daemon joins
with ``tandem edge run --enroll`` (its client certificate), and bundles arrive as signed
assignments fetched from ``tandem fleet dashboard`` — the first one into a daemon that has none,
the next one while requests stream (none may fail), and a tampered one, which is refused while
the old bundle keeps serving. A cloud worker joins with its own credentials from the fleet."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests._support.broker import free_port
from tests._support.processes import ROOT, TandemProcess
from tests.e2e.conftest import EDGE_ENV, WORKER_ENV, compile_bundle
from tests.edge.conftest import RequestStream, reference

pytestmark = pytest.mark.broker
pytest.importorskip("cryptography")


def _tandem(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


def _digest(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def _wait(cond, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.05)


def test_an_enrolled_daemon_takes_assignments_and_refuses_a_tampered_one(
        tmp_path, mosquitto_factory, e2e_bundles):
    fleet = tmp_path / "fleet"
    tls, password, plain, dashboard, api = _ports(5)
    pid_file = tmp_path / "broker.pid"
    _tandem("fleet", "init", "--fleet-dir", str(fleet), "--name", "e2e", "--broker-host",
            "localhost", "--bind", "127.0.0.1", "--tls-port", str(tls), "--password-port",
            str(password), "--plain-port", str(plain), "--broker-pid-file", str(pid_file),
            "--bundle-base-url", f"http://127.0.0.1:{dashboard}")
    broker = mosquitto_factory(extra_config=f"include_dir {fleet / 'mosquitto' / 'conf.d'}")
    pid_file.write_text(f"{broker.pid}\n")
    _tandem("fleet", "add", "cam-e2e", "--profile", "cpu-x86_64", "--fleet-dir", str(fleet))
    _tandem("fleet", "add-worker", "w1", "--fleet-dir", str(fleet))

    releases = {}
    for version in (1, 2, 3):
        releases[version] = compile_bundle(tmp_path, "residual", version=version)
    repo = tmp_path / "repo"
    repo.mkdir()
    procs: list[TandemProcess] = []
    try:
        from tandem.devices.fleet import load_enrollment

        enrolled = load_enrollment(fleet / "enroll" / "w1.toml")
        worker = TandemProcess(tmp_path, "cloud", "serve", "--repo", str(repo), "--broker",
                               f"mqtt://127.0.0.1:{plain}", "--worker-id", "w1",
                               env={**WORKER_ENV, "TANDEM_USERNAME": enrolled.username,
                                    "TANDEM_PASSWORD": enrolled.password}, name="worker")
        procs.append(worker)
        worker.wait_for_log("worker w1 serving")
        dash = TandemProcess(tmp_path, "fleet", "dashboard", "--fleet-dir", str(fleet),
                             "--port", str(dashboard), name="dashboard")
        procs.append(dash)
        _wait(lambda: _port_open(dashboard), what="the dashboard")

        edge = TandemProcess(tmp_path, "edge", "run", "--enroll",
                             str(fleet / "enroll" / "cam-e2e.toml"), "--api-port", str(api),
                             "--state-dir", str(tmp_path / "edge-state"),
                             env=EDGE_ENV, name="edge")
        procs.append(edge)
        edge.wait_for_log("local API on")
        edge.wait_for_log("connected to the broker mqtts://localhost")

        from tandem.edge import Client

        client = Client(f"http://127.0.0.1:{api}")

        def serving() -> str | None:
            bundle = client.status().get("bundle")
            return bundle and bundle["digest"]

        # 1. the first bundle reaches a daemon that has none
        for version in (1, 2):
            shutil.copytree(releases[version], repo / f"residual-v{version}")
        _tandem("fleet", "assign", "cam-e2e", str(releases[1]), "--sign", "--fleet-dir",
                str(fleet))
        _wait(lambda: serving() == _digest(releases[1]), what="bundle v1 served")
        x = {"input": np.random.default_rng(0).standard_normal((1, 3, 16, 16))
             .astype(np.float32)}
        want = reference(releases[1], x)["logits"]

        def check(r):
            np.testing.assert_allclose(r.outputs["logits"], want, rtol=1e-2, atol=1e-2)

        # 2. the next one while requests stream: none fails
        url = f"http://127.0.0.1:{api}"
        with RequestStream(url, x, check, mode="auto", deadline_ms=2000) as stream:
            _wait(lambda: len(stream.answers) > 20)
            _tandem("fleet", "assign", "cam-e2e", str(releases[2]), "--sign", "--fleet-dir",
                    str(fleet))
            _wait(lambda: serving() == _digest(releases[2]), what="bundle v2 served")
            n = len(stream.answers)
            _wait(lambda: len(stream.answers) > n + 20)
        served_by = {a["bundle"] for a in stream.answers}
        assert {_digest(releases[1])[:16], _digest(releases[2])[:16]} <= served_by
        assert len(stream.answers) == stream.sent
        # the cloud path works with the fleet's credentials too
        assert client.infer(x, mode="cloud").ran == "cloud"

        def row() -> dict:
            status = json.loads(_tandem("fleet", "status", "--json", "--fleet-dir", str(fleet)))
            return next(d for d in status["devices"] if d["id"] == "cam-e2e")

        _wait(lambda: row()["bundle_digest"] == _digest(releases[2]), 30,
              "the heartbeat's digest")
        seen = row()
        assert seen["state"] == "online" and seen["rollout"] == "current"
        assert seen["p50_ms"] > 0 and seen["plan_mix"]

        # 3. a tampered archive: refused, v2 keeps serving
        dash.close()
        _wait(lambda: not _port_open(dashboard), what="the dashboard stopped")
        out = _tandem("fleet", "assign", "cam-e2e", str(releases[3]), "--sign", "--fleet-dir",
                      str(fleet))
        archive = next((fleet / "bundles").glob(f"{_digest(releases[3])}*"))
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0xFF
        archive.write_bytes(bytes(data))
        dash = TandemProcess(tmp_path, "fleet", "dashboard", "--fleet-dir", str(fleet),
                             "--port", str(dashboard), name="dashboard2")
        procs.append(dash)
        _wait(lambda: client.status()["rollout"].get("result") == "refused", 120,
              "the tampered bundle refused")
        st = client.status()
        assert st["rollout"]["digest"] == _digest(releases[3]), st["rollout"]
        assert serving() == _digest(releases[2])
        check(client.infer(x, mode="local"))
        assert "cam-e2e" in out
        # the refusal reaches the fleet in the heartbeat: assigned v3, refused, running v2
        _wait(lambda: row()["rollout"] == "refused", 30, "the refusal in the heartbeat")
        seen = row()
        assert seen["bundle_digest"] == _digest(releases[2])
        assert seen["refused_digest"] == _digest(releases[3])
        assert seen["refused_reason"] == st["rollout"]["detail"][:300]
    finally:
        for p in procs:
            p.close()


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
