"""The similar-case index's side table (``index.sqlite3``), declared once: the
migrations under :mod:`service.similar.migrations` make it, a test compares the two."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

#: The index's own facts: format, id, version counter, the current graph file, the bound model.
meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text(), primary_key=True, nullable=True),  # as SQLite had it
    sa.Column("value", sa.Text(), nullable=False),
)

#: One row per reference image; ``id`` is its label in the hnswlib graph.
images = sa.Table(
    "images",
    metadata,
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
    sa.Index("images_study", "study_uid"),
    sa.Index("images_patient", "patient_key"),
)

#: A rebuild's staged vectors, per image and new model (see SimilarCaseIndex.rebuild).
rebuild_vectors = sa.Table(
    "rebuild_vectors",
    metadata,
    sa.Column("image_id", sa.Integer(), nullable=False),
    sa.Column("model_sha256", sa.Text(), nullable=False),
    sa.Column("vector", sa.LargeBinary()),
    sa.Column("failure", sa.Text()),
    sa.PrimaryKeyConstraint("image_id", "model_sha256"),
)
