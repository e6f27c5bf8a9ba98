"""Workers without the node's files (``data_access = "http"``): a worker reads a
study's instances from the node by WADO-RS and hands its result, heatmaps and
objects back over HTTP; the node alone writes its spool, results and outbox.

In process: the node's worker routes served by its real HTTP server, the worker's
side called directly. As processes: ``sonocase serve`` with a PostgreSQL ledger
and a Redis broker, and two ``sonocase worker`` processes, each in a mount
namespace of its own where the node's data folder is an empty read-only file
system: pointed at that folder, a worker that read or wrote any file of the node's
would fail the study. They reach the node, Redis and PostgreSQL over TCP only. One
of them is killed in the middle of the study; the other finishes it, and the PACS
gets its SR once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.common.spool import instance_path
from service.datasets.synthetic import synthetic_study
from service.ledger import InstanceRecord, Ledger, StudyState, open_ledger
from service.ops.web import ExtraRouter, build_web_server
from service.ops.worker_api import worker_router
from service.pipeline.analysis import analyse_study
from service.pipeline.remote import NodeClient, NodeUnavailable, analyse_remotely
from service.pipeline.tasks import WorkerState, process_study
from service.reports.build import OutputObject, outbox_folder
from service.results import StudyResult
from service.settings import Destination, Settings
from service.similar.index import SimilarCaseIndex
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

TOKEN = "worker-secret-0123456789abcdef"

pytestmark = pytest.mark.integration


def hiding(folder: Path) -> tuple[str, ...]:
    """A command line prefix: run the command in a new mount namespace in which
    ``folder`` is an empty read-only tmpfs (needs the right to mount, as root has)."""
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder))


def _stored(ledger: Ledger, study_uid: str) -> StudyResult:
    result = ledger.result(study_uid)
    assert result is not None, "no result stored"
    return result


def _outputs_as_built(settings: Settings, ledger: Ledger, result: StudyResult) -> None:
    """One heatmap file per analysed frame in the node's results folder, named by the
    result, and the outbox holding what the report builder writes for it."""
    heatmaps = sorted((settings.results_dir / result.study_uid).rglob("*.npy"))
    assert heatmaps == sorted(Path(f.heatmap_path) for i in result.images for f in i.frames)
    assert all(path.is_relative_to(settings.results_dir) for path in heatmaps)
    outputs = list(outbox_folder(settings, result.study_uid, result.generation).glob("*.dcm"))
    assert outbox_kinds(outputs) == expected_outputs(ledger, result)


@pytest.fixture
def node_ledger(settings: Settings) -> Iterator[tuple[Settings, Ledger]]:
    """A node's ledger and its worker routes on its real HTTP server (no receiver:
    studies are put in its spool directly); a destination, so objects are queued."""
    node = settings.model_copy(
        update={
            "http_port": free_port(),
            "worker_token": TOKEN,
            "web_token": "admin-web-token-0123456789",
            "index_analysed_studies": True,
            "destinations": [Destination.parse("PACS@127.0.0.1:104")],
        }
    )
    ledger = open_ledger(node, durable=False)
    server = build_web_server(node, ledger, routers=[ExtraRouter(worker_router(node, ledger), 64 << 20, own_auth=True)])
    server.start()
    yield node, ledger
    server.stop()
    ledger.close()


def _worker_of(node: Settings, folder: Path, token: str = TOKEN) -> Settings:
    return node.model_copy(
        update={
            "data_access": "http",
            "node_url": f"http://127.0.0.1:{node.http_port}",
            "worker_token": token,
            "data_dir": folder,
        }
    )


def test_a_worker_analyses_over_http_and_the_node_writes_everything(
    node_ledger: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    node, ledger = node_ledger
    study_uid = receive(node, ledger, synthetic_study(3, "malignant", seed=51))
    generation = ledger.claim_analysis(study_uid, 60)
    assert generation == 1
    worker = _worker_of(node, tmp_path / "worker-data")
    state = WorkerState(worker)

    analysis, handed = analyse_remotely(
        worker, NodeClient(worker), state.model(), study_uid, generation, ledger.instances(study_uid)
    )

    assert handed.outcome == "reported"
    assert not (tmp_path / "worker-data").exists(), "the worker wrote a file of its own"
    study = ledger.study(study_uid)
    assert study is not None and study.state == StudyState.REPORTED
    result = _stored(ledger, study_uid)
    assert [i.skipped for i in result.images] == [None, None, None]
    assert result.summary == analysis.result.summary
    _outputs_as_built(node, ledger, result)
    for image in result.images:  # the node wrote the worker's heatmaps, not maps of its own
        for frame in image.frames:
            sent = analysis.heatmaps[(image.sop_instance_uid, frame.frame_number)]
            np.testing.assert_array_equal(np.load(frame.heatmap_path), sent)
    queued = ledger.outbox(study_uid)
    assert len(queued) == sum(expected_outputs(ledger, result).values())

    # The same study handed back again (a retry whose first answer was lost): nothing changes.
    _, again = analyse_remotely(
        worker, NodeClient(worker), state.model(), study_uid, generation, ledger.instances(study_uid)
    )
    assert again.outcome == "stale"
    assert ledger.outbox(study_uid) == queued
    assert _stored(ledger, study_uid) == result


def test_a_report_the_worker_cannot_build_fails_the_study_visibly_on_the_node(
    node_ledger: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """As on the data folder: the result is stored, the study FAILED at stage report
    with the reason, nothing queued."""
    node, ledger = node_ledger
    study_uid = receive(node, ledger, synthetic_study(1, "normal", seed=61))
    generation = ledger.claim_analysis(study_uid, 60)
    assert generation is not None
    broken = tmp_path / "template.json"
    broken.write_text("{")
    worker = _worker_of(node, tmp_path / "worker-data").model_copy(update={"sr_template": broken})

    _, handed = analyse_remotely(
        worker, NodeClient(worker), WorkerState(worker).model(), study_uid, generation, ledger.instances(study_uid)
    )

    assert handed.outcome == "failed"
    study = ledger.study(study_uid)
    assert study is not None and (study.state, study.failed_stage) == (StudyState.FAILED, "report")
    assert "template" in study.error
    assert ledger.result(study_uid) is not None and ledger.outbox(study_uid) == []
    assert not outbox_folder(node, study_uid, generation).exists()


def test_an_instance_stored_but_not_analysed_is_fetched_for_the_report(
    node_ledger: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """The report names every instance of the result: one the analysis skipped
    (stored, not analysed) is fetched for its header."""
    node, ledger = node_ledger
    *images, other = synthetic_study(3, "benign", seed=60)
    study_uid = receive(node, ledger, images, complete=False)
    other.Modality = "OT"
    path = instance_path(node.spool_dir, study_uid, str(other.SOPInstanceUID))
    other.save_as(path, enforce_file_format=True)
    reason = "not ultrasound: Modality OT (stored, not analysed)"
    ledger.record_instance(
        InstanceRecord(
            sop_instance_uid=str(other.SOPInstanceUID),
            study_uid=study_uid,
            series_uid=str(other.SeriesInstanceUID),
            sop_class_uid=str(other.SOPClassUID),
            transfer_syntax=str(other.file_meta.TransferSyntaxUID),
            path=str(path),
            size=path.stat().st_size,
            calling_ae="TEST",
            modality="OT",
            ignored_reason=reason,
        )
    )
    ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    generation = ledger.claim_analysis(study_uid, 60)
    assert generation is not None
    worker = _worker_of(node, tmp_path / "worker-data")

    _, handed = analyse_remotely(
        worker, NodeClient(worker), WorkerState(worker).model(), study_uid, generation, ledger.instances(study_uid)
    )

    assert handed.outcome == "reported"
    result = _stored(ledger, study_uid)
    assert [i.skipped for i in result.images] == [None, None, reason]
    _outputs_as_built(node, ledger, result)


def test_a_reanalysis_over_http_names_the_earlier_sr(node_ledger: tuple[Settings, Ledger], tmp_path: Path) -> None:
    """The worker fetches the SR it supersedes from the node (GET .../earlier/...)."""
    node, ledger = node_ledger
    first, late = synthetic_study(3, "benign", seed=59)[:2], synthetic_study(3, "benign", seed=59)[2:]
    study_uid = receive(node, ledger, first)
    worker = _worker_of(node, tmp_path / "worker-data")
    state = WorkerState(worker)
    srs = []
    for generation, arriving in ((1, []), (2, late)):
        if arriving:  # an instance arriving late re-opens the study: generation 2
            receive(node, ledger, arriving)
        assert ledger.claim_analysis(study_uid, 60) == generation
        _, handed = analyse_remotely(
            worker, NodeClient(worker), state.model(), study_uid, generation, ledger.instances(study_uid)
        )
        assert handed.outcome == "reported"
        (sr_path,) = outbox_folder(node, study_uid, generation).glob("SR.*.dcm")
        srs.append(pydicom.dcmread(sr_path))
    (item,) = srs[1].PredecessorDocumentsSequence
    referenced = item.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == srs[0].SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == srs[0].SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in srs[0]


def test_the_node_index_finds_the_similar_cases_of_a_worker_without_it(
    node_ledger: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """The node's similar-case index (filled here by a worker on the data folder)
    answers for a worker without it: the same similar cases, and the montage; and the
    node adds the worker's study to it (index_analysed_studies)."""
    node, ledger = node_ledger
    for seed in (56, 57):
        indexed = receive(node, ledger, synthetic_study(2, "malignant", seed=seed))
        assert process_study(WorkerState(node), indexed) == "analysed"
    study_uid = receive(node, ledger, synthetic_study(2, "malignant", seed=58))
    generation = ledger.claim_analysis(study_uid, 60)
    assert generation is not None
    worker = _worker_of(node, tmp_path / "worker-data")
    state = WorkerState(worker)
    model = state.model()

    _, handed = analyse_remotely(worker, NodeClient(worker), model, study_uid, generation, ledger.instances(study_uid))

    assert handed.outcome == "reported"
    result = _stored(ledger, study_uid)
    assert {s.study_uid for s in result.similar} >= {indexed}, "no similar case from the node's index"
    index = SimilarCaseIndex.from_settings(node, model.identity)
    try:
        assert index.known_study_uids([study_uid]) == {study_uid}, "the node did not index the worker's study"
        # What a worker with the index finds (a study is never its own similar case):
        expected = analyse_study(
            node, model, study_uid, generation, ledger.instances(study_uid), index, write_heatmaps=False
        )
    finally:
        index.close()
    assert result.similar == expected.result.similar and result.index_version is not None
    assert result.study.patient_key == expected.result.study.patient_key != ""
    _outputs_as_built(node, ledger, result)  # the montage among them
    assert not (tmp_path / "worker-data").exists()


def test_the_worker_routes_take_only_the_worker_token(node_ledger: tuple[Settings, Ledger], tmp_path: Path) -> None:
    node, ledger = node_ledger
    study_uid = receive(node, ledger, synthetic_study(1, "benign", seed=52))
    generation = ledger.claim_analysis(study_uid, 60)
    assert generation is not None
    for token in ("wrong", node.web_token):  # the administrator's token opens nothing here
        worker = _worker_of(node, tmp_path / "worker-data", token)
        with pytest.raises(NodeUnavailable, match="401"):
            analyse_remotely(
                worker,
                NodeClient(worker),
                WorkerState(worker).model(),
                study_uid,
                generation,
                ledger.instances(study_uid),
            )
    study = ledger.study(study_uid)
    assert study is not None and study.state == StudyState.ANALYSING  # nothing was handed back


def test_the_node_refuses_an_upload_it_cannot_trust_and_writes_nothing(
    node_ledger: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    node, ledger = node_ledger
    study_uid = receive(node, ledger, synthetic_study(2, "malignant", seed=55))
    generation = ledger.claim_analysis(study_uid, 60)
    assert generation is not None
    worker = _worker_of(node, tmp_path / "worker-data")
    client = NodeClient(worker)
    instances = ledger.instances(study_uid)
    analysis = analyse_study(
        worker, WorkerState(worker).model(), study_uid, generation, instances, read=client.read, write_heatmaps=False
    )
    first = next(iter(analysis.heatmaps))
    shrunk = {**analysis.heatmaps, first: analysis.heatmaps[first][1:]}
    source = Path(instances[0].path).read_bytes()  # an ultrasound image: not a class the node sends
    image = OutputObject(instances[0].sop_instance_uid, instances[0].sop_class_uid, source, "SC")
    for heatmaps, objects, refusal in [
        (shrunk, [], "is not a finite map of its crop's size"),
        ({}, [], "is missing"),
        (analysis.heatmaps, [image], "which the node does not send"),
    ]:
        with pytest.raises(NodeUnavailable, match="400") as refused:
            client.hand_back(analysis.result, heatmaps, objects, None)
        assert refusal in refused.value.__cause__.response.text  # type: ignore[union-attr]
    study = ledger.study(study_uid)
    assert study is not None and study.state == StudyState.ANALYSING
    assert ledger.result(study_uid) is None and not (node.results_dir / study_uid).exists()
    assert not (node.outbox_dir / study_uid).exists()


def test_a_node_that_does_not_answer_fails_the_attempt_and_it_is_retried(settings: Settings) -> None:
    """Not a study without its images: the attempt fails visibly and is retried."""
    ledger = open_ledger(settings, durable=False)
    try:
        study_uid = receive(settings, ledger, synthetic_study(1, "benign", seed=54))
        worker = settings.model_copy(
            update={"data_access": "http", "node_url": f"http://127.0.0.1:{free_port()}", "worker_token": TOKEN}
        )
        assert process_study(WorkerState(worker), study_uid) == StudyState.COMPLETE
        study = ledger.study(study_uid)
        assert study is not None and study.failed_stage == "analysis"
        assert "the node cannot be reached" in study.error and study.next_attempt_at is not None
        assert ledger.result(study_uid) is None
    finally:
        ledger.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Storescp]:
    scp = start_storescp(tmp_path / "pacs", free_port())
    yield scp
    scp.stop()


@pytest.mark.slow
def test_workers_without_the_node_files_finish_a_study_when_one_is_killed(
    settings: Settings,
    postgres_url: str,
    private_redis: PrivateRedis,
    pacs: Storescp,
    tmp_path: Path,
) -> None:
    node = settings.model_copy(
        update={
            "ledger_url": postgres_url,
            "broker_url": private_redis.url,
            "workers": 0,
            "http_port": free_port(),
            "worker_token": TOKEN,
            "task_lease_s": LEASE_S,
            "max_cine_frames": 40,  # an analysis longer than the lease: time to kill it midway
            "destinations": [Destination.parse(f"PACS@127.0.0.1:{pacs.port}")],
        }
    )
    # The workers are pointed at the node's own data_dir, which they cannot see.
    worker = _worker_of(node, node.data_dir)
    study_uid, paths = write_study(tmp_path / "in", 3, "benign", seed=53)
    cine = pydicom.dcmread(next(f.path for f in ultrasound_files() if f.name == "color3d_jpeg_baseline.dcm"))
    cine.StudyInstanceUID = study_uid
    cine.save_as(tmp_path / "in" / "cine.dcm", enforce_file_format=True)

    served = serve(node, tmp_path / "node.log")
    workers = [
        Process(
            worker,
            "worker",
            log=tmp_path / f"worker-{k}.log",
            ready=" ready.",
            run_as=hiding(node.data_dir),
        )
        for k in range(2)
    ]
    try:
        seen = subprocess.run(
            [*hiding(node.data_dir), "ls", "-A", str(node.data_dir)], capture_output=True, text=True, check=True
        )
        assert seen.stdout == "" and any(node.data_dir.iterdir()), "the workers' view of data_dir is not empty"
        storescu(node, [*paths, tmp_path / "in" / "cine.dcm"])
        wait_for_state(node, study_uid, StudyState.ANALYSING, timeout=60)
        first = wait_for(
            "a worker to take the study",
            lambda: next((w for w in workers if "analysing generation 1" in w.log()), None),
        )
        first.kill()
        killed = time.monotonic()
        survivor = next(w for w in workers if w is not first)
        wait_for("the report", lambda: study_state(node, study_uid) in REPORTED_OR_SENT, timeout=180)
        recovered_s = time.monotonic() - killed
        wait_for_state(node, study_uid, StudyState.SENT, timeout=60)
    finally:
        for process in workers:
            process.stop()
        assert served.stop() == 0, served.log()

    assert "analysing generation 1" in survivor.log() and "analysed: " in survivor.log(), survivor.log()
    assert "handed back: reported" in served.log()
    ledger = open_ledger(node, durable=False)
    try:
        study = ledger.study(study_uid)
        assert study is not None and study.attempts == 2, study
        result = _stored(ledger, study_uid)
        assert len(result.images) == 4 and max(len(i.frames) for i in result.images) == 40
        assert all(i.skipped is None for i in result.images), [i.skipped for i in result.images]
        _outputs_as_built(node, ledger, result)
    finally:
        ledger.close()
    srs = [ds for ds in pacs.received() if ds.StudyInstanceUID == study_uid and ds.Modality == "SR"]
    assert len(srs) == 1, f"{len(srs)} SRs of the study reached the PACS"
    print(f"finished by the other worker {recovered_s:.1f} s after the kill (lease {LEASE_S} s)")
