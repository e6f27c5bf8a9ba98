"""The TID 1500 SR, built from a study of real ultrasound files (RGB, palette, a
30-frame JPEG cine, JPEG-lossless monochrome; one skipped, one outside the model's
training domain): DCMTK renders it, dciodvfy finds no error, highdicom reads back
what was computed, every measurement group carries the coordinates OHIF reads to
draw it and list it as one of its tools (a frame called normal has none: the
Qualitative Evaluations say so), and the image outside the training domain is "not
assessed": no class, probability or region, its score against the threshold
instead. The model here outlines no lesion:
a frame with a finding is outlined by its heatmap (tests/test_reports_lesion.py has
the lesions)."""

from __future__ import annotations

from html import unescape
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from service.ledger import Ledger
from service.reports.birads import frame_band
from service.reports.heatmaps import OUTLINE_LEVEL, load_heats
from service.reports.sr import (
    OHIF_CONTOUR,
    SR_CLASSES,
    Heats,
    assessed_frames,
    build_sr,
    decisive_frame,
    reading_order,
)
from service.reports.template import SrTemplate, TemplateError, load_template
from service.reports.validation import check_object
from service.results import NO_LESION, FrameResult, ImageResult
from service.settings import Settings, load_settings
from tests.support.reports import (
    DEFAULT_TEMPLATE,
    Study,
    analyse,
    analysed_study,
    dciodvfy_errors,
    dsr2html,
    located_numbers,
    measurement_groups,
    tracking_identifier,
)

Built = tuple[Settings, Study, list[pydicom.Dataset], SrTemplate, Heats]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("sr") / "data", durability="none")
    study = analysed_study(settings, Ledger(settings.ledger_path, durable=False), skip=[3], ood_images=[1])
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths]
    return settings, study, sources, load_template(DEFAULT_TEMPLATE), load_heats(study.result)


def _texts(item: pydicom.Dataset, meaning: str) -> list[str]:
    """TEXT values of the children of ``item`` with concept name ``meaning``."""
    return [
        child.TextValue
        for child in item.ContentSequence
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def _not_assessed(container: pydicom.Dataset, template: SrTemplate) -> list[pydicom.Dataset]:
    """The container's "Impression: Not Evaluated" statements."""
    return [
        i
        for i in container.ContentSequence
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeValue == template.concepts.not_assessed.value
    ]


def _items(items: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Every content item under ``items``, depth first."""
    return [found for item in items for found in (item, *_items(item.get("ContentSequence", [])))]


def _drawn(study: Study) -> list[tuple[ImageResult, FrameResult]]:
    """The frames the SR outlines, in its order: those of a finding (not normal)."""
    return [
        (image, frame)
        for image in reading_order(study.result)
        for frame in assessed_frames(image)
        if frame.predicted != NO_LESION
    ]


def _write(sr: hd.sr.Comprehensive3DSR, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def _heatmap_objects(study: Study) -> dict[str, list[Dataset]]:
    """References to a heatmap SC for every analysed image and a SEG for the first."""
    objects: dict[str, list[Dataset]] = {}
    for n, image in enumerate(i for i in study.result.images if i.frames):
        refs = []
        for sop_class in [SecondaryCaptureImageStorage] + ([SegmentationStorage] if n == 0 else []):
            ref = Dataset()
            ref.StudyInstanceUID, ref.SeriesInstanceUID = study.uid, generate_uid()
            ref.SOPClassUID, ref.SOPInstanceUID = sop_class, generate_uid()
            refs.append(ref)
        objects[image.sop_instance_uid] = refs
    return objects


def _heat_at(heat: np.ndarray, crop: tuple[int, int, int, int], x: float, y: float) -> float:
    """Bilinear heat at DICOM image coordinates (pixel centres at +0.5)."""
    col = min(max(x - crop[0] - 0.5, 0.0), heat.shape[1] - 1.0)
    row = min(max(y - crop[1] - 0.5, 0.0), heat.shape[0] - 1.0)
    c0, r0 = int(col), int(row)
    c1, r1 = min(c0 + 1, heat.shape[1] - 1), min(r0 + 1, heat.shape[0] - 1)
    fc, fr = col - c0, row - r0
    top = heat[r0, c0] * (1 - fc) + heat[r0, c1] * fc
    bottom = heat[r1, c0] * (1 - fc) + heat[r1, c1] * fc
    return float(top * (1 - fr) + bottom * fr)


@pytest.mark.integration
@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_dcmtk_renders_it_and_dciodvfy_finds_no_error(built: Built, tmp_path: Path, sop_class: str) -> None:
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, sop_class, "0.1.0", heats, _heatmap_objects(study))
    path = _write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    html = dsr2html(path, tmp_path / "sr.html")
    assert "UNVERIFIED" in html
    assert "Imaging Measurement Report" in html
    for similar in study.result.similar:
        assert f"accession {similar.accession_number}" in html
    assert "was not analysed: mostly blank" in html
    assert "decided by image" in html
    assert template.disclaimer in html


@pytest.mark.heavy
def test_every_frame_of_a_finding_is_a_contour_on_its_image_with_its_numbers(built: Built, tmp_path: Path) -> None:
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats)
    content = hd.sr.srread(_write(sr, tmp_path / "sr.dcm")).content
    assert content.get_planar_roi_measurement_groups() == []  # TID 1501 only: OHIF reads coordinates from the NUMs
    groups = measurement_groups(sr)
    frames = _drawn(study)
    assert frames and len(groups) == len(frames)  # no lesion outlined by this model: no axes

    multi_frame = {ds.SOPInstanceUID for ds in sources if int(ds.get("NumberOfFrames") or 1) > 1}
    for group, parsed, (image, frame) in zip(groups, content.get_image_measurement_groups(), frames, strict=True):
        assert tracking_identifier(group) == OHIF_CONTOUR
        # The probabilities in percent, the predicted class first, which carries the outline.
        ((first, scoord),) = located_numbers(group)
        assert first.ConceptNameCodeSequence[0].CodeMeaning == template.classes[frame.predicted].probability.meaning
        assert scoord.GraphicType == "POLYLINE"
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == image.sop_instance_uid
        assert ref.get("ReferencedFrameNumber") == (
            frame.frame_number if image.sop_instance_uid in multi_frame else None
        )
        measurements = parsed.get_measurements()
        numbers = {m.name.meaning: m.value for m in measurements}
        for label, probability in frame.probabilities.items():
            assert numbers[template.classes[label].probability.meaning] == pytest.approx(100 * probability, abs=1e-6)
        assert all(m.unit.value == "%" for m in measurements)
        assert parsed.finding_type.value == template.classes[frame.predicted].finding.value
        assert _texts(group, "Algorithm Name") == [study.result.model.name]
        instance = next(k for k, i in enumerate(study.result.images) if i is image) + 1
        band = frame_band(frame.probabilities, frame.predicted)
        assert band is not None
        assert _texts(group, "Comment") == [  # OHIF's label of the measurement
            f"Image {instance} frame {frame.frame_number}: {template.classes[frame.predicted].display} "
            f"{frame.probabilities[frame.predicted]:.0%}, AI BI-RADS {band.category}"
        ]


@pytest.mark.heavy
def test_each_region_is_the_heatmap_outline_at_half_its_peak(built: Built, tmp_path: Path) -> None:
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats)
    for group, (image, frame) in zip(measurement_groups(sr), _drawn(study), strict=True):
        ((_, scoord),) = located_numbers(group)
        points = np.asarray(scoord.GraphicData, np.float32).reshape(-1, 2)
        heat = heats[(image.sop_instance_uid, frame.frame_number)]
        x0, y0, x1, y1 = frame.crop
        assert np.array_equal(points[0], points[-1]), "a closed polyline"
        assert np.all((points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1))
        inside = [p for p in points if x0 + 1 < p[0] < x1 - 1 and y0 + 1 < p[1] < y1 - 1]
        assert inside, "the outline lies inside the analysed region"
        levels = [_heat_at(heat, frame.crop, float(x), float(y)) / float(heat.max()) for x, y in inside]
        assert np.median(levels) == pytest.approx(OUTLINE_LEVEL, abs=0.05)
        # The peak lies within the outline (even-odd rule).
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        px, py = x0 + col + 0.5, y0 + row + 0.5
        xs, ys = points[:, 0], points[:, 1]
        crossings = sum(
            1
            for (ax, ay), (bx, by) in zip(
                zip(xs, ys, strict=True), zip(np.roll(xs, -1), np.roll(ys, -1), strict=True), strict=True
            )
            if (ay > py) != (by > py) and px < ax + (py - ay) * (bx - ax) / (by - ay)
        )
        assert crossings % 2 == 1


def test_regions_are_what_ohif_reads(built: Built) -> None:
    """OHIF 3.13's Cornerstone3D adapter picks the tool by the group's tracking
    identifier, takes the first NUM's SCOORD and reads its image from the one child's
    Referenced SOP Sequence (and frame): the test follows the same path."""
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, EnhancedSRStorage, "0.1.0", heats)
    seen = []
    for group in measurement_groups(sr):
        assert tracking_identifier(group) == OHIF_CONTOUR
        first = next(item for item in group.ContentSequence if item.ValueType == "NUM")
        scoord = next(item for item in first.ContentSequence if item.ValueType == "SCOORD")
        (child,) = scoord.ContentSequence
        ref = child.ReferencedSOPSequence[0]
        seen.append((ref.ReferencedSOPInstanceUID, int(ref.get("ReferencedFrameNumber") or 1)))
        assert [i.ValueType for i in group.ContentSequence].count("UIDREF") == 1  # the tracking UID
        assert not [i for i in group.ContentSequence if i.ValueType == "SCOORD"]  # none outside the NUMs
    assert seen == [(i.sop_instance_uid, f.frame_number) for i, f in _drawn(study)]
    assert seen[0][0] == study.result.summary.decisive_sop_instance_uid  # OHIF opens the report on it


def test_the_decisive_frame_references_the_heatmap_objects(built: Built) -> None:
    _, study, sources, template, heats = built
    objects = _heatmap_objects(study)
    sr = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats, objects)
    for group, (image, frame) in zip(measurement_groups(sr), _drawn(study), strict=True):
        images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        named = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: i.ConceptNameCodeSequence[0].CodeMeaning
            for i in images
        }
        if frame.frame_number == decisive_frame(image).frame_number:
            assert named == {
                ref.SOPInstanceUID: (
                    template.concepts.heatmap_segmentation
                    if ref.SOPClassUID == SegmentationStorage
                    else template.concepts.heatmap_image
                ).meaning
                for ref in objects[image.sop_instance_uid]
            }
        else:
            assert named == {}
    evidence = {uid for _, _, uid, _ in sr.get_evidence(current_procedure_only=True)}
    assert {ref.SOPInstanceUID for refs in objects.values() for ref in refs} <= evidence


def test_study_summary_is_in_words_and_codes_without_coordinates(built: Built) -> None:
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, ComprehensiveSRStorage, "0.1.0", heats)
    evaluations = sr.ContentSequence[-1]
    assert evaluations.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    assert not [i for i in evaluations.ContentSequence if i.ValueType == "SCOORD"]
    summary = study.result.summary
    decisive = next(i for i in study.result.images if i.sop_instance_uid == summary.decisive_sop_instance_uid)
    frame = decisive_frame(decisive)
    index = next(n for n, i in enumerate(study.result.images) if i is decisive)
    (code,) = [
        i
        for i in evaluations.ContentSequence
        if i.ValueType == "CODE"
        and i.ConceptNameCodeSequence[0].CodeMeaning == "Impression"
        and i not in _not_assessed(evaluations, template)
    ]
    assert code.ConceptCodeSequence[0].CodeValue == template.classes[summary.predicted].finding.value
    assert _texts(evaluations, "Study summary") == [
        f"{template.classes[summary.predicted].display} {summary.probability:.0%}, "
        f"decided by image {index + 1} frame {frame.frame_number}"
    ]
    assert frame.probabilities[decisive.predicted] == pytest.approx(summary.probability)
    assert _texts(evaluations, "Study summary rule") == [summary.rule]
    flags = [
        i
        for i in evaluations.ContentSequence
        if i.ValueType == "CODE"
        and i.ConceptNameCodeSequence[0].CodeMeaning == template.concepts.out_of_distribution.meaning
    ]
    assert flags == [] and not summary.out_of_distribution  # one image is assessed: the study has a class


def test_document_is_a_new_unverified_series_in_the_patients_study(built: Built) -> None:
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, EnhancedSRStorage, "0.1.0", heats)
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
    assert _texts(evaluations, "Comment")[0] == template.disclaimer
    assert len(_texts(evaluations, "Similar previously diagnosed study")) == len(study.result.similar)


@pytest.mark.heavy
def test_uids_are_fixed_by_study_generation_and_class(built: Built) -> None:
    _, study, sources, template, heats = built
    first = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats)
    again = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats)
    other_class = build_sr(study.result, template, sources, ComprehensiveSRStorage, "0.1.0", heats)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert other_class.SOPInstanceUID != first.SOPInstanceUID
    assert other_class.SeriesInstanceUID == first.SeriesInstanceUID


def test_reanalysis_references_the_earlier_version(built: Built) -> None:
    settings, study, sources, template, heats = built
    first = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats)
    result2, _ = analyse(settings, study.uid, study.paths, generation=2, skip=[3])
    second = build_sr(
        result2, template, sources, Comprehensive3DSRStorage, "0.1.0", load_heats(result2), predecessors=[first]
    )
    assert second.SOPInstanceUID != first.SOPInstanceUID
    (item,) = second.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == study.uid
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_unknown_class_missing_heatmap_or_sop_class_is_refused_clearly(built: Built) -> None:
    _, study, sources, template, heats = built
    with pytest.raises(ValueError, match="not an SR SOP class"):
        build_sr(study.result, template, sources, "1.2.840.10008.5.1.4.1.1.88.11", "0.1.0", heats)
    with pytest.raises(ValueError, match="no heatmap given for frame 1"):
        build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", {})
    frames = study.result.images[0].frames
    odd = frames[0].model_copy(update={"probabilities": {"cyst": 1.0}, "predicted": "cyst"})
    image = study.result.images[0].model_copy(update={"frames": [odd]})
    result = study.result.model_copy(update={"images": [image, *study.result.images[1:]]})
    with pytest.raises(TemplateError, match=r"classes.cyst"):
        build_sr(result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats)


@pytest.mark.integration
def test_a_study_with_nothing_analysed_still_says_so(settings: Settings, ledger: Ledger, tmp_path: Path) -> None:
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], skip=[0], n_similar=0)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths]
    template = load_template(DEFAULT_TEMPLATE)
    path = _write(build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", {}), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == template.wording.no_summary
    assert group.get_measurements() == [] and group.source_images == []
    assert _texts(sr.ContentSequence[-1], "Study summary") == [template.wording.no_summary]


def test_a_frame_outside_the_training_domain_is_not_assessed_against_its_threshold(built: Built) -> None:
    """In a report where lesions are drawn, a flagged frame is a line saying why (its
    score against the threshold): a group without coordinates there would keep OHIF
    from drawing any."""
    _, study, sources, template, heats = built
    sr = build_sr(study.result, template, sources, Comprehensive3DSRStorage, "0.1.0", heats, _heatmap_objects(study))
    flagged = [
        (n, image, frame)
        for n, image in enumerate(study.result.images)
        for frame in image.frames
        if frame.out_of_distribution
    ]
    assert {image.sop_instance_uid for _, image, _ in flagged} == {study.result.images[1].sop_instance_uid}
    lines = _texts(sr.ContentSequence[-1], "Comment")
    for n, _, frame in flagged:
        assert (
            f"Image {n + 1} frame {frame.frame_number} not assessed: outside the model's training domain "
            f"(score {frame.ood_distance:.3f} > threshold {frame.ood_threshold:.3f})"
        ) in lines
    # Nothing nested in the Qualitative Evaluations (TID 1500 has no row for it)
    assert not [i for i in sr.ContentSequence[-1].ContentSequence if "ContentSequence" in i]
    # No group, region, class or probability for the flagged image anywhere else.
    named = {
        ref.ReferencedSOPInstanceUID
        for item in _items(measurement_groups(sr))
        for ref in item.get("ReferencedSOPSequence", [])
    }
    assert study.result.images[1].sop_instance_uid not in named


def test_a_cine_frame_outside_the_training_domain_neither_speaks_for_its_image_nor_gets_a_group(built: Built) -> None:
    _, study, sources, template, heats = built
    cine = study.result.images[2]
    loudest = decisive_frame(cine)
    flagged = loudest.model_copy(update={"out_of_distribution": True, "ood_distance": 0.4})
    image = cine.model_copy(update={"frames": [flagged if f is loudest else f for f in cine.frames]})
    result = study.result.model_copy(update={"images": [*study.result.images[:2], image, *study.result.images[3:]]})
    assert decisive_frame(image).frame_number != loudest.frame_number
    sr = build_sr(result, template, sources, EnhancedSRStorage, "0.1.0", heats)
    drawn = {
        (ref.ReferencedSOPInstanceUID, int(ref.get("ReferencedFrameNumber") or 1))
        for item in _items(measurement_groups(sr))
        if item.ValueType == "SCOORD"
        for ref in item.ContentSequence[0].ReferencedSOPSequence
    }
    assert (image.sop_instance_uid, loudest.frame_number) not in drawn
    assert {(image.sop_instance_uid, f.frame_number) for f in assessed_frames(image)} <= drawn
    lines = _texts(sr.ContentSequence[-1], "Comment")
    assert (
        f"Image 3 frame {loudest.frame_number} not assessed: outside the model's training domain "
        "(score 0.400 > threshold 0.300)" in lines
    )


@pytest.mark.integration
@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_a_study_all_outside_the_training_domain_says_so_first_without_probabilities(
    settings: Settings, ledger: Ledger, tmp_path: Path, sop_class: str
) -> None:
    study = analysed_study(
        settings, ledger, files=["US1_UNCR.dcm", "examples_ybr_color.dcm"], ood_images=[0, 1], n_similar=0
    )
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths]
    template = load_template(DEFAULT_TEMPLATE)
    sr = build_sr(study.result, template, sources, sop_class, "0.1.0", load_heats(study.result))
    path = _write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    check_object(path.read_bytes(), template.disclaimer)  # the gate lets it leave
    html = unescape(dsr2html(path, tmp_path / "sr.html"))
    assert html.index(template.concepts.not_assessed.meaning) < html.index(template.disclaimer)  # said first
    assert template.wording.not_assessed_summary in html
    # a group per frame (none drawn): "Not Evaluated" its Finding, the score inferred from its image and frame
    frames = [(n, image, f) for n, image in enumerate(study.result.images) for f in image.frames]
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    assert len(groups) == len(frames)
    for group, (n, image, frame) in zip(groups, frames, strict=True):
        assert group.tracking_identifier == f"Image {n + 1} frame {frame.frame_number}: not assessed"
        assert group.finding_type.value == template.concepts.not_assessed.value
        score, threshold = group.get_measurements()
        assert (score.name.meaning, score.value) == ("Domain guard score", pytest.approx(frame.ood_distance))
        assert (threshold.name.meaning, threshold.value) == ("Threshold Value", pytest.approx(frame.ood_threshold))
        (source,) = score.referenced_images
        assert source.referenced_sop_instance_uid == image.sop_instance_uid
    evaluations = sr.ContentSequence[-1]
    assert _texts(evaluations, "Study summary") == [template.wording.not_assessed_summary]
    assert len(_not_assessed(evaluations, template)) == 1  # the study's impression; each frame's is its Finding
    assert not [i for i in evaluations.ContentSequence if "ContentSequence" in i]  # flat, as TID 1500 has it
    numbers = [i for i in _items(sr.ContentSequence) if i.ValueType == "NUM"]
    assert sorted(n.ConceptNameCodeSequence[0].CodeMeaning for n in numbers) == sorted(
        ["Domain guard score", "Threshold Value"] * len(frames)
    )  # no class probability
    assert not [i for i in _items(sr.ContentSequence) if i.ValueType == "SCOORD"]  # no region
    probabilities = {c.probability.meaning for c in template.classes.values()}
    assert not any(meaning in html for meaning in probabilities)
