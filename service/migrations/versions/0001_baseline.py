"""Baseline: the ledger as it was before migrations (studies, instances, results, outbox).

A ledger created before the node had migrations has these tables but no version:
:func:`service.migrations.upgrade` adopts it at this revision (adding the crc32
column first where it predates that column).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.migrations.types import INTEGER, REAL, TEXT

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_uid", TEXT(), primary_key=True, nullable=True),  # as SQLite had it
        sa.Column("state", TEXT(), nullable=False),
        sa.Column("generation", INTEGER(), nullable=False, server_default=sa.text("1")),
        sa.Column("first_received", REAL(), nullable=False),
        sa.Column("last_received", REAL(), nullable=False),
        sa.Column("completed_at", REAL()),
        sa.Column("queued_at", REAL()),
        sa.Column("analysis_started", REAL()),
        sa.Column("lease_until", REAL()),
        sa.Column("analysed_at", REAL()),
        sa.Column("reported_at", REAL()),
        sa.Column("sent_at", REAL()),
        sa.Column("attempts", INTEGER(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", REAL()),
        sa.Column("failed_stage", TEXT()),
        sa.Column("error", TEXT()),
        sa.Column("updated_at", REAL(), nullable=False),
    )
    op.create_index("studies_state", "studies", ["state"])
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", TEXT(), primary_key=True, nullable=True),
        sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("series_uid", TEXT(), nullable=False),
        sa.Column("sop_class_uid", TEXT(), nullable=False),
        sa.Column("transfer_syntax", TEXT(), nullable=False),
        sa.Column("path", TEXT(), nullable=False),
        sa.Column("size", INTEGER(), nullable=False),
        sa.Column("calling_ae", TEXT(), nullable=False),
        sa.Column("modality", TEXT(), nullable=False),
        sa.Column("ignored_reason", TEXT()),
        sa.Column("received_at", REAL(), nullable=False),
        sa.Column("crc32", INTEGER()),
    )
    op.create_index("instances_study", "instances", ["study_uid"])
    op.create_table(
        "results",
        sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("generation", INTEGER(), nullable=False),
        sa.Column("result", TEXT(), nullable=False),
        sa.Column("created_at", REAL(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid", "generation"),
    )
    op.create_table(
        "outbox",
        sa.Column("sop_instance_uid", TEXT(), nullable=False),
        sa.Column("destination", TEXT(), nullable=False),
        sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("generation", INTEGER(), nullable=False),
        sa.Column("sop_class_uid", TEXT(), nullable=False),
        sa.Column("path", TEXT(), nullable=False),
        sa.Column("state", TEXT(), nullable=False),
        sa.Column("attempts", INTEGER(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", REAL(), nullable=False),
        sa.Column("error", TEXT()),
        sa.Column("sent_at", REAL()),
        sa.PrimaryKeyConstraint("sop_instance_uid", "destination"),
    )
    op.create_index("outbox_state", "outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    for table in ("outbox", "results", "instances", "studies"):
        op.drop_table(table)
