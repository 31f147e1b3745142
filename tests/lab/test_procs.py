"""The demo's process keeping: a dying process is reported with its log, a stopped one is
still stopped for good, mosquitto starts on a free port, every process ends with the run."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from tandem.lab._procs import (
    MosquittoProcess,
    Process,
    Processes,
    mosquitto_binary,
    port_open,
)
from tandem.protocol.errors import DeadlineExceeded, Unavailable


def test_a_process_that_dies_while_awaited_says_why(tmp_path):
    p = Process("crasher",
                [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"],
                tmp_path / "c.log")
    with pytest.raises(Unavailable, match=r"(?s)crasher stopped \(exit status 3\).*boom"):
        p.wait_until(lambda: False, 30, "its port")
    p.stop()


def test_waiting_past_the_time_says_so(tmp_path):
    p = Process("sleeper", [sys.executable, "-c", "import time; print('zz'); time.sleep(60)"],
                tmp_path / "s.log")
    try:
        with pytest.raises(DeadlineExceeded, match=r"no ready API within 0\.3 s"):
            p.wait_until(lambda: False, 0.3, "ready API")
    finally:
        p.stop()
    assert not p.running


def test_a_stopped_process_is_still_stopped_for_good(tmp_path):
    with Processes() as procs:
        p = procs.add(Process("held", [sys.executable, "-c", "import time; time.sleep(60)"],
                              tmp_path / "h.log"))
        p.popen.send_signal(signal.SIGSTOP)  # as a duty cycle leaves it between periods
    assert not p.running and p.popen.returncode == -signal.SIGTERM


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_mosquitto_on_a_free_port_and_stopped_with_the_run(tmp_path):
    with Processes() as procs:
        broker = procs.add(MosquittoProcess(mosquitto_binary(), tmp_path))
        assert port_open("127.0.0.1", broker.port)
        assert "mosquitto" in broker.version()
    deadline = time.monotonic() + 5
    while port_open("127.0.0.1", broker.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not broker.running and not port_open("127.0.0.1", broker.port)
