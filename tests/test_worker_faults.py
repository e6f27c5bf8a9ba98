"""Faults on the way from the ledger through the queue to a result: a worker killed
in the middle of a study, Redis restarted while studies wait in it, the node killed
before or between "complete" and "queued", the node restarted with studies in its
embedded queue. Every study ends analysed exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import wait_for
from dicom_peers import ultrasound_files
from test_reports_support import expected_outputs, outbox_kinds
from worker_support import (
    PrivateRedis,
    Process,
    receive,
    serve,
    storescu,
    study_state,
    wait_for_state,
    write_study,
)

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger, StudyState
from service.pipeline.queue import create_app, queue_dir, send_analysis
from service.reports.build import outbox_folder
from service.results import StudyResult
from service.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def fault_settings(settings: Settings) -> Settings:
    """A short lease, so a study whose message or worker was lost comes back soon."""
    if not settings.model_path.is_file():
        pytest.fail(f"the model {settings.model_path} is missing: it ships in onnx_models/")
    return settings.model_copy(update={"task_lease_s": 6.0})


def _analysed_once(settings: Settings, study_uid: str, logs: str, attempts: int = 1) -> StudyResult:
    """The study has one result, made by exactly one completed analysis, one heatmap
    file per analysed frame and one set of output objects (nothing left over from an
    interrupted run)."""
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        row, stored = ledger.study(study_uid), ledger.result(study_uid)
    finally:
        ledger.close()
    assert row is not None and row["state"] == StudyState.REPORTED and row["attempts"] == attempts, row
    assert stored is not None
    result = StudyResult.model_validate(stored)
    finished = [line for line in logs.splitlines() if "analysed: " in line and study_uid in line]
    assert len(finished) == 1, finished
    heatmaps = sorted((settings.results_dir / study_uid).rglob("*.npy"))
    assert heatmaps == sorted(Path(f.heatmap_path) for i in result.images for f in i.frames)
    outputs = list(outbox_folder(settings, study_uid, result.generation).glob("*.dcm"))
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        assert outbox_kinds(outputs) == expected_outputs(ledger, result)
    finally:
        ledger.close()
    return result


def _worker_pids(node: Process) -> tuple[int, list[int]]:
    """The Celery main process the node started, and its pool processes."""
    table = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,args="], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    rows = [(int(p), int(pp), args) for p, pp, args in (line.split(None, 2) for line in table if line.strip())]
    main = next(pid for pid, parent, args in rows if parent == node.proc.pid and "service worker" in args)
    return main, [pid for pid, parent, _ in rows if parent == main]


def test_killing_a_worker_mid_study_still_analyses_it_exactly_once(fault_settings: Settings,
                                                                   tmp_path: Path) -> None:
    """kill -9 of the pool process analysing the study: Celery re-queues the message
    (reject_on_worker_lost), the ledger lease of the dead process runs out, and the
    study is analysed by the new pool process."""
    # A study long enough to kill it in, a lease long enough to finish it in.
    slow = fault_settings.model_copy(update={"max_cine_frames": 40, "task_lease_s": 15.0})
    study_uid, paths = write_study(tmp_path / "in", 3, "benign", seed=31)
    cine = pydicom.dcmread(next(f.path for f in ultrasound_files() if f.name == "color3d_jpeg_baseline.dcm"))
    cine.StudyInstanceUID = study_uid
    cine.save_as(tmp_path / "in" / "cine.dcm", enforce_file_format=True)
    node = serve(slow, tmp_path / "node.log")
    try:
        storescu(slow, [*paths, tmp_path / "in" / "cine.dcm"])
        wait_for_state(slow, study_uid, StudyState.ANALYSING, timeout=60)
        main, pool = _worker_pids(node)
        assert len(pool) == 1
        os.kill(pool[0], signal.SIGKILL)
        wait_for("a new pool process", lambda: _worker_pids(node)[1] not in ([], pool), timeout=30)
        wait_for_state(slow, study_uid, StudyState.REPORTED, timeout=120)
    finally:
        node.stop()
    logs = node.log()
    assert "signal 9" in logs  # Celery saw its pool process die
    result = _analysed_once(slow, study_uid, logs, attempts=2)
    assert len(result.images) == 4 and max(len(i.frames) for i in result.images) == 40


def test_redis_restart_while_studies_are_queued(fault_settings: Settings, tmp_path: Path) -> None:
    """A Redis without persistence loses what it held: the ledger lease brings the
    queued study back; the worker reconnects to the restarted Redis by itself."""
    broker = PrivateRedis(tmp_path / "redis")
    distributed = fault_settings.model_copy(update={"broker_url": broker.url, "workers": 0})
    node = serve(distributed, tmp_path / "node.log")
    worker: Process | None = None
    try:
        queued, paths = write_study(tmp_path / "in", 2, "malignant", seed=32)
        storescu(distributed, paths)
        wait_for_state(distributed, queued, StudyState.QUEUED)
        broker.stop()
        broker.start()  # the message is gone
        worker = Process(distributed, "worker", log=tmp_path / "worker.log", ready=" ready.")
        fresh, paths = write_study(tmp_path / "in", 2, "normal", seed=33)
        storescu(distributed, paths)
        wait_for_state(distributed, fresh, StudyState.REPORTED)
        wait_for_state(distributed, queued, StudyState.REPORTED, timeout=60)

        broker.stop()  # now under a running worker
        broker.start()
        after, paths = write_study(tmp_path / "in", 2, "benign", seed=34)
        storescu(distributed, paths)
        wait_for_state(distributed, after, StudyState.REPORTED, timeout=90)
    finally:
        if worker is not None:
            worker.stop()
        node.stop()
        broker.stop()
    logs = worker.log()
    for study_uid in (queued, fresh, after):
        _analysed_once(distributed, study_uid, logs)


def test_node_killed_before_and_between_complete_and_queued(fault_settings: Settings, tmp_path: Path) -> None:
    """Three crash states, then one restart: a study still receiving when the node was
    killed; a complete study whose task was never sent (crash between complete and
    queued); a study whose task was sent twice but never marked queued (crash between
    send and mark). Each is analysed exactly once after the restart."""
    patient = fault_settings.model_copy(update={"quiet_period_s": 30.0})
    receiving, paths = write_study(tmp_path / "in", 2, "benign", seed=35)
    first = serve(patient, tmp_path / "node1.log")
    storescu(patient, paths)
    first.kill()
    assert study_state(patient, receiving) == StudyState.RECEIVING

    ledger = Ledger(fault_settings.ledger_path, durable=False)
    try:
        never_sent = receive(fault_settings, ledger, synthetic_study(2, "normal", seed=36))
        sent_twice = receive(fault_settings, ledger, synthetic_study(2, "malignant", seed=37))
    finally:
        ledger.close()
    app = create_app(fault_settings)
    send_analysis(app, sent_twice)
    send_analysis(app, sent_twice)
    assert len(list((queue_dir(fault_settings) / "messages").glob("*.msg"))) == 2

    second = serve(fault_settings, tmp_path / "node2.log")
    try:
        for study_uid in (receiving, never_sent, sent_twice):
            wait_for_state(fault_settings, study_uid, StudyState.REPORTED, timeout=60)
        wait_for("the duplicate message to be consumed",
                 lambda: not list((queue_dir(fault_settings) / "messages").glob("*.msg")), timeout=30)
    finally:
        second.stop()
    logs = first.log() + second.log()  # the first node's worker may finish a task as it shuts down
    for study_uid in (receiving, never_sent, sent_twice):
        _analysed_once(fault_settings, study_uid, logs)


def test_queued_studies_survive_a_node_restart_in_the_embedded_queue(fault_settings: Settings,
                                                                     tmp_path: Path) -> None:
    """The embedded broker keeps messages on disk: a study queued before the restart
    is analysed from its message, long before its lease could run out."""
    no_workers = fault_settings.model_copy(update={"workers": 0, "task_lease_s": 600.0})
    first = serve(no_workers, tmp_path / "node1.log")
    try:
        study_uid, paths = write_study(tmp_path / "in", 2, "benign", seed=38)
        storescu(no_workers, paths)
        wait_for_state(no_workers, study_uid, StudyState.QUEUED)
    finally:
        first.stop()
    assert len(list((queue_dir(no_workers) / "messages").glob("*.msg"))) == 1
    with_workers = no_workers.model_copy(update={"workers": 1})
    second = serve(with_workers, tmp_path / "node2.log")
    try:
        wait_for_state(with_workers, study_uid, StudyState.REPORTED, timeout=60)
    finally:
        second.stop()
    _analysed_once(with_workers, study_uid, second.log())
