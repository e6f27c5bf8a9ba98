"""Alembic's environment for the similar-case index: migrations run on the
connection :func:`service.similar.migrations.upgrade` hands over, inside its
write-locked transaction; the index's table declarations are the target metadata."""

from __future__ import annotations

from alembic import context

from service.similar.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
