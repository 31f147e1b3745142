"""The processes ``tandem demo`` and the benchmarks start: each with its own log file, waited for
by polling what it serves (never a fixed sleep), and stopped — SIGTERM, then SIGKILL after a
grace period — whatever happens, in the reverse order of their start.

:class:`Processes` owns them; :class:`MosquittoProcess` is a mosquitto on 127.0.0.1 and a free
port with ``set_tcp_nodelay true`` (the broker the demo prefers when it is installed).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from tandem.protocol.errors import DeadlineExceeded, FailedPrecondition, Unavailable

__all__ = [
    "MosquittoProcess",
    "Process",
    "Processes",
    "free_port",
    "http_ok",
    "mosquitto_binary",
    "port_open",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def mosquitto_binary() -> str | None:
    """The mosquitto executable (PATH, then /usr/sbin and /usr/local/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class Process:
    """One started process: its name, ``subprocess.Popen`` and log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=self._out,
                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
                start_new_session=True)  # Ctrl-C in the terminal reaches us, not them
        except OSError as exc:
            self._out.close()
            raise FailedPrecondition(f"cannot start {name} ({argv[0]}): {exc.strerror}") \
                from exc

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``ready`` until it holds; fail with the log's tail if the process ends or the
        time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if not self.running:
                raise Unavailable(f"{self.name} stopped (exit status {self.popen.returncode}) "
                                  f"before {what}; its log ends:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{self.name}: no {what} within {timeout_s:g} s; its log "
                                       f"ends:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (with SIGCONT first: a process held stopped would never see it), then
        SIGKILL after ``grace_s``."""
        if self.running:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    self.popen.send_signal(sig)
                except ProcessLookupError:
                    break
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._out.close()


class MosquittoProcess(Process):
    """mosquitto on 127.0.0.1 and a free port, anonymous, ``set_tcp_nodelay true``."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.port = free_port()
        conf = directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "set_tcp_nodelay true", "persistence false", "max_queued_messages 10000"]
        if os.geteuid() == 0:  # as root mosquitto would become "mosquitto", locked out of here
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.binary = binary
        super().__init__("mosquitto", [binary, "-c", str(conf)], directory / "mosquitto.log")
        self.wait_until(lambda: port_open("127.0.0.1", self.port), 10, "listening port")

    def version(self) -> str:
        try:
            out = subprocess.run([self.binary, "-h"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "mosquitto"
        first = (out.stdout or out.stderr).splitlines()[:1]
        return first[0].strip() if first else "mosquitto"


class Processes:
    """Every process started for one run; :meth:`stop_all` stops them in reverse order (also
    on an exception or Ctrl-C, as a context manager)."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def add(self, process: Process) -> Process:
        self.started.append(process)
        return process

    def tandem(self, name: str, args: Sequence[str], log: Path, *,
               env: dict[str, str] | None = None) -> Process:
        """``tandem ARGS`` with this interpreter (``python -m tandem.cli``)."""
        return self.add(Process(name, [sys.executable, "-m", "tandem.cli", *args], log,
                                env=env))

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
