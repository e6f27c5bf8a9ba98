"""How well a heatmap points at the lesion (the pointing game and the heat share),
and how well a predicted lesion mask outlines it (Dice, IoU).

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

A predicted mask (the segmentation head's per-pixel probability) is resized the
same way and thresholded; it is scored by Dice and IoU on images with a lesion
mask, and on normal images by how often any pixel crosses the threshold (where the
node would draw an outline on an image with no lesion).

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
#: The class whose images have no lesion: a missing mask means "all background".
NORMAL = "normal"
#: An outline smaller than this share of the image is a speck, not a lesion (the
#: phantom's smallest lesion covers 0.6 %): reported beside "any pixel" on normal images.
MIN_AREA_FRACTION = 0.001
#: Thresholds the validation split chooses among.
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


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


def localisation_metrics(
    heatmaps: np.ndarray,
    masks: Sequence[np.ndarray | None],
    labels: np.ndarray,
    classes: Sequence[str],
    size: int = JUDGING_SIZE,
) -> dict[str, Any] | None:
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
    return {
        "tolerance_px": POINTING_TOLERANCE_PX,
        "size_px": size,
        "per_class": {name: _mean(rows[name]) for name in classes if name in rows},
        "all": _mean([row for name in rows for row in rows[name]]),
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float | int]:
    return {"n": len(rows), **{key: float(np.mean([row[key] for row in rows])) for key in KEYS}}


def _truths(
    masks: Sequence[np.ndarray | None], labels: np.ndarray, classes: Sequence[str], size: int
) -> list[np.ndarray | None]:
    """Each image's lesion mask at the judging size: empty for a normal image without
    one, None where a lesion image has none (unknown: left out)."""
    empty = np.zeros((size, size), dtype=bool)
    return [
        resize_mask(mask, size) if mask is not None else empty if classes[int(label)] == NORMAL else None
        for mask, label in zip(masks, labels, strict=True)
    ]


def _overlaps(
    maps: np.ndarray, truths: Sequence[np.ndarray | None], thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image and threshold [N, T]: intersection, predicted area and true area in
    pixels at the truths' size (zeros where the truth is unknown)."""
    shape = (len(maps), len(thresholds))
    inter, predicted, true = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for i, (prob, truth) in enumerate(zip(maps, truths, strict=True)):
        if truth is None:
            continue
        above = resize_map(prob, truth.shape[1], truth.shape[0])[None] > thresholds[:, None, None]
        inter[i] = (above & truth).sum(axis=(1, 2))
        predicted[i] = above.sum(axis=(1, 2))
        true[i] = truth.sum()
    return inter, predicted, true


def _dice(inter: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    return 2 * inter / np.maximum(predicted + true, 1)


def choose_threshold(
    maps: np.ndarray,
    masks: Sequence[np.ndarray | None],
    labels: np.ndarray,
    classes: Sequence[str],
    size: int = JUDGING_SIZE,
) -> float:
    """The threshold of ``THRESHOLDS`` with the best mean Dice over the images with a
    lesion (``maps`` [N, h, w] lesion probabilities; masks and labels as in
    :func:`segmentation_metrics`); call it on the validation split, never the test."""
    truths = _truths(masks, labels, classes, size)
    lesion = np.array([t is not None and bool(t.any()) for t in truths])
    if not lesion.any():
        raise ValueError("choosing a segmentation threshold needs images with a lesion mask")
    dice = _dice(*_overlaps(maps[lesion], [t for t, keep in zip(truths, lesion, strict=True) if keep], THRESHOLDS))
    return float(THRESHOLDS[int(np.argmax(dice.mean(axis=0)))])


def segmentation_metrics(
    maps: np.ndarray,
    masks: Sequence[np.ndarray | None],
    labels: np.ndarray,
    classes: Sequence[str],
    threshold: float,
    size: int = JUDGING_SIZE,
) -> dict[str, Any]:
    """Mean Dice and IoU per lesion class (images with a lesion mask), and on normal
    images the share with any pixel above ``threshold`` (an outline drawn where there
    is no lesion), the share whose marked area exceeds ``MIN_AREA_FRACTION``, and the
    mean area so marked. ``maps`` [N, h, w] are the head's
    probabilities at model resolution, ``masks`` the records' masks at source size
    (None: no lesion for a normal image, unknown otherwise)."""
    truths = _truths(masks, labels, classes, size)
    inter, predicted, true = (a[:, 0] for a in _overlaps(maps, truths, np.array([threshold])))
    known = np.array([t is not None for t in truths])
    dice, iou = _dice(inter, predicted, true), inter / np.maximum(predicted + true - inter, 1)
    per_class: dict[str, dict[str, float | int]] = {}
    for c, name in enumerate(classes):
        chosen = known & (labels == c) & (true > 0)
        if chosen.any():
            per_class[name] = {
                "n": int(chosen.sum()),
                "dice": float(dice[chosen].mean()),
                "iou": float(iou[chosen].mean()),
            }
    lesion = known & (true > 0)
    empty = known & (true == 0)
    return {
        "threshold": threshold,
        "size_px": size,
        "per_class": per_class,
        "all": {
            "n": int(lesion.sum()),
            "dice": float(dice[lesion].mean()) if lesion.any() else None,
            "iou": float(iou[lesion].mean()) if lesion.any() else None,
        },
        "no_lesion": {
            "n": int(empty.sum()),
            "false_positive_rate": float((predicted[empty] > 0).mean()) if empty.any() else None,
            "min_area_fraction": MIN_AREA_FRACTION,
            "false_positive_rate_over_min_area": float((predicted[empty] > MIN_AREA_FRACTION * size**2).mean())
            if empty.any()
            else None,
            "mean_area_fraction": float(predicted[empty].mean() / size**2) if empty.any() else None,
        },
    }
