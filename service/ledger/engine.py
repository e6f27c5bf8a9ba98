"""The ledger's connection to its database, for SQLite and PostgreSQL alike.

One connection per :class:`~service.ledger.Ledger`, in autocommit mode: a read is
its own transaction, and :meth:`Database.transaction` opens write transactions
itself, serialised on both backends so every method sees the same isolation:
``BEGIN IMMEDIATE`` on SQLite (the write lock taken up front), a transaction-scoped
advisory lock on PostgreSQL. Durability is set per connection: SQLite's
``synchronous`` FULL syncs the WAL at every commit (survives a power loss), NORMAL
survives a process crash; PostgreSQL's ``synchronous_commit`` off lets a commit
return before the WAL is flushed. Both are what the ``durability`` setting promises.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

#: How long a SQLite ledger waits for another connection's write lock.
SQLITE_TIMEOUT_S = 30.0
#: The advisory lock every write transaction of every node process takes: PostgreSQL
#: then serialises them as SQLite does, so read-then-write methods need no retries.
_PG_WRITE_LOCK = 0x50C0CA5E


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def sqlalchemy_url(url: str) -> str:
    """A ``postgresql://`` URL as SQLAlchemy names the psycopg 3 driver."""
    return url.replace("postgres://", "postgresql://", 1).replace("postgresql://", "postgresql+psycopg://", 1)


def _sqlite_engine(path: Path, durable: bool) -> sa.Engine:
    engine = sa.create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": SQLITE_TIMEOUT_S, "check_same_thread": False},
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: object) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    return engine


def _postgresql_engine(url: str, durable: bool) -> sa.Engine:
    try:
        import psycopg  # noqa: F401 - the driver SQLAlchemy loads
    except ImportError as exc:  # a broken install, not a bad setting
        raise RuntimeError("SONOCASE_LEDGER_URL needs psycopg: run scripts/setup.sh") from exc
    engine = sa.create_engine(
        sqlalchemy_url(url),
        connect_args={"connect_timeout": 10},
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
    )

    @sa.event.listens_for(engine, "connect")
    def _synchronous_commit(dbapi_connection: Any, _record: object) -> None:
        dbapi_connection.execute(f"SET synchronous_commit TO {'on' if durable else 'off'}")

    return engine


class Database:
    """One connection, shared by a process's threads (calls are serialised); after
    the server dropped it, the next call reconnects, never one in the middle of a
    transaction. Open one with :func:`open_sqlite` or :func:`open_postgresql`."""

    def __init__(self, engine: sa.Engine, where: str) -> None:
        self.sqlite = engine.dialect.name == "sqlite"
        self._engine = engine
        self._lock = threading.RLock()
        try:
            self._conn = engine.connect()
        except sa.exc.OperationalError as exc:
            engine.dispose()
            if self.sqlite:
                raise
            raise ConnectionError(f"cannot reach the ledger database {where}: {exc.orig}") from None
        self._begin = "BEGIN IMMEDIATE" if self.sqlite else "BEGIN"

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._engine.dispose()

    def _live(self) -> sa.Connection:
        if self._conn.invalidated:  # the server dropped it: the next statement reconnects
            self._conn.rollback()
        return self._conn

    @contextmanager
    def reading(self) -> Iterator[sa.Connection]:
        """The connection for reads, each its own transaction."""
        with self._lock:
            yield self._live()

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A write transaction, committed when the block ends, rolled back on error;
        the commit can fail too (a full disk), and then rolls back as well."""
        with self._lock:
            conn = self._live()
            conn.exec_driver_sql(self._begin)
            try:
                if not self.sqlite:
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
                yield conn
                conn.exec_driver_sql("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    def _rollback(self, conn: sa.Connection) -> None:
        if conn.invalidated or conn.closed:
            return
        dbapi = conn.connection.dbapi_connection
        # SQLite may have rolled back already (SQLITE_FULL at COMMIT)
        if self.sqlite and dbapi is not None and not dbapi.in_transaction:
            return
        conn.exec_driver_sql("ROLLBACK")


def open_sqlite(path: Path, durable: bool) -> Database:
    """The SQLite ledger file at ``path`` (WAL; synchronous FULL when ``durable``)."""
    return Database(_sqlite_engine(path, durable), str(path))


def open_postgresql(url: str, durable: bool) -> Database:
    """The PostgreSQL ledger at ``url`` (``synchronous_commit`` off unless ``durable``)."""
    return Database(_postgresql_engine(url, durable), redact_url(url))
