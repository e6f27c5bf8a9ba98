"""The ledger on a real SQLite file and on the real PostgreSQL: the study life
cycle, claims between two handles (as between two processes), retries and the outbox."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from service.ledger import TRANSITIONS, InstanceRecord, Ledger, OutboxState, StudyState
from service.ledger.schema import studies
from tests.support.common import a_result, force_state, wait_for

STUDY = "1.2.826.0.1.3680043.8.498.1"

Opener = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_handle(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens another handle on the test's ledger (as another process would); closes them all after."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    handles: list[Ledger] = []

    def open_() -> Ledger:
        handles.append(Ledger(url=url) if url else Ledger(tmp_path / "ledger.sqlite3"))
        return handles[-1]

    yield open_
    for handle in handles:
        handle.close()


@pytest.fixture
def ledger(open_handle: Opener) -> Ledger:
    return open_handle()


def instance(sop: str, study: str = STUDY) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=study + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        transfer_syntax="1.2.840.10008.1.2.1",
        path=f"spool/{study}/{sop}.dcm",
        size=100,
        calling_ae="PACS",
        modality="US",
    )


def complete(ledger: Ledger, now: float = 100.0) -> None:
    ledger.record_instance(instance(STUDY + ".1.1"), now=now)
    assert ledger.complete_quiet_studies(5, now=now + 5) == [STUDY]


@pytest.mark.parametrize("durable,level", [(True, 2), (False, 1)])
def test_wal_mode_and_sync_level_follow_durability(tmp_path: Path, durable: bool, level: int) -> None:
    led = Ledger(tmp_path / "l.sqlite3", durable=durable)
    try:
        with led.transaction() as db:
            assert db.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert db.exec_driver_sql("PRAGMA synchronous").scalar() == level  # FULL=2, NORMAL=1
    finally:
        led.close()


def test_record_instance_is_idempotent(ledger: Ledger) -> None:
    assert ledger.record_instance(instance("1.1"), now=10)
    assert not ledger.record_instance(instance("1.1"), now=11)
    assert ledger.record_instance(instance("1.2"), now=12)
    study = ledger.study(STUDY)
    assert (study.state, study.first_received, study.last_received) == (StudyState.RECEIVING, 10, 12)
    assert [i.sop_instance_uid for i in ledger.instances(STUDY)] == ["1.1", "1.2"]
    assert ledger.has_instance("1.2") and not ledger.has_instance("9.9")


def test_quiet_period_counts_from_the_last_instance(ledger: Ledger) -> None:
    ledger.record_instance(instance("1.1"), now=100)
    ledger.record_instance(instance("1.2"), now=103)
    assert ledger.complete_quiet_studies(5, now=107) == []
    assert ledger.complete_quiet_studies(5, now=108) == [STUDY]
    assert ledger.study(STUDY).completed_at == 108
    assert ledger.complete_quiet_studies(5, now=200) == []  # only receiving studies complete


def test_instance_after_handling_reopens_the_study(ledger: Ledger) -> None:
    complete(ledger)
    force_state(ledger, STUDY, StudyState.FAILED, error="model crashed", failed_stage="analysis")
    assert ledger.record_instance(instance("2.1"), now=300)
    study = ledger.study(STUDY)
    assert (study.state, study.generation, study.error, study.failed_stage) == (
        StudyState.RECEIVING,
        2,
        None,
        None,
    )


def test_pending_analysis_count(ledger: Ledger) -> None:
    assert ledger.pending_analysis_count() == 0
    complete(ledger)
    assert ledger.pending_analysis_count() == 1
    ledger.mark_queued(STUDY, lease_s=60, now=110)
    assert ledger.pending_analysis_count() == 1
    force_state(ledger, STUDY, StudyState.SENT)
    assert ledger.pending_analysis_count() == 0


def test_only_one_handle_claims_a_study(ledger: Ledger, open_handle: Opener) -> None:
    other = open_handle()  # a second process's handle
    complete(ledger)
    assert ledger.claim_analysis(STUDY, lease_s=60, now=110) == 1
    assert other.claim_analysis(STUDY, lease_s=60, now=111) is None
    assert other.claim_analysis(STUDY, lease_s=60, now=171) == 1  # the lease ran out
    assert other.study(STUDY).attempts == 2


def test_write_transactions_of_two_handles_are_serialised(ledger: Ledger, open_handle: Opener) -> None:
    """While one handle is inside a write transaction, another's write waits for it
    (SQLite's write lock; PostgreSQL's advisory lock), then sees its commit."""
    other = open_handle()
    complete(ledger)
    done = threading.Event()
    claimed: list[int | None] = []

    def claim() -> None:
        claimed.append(other.claim_analysis(STUDY, lease_s=60, now=111))
        done.set()

    with ledger.transaction() as db:
        db.execute(sa.update(studies).where(studies.c.study_uid == STUDY).values(state=StudyState.SENT))
        thread = threading.Thread(target=claim)
        thread.start()
        assert not done.wait(0.5)  # blocked behind our transaction, not racing it
    thread.join(30)
    assert claimed == [None]  # it saw the committed SENT, so there was nothing to claim


def test_due_for_queue_includes_lost_leases(ledger: Ledger) -> None:
    complete(ledger)
    assert ledger.due_for_queue(now=110) == [STUDY]
    ledger.mark_queued(STUDY, lease_s=60, now=110)
    assert ledger.due_for_queue(now=120) == []
    assert ledger.due_for_queue(now=170) == [STUDY]


def test_stale_result_is_not_stored(ledger: Ledger) -> None:
    complete(ledger)
    generation = ledger.claim_analysis(STUDY, lease_s=60, now=110)
    ledger.record_instance(instance("3.1"), now=115)  # re-opened while analysing
    assert not ledger.finish_analysis(STUDY, generation, a_result(STUDY, generation, predicted="benign"), now=120)
    assert ledger.result(STUDY) is None
    ledger.complete_quiet_studies(5, now=121)
    newer = ledger.claim_analysis(STUDY, lease_s=60, now=122)
    assert newer == generation + 1
    stored = a_result(STUDY, newer, predicted="benign")
    assert ledger.finish_analysis(STUDY, newer, stored, now=123)
    assert ledger.result(STUDY) == stored and ledger.study(STUDY).state == StudyState.ANALYSED
    assert ledger.result(STUDY, generation) is None and ledger.result(STUDY, newer) == stored


def test_a_renewed_lease_keeps_the_study_and_an_expired_one_gives_it_back(ledger: Ledger) -> None:
    complete(ledger)
    ledger.mark_queued(STUDY, lease_s=20, now=110)
    assert ledger.due_for_queue(now=129) == [] and ledger.due_for_queue(now=130) == [STUDY]  # message lost
    generation = ledger.claim_analysis(STUDY, lease_s=20, now=130)
    assert ledger.renew_lease(STUDY, generation, lease_s=20, now=145)
    assert ledger.due_for_queue(now=160) == []  # a live worker renewed it
    assert ledger.claim_analysis(STUDY, lease_s=20, now=160) is None
    assert ledger.due_for_queue(now=165) == [STUDY]  # it stopped renewing: killed
    assert ledger.claim_analysis(STUDY, lease_s=20, now=165) == generation
    assert ledger.finish_analysis(STUDY, generation, a_result(STUDY, generation), lease_s=20, now=170)
    assert ledger.claim_orphaned_reports(lease_s=20, now=189) == []  # its worker is reporting it
    assert ledger.renew_lease(STUDY, generation, lease_s=20, now=185)
    assert ledger.claim_orphaned_reports(lease_s=20, now=204) == []
    assert ledger.claim_orphaned_reports(lease_s=20, now=205) == [(STUDY, generation)]  # killed before reporting
    assert ledger.claim_orphaned_reports(lease_s=20, now=206) == []  # claimed once
    assert ledger.transition(STUDY, StudyState.REPORTED, generation, now=206)
    assert not ledger.renew_lease(STUDY, generation, lease_s=20, now=207)  # nothing left to keep
    assert ledger.claim_orphaned_reports(lease_s=20, now=300) == []


def test_keep_lease_renews_while_the_work_runs(ledger: Ledger) -> None:
    complete(ledger)
    generation = ledger.claim_analysis(STUDY, lease_s=0.3)
    assert generation is not None
    start = time.time()
    with ledger.keep_lease(STUDY, generation, lease_s=0.3):
        wait_for("a renewal", lambda: ledger.study(STUDY).lease_until > start + 0.45, timeout=10)
        assert ledger.claim_analysis(STUDY, lease_s=0.3) is None
    wait_for("the lease to run out", lambda: ledger.due_for_queue() == [STUDY], timeout=10)


def test_retry_backs_off_then_fails(ledger: Ledger) -> None:
    complete(ledger)
    ledger.claim_analysis(STUDY, lease_s=60, now=110)
    assert (
        ledger.retry_or_fail(STUDY, "analysis", "boom", max_attempts=2, delay_s=lambda n: 5.0 * n, now=111)
        == StudyState.COMPLETE
    )
    assert ledger.study(STUDY).next_attempt_at == 116
    assert ledger.due_for_queue(now=115) == [] and ledger.due_for_queue(now=116) == [STUDY]
    ledger.claim_analysis(STUDY, lease_s=60, now=116)
    assert (
        ledger.retry_or_fail(STUDY, "analysis", "boom", max_attempts=2, delay_s=lambda n: 5.0 * n, now=117)
        == StudyState.FAILED
    )
    assert (ledger.study(STUDY).failed_stage, ledger.study(STUDY).error) == ("analysis", "boom")


def test_transitions_follow_the_table(ledger: Ledger) -> None:
    """A move the table does not have is refused before the database is asked; one
    it has happens only from its states, stamps its time and clears or sets the failure."""
    complete(ledger)
    with pytest.raises(ValueError, match="no stage moves"):
        ledger.transition(STUDY, StudyState.QUEUED, 1)
    with pytest.raises(ValueError, match="does not move from"):
        ledger.transition(STUDY, StudyState.SENT, 1, sources=(StudyState.COMPLETE,))
    with pytest.raises(ValueError, match="needs failed_stage and error"):
        ledger.transition(STUDY, StudyState.FAILED, 1)
    with pytest.raises(ValueError, match="takes no failed_stage"):
        ledger.transition(STUDY, StudyState.REPORTED, 1, failed_stage="report", error="x")
    assert StudyState.COMPLETE not in TRANSITIONS[StudyState.REPORTED].sources
    assert not ledger.transition(STUDY, StudyState.REPORTED, 1)  # complete: not analysed yet
    generation = ledger.claim_analysis(STUDY, lease_s=60, now=110)
    assert generation == 1 and ledger.finish_analysis(STUDY, generation, a_result(STUDY, generation), now=111)
    assert not ledger.transition(STUDY, StudyState.REPORTED, generation + 1)  # another generation
    assert ledger.transition(STUDY, StudyState.FAILED, generation, failed_stage="report", error="boom", now=112)
    assert ledger.transition(STUDY, StudyState.REPORTED, generation, now=113)
    study = ledger.study(STUDY)
    assert study is not None
    assert (study.state, study.reported_at, study.failed_stage, study.error) == (StudyState.REPORTED, 113, None, None)
    assert ledger.transition(STUDY, StudyState.SENT, generation, now=114)
    assert not ledger.transition(STUDY, StudyState.SENT, generation, now=115)  # sent already
    assert ledger.study(STUDY).sent_at == 114


def test_outbox_queue_send_and_reset(ledger: Ledger) -> None:
    complete(ledger)
    items = [
        ("9.1", "1.2.840.10008.5.1.4.1.1.88.22", "out/9.1.dcm"),
        ("9.2", "1.2.840.10008.5.1.4.1.1.7", "out/9.2.dcm"),
    ]
    ledger.enqueue_outbox(STUDY, 1, items, ["PACS@h:104"], now=200)
    ledger.enqueue_outbox(STUDY, 1, items, ["PACS@h:104"], now=201)  # no-op
    assert [r.sop_instance_uid for r in ledger.due_outbox(now=200)] == ["9.1", "9.2"]
    ledger.update_outbox("9.1", "PACS@h:104", OutboxState.SENT, now=202)
    ledger.update_outbox("9.2", "PACS@h:104", OutboxState.FAILED, error="0xA700", now=202)
    assert ledger.due_outbox(now=300) == []
    assert ledger.reset_outbox(STUDY, now=400) == 1
    [row] = ledger.due_outbox(now=400)
    assert (row.sop_instance_uid, row.attempts, row.error) == ("9.2", 0, None)
    assert ledger.outbox(STUDY, states=(OutboxState.SENT,))[0].sent_at == 202


def test_state_survives_reopening(open_handle: Opener) -> None:
    first = open_handle()
    complete(first)
    first.close()
    again = open_handle()
    assert again.study(STUDY).state == StudyState.COMPLETE
    assert again.count_by_state() == {"complete": 1}


def test_replaced_outbox_object_keeps_its_schedule(ledger: Ledger) -> None:
    complete(ledger)
    ledger.enqueue_outbox(STUDY, 1, [("9.1", "1.2.840.10008.5.1.4.1.1.88.22", "out/9.1.dcm")], ["A@h:1"], now=200)
    ledger.update_outbox("9.1", "A@h:1", OutboxState.PENDING, error="0x0122", next_attempt_at=300, now=201)
    ledger.replace_outbox("9.1", "A@h:1", "9.3", "1.2.840.10008.5.1.4.1.1.88.11", "out/9.3.dcm")
    [row] = ledger.outbox(STUDY)
    assert (row.sop_instance_uid, row.sop_class_uid, row.attempts, row.next_attempt_at) == (
        "9.3",
        "1.2.840.10008.5.1.4.1.1.88.11",
        1,
        300,
    )


def test_monitoring_figures_are_aggregated(ledger: Ledger) -> None:
    complete(ledger)  # received at 100, complete at 105
    assert ledger.latency_histogram("first_received", "completed_at", [1, 5, 10]) == ([0, 1, 1], 1, 5.0)
    ledger.enqueue_outbox(STUDY, 1, [("9.1", "c", "p1"), ("9.2", "c", "p2")], ["A@h:1"], now=200)
    ledger.update_outbox("9.2", "A@h:1", OutboxState.PENDING, error="refused", now=201)
    assert ledger.outbox_totals() == {"pending": (2, 1)}


def test_a_ledger_is_a_file_or_a_database() -> None:
    with pytest.raises(ValueError, match="either"):
        Ledger()
    with pytest.raises(ValueError, match="either"):
        Ledger(Path("x.sqlite3"), url="postgresql://localhost/x")


def backend_pid(ledger: Ledger) -> int:
    with ledger.transaction() as db:
        return int(db.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def test_postgresql_reconnects_after_the_server_dropped_it(postgres_url: str) -> None:
    """The connection is ended by the server (as by a restart): that call fails
    with the error, the next one works on a new connection."""
    ledger = Ledger(url=postgres_url)
    try:
        complete(ledger)
        pid = backend_pid(ledger)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(sa.exc.OperationalError) as failed:
            ledger.study(STUDY)
        assert isinstance(failed.value.orig, psycopg.OperationalError)
        assert ledger.study(STUDY).state == StudyState.COMPLETE
        assert backend_pid(ledger) != pid
    finally:
        ledger.close()
