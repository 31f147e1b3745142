"""``tandem link`` as a stranger runs it: a real link process carrying bytes, changed while it
runs through its control port, one-line errors, tables at 80 columns and in pipes."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import pytest

from tests._support.broker import free_port
from tests._support.terminal import TANDEM, into_head, on_terminal, plain_env
from tests._support.terminal import piped as _piped


def piped(args, **kw) -> tuple[int, str, str]:
    proc = _piped(args, **kw)
    return proc.returncode, proc.stdout, proc.stderr


def test_profiles_on_a_terminal_in_a_pipe_and_as_json():
    rc, shown, _ = on_terminal(["link", "profiles"], columns=80)
    assert rc == 0 and "lte" in shown and "6 Mbit/s" in shown
    assert all(len(line) <= 80 for line in shown.splitlines())
    rc, out, _ = piped(["link", "profiles"])
    assert rc == 0 and len(out.splitlines()) == 6
    rc, out, _ = piped(["link", "profiles", "--json"])
    assert json.loads(out)["3g"]["delay_ms"] == 50
    assert into_head(["link", "profiles"])[0] == 0


def _start_link(*args: str) -> tuple[subprocess.Popen, int, int | None]:
    proc = subprocess.Popen([TANDEM, "link", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=plain_env())
    line = proc.stdout.readline()
    match = re.match(r"link 127\.0\.0\.1:(\d+) -> ", line)
    assert match, line + proc.stderr.read() if proc.poll() is not None else line
    control = None
    if "--control" in args:
        control = int(re.search(r"control on 127\.0\.0\.1:(\d+)", proc.stdout.readline())[1])
    return proc, int(match[1]), control


def test_run_carries_bytes_and_set_changes_it_while_it_runs():
    with socket.create_server(("127.0.0.1", 0)) as server:
        target = server.getsockname()[1]
        proc, port, control = _start_link("--to", f"127.0.0.1:{target}", "--profile", "wired",
                                          "--control", "0")
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn, _ = server.accept()
            conn.settimeout(10)
            client.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            rc, out, err = piped(["link", "set", "--control", str(control), "--profile", "3g",
                                  "--delay-ms", "40"])
            assert rc == 0, err
            assert "1 Mbit/s up" in out and "40 ms one-way" in out
            rc, out, _ = piped(["link", "show", "--control", str(control), "--json"])
            state = json.loads(out)
            assert state["profile"]["delay_ms"] == 40 and state["connections_open"] == 1
            assert state["uplink"]["bytes"] == 5
            t0 = time.monotonic()
            client.sendall(b"x")
            assert conn.recv(1) == b"x"
            assert time.monotonic() - t0 >= 0.040 - 0.004  # timers may fire 2 ms early
            rc, out, _ = piped(["link", "set", "--control", str(control), "--down", "0"])
            assert rc == 0 and "DOWN" in out
            rc, out, _ = piped(["link", "set", "--control", str(control), "--up"])
            assert rc == 0 and "DOWN" not in out
            client.close()
            conn.close()
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped: 1 connections; 6 bytes up" in out


def test_run_follows_a_schedule_and_stops_after_its_duration(tmp_path):
    schedule = tmp_path / "s.toml"
    schedule.write_text('[[step]]\nat_s = 0.2\nprofile = "lte"\n'
                        '[[step]]\nat_s = 0.4\nuplink_bps = "2mbit"\n'
                        '[[step]]\nat_s = 0.6\noutage_s = 0.2\nmode = "reset"\n')
    rc, _out, err = piped(["link", "run", "--to", "127.0.0.1:9", "--schedule", str(schedule),
                          "--duration-s", "1.2"], timeout_s=30)
    assert rc == 0, err
    changes = [line.split(" ", 1)[1] for line in err.splitlines()]
    assert changes[:4] == ["link now lte: 6 Mbit/s up, 6 Mbit/s down, 25 ms one-way (±3 ms)",
                           "link now custom: 2 Mbit/s up, 6 Mbit/s down, 25 ms one-way (±3 ms)",
                           "link down (reset)", "link up"]


@pytest.mark.parametrize(("text", "message"), [
    ("[[step]]\nat_s = 1\nprofile = \"5g\"\n", "no link profile '5g'"),
    ("[[step]]\nprofile = \"lte\"\n", "at_s is missing"),
    ("[[step]]\nat_s = 1\nbandwidth = 3\n", "unknown profile field(s) ['bandwidth']"),
    ("[[step]]\nat_s = 1\n", "a step changes the profile"),
    ("[[step]]\nat_s = 1\nuplink_bps = \"fast\"\n", "not a rate"),
    ("[[step]]\nat_s = 1\noutage_s = -1\n", "outage_s must be"),
    ("[[step]]\nat_s = 1\noutage_s = 1\nmode = \"drop\"\n", "stall or reset"),
    ("steps = 1\n", "expected [[step]] tables"),
    ("[[step\n", "not valid TOML"),
])
def test_a_bad_schedule_is_one_line(tmp_path, text, message):
    schedule = tmp_path / "s.toml"
    schedule.write_text(text)
    rc, out, err = piped(["link", "run", "--to", "127.0.0.1:9", "--schedule", str(schedule)])
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("args", "rc", "message"), [
    (["run"], 2, "Missing option '--to'"),
    (["run", "--to", "nowhere"], 2, "is not HOST:PORT"),
    (["run", "--to", "127.0.0.1:99999"], 2, "not in [0, 65535]"),
    (["run", "--to", "127.0.0.1:9", "--rate", "fast"], 1, "not a rate"),
    (["run", "--to", "127.0.0.1:9", "--delay-ms", "-3"], 1, "delay_ms must be"),
    (["run", "--to", "127.0.0.1:9", "--delay-ms", "1", "--jitter-ms", "2"], 1,
     "cannot exceed delay_ms"),
    (["run", "--to", "127.0.0.1:9", "--schedule", "/no/such.toml"], 1, "does not exist"),
    (["run", "--to", "127.0.0.1:9", "--duration-s", "0"], 2, "--duration-s must be > 0"),
    (["set", "--control", "1"], 2, "nothing to change"),
    (["set", "--control", "1", "--down", "1", "--up"], 2, "contradict"),
])
def test_bad_arguments(args, rc, message):
    got, _out, err = piped(["link", *args])
    assert got == rc and message in err, err
    assert "Traceback" not in err


def test_set_and_show_without_a_link_say_so():
    port = free_port()
    for args in (["show", "--control", str(port)], ["set", "--control", str(port), "--up"]):
        rc, _, err = piped(["link", *args])
        assert rc == 1 and err.startswith(f"error: no link control port at 127.0.0.1:{port}")


def test_the_control_port_answers_bad_requests_and_keeps_going():
    proc, _, control = _start_link("--to", "127.0.0.1:9", "--control", "0")
    try:
        with socket.create_connection(("127.0.0.1", control), timeout=10) as s:
            f = s.makefile("rwb")
            for request, error in ((b"nonsense\n", "not JSON"), (b"[1]\n", "a JSON object"),
                                   (b'{"op": "explode"}\n', "unknown op"),
                                   (b'{"op": "set", "profile": "5g"}\n', "no link profile"),
                                   (b'{"op": "set", "changes": {"delay_ms": "x"}}\n',
                                    "delay_ms must be"),
                                   (b'{"op": "down", "outage_s": "soon"}\n', "outage_s must")):
                f.write(request)
                f.flush()
                answer = json.loads(f.readline())
                assert answer["ok"] is False and error in answer["error"], answer
            f.write(b'{"op": "show"}\n')
            f.flush()
            assert json.loads(f.readline())["ok"] is True
            f.write(b"x" * (70 * 1024) + b"\n")
            f.flush()
            assert "limited to" in json.loads(f.readline())["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_port_in_use_or_an_unknown_host_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        for args, what in ((["--listen", str(port)], "the link emulator"),
                           (["--control", str(port), "--duration-s", "5"],
                            "the link's control port")):
            rc, _, err = piped(["link", "run", "--to", "127.0.0.1:9", *args])
            assert rc == 1 and err.strip() == \
                f"error: {what} cannot listen on 127.0.0.1:{port}: address already in use"
    rc, _, err = piped(["link", "run", "--to", "127.0.0.1:9", "--listen", "nosuch.invalid:0"])
    assert rc == 1 and err.startswith("error: the link emulator cannot listen on nosuch.invalid")
