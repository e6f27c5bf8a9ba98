"""Routing decisions and retention: which rule routed a study and where its results
go, and a record of every removal of a study's files.

``studies.spool_bytes`` is the size of the study's spool files (what retention
can free; filled from the instances here). ``studies.routing_rule`` names the rule that decided whether the study is analysed
(NULL: no rule matched), ``routing_reason`` says which attributes matched (keywords,
never values), ``destinations`` is a JSON list of AE@host:port (NULL: the
``destinations`` setting). ``purges`` has a row per (study, generation, kind of
files) removed; ``bytes`` stays NULL until the files are gone, so a removal that a
crash interrupted is finished at the next start.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.migrations.types import INTEGER, REAL, TEXT

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ("routing_rule", "routing_reason", "destinations"):
        op.add_column("studies", sa.Column(name, TEXT()))
    op.add_column("studies", sa.Column("spool_bytes", INTEGER(), nullable=False, server_default=sa.text("0")))
    op.execute(
        "UPDATE studies SET spool_bytes=(SELECT COALESCE(SUM(size), 0) FROM instances"
        " WHERE instances.study_uid=studies.study_uid)"
    )
    op.create_table(
        "purges",
        sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("generation", INTEGER(), nullable=False),
        sa.Column("kind", TEXT(), nullable=False),
        sa.Column("reason", TEXT(), nullable=False),
        sa.Column("purged_at", REAL(), nullable=False),
        sa.Column("bytes", INTEGER()),
        sa.PrimaryKeyConstraint("study_uid", "generation", "kind"),
    )
    op.create_index(
        "purges_unfinished",
        "purges",
        ["purged_at"],
        sqlite_where=sa.text("bytes IS NULL"),
        postgresql_where=sa.text("bytes IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("purges")
    for name in ("spool_bytes", "destinations", "routing_reason", "routing_rule"):
        op.drop_column("studies", name)
