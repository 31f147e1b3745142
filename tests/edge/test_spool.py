"""The durable spool: a row's life, delivery exactly once, a full spool refusing new requests,
durability across SIGKILL, and a damaged database as a clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tandem.edge._spool import Spool
from tandem.protocol.errors import NotFound, ResourceExhausted, Unavailable

ROOT = Path(__file__).resolve().parents[2]


def test_the_life_of_a_row(tmp_path):
    spool = Spool(tmp_path / "s.db")
    spool.put("a" * 32, "m", b"request", {"binary_data_output": True})
    assert spool.take("a" * 32).state == "pending"
    due = spool.due()
    assert [(e.id, e.request, e.attempts) for e in due] == [("a" * 32, b"request", 0)]
    spool.retry_later("a" * 32, 3600)
    assert spool.due() == []  # not due for an hour
    assert spool.complete("a" * 32, b"result", {"ran": "cloud"})
    assert not spool.complete("a" * 32, b"again", {})  # answered once
    got = spool.take("a" * 32)
    assert (got.state, got.result, got.info, got.fmt, got.model) == (
        "done", b"result", {"ran": "cloud"}, {"binary_data_output": True}, "m")
    again = spool.take("a" * 32)
    assert again.state == "delivered" and again.result is None
    assert spool.counts() == {"pending": 0, "done": 0, "delivered": 1}
    assert spool.purge(3600) == 0
    assert spool.purge(-1) == 1
    with pytest.raises(NotFound):
        spool.take("a" * 32)
    spool.close()


def test_a_full_spool_refuses_new_requests_and_keeps_the_old(tmp_path):
    spool = Spool(tmp_path / "s.db", max_items=2, max_bytes=100)
    spool.put("1" * 32, "m", b"x" * 10, {})
    spool.put("2" * 32, "m", b"x" * 10, {})
    with pytest.raises(ResourceExhausted, match=r"spool is full.*2 requests waiting"):
        spool.put("3" * 32, "m", b"x", {})
    assert {e.id for e in spool.due()} == {"1" * 32, "2" * 32}
    spool.complete("1" * 32, b"r", {})
    with pytest.raises(ResourceExhausted):  # done but not fetched still counts
        spool.put("3" * 32, "m", b"x", {})
    spool.take("1" * 32)
    spool.put("3" * 32, "m", b"x", {})  # fetched: room again
    with pytest.raises(ResourceExhausted, match="bytes waiting"):
        Spool(tmp_path / "s.db", max_items=100, max_bytes=20).put("4" * 32, "m", b"y" * 10, {})
    spool.close()


def test_accepted_requests_survive_sigkill(tmp_path):
    db = tmp_path / "s.db"
    child = textwrap.dedent(f"""
        import sys, os
        from tandem.edge._spool import Spool
        s = Spool({str(db)!r})
        for i in range(10_000):
            s.put(f"{{i:032x}}", "m", os.urandom(512), {{}})
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    acknowledged = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 50:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    spool = Spool(db)
    ids = {e.id for e in spool.due(limit=100_000)}
    assert all(f"{i:032x}" in ids for i in range(acknowledged + 1))
    spool.close()


def test_a_damaged_database_is_a_clear_error(tmp_path):
    db = tmp_path / "s.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(Unavailable, match="spool") as info:
        Spool(db)
    assert "\n" not in str(info.value)
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(Unavailable):
                Spool(tmp_path / "new.db")
    finally:
        os.chmod(tmp_path, 0o700)
