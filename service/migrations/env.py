"""Alembic's environment: migrations run on the connection :mod:`service.migrations`
hands over (never on a URL of its own), one transaction per revision where the
database allows transactional DDL (PostgreSQL)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
