"""Lesion measurement: shapes of known size give their diameters in mm; the outline
sits on the mask's edge in image coordinates; the calibration comes from the region
holding the lesion, else Pixel Spacing, else no millimetres and the reason; on the
phantom's true masks the long axis is within 1 mm and 10 % of the truth (median)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.datasets.dicom_writer import Region
from service.pipeline.measurement import (
    Calibration,
    calibration,
    measure,
    measure_lesion,
    trace_outline,
)

ROOT = Path(__file__).resolve().parents[1]


def ellipse_mask(
    shape: tuple[int, int], centre: tuple[float, float], a_mm: float, b_mm: float, tilt: float, mm: tuple[float, float]
) -> np.ndarray:
    """Pixels whose centre lies inside an ellipse given in mm (semi-axes a, b, turned
    by ``tilt``), on pixels of ``mm`` = (across, down) mm."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    x, y = (cols + 0.5 - centre[0]) * mm[0], (rows + 0.5 - centre[1]) * mm[1]
    c, s = math.cos(tilt), math.sin(tilt)
    u, v = c * x + s * y, -s * x + c * y
    return (u / a_mm) ** 2 + (v / b_mm) ** 2 <= 1.0


@pytest.mark.parametrize(
    ("a_mm", "b_mm", "tilt", "mm"),
    [
        (10.0, 10.0, 0.0, (0.1, 0.1)),  # a disc: both axes its diameter
        (12.0, 5.0, 0.5, (0.1, 0.1)),  # a turned ellipse
        (8.0, 3.0, 1.2, (0.08, 0.16)),  # non-square pixels: lengths in mm, not pixels
    ],
)
def test_an_ellipse_measures_its_diameters(a_mm: float, b_mm: float, tilt: float, mm: tuple[float, float]) -> None:
    mask = ellipse_mask((400, 400), (200, 200), a_mm, b_mm, tilt, mm)
    outline = trace_outline(mask)
    assert outline is not None
    found = measure(outline, Calibration(*mm, source="test"))
    assert found.long_axis is not None and found.short_axis is not None and found.area_mm2 is not None
    pixel = max(mm)
    assert found.long_axis.length_mm == pytest.approx(2 * a_mm, abs=pixel)
    assert found.short_axis.length_mm == pytest.approx(2 * b_mm, abs=pixel)
    assert found.area_mm2 == pytest.approx(math.pi * a_mm * b_mm, rel=0.02)
    # the axes are perpendicular in mm, and the long axis runs along the ellipse's tilt
    scale = np.array(mm)
    long = (np.subtract(found.long_axis.end, found.long_axis.start)) * scale
    short = (np.subtract(found.short_axis.end, found.short_axis.start)) * scale
    assert abs(np.dot(long, short)) / (np.linalg.norm(long) * np.linalg.norm(short)) < 0.02
    if a_mm != b_mm:
        direction = long / np.linalg.norm(long)
        assert abs(direction[0] * math.sin(tilt) - direction[1] * math.cos(tilt)) < 0.02
    assert found.unmeasured is None


def test_the_outline_is_the_mask_edge_in_image_coordinates() -> None:
    """A 3 x 4 pixel block at rows 5-7, columns 10-13 of a mask placed at source pixel
    (100, 50): its outline runs halfway between inside and outside pixel centres, and
    is closed."""
    mask = np.zeros((20, 30), bool)
    mask[5:8, 10:14] = True
    outline = trace_outline(mask, origin=(100, 50))
    assert outline is not None
    assert outline.components == 1
    np.testing.assert_array_equal(outline.points[0], outline.points[-1])
    assert outline.bounds == (110.0, 55.0, 114.0, 58.0)
    # corners are cut: the farthest pair is from (110, 55.5) to (114, 57.5), edge midpoints
    found = measure(outline, Calibration(1.0, 1.0, "test"))
    assert found.long_axis is not None
    assert found.long_axis.length_mm == pytest.approx(math.sqrt(4**2 + 2**2))
    assert found.area_mm2 == pytest.approx(12 - 4 * 0.125)


def test_only_the_largest_lesion_is_measured_and_the_others_counted() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True  # small
    mask[40:80, 30:90] = True  # large, with a hole: still one lesion
    mask[55:60, 50:55] = False
    mask[90:92, 90:92] = True  # a speck
    outline = trace_outline(mask)
    assert outline is not None
    assert outline.components == 3
    assert outline.bounds == (30.0, 40.0, 90.0, 80.0)


def test_an_empty_mask_has_no_lesion() -> None:
    assert trace_outline(np.zeros((10, 10), bool)) is None
    assert measure_lesion(np.zeros((10, 10), bool), (0, 0), Dataset()) is None


def _image(*regions: Region, pixel_spacing: list[float] | None = None) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = 300, 400
    if regions:
        ds.SequenceOfUltrasoundRegions = [r.item() for r in regions]
    if pixel_spacing is not None:
        ds.PixelSpacing = pixel_spacing
    return ds


B_MODE = Region(20, 30, 219, 229, data_type=0x0001, spatial_format=0x0001, units=0x0003, delta_cm=0.02)
SECOND = Region(220, 30, 399, 229, data_type=0x0001, spatial_format=0x0001, units=0x0003, delta_cm=0.05)
COLOUR_BAR = Region(380, 30, 390, 100, data_type=0x000E, spatial_format=0x0000, units=0x0000, delta_cm=0.0)


def test_the_region_holding_the_lesion_calibrates_it() -> None:
    ds = _image(COLOUR_BAR, B_MODE, SECOND, pixel_spacing=[0.9, 0.9])
    assert calibration(ds, (50, 60, 120, 100)) == Calibration(0.2, 0.2, "Sequence of Ultrasound Regions")
    # the same lesion in the second picture of a dual view is measured with its own calibration
    assert calibration(ds, (250, 60, 320, 100)) == Calibration(0.5, 0.5, "Sequence of Ultrasound Regions")
    # a lesion astride both pictures belongs to neither: Pixel Spacing (row, column) is the fallback
    assert calibration(ds, (200, 60, 240, 100)) == Calibration(0.9, 0.9, "Pixel Spacing")
    assert calibration(_image(pixel_spacing=[0.3, 0.2]), (0, 0, 5, 5)) == Calibration(0.2, 0.3, "Pixel Spacing")


def test_without_calibration_the_outline_stays_and_the_reason_is_given() -> None:
    uncalibrated = Region(20, 30, 219, 229, data_type=0x0001, spatial_format=0x0001, units=0x0000, delta_cm=0.0)
    mask = ellipse_mask((100, 100), (50, 50), 20.0, 10.0, 0.0, (1.0, 1.0))
    for ds, why in [(_image(uncalibrated), "not calibrated in cm"), (_image(), "no calibration")]:
        found = measure_lesion(mask, (40, 40), ds)
        assert found is not None
        assert found.long_axis is None and found.short_axis is None and found.area_mm2 is None
        assert found.unmeasured is not None and why in found.unmeasured
        assert len(found.outline.points) > 20


def test_a_calibration_must_be_a_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        Calibration(0.0, 0.1, "test")


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_measurement", ROOT / "bench" / "measurement.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.heavy
def test_the_long_axis_on_the_phantom_is_within_1_mm_and_10_percent() -> None:
    """The bench's measurement on a few patients' true masks, through the DICOM image's
    calibration, against the phantom's exact margin."""
    bench = _bench()
    cases, _cut = bench.cases(patients=6, size=256, seed=3)  # type: ignore[attr-defined]
    assert len(cases) >= 10
    assert float(np.median([c.long_error_mm for c in cases])) <= 1.0
    assert float(np.median([c.long_error_percent for c in cases])) <= 10.0
    assert "met" in bench.report(cases, _cut, 256, 3)  # type: ignore[attr-defined]
