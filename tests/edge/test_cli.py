"""``tandem edge run`` as a stranger meets it: help piped into head, one-line errors with exit
status 1 (2 for a malformed command line), a clean stop on SIGTERM, a progress bar only on a
terminal."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import time
import urllib.request

import pytest

from tests._support.broker import free_port
from tests._support.terminal import TANDEM, into_head, plain_env

BASE = ["edge", "run", "--device-id", "cam-cli", "--broker", "mqtt://127.0.0.1:1",
        "--profile", "cpu-x86_64"]
ENV = {"TANDEM_ADVERTISE": "false", "TANDEM_PROFILE_RUNS": "2", "TANDEM_PROFILE_WARMUP": "0"}


def _run(args, tmp_path, **env):
    proc = subprocess.run([TANDEM, *args, "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=120,
                          env=plain_env(**ENV, **env))
    return proc.returncode, proc.stdout, proc.stderr


def test_help_piped_into_head():
    rc, out, err = into_head(["edge", "run", "--help"])
    assert rc == 0 and out.startswith("Usage: tandem edge run") and not err
    rc, out, err = into_head(["edge", "--help"])
    assert rc == 0 and out.startswith("Usage: tandem edge") and not err
    listing = subprocess.run([TANDEM, "edge", "--help"], capture_output=True, text=True,
                             env=plain_env(COLUMNS="80")).stdout
    assert "run  " in listing


@pytest.mark.parametrize("args,message", [
    (["--bundle", "/nonexistent/bundle"], "--bundle /nonexistent/bundle: no such file"),
    (["--bundle", "{tmp}/not-a-bundle"], "not a bundle"),
    (["--bundle", "{bundle}", "--api-port", "99999"], "api_port must be in"),
    (["--bundle", "{bundle}", "--mode", "sideways"], "mode must be auto, local, cloud"),
    (["--bundle", "{bundle}", "--profile", "cloud-x9"], "cloud-x9"),
    (["--bundle", "{bundle}", "--broker", "http://x"], "scheme must be mqtt, mqtts, nats or tls"),
    ([], "no bundle: give --bundle PATH"),
    (["--bundle", "{bundle}", "--config", "{tmp}/missing.toml"], "does not exist"),
])
def test_bad_input_is_one_line(tmp_path, residual_bundle, args, message):
    (tmp_path / "not-a-bundle").mkdir()
    args = [a.format(tmp=tmp_path, bundle=residual_bundle) for a in args]
    rc, _, err = _run([*BASE, *args], tmp_path)
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_bad_device_id_and_a_malformed_command_line(tmp_path, residual_bundle):
    rc, _, err = _run(["edge", "run", "--device-id", "a/b", "--bundle", str(residual_bundle)],
                      tmp_path)
    assert rc == 1 and err.strip().splitlines() == [
        "error: device_id must not contain '/', '+' or '#': 'a/b'"]
    rc, _, err = _run([*BASE, "--bundle", str(residual_bundle), "--api-port", "x"], tmp_path)
    assert rc == 2 and "Invalid value for '--api-port'" in err


def test_sigterm_stops_the_daemon_cleanly(tmp_path, residual_bundle):
    port = free_port()
    proc = subprocess.Popen([TANDEM, *BASE, "--bundle", str(residual_bundle), "--api-port",
                             str(port), "--state-dir", str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=plain_env(**ENV))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                            timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "stopping" in err
        assert all(" INFO " in line or " WARNING " in line for line in err.splitlines()), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_progress_bar_shows_on_a_terminal_only(tmp_path, residual_bundle):
    port = free_port()
    master, slave = pty.openpty()
    proc = subprocess.Popen([TANDEM, *BASE, "--bundle", str(residual_bundle), "--api-port",
                             str(port), "--state-dir", str(tmp_path / "state")],
                            stdout=subprocess.DEVNULL, stderr=slave,
                            env=plain_env(**{**ENV, "TANDEM_PROFILE_RUNS": "200"}, TERM="xterm"))
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"local API on" not in seen and time.monotonic() < deadline:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.close(master)
    text = seen.decode("utf-8", "replace")
    assert "profiling residual" in text  # the bar
    assert "profiled full model" not in text  # not the lines a log file gets
