"""Verdicts record the role of the credential they came with: ``reader_role`` is
``admin`` (web_token) or ``reviewer`` (web_review_token), beside the free-text
``reader``, so a verdict given with the administrator's token can be told from a
radiologist's; NULL for verdicts given before roles existed.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.migrations.types import TEXT

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("verdicts", sa.Column("reader_role", TEXT()))


def downgrade() -> None:
    op.drop_column("verdicts", "reader_role")
