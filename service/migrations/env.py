"""Alembic's environment: migrations run on the connection :mod:`service.migrations`
hands over (never on a URL of its own), one transaction per revision where the
database allows transactional DDL (PostgreSQL). The ledger's table declarations
are the target metadata, for autogenerate and the schema test."""

from __future__ import annotations

from alembic import context

from service.ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
