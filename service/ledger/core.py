"""The :class:`Ledger`: each method one transaction on the tables of
:mod:`service.ledger.schema`, built with SQLAlchemy Core (compiled once per
statement shape and dialect, then taken from SQLAlchemy's cache)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from service.ledger.engine import SQLITE_TIMEOUT_S, Prepared, open_postgresql, open_sqlite
from service.ledger.records import FILE_KINDS, Outcome, PurgeCandidate, Routing, Verdict
from service.ledger.rows import (
    Hl7MessageRow,
    InstanceRecord,
    OutboxRow,
    OutcomeRow,
    PurgeRow,
    ResultRow,
    Row,
    StudyRow,
    VerdictRow,
    columns,
)
from service.ledger.schema import hl7_messages, instances, outbox, outcomes, purges, results, studies, verdicts
from service.ledger.states import PENDING_ANALYSIS, TRANSITIONS, OutboxState, StudyState
from service.results import StudyResult

if TYPE_CHECKING:
    from service.settings import Settings

LOG = logging.getLogger(__name__)
R = TypeVar("R", bound=Row)
_s, _i, _o, _p = studies.c, instances.c, outbox.c, purges.c

#: A done study at its generation with no result object still to deliver.
_DONE_STUDY = sa.and_(
    _s.state.in_([StudyState.SENT, StudyState.SKIPPED]),
    ~sa.exists().where(_o.study_uid == _s.study_uid, _o.state != OutboxState.SENT),
)
#: When a done study was done: sent, or (skipped) completed.
_DONE_AT = sa.case((_s.state == StudyState.SENT, _s.sent_at), else_=_s.completed_at)


#: Studies a task must be sent for (see :meth:`Ledger.due_for_queue`), as of the parameter ``now``.
_DUE = sa.or_(
    sa.and_(
        _s.state == StudyState.COMPLETE,
        sa.or_(_s.next_attempt_at.is_(None), _s.next_attempt_at <= sa.bindparam("now")),
    ),
    sa.and_(
        sa.or_(_s.state == StudyState.QUEUED, _s.state == StudyState.ANALYSING), _s.lease_until <= sa.bindparam("now")
    ),
)


def _match(now: float) -> sa.Update:
    """Match every unmatched outcome whose study is known (by UID, or by accession
    number once the study's result recorded it) to that study."""
    oc = outcomes.c
    names_it = sa.or_(
        _s.study_uid == oc.study_uid, sa.and_(oc.accession_number != "", _s.accession_number == oc.accession_number)
    )
    first = sa.select(_s.study_uid).where(names_it).order_by(_s.study_uid).limit(1).scalar_subquery()
    return (
        sa.update(outcomes)
        .values(matched_at=now, matched_study_uid=first)
        .where(oc.matched_study_uid.is_(None), sa.exists().where(names_it))
    )


_INSTANCE_COLUMNS = columns(InstanceRecord, instances)
# The receiver's path (record_instances, per instance) and what the stages poll for:
# prepared once (see engine.Prepared).
_HAS_INSTANCE = Prepared(sa.select(_i.sop_instance_uid).where(_i.sop_instance_uid == sa.bindparam("uid")))
_STUDY_STATE = Prepared(sa.select(_s.state).where(_s.study_uid == sa.bindparam("uid")))
_NEW_STUDY = Prepared(
    sa.insert(studies).values(
        study_uid=sa.bindparam("uid"),
        state=StudyState.RECEIVING,
        first_received=sa.bindparam("now"),
        last_received=sa.bindparam("now"),
        updated_at=sa.bindparam("now"),
        spool_bytes=sa.bindparam("size"),
    )
)
_more_of_study = (
    sa.update(studies)
    .where(_s.study_uid == sa.bindparam("uid"))
    .values(
        last_received=sa.bindparam("now"),
        updated_at=sa.bindparam("now"),
        spool_bytes=_s.spool_bytes + sa.bindparam("size"),
    )
)
_MORE_OF_STUDY = Prepared(_more_of_study)
#: A new instance re-opens a study past receiving: analysed again, as a new generation.
_REOPEN_STUDY = Prepared(
    _more_of_study.values(
        state=StudyState.RECEIVING,
        generation=_s.generation + 1,
        attempts=0,
        next_attempt_at=None,
        failed_stage=None,
        error=None,
        lease_until=None,
    )
)
_NEW_INSTANCE = Prepared(sa.insert(instances).values({c.name: sa.bindparam("i_" + c.name) for c in instances.c}))
_STUDY = Prepared(sa.select(*columns(StudyRow, studies)).where(_s.study_uid == sa.bindparam("uid")))
_DUE_FOR_QUEUE = Prepared(sa.select(_s.study_uid).where(_DUE).order_by(_s.last_received))
_DUE_OUTBOX = Prepared(
    sa.select(*columns(OutboxRow, outbox))
    .where(_o.state == OutboxState.PENDING, _o.next_attempt_at <= sa.bindparam("now"))
    .order_by(_o.destination, _o.study_uid)
)


def open_ledger(settings: Settings, durable: bool | None = None) -> Ledger:
    """The ledger the settings name: PostgreSQL at ``ledger_url``, else the SQLite
    file under data_dir. ``durable`` defaults to the ``durability`` setting."""
    durable = settings.durability == "fsync" if durable is None else durable
    if settings.ledger_url:
        return Ledger(url=settings.ledger_url, durable=durable)
    return Ledger(settings.ledger_path, durable=durable)


class Ledger:
    """A process's handle on the ledger; safe to share between its threads, and a
    context manager that closes it.

    Either the SQLite file at ``path`` or the PostgreSQL database at ``url``
    (``postgresql://user@host:port/db``); :func:`open_ledger` picks from settings.
    """

    def __init__(self, path: Path | None = None, durable: bool = True, *, url: str = "") -> None:
        if (path is None) == (not url):
            raise ValueError("a ledger is either a SQLite file (path) or a PostgreSQL database (url)")
        self.path = path
        if url:
            self._db = open_postgresql(url, durable)
            self._ensure_schema(path, url)
            return
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + SQLITE_TIMEOUT_S
        while True:
            try:
                self._db = open_sqlite(path, durable)
                try:
                    self._ensure_schema(path, url)
                except BaseException:
                    self._db.close()
                    raise
                return
            except sa.exc.OperationalError as exc:
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

        if self.revision() == migrations.HEAD:
            return
        migrations.upgrade(path, url)

    def revision(self) -> str | None:
        """The database's schema revision (None: no schema yet)."""
        with self._db.reading() as db:
            if not sa.inspect(db).has_table("alembic_version"):
                return None
            return db.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """One write transaction, holding the ledger's write lock (see
        :mod:`service.ledger.engine`): what every writing method runs in."""
        with self._db.transaction() as db:
            yield db

    def _rows(
        self, row_class: type[R], stmt: sa.Executable | Prepared, params: dict[str, Any] | None = None
    ) -> list[R]:
        with self._db.reading() as db:
            if isinstance(stmt, Prepared):
                return [row_class.of(r) for r in self._db.run(db, stmt, params or {})]
            return [row_class.of(r) for r in db.execute(stmt)]

    def _all(self, stmt: sa.Executable) -> list[tuple[Any, ...]]:
        with self._db.reading() as db:
            return [tuple(r) for r in db.execute(stmt)]

    def _scalar(self, stmt: sa.Executable) -> Any:
        with self._db.reading() as db:
            return db.execute(stmt).scalar()

    def _insert(self, table: sa.Table) -> sqlite.Insert | postgresql.Insert:
        """An INSERT that can say what happens on a conflict, in this database's dialect."""
        return sqlite.insert(table) if self._db.sqlite else postgresql.insert(table)

    # --- receiving ---------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._db.reading() as db:
            return self._db.run(db, _HAS_INSTANCE, {"uid": sop_instance_uid}).fetchone() is not None

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Record a stored instance; return False if its SOP Instance UID was known.

        A new instance for a study past ``receiving`` re-opens the study.
        """
        return self.record_instances([rec], now)[0]

    def record_instances(self, recs: list[InstanceRecord], now: float | None = None) -> list[bool]:
        """:meth:`record_instance` for several instances in one transaction (one
        fsync: the receiver's group commit when associations store concurrently)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return [self._record(db, rec, now) for rec in recs]

    def _record(self, db: sa.Connection, rec: InstanceRecord, now: float) -> bool:
        run = self._db.run
        if run(db, _HAS_INSTANCE, {"uid": rec.sop_instance_uid}).fetchone() is not None:
            return False
        study = run(db, _STUDY_STATE, {"uid": rec.study_uid}).fetchone()
        grow = _NEW_STUDY if study is None else _MORE_OF_STUDY if study[0] == StudyState.RECEIVING else _REOPEN_STUDY
        run(db, grow, {"uid": rec.study_uid, "now": now, "size": rec.size})
        run(
            db,
            _NEW_INSTANCE,
            {
                "i_sop_instance_uid": rec.sop_instance_uid,
                "i_study_uid": rec.study_uid,
                "i_series_uid": rec.series_uid,
                "i_sop_class_uid": rec.sop_class_uid,
                "i_transfer_syntax": rec.transfer_syntax,
                "i_path": rec.path,
                "i_size": rec.size,
                "i_calling_ae": rec.calling_ae,
                "i_modality": rec.modality,
                "i_ignored_reason": rec.ignored_reason,
                "i_received_at": now,
                "i_crc32": rec.crc32,
            },
        )
        return True

    def quiet_studies(self, quiet_period_s: float, now: float | None = None) -> list[tuple[str, float]]:
        """``receiving`` studies without a new instance for ``quiet_period_s``, with
        the time of their last instance (what :meth:`complete_studies` checks)."""
        now = time.time() if now is None else now
        rows = self._all(
            sa.select(_s.study_uid, _s.last_received)
            .where(_s.state == StudyState.RECEIVING, _s.last_received <= now - quiet_period_s)
            .order_by(_s.last_received, _s.study_uid)
        )
        return [(uid, last) for uid, last in rows]

    def complete_studies(self, routed: Sequence[tuple[str, float, Routing]], now: float | None = None) -> list[str]:
        """Make quiet studies complete (or skipped, as their routing says) in one
        transaction; a study that received an instance since ``last_received`` was
        read stays receiving (its routing is decided again). Returns those changed."""
        now = time.time() if now is None else now
        done = []
        with self.transaction() as db:
            for study_uid, last_received, routing in routed:
                destinations = json.dumps(list(routing.destinations)) if routing.destinations is not None else None
                changed = db.execute(
                    sa.update(studies)
                    .where(
                        _s.study_uid == study_uid,
                        _s.state == StudyState.RECEIVING,
                        _s.last_received == last_received,
                    )
                    .values(
                        state=StudyState.COMPLETE if routing.analyse else StudyState.SKIPPED,
                        completed_at=now,
                        updated_at=now,
                        routing_rule=routing.rule,
                        routing_reason=routing.reason,
                        destinations=destinations,
                    )
                ).rowcount
                if changed == 1:
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
        oldest: float | None = self._scalar(
            sa.select(sa.func.min(_s.last_received)).where(_s.state == StudyState.RECEIVING)
        )
        return oldest

    # --- queueing and analysis ----------------------------------------------
    def due_for_queue(self, now: float | None = None) -> list[str]:
        """Studies a task must be sent for: complete ones, retries that are due, and
        queued/analysing ones whose lease ran out (their worker or message was lost)."""
        now = time.time() if now is None else now
        with self._db.reading() as db:
            return [uid for (uid,) in self._db.run(db, _DUE_FOR_QUEUE, {"now": now}).fetchall()]

    def mark_queued(self, study_uid: str, lease_s: float, now: float | None = None) -> None:
        """Record that a task was sent, if the study is still due: a worker that
        already claimed (or finished, or failed) it keeps its state."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                sa.update(studies)
                .where(_s.study_uid == study_uid, _DUE)
                .values(state=StudyState.QUEUED, queued_at=now, lease_until=now + lease_s, updated_at=now),
                {"now": now},
            )

    def claim_analysis(self, study_uid: str, lease_s: float, now: float | None = None) -> int | None:
        """Take the study for analysis; return its generation, or None if another
        worker holds a live lease or the study is not waiting for analysis."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            claimed = db.execute(
                sa.update(studies)
                .where(
                    _s.study_uid == study_uid,
                    sa.or_(
                        _s.state.in_([StudyState.COMPLETE, StudyState.QUEUED]),
                        sa.and_(_s.state == StudyState.ANALYSING, _s.lease_until <= now),
                    ),
                )
                .values(
                    state=StudyState.ANALYSING,
                    analysis_started=now,
                    lease_until=now + lease_s,
                    attempts=_s.attempts + 1,
                    updated_at=now,
                )
                .returning(_s.generation)
            ).scalar()
            return None if claimed is None else int(claimed)

    def finish_analysis(
        self,
        study_uid: str,
        generation: int,
        result: StudyResult,
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
        study = result.study
        with self.transaction() as db:
            changed = db.execute(
                sa.update(studies)
                .where(_s.study_uid == study_uid, _s.generation == generation, _s.state.in_(PENDING_ANALYSIS))
                .values(
                    state=StudyState.ANALYSED,
                    analysed_at=now,
                    lease_until=now + lease_s,
                    error=None,
                    failed_stage=None,
                    updated_at=now,
                    accession_number=study.accession_number,
                    study_date=study.study_date,
                    manufacturer=study.manufacturer,
                    model_name=study.model_name,
                )
            ).rowcount
            if changed != 1:
                return False
            stored = self._insert(results).values(
                study_uid=study_uid,
                generation=generation,
                # json.dumps, not model_dump_json: that writes an infinite score as null
                result=json.dumps(result.model_dump(mode="json")),
                created_at=now,
                images_analysed=images_analysed,
                images_not_assessed=images_not_assessed,
            )
            db.execute(
                stored.on_conflict_do_update(
                    index_elements=[results.c.study_uid, results.c.generation],
                    set_={
                        name: stored.excluded[name]
                        for name in ("result", "created_at", "images_analysed", "images_not_assessed")
                    },
                )
            )
            db.execute(_match(now))
            return True

    def renew_lease(self, study_uid: str, generation: int, lease_s: float, now: float | None = None) -> bool:
        """Extend the lease of a study this process is analysing or reporting; False
        when the study moved on (finished, re-opened, failed) and there is none to keep."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return bool(
                db.execute(
                    sa.update(studies)
                    .where(
                        _s.study_uid == study_uid,
                        _s.generation == generation,
                        _s.state.in_([StudyState.ANALYSING, StudyState.ANALYSED]),
                    )
                    .values(lease_until=now + lease_s)
                ).rowcount
                == 1
            )

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
        with self.transaction() as db:
            rows = db.execute(
                sa.update(studies)
                .where(_s.state == StudyState.ANALYSED, sa.or_(_s.lease_until.is_(None), _s.lease_until <= now))
                .values(lease_until=now + lease_s)
                .returning(_s.study_uid, _s.generation)
            ).all()
        return [(uid, int(generation)) for uid, generation in rows]

    def retry_or_fail(
        self,
        study_uid: str,
        stage: str,
        reason: str,
        max_attempts: int,
        delay_s: Callable[[int], float],
        now: float | None = None,
    ) -> StudyState:
        """After a failed attempt: schedule another ``delay_s(attempts)`` seconds later
        (:func:`service.common.backoff.backoff_delay`) or give up visibly."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            attempts = db.execute(sa.select(_s.attempts).where(_s.study_uid == study_uid)).scalar()
            attempts = max_attempts if attempts is None else attempts
            if attempts >= max_attempts:
                state, next_at = StudyState.FAILED, None
            else:
                state, next_at = StudyState.COMPLETE, now + delay_s(attempts)
            db.execute(
                sa.update(studies)
                .where(_s.study_uid == study_uid)
                .values(
                    state=state,
                    next_attempt_at=next_at,
                    lease_until=None,
                    failed_stage=stage,
                    error=reason,
                    updated_at=now,
                )
            )
        return state

    def transition(
        self,
        study_uid: str,
        to: StudyState,
        generation: int,
        *,
        sources: Sequence[StudyState] | None = None,
        failed_stage: str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Move the study at ``generation`` to ``to`` as :data:`~service.ledger.states.TRANSITIONS`
        allows (from the table's states, or only from ``sources`` among them); False
        when it moved on meanwhile (re-opened by a new instance), so a late stage
        never overwrites a newer one. A move to ``failed`` says where and why."""
        rule = TRANSITIONS.get(to)
        if rule is None:
            raise ValueError(f"no stage moves a study to {to!r} through transition")
        allowed = rule.sources if sources is None else frozenset(sources)
        if not allowed <= rule.sources:
            raise ValueError(f"a study does not move from {sorted(allowed - rule.sources)} to {to!r}")
        if rule.failing != (failed_stage is not None and error is not None):
            raise ValueError(f"a move to {to!r} {'needs' if rule.failing else 'takes no'} failed_stage and error")
        now = time.time() if now is None else now
        values: dict[str, Any] = {"state": to, "updated_at": now}
        if rule.stamp:
            values[rule.stamp] = now
        if rule.failing or rule.clears_failure:
            values.update(failed_stage=failed_stage, error=error)
        if rule.resets_attempts:
            values["attempts"] = 0
        with self.transaction() as db:
            return bool(
                db.execute(
                    sa.update(studies)
                    .where(_s.study_uid == study_uid, _s.generation == generation, _s.state.in_(sorted(allowed)))
                    .values(values)
                ).rowcount
                == 1
            )

    # --- reading -----------------------------------------------------------
    def study(self, study_uid: str) -> StudyRow | None:
        rows = self._rows(StudyRow, _STUDY, {"uid": study_uid})
        return rows[0] if rows else None

    def studies(self, states: Sequence[str] = (), limit: int = 1000) -> list[StudyRow]:
        stmt = sa.select(*columns(StudyRow, studies))
        if states:
            stmt = stmt.where(_s.state.in_(states))
        return self._rows(StudyRow, stmt.order_by(_s.updated_at.desc()).limit(limit))

    def count_by_state(self) -> dict[str, int]:
        return {state: int(n) for state, n in self._all(sa.select(_s.state, sa.func.count()).group_by(_s.state))}

    def pending_analysis_count(self) -> int:
        return int(self._scalar(sa.select(sa.func.count()).where(_s.state.in_(PENDING_ANALYSIS))))

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        return self._rows(
            InstanceRecord,
            sa.select(*_INSTANCE_COLUMNS)
            .where(_i.study_uid == study_uid)
            .order_by(_i.received_at, _i.sop_instance_uid),
        )

    def receiving_instances(self) -> list[InstanceRecord]:
        """Instances of studies still being received: the only ones whose files may
        not have reached the disk when the machine went down."""
        return self._rows(
            InstanceRecord,
            sa.select(*_INSTANCE_COLUMNS)
            .join(studies, _s.study_uid == _i.study_uid)
            .where(_s.state == StudyState.RECEIVING)
            .order_by(_i.received_at, _i.sop_instance_uid),
        )

    def forget_instances(self, sop_instance_uids: list[str]) -> None:
        """Remove records of instances that were never acknowledged (their file did not
        reach the disk); a receiving study left without instances goes too."""
        with self.transaction() as db:
            for uid in sop_instance_uids:
                row = db.execute(sa.select(_i.study_uid, _i.size).where(_i.sop_instance_uid == uid)).first()
                if row is None:
                    continue
                study_uid, size = row
                db.execute(sa.delete(instances).where(_i.sop_instance_uid == uid))
                db.execute(
                    sa.update(studies).where(_s.study_uid == study_uid).values(spool_bytes=_s.spool_bytes - size)
                )
                db.execute(
                    sa.delete(studies).where(
                        _s.study_uid == study_uid,
                        _s.state == StudyState.RECEIVING,
                        _s.generation == 1,
                        ~sa.exists().where(_i.study_uid == study_uid),
                    )
                )

    def instance_count(self) -> int:
        return int(self._scalar(sa.select(sa.func.count()).select_from(instances)))

    def result(self, study_uid: str, generation: int | None = None) -> StudyResult | None:
        """The newest result of a study (or that of ``generation``). Every stored
        document validates: :meth:`finish_analysis` takes only a :class:`StudyResult`,
        and the model has only gained fields with defaults since the first result was
        stored. One that does not (a document edited by hand) raises pydantic's
        ValidationError, a ValueError."""
        stmt = sa.select(results.c.result).where(results.c.study_uid == study_uid)
        if generation is None:
            stmt = stmt.order_by(results.c.generation.desc()).limit(1)
        else:
            stmt = stmt.where(results.c.generation == generation)
        text = self._scalar(stmt)
        return None if text is None else StudyResult.model_validate_json(text)

    def latest_results(self) -> list[ResultRow]:
        """Every study's newest stored result, oldest first."""
        newer = results.alias("n")
        return self._rows(
            ResultRow,
            sa.select(*columns(ResultRow, results))
            .where(
                results.c.generation
                == sa.select(sa.func.max(newer.c.generation))
                .where(newer.c.study_uid == results.c.study_uid)
                .scalar_subquery()
            )
            .order_by(results.c.created_at, results.c.study_uid),
        )

    def results_since(self, created_after: float) -> list[ResultRow]:
        """Results stored after ``created_after`` (every generation), oldest first."""
        return self._rows(
            ResultRow,
            sa.select(*columns(ResultRow, results))
            .where(results.c.created_at > created_after)
            .order_by(results.c.created_at, results.c.study_uid),
        )

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
        rows = [
            {
                "sop_instance_uid": uid,
                "destination": dest,
                "study_uid": study_uid,
                "generation": generation,
                "sop_class_uid": cls_uid,
                "path": path,
                "state": OutboxState.PENDING,
                "next_attempt_at": now,
            }
            for uid, cls_uid, path in items
            for dest in destinations
        ]
        if not rows:
            return
        with self.transaction() as db:
            db.execute(
                self._insert(outbox).on_conflict_do_nothing(index_elements=[_o.sop_instance_uid, _o.destination]), rows
            )

    def outbox(self, study_uid: str | None = None, states: Sequence[str] = ()) -> list[OutboxRow]:
        stmt = sa.select(*columns(OutboxRow, outbox))
        if study_uid is not None:
            stmt = stmt.where(_o.study_uid == study_uid)
        if states:
            stmt = stmt.where(_o.state.in_(states))
        return self._rows(OutboxRow, stmt.order_by(_o.study_uid, _o.sop_instance_uid))

    def due_outbox(self, now: float | None = None) -> list[OutboxRow]:
        now = time.time() if now is None else now
        return self._rows(OutboxRow, _DUE_OUTBOX, {"now": now})

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
        values: dict[str, Any] = {"state": state, "error": error}
        if state == OutboxState.SENT:
            values["sent_at"] = now
        else:
            values["attempts"] = _o.attempts + 1
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        with self.transaction() as db:
            db.execute(
                sa.update(outbox)
                .where(_o.sop_instance_uid == sop_instance_uid, _o.destination == destination)
                .values(values)
            )

    def reset_outbox(self, study_uid: str, now: float | None = None) -> int:
        """Make every unsent object of a study due again (``sonocase resend``)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return int(
                db.execute(
                    sa.update(outbox)
                    .where(_o.study_uid == study_uid, _o.state != OutboxState.SENT)
                    .values(state=OutboxState.PENDING, attempts=0, next_attempt_at=now, error=None)
                ).rowcount
            )

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
        with self.transaction() as db:
            if new_sop_instance_uid != sop_instance_uid:  # a row already holding the new object gives way
                db.execute(
                    sa.delete(outbox).where(_o.sop_instance_uid == new_sop_instance_uid, _o.destination == destination)
                )
            db.execute(
                sa.update(outbox)
                .where(_o.sop_instance_uid == sop_instance_uid, _o.destination == destination)
                .values(sop_instance_uid=new_sop_instance_uid, sop_class_uid=new_sop_class_uid, path=new_path)
            )

    # --- retention ---------------------------------------------------------------
    def purge_candidates(self) -> list[PurgeCandidate]:
        """Done studies (sent with every result object accepted, or skipped) with
        files of some kind not yet removed, the longest done first."""
        this_generation = sa.and_(_p.study_uid == _s.study_uid, _p.generation == _s.generation)
        gone = [sa.exists().where(this_generation, _p.kind == kind).label(kind) for kind in FILE_KINDS]
        removed = sa.select(sa.func.count()).where(this_generation).scalar_subquery()
        done_at = _DONE_AT.label("done_at")
        rows = self._all(
            sa.select(_s.study_uid, _s.generation, _s.state, done_at, _s.spool_bytes, *gone)
            .where(_DONE_STUDY, removed < len(FILE_KINDS))
            .order_by(done_at, _s.study_uid)
        )
        return [
            PurgeCandidate(
                uid,
                int(generation),
                state,
                float(at),
                tuple(k for k, is_gone in zip(FILE_KINDS, flags, strict=True) if not is_gone),
                int(spool_bytes),
            )
            for uid, generation, state, at, spool_bytes, *flags in rows
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
        done = sa.select(
            _s.study_uid,
            _s.generation,
            sa.literal(kind, purges.c.kind.type),
            sa.literal(reason, purges.c.reason.type),
            sa.literal(now, purges.c.purged_at.type),
        ).where(_s.study_uid == study_uid, _s.generation == generation, _DONE_STUDY)
        claim = (
            self._insert(purges)
            .from_select(["study_uid", "generation", "kind", "reason", "purged_at"], done)
            .on_conflict_do_nothing(index_elements=[_p.study_uid, _p.generation, _p.kind])
            .returning(_p.kind)  # not rowcount: psycopg's INSERT through SQLAlchemy reports -1
        )
        with self.transaction() as db:
            if db.execute(claim).first() is None:
                return None
            if kind != "spool":
                return []
            db.execute(sa.update(studies).where(_s.study_uid == study_uid).values(spool_bytes=0))
            return list(db.execute(sa.select(_i.path).where(_i.study_uid == study_uid).order_by(_i.path)).scalars())

    def purge_paths(self, study_uid: str, purged_at: float) -> list[str]:
        """Spool files a removal claimed at ``purged_at`` took, for finishing it after a
        crash: those of instances received before it (one that re-opened the study
        since is not among them)."""
        rows = self._all(
            sa.select(_i.path).where(_i.study_uid == study_uid, _i.received_at <= purged_at).order_by(_i.path)
        )
        return [path for (path,) in rows]

    def finish_purge(self, study_uid: str, generation: int, kind: str, removed_bytes: int) -> None:
        """Record that the files of a claimed removal are gone."""
        with self.transaction() as db:
            db.execute(
                sa.update(purges)
                .where(_p.study_uid == study_uid, _p.generation == generation, _p.kind == kind)
                .values(bytes=removed_bytes)
            )

    def unfinished_purges(self) -> list[PurgeRow]:
        """Removals claimed but not finished (the process died between the two)."""
        return self._rows(
            PurgeRow, sa.select(*columns(PurgeRow, purges)).where(_p.bytes.is_(None)).order_by(_p.purged_at)
        )

    def purges(self, study_uid: str) -> list[PurgeRow]:
        return self._rows(
            PurgeRow,
            sa.select(*columns(PurgeRow, purges))
            .where(_p.study_uid == study_uid)
            .order_by(_p.generation, _p.purged_at, _p.kind),
        )

    def purge_totals(self) -> dict[str, tuple[int, int]]:
        """Kind of files -> (removals, bytes removed), since the ledger began."""
        rows = self._all(
            sa.select(_p.kind, sa.func.count(), sa.func.coalesce(sa.func.sum(_p.bytes), 0)).group_by(_p.kind)
        )
        return {kind: (int(n), int(total)) for kind, n, total in rows}

    def spool_bytes_by_state(self) -> dict[str, int]:
        """Bytes in the spool per study state (removed files not counted)."""
        rows = self._all(sa.select(_s.state, sa.func.coalesce(sa.func.sum(_s.spool_bytes), 0)).group_by(_s.state))
        return {state: int(total) for state, total in rows}

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
        began, ended = _s[start], _s[end]
        spans = (
            sa.select((ended - began).label("d"))
            .where(began.is_not(None), ended.is_not(None), ended >= began)
            .subquery("spans")
        )
        d = spans.c.d
        row = self._all(
            sa.select(
                *(sa.func.sum(sa.case((d <= bound, 1), else_=0)) for bound in bounds),
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(d), 0),
            )
        )[0]
        return [int(v or 0) for v in tuple(row)[:-2]], int(row[-2]), float(row[-1])

    def image_totals(self) -> tuple[int, int]:
        """Images analysed and, of those, not assessed (outside the model's training
        domain), over every stored result: a re-analysed study counts again."""
        row = self._all(
            sa.select(
                sa.func.coalesce(sa.func.sum(results.c.images_analysed), 0),
                sa.func.coalesce(sa.func.sum(results.c.images_not_assessed), 0),
            )
        )[0]
        return int(row[0]), int(row[1])

    def outbox_totals(self) -> dict[str, tuple[int, int]]:
        """Outbox state -> (objects, failed delivery attempts recorded)."""
        rows = self._all(
            sa.select(_o.state, sa.func.count(), sa.func.coalesce(sa.func.sum(_o.attempts), 0)).group_by(_o.state)
        )
        return {state: (int(n), int(attempts)) for state, n, attempts in rows}

    # --- outcomes -------------------------------------------------------------
    def record_outcomes(self, outcomes: Sequence[Outcome], now: float | None = None) -> list[bool]:
        """Store outcomes (False for one already stored) and match every unmatched
        outcome whose study is known, in one transaction."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return self._record_outcomes(db, outcomes, now)

    def _record_outcomes(self, db: sa.Connection, received: Sequence[Outcome], now: float) -> list[bool]:
        # RETURNING, not rowcount: psycopg's INSERT through SQLAlchemy reports rowcount -1
        new = (
            self._insert(outcomes)
            .on_conflict_do_nothing(index_elements=[outcomes.c.source, outcomes.c.reference])
            .returning(outcomes.c.outcome_id)
        )
        added = [
            db.execute(
                new,
                {
                    "source": o.source,
                    "reference": o.reference,
                    "accession_number": o.accession_number,
                    "study_uid": o.study_uid,
                    "finding": o.finding,
                    "laterality": o.laterality,
                    "clock_position": o.clock_position,
                    "outcome_date": o.outcome_date,
                    "received_at": now,
                },
            ).first()
            is not None
            for o in received
        ]
        db.execute(_match(now))
        return added

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
        with self.transaction() as db:
            db.execute(
                sa.insert(hl7_messages).values(
                    control_id=control_id, received_at=now, ack_code=ack_code, error=error, message=message
                )
            )
            self._record_outcomes(db, outcomes, now)

    def outcomes(self, *, unmatched: bool = False) -> list[OutcomeRow]:
        """Every outcome received (or only those no study matched yet), oldest first."""
        oc = outcomes.c
        stmt = sa.select(*columns(OutcomeRow, outcomes))
        if unmatched:
            stmt = stmt.where(oc.matched_study_uid.is_(None))
        return self._rows(OutcomeRow, stmt.order_by(oc.received_at, oc.outcome_id))

    def outcome_totals(self) -> tuple[int, int, dict[str, int]]:
        """Outcomes matched to a study, outcomes waiting for one, and HL7 messages per ACK code."""
        matched, total = self._all(sa.select(sa.func.count(outcomes.c.matched_study_uid), sa.func.count()))[0]
        hc = hl7_messages.c
        acks = {code: int(n) for code, n in self._all(sa.select(hc.ack_code, sa.func.count()).group_by(hc.ack_code))}
        return int(matched), int(total) - int(matched), acks

    def hl7_messages(self, ack_codes: Sequence[str] = ()) -> list[Hl7MessageRow]:
        """HL7 messages received (those answered with ``ack_codes``), oldest first."""
        hc = hl7_messages.c
        stmt = sa.select(*columns(Hl7MessageRow, hl7_messages))
        if ack_codes:
            stmt = stmt.where(hc.ack_code.in_(ack_codes))
        return self._rows(Hl7MessageRow, stmt.order_by(hc.message_id))

    # --- verdicts -------------------------------------------------------------
    def record_verdict(self, verdict: Verdict, now: float | None = None) -> VerdictRow:
        """Add a verdict (a change is a new row: every change is kept); the row stored."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute(
                sa.insert(verdicts)
                .values(
                    study_uid=verdict.study_uid,
                    finding=verdict.finding,
                    verdict=verdict.verdict,
                    corrected_class=verdict.corrected_class,
                    comment=verdict.comment,
                    reader=verdict.reader,
                    reader_role=verdict.reader_role,
                    recorded_at=now,
                )
                .returning(*columns(VerdictRow, verdicts))
            ).one()
        return VerdictRow.of(row)

    def verdicts(self, study_uid: str | None = None) -> list[VerdictRow]:
        """Every verdict given (on one study), oldest first: the history of changes."""
        vc = verdicts.c
        stmt = sa.select(*columns(VerdictRow, verdicts))
        if study_uid is not None:
            stmt = stmt.where(vc.study_uid == study_uid)
        return self._rows(VerdictRow, stmt.order_by(vc.verdict_id))
