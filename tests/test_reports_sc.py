"""Grad-CAM and similar-cases Secondary Captures from real ultrasound files: the
pixels say what they should, the objects pass dciodvfy and the gate in both
transfer syntaxes, and they reference what they show."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from service.common.colour import _JET_LUT, jet
from service.ledger import Ledger
from service.model.imaging import ultrasound_region
from service.reports import Placement
from service.reports.heatmaps import load_heat
from service.reports.sc import (
    MAX_OPACITY,
    TRANSFER_SYNTAXES,
    annotate,
    blend_heatmap,
    build_heatmap_sc,
    build_montage_sc,
    draw_caption,
    draw_furniture,
    frame_gray,
    frame_rgb,
    heatmap_caption,
    reference_picture,
)
from service.reports.sr import decisive_frame
from service.reports.validation import check_object
from service.settings import Settings, load_settings
from tests.support.reports import (
    Study,
    analysed_study,
    data_file,
    dciodvfy_errors,
    default_template,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("sc") / "data", durability="none")
    return analysed_study(settings, Ledger(settings.ledger_path, durable=False))


def _save(sc: pydicom.Dataset, path: Path) -> Path:
    sc.save_as(path, enforce_file_format=True)
    return path


def test_jet_runs_from_dark_blue_to_dark_red() -> None:
    assert jet(np.array([0.0, 1.0])).tolist() == [[0, 0, 128], [128, 0, 0]]
    assert jet(np.array([-1.0, 2.0])).tolist() == [[0, 0, 128], [128, 0, 0]]


def test_heat_is_blended_only_inside_the_crop_in_proportion() -> None:
    rgb = np.full((40, 60, 3), 100, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[5, 7] = 1.0
    out = blend_heatmap(rgb, heat, (10, 12, 40, 32))
    changed = np.argwhere(np.any(out != rgb, axis=2))
    assert changed.tolist() == [[12 + 5, 10 + 7]]  # cold pixels and everything outside: untouched
    expected = np.rint(100 * (1 - MAX_OPACITY) + jet(np.array([1.0]))[0] * MAX_OPACITY)
    assert out[17, 17].tolist() == expected.tolist()


def test_blending_is_the_formula_pixel_for_pixel() -> None:
    """The in-place blend and the colour map's take() give the pixels of the plain
    formula: rint(image x (1 - alpha) + LUT[rint(heat x 1023)] x alpha)."""
    rng = np.random.default_rng(5)
    for n in range(12):
        height, width = (int(v) for v in rng.integers(20, 200, 2))
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        crop = (width // 7, height // 9, width - width // 5, height - n)
        heat = rng.random((crop[3] - crop[1], crop[2] - crop[0])) * 1.4 - 0.2
        heat = heat.astype(np.float32 if n % 2 else np.float64)
        clipped = np.clip(heat.astype(np.float32), 0.0, 1.0)
        colour = _JET_LUT[np.rint(np.clip(clipped, 0.0, 1.0) * 1023).astype(np.intp)]
        alpha = (MAX_OPACITY * clipped)[:, :, None]
        expected = rgb.copy()
        region = expected[crop[1] : crop[3], crop[0] : crop[2]].astype(np.float32)
        expected[crop[1] : crop[3], crop[0] : crop[2]] = np.rint(region * (1 - alpha) + colour * alpha).astype(np.uint8)
        assert np.array_equal(blend_heatmap(rgb, heat, crop), expected)
        assert np.array_equal(jet(heat), _JET_LUT[np.rint(np.clip(heat, 0.0, 1.0) * 1023).astype(np.intp)])


@pytest.mark.parametrize("legend", ["Grad-CAM", None])
@pytest.mark.parametrize("size", [(304, 340), (600, 800), (64, 64), (120, 900), (900, 120), (30, 200)])
def test_the_drawn_once_disclaimer_and_legend_lay_the_pixels_drawing_gives(
    size: tuple[int, int], legend: str | None
) -> None:
    height, width = size
    rgb = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    caption = "Malignant (BI-RADS 4C), probability 0.87 " * (1 + height % 3)
    drawn = Image.fromarray(rgb)
    draw_caption(drawn, caption)
    draw_furniture(drawn, default_template().disclaimer, legend)
    for _ in range(2):  # drawn once, then laid from memory
        assert np.array_equal(annotate(rgb, caption, default_template().disclaimer, legend), np.asarray(drawn))


def test_a_heatmap_of_another_size_is_resized_and_a_bad_crop_refused() -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    out = blend_heatmap(rgb, np.ones((5, 5), np.float32), (0, 0, 60, 40))
    assert np.all(out[:, :, 0] == 64)  # every pixel got half of jet(1) = (128, 0, 0)
    with pytest.raises(ValueError, match="outside the 60x40 image"):
        blend_heatmap(rgb, np.ones((5, 5), np.float32), (0, 0, 61, 40))


def test_frame_rgb_is_the_models_grayscale_and_checks_the_frame() -> None:
    ds = pydicom.dcmread(data_file("examples_ybr_color.dcm"))
    rgb = frame_rgb(ds, 30)
    assert rgb.shape == (ds.Rows, ds.Columns, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
    with pytest.raises(ValueError, match="has 30 frame"):
        frame_rgb(ds, 31)


@pytest.mark.integration
@pytest.mark.parametrize("transfer_syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("index", range(4), ids=["rgb", "palette", "cine", "monochrome"])
def test_heatmap_capture_of_each_kind_of_image(
    study: Study,
    tmp_path: Path,
    index: int,
    transfer_syntax: str,
) -> None:
    template = default_template()
    image = study.result.images[index]
    source = pydicom.dcmread(study.paths[index])
    frame = decisive_frame(image)
    heat = load_heat(frame)
    sc = build_heatmap_sc(
        study.result,
        template,
        image,
        source,
        frame_gray(source, frame.frame_number),
        heat,
        Placement(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), index + 1, ["sonocase test"]),
        transfer_syntax,
    )
    path = _save(sc, tmp_path / "sc.dcm")
    assert dciodvfy_errors(path) == []
    back = check_object(path.read_bytes(), template.disclaimer)
    assert (back.Rows, back.Columns) == (source.Rows, source.Columns)
    assert back.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[transfer_syntax][0]
    assert (back.BurnedInAnnotation, back.StudyInstanceUID, back.PatientID) == ("YES", study.uid, source.PatientID)
    (ref,) = back.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.get("ReferencedFrameNumber") == (frame.frame_number if index == 2 else None)
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # The hottest pixel of the heatmap is reddened; the caption band is drawn.
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    x0, y0 = frame.crop[:2]
    pixels = back.pixel_array  # pydicom decodes JPEG's YBR to RGB
    red, _, blue = (int(v) for v in pixels[y0 + y, x0 + x])
    assert red > blue + 40
    band = pixels[:12]
    assert np.median(band) < 10 and band.max() > 200  # white caption text on a black band


@pytest.mark.integration
def test_montage_references_the_similar_instances_and_survives_missing_ones(
    study: Study,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    template = default_template()
    decisive_uid = study.result.summary.decisive_sop_instance_uid
    index = next(n for n, i in enumerate(study.result.images) if i.sop_instance_uid == decisive_uid)
    query = pydicom.dcmread(study.paths[index])
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"not DICOM")
    similar = study.result.similar
    references = {
        similar[0].sop_instance_uid: study.reference_images[similar[0].sop_instance_uid],
        similar[1].sop_instance_uid: damaged,
    }  # similar[2]: not stored at all
    with caplog.at_level(logging.WARNING):
        sc = build_montage_sc(
            study.result,
            template,
            query,
            frame_gray(query, decisive_frame(study.result.images[index]).frame_number),
            study.result.images[index],
            references.get,
            Placement(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 9, ["sonocase test"]),
            "explicit-little-endian",
        )
    assert "damaged.dcm cannot be drawn" in caplog.text
    path = _save(sc, tmp_path / "montage.dcm")
    assert dciodvfy_errors(path) == []
    back = check_object(path.read_bytes(), template.disclaimer)
    sources = [item.ReferencedSOPInstanceUID for item in back.SourceImageSequence]
    assert sources == [query.SOPInstanceUID, *(s.sop_instance_uid for s in similar)]
    other = {
        item.StudyInstanceUID: item.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        for item in back.StudiesContainingOtherReferencedInstancesSequence
    }
    assert other == {s.study_uid: s.sop_instance_uid for s in similar}
    assert back.BurnedInAnnotation == "YES" and back.Columns % 2 == 0 and back.Rows % 2 == 0


def test_reference_pictures_are_cut_to_their_bmode_region() -> None:
    """The text bands where scanners burn in names stay out of the montage."""
    path = data_file("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    x0, y0, x1, y1 = ultrasound_region(ds)
    assert (y1 - y0, x1 - x0) != (ds.Rows, ds.Columns)
    assert reference_picture(path).shape == (y1 - y0, x1 - x0, 3)


@pytest.mark.integration
def test_an_image_outside_the_training_domain_gets_not_assessed_and_no_heatmap(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    template = default_template()
    study = analysed_study(settings, ledger, files=["US1_UNCR.dcm"], ood_images=[0], n_similar=0)
    image, source = study.result.images[0], pydicom.dcmread(study.paths[0])
    frame = decisive_frame(image)
    caption = heatmap_caption(template, image, frame)
    assert caption == "AI: not assessed, outside the model's training domain (score 0.400 > threshold 0.300)"
    assert "%" not in caption and not any(c.display in caption for c in template.classes.values())
    gray = frame_gray(source, frame.frame_number)
    sc = build_heatmap_sc(
        study.result,
        template,
        image,
        source,
        gray,
        load_heat(frame),
        Placement(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 1, ["sonocase test"]),
        "explicit-little-endian",
    )
    path = _save(sc, tmp_path / "sc.dcm")
    assert dciodvfy_errors(path) == []
    back = check_object(path.read_bytes(), template.disclaimer)
    assert "not assessed" in back.DerivationDescription and "Grad-CAM" not in back.DerivationDescription
    pixels = back.pixel_array
    band = pixels[:12]
    assert np.median(band) < 10 and band.max() > 200  # the caption is burned in
    # Between the caption and the disclaimer the frame is as the model saw it: no
    # heatmap colour, no legend.
    x0, y0, x1, y1 = frame.crop
    middle = slice(max(y0, 40), min(y1, back.Rows - 60))
    assert np.array_equal(pixels[middle, x0:x1], np.repeat(gray[middle, x0:x1, None], 3, axis=2))
