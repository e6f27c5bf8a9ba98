"""The similar-case index's side table (``index.sqlite3`` in the index folder),
versioned with Alembic as the ledger is (:mod:`service.migrations`), in a script
folder of its own: it is another database, with its own ``alembic_version``.

:class:`service.similar.index.SimilarCaseIndex` reads the revision at every open
(:func:`revision`, one query) and upgrades only when it is not :data:`HEAD`, in one
transaction under SQLite's write lock, so processes that open the index at once
upgrade it once. An index made before migrations has the baseline's tables and no
version: it is adopted at :data:`BASELINE`. One a newer Sonocase upgraded is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

#: The index schema revision this code reads and writes.
HEAD = "i0001"
#: The revision an index from before migrations is adopted at.
BASELINE = "i0001"
_HERE = Path(__file__).resolve().parent


def revision(db: sa.Connection) -> str | None:
    """The index's schema revision (None: none recorded yet)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(db).get_current_revision()


def _config(connection: sa.Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["connection"] = connection
    return config


def upgrade(path: Path) -> None:
    """Bring the index's side table at ``path`` to :data:`HEAD` (creating it in an
    empty file); raise RuntimeError for a revision this code does not know."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from service.migrations import write_locked

    with write_locked(path, "") as connection:
        config = _config(connection)
        before = MigrationContext.configure(connection).get_current_revision()
        if before == HEAD:
            return
        known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
        if before is not None and before not in known:
            raise RuntimeError(
                f"the similar-case index {path} is at schema revision {before}, which this Sonocase does not "
                f"know (it knows up to {HEAD}): a newer Sonocase upgraded it"
            )
        if before is None and sa.inspect(connection).has_table("images"):
            command.stamp(config, BASELINE)
        command.upgrade(config, HEAD)
