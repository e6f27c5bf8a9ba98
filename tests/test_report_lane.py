"""Report lanes (service.pipeline.report_lane): a worker's result objects built
in processes of their own while it analyses the next study, on the real ledger
(SQLite and PostgreSQL), spool, ONNX model and a real lane process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from service.datasets.synthetic import synthetic_study
from service.delivery.sender import Sender
from service.ledger import Ledger, StudyState
from service.pipeline import report_lane
from service.pipeline.report_lane import LANE_DEPTH, available_cores, lane_count
from service.pipeline.tasks import WorkerState, process_study
from service.reports.build import outbox_folder
from service.settings import Settings
from tests.support.worker import receive

pytestmark = pytest.mark.integration


def _studies(settings: Settings, ledger: Ledger, count: int) -> list[str]:
    labels = ("malignant", "benign", "normal")
    return [receive(settings, ledger, synthetic_study(2, labels[k % 3], seed=900 + k, index=k)) for k in range(count)]


def _outbox_names(settings: Settings, study_uid: str) -> set[str]:
    return {path.name for path in outbox_folder(settings, study_uid, 1).glob("*.dcm")}


def test_the_lane_builds_each_study_while_the_worker_analyses_the_next(settings: Settings, ledger: Ledger) -> None:
    """Studies handed to the lane are reported by it; closing waits for the last.
    The objects are those the worker writes itself (their UIDs derive from study and generation)."""
    uids = _studies(settings, ledger, 3)
    state = WorkerState(settings, report_processes=1)
    for uid in uids:
        assert process_study(state, uid) == "analysed"
        assert ledger.study(uid).state in (StudyState.ANALYSED, StudyState.REPORTED)  # type: ignore[union-attr]
    assert len(state.report_pids) == 1 and os.getpid() not in state.report_pids
    state.close()
    assert [ledger.study(uid).state for uid in uids] == [StudyState.REPORTED] * 3  # type: ignore[union-attr]
    lane_names = {uid: _outbox_names(settings, uid) for uid in uids}

    inline = settings.model_copy(update={"data_dir": settings.data_dir.parent / "inline", "ledger_url": ""})
    inline.data_dir.mkdir()
    with Ledger(inline.ledger_path, durable=False) as own:
        for uid in _studies(inline, own, 3):
            assert process_study(WorkerState(inline), uid) == "analysed"
            assert own.study(uid).state == StudyState.REPORTED  # type: ignore[union-attr]
            assert _outbox_names(inline, uid) == lane_names[uid] != set()


def test_a_lane_killed_mid_study_leaves_it_to_the_sender_and_the_next_study_gets_a_new_lane(
    settings: Settings, ledger: Ledger
) -> None:
    first, second = _studies(settings, ledger, 2)
    state = WorkerState(settings, report_processes=1)
    state.open()
    (lane,) = state.report_pids
    os.kill(lane, signal.SIGSTOP)  # it gets the first study but never builds it
    assert process_study(state, first) == "analysed"  # handed on: the job fits in the pipe
    os.kill(lane, signal.SIGKILL)
    assert process_study(state, second) == "analysed"  # finds the lane dead, starts another
    assert len(state.report_pids) == 1 and lane not in state.report_pids
    state.close()
    assert ledger.study(second).state == StudyState.REPORTED  # type: ignore[union-attr]
    assert ledger.study(first).state == StudyState.ANALYSED  # type: ignore[union-attr]
    assert _outbox_names(settings, first) == set()

    sender = Sender(settings, ledger)
    assert sender.report_orphans() == 0  # its lease is still running
    assert sender.report_orphans(now=time.time() + settings.task_lease_s + 1) == 1
    assert ledger.study(first).state == StudyState.REPORTED  # type: ignore[union-attr]
    assert _outbox_names(settings, first) != set()


def test_a_stopping_worker_ends_a_lane_that_answers_nothing_and_leaves_its_study_to_the_sender(
    settings: Settings, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_lane, "CLOSE_TIMEOUT_S", 1.0)
    (uid,) = _studies(settings, ledger, 1)
    state = WorkerState(settings, report_processes=1)
    state.open()
    (lane,) = state.report_pids
    os.kill(lane, signal.SIGSTOP)  # hung: it never answers
    assert process_study(state, uid) == "analysed"
    started = time.monotonic()
    state.close()
    assert time.monotonic() - started < 30
    assert state.report_pids == []
    with pytest.raises(ProcessLookupError):
        os.kill(lane, 0)  # ended (and reaped)
    assert ledger.study(uid).state == StudyState.ANALYSED  # type: ignore[union-attr]
    assert Sender(settings, ledger).report_orphans(now=time.time() + settings.task_lease_s + 1) == 1


def test_a_worker_without_the_lane_reports_before_it_returns(settings: Settings, ledger: Ledger) -> None:
    (uid,) = _studies(settings, ledger, 1)
    state = WorkerState(settings)
    assert process_study(state, uid) == "analysed"
    assert ledger.study(uid).state == StudyState.REPORTED  # type: ignore[union-attr]
    assert state.report_pids == []


def test_studies_go_to_the_lane_holding_fewest_and_the_worker_builds_when_every_lane_is_full(
    settings: Settings, ledger: Ledger
) -> None:
    """Two stopped lanes take two studies each (the fewest first: else the third would
    find its lane full); the fifth finds both full and the worker builds its objects
    before it returns. Once the lanes go on, closing waits for their studies."""
    uids = _studies(settings, ledger, LANE_DEPTH * 2 + 1)
    state = WorkerState(settings, report_processes=2)
    state.open()
    lanes = state.report_pids
    for lane in lanes:
        os.kill(lane, signal.SIGSTOP)
    try:
        for uid in uids:
            assert process_study(state, uid) == "analysed"
        states = [ledger.study(uid).state for uid in uids]  # type: ignore[union-attr]
        assert states == [StudyState.ANALYSED] * (LANE_DEPTH * 2) + [StudyState.REPORTED]
    finally:
        for lane in lanes:
            os.kill(lane, signal.SIGCONT)
    state.close()
    assert [ledger.study(uid).state for uid in uids] == [StudyState.REPORTED] * len(uids)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("setting", "concurrency", "cores", "lanes"),
    [("auto", 1, 2, 1), ("auto", 2, 2, 0), ("auto", 1, 1, 0), ("auto", 1, 16, 8), ("auto", 4, 16, 2), (3, 1, 2, 3)],
)
def test_auto_gives_lanes_half_a_pool_process_s_cores(
    settings: Settings, setting: int | str, concurrency: int, cores: int, lanes: int
) -> None:
    assert lane_count(settings.model_copy(update={"report_processes": setting}), concurrency, cores) == lanes


def test_a_worker_without_the_node_s_files_has_no_lanes(settings: Settings) -> None:
    remote = settings.model_copy(update={"data_access": "http", "report_processes": 3})
    assert lane_count(remote, 1, 16) == 0


def test_available_cores_are_at_most_the_machine_s() -> None:
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
