"""The lesion in the SR (issue 20): a model that outlines lesions gets each lesion drawn
as its frame's region, measured (area, long and short axis in mm with their line
segments); a frame called normal or without a lesion above the threshold gets no
region and is said to have none; an image without calibration gets its outline and
the reason it has no millimetres; the study carries the AI-suggested BI-RADS band.
Also the pieces the worker uses: the lesion map cut and measured on its image, the
model's segmentation detected, the BI-RADS bands' edges."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from service.datasets.synthetic import synthetic_study
from service.ledger import Ledger
from service.model.imaging import ultrasound_region
from service.pipeline.analysis import lesion_maps
from service.pipeline.measurement import frame_lesion
from service.reports.birads import BANDS, NEGATIVE, likelihood_band
from service.reports.heatmaps import load_heats
from service.reports.sr import OHIF_BIDIRECTIONAL, OHIF_CONTOUR, build_sr
from service.results import StudyResult
from service.settings import load_settings
from tests.support.reports import (
    CHOSEN,
    LESION_THRESHOLD,
    analyse,
    default_template,
    gaussian_heatmap,
    located_numbers,
    measurement_groups,
    store_datasets,
    store_study,
    tracking_identifier,
)


def _study(
    tmp_path: Path, datasets: list[pydicom.Dataset] | None = None, files: list[str] | None = None, **judged: object
) -> tuple[StudyResult, list[pydicom.Dataset], hd.sr.Comprehensive3DSR]:
    settings = load_settings(data_dir=tmp_path / "data", durability="none")
    ledger = Ledger(settings.ledger_path, durable=False)
    study_uid, paths = (
        store_datasets(settings, ledger, datasets)
        if datasets is not None
        else store_study(settings, ledger, files or [])
    )
    result, _ = analyse(settings, study_uid, paths, n_similar=0, **judged)  # type: ignore[arg-type]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    sr = build_sr(result, default_template(), sources, Comprehensive3DSRStorage, "0.1.0", load_heats(result))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return result, sources, hd.sr.srread(path)


def _lines(sr: pydicom.Dataset, meaning: str) -> list[str]:
    return [
        i.TextValue
        for i in sr.ContentSequence[-1].ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def test_a_lesion_is_drawn_and_measured_in_millimetres(tmp_path: Path) -> None:
    result, sources, sr = _study(
        tmp_path, synthetic_study(1, "malignant", variant="mono"), classes=["malignant"], lesion_peak=1.0
    )
    (frame,) = result.images[0].frames
    lesion = frame.lesion
    assert lesion is not None and lesion.long_axis and lesion.short_axis and lesion.area_mm2
    axes, contour = measurement_groups(sr)  # one lesion, one Tracking UID: OHIF labels them once
    uids = {
        i.UID for g in (axes, contour) for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040"
    }
    assert len(uids) == 1
    # the contour: OHIF's freehand ROI, the lesion's outline (not the heatmap's) carried by its area
    assert tracking_identifier(contour) == OHIF_CONTOUR
    ((area, outline),) = located_numbers(contour)
    np.testing.assert_allclose(np.reshape(outline.GraphicData, (-1, 2)), np.asarray(lesion.outline), atol=1e-3)
    assert area.ConceptNameCodeSequence[0].CodeValue == "42798000"
    assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(lesion.area_mm2, rel=1e-6)
    assert area.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"
    # the axes: OHIF's bidirectional tool, which finds them by their code meanings
    assert tracking_identifier(axes) == OHIF_BIDIRECTIONAL
    found = located_numbers(axes)
    assert [n.ConceptNameCodeSequence[0].CodeMeaning for n, _ in found] == ["Long Axis", "Short Axis"]
    for (number, segment), code, axis in zip(
        found, ("103339001", "103340004"), (lesion.long_axis, lesion.short_axis), strict=True
    ):
        name, value = number.ConceptNameCodeSequence[0], number.MeasuredValueSequence[0]
        assert (name.CodeValue, name.CodingSchemeDesignator) == (code, "SCT")
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
        assert float(value.NumericValue) == pytest.approx(axis.length_mm)
        np.testing.assert_allclose(np.reshape(segment.GraphicData, (-1, 2)), [axis.start, axis.end], atol=1e-3)
        assert segment.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    for group in (contour, axes):
        (finding,) = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071"]
        assert finding.ConceptCodeSequence[0].CodeMeaning == "Malignant neoplasm of breast"
    # the lesion's label in OHIF's measurement panel: on the row with its axes (one per lesion)
    labels = [
        [
            i.TextValue
            for i in group.ContentSequence
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
        ]
        for group in (axes, contour)
    ]
    assert labels == [[f"Image 1 frame 1: Malignant {frame.probabilities['malignant']:.0%}, AI BI-RADS 4C"], []]
    # The lesion map is a blob cut at half its peak, resized from the model's 64 x 64 onto
    # the analysed region: an ellipse whose axes the image's calibration turns into mm.
    x0, y0, x1, y1 = frame.crop
    radius = 0.2 * 64 * math.sqrt(2 * math.log(2)) / 64  # of the map's side
    region = ultrasound_region(sources[0])
    assert region is not None
    mm = 10 * sources[0].SequenceOfUltrasoundRegions[0].PhysicalDeltaX
    semi = sorted([radius * (x1 - x0) * mm, radius * (y1 - y0) * mm])
    assert lesion.long_axis.length_mm == pytest.approx(2 * semi[1], rel=0.05)
    assert lesion.short_axis.length_mm == pytest.approx(2 * semi[0], rel=0.05)
    assert lesion.area_mm2 == pytest.approx(math.pi * semi[0] * semi[1], rel=0.05)


def test_a_normal_frame_has_no_outline_and_is_said_to_have_no_lesion(tmp_path: Path) -> None:
    result, sources, sr = _study(
        tmp_path, synthetic_study(2, "malignant", variant="mono"), classes=["malignant", "normal"], lesion_peak=1.0
    )
    drawn = {
        scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in measurement_groups(sr)
        for _, scoord in located_numbers(group)
    }
    assert drawn == {sources[0].SOPInstanceUID}
    assert result.images[1].frames[0].lesion is None
    assert all(located_numbers(g) for g in measurement_groups(sr))  # OHIF draws none of a report mixing both
    assert _lines(sr, "Comment")[1:] == ["Image 2 frame 1: Normal 97%, no lesion outlined"]


@pytest.mark.parametrize(("classes", "peak"), [(["normal"], 1.0), (["malignant"], 0.3)])
def test_with_nothing_to_outline_each_frame_is_a_group_without_region(
    tmp_path: Path, classes: list[str], peak: float
) -> None:
    """Called normal, or a finding without a lesion above the threshold: a TID 1501
    group per frame, referencing its image, saying no lesion is outlined."""
    result, sources, sr = _study(
        tmp_path, synthetic_study(1, classes[0], variant="mono"), classes=classes, lesion_peak=peak
    )
    assert result.images[0].frames[0].lesion is None
    assert result.images[0].frames[0].lesion_threshold == LESION_THRESHOLD
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier.endswith("no lesion outlined")
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [sources[0].SOPInstanceUID]
    assert not located_numbers(measurement_groups(sr)[0])


def test_without_calibration_the_outline_stays_and_the_report_says_why(tmp_path: Path) -> None:
    """US1_UNCR.dcm has no Sequence of Ultrasound Regions and no Pixel Spacing."""
    result, _, sr = _study(tmp_path, files=["US1_UNCR.dcm"], classes=["benign"], lesion_peak=1.0)
    lesion = result.images[0].frames[0].lesion
    assert lesion is not None and lesion.long_axis is None and lesion.area_mm2 is None
    (group,) = measurement_groups(sr)  # the outline, no axes
    ((first, outline),) = located_numbers(group)  # the predicted class's probability carries it: no area
    assert first.ConceptNameCodeSequence[0].CodeValue == "PBENIGN"
    np.testing.assert_allclose(np.reshape(outline.GraphicData, (-1, 2)), np.asarray(lesion.outline), atol=1e-3)
    numbers = [i.ConceptNameCodeSequence[0].CodeValue for i in group.ContentSequence if i.ValueType == "NUM"]
    assert numbers == ["PBENIGN", "PNORMAL", "111047"]
    assert _lines(sr, "Comment")[1:] == [f"Image 1 frame 1: lesion outlined, not measured: {lesion.unmeasured}"]
    assert "no calibration" in lesion.unmeasured  # type: ignore[operator]


@pytest.mark.parametrize(
    ("label", "category", "code"),
    [
        ("malignant", "4C", ("MA.II.A.5.4C", "BI")),
        ("benign", "4A", ("MA.II.A.5.4A", "BI")),
        ("normal", "1", ("397140005", "SCT")),
    ],
)
def test_the_study_carries_the_ai_suggested_birads_band(
    tmp_path: Path, label: str, category: str, code: tuple[str, str]
) -> None:
    _, _, sr = _study(tmp_path, synthetic_study(1, label, variant="mono"), classes=[label], lesion_peak=1.0)
    template = default_template()
    (band,) = [
        i
        for i in sr.ContentSequence[-1].ContentSequence
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == template.concepts.birads_band.value
    ]
    assert (band.ConceptCodeSequence[0].CodeValue, band.ConceptCodeSequence[0].CodingSchemeDesignator) == code
    (line,) = _lines(sr, template.concepts.birads_band.meaning)
    assert line.startswith(f"AI suggestion, not the radiologist's assessment: BI-RADS {category} likelihood band")
    assert f"probability of malignancy {CHOSEN[label]['malignant']:.0%}" in line


def test_the_worker_cuts_the_lesion_map_on_its_analysed_region() -> None:
    (ds,) = synthetic_study(1, "benign", variant="mono")
    region = ultrasound_region(ds)
    assert region is not None
    lesion_map = gaussian_heatmap(32, 32, (0.5, 0.5))
    found = frame_lesion(lesion_map, region, 0.5, ds)
    assert found is not None and found.long_axis is not None
    xs, ys = zip(*found.outline, strict=True)
    # the blob's peak is map pixel (16, 16), whose centre the resize puts at 16.5 / 32 of the region
    cx, cy = (region[0] + 16.5 / 32 * (region[2] - region[0]), region[1] + 16.5 / 32 * (region[3] - region[1]))
    assert np.mean(xs) == pytest.approx(cx, abs=1.0) and np.mean(ys) == pytest.approx(cy, abs=1.0)
    assert frame_lesion(0.4 * lesion_map, region, 0.5, ds) is None  # nothing reaches the threshold


def test_the_worker_outlines_lesions_only_for_a_model_that_gives_them() -> None:
    maps = np.zeros((2, 8, 8), np.float32)
    card = SimpleNamespace(segmentation=SimpleNamespace(threshold=0.4))
    with_maps = SimpleNamespace(lesion_mask=maps)
    found = lesion_maps(card, with_maps)  # type: ignore[arg-type]
    assert found is not None and found[0] is maps and found[1] == pytest.approx(0.4)
    assert lesion_maps(SimpleNamespace(), with_maps) is None  # type: ignore[arg-type]
    assert lesion_maps(card, SimpleNamespace()) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("p", "predicted", "category"),
    [
        (0.0, "normal", "1"),
        (0.02, "normal", "1"),
        (0.0201, "normal", "4A"),
        (0.0, "benign", "3"),
        (0.02, "benign", "3"),
        (0.021, "benign", "4A"),
        (0.10, "benign", "4A"),
        (0.11, "benign", "4B"),
        (0.50, "malignant", "4B"),
        (0.51, "malignant", "4C"),
        (0.949, "malignant", "4C"),
        (0.95, "malignant", "5"),
        (1.0, "malignant", "5"),
    ],
)
def test_birads_bands_follow_the_acr_likelihoods(p: float, predicted: str, category: str) -> None:
    assert likelihood_band(p, predicted).category == category


def test_a_probability_outside_0_1_has_no_band() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        likelihood_band(1.2, "benign")
    assert [b.category for b in BANDS] == ["3", "4A", "4B", "4C", "5"] and NEGATIVE.category == "1"
