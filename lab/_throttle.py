"""Holding a process to a share of one CPU, so that on one machine the "device" computes slower
than the "cloud" (a Jetson against a data-centre GPU).

Three methods, the first that works here:

* **cgroup v2** ``cpu.max``: a child cgroup of the unified hierarchy's root (needs write access
  to ``/sys/fs/cgroup`` and the ``cpu`` controller there);
* **cgroup v1** ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in the ``cpu`` hierarchy;
* **SIGSTOP/SIGCONT duty cycle** (no privileges): a thread lets the process run ``share`` of
  every period and stops it for the rest.

All three throttle the same way a CPU quota does: the whole process (its network I/O too) waits
when its share of the period is spent, so a request can wait up to one period (10 ms) before the
process even reads it. :attr:`CpuLimit.method` says which one is in use. Processes join with
:meth:`CpuLimit.add` (a pid) or by writing their own pid to :attr:`CpuLimit.join_file`
(``tandem.lab._launch`` does so after its imports, so start-up imports are not throttled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from tandem.protocol.errors import FailedPrecondition, InvalidArgument

__all__ = ["CpuLimit"]

PERIOD_US = 10_000


def _v1_cpu_root() -> Path | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1])
    return None


def _v2_root() -> Path | None:
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    try:
        if "cpu" in controllers.read_text().split():
            return root
    except OSError:
        pass
    return None


class CpuLimit:
    """A share of one CPU (0 < ``share`` ≤ 1) for the processes added to it; a context manager
    that removes what it created."""

    def __init__(self, name: str, share: float, *, method: str = "auto",
                 join_dir: Path | None = None) -> None:
        if not 0 < share <= 1:
            raise InvalidArgument(f"a CPU share is in (0, 1], not {share!r}")
        if method not in ("auto", "cgroup", "duty"):
            raise InvalidArgument(f"method must be auto, cgroup or duty, not {method!r}")
        self.share = share
        self.method = ""
        self._cgroup: Path | None = None
        self._pids: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._join_dir = join_dir
        quota_us = max(1000, int(share * PERIOD_US))
        if method in ("auto", "cgroup"):
            self._try_cgroup(f"tandem-lab-{os.getpid()}-{name}", quota_us)
        if not self.method:
            if method == "cgroup":
                raise FailedPrecondition("no writable cgroup with the cpu controller here (run "
                                         "as root, or use the duty-cycle method)")
            self.method = (f"SIGSTOP/SIGCONT duty cycle ({share:.0%} of every "
                           f"{PERIOD_US // 1000} ms)")
        self.join_file = self._cgroup / "cgroup.procs" if self._cgroup is not None else \
            (join_dir or Path("/tmp")) / f"tandem-lab-{os.getpid()}-{name}.pid"

    def _try_cgroup(self, name: str, quota_us: int) -> None:
        v2 = _v2_root()
        if v2 is not None:
            path = v2 / name
            try:
                with contextlib.suppress(OSError):  # the root's children may already have cpu
                    (v2 / "cgroup.subtree_control").write_text("+cpu")
                path.mkdir()
                (path / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
                self._cgroup = path
                self.method = f"cgroup v2 cpu.max {quota_us} {PERIOD_US} ({path})"
                return
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
        v1 = _v1_cpu_root()
        if v1 is not None:
            path = v1 / name
            try:
                path.mkdir()
                (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota_us))
                self._cgroup = path
                self.method = (f"cgroup v1 cpu.cfs_quota_us {quota_us} / cpu.cfs_period_us "
                               f"{PERIOD_US} ({path})")
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()

    @property
    def cgroup(self) -> Path | None:
        return self._cgroup

    def add(self, pid: int) -> None:
        """Hold process ``pid`` (with its threads) to the share from now on."""
        if self._cgroup is not None:
            (self._cgroup / "cgroup.procs").write_text(str(pid))
            return
        self._pids.append(pid)
        if self._thread is None:
            self._thread = threading.Thread(target=self._cycle, name="tandem-lab-throttle",
                                            daemon=True)
            self._thread.start()

    def watch_join_file(self, timeout_s: float) -> int | None:
        """For the duty cycle: wait until a process wrote its pid to :attr:`join_file` (what
        ``tandem.lab._launch`` does after its imports), then add it. A cgroup needs no watching:
        the write itself joins."""
        if self._cgroup is not None:
            return None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.join_file.read_text().strip())
                self.add(pid)
                return pid
            time.sleep(0.01)
        return None

    def _cycle(self) -> None:
        on_s = self.share * PERIOD_US / 1e6
        off_s = PERIOD_US / 1e6 - on_s
        while not self._stop.is_set():
            self._signal(signal.SIGCONT)
            time.sleep(on_s)
            if self._stop.is_set():
                break
            self._signal(signal.SIGSTOP)
            time.sleep(off_s)
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        for pid in list(self._pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self._pids.remove(pid)

    def close(self) -> None:
        """Stop throttling; remove the cgroup (its processes move back to the parent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
        if self._cgroup is not None:
            parent = self._cgroup.parent / "cgroup.procs"
            with contextlib.suppress(OSError):
                for pid in (self._cgroup / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        parent.write_text(pid)
            for _ in range(50):  # a process that just exited leaves the cgroup a moment later
                try:
                    self._cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
            self._cgroup = None
        else:
            with contextlib.suppress(OSError):
                self.join_file.unlink()

    def __enter__(self) -> CpuLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
