"""The durable spool: deferrable cloud requests kept on disk until the cloud answers them, and
their results kept until the application fetches them.

One SQLite database in WAL mode (``synchronous=FULL``: a request is on disk before its 202 is
sent). A row's life::

    put()      pending    accepted (HTTP 202 + id); survives a crash of the daemon
    due()      pending    sent when the link is up, with the same request id every time (the
                          cloud answers a repeated id from its reply cache: computed once)
    complete() done       the cloud's answer (outputs or a non-retryable error) is stored
    take()     delivered  handed to the application exactly once; later fetches say so
    purge()    (deleted)  delivered rows older than the retention

A full spool (``max_items`` rows or ``max_bytes`` of requests not yet delivered) refuses new
requests with :class:`~tandem.protocol.errors.ResourceExhausted`; nothing already accepted is
dropped. SQLite errors are translated here and only here (:func:`_sqlite_errors`): a full disk
is ResourceExhausted, a locked or unreadable database Unavailable.

All methods block (fsync); the daemon calls them from one worker thread.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = ["Spool", "SpoolEntry", "SpoolResult"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id TEXT PRIMARY KEY,
    created_s REAL NOT NULL,
    model TEXT NOT NULL,
    request BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    fmt TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'delivered')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_s REAL NOT NULL DEFAULT 0,
    result BLOB,
    info TEXT,
    finished_s REAL,
    delivered_s REAL
);
CREATE INDEX IF NOT EXISTS spool_due ON spool (state, next_try_s);
"""
_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SpoolEntry:
    """A pending request to send: its id (hex), model name, encoded request and attempts."""

    id: str
    model: str
    request: bytes
    attempts: int


@dataclass(frozen=True)
class SpoolResult:
    """What :meth:`Spool.take` found: ``state`` pending | done (now delivered) | delivered
    (earlier); for ``done`` the stored ``result`` bytes, ``info`` and ``fmt`` (JSON)."""

    id: str
    state: str
    model: str = ""
    result: bytes | None = None
    info: dict[str, Any] | None = None
    fmt: dict[str, Any] | None = None
    created_s: float = 0.0
    finished_s: float | None = None
    delivered_s: float | None = None


@contextlib.contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    """The one boundary for sqlite3 exceptions."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "full" in text:
            raise ResourceExhausted(f"spool: {what}: the disk is full ({text})") from exc
        raise Unavailable(f"spool: {what}: {text}", retryable=True) from exc
    except sqlite3.IntegrityError as exc:
        raise InvalidArgument(f"spool: {what}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise Unavailable(f"spool: {what}: the database is damaged ({exc})",
                          retryable=False) from exc
    except sqlite3.Error as exc:
        raise InternalError(f"spool: {what}: {type(exc).__name__}: {exc}") from exc


class Spool:
    """The spool database at ``path`` (created with its directory)."""

    def __init__(self, path: Path | str, *, max_items: int = 10_000,
                 max_bytes: int = 512 << 20) -> None:
        self.path = Path(path)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _sqlite_errors(f"opening {self.path}"):
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0,
                                       check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise FailedPrecondition(f"spool: {self.path}: WAL mode refused ({mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise FailedPrecondition(f"spool: {self.path} has schema version {version}; "
                                         f"this Tandem reads {_SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, _sqlite_errors(what):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- the life of a row ----------------------------------------------------------------------

    def put(self, request_id: str, model: str, request: bytes, fmt: dict[str, Any]) -> None:
        """Accept a request (durable when this returns); ResourceExhausted when full."""
        with self._tx("accepting a request") as db:
            n, size = db.execute("SELECT count(*), coalesce(sum(nbytes), 0) FROM spool "
                                 "WHERE state != 'delivered'").fetchone()
            if n >= self.max_items:
                raise ResourceExhausted(f"the spool is full ({n} requests waiting, at most "
                                        f"{self.max_items}); not accepting deferrable requests "
                                        "until results are fetched or the cloud is back")
            if size + len(request) > self.max_bytes:
                raise ResourceExhausted(f"the spool is full ({size} bytes waiting, at most "
                                        f"{self.max_bytes}); not accepting deferrable requests "
                                        "until results are fetched or the cloud is back")
            db.execute("INSERT INTO spool (id, created_s, model, request, nbytes, fmt, state) "
                       "VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                       (request_id, time.time(), model, request, len(request), json.dumps(fmt)))

    def due(self, limit: int = 16, now_s: float | None = None) -> list[SpoolEntry]:
        """Pending requests whose next try is due, oldest first."""
        now_s = time.time() if now_s is None else now_s
        with self._lock, _sqlite_errors("reading pending requests"):
            rows = self._db.execute(
                "SELECT id, model, request, attempts FROM spool WHERE state = 'pending' AND "
                "next_try_s <= ? ORDER BY created_s LIMIT ?", (now_s, limit)).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def retry_later(self, request_id: str, delay_s: float) -> None:
        with self._tx("rescheduling a request") as db:
            db.execute("UPDATE spool SET attempts = attempts + 1, next_try_s = ? "
                       "WHERE id = ? AND state = 'pending'", (time.time() + delay_s, request_id))

    def complete(self, request_id: str, result: bytes, info: dict[str, Any]) -> bool:
        """Store the cloud's answer; False when the row is not pending (already answered)."""
        with self._tx("storing a result") as db:
            cur = db.execute(
                "UPDATE spool SET state = 'done', result = ?, info = ?, finished_s = ?, "
                "request = x'', attempts = attempts + 1 WHERE id = ? AND state = 'pending'",
                (result, json.dumps(info), time.time(), request_id))
            return cur.rowcount == 1

    def take(self, request_id: str) -> SpoolResult:
        """Fetch by id: a done row is returned and marked delivered in the same transaction
        (so it is handed out once); NotFound for an id the spool does not know."""
        with self._tx("fetching a result") as db:
            row = db.execute("SELECT state, result, info, fmt, created_s, finished_s, "
                             "delivered_s, model FROM spool WHERE id = ?",
                             (request_id,)).fetchone()
            if row is None:
                raise NotFound(f"no spooled request {request_id!r} (unknown, or delivered "
                               "and purged)")
            state, result, info, fmt, created, finished, delivered, model = row
            if state == "done":
                now = time.time()
                db.execute("UPDATE spool SET state = 'delivered', delivered_s = ?, "
                           "result = NULL WHERE id = ?", (now, request_id))
                return SpoolResult(request_id, "done", model, bytes(result),
                                   json.loads(info or "{}"), json.loads(fmt), created, finished,
                                   now)
            return SpoolResult(request_id, state, model, created_s=created, finished_s=finished,
                               delivered_s=delivered)

    def purge(self, retention_s: float, now_s: float | None = None) -> int:
        """Delete delivered rows older than ``retention_s``; the number deleted."""
        now_s = time.time() if now_s is None else now_s
        with self._tx("purging delivered rows") as db:
            return db.execute("DELETE FROM spool WHERE state = 'delivered' AND "
                              "delivered_s < ?", (now_s - retention_s,)).rowcount

    def counts(self) -> dict[str, int]:
        with self._lock, _sqlite_errors("counting rows"):
            rows = self._db.execute("SELECT state, count(*) FROM spool GROUP BY state").fetchall()
        out = {"pending": 0, "done": 0, "delivered": 0}
        out.update({state: n for state, n in rows})
        return out

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest rows (id, state, model, times), without payloads."""
        with self._lock, _sqlite_errors("listing rows"):
            rows = self._db.execute(
                "SELECT id, state, model, created_s, attempts, finished_s, delivered_s FROM "
                "spool ORDER BY created_s DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "state": r[1], "model": r[2], "created_s": r[3], "attempts": r[4],
                 "finished_s": r[5], "delivered_s": r[6]} for r in rows]
