"""The ledger: every instance received and every state change of every study.

It is the node's single source of truth: stages hand work on through it, never
through memory, so a restarted process resumes where the crashed one stopped. Each
method is one transaction; ``claim_*`` methods are conditional updates, so two
processes never both win the same work.

Two backends behind the same table declarations (setting ``ledger_url``, see :func:`open_ledger`):
a SQLite file in WAL mode under data_dir (embedded mode: no external service), or a
PostgreSQL database (distributed mode: WAL needs shared memory on one host, so
workers on other hosts cannot share a SQLite file over a network volume). Write
transactions are serialised on both: ``BEGIN IMMEDIATE`` on SQLite, a transaction-
scoped advisory lock on PostgreSQL, so every method sees the same isolation.

Study life cycle::

    receiving -> complete -> queued -> analysing -> analysed -> reported -> sent
             \\                  \\________ failed (stage + reason) ________/
              `-> skipped (a routing rule: stored, not analysed)

An instance that arrives for a study past ``receiving`` re-opens it (``generation``
goes up) so it is analysed again.

The schema is versioned with Alembic (:mod:`service.migrations`): opening a ledger
that is not at the code's revision upgrades it, and one a newer Sonocase upgraded
is refused.

The package: :mod:`~service.ledger.schema` declares the tables (once, for both
backends and for Alembic), :mod:`~service.ledger.rows` the typed rows the reading
methods return, :mod:`~service.ledger.states` the states and the table of allowed
state changes, :mod:`~service.ledger.engine` the connection and its transactions,
:mod:`~service.ledger.core` the :class:`Ledger` itself.
"""

from service.ledger.core import Ledger, open_ledger
from service.ledger.engine import redact_url
from service.ledger.records import (
    FILE_KINDS,
    FINDINGS,
    READER_ROLES,
    VERDICTS,
    Outcome,
    PurgeCandidate,
    Routing,
    Verdict,
)
from service.ledger.rows import (
    Hl7MessageRow,
    InstanceRecord,
    OutboxRow,
    OutcomeRow,
    PurgeRow,
    ResultRow,
    StudyRow,
    VerdictRow,
)
from service.ledger.states import DONE, PENDING_ANALYSIS, TRANSITIONS, OutboxState, StudyState

__all__ = [
    "DONE",
    "FILE_KINDS",
    "FINDINGS",
    "PENDING_ANALYSIS",
    "READER_ROLES",
    "TRANSITIONS",
    "VERDICTS",
    "Hl7MessageRow",
    "InstanceRecord",
    "Ledger",
    "OutboxRow",
    "OutboxState",
    "Outcome",
    "OutcomeRow",
    "PurgeCandidate",
    "PurgeRow",
    "ResultRow",
    "Routing",
    "StudyRow",
    "StudyState",
    "Verdict",
    "VerdictRow",
    "open_ledger",
    "redact_url",
]
