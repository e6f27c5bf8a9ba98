"""The ledger's tables, declared once.

The queries of :mod:`service.ledger` are built on these declarations, for SQLite and
PostgreSQL alike, and Alembic compares them with the migrated database
(``tests/test_migrations.py``), so a migration that forgets a column, or a column
the code uses and no migration makes, fails a test. Released migrations under
``service/migrations/versions`` stay as they were written: a schema change is a new
revision *and* an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa

from service.migrations.types import INTEGER, REAL, TEXT

metadata = sa.MetaData()

studies = sa.Table(
    "studies",
    metadata,
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
    sa.Column("routing_rule", TEXT()),
    sa.Column("routing_reason", TEXT()),
    sa.Column("destinations", TEXT()),  # JSON list of AE@host:port; NULL: the destinations setting
    sa.Column("spool_bytes", INTEGER(), nullable=False, server_default=sa.text("0")),
    sa.Column("accession_number", TEXT()),
    sa.Column("study_date", TEXT()),
    sa.Column("manufacturer", TEXT()),
    sa.Column("model_name", TEXT()),
    sa.Index("studies_state", "state"),
    sa.Index("studies_accession", "accession_number"),
)

instances = sa.Table(
    "instances",
    metadata,
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
    sa.Index("instances_study", "study_uid"),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
    sa.Column("generation", INTEGER(), nullable=False),
    sa.Column("result", TEXT(), nullable=False),
    sa.Column("created_at", REAL(), nullable=False),
    sa.Column("images_analysed", INTEGER(), nullable=False, server_default=sa.text("0")),
    sa.Column("images_not_assessed", INTEGER(), nullable=False, server_default=sa.text("0")),
    sa.PrimaryKeyConstraint("study_uid", "generation"),
)

outbox = sa.Table(
    "outbox",
    metadata,
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
    sa.Index("outbox_state", "state", "next_attempt_at"),
)

purges = sa.Table(
    "purges",
    metadata,
    sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
    sa.Column("generation", INTEGER(), nullable=False),
    sa.Column("kind", TEXT(), nullable=False),
    sa.Column("reason", TEXT(), nullable=False),
    sa.Column("purged_at", REAL(), nullable=False),
    sa.Column("bytes", INTEGER()),  # NULL until the files are gone
    sa.PrimaryKeyConstraint("study_uid", "generation", "kind"),
    sa.Index(
        "purges_unfinished",
        "purged_at",
        sqlite_where=sa.text("bytes IS NULL"),
        postgresql_where=sa.text("bytes IS NULL"),
    ),
)

outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("outcome_id", INTEGER(), primary_key=True, autoincrement=True),
    sa.Column("source", TEXT(), nullable=False),
    sa.Column("reference", TEXT(), nullable=False),
    sa.Column("accession_number", TEXT(), nullable=False),
    sa.Column("study_uid", TEXT(), nullable=False),
    sa.Column("finding", TEXT(), nullable=False),
    sa.Column("laterality", TEXT(), nullable=False),
    sa.Column("clock_position", TEXT(), nullable=False),
    sa.Column("outcome_date", TEXT(), nullable=False),
    sa.Column("received_at", REAL(), nullable=False),
    sa.Column("matched_study_uid", TEXT(), sa.ForeignKey("studies.study_uid")),
    sa.Column("matched_at", REAL()),
    sa.UniqueConstraint("source", "reference", name="outcomes_source_reference"),
    sa.Index(
        "outcomes_unmatched",
        "received_at",
        sqlite_where=sa.text("matched_study_uid IS NULL"),
        postgresql_where=sa.text("matched_study_uid IS NULL"),
    ),
    sa.Index("outcomes_study", "matched_study_uid"),
)

hl7_messages = sa.Table(
    "hl7_messages",
    metadata,
    sa.Column("message_id", INTEGER(), primary_key=True, autoincrement=True),
    sa.Column("control_id", TEXT(), nullable=False),
    sa.Column("received_at", REAL(), nullable=False),
    sa.Column("ack_code", TEXT(), nullable=False),
    sa.Column("error", TEXT()),
    sa.Column("message", TEXT(), nullable=False),
)

verdicts = sa.Table(
    "verdicts",
    metadata,
    sa.Column("verdict_id", INTEGER(), primary_key=True, autoincrement=True),
    sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
    sa.Column("finding", TEXT(), nullable=False),
    sa.Column("verdict", TEXT(), nullable=False),
    sa.Column("corrected_class", TEXT()),
    sa.Column("comment", TEXT(), nullable=False),
    sa.Column("reader", TEXT(), nullable=False),
    sa.Column("recorded_at", REAL(), nullable=False),
    sa.Column("reader_role", TEXT()),
    sa.Index("verdicts_study", "study_uid", "finding"),
)
