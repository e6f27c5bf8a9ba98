"""The TID 1500 SR, built from a study of real ultrasound files (RGB, palette, a
30-frame JPEG cine, JPEG-lossless monochrome; one skipped, one out of distribution):
DCMTK renders it, dciodvfy finds no error, highdicom reads back what was computed."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)
from test_reports_support import (
    DEFAULT_TEMPLATE,
    Study,
    analyse,
    analysed_study,
    dciodvfy_errors,
    dsr2html,
)

from service.ledger import Ledger
from service.reports.sr import SR_CLASSES, build_sr, decisive_frame
from service.reports.template import SrTemplate, TemplateError, load_template
from service.settings import Settings, load_settings


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Study, list[pydicom.Dataset], SrTemplate]:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("sr") / "data", durability="none")
    study = analysed_study(settings, Ledger(settings.ledger_path, durable=False), skip=[3], ood_image=1)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths]
    return settings, study, sources, load_template(DEFAULT_TEMPLATE)


def _texts(item: pydicom.Dataset, meaning: str) -> list[str]:
    """TEXT values of the children of ``item`` with concept name ``meaning``."""
    return [
        child.TextValue for child in item.ContentSequence
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def _write(sr: hd.sr.Comprehensive3DSR, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_dcmtk_renders_it_and_dciodvfy_finds_no_error(built, tmp_path: Path, sop_class: str) -> None:
    _, study, sources, template = built
    path = _write(build_sr(study.result, template, sources, sop_class, "0.1.0"), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    html = dsr2html(path, tmp_path / "sr.html")
    assert "UNVERIFIED" in html
    assert "Imaging Measurement Report" in html
    for similar in study.result.similar:
        assert f"accession {similar.accession_number}" in html
    assert "was not analysed: mostly blank" in html
    assert "Malignant neoplasm of breast" in html or "No abnormality detected" in html or "Neoplasm, benign" in html


def test_highdicom_reads_back_every_frame_with_its_numbers(built, tmp_path: Path) -> None:
    _, study, sources, template = built
    path = _write(build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0"), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    frames = [(image, frame) for image in study.result.images for frame in image.frames]
    assert len(groups) == 1 + len(frames)  # the study summary, then one per analysed frame
    multi_frame = {ds.SOPInstanceUID for ds in sources if int(ds.get("NumberOfFrames") or 1) > 1}
    for group, (image, frame) in zip(groups[1:], frames, strict=True):
        (source,) = group.source_images
        assert source.referenced_sop_instance_uid == image.sop_instance_uid
        if image.sop_instance_uid in multi_frame:
            assert source.referenced_frame_numbers == [frame.frame_number]
        numbers = {
            m.name.meaning: m.value for m in group.get_measurements()
        }
        for label, probability in frame.probabilities.items():
            assert numbers[template.classes[label].probability.meaning] == pytest.approx(probability, abs=1e-9)
        evaluations = {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}
        assert evaluations["Impression"].value == template.classes[frame.predicted].finding.value
        assert ("Outside the model's experience" in evaluations) == frame.out_of_distribution
        assert _texts(group[0], "Algorithm Name") == [study.result.model.name]
        assert _texts(group[0], "Algorithm Parameters") == [
            f"model sha256 {study.result.model.sha256}", "index version idx-7",
        ]


def test_summary_group_carries_the_decisive_image_and_the_rule(built, tmp_path: Path) -> None:
    _, study, sources, template = built
    path = _write(build_sr(study.result, template, sources, ComprehensiveSRStorage, "0.1.0"), tmp_path / "sr.dcm")
    summary = hd.sr.srread(path).content.get_image_measurement_groups()[0]
    assert summary.tracking_identifier == template.wording.study_summary
    decisive_uid = study.result.summary.decisive_sop_instance_uid
    decisive = next(i for i in study.result.images if i.sop_instance_uid == decisive_uid)
    assert summary.source_images[0].referenced_sop_instance_uid == decisive.sop_instance_uid
    (probability,) = summary.get_measurements()
    assert probability.value == pytest.approx(study.result.summary.probability)
    assert decisive_frame(decisive).probabilities[decisive.predicted] == pytest.approx(study.result.summary.probability)
    assert _texts(summary[0], "Study summary rule") == [study.result.summary.rule]


def test_document_is_a_new_unverified_series_in_the_patients_study(built) -> None:
    _, study, sources, template = built
    sr = build_sr(study.result, template, sources, EnhancedSRStorage, "0.1.0")
    source = sources[0]
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert sr[keyword].value == source[keyword].value
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert (sr.Modality, sr.VerificationFlag, sr.CompletionFlag) == ("SR", "UNVERIFIED", "COMPLETE")
    assert sr.Manufacturer == template.device.manufacturer
    assert {s.SOPInstanceUID for s in sources} <= {uid for _, _, uid, _ in sr.get_evidence(current_procedure_only=True)}
    other = {
        (item.StudyInstanceUID, series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in sr.PertinentOtherEvidenceSequence
        for series in item.ReferencedSeriesSequence
    }
    assert other == {(s.study_uid, s.sop_instance_uid) for s in study.result.similar}
    evaluations = sr.ContentSequence[-1]
    assert evaluations.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    assert _texts(evaluations, "Comment") == [template.disclaimer]
    assert len(_texts(evaluations, "Similar previously diagnosed study")) == len(study.result.similar)


def test_uids_are_fixed_by_study_generation_and_class(built) -> None:
    _, study, sources, template = built
    first = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0")
    again = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0")
    other_class = build_sr(study.result, template, sources, ComprehensiveSRStorage, "0.1.0")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert other_class.SOPInstanceUID != first.SOPInstanceUID
    assert other_class.SeriesInstanceUID == first.SeriesInstanceUID


def test_reanalysis_references_the_earlier_version(built) -> None:
    settings, study, sources, template = built
    first = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0")
    result2, _ = analyse(settings, study.uid, study.paths, generation=2, skip=[3])
    second = build_sr(result2, template, sources, Comprehensive3DSRStorage, "0.1.0", predecessors=[first])
    assert second.SOPInstanceUID != first.SOPInstanceUID
    (item,) = second.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == study.uid
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_unknown_class_or_sop_class_is_refused_clearly(built) -> None:
    _, study, sources, template = built
    with pytest.raises(ValueError, match="not an SR SOP class"):
        build_sr(study.result, template, sources, "1.2.840.10008.5.1.4.1.1.88.11", "0.1.0")
    frames = study.result.images[0].frames
    odd = frames[0].model_copy(update={"probabilities": {"cyst": 1.0}, "predicted": "cyst"})
    image = study.result.images[0].model_copy(update={"frames": [odd]})
    result = study.result.model_copy(update={"images": [image, *study.result.images[1:]]})
    with pytest.raises(TemplateError, match="classes.cyst"):
        build_sr(result, template, sources, Comprehensive3DSRStorage, "0.1.0")


def test_a_study_with_nothing_analysed_still_says_so(settings: Settings, ledger: Ledger, tmp_path: Path) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], skip=[0], n_similar=0)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths]
    path = _write(
        build_sr(study.result, load_template(DEFAULT_TEMPLATE), sources, Comprehensive3DSRStorage, "0.1.0"),
        tmp_path / "sr.dcm",
    )
    assert dciodvfy_errors(path) == []
    (summary,) = hd.sr.srread(path).content.get_image_measurement_groups()
    assert summary.get_measurements() == []
    assert summary.get_qualitative_evaluations() == []
