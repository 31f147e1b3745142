"""``tandem …`` commands as child processes for whole-system tests: output to a log file the
test reads, waiting on log lines (never a fixed sleep), signals (SIGSTOP/SIGCONT/SIGKILL), and
a close that kills whatever is still running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["TandemProcess"]

ROOT = Path(__file__).resolve().parents[2]


class TandemProcess:
    """``python -m tandem.cli ARGS`` with stdout and stderr in ``log_path``."""

    def __init__(self, log_dir: Path, *args: str, env: dict[str, str] | None = None,
                 name: str = "tandem") -> None:
        self.args = args
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()/wait()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=self.env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 60.0, *, after: int = 0) -> int:
        """Wait until ``text`` appears in the log past offset ``after``; its end offset."""
        deadline = time.monotonic() + timeout_s
        while True:
            log = self.log()
            at = log.find(text, after)
            if at >= 0:
                return at + len(text)
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[:2]} exited ({self.proc.returncode}) before "
                                     f"{text!r}:\n{log[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log within {timeout_s}s:\n"
                                     f"{log[-4000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot die otherwise
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()
