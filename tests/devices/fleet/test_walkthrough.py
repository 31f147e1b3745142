"""The README's fleet walk-through runs as written (only the port numbers are changed, to free
ones): from an empty directory to an enrolled device connecting over TLS with its client
certificate and seeing its signed assignment, with only `tandem` commands and mosquitto."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_the_readme_fleet_walkthrough_runs(tmp_path):
    script = walkthrough()
    ports: set[int] = set()
    for default in ("8883", "8884", "8080"):
        assert default in script
        port = free_port()
        while port in ports:
            port = free_port()
        ports.add(port)
        script = re.sub(rf"\b{default}\b", str(port), script)
    env = dict(os.environ, PATH=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ["PATH"],
         str(Path(mosquitto_binary()).parent)]))
    env.pop("TANDEM_FLEET_DB", None)
    pid_file = tmp_path / "demo" / "mosquitto.pid"
    try:
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in proc.stderr
    checks = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert checks and all(line.startswith("ok") for line in checks), out
    assert any(line.startswith("ok   certificate mqtts://localhost:") and "as cam-01" in line
               for line in checks), out
    assert re.search(r"^assignment: \S+ \S+ [0-9a-f]{12} \(\d+ bytes\) from "
                     r"http://localhost:\d+/bundles/[0-9a-f]{64}\.tar\.zst$", out, re.M), out
    assert re.search(r"^cam-01\s+unseen\s+never\s", out, re.M), out  # no daemon runs yet
    assert (tmp_path / "demo" / "fleet" / "enroll" / "cam-01.toml").is_file()
