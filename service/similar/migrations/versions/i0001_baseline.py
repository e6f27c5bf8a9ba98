"""Baseline: the index's side table as it was before migrations (meta, images,
rebuild_vectors). An index made before then has these tables but no version:
:func:`service.similar.migrations.upgrade` adopts it at this revision.

Revision ID: i0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.Text(), primary_key=True, nullable=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, nullable=True),  # as SQLite had it: a rowid alias
        sa.Column("sop_instance_uid", sa.Text(), nullable=False, unique=True),
        sa.Column("frame_number", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.Text(), nullable=False),
        sa.Column("study_uid", sa.Text(), nullable=False),
        sa.Column("sop_class_uid", sa.Text(), nullable=False),
        sa.Column("accession_number", sa.Text(), nullable=False),
        sa.Column("study_date", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("label_source", sa.Text(), nullable=False),
        sa.Column("confirmed", sa.Integer(), nullable=False),
        sa.Column("patient_key", sa.Text(), nullable=False),
        sa.Column("image_file", sa.Text(), nullable=False),
        sa.Column("deleted", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("deleted_reason", sa.Text()),
        sa.Column("added_at", sa.REAL(), nullable=False),
        sa.Column("updated_at", sa.REAL(), nullable=False),
    )
    op.create_index("images_study", "images", ["study_uid"])
    op.create_index("images_patient", "images", ["patient_key"])
    op.create_table(
        "rebuild_vectors",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.Text(), nullable=False),
        sa.Column("vector", sa.LargeBinary()),
        sa.Column("failure", sa.Text()),
        sa.PrimaryKeyConstraint("image_id", "model_sha256"),
    )


def downgrade() -> None:
    for table in ("rebuild_vectors", "images", "meta"):
        op.drop_table(table)
