"""The states of a study and of an outbox row, and the state changes a stage may make.

:data:`TRANSITIONS` is the one table of the changes :meth:`Ledger.transition
<service.ledger.Ledger.transition>` makes; the others belong to one method each,
which says so: receiving and re-opening (``record_instances``), completion
(``complete_studies``), queueing and analysis (``mark_queued``, ``claim_analysis``,
``finish_analysis``, ``retry_or_fail``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    ANALYSING = "analysing"
    ANALYSED = "analysed"
    REPORTED = "reported"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    #: An optional object (see service.reports.build.OPTIONAL_CLASSES) the
    #: destination does not take: not sent there, and the study is sent without it.
    SKIPPED = "skipped"


#: States in which a study still waits for the analysis worker.
PENDING_ANALYSIS = (StudyState.COMPLETE, StudyState.QUEUED, StudyState.ANALYSING)
#: Where a study stands once nothing more will happen to it: its files may go
#: (retention), provided every result object was accepted.
DONE = (StudyState.SENT, StudyState.SKIPPED)


@dataclass(frozen=True, slots=True)
class Rule:
    """How a study may come to one state: from which states, which time stamp column
    is set to the time of the change, whether the failure (``failed_stage``,
    ``error``) is set (``failing``) or cleared (``clears_failure``), and whether the
    analysis attempts start again from zero."""

    sources: frozenset[StudyState]
    stamp: str | None = None
    failing: bool = False
    clears_failure: bool = False
    resets_attempts: bool = False


#: target state -> how a study may move there through ``Ledger.transition``.
TRANSITIONS: dict[StudyState, Rule] = {
    # `sonocase retry` of a failed analysis: the scheduler queues it again
    StudyState.COMPLETE: Rule(frozenset({StudyState.FAILED}), clears_failure=True, resets_attempts=True),
    # the reports are written and queued (again, after a failed report or send)
    StudyState.REPORTED: Rule(
        frozenset({StudyState.ANALYSED, StudyState.FAILED}), stamp="reported_at", clears_failure=True
    ),
    # every result object was accepted
    StudyState.SENT: Rule(frozenset({StudyState.REPORTED}), stamp="sent_at"),
    # the report or the delivery failed for good
    StudyState.FAILED: Rule(frozenset({StudyState.ANALYSED, StudyState.REPORTED, StudyState.FAILED}), failing=True),
}
