"""The README's fleet walk-through runs as written (only the port numbers are changed, to free
ones): from an empty directory to an enrolled device connecting over TLS with its client
certificate and running its assigned, signed bundle, served by an enrolled cloud worker, with
only `tandem` commands, mosquitto and curl."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests._support.broker import free_port, mosquitto_binary

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.broker


def walkthrough() -> str:
    section = README.split("\n## Fleet\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(?P<code>.*?)```", section, re.DOTALL)
    assert block, "README's Fleet section has no bash block"
    return block.group("code")


def _stop_group(pgid: int) -> None:
    """SIGTERM to the process group the walk-through ran in (its background worker and
    daemon), then SIGKILL to whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)  # polling interval of the exit check
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through uses curl")
def test_the_readme_fleet_walkthrough_runs(tmp_path):
    script = walkthrough()
    ports: dict[str, int] = {}
    for default in ("8883", "8884", "8080", "8000"):
        assert default in script
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[default] = port
        script = re.sub(rf"\b{default}\b", str(port), script)
    env = dict(os.environ, PATH=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ["PATH"],
         str(Path(mosquitto_binary()).parent)]))
    env.pop("TANDEM_FLEET_DB", None)
    for name in [k for k in env if k.startswith("TANDEM_")]:
        del env[name]  # the walk-through's settings only
    # the daemon's state under tmp_path, not in $HOME; no mDNS announcements from a test
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), TANDEM_ADVERTISE="false")
    demo = tmp_path / "demo"
    # its own session: the worker and daemon it leaves running share its process group
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        logs = "".join(f"\n--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                       for f in (demo / "worker.log", demo / "edge.log") if f.exists())
        assert proc.returncode == 0, out + err + logs
        assert "Traceback" not in err
        checks = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
        assert checks and all(line.startswith("ok") for line in checks), out
        assert any(line.startswith("ok   certificate mqtts://localhost:") and "as cam-01" in line
                   for line in checks), out
        m = re.search(r"^assignment: \S+ \S+ ([0-9a-f]{12}) \(\d+ bytes\) from "
                      rf"http://localhost:{ports['8080']}/v2/bundles/[0-9a-f]{{64}}$", out, re.M)
        assert m, out
        assigned = m.group(1)
        # the enrolled device runs the assigned bundle, and its heartbeat says so
        row = re.search(r"^cam-01\s+online\s+.*$", out, re.M)
        assert row and re.search(rf"\s{assigned[:8]}\s", row.group(0)), out + logs
        assert "→" not in row.group(0)  # no rollout pending
        # the daemon answers, on its own and through the enrolled worker (client certificates
        # both, the fleet's ACLs)
        from tandem.edge import Client

        client = Client(f"http://127.0.0.1:{ports['8000']}")
        status = client.status()
        assert status["bundle"]["digest"].startswith(assigned)
        x = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32))
             .astype(np.float32)}
        assert client.infer(x, mode="cloud").ran == "cloud"
        assert "worker gpu-1 serving" in (demo / "worker.log").read_text()
        assert (demo / "fleet" / "enroll" / "cam-01.toml").is_file()
    finally:
        _stop_group(proc.pid)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((demo / "mosquitto.pid").read_text()), signal.SIGTERM)
