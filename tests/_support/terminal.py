"""Run the installed ``tandem`` command the way a person does: on a real terminal of a given
width (a pseudo-terminal), into a pipe, into ``| head -1``, or with stdout already closed."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

TANDEM = str(Path(sys.executable).parent / "tandem")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain_env(**extra: str) -> dict[str, str]:
    """The environment without variables that change how output looks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS", "LINES",
                        "TANDEM_DEBUG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text).replace("\r", "")


def on_terminal(args: list[str], *, columns: int = 80, cwd: Path | None = None,
                timeout_s: float = 120) -> tuple[int, str, str]:
    """Run ``tandem ARGS`` with stdout on a pseudo-terminal ``columns`` wide (stderr to a pipe):
    (exit status, what the terminal showed without escape codes, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([TANDEM, *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.PIPE, cwd=cwd,
                            env=plain_env(COLUMNS=str(columns), TERM="xterm-256color"))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = proc.stderr.read().decode() if proc.stderr else ""
    rc = proc.wait(timeout=timeout_s)
    return rc, strip_ansi(b"".join(chunks).decode("utf-8", "replace")), err


def piped(args: list[str], *, cwd: Path | None = None, timeout_s: float = 120,
          **env: str) -> subprocess.CompletedProcess:
    """Run ``tandem ARGS`` with stdout and stderr captured (a pipe, not a terminal)."""
    return subprocess.run([TANDEM, *args], capture_output=True, text=True, cwd=cwd,
                          env=plain_env(**env), timeout=timeout_s)


def stdout_closed(args: list[str], *, cwd: Path | None = None,
                  timeout_s: float = 120) -> tuple[int, str]:
    """Run ``tandem ARGS`` into a pipe whose reader is already gone (every write fails with
    EPIPE): (exit status, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([TANDEM, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, env=plain_env(), timeout=timeout_s)
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


def into_head(args: list[str], *, cwd: Path | None = None,
              timeout_s: float = 120) -> tuple[int, str, str]:
    """``tandem ARGS | head -1`` in bash: (tandem's exit status, head's output, stderr)."""
    cmd = " ".join(["tandem", *(_quote(a) for a in args)]) + " | head -1; " \
        "echo \"rc=${PIPESTATUS[0]}\" >&2"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=cwd,
                          env=plain_env(), timeout=timeout_s)
    match = re.search(r"rc=(\d+)\s*$", proc.stderr)
    assert match, proc.stderr
    return int(match.group(1)), proc.stdout, proc.stderr[: match.start()]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))
