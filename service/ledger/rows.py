"""Typed rows: what the ledger's reading methods return, one frozen class per table.

Each field is a column of the table of the same name (:mod:`service.ledger.schema`);
:func:`columns` selects them in field order, so a row is built from a result row by
position, with no per-row name look-up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache
from typing import Any, Self

import sqlalchemy as sa


class Row:
    """A row class whose fields are columns of one table (the ledger's, the similar-case
    index's)."""

    __slots__ = ()

    @classmethod
    def of(cls, row: Sequence[Any]) -> Self:
        """The row read with :func:`columns`."""
        return cls(*row)


@cache
def columns(row_class: type[Row], table: sa.Table) -> tuple[sa.Column[Any], ...]:
    """The columns of ``table`` that ``row_class`` holds, in its field order."""
    return tuple(table.c[f.name] for f in fields(row_class))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class StudyRow(Row):
    """A study: its state in the life cycle (see :mod:`service.ledger`), time stamps
    of each stage (seconds since the epoch), routing, and headers for monitoring."""

    study_uid: str
    state: str
    generation: int
    first_received: float
    last_received: float
    completed_at: float | None
    queued_at: float | None
    analysis_started: float | None
    lease_until: float | None
    analysed_at: float | None
    reported_at: float | None
    sent_at: float | None
    attempts: int
    next_attempt_at: float | None
    failed_stage: str | None
    error: str | None
    updated_at: float
    routing_rule: str | None
    routing_reason: str | None
    destinations: str | None  # JSON list; use destinations_or()
    spool_bytes: int
    accession_number: str | None
    study_date: str | None
    manufacturer: str | None
    model_name: str | None

    def destinations_or(self, default: Sequence[str]) -> list[str]:
        """Where the study's results go: its routing rule's destinations, else ``default``."""
        return list(json.loads(self.destinations)) if self.destinations is not None else list(default)


@dataclass(frozen=True, slots=True)
class InstanceRecord(Row):
    """An instance: what the receiver knows about one stored file."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    calling_ae: str
    modality: str
    ignored_reason: str | None = None
    #: CRC-32 of the spool file as written: lets a restart find a file that a power
    #: loss tore after its record was committed (see receiver.StoreSCP).
    crc32: int | None = None


@dataclass(frozen=True, slots=True)
class ResultRow(Row):
    """A stored analysis result of one generation of a study (``result``: JSON text)."""

    study_uid: str
    generation: int
    result: str
    created_at: float
    images_analysed: int
    images_not_assessed: int


@dataclass(frozen=True, slots=True)
class OutboxRow(Row):
    """One result object queued for one destination."""

    sop_instance_uid: str
    destination: str
    study_uid: str
    generation: int
    sop_class_uid: str
    path: str
    state: str
    attempts: int
    next_attempt_at: float
    error: str | None
    sent_at: float | None


@dataclass(frozen=True, slots=True)
class PurgeRow(Row):
    """A removal of one kind of a study's files (``bytes`` None: not finished)."""

    study_uid: str
    generation: int
    kind: str
    reason: str
    purged_at: float
    bytes: int | None


@dataclass(frozen=True, slots=True)
class OutcomeRow(Row):
    """An outcome as stored, with the study it matched (None: none yet)."""

    outcome_id: int
    source: str
    reference: str
    accession_number: str
    study_uid: str
    finding: str
    laterality: str
    clock_position: str
    outcome_date: str
    received_at: float
    matched_study_uid: str | None
    matched_at: float | None


@dataclass(frozen=True, slots=True)
class Hl7MessageRow(Row):
    """An HL7 message received, with the ACK code it got and why."""

    message_id: int
    control_id: str
    received_at: float
    ack_code: str
    error: str | None
    message: str


@dataclass(frozen=True, slots=True)
class VerdictRow(Row):
    """A verdict as stored (a change is a new row)."""

    verdict_id: int
    study_uid: str
    finding: str
    verdict: str
    corrected_class: str | None
    comment: str
    reader: str
    recorded_at: float
    reader_role: str | None
