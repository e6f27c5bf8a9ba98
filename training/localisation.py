"""How well a heatmap points at the lesion: the pointing game and the heat share.

For images with a lesion mask (BUSI ships them, the synthetic generator makes them),
each model-resolution map is resized to the judging size as the node resizes it
(:func:`service.model.imaging.resize_map`, bilinear) and scored against the mask
resized to the same size:

* **pointing game** (Zhang et al., "Top-down neural attention by excitation
  backprop", 2018): a hit when the map's peak lies within ``POINTING_TOLERANCE_PX``
  (15 px, the usual tolerance) of a lesion pixel at 256 x 256;
* **heat share**: the fraction of the map's total heat inside the lesion (the
  "energy-based pointing game" of Score-CAM, Wang et al. 2020).

Both have an exact chance level, reported beside them: a uniformly random point hits
with probability (share of the image within the tolerance of the lesion), and a
uniform map puts (lesion area / image area) of its heat inside.

Pure numpy + scipy (no torch): the tests score the shipped ONNX model with it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt

from service.model.imaging import resize_map

#: The pointing game's tolerance, in pixels at ``JUDGING_SIZE``.
POINTING_TOLERANCE_PX = 15.0
#: Maps and masks are compared at this square size (the source images' usual scale).
JUDGING_SIZE = 256
#: The numbers reported per group of images.
KEYS = ("pointing_game", "random_pointing_game", "heat_share", "uniform_heat_share")


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask resized to ``size`` x ``size`` as its image is resized (aspect not
    kept); a pixel is lesion where it is at least half covered."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)) > 127


def score_map(heatmap: np.ndarray, mask: np.ndarray, tolerance_px: float = POINTING_TOLERANCE_PX) -> dict[str, float]:
    """The four numbers of one map (any resolution, values >= 0) against one
    non-empty lesion mask (bool, already at the judging size). An all-zero map points
    nowhere: a miss with no heat inside."""
    if not mask.any():
        raise ValueError("score_map needs a mask with at least one lesion pixel")
    height, width = mask.shape
    heat = resize_map(heatmap, width, height)
    distance = distance_transform_edt(~mask)
    total = float(heat.sum())
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {
        "pointing_game": float(total > 0 and distance[peak] <= tolerance_px),
        "random_pointing_game": float(np.mean(distance <= tolerance_px)),
        "heat_share": float((heat * mask).sum() / total) if total > 0 else 0.0,
        "uniform_heat_share": float(mask.mean()),
    }


def localisation_metrics(heatmaps: np.ndarray, masks: Sequence[np.ndarray | None], labels: np.ndarray,
                         classes: Sequence[str], size: int = JUDGING_SIZE) -> dict[str, Any] | None:
    """Mean pointing game and heat share, with their chance levels, per class and over
    all images that have a non-empty lesion mask (the others are left out); None
    when no image has one (e.g. DICOM + labels data).

    ``heatmaps`` [N, h, w] are the maps the node would show (model resolution);
    ``masks`` the records' masks at their source size (None: no lesion)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for heatmap, mask, label in zip(heatmaps, masks, labels, strict=True):
        if mask is not None and mask.any():
            rows.setdefault(classes[int(label)], []).append(score_map(heatmap, resize_mask(mask, size)))
    if not rows:
        return None
    return {"tolerance_px": POINTING_TOLERANCE_PX, "size_px": size,
            "per_class": {name: _mean(rows[name]) for name in classes if name in rows},
            "all": _mean([row for name in rows for row in rows[name]])}


def _mean(rows: list[dict[str, float]]) -> dict[str, float | int]:
    return {"n": len(rows), **{key: float(np.mean([row[key] for row in rows])) for key in KEYS}}
