"""Leak checks for tandem.lab's loop threads (the emulator's and the embedded broker's)."""

from __future__ import annotations

import threading
import time

import pytest

_LEAK_PREFIXES = ("tandem-link", "tandem-broker")


@pytest.fixture(autouse=True)
def _no_lab_threads_left():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [t for t in threading.enumerate()
                  if t not in before and t.is_alive() and t.name.startswith(_LEAK_PREFIXES)]
        if not leaked or time.monotonic() > deadline:
            break
        leaked[0].join(timeout=0.05)
    assert not leaked, f"threads left behind: {[t.name for t in leaked]}"
