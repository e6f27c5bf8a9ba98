"""The analysis of a study without the queue: process_study (claim, analyse, store)
on the real ledger, spool, ONNX model and similar-case index."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.datasets.synthetic import synthetic_study
from service.ledger import InstanceRecord, Ledger, StudyState
from service.model_card import card_path_for
from service.pipeline.analysis import analyse_study, summarise_study
from service.pipeline.scheduler import schedule_due
from service.pipeline.tasks import WorkerState, process_study
from service.pipeline.workers import settings_env
from service.reports.build import build_reports, outbox_folder
from service.results import SUMMARY_RULE, FrameResult, ImageResult, StudyResult
from service.settings import ENV_PREFIX, Destination, Settings, load_settings
from service.similar.index import SimilarCaseIndex
from tests.support.dicom_peers import ultrasound_files
from tests.support.reports import expected_outputs, outbox_kinds
from tests.support.worker import receive

CLASSES = ["normal", "benign", "malignant"]
VARIANTS = ["ybr_jpeg", "mono", "rgb", "mono_jpeg"]


@pytest.fixture
def worker_settings(settings: Settings) -> Settings:
    if not settings.model_path.is_file():
        pytest.fail(f"the model {settings.model_path} is missing: it ships in onnx_models/")
    return settings.model_copy(update={"task_retry_backoff_s": 0.01})


@pytest.fixture
def ledger(worker_settings: Settings) -> Iterator[Ledger]:
    ledger = Ledger(worker_settings.ledger_path, durable=False)
    yield ledger
    ledger.close()


def _study(n: int = 4, label: str = "malignant", seed: int = 0) -> list[pydicom.Dataset]:
    """One synthetic study whose images come in the pixel forms scanners send."""
    return [synthetic_study(n, label, seed=seed, variant=VARIANTS[k % len(VARIANTS)])[k] for k in range(n)]


def _result(ledger: Ledger, study_uid: str, generation: int | None = None) -> StudyResult:
    stored = ledger.result(study_uid, generation)
    assert stored is not None, "no result stored"
    return stored


def test_a_study_is_analysed_and_its_result_stored(worker_settings: Settings, ledger: Ledger) -> None:
    study_uid = receive(worker_settings, ledger, _study())
    assert process_study(WorkerState(worker_settings), study_uid) == "analysed"
    assert ledger.study(study_uid).state == StudyState.REPORTED  # the worker built the reports too
    outputs = list(outbox_folder(worker_settings, study_uid, 1).glob("*.dcm"))
    classes = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in outputs)
    assert classes.count(SecondaryCaptureImageStorage) == 4  # an SC per image (no index: no montage)
    assert classes.count(Comprehensive3DSRStorage) == 1
    result = _result(ledger, study_uid)
    assert outbox_kinds(outputs) == expected_outputs(ledger, result)
    assert result.generation == 1 and len(result.images) == 4
    assert result.model.sha256 and result.execution_provider == "CPUExecutionProvider"
    for image in result.images:
        assert image.skipped is None and len(image.frames) == 1
        frame = image.frames[0]
        assert set(frame.probabilities) == set(CLASSES)
        assert frame.predicted == max(frame.probabilities, key=frame.probabilities.__getitem__)
        heatmap = np.load(frame.heatmap_path)
        x0, y0, x1, y1 = frame.crop
        assert heatmap.shape == (y1 - y0, x1 - x0) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0 and heatmap.max() <= 1
        assert Path(frame.heatmap_path).is_relative_to(worker_settings.results_dir / study_uid / "1")
    decisive = next(i for i in result.images if i.sop_instance_uid == result.summary.decisive_sop_instance_uid)
    assert result.summary.predicted == decisive.predicted and result.summary.probability == decisive.probability
    assert result.summary.rule == SUMMARY_RULE
    assert {"read_s", "prepare_s", "inference_s", "heatmaps_s", "total_s"} <= set(result.timings_s)
    assert result.similar == [] and result.index_version is None  # no index configured


@pytest.mark.heavy
def test_pictures_drawn_on_the_frames_the_worker_decoded_equal_those_drawn_from_the_files(
    worker_settings: Settings, ledger: Ledger
) -> None:
    """The worker draws its heatmap SCs on the frames it decoded for the model; a
    report built later from the spool (a restart, ``sonocase resend``) decodes them
    again: the pictures must not depend on which, for any pixel form scanners send."""
    study_uid = receive(worker_settings, ledger, _study())
    assert process_study(WorkerState(worker_settings), study_uid) == "analysed"

    def sc_pixels() -> dict[str, bytes]:
        files = outbox_folder(worker_settings, study_uid, 1).glob("SC.*.dcm")
        return {p.name: pydicom.dcmread(p).PixelData for p in files}

    from_worker = sc_pixels()
    for path in outbox_folder(worker_settings, study_uid, 1).glob("SC.*.dcm"):
        path.unlink()
    assert build_reports(worker_settings, ledger, study_uid)  # from the files alone
    assert len(from_worker) == 4 and sc_pixels() == from_worker


@pytest.mark.heavy
def test_running_a_study_twice_changes_nothing(worker_settings: Settings, ledger: Ledger) -> None:
    study_uid = receive(worker_settings, ledger, _study(2))
    state = WorkerState(worker_settings)
    assert process_study(state, study_uid) == "analysed"
    first = ledger.result(study_uid)
    heatmaps = sorted((worker_settings.results_dir / study_uid).rglob("*.npy"))
    assert process_study(state, study_uid) == "not-claimed"
    assert ledger.result(study_uid) == first and ledger.study(study_uid).attempts == 1
    assert sorted((worker_settings.results_dir / study_uid).rglob("*.npy")) == heatmaps


@pytest.mark.heavy
def test_a_reopened_study_is_analysed_again_as_a_new_generation(worker_settings: Settings, ledger: Ledger) -> None:
    datasets = _study(3, "benign", seed=4)
    study_uid = receive(worker_settings, ledger, datasets[:2])
    state = WorkerState(worker_settings)
    process_study(state, study_uid)
    receive(worker_settings, ledger, datasets[2:])
    assert process_study(state, study_uid) == "analysed"
    assert len(_result(ledger, study_uid, 1).images) == 2
    assert len(_result(ledger, study_uid, 2).images) == 3


def test_failures_retry_with_backoff_then_fail_visibly(
    worker_settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    broken = worker_settings.model_copy(update={"model_path": tmp_path / "missing.onnx", "task_max_attempts": 3})
    study_uid = receive(broken, ledger, _study(1))
    state = WorkerState(broken)
    outcomes, retry_at = [], []
    for _ in range(3):
        outcomes.append(process_study(state, study_uid))
        retry_at.append(ledger.study(study_uid).next_attempt_at)
    assert outcomes == ["complete", "complete", "failed"]
    row = ledger.study(study_uid)
    assert row.failed_stage == "analysis" and "missing.onnx does not exist" in row.error
    assert retry_at[0] < retry_at[1] and retry_at[2] is None
    assert ledger.result(study_uid) is None


def test_bad_instances_are_skipped_with_a_reason_and_do_not_fail_the_study(
    worker_settings: Settings,
    ledger: Ledger,
) -> None:
    datasets = _study(3, seed=5)
    study_uid = receive(worker_settings, ledger, datasets, complete=False)
    truncated = ledger.instances(study_uid)[1]
    data = Path(truncated.path).read_bytes()
    Path(truncated.path).write_bytes(data[: len(data) // 2])
    ignored = InstanceRecord(
        sop_instance_uid=generate_uid(),
        study_uid=study_uid,
        series_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        transfer_syntax="1.2.840.10008.1.2.1",
        path="-",
        size=0,
        calling_ae="TEST",
        modality="OT",
        ignored_reason="not ultrasound: Modality OT (stored, not analysed)",
    )
    ledger.record_instance(ignored)
    ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    assert process_study(WorkerState(worker_settings), study_uid) == "analysed"
    images = {i.sop_instance_uid: i for i in _result(ledger, study_uid).images}
    assert images[truncated.sop_instance_uid].skipped.startswith(("cannot read", "cannot decode"))
    assert images[ignored.sop_instance_uid].skipped == ignored.ignored_reason
    assert sum(1 for i in images.values() if i.frames) == 2


@pytest.mark.heavy
def test_every_shipped_ultrasound_file_reaches_a_result_or_a_skip_reason(
    worker_settings: Settings,
    ledger: Ledger,
) -> None:
    study_uid = generate_uid()
    datasets = []
    for us_file in ultrasound_files():
        ds = pydicom.dcmread(us_file.path)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # some files share one
        datasets.append(ds)
    receive(worker_settings, ledger, datasets)
    assert process_study(WorkerState(worker_settings), study_uid) == "analysed"
    result = _result(ledger, study_uid)
    assert len(result.images) == len(datasets)
    for image in result.images:
        assert bool(image.frames) != bool(image.skipped), image
    cine = next(i for i in result.images if i.number_of_frames == 120)
    assert len(cine.frames) == worker_settings.max_cine_frames
    assert result.summary.predicted is not None or result.summary.out_of_distribution


@pytest.mark.heavy
def test_outside_the_models_experience_gives_no_class(
    worker_settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    """Every image outside the training domain (the card's threshold lowered to 0):
    no class, the threshold recorded beside each score, no similar case offered
    although the index holds an analysed study, and the study does not join the
    index; its reports: an SR and an SC per image, no overlay, no key-image flag."""
    indexing = worker_settings.model_copy(update={"index_analysed_studies": True, "similar_studies": 3})
    process_study(WorkerState(indexing), receive(indexing, ledger, _study(2, "benign", seed=7)))
    model = tmp_path / worker_settings.model_path.name
    shutil.copyfile(worker_settings.model_path, model)
    card = json.loads(card_path_for(worker_settings.model_path).read_text())
    card["ood"]["threshold"] = 0.0
    card_path_for(model).write_text(json.dumps(card))
    strict = indexing.model_copy(update={"model_path": model})
    study_uid = receive(strict, ledger, _study(2, seed=6))
    process_study(WorkerState(strict), study_uid)
    result = _result(ledger, study_uid)
    assert all(i.out_of_distribution and i.predicted is None for i in result.images)
    assert result.summary.out_of_distribution and result.summary.predicted is None
    assert all(f.ood_threshold == 0.0 < f.ood_distance for i in result.images for f in i.frames)
    assert result.index_version is not None and result.similar == []
    with SimilarCaseIndex.from_settings(strict, None) as index:
        indexed = {s.study_uid for s in index.stored_images()}
    assert indexed and study_uid not in indexed  # the index could have answered
    assert outbox_kinds(list(outbox_folder(strict, study_uid, 1).iterdir())) == {"SR": 1, "SC": 2, "SEG": 0, "KO": 0}


def _frame(predicted: str, p: float, ood: bool = False) -> FrameResult:
    rest = (1 - p) / 2
    return FrameResult(
        frame_number=1,
        probabilities={c: p if c == predicted else rest for c in CLASSES},
        predicted=predicted,
        out_of_distribution=ood,
        ood_distance=0.1,
        heatmap_path="h.npy",
        crop=(0, 0, 1, 1),
        embedding=[1.0],
    )


def _image(uid: str, predicted: str | None, p: float | None, ood: bool = False) -> ImageResult:
    return ImageResult(
        sop_instance_uid=uid,
        series_uid="1",
        sop_class_uid="1",
        predicted=predicted,
        probability=p,
        out_of_distribution=ood,
        frames=[_frame(predicted or "normal", p or 0.5, ood)],
    )


def test_summary_rule_the_most_suspicious_image_decides() -> None:
    images = [
        _image("a", "benign", 0.9),
        _image("b", "malignant", 0.5),
        _image("c", "malignant", 0.7),
        _image("d", "normal", 0.99),
    ]
    summary = summarise_study(images, CLASSES)
    assert (summary.predicted, summary.probability, summary.decisive_sop_instance_uid) == ("malignant", 0.7, "c")
    benign = summarise_study([images[0], images[3]], CLASSES)
    assert (benign.predicted, benign.decisive_sop_instance_uid) == ("benign", "a")


def test_summary_rule_ignores_images_outside_the_models_experience() -> None:
    ood = _image("x", None, None, ood=True)
    summary = summarise_study([ood, _image("n", "normal", 0.8)], CLASSES)
    assert summary.predicted == "normal" and not summary.out_of_distribution
    only_ood = summarise_study([ood], CLASSES)
    assert only_ood.predicted is None and only_ood.out_of_distribution
    skipped = ImageResult(sop_instance_uid="s", series_uid="1", sop_class_uid="1", skipped="no pixel data")
    nothing = summarise_study([skipped], CLASSES)
    assert nothing.predicted is None and not nothing.out_of_distribution


@pytest.mark.heavy
def test_similar_cases_come_from_the_index_and_analysed_studies_join_it_once(
    worker_settings: Settings,
    ledger: Ledger,
) -> None:
    indexing = worker_settings.model_copy(update={"index_analysed_studies": True, "similar_studies": 3})
    state = WorkerState(indexing)
    first = receive(indexing, ledger, _study(2, "benign", seed=7))
    process_study(state, first)
    second = receive(indexing, ledger, _study(2, "malignant", seed=8))
    process_study(state, second)
    result = _result(ledger, second)
    assert result.index_version is not None
    assert [s.study_uid for s in result.similar] == [first]
    assert result.similar[0].label_source == "ai" and 0 <= result.similar[0].distance <= 2

    extra = synthetic_study(3, "malignant", seed=8)[2]
    receive(indexing, ledger, [extra])  # re-opens the second study: analysed again
    process_study(state, second)
    with SimilarCaseIndex.from_settings(indexing, None) as index:
        stored = [(s.study_uid, s.sop_instance_uid, s.label, s.label_source) for s in index.stored_images()]
    judged = [
        (uid, i.sop_instance_uid, i.predicted, "ai")
        for uid in (first, second)
        for i in _result(ledger, uid).images
        if i.predicted
    ]  # in-distribution images only
    assert sorted(stored) == sorted(judged)
    assert {uid for uid, *_ in stored} == {first, second}


def test_a_worker_that_claims_before_the_scheduler_marks_the_study_queued_keeps_it(
    worker_settings: Settings,
    ledger: Ledger,
) -> None:
    """With a fast broker the worker claims a study between the scheduler's send and
    its mark_queued; the mark must not take the claim away (the result would be
    dropped as stale and the study wait for its lease to run out)."""
    study_uid = receive(worker_settings, ledger, _study(1, seed=9))
    state = WorkerState(worker_settings)
    claimed: list[int | None] = []

    def send_and_claim_at_once(uid: str) -> None:
        claimed.append(ledger.claim_analysis(uid, worker_settings.task_lease_s))

    assert schedule_due(ledger, send_and_claim_at_once, worker_settings.task_lease_s) == [study_uid]
    assert claimed == [1] and ledger.study(study_uid).state == StudyState.ANALYSING
    assert ledger.due_for_queue() == []
    analysis = analyse_study(worker_settings, state.model(), study_uid, 1, ledger.instances(study_uid))
    assert ledger.finish_analysis(study_uid, 1, analysis.result)


def test_a_result_finished_after_its_lease_ran_out_is_kept_and_not_redone(
    worker_settings: Settings,
    ledger: Ledger,
) -> None:
    """A slow analysis outlives its lease and the scheduler queues the study again:
    the finished result is stored anyway and the re-sent task finds nothing to do."""
    study_uid = receive(worker_settings, ledger, _study(1, seed=10))
    start = time.time()
    generation = ledger.claim_analysis(study_uid, lease_s=5, now=start)
    analysis = analyse_study(
        worker_settings, WorkerState(worker_settings).model(), study_uid, generation, ledger.instances(study_uid)
    )
    assert schedule_due(ledger, lambda uid: None, lease_s=5, now=start + 6) == [study_uid]
    assert ledger.study(study_uid).state == StudyState.QUEUED
    assert ledger.finish_analysis(study_uid, generation, analysis.result, now=start + 7)
    assert process_study(WorkerState(worker_settings), study_uid) == "not-claimed"
    assert ledger.study(study_uid).attempts == 1


def test_worker_processes_get_exactly_the_nodes_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve hands its settings (command-line overrides included) to the worker
    processes it starts through SONOCASE_* variables."""
    custom = settings.model_copy(
        update={
            "destinations": [Destination.parse("PACS@127.0.0.1:104"), Destination.parse("VNA@10.0.0.2:11112+tls")],
            "allowed_callers": ["MODALITY1", "MODALITY2"],
            "index_analysed_studies": True,
            "max_cine_frames": 3,
            "task_lease_s": 12.5,
            "execution_provider": "cpu",
        }
    )
    for name in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in settings_env(custom).items():
        monkeypatch.setenv(name, value)
    assert load_settings() == custom


class _OutliningModel:
    """The shipped model as one with a segmentation head would be seen by the worker:
    its card names a segmentation threshold, its prediction holds a lesion map per
    row (a centred blob here), the contract of issue 20's model side."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.card = SimpleNamespace(**{**dict(model.card), "segmentation": SimpleNamespace(threshold=0.5)})
        self.identity, self.provider = model.identity, model.provider

    def run(self, batch: np.ndarray) -> SimpleNamespace:
        prediction = self._model.run(batch)
        blob = np.exp(-((np.mgrid[0:32, 0:32] - 15.5) ** 2).sum(axis=0) / (2 * 6.0**2)).astype(np.float32)
        return SimpleNamespace(
            **{
                **vars(prediction),
                "predicted": prediction.predicted,
                "lesion_mask": np.repeat(blob[None], len(batch), axis=0),
            }
        )


def test_a_model_that_outlines_lesions_gets_them_measured(worker_settings: Settings, ledger: Ledger) -> None:
    study_uid = receive(worker_settings, ledger, _study(2, seed=12))
    generation = ledger.claim_analysis(study_uid, lease_s=60)
    model = _OutliningModel(WorkerState(worker_settings).model())
    analysis = analyse_study(worker_settings, model, study_uid, generation, ledger.instances(study_uid))  # type: ignore[arg-type]
    frames = [f for image in analysis.result.images for f in image.frames]
    assert frames and all(f.lesion_threshold == 0.5 for f in frames)
    for frame in frames:
        outlined = frame.predicted != "normal" and not frame.out_of_distribution
        assert (frame.lesion is not None) == outlined
        if frame.lesion is not None:  # the synthetic images are calibrated: millimetres
            assert frame.lesion.long_axis is not None and frame.lesion.long_axis.length_mm > 0
            x0, _y0, x1, _y1 = frame.crop
            xs = [x for x, _ in frame.lesion.outline]
            assert x0 < min(xs) < max(xs) < x1  # inside the analysed region, resized onto it
    assert any(frame.lesion is not None for frame in frames), "the malignant study has a finding to outline"
    # a stored result reads back with its lesions
    assert StudyResult.model_validate(analysis.result.model_dump(mode="json")) == analysis.result
