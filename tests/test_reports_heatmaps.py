"""A frame's heatmap as geometry: the outline at half its peak (the SR's region) and
the levels of the overlay (the SEG's segments), in the source image's coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.reports.heatmaps import bands, load_heat, outline
from service.results import FrameResult

CROP = (50, 20, 450, 320)  # x0, y0, x1, y1: a 400 x 300 analysed region


def _blob(cx: float, cy: float, sigma: float, shape: tuple[int, int] = (300, 400)) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def _frame(path: Path, crop: tuple[int, int, int, int] = CROP) -> FrameResult:
    return FrameResult(
        frame_number=1,
        probabilities={"normal": 1.0},
        predicted="normal",
        out_of_distribution=False,
        ood_distance=0.0,
        heatmap_path=str(path),
        crop=crop,
        embedding=[0.0],
    )


def test_a_round_blob_gives_a_circle_at_its_half_maximum_in_source_coordinates() -> None:
    points = outline(_blob(100, 150, 40), CROP)
    assert np.array_equal(points[0], points[-1])
    # Heat pixel (row 150, column 100) is source pixel (170, 150), whose centre is
    # (150.5, 170.5); the half maximum of a Gaussian lies at sigma * sqrt(2 ln 2).
    radii = np.linalg.norm(points - np.array([150.5, 170.5]), axis=1)
    assert radii == pytest.approx(40 * np.sqrt(2 * np.log(2)), abs=1.5)


def test_a_blob_at_the_edge_is_closed_along_the_crop() -> None:
    points = outline(_blob(0, 0, 40), CROP)
    x0, y0 = CROP[:2]
    assert np.array_equal(points[0], points[-1])
    assert points[:, 0].min() == x0 and points[:, 1].min() == y0  # runs along the crop's edges
    assert points[:, 0].max() < x0 + 60 and points[:, 1].max() < y0 + 60


def test_of_two_blobs_the_one_holding_the_peak_is_outlined() -> None:
    heat = np.maximum(_blob(80, 80, 25), 0.9 * _blob(300, 200, 25))
    points = outline(heat, CROP)
    centre = points[:-1].mean(axis=0)
    assert centre == pytest.approx((CROP[0] + 80.5, CROP[1] + 80.5), abs=2)


def test_a_flat_heatmap_outlines_the_analysed_region() -> None:
    x0, y0, x1, y1 = CROP
    rectangle = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    assert outline(np.zeros((300, 400), np.float32), CROP).tolist() == rectangle
    uniform = outline(np.ones((300, 400), np.float32), CROP)
    assert uniform[:, 0].min() == x0 and uniform[:, 0].max() == x1
    assert uniform[:, 1].min() == y0 and uniform[:, 1].max() == y1


def test_bands_are_levels_of_the_peak_inside_the_crop_only() -> None:
    heat = _blob(100, 150, 40) * 0.6  # a peak below 1: levels are relative to it
    labels = bands(heat, CROP, 400, 500)
    assert labels.shape == (400, 500) and labels.dtype == np.uint8
    x0, y0, x1, y1 = CROP
    assert labels[:y0].max() == 0 and labels[:, :x0].max() == 0 and labels[y1:].max() == 0
    relative = heat / heat.max()
    inside = labels[y0:y1, x0:x1]
    assert np.array_equal(inside == 0, relative < 0.25)
    assert np.array_equal(inside == 3, relative >= 0.75)
    assert np.array_equal(inside == 2, (relative >= 0.5) & (relative < 0.75))
    assert bands(np.zeros((300, 400), np.float32), CROP, 400, 500).max() == 0


@pytest.mark.parametrize("levels", [(0.25, 0.5, 0.75), (0.3, 0.6, 0.9), (0.1,)])
def test_bands_count_the_levels_as_sorting_them_in_does(levels: tuple[float, ...]) -> None:
    """Counting the levels reached is np.searchsorted(levels, relative, "right"), level values included."""
    rng = np.random.default_rng(len(levels))
    heat = rng.random((60, 80)).astype(np.float32)
    peak = float(heat.max())
    heat[1, :4] = [level * peak for level in levels[:4]] + [0.0] * (4 - len(levels[:4]))
    x0, y0, x1, y1 = (5, 7, 85, 67)
    expected = np.zeros((70, 90), np.uint8)
    expected[y0:y1, x0:x1] = np.searchsorted(np.asarray(levels), heat / peak, side="right")
    assert np.array_equal(bands(heat, (x0, y0, x1, y1), 70, 90, levels), expected)


def test_heatmap_files_are_checked_and_fitted_to_their_crop(tmp_path: Path) -> None:
    path = tmp_path / "heat.npy"
    np.save(path, _blob(100, 150, 40))
    assert load_heat(_frame(path)).shape == (300, 400)
    np.save(path, np.ones((8, 8), np.float32) * 2.0)  # the model's own grid, and out of range
    fitted = load_heat(_frame(path))
    assert fitted.shape == (300, 400) and fitted.max() == 1.0
    np.save(path, np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="not a 2-D map of finite values"):
        load_heat(_frame(path))
    with pytest.raises(ValueError, match="the heatmap of frame 1 cannot be read"):
        load_heat(_frame(tmp_path / "missing.npy"))
