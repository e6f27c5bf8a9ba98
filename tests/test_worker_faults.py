"""Faults on the way from the ledger through the queue to the PACS: a worker killed
in the middle of a study or of its report, Redis restarted while studies wait in it,
the node killed before or between "complete" and "queued", the node restarted with
studies in its embedded queue. Every study ends analysed once and its SR reaches the
PACS (DCMTK storescp, which keeps a second copy as a second file) exactly once.

Leases are short here (3 s) and analyses take longer than that: a live worker
renewing its lease keeps its study; a killed one gives it back within the lease."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger, StudyState
from service.pipeline.queue import create_app, queue_dir, send_analysis
from service.reports.build import outbox_folder
from service.results import StudyResult
from service.settings import Destination, Settings
from tests.support.common import free_port, wait_for
from tests.support.dicom_peers import ultrasound_files
from tests.support.reports import Storescp, expected_outputs, outbox_kinds, start_storescp
from tests.support.worker import (
    LEASE_S,
    REPORTED_OR_SENT,
    PrivateRedis,
    Process,
    receive,
    serve,
    storescu,
    study_state,
    wait_for_state,
    write_study,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


DONE_ANALYSING = (StudyState.ANALYSED, *REPORTED_OR_SENT)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Storescp]:
    scp = start_storescp(tmp_path / "pacs", free_port())
    yield scp
    scp.stop()


@pytest.fixture
def fault_settings(settings: Settings, pacs: Storescp) -> Settings:
    """A short lease, so a study whose message or worker was lost comes back soon,
    and a PACS to count what arrives."""
    if not settings.model_path.is_file():
        pytest.fail(f"the model {settings.model_path} is missing: it ships in onnx_models/")
    return settings.model_copy(
        update={
            "task_lease_s": LEASE_S,
            "destinations": [Destination.parse(f"PACS@127.0.0.1:{pacs.port}")],
        }
    )


def _delivered_once(settings: Settings, pacs: Storescp, study_uid: str, attempts: int = 1) -> StudyResult:
    """The study was claimed ``attempts`` times and has one result with one heatmap
    file per analysed frame and one set of output objects (nothing left over from an
    interrupted run), and the PACS holds exactly one SR of it."""
    wait_for_state(settings, study_uid, StudyState.SENT, timeout=60)
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        row, result = ledger.study(study_uid), ledger.result(study_uid)
    finally:
        ledger.close()
    assert row is not None and row.attempts == attempts, row
    assert result is not None
    heatmaps = sorted((settings.results_dir / study_uid).rglob("*.npy"))
    assert heatmaps == sorted(Path(f.heatmap_path) for i in result.images for f in i.frames)
    outputs = list(outbox_folder(settings, study_uid, result.generation).glob("*.dcm"))
    ledger = Ledger(settings.ledger_path, durable=False)
    try:
        assert outbox_kinds(outputs) == expected_outputs(ledger, result)
    finally:
        ledger.close()
    received = [ds for ds in pacs.received() if ds.StudyInstanceUID == study_uid]
    srs = [ds for ds in received if ds.Modality == "SR"]
    assert len(srs) == 1, f"{len(srs)} SRs of the study reached the PACS"
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(dcmread(p).SOPInstanceUID for p in outputs)
    return result


def _processes() -> list[tuple[int, int, str]]:
    """Every process here: its pid, its parent's pid and its command line."""
    table = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    return [
        (int(p), int(pp), args) for p, pp, args in (line.split(None, 2) for line in table.splitlines() if line.strip())
    ]


def _worker_pids(node: Process) -> tuple[int, list[int]]:
    """The Celery main process the node started, and its pool processes."""
    main = next(pid for pid, parent, args in _processes() if parent == node.proc.pid and "service worker" in args)
    return main, _children(main)


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Celery's pool processes, a pool process's report lanes)."""
    return [child for child, parent, _ in _processes() if parent == pid]


def test_killing_a_worker_mid_study_still_analyses_it_exactly_once(
    fault_settings: Settings, pacs: Storescp, tmp_path: Path
) -> None:
    """kill -9 of the pool process analysing the study: the dead process stops renewing
    its lease, and within the lease the study is analysed by the new pool process."""
    slow = fault_settings.model_copy(update={"max_cine_frames": 40})  # longer than the lease
    study_uid, paths = write_study(tmp_path / "in", 3, "benign", seed=31)
    cine = pydicom.dcmread(next(f.path for f in ultrasound_files() if f.name == "color3d_jpeg_baseline.dcm"))
    cine.StudyInstanceUID = study_uid
    cine.save_as(tmp_path / "in" / "cine.dcm", enforce_file_format=True)
    node = serve(slow, tmp_path / "node.log")
    try:
        storescu(slow, [*paths, tmp_path / "in" / "cine.dcm"])
        wait_for_state(slow, study_uid, StudyState.ANALYSING, timeout=60)
        _main, pool = _worker_pids(node)
        assert len(pool) == 1
        os.kill(pool[0], signal.SIGKILL)
        killed = time.monotonic()
        wait_for("the result", lambda: study_state(slow, study_uid) in DONE_ANALYSING, timeout=120)
        recovered_s = time.monotonic() - killed
        result = _delivered_once(slow, pacs, study_uid, attempts=2)
    finally:
        node.stop()
    assert "signal 9" in node.log()  # Celery saw its pool process die
    assert len(result.images) == 4 and max(len(i.frames) for i in result.images) == 40
    # one lease and one analysis of 4 images and 40 frames, not the minutes of a fixed lease
    assert recovered_s < LEASE_S + 90, recovered_s
    print(f"analysed again {recovered_s:.1f} s after the kill (lease {LEASE_S} s)")


@pytest.mark.parametrize("with_lane", [False, True], ids=["pool-process", "pool-process-and-lane"])
def test_killing_a_worker_while_it_reports_reports_the_study_once(
    fault_settings: Settings, pacs: Storescp, tmp_path: Path, with_lane: bool
) -> None:
    """kill -9 of the pool process after it stored the result, while the report is
    built (by its report lane, on this 2-core host one). The PACS gets one SR either
    way: a lane whose pool process died builds on what it holds under the study's
    lease (or, cut off mid-hand-over, leaves it to the sender); with the lane killed
    too, nobody builds it, and the node's sender reports it once the lease runs out."""
    study_uid, paths = write_study(tmp_path / "in", 12, "malignant", seed=39)  # many SCs: a long report
    node = serve(fault_settings, tmp_path / "node.log")
    try:
        storescu(fault_settings, paths)
        wait_for_state(fault_settings, study_uid, StudyState.ANALYSING, timeout=60)
        _, pool = _worker_pids(node)
        lanes = _children(pool[0]) if with_lane else []
        wait_for(
            "the result to be stored",
            lambda: study_state(fault_settings, study_uid) != StudyState.ANALYSING,
            timeout=120,
            interval=0.002,
        )
        for pid in (pool[0], *lanes):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        state = study_state(fault_settings, study_uid)
        if state != StudyState.ANALYSED:
            pytest.fail(f"the worker got past the report before the kill (state {state}): make the study longer")
        wait_for("the report", lambda: study_state(fault_settings, study_uid) in REPORTED_OR_SENT, timeout=60)
        recovered_s = time.monotonic() - killed
        _delivered_once(fault_settings, pacs, study_uid)
    finally:
        node.stop()
    if with_lane:
        assert lanes, "no report lane: this test expects one (report_processes 'auto' on 2 cores)"
        assert "analysed but never reported" in node.log()  # the sender did it, not a lucky worker
    assert recovered_s < LEASE_S + 30, recovered_s
    print(f"reported {recovered_s:.1f} s after the kill (lease {LEASE_S} s)")


def test_killing_an_idle_pool_process_leaves_the_worker_taking_studies(
    fault_settings: Settings, pacs: Storescp, tmp_path: Path
) -> None:
    """kill -9 of a pool process waiting for its next study (the OOM killer picks the
    largest process, busy or not): the worker goes on taking studies. With the
    embedded queue, Celery's pool hands studies to its processes through one pipe
    whose lock the waiting process holds; a new process would wait for it forever."""
    first, paths = write_study(tmp_path / "in", 2, "benign", seed=40)
    node = serve(fault_settings, tmp_path / "node.log")
    try:
        storescu(fault_settings, paths)
        wait_for("the first report", lambda: study_state(fault_settings, first) in REPORTED_OR_SENT, timeout=120)
        _, pool = _worker_pids(node)
        time.sleep(1.0)  # the pool process is back at the queue, waiting
        os.kill(pool[0], signal.SIGKILL)
        killed = time.monotonic()
        second, paths = write_study(tmp_path / "in", 2, "malignant", seed=41)
        storescu(fault_settings, paths)
        wait_for("the second report", lambda: study_state(fault_settings, second) in REPORTED_OR_SENT, timeout=120)
        recovered_s = time.monotonic() - killed
        for study_uid in (first, second):
            _delivered_once(fault_settings, pacs, study_uid)
        stopping = time.monotonic()
    finally:
        node.stop()
    assert time.monotonic() - stopping < 20, "the worker's warm shutdown waited on the pool's pipe"
    print(f"the next study was reported {recovered_s:.1f} s after the kill")


def test_redis_restart_while_studies_are_queued(fault_settings: Settings, pacs: Storescp, tmp_path: Path) -> None:
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
        lost = time.monotonic()
        worker = Process(distributed, "worker", log=tmp_path / "worker.log", ready=" ready.")
        fresh, paths = write_study(tmp_path / "in", 2, "normal", seed=33)
        storescu(distributed, paths)
        wait_for("the fresh study's report", lambda: study_state(distributed, fresh) in REPORTED_OR_SENT, timeout=60)
        wait_for("the lost study's report", lambda: study_state(distributed, queued) in REPORTED_OR_SENT, timeout=60)
        recovered_s = time.monotonic() - lost

        broker.stop()  # now under a running worker
        broker.start()
        after, paths = write_study(tmp_path / "in", 2, "benign", seed=34)
        storescu(distributed, paths)
        for study_uid in (queued, fresh, after):
            _delivered_once(distributed, pacs, study_uid)
    finally:
        if worker is not None:
            worker.stop()
        node.stop()
        broker.stop()
    assert recovered_s < LEASE_S + 60, recovered_s  # the worker's start-up included
    print(f"the study whose message Redis lost was reported {recovered_s:.1f} s later (lease {LEASE_S} s)")


def test_node_killed_before_and_between_complete_and_queued(
    fault_settings: Settings, pacs: Storescp, tmp_path: Path
) -> None:
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
            _delivered_once(fault_settings, pacs, study_uid)
        wait_for(
            "the duplicate message to be consumed",
            lambda: not list((queue_dir(fault_settings) / "messages").glob("*.msg")),
            timeout=30,
        )
    finally:
        second.stop()


def test_queued_studies_survive_a_node_restart_in_the_embedded_queue(
    fault_settings: Settings, pacs: Storescp, tmp_path: Path
) -> None:
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
        _delivered_once(with_workers, pacs, study_uid)
    finally:
        second.stop()
