"""The registry's data layer: one small interface over SQLite (stdlib) and PostgreSQL (psycopg 3).

    db = Database.open("sqlite:///fleet/registry.db")      # or "postgresql://user@host/db"
    with db.transaction() as tx:                            # one command = one transaction
        tx.execute("INSERT INTO groups (name, created_ms) VALUES (?, ?)", ("lobby", now))
        rows = tx.all("SELECT * FROM clients WHERE kind = ?", ("device",))

SQL is written once with ``?`` placeholders and the common subset of both dialects; the
PostgreSQL connection rewrites ``?`` to ``%s``. A transaction takes the registry's write lock
first (SQLite ``BEGIN IMMEDIATE``, PostgreSQL a transaction-scoped advisory lock), so two
commands never interleave; it commits when the block ends and rolls back on any exception.

This module is the one boundary for both drivers: ``sqlite3`` and ``psycopg`` errors leave it as
:class:`Unavailable` (cannot reach or open the database, lock timeout), :class:`FailedPrecondition`
(a constraint refused the change) or :class:`InternalError` (SQL that is our bug), chained with
``from``. A URL's password never appears in a message.

Migrations (see ``_migrations.py``) are numbered; :meth:`Database.migrate` applies the missing
ones inside the caller's transaction and records them in ``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tandem.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    TandemError,
    Unavailable,
)
from tandem.protocol.lazy import require

__all__ = ["Database", "Transaction", "redact_url"]

_PG_LOCK_KEY = 0x74616E64656D  # "tandem": the advisory lock that serializes fleet commands
_SQLITE_BUSY_TIMEOUT_S = 30.0
_PG_CONNECT_TIMEOUT_S = 5


def redact_url(url: str) -> str:
    """``url`` without its password (for messages and listings)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


class Transaction:
    """An open transaction: ``execute``, ``one`` and ``all`` with ``?`` placeholders."""

    def __init__(self, db: Database, conn: Any) -> None:
        self._db = db
        self._conn = conn
        self.dialect = db.dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._db._translated(sql):
            cur = self._conn.execute(self._db._sql(sql), tuple(params))
            return cur.rowcount

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._db._translated(sql):
            cur = self._conn.execute(self._db._sql(sql), tuple(params))
            return [dict(row) for row in cur.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else next(iter(row.values()))

    def lock(self) -> None:
        """Take the registry's write lock for the rest of this transaction (PostgreSQL: a
        transaction-scoped advisory lock; SQLite: its database lock, taken by the first
        write)."""
        if self.dialect == "postgresql":
            self.execute("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK_KEY,))

    def table_exists(self, name: str) -> bool:
        if self.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = ("SELECT table_name FROM information_schema.tables "
                   "WHERE table_schema = current_schema() AND table_name = ?")
        return self.one(sql, (name,)) is not None


class Database:
    """A registry database named by URL: ``sqlite:///ABS/PATH``, ``sqlite:REL/PATH``, a plain
    file path, or ``postgresql://[user[:password]@]host[:port]/dbname``."""

    def __init__(self, url: str, dialect: str, target: str) -> None:
        self.url = url
        self.dialect = dialect  # "sqlite" | "postgresql"
        self._target = target  # the SQLite file path, or the libpq URL

    @classmethod
    def open(cls, url: str) -> Database:
        """Parse ``url`` (no connection yet: :meth:`transaction` connects)."""
        if not isinstance(url, str) or not url.strip():
            raise InvalidArgument("database URL is empty")
        if url.startswith(("postgresql://", "postgres://")):
            return cls(url, "postgresql", url)
        if url.startswith("sqlite:///"):
            return cls(url, "sqlite", url[len("sqlite://"):])
        if url.startswith("sqlite:"):
            return cls(url, "sqlite", url[len("sqlite:"):])
        if "://" in url:
            scheme = url.split("://", 1)[0]
            raise InvalidArgument(f"unsupported database URL scheme {scheme!r} "
                                  "(use sqlite:///PATH or postgresql://…)")
        return cls(f"sqlite:///{Path(url).absolute()}", "sqlite", str(Path(url).absolute()))

    def __repr__(self) -> str:
        return f"Database({redact_url(self.url)!r})"

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    # -- connections ---------------------------------------------------------------------------

    def _connect(self, *, create: bool) -> Any:
        if self.dialect == "sqlite":
            path = Path(self._target)
            if not create and not path.exists():
                raise NotFound(f"no fleet registry at {path} (run 'tandem fleet init' first, "
                               "or pass --fleet-dir/--db)")
            if not path.parent.is_dir():
                raise Unavailable(f"cannot open the registry {path}: "
                                  f"{path.parent} is not a directory")
            try:
                conn = sqlite3.connect(str(path), timeout=_SQLITE_BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise Unavailable(f"cannot open the registry {path}: {exc}") from exc
            return conn
        psycopg = require("psycopg", "fleet")
        rows = require("psycopg.rows", "fleet")
        try:
            return psycopg.connect(self._target, autocommit=False,
                                   connect_timeout=_PG_CONNECT_TIMEOUT_S,
                                   row_factory=rows.dict_row)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Unavailable(f"database {self.display_url} is unreachable: "
                              f"{_redact_text(first, self._target)}") from exc

    @contextlib.contextmanager
    def transaction(self, *, create: bool = False, write: bool = True) -> Iterator[Transaction]:
        """One transaction; commit on success, rollback on any exception. ``write`` takes the
        registry's write lock at once (readers pass False and may take it later with
        :meth:`Transaction.lock`). ``create`` lets SQLite create a missing file (``init``)."""
        conn = self._connect(create=create)
        try:
            tx = Transaction(self, conn)
            with self._translated("BEGIN"):
                if self.dialect == "sqlite":
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            if write:
                tx.lock()
            try:
                yield tx
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback() if self.dialect == "postgresql" else conn.execute("ROLLBACK")
                raise
            with self._translated("COMMIT"):
                if self.dialect == "sqlite":
                    conn.execute("COMMIT")
                else:
                    conn.commit()
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _sql(self, sql: str) -> str:
        if self.dialect == "postgresql":
            return sql.replace("%", "%%").replace("?", "%s")
        return sql

    @contextlib.contextmanager
    def _translated(self, sql: str) -> Iterator[None]:
        """The one boundary for sqlite3 and psycopg exceptions."""
        try:
            yield
        except TandemError:
            raise
        except sqlite3.IntegrityError as exc:
            raise FailedPrecondition(f"the registry refused the change: {exc}") from exc
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text or "unable to open" in text \
                    or "disk" in text or "readonly" in text:
                raise Unavailable(f"registry {self.display_url}: {text}") from exc
            raise InternalError(f"registry SQL failed ({text}): {sql.split()[0]}") from exc
        except sqlite3.Error as exc:
            raise Unavailable(f"registry {self.display_url}: {exc}") from exc
        except Exception as exc:
            if self.dialect != "postgresql":
                raise
            psycopg = require("psycopg", "fleet")
            if not isinstance(exc, psycopg.Error):
                raise
            first = _redact_text(str(exc).strip().splitlines()[0] if str(exc).strip()
                                 else type(exc).__name__, self._target)
            if isinstance(exc, psycopg.errors.IntegrityError):
                raise FailedPrecondition(f"the registry refused the change: {first}") from exc
            if isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown):
                raise Unavailable(f"database {self.display_url}: {first}") from exc
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                raise Unavailable(f"database {self.display_url}: {first}") from exc
            raise InternalError(f"registry SQL failed ({first}): {sql.split()[0]}") from exc

    # -- migrations ----------------------------------------------------------------------------

    def schema_version(self, tx: Transaction) -> int:
        if not tx.table_exists("schema_migrations"):
            return 0
        return int(tx.scalar("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations"))

    def migrate(self, tx: Transaction, migrations: Sequence[tuple[int, str, Sequence[str]]]
                ) -> list[int]:
        """Apply the migrations newer than the registry's version, in order, in ``tx``; the
        versions applied. A registry newer than this Tandem is refused."""
        current = self.schema_version(tx)
        latest = max(v for v, _, _ in migrations)
        if current > latest:
            raise FailedPrecondition(
                f"the registry's schema is version {current}, newer than this Tandem knows "
                f"({latest}): upgrade tandem-rt")
        if current == 0:
            tx.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                       "name TEXT NOT NULL, applied_ms BIGINT NOT NULL)")
        applied = []
        for version, name, statements in sorted(migrations):
            if version <= current:
                continue
            for statement in statements:
                tx.execute(_dialect_sql(statement, self.dialect))
            tx.execute("INSERT INTO schema_migrations (version, name, applied_ms) "
                       "VALUES (?, ?, ?)", (version, name, int(time.time() * 1000)))
            applied.append(version)
        return applied


_AUTO_ID = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
            "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}


def _dialect_sql(statement: str, dialect: str) -> str:
    return statement.replace("{auto_id}", _AUTO_ID[dialect])


def _redact_text(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text

