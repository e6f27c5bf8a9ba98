"""The Grad-CAM heatmap of a frame as geometry a viewer can draw.

The worker stores each analysed frame's heatmap as a float32 ``.npy`` of the size of
the frame's analysed region (``FrameResult.crop``, x0, y0, x1, y1 in source pixels,
half-open): heat pixel (row r, column c) *is* source pixel (y0 + r, x0 + c), because
the model's preprocessing resized the whole crop and the map was resized back
(service.model.imaging, service.pipeline.analysis). Two views of it are drawn:

* :func:`outline`: the closed line around the heat at or above half its peak that
  holds the peak, in DICOM image coordinates (column, row; the top left corner of the
  top left pixel is 0, 0; PS3.3 C.18.6.1.2): the SR's image region of the finding.
* :func:`bands`: a label image of the source's size, heat split into levels of its
  peak (25-50 %, 50-75 %, 75-100 %): the segments of the heatmap overlay (SEG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import contourpy
import numpy as np
from PIL import Image

from service.model.imaging import Box, resize_map
from service.results import FrameResult, StudyResult

#: The SR's region: the heat at or above this fraction of its peak.
OUTLINE_LEVEL = 0.5
#: The overlay's segments start at these fractions of the peak (each up to the next; the last to 1).
BAND_LEVELS: tuple[float, ...] = (0.25, 0.5, 0.75)
#: The outline is traced on the heatmap reduced to at most this many pixels a side:
#: the map is a bilinear enlargement of the model's coarse grid, so nothing is lost,
#: and the line keeps a few hundred points at most.
OUTLINE_GRID = 64


def load_heat(frame: FrameResult) -> np.ndarray:
    """A frame's heatmap the size of its crop (a map of another size, e.g. the
    model's own grid, is resized onto it), in [0, 1]; a clear error for a bad file."""
    x0, y0, x1, y1 = frame.crop
    try:
        heat = np.load(frame.heatmap_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"the heatmap of frame {frame.frame_number} cannot be read: {exc}") from None
    if heat.ndim != 2 or heat.size == 0 or not np.all(np.isfinite(heat)):
        raise ValueError(
            f"the heatmap of frame {frame.frame_number} is not a 2-D map of finite values (shape {heat.shape})"
        )
    if heat.shape != (y1 - y0, x1 - x0):
        return resize_map(heat, x1 - x0, y1 - y0)
    return as_heat(heat)


def as_heat(heat: np.ndarray) -> np.ndarray:
    """A heatmap as the reports take it: float32 in [0, 1]."""
    return np.clip(heat.astype(np.float32), 0.0, 1.0)


def load_heats(result: StudyResult) -> dict[tuple[str, int], np.ndarray]:
    """Every analysed frame's heatmap by (SOP Instance UID, frame number), read once per build."""
    return {
        (image.sop_instance_uid, frame.frame_number): load_heat(frame)
        for image in result.images
        for frame in image.frames
    }


def _reduced(heat: np.ndarray) -> np.ndarray:
    """The heatmap averaged down to at most OUTLINE_GRID pixels a side."""
    height, width = heat.shape
    factor = max(1, math.ceil(max(height, width) / OUTLINE_GRID))
    if factor == 1:
        return heat
    size = (max(2, round(width / factor)), max(2, round(height / factor)))
    return np.asarray(Image.fromarray(heat, "F").resize(size, Image.Resampling.BOX), dtype=np.float32)


def _inside(point: tuple[float, float], polygon: np.ndarray) -> bool:
    """Even-odd rule: does the closed ``polygon`` (N x 2, x y) hold ``point``?"""
    x, y = point
    xs, ys = polygon[:, 0], polygon[:, 1]
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    crosses = (ys > y) != (yn > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = xs + (y - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(crosses & (x < at)) % 2)


def _area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rectangle(crop: Box) -> np.ndarray:
    x0, y0, x1, y1 = crop
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], dtype=np.float32)


def outline(heat: np.ndarray, crop: Box, level: float = OUTLINE_LEVEL) -> np.ndarray:
    """The closed POLYLINE (N x 2 float32, column row, first point = last) around
    the heat at or above ``level`` x its peak that holds the peak, in the source
    image's coordinates. A flat heatmap (no peak) gives the analysed region itself."""
    x0, y0, x1, y1 = crop
    small = _reduced(heat)
    peak = float(small.max())
    if peak <= 0.0:
        return _rectangle(crop)
    # A border of zeros closes lines that would run off the map's edge.
    padded = np.pad(small, 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(level * peak)
    row, column = np.unravel_index(int(np.argmax(padded)), padded.shape)
    holding = [line for line in lines if len(line) >= 4 and _inside((float(column), float(row)), line)]
    if not holding:
        return _rectangle(crop)
    line = max(holding, key=_area)
    scale_x, scale_y = (x1 - x0) / small.shape[1], (y1 - y0) / small.shape[0]
    # padded index -> small pixel index (-1) -> its centre (+0.5) -> source coordinates
    xs = np.clip(x0 + (line[:, 0] - 0.5) * scale_x, x0, x1)
    ys = np.clip(y0 + (line[:, 1] - 0.5) * scale_y, y0, y1)
    points = np.stack([xs, ys], axis=1).astype(np.float32)
    points[-1] = points[0]
    return points


def bands(heat: np.ndarray, crop: Box, rows: int, columns: int, levels: Sequence[float] = BAND_LEVELS) -> np.ndarray:
    """A uint8 label image of ``rows`` x ``columns``: 0 outside the crop and below
    ``levels[0]`` x peak, else the number (1..) of the highest level reached."""
    x0, y0, x1, y1 = crop
    labels = np.zeros((rows, columns), np.uint8)
    peak = float(heat.max())
    if peak <= 0.0:
        return labels
    relative = heat / peak
    region = labels[y0:y1, x0:x1]
    for level in np.asarray(levels, dtype=np.float64):  # how many levels are <= the heat (a NaN: all, as sorting says)
        region += ~(relative < level)
    return labels
