"""The ledger: every instance received and every state change of every study.

It is the node's single source of truth: stages hand work on through it, never
through memory, so a restarted process resumes where the crashed one stopped. Each
method is one transaction; ``claim_*`` methods are conditional updates, so two
processes never both win the same work.

Two backends behind the same SQL (setting ``ledger_url``, see :func:`open_ledger`):
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
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import psycopg

    from service.settings import Settings


LOG = logging.getLogger(__name__)


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


#: States in which a study still waits for the analysis worker.
PENDING_ANALYSIS = (StudyState.COMPLETE, StudyState.QUEUED, StudyState.ANALYSING)
#: Where a study stands once nothing more will happen to it: its files may go
#: (retention), provided every result object was accepted.
DONE = (StudyState.SENT, StudyState.SKIPPED)
#: The kinds of files a study has under data_dir, each with its own retention.
FILE_KINDS = ("spool", "results", "outbox")
#: When a done study was done: sent, or (skipped) completed.
_DONE_AT = "CASE WHEN s.state='sent' THEN s.sent_at ELSE s.completed_at END"
#: A done study at its generation with no result object still to deliver.
_DONE_STUDY = (
    "s.state IN ('sent', 'skipped') AND NOT EXISTS"
    " (SELECT 1 FROM outbox o WHERE o.study_uid=s.study_uid AND o.state!='sent')"
)


@dataclass(frozen=True, slots=True)
class Routing:
    """What the routing rules decided for a study when it became complete: analyse
    it or not, the rule that decided (None: none matched), which attributes matched
    (keywords, never values), and where its results go (None: the ``destinations``
    setting)."""

    analyse: bool = True
    rule: str | None = None
    reason: str | None = None
    destinations: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class PurgeCandidate:
    """A done study whose files of some kinds are still there."""

    study_uid: str
    generation: int
    state: str
    done_at: float
    kinds: tuple[str, ...]  # kinds not removed yet, in FILE_KINDS order
    spool_bytes: int


def study_destinations(study: dict[str, Any], default: Sequence[str]) -> list[str]:
    """Where a study's results go: the routing rule's destinations, else ``default``."""
    chosen = study.get("destinations")
    return list(json.loads(chosen)) if chosen is not None else list(default)


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    #: An optional object (see service.reports.build.OPTIONAL_CLASSES) the
    #: destination does not take: not sent there, and the study is sent without it.
    SKIPPED = "skipped"


#: Studies a task must be sent for (see :meth:`Ledger.due_for_queue`); arguments from _due_args.
_DUE = "(state=? AND (next_attempt_at IS NULL OR next_attempt_at<=?)) OR (state IN (?, ?) AND lease_until<=?)"


def _due_args(now: float) -> tuple[Any, ...]:
    return (StudyState.COMPLETE, now, StudyState.QUEUED, StudyState.ANALYSING, now)


class _Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class _Connection(Protocol):
    """What the ledger needs of a database connection; rows answer ``row[i]``,
    ``row["name"]`` and ``dict(row)`` like :class:`sqlite3.Row`."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Cursor: ...
    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Cursor: ...
    def begin_write(self) -> None: ...
    def commit_write(self) -> None: ...
    def rollback_write(self) -> None: ...
    def close(self) -> None: ...


class _SqliteConnection(sqlite3.Connection):
    """SQLite's own connection (no wrapper on the receiver's hot path) plus the
    write-transaction verbs; ``BEGIN IMMEDIATE`` takes the write lock up front."""

    def begin_write(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def commit_write(self) -> None:
        self.execute("COMMIT")

    def rollback_write(self) -> None:
        if self.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL at COMMIT)
            self.execute("ROLLBACK")


#: The advisory lock every write transaction of every node process takes: PostgreSQL
#: then serialises them as SQLite does, so read-then-write methods need no retries.
_PG_WRITE_LOCK = 0x50C0CA5E


class _PgRow(tuple):  # type: ignore[type-arg]
    """A result row read by position or by column name, as :class:`sqlite3.Row` is."""

    __slots__ = ()
    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        return tuple.__getitem__(self, self._names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._names)


@functools.lru_cache(maxsize=64)
def _pg_row_type(names: tuple[str, ...]) -> type[_PgRow]:
    return type("Row", (_PgRow,), {"__slots__": (), "_names": {name: i for i, name in enumerate(names)}})


def _pg_row_factory(cursor: psycopg.Cursor[Any]) -> type[_PgRow]:
    """psycopg's row factory: the row type for this result's columns."""
    return _pg_row_type(tuple(col.name for col in cursor.description or ()))


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """The ledger's SQL (written in the dialect both share) with psycopg's ``%s``
    placeholders for SQLite's ``?``."""
    if "%" in sql:
        raise ValueError(f"ledger SQL must not contain '%': {sql}")
    return sql.replace("?", "%s")


class _PgConnection:
    """One PostgreSQL connection in autocommit mode (a read is its own transaction,
    as on SQLite); reconnects before the next statement after the server went away,
    never in the middle of a transaction."""

    def __init__(self, url: str, durable: bool) -> None:
        try:
            import psycopg
        except ImportError as exc:  # a broken install, not a bad setting
            raise RuntimeError("SONOCASE_LEDGER_URL needs psycopg: run scripts/setup.sh") from exc
        self._psycopg = psycopg
        self._url = url
        self._durable = durable
        self._in_tx = False
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = self._psycopg.connect(self._url, autocommit=True, row_factory=_pg_row_factory, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot reach the ledger database {redact_url(self._url)}: {exc}") from None
        # off: a commit returns before the WAL is flushed, so a crash of the database
        # server (not of ours) may lose the last moments; what durability "none" promises.
        conn.execute(f"SET synchronous_commit TO {'on' if self._durable else 'off'}")
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        if self._conn.closed and not self._in_tx:
            self._conn = self._connect()
        return self._conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Cursor:
        return self._live().execute(_pg_sql(sql), args)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Cursor:
        cursor = self._live().cursor()
        cursor.executemany(_pg_sql(sql), seq)
        return cursor

    def begin_write(self) -> None:
        conn = self._live()
        conn.execute("BEGIN")
        self._in_tx = True
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))

    def commit_write(self) -> None:
        self._in_tx = False
        self._conn.execute("COMMIT")

    def rollback_write(self) -> None:
        self._in_tx = False
        if not self._conn.closed:
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the receiver knows about one stored instance."""

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


#: What an outcome may say (service.outcomes): pathology, or stable at follow-up.
FINDINGS = ("benign", "malignant", "stable")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What turned out to be true for a study, as a CSV row or an HL7 message said.

    The study is named by ``accession_number`` and/or ``study_uid`` (at least one);
    ``reference`` is unique within ``source`` (file name and row, HL7 message
    control ID and observation), so receiving it again adds nothing. Empty strings
    stand for what was not given."""

    source: str
    reference: str
    finding: str  # one of FINDINGS
    accession_number: str = ""
    study_uid: str = ""
    laterality: str = ""  # L or R
    clock_position: str = ""  # 1..12, or 0 for retroareolar
    outcome_date: str = ""  # YYYYMMDD

    def __post_init__(self) -> None:
        if self.finding not in FINDINGS:
            raise ValueError(f"outcome {self.finding!r} is not one of {', '.join(FINDINGS)}")
        if not (self.accession_number or self.study_uid):
            raise ValueError("an outcome needs an accession number or a Study Instance UID")
        if self.laterality not in ("", "L", "R"):
            raise ValueError(f"laterality {self.laterality!r} is not L or R")
        if self.clock_position and self.clock_position not in {str(h) for h in range(13)}:
            raise ValueError(f"clock position {self.clock_position!r} is not 1..12 (0: retroareolar)")
        if self.outcome_date and not re.fullmatch(r"\d{8}", self.outcome_date):
            raise ValueError(f"outcome date {self.outcome_date!r} is not YYYYMMDD")


#: What a radiologist may say of a result (service.monitoring.verdicts).
VERDICTS = ("agree", "disagree", "corrected")
#: The roles a verdict's credential may have (service.ops.sessions.Role).
READER_ROLES = ("admin", "reviewer")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A radiologist's verdict on a study's result (``finding`` empty) or on one
    image's (its SOP Instance UID): agree, disagree, or the corrected class;
    ``reader_role`` the role of the credential it came with (None: not known)."""

    study_uid: str
    finding: str
    verdict: str  # one of VERDICTS
    corrected_class: str | None
    comment: str
    reader: str
    reader_role: str | None = None  # one of READER_ROLES

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")
        if (self.verdict == "corrected") != (self.corrected_class is not None):
            raise ValueError("a corrected class goes with the verdict 'corrected', and only with it")
        if not self.reader.strip():
            raise ValueError("a verdict needs its reader")
        if self.reader_role is not None and self.reader_role not in READER_ROLES:
            raise ValueError(f"reader role {self.reader_role!r} is not one of {', '.join(READER_ROLES)}")


#: Matches every unmatched outcome whose study is known (by UID, or by accession
#: number once the study's result recorded it) to that study.
_MATCH = (
    "UPDATE outcomes SET matched_at=?, matched_study_uid=(SELECT s.study_uid FROM studies s"
    " WHERE s.study_uid=outcomes.study_uid OR (outcomes.accession_number!='' AND"
    " s.accession_number=outcomes.accession_number) ORDER BY s.study_uid LIMIT 1)"
    " WHERE matched_study_uid IS NULL AND EXISTS (SELECT 1 FROM studies s WHERE s.study_uid=outcomes.study_uid"
    " OR (outcomes.accession_number!='' AND s.accession_number=outcomes.accession_number))"
)


def _instance(row: Any) -> InstanceRecord:
    return InstanceRecord(**{k: row[k] for k in InstanceRecord.__slots__})


def open_ledger(settings: Settings, durable: bool | None = None) -> Ledger:
    """The ledger the settings name: PostgreSQL at ``ledger_url``, else the SQLite
    file under data_dir. ``durable`` defaults to the ``durability`` setting."""
    durable = settings.durability == "fsync" if durable is None else durable
    if settings.ledger_url:
        return Ledger(url=settings.ledger_url, durable=durable)
    return Ledger(settings.ledger_path, durable=durable)


#: How long a SQLite ledger waits for another connection's write lock.
_SQLITE_TIMEOUT_S = 30.0


def _open_sqlite(path: Path, durable: bool) -> _SqliteConnection:
    db = sqlite3.connect(
        path, timeout=_SQLITE_TIMEOUT_S, isolation_level=None, check_same_thread=False, factory=_SqliteConnection
    )
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit (survives power loss); NORMAL survives
        # a process crash, which is what durability "none" promises.
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db


class Ledger:
    """A process's handle on the ledger; safe to share between its threads.

    Either the SQLite file at ``path`` or the PostgreSQL database at ``url``
    (``postgresql://user@host:port/db``); :func:`open_ledger` picks from settings.
    """

    def __init__(self, path: Path | None = None, durable: bool = True, *, url: str = "") -> None:
        if (path is None) == (not url):
            raise ValueError("a ledger is either a SQLite file (path) or a PostgreSQL database (url)")
        self.path = path
        self._lock = threading.RLock()
        self._db: _Connection
        if url:
            self._db = _PgConnection(url, durable)
            self._ensure_schema(path, url)
            return
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _SQLITE_TIMEOUT_S
        while True:
            try:
                self._db = _open_sqlite(path, durable)
                try:
                    self._ensure_schema(path, url)
                except BaseException:
                    self._db.close()
                    raise
                return
            except sqlite3.OperationalError as exc:
                # SQLite does not always wait out its busy timeout: a connection that
                # opens a ledger while others switch it to WAL, recover or upgrade it
                # can be told "locked" at once. Opening is idempotent: try again.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _ensure_schema(self, path: Path | None, url: str) -> None:
        """Upgrade the database to the code's schema revision if it is not there (one
        query when it is); refuse one that a newer Sonocase upgraded."""
        from service import migrations

        if self._revision() == migrations.HEAD:
            return
        migrations.upgrade(path, url)

    def _revision(self) -> str | None:
        if isinstance(self._db, sqlite3.Connection):
            exists = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
        else:
            exists = "SELECT 1 WHERE to_regclass('alembic_version') IS NOT NULL"
        if not self._query(exists):
            return None
        rows = self._query("SELECT version_num FROM alembic_version")
        return str(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[_Connection]:
        with self._lock:
            self._db.begin_write()
            try:
                yield self._db
                self._db.commit_write()  # can fail too (a full disk): then roll back as well
            except BaseException:
                self._db.rollback_write()
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- receiving ---------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Record a stored instance; return False if its SOP Instance UID was known.

        A new instance for a study past ``receiving`` re-opens the study.
        """
        return self.record_instances([rec], now)[0]

    def record_instances(self, recs: list[InstanceRecord], now: float | None = None) -> list[bool]:
        """:meth:`record_instance` for several instances in one transaction (one
        fsync: the receiver's group commit when associations store concurrently)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return [self._record(db, rec, now) for rec in recs]

    @staticmethod
    def _record(db: _Connection, rec: InstanceRecord, now: float) -> bool:
        if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)).fetchone():
            return False
        row = db.execute("SELECT state FROM studies WHERE study_uid=?", (rec.study_uid,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO studies (study_uid, state, first_received, last_received, updated_at, spool_bytes)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (rec.study_uid, StudyState.RECEIVING, now, now, now, rec.size),
            )
        elif row["state"] == StudyState.RECEIVING:
            db.execute(
                "UPDATE studies SET last_received=?, updated_at=?, spool_bytes=spool_bytes+? WHERE study_uid=?",
                (now, now, rec.size, rec.study_uid),
            )
        else:
            db.execute(
                "UPDATE studies SET state=?, generation=generation+1, last_received=?,"
                " attempts=0, next_attempt_at=NULL, failed_stage=NULL, error=NULL,"
                " lease_until=NULL, updated_at=?, spool_bytes=spool_bytes+? WHERE study_uid=?",
                (StudyState.RECEIVING, now, now, rec.size, rec.study_uid),
            )
        db.execute(
            "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
            " path, size, calling_ae, modality, ignored_reason, received_at, crc32)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.sop_instance_uid,
                rec.study_uid,
                rec.series_uid,
                rec.sop_class_uid,
                rec.transfer_syntax,
                rec.path,
                rec.size,
                rec.calling_ae,
                rec.modality,
                rec.ignored_reason,
                now,
                rec.crc32,
            ),
        )
        return True

    def quiet_studies(self, quiet_period_s: float, now: float | None = None) -> list[tuple[str, float]]:
        """``receiving`` studies without a new instance for ``quiet_period_s``, with
        the time of their last instance (what :meth:`complete_studies` checks)."""
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT study_uid, last_received FROM studies WHERE state=? AND last_received<=?"
            " ORDER BY last_received, study_uid",
            (StudyState.RECEIVING, now - quiet_period_s),
        )
        return [(r["study_uid"], r["last_received"]) for r in rows]

    def complete_studies(self, routed: Sequence[tuple[str, float, Routing]], now: float | None = None) -> list[str]:
        """Make quiet studies complete (or skipped, as their routing says) in one
        transaction; a study that received an instance since ``last_received`` was
        read stays receiving (its routing is decided again). Returns those changed."""
        now = time.time() if now is None else now
        done = []
        with self._tx() as db:
            for study_uid, last_received, routing in routed:
                state = StudyState.COMPLETE if routing.analyse else StudyState.SKIPPED
                destinations = json.dumps(list(routing.destinations)) if routing.destinations is not None else None
                cur = db.execute(
                    "UPDATE studies SET state=?, completed_at=?, updated_at=?, routing_rule=?, routing_reason=?,"
                    " destinations=? WHERE study_uid=? AND state=? AND last_received=?",
                    (
                        state,
                        now,
                        now,
                        routing.rule,
                        routing.reason,
                        destinations,
                        study_uid,
                        StudyState.RECEIVING,
                        last_received,
                    ),
                )
                if cur.rowcount == 1:
                    done.append(study_uid)
        return done

    def complete_quiet_studies(self, quiet_period_s: float, now: float | None = None) -> list[str]:
        """Mark ``receiving`` studies quiet for ``quiet_period_s`` complete, with no
        routing rule (service.pipeline.completion applies the rules)."""
        now = time.time() if now is None else now
        return self.complete_studies(
            [(uid, last, Routing()) for uid, last in self.quiet_studies(quiet_period_s, now)], now
        )

    def oldest_receiving(self) -> float | None:
        """The oldest ``last_received`` of a study still receiving: the next study to
        complete is that one (see :class:`service.pipeline.completion.CompletionLoop`)."""
        rows = self._query("SELECT MIN(last_received) AS oldest FROM studies WHERE state=?", (StudyState.RECEIVING,))
        return rows[0]["oldest"] if rows else None

    # --- queueing and analysis ----------------------------------------------
    def due_for_queue(self, now: float | None = None) -> list[str]:
        """Studies a task must be sent for: complete ones, retries that are due, and
        queued/analysing ones whose lease ran out (their worker or message was lost)."""
        now = time.time() if now is None else now
        rows = self._query(f"SELECT study_uid FROM studies WHERE {_DUE} ORDER BY last_received", _due_args(now))
        return [r["study_uid"] for r in rows]

    def mark_queued(self, study_uid: str, lease_s: float, now: float | None = None) -> None:
        """Record that a task was sent, if the study is still due: a worker that
        already claimed (or finished, or failed) it keeps its state."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                f"UPDATE studies SET state=?, queued_at=?, lease_until=?, updated_at=? WHERE study_uid=? AND ({_DUE})",
                (StudyState.QUEUED, now, now + lease_s, now, study_uid, *_due_args(now)),
            )

    def claim_analysis(self, study_uid: str, lease_s: float, now: float | None = None) -> int | None:
        """Take the study for analysis; return its generation, or None if another
        worker holds a live lease or the study is not waiting for analysis."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE studies SET state=?, analysis_started=?, lease_until=?, attempts=attempts+1,"
                " updated_at=? WHERE study_uid=? AND (state IN (?, ?) OR (state=? AND lease_until<=?))",
                (
                    StudyState.ANALYSING,
                    now,
                    now + lease_s,
                    now,
                    study_uid,
                    StudyState.COMPLETE,
                    StudyState.QUEUED,
                    StudyState.ANALYSING,
                    now,
                ),
            )
            if cur.rowcount != 1:
                return None
            return int(db.execute("SELECT generation FROM studies WHERE study_uid=?", (study_uid,)).fetchone()[0])

    def finish_analysis(
        self,
        study_uid: str,
        generation: int,
        result: dict[str, Any],
        lease_s: float = 0.0,
        now: float | None = None,
        *,
        images_analysed: int = 0,
        images_not_assessed: int = 0,
    ) -> bool:
        """Store the result; False if the study was re-opened meanwhile (stale result)
        or another worker stored it first. A result of the current generation is kept
        even when its lease ran out and the study was queued again: the work is done.
        ``images_analysed`` and ``images_not_assessed`` (those the domain guard
        flagged) are kept beside it for :meth:`image_totals`.

        The caller keeps the study's lease for ``lease_s`` (and renews it, see
        :meth:`keep_lease`) while it builds the reports; once the lease runs out, an
        unreported study is an orphan (:meth:`claim_orphaned_reports`).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE studies SET state=?, analysed_at=?, lease_until=?, error=NULL, failed_stage=NULL,"
                " updated_at=? WHERE study_uid=? AND generation=? AND state IN (?, ?, ?)",
                (StudyState.ANALYSED, now, now + lease_s, now, study_uid, generation, *PENDING_ANALYSIS),
            )
            if cur.rowcount != 1:
                return False
            db.execute(
                "INSERT INTO results (study_uid, generation, result, created_at, images_analysed,"
                " images_not_assessed) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (study_uid, generation)"
                " DO UPDATE SET result=excluded.result, created_at=excluded.created_at,"
                " images_analysed=excluded.images_analysed, images_not_assessed=excluded.images_not_assessed",
                (study_uid, generation, json.dumps(result), now, images_analysed, images_not_assessed),
            )
            study = result.get("study", {})
            db.execute(
                "UPDATE studies SET accession_number=?, study_date=?, manufacturer=?, model_name=? WHERE study_uid=?",
                (
                    study.get("accession_number", ""),
                    study.get("study_date", ""),
                    study.get("manufacturer", ""),
                    study.get("model_name", ""),
                    study_uid,
                ),
            )
            db.execute(_MATCH, (now,))
            return True

    def renew_lease(self, study_uid: str, generation: int, lease_s: float, now: float | None = None) -> bool:
        """Extend the lease of a study this process is analysing or reporting; False
        when the study moved on (finished, re-opened, failed) and there is none to keep."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE studies SET lease_until=? WHERE study_uid=? AND generation=? AND state IN (?, ?)",
                (now + lease_s, study_uid, generation, StudyState.ANALYSING, StudyState.ANALYSED),
            )
            return cur.rowcount == 1

    @contextmanager
    def keep_lease(self, study_uid: str, generation: int, lease_s: float) -> Iterator[None]:
        """Renew the study's lease every third of ``lease_s`` while the block runs.

        A live worker so keeps its study however long the work takes, and the lease
        can be short: a killed worker stops renewing, and its study is noticed within
        ``lease_s`` (queued again, or reported by the sender).
        """
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(lease_s / 3):
                try:
                    if not self.renew_lease(study_uid, generation, lease_s):
                        return
                except Exception:  # a busy ledger: the next beat tries again before the lease ends
                    LOG.warning("could not renew the lease", exc_info=True, extra={"study_uid": study_uid})

        thread = threading.Thread(target=beat, name="sonocase-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def claim_orphaned_reports(self, lease_s: float, now: float | None = None) -> list[tuple[str, int]]:
        """Take the analysed studies whose worker stopped renewing its lease before
        reporting them (killed after storing the result); return (study UID,
        generation) of each, now leased to the caller for ``lease_s``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT study_uid, generation FROM studies WHERE state=? AND (lease_until IS NULL OR lease_until<=?)",
                (StudyState.ANALYSED, now),
            ).fetchall()
            db.executemany(
                "UPDATE studies SET lease_until=? WHERE study_uid=? AND generation=?",
                [(now + lease_s, r["study_uid"], r["generation"]) for r in rows],
            )
        return [(r["study_uid"], int(r["generation"])) for r in rows]

    def retry_or_fail(
        self,
        study_uid: str,
        stage: str,
        reason: str,
        max_attempts: int,
        backoff_s: float,
        now: float | None = None,
    ) -> StudyState:
        """After a failed attempt: schedule another (exponential backoff) or give up visibly."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            attempts = row["attempts"] if row else max_attempts
            if attempts >= max_attempts:
                state, next_at = StudyState.FAILED, None
            else:
                state, next_at = StudyState.COMPLETE, now + backoff_s * 2 ** (attempts - 1)
            db.execute(
                "UPDATE studies SET state=?, next_attempt_at=?, lease_until=NULL, failed_stage=?, error=?,"
                " updated_at=? WHERE study_uid=?",
                (state, next_at, stage, reason, now, study_uid),
            )
        return state

    def set_state(self, study_uid: str, state: StudyState, now: float | None = None, **stamps: Any) -> None:
        """Move a study to ``state``; ``stamps`` sets timestamp or error columns."""
        allowed = {"reported_at", "sent_at", "error", "failed_stage", "attempts"}
        if not set(stamps) <= allowed:
            raise ValueError(f"cannot set {sorted(set(stamps) - allowed)} through set_state")
        now = time.time() if now is None else now
        cols = "".join(f", {k}=?" for k in stamps)
        with self._tx() as db:
            db.execute(
                f"UPDATE studies SET state=?, updated_at=?{cols} WHERE study_uid=?",
                (state, now, *stamps.values(), study_uid),
            )

    def transition(
        self,
        study_uid: str,
        state: StudyState,
        from_states: tuple[StudyState, ...],
        generation: int,
        now: float | None = None,
        **stamps: Any,
    ) -> bool:
        """Like :meth:`set_state`, but only from ``from_states`` at ``generation``:
        False when the study moved on meanwhile (re-opened by a new instance), so a
        late stage never overwrites a newer one."""
        allowed = {"reported_at", "sent_at", "error", "failed_stage"}
        if not set(stamps) <= allowed:
            raise ValueError(f"cannot set {sorted(set(stamps) - allowed)} through transition")
        now = time.time() if now is None else now
        cols = "".join(f", {k}=?" for k in stamps)
        marks = ",".join("?" * len(from_states))
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE studies SET state=?, updated_at=?{cols} WHERE study_uid=? AND generation=?"
                f" AND state IN ({marks})",
                (state, now, *stamps.values(), study_uid, generation, *from_states),
            )
            return cur.rowcount == 1

    # --- reading -----------------------------------------------------------
    def study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return dict(rows[0]) if rows else None

    def studies(self, states: tuple[str, ...] = (), limit: int = 1000) -> list[dict[str, Any]]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(
                f"SELECT * FROM studies WHERE state IN ({marks}) ORDER BY updated_at DESC LIMIT ?",
                (*states, limit),
            )
        else:
            rows = self._query("SELECT * FROM studies ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._query("SELECT state, COUNT(*) FROM studies GROUP BY state")}

    def pending_analysis_count(self) -> int:
        marks = ",".join("?" * len(PENDING_ANALYSIS))
        return int(self._query(f"SELECT COUNT(*) FROM studies WHERE state IN ({marks})", PENDING_ANALYSIS)[0][0])

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        rows = self._query(
            "SELECT * FROM instances WHERE study_uid=? ORDER BY received_at, sop_instance_uid", (study_uid,)
        )
        return [_instance(r) for r in rows]

    def receiving_instances(self) -> list[InstanceRecord]:
        """Instances of studies still being received: the only ones whose files may
        not have reached the disk when the machine went down."""
        rows = self._query(
            "SELECT i.* FROM instances i JOIN studies s ON s.study_uid=i.study_uid WHERE s.state=?"
            " ORDER BY i.received_at, i.sop_instance_uid",
            (StudyState.RECEIVING,),
        )
        return [_instance(r) for r in rows]

    def forget_instances(self, sop_instance_uids: list[str]) -> None:
        """Remove records of instances that were never acknowledged (their file did not
        reach the disk); a receiving study left without instances goes too."""
        with self._tx() as db:
            for uid in sop_instance_uids:
                row = db.execute("SELECT study_uid, size FROM instances WHERE sop_instance_uid=?", (uid,)).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM instances WHERE sop_instance_uid=?", (uid,))
                db.execute(
                    "UPDATE studies SET spool_bytes=spool_bytes-? WHERE study_uid=?", (row["size"], row["study_uid"])
                )
                db.execute(
                    "DELETE FROM studies WHERE study_uid=? AND state=? AND generation=1"
                    " AND NOT EXISTS (SELECT 1 FROM instances WHERE study_uid=?)",
                    (row["study_uid"], StudyState.RECEIVING, row["study_uid"]),
                )

    def instance_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM instances")[0][0])

    def result(self, study_uid: str, generation: int | None = None) -> dict[str, Any] | None:
        """The newest result of a study (or that of ``generation``)."""
        if generation is None:
            rows = self._query(
                "SELECT result FROM results WHERE study_uid=? ORDER BY generation DESC LIMIT 1", (study_uid,)
            )
        else:
            rows = self._query("SELECT result FROM results WHERE study_uid=? AND generation=?", (study_uid, generation))
        return json.loads(rows[0]["result"]) if rows else None

    def latest_results(self) -> list[dict[str, Any]]:
        """Every study's newest stored result (``study_uid``, ``generation``,
        ``result`` as JSON text, ``created_at``), oldest first."""
        return [
            dict(r)
            for r in self._query(
                "SELECT r.study_uid, r.generation, r.result, r.created_at FROM results r WHERE r.generation="
                "(SELECT MAX(generation) FROM results n WHERE n.study_uid=r.study_uid) ORDER BY r.created_at, r.study_uid"
            )
        ]

    def results_since(self, created_after: float) -> list[dict[str, Any]]:
        """Results stored after ``created_after`` (every generation), oldest first."""
        return [
            dict(r)
            for r in self._query(
                "SELECT study_uid, generation, result, created_at FROM results WHERE created_at>?"
                " ORDER BY created_at, study_uid",
                (created_after,),
            )
        ]

    # --- outbox --------------------------------------------------------------
    def enqueue_outbox(
        self,
        study_uid: str,
        generation: int,
        items: list[tuple[str, str, str]],
        destinations: list[str],
        now: float | None = None,
    ) -> None:
        """Queue ``(sop_instance_uid, sop_class_uid, path)`` items for each destination;
        re-queueing the same object for the same destination is a no-op."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.executemany(
                "INSERT INTO outbox (sop_instance_uid, destination, study_uid, generation,"
                " sop_class_uid, path, state, next_attempt_at) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
                [
                    (uid, dest, study_uid, generation, cls_uid, path, OutboxState.PENDING, now)
                    for uid, cls_uid, path in items
                    for dest in destinations
                ],
            )

    def outbox(self, study_uid: str | None = None, states: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM outbox WHERE 1=1", []
        if study_uid is not None:
            sql += " AND study_uid=?"
            args.append(study_uid)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        return [dict(r) for r in self._query(sql + " ORDER BY study_uid, sop_instance_uid", tuple(args))]

    def due_outbox(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT * FROM outbox WHERE state=? AND next_attempt_at<=? ORDER BY destination, study_uid",
            (OutboxState.PENDING, now),
        )
        return [dict(r) for r in rows]

    def update_outbox(
        self,
        sop_instance_uid: str,
        destination: str,
        state: OutboxState,
        error: str | None = None,
        next_attempt_at: float | None = None,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state=?, error=?, attempts=attempts+?, next_attempt_at=COALESCE(?, next_attempt_at),"
                " sent_at=CASE WHEN ?='sent' THEN ? ELSE sent_at END WHERE sop_instance_uid=? AND destination=?",
                (
                    state,
                    error,
                    0 if state == OutboxState.SENT else 1,
                    next_attempt_at,
                    state,
                    now,
                    sop_instance_uid,
                    destination,
                ),
            )

    def reset_outbox(self, study_uid: str, now: float | None = None) -> int:
        """Make every unsent object of a study due again (``sonocase resend``)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state=?, attempts=0, next_attempt_at=?, error=NULL WHERE study_uid=? AND state!=?",
                (OutboxState.PENDING, now, study_uid, OutboxState.SENT),
            )
            return cur.rowcount

    def replace_outbox(
        self,
        sop_instance_uid: str,
        destination: str,
        new_sop_instance_uid: str,
        new_sop_class_uid: str,
        new_path: str,
    ) -> None:
        """Swap the object a row sends for another (the SR rebuilt in a SOP class the
        destination accepts); its attempts and schedule carry over."""
        with self._tx() as db:
            if new_sop_instance_uid != sop_instance_uid:  # a row already holding the new object gives way
                db.execute(
                    "DELETE FROM outbox WHERE sop_instance_uid=? AND destination=?", (new_sop_instance_uid, destination)
                )
            db.execute(
                "UPDATE outbox SET sop_instance_uid=?, sop_class_uid=?, path=?"
                " WHERE sop_instance_uid=? AND destination=?",
                (new_sop_instance_uid, new_sop_class_uid, new_path, sop_instance_uid, destination),
            )

    # --- retention ---------------------------------------------------------------
    def purge_candidates(self) -> list[PurgeCandidate]:
        """Done studies (sent with every result object accepted, or skipped) with
        files of some kind not yet removed, the longest done first."""
        flags = ", ".join(
            f"EXISTS (SELECT 1 FROM purges p WHERE p.study_uid=s.study_uid AND p.generation=s.generation"
            f" AND p.kind='{kind}') AS {kind}_gone"
            for kind in FILE_KINDS
        )
        rows = self._query(
            f"SELECT s.study_uid, s.generation, s.state, {_DONE_AT} AS done_at, s.spool_bytes, {flags}"
            f" FROM studies s WHERE {_DONE_STUDY} AND (SELECT COUNT(*) FROM purges p"
            f" WHERE p.study_uid=s.study_uid AND p.generation=s.generation) < {len(FILE_KINDS)}"
            " ORDER BY done_at, s.study_uid"
        )
        return [
            PurgeCandidate(
                r["study_uid"],
                int(r["generation"]),
                r["state"],
                float(r["done_at"]),
                tuple(k for k in FILE_KINDS if not r[f"{k}_gone"]),
                int(r["spool_bytes"]),
            )
            for r in rows
        ]

    def claim_purge(
        self, study_uid: str, generation: int, kind: str, reason: str, now: float | None = None
    ) -> list[str] | None:
        """Record that ``kind`` files of the study's ``generation`` are being removed,
        if the study is still done at that generation with nothing left to deliver;
        None otherwise (it was re-opened, or claimed already). For the spool, returns
        the files to remove: every instance's, as the study is done."""
        if kind not in FILE_KINDS:
            raise ValueError(f"{kind!r} is not one of {FILE_KINDS}")
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO purges (study_uid, generation, kind, reason, purged_at)"
                f" SELECT s.study_uid, s.generation, ?, ?, ? FROM studies s WHERE s.study_uid=? AND s.generation=?"
                f" AND {_DONE_STUDY} ON CONFLICT (study_uid, generation, kind) DO NOTHING",
                (kind, reason, now, study_uid, generation),
            )
            if cur.rowcount != 1:
                return None
            if kind != "spool":
                return []
            db.execute("UPDATE studies SET spool_bytes=0 WHERE study_uid=?", (study_uid,))
            rows = db.execute("SELECT path FROM instances WHERE study_uid=? ORDER BY path", (study_uid,)).fetchall()
        return [r["path"] for r in rows]

    def purge_paths(self, study_uid: str, purged_at: float) -> list[str]:
        """Spool files a removal claimed at ``purged_at`` took, for finishing it after a
        crash: those of instances received before it (one that re-opened the study
        since is not among them)."""
        rows = self._query(
            "SELECT path FROM instances WHERE study_uid=? AND received_at<=? ORDER BY path", (study_uid, purged_at)
        )
        return [r["path"] for r in rows]

    def finish_purge(self, study_uid: str, generation: int, kind: str, removed_bytes: int) -> None:
        """Record that the files of a claimed removal are gone."""
        with self._tx() as db:
            db.execute(
                "UPDATE purges SET bytes=? WHERE study_uid=? AND generation=? AND kind=?",
                (removed_bytes, study_uid, generation, kind),
            )

    def unfinished_purges(self) -> list[dict[str, Any]]:
        """Removals claimed but not finished (the process died between the two)."""
        return [dict(r) for r in self._query("SELECT * FROM purges WHERE bytes IS NULL ORDER BY purged_at")]

    def purges(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM purges WHERE study_uid=? ORDER BY generation, purged_at, kind", (study_uid,))
        return [dict(r) for r in rows]

    def purge_totals(self) -> dict[str, tuple[int, int]]:
        """Kind of files -> (removals, bytes removed), since the ledger began."""
        rows = self._query("SELECT kind, COUNT(*), COALESCE(SUM(bytes), 0) FROM purges GROUP BY kind")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def spool_bytes_by_state(self) -> dict[str, int]:
        """Bytes in the spool per study state (removed files not counted)."""
        rows = self._query("SELECT state, COALESCE(SUM(spool_bytes), 0) FROM studies GROUP BY state")
        return {r[0]: int(r[1]) for r in rows}

    # --- figures for monitoring (aggregated in SQL: a scrape stays cheap) -------
    _STAMPS = frozenset(
        {
            "first_received",
            "last_received",
            "completed_at",
            "queued_at",
            "analysis_started",
            "analysed_at",
            "reported_at",
            "sent_at",
        }
    )

    def latency_histogram(self, start: str, end: str, bounds: Sequence[float]) -> tuple[list[int], int, float]:
        """Cumulative study counts with ``end - start <= bound`` for each bound, the
        count and the sum of seconds, over studies holding both time stamps."""
        if not {start, end} <= self._STAMPS:
            raise ValueError(f"{start!r} -> {end!r}: not time stamps of a study")
        cases = "SUM(CASE WHEN d<=? THEN 1 ELSE 0 END), " * len(bounds)
        row = self._query(
            f"SELECT {cases}COUNT(*), COALESCE(SUM(d), 0) FROM (SELECT {end}-{start} AS d FROM studies"
            f" WHERE {start} IS NOT NULL AND {end} IS NOT NULL AND {end}>={start}) AS spans",
            tuple(bounds),
        )[0]
        return [int(v or 0) for v in tuple(row)[:-2]], int(row[-2]), float(row[-1])

    def image_totals(self) -> tuple[int, int]:
        """Images analysed and, of those, not assessed (outside the model's training
        domain), over every stored result: a re-analysed study counts again."""
        row = self._query(
            "SELECT COALESCE(SUM(images_analysed), 0), COALESCE(SUM(images_not_assessed), 0) FROM results"
        )[0]
        return int(row[0]), int(row[1])

    def outbox_totals(self) -> dict[str, tuple[int, int]]:
        """Outbox state -> (objects, failed delivery attempts recorded)."""
        rows = self._query("SELECT state, COUNT(*), COALESCE(SUM(attempts), 0) FROM outbox GROUP BY state")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    # --- outcomes -------------------------------------------------------------
    def record_outcomes(self, outcomes: Sequence[Outcome], now: float | None = None) -> list[bool]:
        """Store outcomes (False for one already stored) and match every unmatched
        outcome whose study is known, in one transaction."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return self._record_outcomes(db, outcomes, now)

    @staticmethod
    def _record_outcomes(db: _Connection, outcomes: Sequence[Outcome], now: float) -> list[bool]:
        new = [
            db.execute(
                "INSERT INTO outcomes (source, reference, accession_number, study_uid, finding, laterality,"
                " clock_position, outcome_date, received_at) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (source, reference) DO NOTHING",
                (
                    o.source,
                    o.reference,
                    o.accession_number,
                    o.study_uid,
                    o.finding,
                    o.laterality,
                    o.clock_position,
                    o.outcome_date,
                    now,
                ),
            ).rowcount
            == 1
            for o in outcomes
        ]
        db.execute(_MATCH, (now,))
        return new

    def record_hl7_message(
        self,
        control_id: str,
        message: str,
        ack_code: str,
        error: str | None,
        outcomes: Sequence[Outcome] = (),
        now: float | None = None,
    ) -> None:
        """Keep an HL7 message with the ACK it gets and, if accepted, its outcomes,
        in one transaction: committed before the ACK is sent, so an accepted message
        is never lost."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO hl7_messages (control_id, received_at, ack_code, error, message) VALUES (?,?,?,?,?)",
                (control_id, now, ack_code, error, message),
            )
            self._record_outcomes(db, outcomes, now)

    def outcomes(self, *, unmatched: bool = False) -> list[dict[str, Any]]:
        """Every outcome received (or only those no study matched yet), oldest first."""
        where = " WHERE matched_study_uid IS NULL" if unmatched else ""
        return [dict(r) for r in self._query(f"SELECT * FROM outcomes{where} ORDER BY received_at, outcome_id")]

    def outcome_totals(self) -> tuple[int, int, dict[str, int]]:
        """Outcomes matched to a study, outcomes waiting for one, and HL7 messages per ACK code."""
        row = self._query("SELECT COUNT(matched_study_uid), COUNT(*) FROM outcomes")[0]
        acks = {r[0]: int(r[1]) for r in self._query("SELECT ack_code, COUNT(*) FROM hl7_messages GROUP BY ack_code")}
        return int(row[0]), int(row[1]) - int(row[0]), acks

    def hl7_messages(self, ack_codes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """HL7 messages received (those answered with ``ack_codes``), oldest first."""
        where = f" WHERE ack_code IN ({','.join('?' * len(ack_codes))})" if ack_codes else ""
        return [dict(r) for r in self._query(f"SELECT * FROM hl7_messages{where} ORDER BY message_id", ack_codes)]

    # --- verdicts -------------------------------------------------------------
    def record_verdict(self, verdict: Verdict, now: float | None = None) -> dict[str, Any]:
        """Add a verdict (a change is a new row: every change is kept); the row stored."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO verdicts (study_uid, finding, verdict, corrected_class, comment, reader, reader_role,"
                " recorded_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    verdict.study_uid,
                    verdict.finding,
                    verdict.verdict,
                    verdict.corrected_class,
                    verdict.comment,
                    verdict.reader,
                    verdict.reader_role,
                    now,
                ),
            )
            row = db.execute(
                "SELECT * FROM verdicts WHERE study_uid=? ORDER BY verdict_id DESC LIMIT 1", (verdict.study_uid,)
            ).fetchone()
        return dict(row)

    def verdicts(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Every verdict given (on one study), oldest first: the history of changes."""
        where, args = (" WHERE study_uid=?", (study_uid,)) if study_uid is not None else ("", ())
        return [dict(r) for r in self._query(f"SELECT * FROM verdicts{where} ORDER BY verdict_id", args)]
