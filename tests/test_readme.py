"""The README's commands stay true: the main-job line runs as written, and the test command is the
one .ci/run runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command_after(comment: str) -> str:
    match = re.search(rf"^# {re.escape(comment)}[^\n]*\n(?P<cmd>[^\n]+)$", README, re.MULTILINE)
    assert match, f"README has no '# {comment}' line followed by a command"
    return match.group("cmd")


def test_main_job_command_runs_as_written(tmp_path):
    cmd = _command_after("main job")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-c", f"set -e; {cmd}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert "signature" in proc.stdout or "unsigned" in proc.stdout  # the inspect summary


def test_ci_runs_the_readme_test_command():
    cmd = _command_after("tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmd in ci, f"README test command {cmd!r} is not what .ci/run runs"


def test_setup_installs_what_ci_installs():
    extra = "-e '.[dev]'"
    assert extra in _command_after("set up")
    assert extra in (ROOT / ".ci" / "run").read_text()
