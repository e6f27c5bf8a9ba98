"""The heatmap overlay (Segmentation) and the key-image flag (Key Object Selection),
from real ultrasound files: dciodvfy finds no error, the gate passes them, and they
hold and reference what they should."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from service.common.colour import jet
from service.ledger import Ledger
from service.reports import Placement
from service.reports.heatmaps import BAND_LEVELS, bands, load_heat
from service.reports.kos import build_kos, key_images
from service.reports.seg import IDENTITY_ORIENTATION, build_heatmap_seg, pixel_spacing, seg_skip_reason
from service.reports.sr import decisive_frame
from service.reports.validation import check_object
from service.results import ImageResult
from service.settings import load_settings
from tests.support.reports import Study, analysed_study, data_file, dciodvfy_errors, default_template


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("seg") / "data", durability="none")
    files = ["US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_ybr_color.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"]
    return analysed_study(settings, Ledger(settings.ledger_path, durable=False), files=files)


def _placement(number: int = 1) -> Placement:
    return Placement(generate_uid(), generate_uid(), number, ["sonocase test"])


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _header(study: Study, index: int) -> pydicom.Dataset:
    return pydicom.dcmread(study.paths[index], stop_before_pixels=True)


def test_pixel_spacing_comes_from_the_calibrated_bmode_region() -> None:
    ds = pydicom.dcmread(data_file("OBXXXX1A.dcm"), stop_before_pixels=True)
    delta = float(ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX)  # cm per pixel, both directions
    assert pixel_spacing(ds) == pytest.approx((10 * delta, 10 * delta))
    assert pixel_spacing(pydicom.dcmread(data_file("US1_UNCR.dcm"), stop_before_pixels=True)) is None
    ds.PixelSpacing = [0.2, 0.3]
    assert pixel_spacing(ds) == pytest.approx((0.2, 0.3))


@pytest.mark.parametrize(("index", "reason"), [(0, "not calibrated"), (2, "a cine loop")])
def test_images_without_an_overlay_say_why(study: Study, index: int, reason: str) -> None:
    image = study.result.images[index]
    heat = load_heat(decisive_frame(image))
    assert reason in seg_skip_reason(_header(study, index), heat)
    with pytest.raises(ValueError, match=reason):
        build_heatmap_seg(study.result, default_template(), image, _header(study, index), heat, _placement())
    assert seg_skip_reason(_header(study, 1), np.zeros_like(heat)) == "the heatmap is empty"


@pytest.mark.integration
@pytest.mark.parametrize("index", [1, 3], ids=["palette", "monochrome"])
def test_overlay_holds_the_heatmap_levels_on_the_source_grid(study: Study, tmp_path: Path, index: int) -> None:
    template = default_template()
    image: ImageResult = study.result.images[index]
    source = _header(study, index)
    frame = decisive_frame(image)
    heat = load_heat(frame)
    seg = build_heatmap_seg(study.result, template, image, source, heat, _placement(index))
    path = _save(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    back = check_object(path.read_bytes(), template.disclaimer)
    assert (back.Modality, back.SegmentationType, back.Rows, back.Columns) == (
        "SEG",
        "BINARY",
        source.Rows,
        source.Columns,
    )
    assert (back.StudyInstanceUID, back.PatientID) == (study.uid, source.PatientID)
    assert back.SeriesDescription == template.seg_series.description
    shared = back.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(pixel_spacing(source))
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == IDENTITY_ORIENTATION
    # One segment per level, coloured as on the heatmap SC, each frame from the source.
    assert [s.SegmentLabel for s in back.SegmentSequence] == [
        f"Grad-CAM {low:.0%} to {high:.0%} of peak"
        for low, high in zip(BAND_LEVELS, (*BAND_LEVELS[1:], 1.0), strict=True)
    ]
    expected = bands(heat, frame.crop, source.Rows, source.Columns)
    pixels = back.pixel_array.reshape(-1, source.Rows, source.Columns)
    for item, mask in zip(back.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert np.array_equal(mask.astype(bool), expected == number)
        assert mask.any()
    mids = [(low + high) / 2 for low, high in zip(BAND_LEVELS, (*BAND_LEVELS[1:], 1.0), strict=True)]
    for segment, mid in zip(back.SegmentSequence, mids, strict=True):
        colour = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.array(colour) - jet(np.array(mid)).astype(int)).max() <= 2


def test_key_images_are_the_deciding_one_and_every_malignant_one(study: Study) -> None:
    result = study.result
    flagged = key_images(result)
    assert result.summary.decisive_sop_instance_uid in flagged
    assert set(flagged) - {result.summary.decisive_sop_instance_uid} == {
        i.sop_instance_uid for i in result.images if i.predicted == "malignant"
    } - {result.summary.decisive_sop_instance_uid}
    assert flagged == [i.sop_instance_uid for i in result.images if i.sop_instance_uid in flagged]


@pytest.mark.integration
def test_key_image_flag_names_the_images_and_the_sr(study: Study, tmp_path: Path) -> None:
    template = default_template()
    sources = [_header(study, n) for n in range(len(study.paths))]
    sr = pydicom.Dataset()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = study.uid, generate_uid()
    sr.SOPClassUID, sr.SOPInstanceUID = ComprehensiveSRStorage, generate_uid()
    kos = build_kos(study.result, template, sources, sr, _placement())
    path = _save(kos, tmp_path / "kos.dcm")
    assert dciodvfy_errors(path) == []
    back = check_object(path.read_bytes(), template.disclaimer)
    assert (back.Modality, back.SeriesNumber) == ("KO", template.kos_series.number)
    assert back.ConceptNameCodeSequence[0].CodeValue == template.concepts.key_images_title.value
    references = [i for i in back.ContentSequence if i.ValueType in ("IMAGE", "COMPOSITE")]
    referenced = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in references]
    assert referenced == [*key_images(study.result), sr.SOPInstanceUID]
    assert not [i for i in references if "ConceptNameCodeSequence" in i]  # TID 2010: no Purpose of Reference
    (text,) = [
        i.TextValue
        for i in back.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == "Key Object Description"
    ]
    numbers = [str(n + 1) for n, i in enumerate(study.result.images) if i.sop_instance_uid in referenced]
    assert text.startswith(f"Most suspicious image(s) by the AI: {', '.join(numbers)}.")
    assert template.disclaimer in text
