"""A lesion measured as a breast radiologist measures it: outline, long and short axis, area.

The BI-RADS ultrasound lexicon reports a mass by its largest diameter (the long axis)
and the largest diameter perpendicular to it (the short axis), in millimetres. Here
they come from a binary lesion mask in source-image pixels and the image's
calibration:

* the outline is traced at level 0.5 (marching squares, contourpy): its points lie
  halfway between a lesion pixel's centre and its outside neighbour's, where a
  sampled edge is best estimated. Only the largest connected component is measured
  (the SR has one lesion per frame); how many there were is kept;
* long axis: the farthest pair of outline points (on its convex hull), in mm, so
  that non-square pixels weigh right;
* short axis: of the lines perpendicular to the long axis (a quarter pixel apart),
  the one with the largest extent between its first and last crossing of the outline;
* area: enclosed by the outline, in mm2.

Points are DICOM image coordinates (column, row; the top left corner of the top left
pixel is 0, 0; PS3.3 C.18.6.1.2), what an SR SCOORD holds. The calibration is the
Sequence of Ultrasound Regions region holding the lesion (Physical Units X/Y in cm),
else Pixel Spacing; without either the outline is kept, no millimetres are given, and
the reason says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import contourpy
import numpy as np
from pydicom.dataset import Dataset

from service.model.imaging import Box, resize_map
from service.results import AxisResult, LesionResult

#: Physical Units X/Y Direction (PS3.3 C.8.5.5.1.15) of a calibrated B-mode region.
UNITS_CM = 0x0003
#: Region Spatial Format (C.8.5.5.1.1) of a 2-D image.
SPATIAL_2D = 0x0001
#: The perpendicular lines of the short axis are this fraction of a pixel apart.
SHORT_AXIS_STEP_PX = 0.25

Point = tuple[float, float]


@dataclass(frozen=True)
class Calibration:
    """Pixel size in mm across (columns) and down (rows), and where it was read."""

    mm_x: float
    mm_y: float
    source: str

    def __post_init__(self) -> None:
        if not (self.mm_x > 0 and self.mm_y > 0 and np.isfinite(self.mm_x) and np.isfinite(self.mm_y)):
            raise ValueError(f"pixel size must be positive and finite, got {self.mm_x} x {self.mm_y} mm")

    @property
    def scale(self) -> np.ndarray:
        return np.array([self.mm_x, self.mm_y])


@dataclass(frozen=True)
class Axis:
    """A diameter: its end points (image coordinates) and its length in mm."""

    start: Point
    end: Point
    length_mm: float


@dataclass(frozen=True)
class Outline:
    """The largest lesion of a mask: its closed outline (N x 2, first = last point)
    and how many separate lesions the mask held."""

    points: np.ndarray
    components: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 of the outline (image coordinates)."""
        (x0, y0), (x1, y1) = self.points.min(axis=0), self.points.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


@dataclass(frozen=True)
class LesionMeasurement:
    """What the SR reports of a lesion; without calibration only the outline and why."""

    outline: Outline
    long_axis: Axis | None
    short_axis: Axis | None
    area_mm2: float | None
    unmeasured: str | None


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def trace_outline(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> Outline | None:
    """The outline of the largest lesion of ``mask`` (bool, rows x columns), whose
    pixel [0, 0] is source pixel ``origin`` (column, row); None for an empty mask."""
    if mask.ndim != 2:
        raise ValueError(f"a lesion mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.float64), 1)  # closes lesions that touch the border
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    lines = cast(list[np.ndarray], generator.lines(0.5))  # LineType.Separate: one (N, 2) array per line
    areas = [_signed_area(line) for line in lines]
    outer = [(area, line) for area, line in zip(areas, lines, strict=True) if area > 0]  # holes run the other way
    _, line = max(outer, key=lambda pair: pair[0])
    # padded index -> mask index (-1) -> its centre (+0.5) -> source coordinates
    points = line + np.array([origin[0] - 0.5, origin[1] - 0.5])
    return Outline(points=points, components=len(outer))


def _hull(points: np.ndarray) -> list[int]:
    """Indices of the convex hull's vertices (Andrew's monotone chain)."""
    order = sorted(range(len(points)), key=lambda k: (points[k, 0], points[k, 1]))
    xy = points.tolist()

    def turns_left(a: int, b: int, c: int) -> bool:
        (ax, ay), (bx, by), (cx, cy) = xy[a], xy[b], xy[c]
        return bool((bx - ax) * (cy - ay) - (by - ay) * (cx - ax) > 0)

    def half(ordered: list[int]) -> list[int]:
        chain: list[int] = []
        for k in ordered:
            while len(chain) >= 2 and not turns_left(chain[-2], chain[-1], k):
                chain.pop()
            chain.append(k)
        return chain

    return half(order)[:-1] + half(order[::-1])[:-1]


def long_axis(points_mm: np.ndarray) -> tuple[int, int]:
    """Indices of the farthest pair of ``points_mm`` (an outline, in mm): the pair
    lies on the convex hull, so only its vertices are compared."""
    hull = _hull(points_mm)
    vertices = points_mm[hull]
    squared = ((vertices[:, None, :] - vertices[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(np.argmax(squared)), squared.shape)
    return hull[i], hull[j]


def short_axis(
    points_mm: np.ndarray, start: np.ndarray, end: np.ndarray, step_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """End points (mm) of the largest extent of the outline ``points_mm`` along a line
    perpendicular to the long axis ``start``-``end``, lines ``step_mm`` apart."""
    along = (end - start) / np.linalg.norm(end - start)
    across = np.array([-along[1], along[0]])
    s, t = (points_mm - start) @ along, (points_mm - start) @ across
    positions = np.arange(s.min() + step_mm / 2, s.max(), step_mm)[:, None]
    s0, s1, t0, t1 = s[:-1], s[1:], t[:-1], t[1:]  # the outline's edges
    crosses = (s0 <= positions) != (s1 <= positions)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = t0 + (positions - s0) * (t1 - t0) / (s1 - s0)
    high = np.where(crosses, at, -np.inf).max(axis=1)
    low = np.where(crosses, at, np.inf).min(axis=1)
    k = int(np.argmax(high - low))
    base = start + positions[k, 0] * along
    return base + low[k] * across, base + high[k] * across


def measure(outline: Outline, calibration: Calibration | str) -> LesionMeasurement:
    """Long and short axis and area of ``outline``; ``calibration`` is the pixel size,
    or the reason there is none (then only the outline is given)."""
    if isinstance(calibration, str):
        return LesionMeasurement(outline, None, None, None, unmeasured=calibration)
    scale = calibration.scale
    mm = outline.points * scale
    i, j = long_axis(mm)
    low, high = short_axis(mm, mm[i], mm[j], SHORT_AXIS_STEP_PX * float(scale.min()))

    def axis(a: np.ndarray, b: np.ndarray) -> Axis:
        pa, pb = a / scale, b / scale
        return Axis((float(pa[0]), float(pa[1])), (float(pb[0]), float(pb[1])), float(np.linalg.norm(b - a)))

    return LesionMeasurement(
        outline,
        axis(mm[i], mm[j]),
        axis(low, high),
        area_mm2=abs(_signed_area(mm)),
        unmeasured=None,
    )


def _holds(item: Dataset, bounds: tuple[float, float, float, float]) -> bool:
    """Does the region ``item`` (inclusive pixel bounds) hold the outline ``bounds``?"""
    try:
        x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
        x1, y1 = int(item.RegionLocationMaxX1) + 1, int(item.RegionLocationMaxY1) + 1
    except (AttributeError, TypeError, ValueError):
        return False
    return x0 <= bounds[0] and y0 <= bounds[1] and bounds[2] <= x1 and bounds[3] <= y1


def calibration(ds: Dataset, bounds: tuple[float, float, float, float]) -> Calibration | str:
    """The pixel size where the lesion (outline ``bounds``) lies, or why it is unknown.

    The 2-D region of the Sequence of Ultrasound Regions that holds the lesion, in cm
    on both axes, comes first (it is the scanner's own calibration of that picture);
    else Pixel Spacing (row, column spacing in mm).
    """
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        if item.get("RegionSpatialFormat") != SPATIAL_2D or not _holds(item, bounds):
            continue
        units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
        deltas = (item.get("PhysicalDeltaX"), item.get("PhysicalDeltaY"))
        if units == (UNITS_CM, UNITS_CM) and all(isinstance(d, float) and d > 0 for d in deltas):
            return Calibration(10.0 * deltas[0], 10.0 * deltas[1], "Sequence of Ultrasound Regions")
        return (
            f"the ultrasound region holding the lesion is not calibrated in cm "
            f"(Physical Units X/Y {units[0]}/{units[1]}, Physical Delta X/Y {deltas[0]}/{deltas[1]})"
        )
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
        return Calibration(float(spacing[1]), float(spacing[0]), "Pixel Spacing")
    return "the image has no calibration (no ultrasound region in cm holds the lesion, no Pixel Spacing)"


def measure_lesion(mask: np.ndarray, origin: tuple[int, int], ds: Dataset) -> LesionMeasurement | None:
    """The largest lesion of ``mask`` (pixel [0, 0] at source pixel ``origin``)
    measured with the calibration of its image ``ds``; None when the mask is empty."""
    outline = trace_outline(mask, origin)
    if outline is None:
        return None
    return measure(outline, calibration(ds, outline.bounds))


def lesion_result(measured: LesionMeasurement) -> LesionResult:
    """The stored form of a measurement (what the SR is built from)."""

    def axis(found: Axis | None) -> AxisResult | None:
        return None if found is None else AxisResult(start=found.start, end=found.end, length_mm=found.length_mm)

    return LesionResult(
        outline=[(float(x), float(y)) for x, y in measured.outline.points],
        components=measured.outline.components,
        long_axis=axis(measured.long_axis),
        short_axis=axis(measured.short_axis),
        area_mm2=measured.area_mm2,
        unmeasured=measured.unmeasured,
    )


def calibration_header(ds: Dataset) -> Dataset:
    """What :func:`calibration` reads of an image, kept while its pixels are let go."""
    kept = Dataset()
    for keyword in ("SequenceOfUltrasoundRegions", "PixelSpacing"):
        if keyword in ds:
            kept[keyword] = ds[keyword]
    return kept


def frame_lesion(lesion_map: np.ndarray, crop: Box, threshold: float, ds: Dataset) -> LesionResult | None:
    """The lesion the model outlined in a frame: its map (the model's grid, values in
    [0, 1]) resized to the analysed region ``crop`` as the heatmap is, the pixels above
    ``threshold`` (the card's) measured on the image ``ds``; None when none is above."""
    x0, y0, x1, y1 = crop
    measured = measure_lesion(resize_map(lesion_map, x1 - x0, y1 - y0) > threshold, (x0, y0), ds)
    return None if measured is None else lesion_result(measured)
