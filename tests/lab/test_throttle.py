"""Holding a process to a share of one CPU: the duty cycle anywhere, a cgroup where this
machine allows one; what they create is removed; the launcher joins after its imports.

The bounds asserted are the throttle's own (a process held to 20 % cannot do 0.2 s of CPU work
in much less than 1 s of wall time), never a speed target."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tandem.lab._throttle import CpuLimit, _v1_cpu_root
from tandem.protocol.errors import InvalidArgument

BUSY = ("import time\nt = time.process_time()\nw = time.perf_counter()\n"
        "while time.process_time() - t < 0.2:\n    pass\nprint(time.perf_counter() - w)\n")


def _busy_under(limit: CpuLimit) -> float:
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    limit.add(proc.pid)
    out, _ = proc.communicate(timeout=60)
    return float(out)


def _cgroup_writable() -> bool:
    root = _v1_cpu_root()
    return (root is not None and os.access(root, os.W_OK)) or os.access("/sys/fs/cgroup",
                                                                        os.W_OK)


@pytest.mark.parametrize("share", [0, -0.1, 1.5, float("nan")])
def test_a_share_is_in_0_1(share):
    with pytest.raises(InvalidArgument):
        CpuLimit("x", share)


def test_the_duty_cycle_holds_a_process_back_and_lets_it_go(tmp_path):
    with CpuLimit("duty", 0.2, method="duty", join_dir=tmp_path) as limit:
        assert "duty cycle" in limit.method and limit.cgroup is None
        wall = _busy_under(limit)
    assert wall >= 0.2 / 0.2 * 0.6  # 0.2 s of CPU at 20 %: about 1 s, never near 0.2 s
    # after close nothing is left stopped: a new process runs at full speed, and the pid
    # file is gone
    assert not limit.join_file.exists()


@pytest.mark.skipif(not _cgroup_writable(), reason="no writable cgroup here (not root?)")
def test_a_cgroup_holds_a_process_back_and_is_removed():
    with CpuLimit("cg", 0.2, method="cgroup") as limit:
        assert "cgroup" in limit.method
        path = limit.cgroup
        assert path is not None and path.is_dir()
        wall = _busy_under(limit)
    assert wall >= 0.2 / 0.2 * 0.6
    assert not path.exists()


def test_the_launcher_joins_after_its_imports_and_runs_the_command(tmp_path):
    join = tmp_path / "joined.pid"
    proc = subprocess.run([sys.executable, "-m", "tandem.lab._launch", str(join), "--",
                           "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tandem" in proc.stdout
    assert int(join.read_text()) > 0
    bad = subprocess.run([sys.executable, "-m", "tandem.lab._launch", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage:" in bad.stderr


def test_a_duty_cycle_picks_up_the_pid_the_launcher_writes(tmp_path):
    with CpuLimit("watch", 0.5, method="duty", join_dir=tmp_path) as limit:
        proc = subprocess.Popen([sys.executable, "-m", "tandem.lab._launch",
                                 str(limit.join_file), "--", "--version"],
                                stdout=subprocess.PIPE, text=True)
        pid = limit.watch_join_file(60)
        proc.communicate(timeout=60)
    assert pid == proc.pid and proc.returncode == 0
