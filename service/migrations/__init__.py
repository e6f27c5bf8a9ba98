"""The ledger's schema, versioned with Alembic, on SQLite and PostgreSQL.

Every schema change is a new revision under ``versions/`` (never an edit of a
released one), written with Alembic operations and the column types of
:mod:`service.migrations.types`, so one script serves both backends, together with
the same change to the tables' declaration (:mod:`service.ledger.schema`, Alembic's
``target_metadata``: a test compares it with the migrated database, so
``alembic revision --autogenerate`` drafts the next revision). Alembic runs only here: when a ledger is
opened on a database that is not at :data:`HEAD` (:func:`upgrade`, called by
:class:`service.ledger.Ledger`), and in ``sonocase migrate``.

An upgrade is one transaction that holds the ledger's write lock (``BEGIN
IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), so several processes that
start at once upgrade once and never see half a schema. A database at a revision
this code does not know was upgraded by a newer Sonocase: it is refused
(:class:`SchemaTooNew`), never written to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

#: The schema revision this code reads and writes (a test checks it is Alembic's head).
HEAD = "0005"
#: The revision a ledger from before migrations is adopted at.
BASELINE = "0001"
#: PostgreSQL advisory lock held while upgrading (the ledger's write lock is another).
_PG_MIGRATION_LOCK = 0x50C0CA5F
_HERE = Path(__file__).resolve().parent


class SchemaTooNew(RuntimeError):
    """The database was upgraded by a newer Sonocase than this one."""


@dataclass(frozen=True)
class Migration:
    """What :func:`upgrade` found and left: revisions before and after (None: no schema)."""

    before: str | None
    after: str | None
    pending: tuple[str, ...]


def too_new(revision: str, where: str) -> SchemaTooNew:
    return SchemaTooNew(
        f"the ledger {where} is at schema revision {revision}, which this Sonocase does not know (it knows up "
        f"to {HEAD}): a newer Sonocase upgraded it. Run that version, or restore the ledger's backup from "
        "before the upgrade."
    )


def _config(connection: sa.Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["connection"] = connection
    return config


def _engine(path: Path | None, url: str) -> sa.Engine:
    """An engine for one upgrade. SQLite through pysqlite needs its own transaction
    control (SQLAlchemy's documented recipe): BEGIN IMMEDIATE takes the write lock
    before the revision is read, and the DDL is inside that transaction."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    if url:
        from service.ledger.engine import sqlalchemy_url

        return sa.create_engine(sqlalchemy_url(url), poolclass=NullPool)
    assert path is not None
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=NullPool, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: object, _record: object) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def write_locked(path: Path | None, url: str) -> Iterator[sa.Connection]:
    """A connection inside one write-locked transaction, committed on success."""
    engine = _engine(path, url)
    try:
        with engine.begin() as connection:
            if url:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            yield connection
    finally:
        engine.dispose()


def _current(connection: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _known() -> dict[str, str | None]:
    """revision -> the one it revises, for every revision of this code."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_config())
    return {s.revision: s.down_revision for s in scripts.walk_revisions()}  # type: ignore[misc]


def _pending(known: dict[str, str | None], current: str | None) -> tuple[str, ...]:
    chain, revision = [], HEAD
    while revision is not None and revision != current:
        chain.append(revision)
        revision = known[revision]
    return tuple(reversed(chain))


def _adopt_unversioned(connection: sa.Connection) -> bool:
    """Stamp a ledger made before migrations at the baseline (adding the crc32 column
    that was added without one); False when the database has no ledger at all."""
    import sqlalchemy as sa
    from alembic import command

    inspector = sa.inspect(connection)
    if not inspector.has_table("studies"):
        return False
    if "crc32" not in {c["name"] for c in inspector.get_columns("instances")}:
        connection.exec_driver_sql(
            "ALTER TABLE instances ADD COLUMN crc32 "
            + ("BIGINT" if connection.dialect.name == "postgresql" else "INTEGER")
        )
    command.stamp(_config(connection), BASELINE)
    return True


def upgrade(path: Path | None = None, url: str = "", dry_run: bool = False) -> Migration:
    """Bring the ledger (SQLite file ``path`` or PostgreSQL ``url``) to :data:`HEAD`.

    Raises :class:`SchemaTooNew` for a revision this code does not know. With
    ``dry_run`` nothing is written; ``pending`` says what would run.
    """
    from alembic import command

    where = str(path) if path is not None else _redact(url)
    known = _known()
    if HEAD not in known:
        raise RuntimeError(f"the migration scripts in {_HERE} do not lead to revision {HEAD}")
    with write_locked(path, url) as connection:
        before = _current(connection)
        if before is not None and before not in known:
            raise too_new(before, where)
        pending = _pending(known, before)
        if dry_run or not pending:
            return Migration(before, before, pending)
        if before is None and _adopt_unversioned(connection):
            before = BASELINE
            pending = _pending(known, before)
        command.upgrade(_config(connection), HEAD)
        return Migration(before, _current(connection), pending)


def _redact(url: str) -> str:
    from service.ledger import redact_url

    return redact_url(url)


@click.command()
@click.option("--dry-run", is_flag=True, help="Only say which revisions would run.")
@click.pass_context
def migrate(ctx: click.Context, dry_run: bool) -> None:
    """Upgrade the ledger's schema to this version's (the node also does it at start).

    Take a backup first (docs/it-guide.md); there is no downgrade. A ledger that a
    newer Sonocase upgraded is refused.
    """
    from service.cli import settings_from

    settings = settings_from(ctx)
    path = None if settings.ledger_url else settings.ledger_path
    if path is not None and not path.is_file():
        raise click.ClickException(f"no ledger at {path}: has the node run with this data_dir?")
    try:
        done = upgrade(path, settings.ledger_url, dry_run)
    except SchemaTooNew as exc:
        raise click.ClickException(str(exc)) from None
    if not done.pending:
        click.echo(f"the ledger is at schema revision {done.after} (current)")
    elif dry_run:
        click.echo(f"the ledger is at schema revision {done.before or 'none'}; would apply " + ", ".join(done.pending))
    else:
        click.echo(f"the ledger was upgraded from schema revision {done.before or 'none'} to {done.after}")
