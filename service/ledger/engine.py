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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa

if TYPE_CHECKING:
    from sqlalchemy.sql.compiler import SQLCompiler

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


class Prepared:
    """A Core statement compiled once per dialect and run on the DB-API cursor
    (:meth:`Database.run`): a hot path pays neither for building the statement nor
    for SQLAlchemy's cache look-up and result objects (together about five times the
    cost of the query itself on SQLite). Values that vary are ``sa.bindparam``s."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[str, tuple[str, dict[str, Any], tuple[str, ...] | None]] = {}

    def bind(self, dialect: sa.Dialect, params: Mapping[str, Any]) -> tuple[str, Sequence[Any] | Mapping[str, Any]]:
        """The SQL in ``dialect`` and its arguments: ``params`` for the bind
        parameters without a value, the statement's own values for the others."""
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            done = cast("SQLCompiler", self.statement.compile(dialect=dialect))
            if "POSTCOMPILE" in str(done):
                raise ValueError(f"a prepared statement cannot hold an IN list (write it as OR): {done}")
            values = done.construct_params(_check=False)
            own = {name: values[name] for bind, name in done.bind_names.items() if not bind.required}
            order = None if done.positiontup is None else tuple(done.positiontup)
            compiled = self._compiled[dialect.name] = (str(done), own, order)
        sql, own, order = compiled
        if order is None:  # named parameters (psycopg)
            return sql, {**own, **params}
        return sql, tuple(params[name] if name in params else own[name] for name in order)


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
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    def run(self, conn: sa.Connection, statement: Prepared, params: Mapping[str, Any]) -> Any:
        """Execute ``statement`` on ``conn``'s DB-API connection; the DB-API cursor.
        Errors are SQLAlchemy's, as :meth:`sa.Connection.execute` raises them, and a
        connection the server dropped is reconnected at the next call."""
        sql, args = statement.bind(conn.dialect, params)
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        try:
            cursor.execute(sql, args)
        except self._dbapi_error as exc:
            if getattr(dbapi, "closed", False):
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(sql, args, exc, self._dbapi_error) from exc
        return cursor

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
            self.run(conn, _BEGIN_IMMEDIATE if self.sqlite else _BEGIN, {})
            try:
                if not self.sqlite:
                    self.run(conn, _WRITE_LOCK, {})
                yield conn
                self.run(conn, _COMMIT, {})
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
        self.run(conn, _ROLLBACK, {})


_BEGIN_IMMEDIATE = Prepared(sa.text("BEGIN IMMEDIATE"))  # SQLite: the write lock up front
_BEGIN = Prepared(sa.text("BEGIN"))
_WRITE_LOCK = Prepared(sa.text(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})"))
_COMMIT = Prepared(sa.text("COMMIT"))
_ROLLBACK = Prepared(sa.text("ROLLBACK"))


def open_sqlite(path: Path, durable: bool) -> Database:
    """The SQLite ledger file at ``path`` (WAL; synchronous FULL when ``durable``)."""
    return Database(_sqlite_engine(path, durable), str(path))


def open_postgresql(url: str, durable: bool) -> Database:
    """The PostgreSQL ledger at ``url`` (``synchronous_commit`` off unless ``durable``)."""
    return Database(_postgresql_engine(url, durable), redact_url(url))
