"""Outcomes and verdicts: what turned out to be true for a study (and the HL7
messages that said so), and what the radiologists said of the model's result.

``studies`` gains the headers monitoring needs (accession number to match outcomes,
study date and scanner to group performance), filled when a result is stored.
``outcomes`` has a row per outcome received (pathology benign / malignant with the
lesion's laterality and clock position where given, or stable at follow-up), the
study it names (accession number and/or Study Instance UID) and, once known, the
study it matched (``matched_study_uid``; NULL while unmatched). ``(source,
reference)`` is unique, so importing a file or receiving a message again adds
nothing. ``hl7_messages`` keeps every HL7 message received, with the ACK code it
got and why, so a malformed one can be inspected. ``verdicts`` has a row per verdict
given (agree / disagree / corrected class, comment, reader, time), per study
(``finding`` empty) or per image (``finding`` its SOP Instance UID); a changed
verdict is a new row, so every change is kept and the newest row counts.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.migrations.types import INTEGER, REAL, TEXT

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_STUDY_COLUMNS = ("accession_number", "study_date", "manufacturer", "model_name")


def upgrade() -> None:
    for name in _STUDY_COLUMNS:
        op.add_column("studies", sa.Column(name, TEXT()))
    op.create_index("studies_accession", "studies", ["accession_number"])
    op.create_table(
        "outcomes",
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
    )
    op.create_index(
        "outcomes_unmatched",
        "outcomes",
        ["received_at"],
        sqlite_where=sa.text("matched_study_uid IS NULL"),
        postgresql_where=sa.text("matched_study_uid IS NULL"),
    )
    op.create_index("outcomes_study", "outcomes", ["matched_study_uid"])
    op.create_table(
        "hl7_messages",
        sa.Column("message_id", INTEGER(), primary_key=True, autoincrement=True),
        sa.Column("control_id", TEXT(), nullable=False),
        sa.Column("received_at", REAL(), nullable=False),
        sa.Column("ack_code", TEXT(), nullable=False),
        sa.Column("error", TEXT()),
        sa.Column("message", TEXT(), nullable=False),
    )
    op.create_table(
        "verdicts",
        sa.Column("verdict_id", INTEGER(), primary_key=True, autoincrement=True),
        sa.Column("study_uid", TEXT(), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("finding", TEXT(), nullable=False),
        sa.Column("verdict", TEXT(), nullable=False),
        sa.Column("corrected_class", TEXT()),
        sa.Column("comment", TEXT(), nullable=False),
        sa.Column("reader", TEXT(), nullable=False),
        sa.Column("recorded_at", REAL(), nullable=False),
    )
    op.create_index("verdicts_study", "verdicts", ["study_uid", "finding"])


def downgrade() -> None:
    op.drop_table("verdicts")
    op.drop_table("hl7_messages")
    op.drop_table("outcomes")
    op.drop_index("studies_accession", "studies")
    for name in reversed(_STUDY_COLUMNS):
        op.drop_column("studies", name)
