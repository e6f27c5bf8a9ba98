"""build_reports: what the worker calls after analysis. Objects land in the outbox
and the queue, the study becomes REPORTED; bad input fails the study at stage
"report" with the reason and queues nothing; building again changes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from service.common.spool import write_atomic_all
from service.ledger import Ledger, StudyState
from service.reports.build import build_reports, rebuild_sr
from service.reports.validation import check_object
from service.settings import Settings, load_settings
from tests.support.common import force_state
from tests.support.reports import (
    DEFAULT_TEMPLATE,
    analyse,
    analysed_study,
    dciodvfy_errors,
    outbox_kinds,
    store_study,
)

DESTINATIONS = "PACS@127.0.0.1:11112,ARCHIVE@127.0.0.1:11113"


@pytest.fixture
def to_two(settings: Settings) -> Settings:
    return settings.model_copy(update={"destinations": load_settings(destinations=DESTINATIONS).destinations})


@pytest.mark.integration
def test_objects_are_written_checked_queued_and_the_study_reported(to_two: Settings, ledger: Ledger) -> None:
    study = analysed_study(to_two, ledger, skip=[3])
    paths = build_reports(to_two, ledger, study.uid, study.reference_images)
    classes = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID for p in paths)
    # SR + one heatmap SC per analysed image + the montage + the overlay of the one
    # calibrated single-frame image (OBXXXX1A; US1_UNCR is uncalibrated, the third a
    # cine loop) + the key-image flag.
    assert classes == sorted(
        [Comprehensive3DSRStorage, SegmentationStorage, KeyObjectSelectionDocumentStorage]
        + [SecondaryCaptureImageStorage] * 4
    )
    assert all(p.parent == to_two.outbox_dir / study.uid / "1" for p in paths)
    for path in paths:
        check_object(path.read_bytes(), json.loads(DEFAULT_TEMPLATE.read_text())["disclaimer"])
        assert dciodvfy_errors(path) == []
    rows = ledger.outbox(study.uid)
    assert len(rows) == 2 * len(paths)
    assert {r.destination for r in rows} == {"PACS@127.0.0.1:11112", "ARCHIVE@127.0.0.1:11113"}
    assert {r.path for r in rows} == {str(p) for p in paths}
    row = ledger.study(study.uid)
    assert row.state == StudyState.REPORTED and row.reported_at is not None


@pytest.mark.heavy
def test_building_again_rewrites_the_same_objects_and_queues_nothing_new(to_two: Settings, ledger: Ledger) -> None:
    study = analysed_study(to_two, ledger, files=["US1_UNCR.dcm"])
    first = build_reports(to_two, ledger, study.uid, study.reference_images)
    rows = ledger.outbox(study.uid)
    force_state(ledger, study.uid, StudyState.ANALYSED)  # a redelivered task
    again = build_reports(to_two, ledger, study.uid, study.reference_images)
    assert again == first
    assert ledger.outbox(study.uid) == rows
    assert sorted(p.name for p in first[0].parent.iterdir()) == sorted(p.name for p in first)


@pytest.mark.parametrize("durable", [False, True])
def test_a_study_s_files_are_written_together_each_whole_or_not_at_all(tmp_path: Path, durable: bool) -> None:
    """The outbox's writer (spool.write_atomic_all): every file complete under its
    name, no temporary file left; a failure part-way leaves the files already
    there as they were and no temporary file."""
    folder = tmp_path / "study" / "1"
    write_atomic_all([(folder / "SR.1.dcm", b"sr"), (folder / "SC.2.dcm", [b"s", b"c"])], durable)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"SR.1.dcm": b"sr", "SC.2.dcm": b"sc"}
    (tmp_path / "not-a-folder").write_bytes(b"")
    with pytest.raises(OSError):
        write_atomic_all([(folder / "SR.1.dcm", b"new"), (tmp_path / "not-a-folder" / "KO.3.dcm", b"ko")], durable)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"SR.1.dcm": b"sr", "SC.2.dcm": b"sc"}


def test_without_a_destination_the_objects_stay_in_the_outbox(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    paths = build_reports(settings, ledger, study.uid)
    assert len(paths) == 3  # SR, heatmap SC, key-image flag; no similar studies, no montage
    assert all(p.is_file() for p in paths)
    assert ledger.outbox(study.uid) == []
    assert ledger.study(study.uid).state == StudyState.REPORTED


def test_a_study_not_assessed_gets_an_sr_and_captures_but_no_overlay_or_key_image_flag(
    settings: Settings, ledger: Ledger
) -> None:
    """Every image outside the model's training domain: the palette image would get
    an overlay and the study a key-image flag if they were assessed; here neither
    (a heatmap or a flag would pose as a finding), nor a montage (no similar cases
    are searched for such images)."""
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm", "OBXXXX1A.dcm"], ood_images=[0, 1], n_similar=0)
    paths = build_reports(settings, ledger, study.uid)
    assert outbox_kinds(paths) == {"SR": 1, "SC": 2, "SEG": 0, "KO": 0}
    assert ledger.study(study.uid).state == StudyState.REPORTED  # every object passed the gate
    assessed = analysed_study(settings, ledger, files=["US1_UNCR.dcm", "OBXXXX1A.dcm"], n_similar=0)
    assert outbox_kinds(build_reports(settings, ledger, assessed.uid)) == {"SR": 1, "SC": 2, "SEG": 1, "KO": 1}


def test_images_of_the_retired_ultrasound_class_are_reported(settings: Settings, ledger: Ledger) -> None:
    """Retired Ultrasound Image Storage (an old scanner's colour-flow images, which
    the receiver accepts): highdicom does not know the class, the reports do."""
    for ood_images in ([], [0]):
        study = analysed_study(settings, ledger, files=["color-pl.dcm"], ood_images=ood_images, n_similar=0)
        assert study.result.images[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.6"
        assert build_reports(settings, ledger, study.uid), ledger.study(study.uid).error


@pytest.mark.heavy
def test_an_object_failing_the_gate_fails_the_study_and_queues_nothing(to_two: Settings, ledger: Ledger) -> None:
    """A result naming a similar study by a SOP Class UID that is no UID (a damaged
    index row): the SR and the montage would carry it, the gate refuses them (a
    PACS may too), and the error names the attribute, not the value."""
    study_uid, paths = store_study(to_two, ledger, ["US1_UNCR.dcm", "OBXXXX1A.dcm"])
    ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    generation = ledger.claim_analysis(study_uid, lease_s=60)
    assert generation is not None
    result, references = analyse(to_two, study_uid, paths, generation=generation)
    damaged = result.similar[0].model_copy(update={"sop_class_uid": "1.2.840.10008.5.1.4.1.1.6.01"})
    result = result.model_copy(update={"similar": [damaged, *result.similar[1:]]})
    assert ledger.finish_analysis(study_uid, generation, result)
    assert build_reports(to_two, ledger, study_uid, references) == []
    row = ledger.study(study_uid)
    assert (row.state, row.failed_stage) == (StudyState.FAILED, "report")
    assert "ReferencedSOPClassUID is not a valid UI" in row.error, row.error
    assert "1.2.840.10008.5.1.4.1.1.6.01" not in row.error
    assert ledger.outbox(study_uid) == []
    assert not (to_two.outbox_dir / study_uid).exists()


def test_a_missing_heatmap_or_a_broken_template_fails_the_study_with_the_reason(
    settings: Settings,
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    heatmap = Path(study.result.images[0].frames[0].heatmap_path)
    heatmap.unlink()
    assert build_reports(settings, ledger, study.uid) == []
    row = ledger.study(study.uid)
    assert row.failed_stage == "report" and str(heatmap) in row.error

    np.save(heatmap, np.zeros((4, 4), np.float32))
    broken = tmp_path / "template.json"
    broken.write_text(DEFAULT_TEMPLATE.read_text().replace('"wording"', '"words"'))
    assert build_reports(settings.model_copy(update={"sr_template": broken}), ledger, study.uid) == []
    assert "TemplateError" in ledger.study(study.uid).error and "wording" in ledger.study(study.uid).error

    assert build_reports(settings, ledger, study.uid)  # fixed: a failed study is reported on a new try
    assert ledger.study(study.uid).state == StudyState.REPORTED


def test_a_stale_result_is_not_reported(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    store_study(settings, ledger, ["OBXXXX1A.dcm"], study_uid=study.uid)  # a late image: generation 2
    assert build_reports(settings, ledger, study.uid) == []
    assert ledger.study(study.uid).state == StudyState.RECEIVING
    assert not (settings.outbox_dir / study.uid).exists()


def test_reanalysis_reports_a_new_version_referencing_the_first(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], n_similar=0)
    first_sr = build_reports(settings, ledger, study.uid)[0]
    _, late = store_study(settings, ledger, ["OBXXXX1A.dcm"], study_uid=study.uid)
    ledger.complete_quiet_studies(0.0, now=time.time() + 1)
    generation = ledger.claim_analysis(study.uid, lease_s=60)
    assert generation == 2
    result, _ = analyse(settings, study.uid, [*study.paths, *late], generation=generation, n_similar=0)
    assert ledger.finish_analysis(study.uid, generation, result)
    second_sr = build_reports(settings, ledger, study.uid)[0]
    first, second = pydicom.dcmread(first_sr), pydicom.dcmread(second_sr)
    assert second_sr.parent.name == "2" and second.SOPInstanceUID != first.SOPInstanceUID
    item = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == first.SOPInstanceUID


@pytest.mark.integration
def test_rebuild_in_another_class_for_the_sender(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], n_similar=1)
    build_reports(settings, ledger, study.uid, study.reference_images)
    uid, path = rebuild_sr(settings, ledger, study.uid, 1, ComprehensiveSRStorage)
    ds = pydicom.dcmread(path)
    assert (ds.SOPInstanceUID, ds.SOPClassUID) == (uid, ComprehensiveSRStorage)
    assert path.parent == settings.outbox_dir / study.uid / "1"
    assert dciodvfy_errors(path) == []


def _references(ds: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs of every IMAGE or COMPOSITE item in an SR-family document."""
    found = set()
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            found.add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        stack.extend(item.get("ContentSequence", []))
    return found


def test_the_sr_and_the_key_image_flag_name_the_objects_written(settings: Settings, ledger: Ledger) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm", "OBXXXX1A.dcm"], n_similar=0)
    paths = build_reports(settings, ledger, study.uid)
    written = {p.name.split(".", 1)[0]: [] for p in paths}
    for path in paths:
        written[path.name.split(".", 1)[0]].append(pydicom.dcmread(path))
    (sr,), (kos,) = written["SR"], written["KO"]
    heatmaps = {ds.SOPInstanceUID for ds in written["SC"] + written["SEG"]}
    assert len(written["SC"]) == 2 and len(written["SEG"]) == 1
    assert heatmaps <= _references(sr)
    (seg,) = written["SEG"]
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        == study.result.images[1].sop_instance_uid
    )  # OBXXXX1A, the calibrated one
    key = {study.result.summary.decisive_sop_instance_uid} | {
        i.sop_instance_uid for i in study.result.images if i.predicted == "malignant"
    }
    assert _references(kos) == key | {sr.SOPInstanceUID}
    # The sender's fallback rebuilds the SR naming the same heatmap objects.
    _, path = rebuild_sr(settings, ledger, study.uid, 1, ComprehensiveSRStorage)
    assert _references(pydicom.dcmread(path)) == _references(sr)
