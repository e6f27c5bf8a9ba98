"""Training-time augmentation: rotation, horizontal flip, scale, contrast and gamma.

The seed paper's four augmentations, kept within what an ultrasound view plausibly
varies by: a probe tilted a few degrees, the image mirrored (left/right orientation
differs between sites), zoom from the depth setting, and gain / dynamic-range
changes. Apply to the training split only, after splitting (see
:mod:`service.datasets.splits`); evaluation images are never augmented.

Geometry is one affine resampling (rotation, flip and scale together: a single
interpolation blurs less than three); intensity is one lookup table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image


def augment(image: np.ndarray, rng: np.random.Generator, **ranges: Any) -> np.ndarray:
    """A randomly transformed copy of a uint8 grayscale image, same shape (see
    :func:`augment_with_mask` for the ranges)."""
    return augment_with_mask(image, None, rng, **ranges)[0]


def augment_with_mask(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    *,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.15),
    flip_probability: float = 0.5,
    gamma_range: tuple[float, float] = (0.75, 1.33),
    contrast_range: tuple[float, float] = (0.85, 1.15),
) -> tuple[np.ndarray, np.ndarray | None]:
    """A randomly transformed copy of a uint8 grayscale image, and of its lesion mask
    (bool, same shape) moved by the same geometry, so the mask still outlines the
    lesion the localisation loss (``training.train``) asks Grad-CAM to point at.

    Every random draw comes from ``rng``, so a seeded generator gives the same
    augmented images run after run, with or without a mask. Scale > 1 zooms in; areas
    rotated or zoomed in from outside the image are black, as outside an ultrasound
    sector."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"augment expects a 2-D uint8 image, got {image.dtype} {image.shape}")
    if mask is not None and mask.shape != image.shape:
        raise ValueError(f"augment: mask shape {mask.shape} differs from image shape {image.shape}")
    angle = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    flip = rng.random() < flip_probability
    gamma = math.exp(rng.uniform(math.log(gamma_range[0]), math.log(gamma_range[1])))
    contrast = rng.uniform(*contrast_range)
    moved = None
    if mask is not None:
        moved = _geometry(mask.astype(np.uint8), angle, scale, flip, Image.Resampling.NEAREST) > 0
    return _intensity(_geometry(image, angle, scale, flip, Image.Resampling.BILINEAR), gamma, contrast), moved


def _geometry(image: np.ndarray, angle: float, scale: float, flip: bool, resample: Image.Resampling) -> np.ndarray:
    """Rotate by ``angle`` and scale by ``scale`` about the centre, mirrored if ``flip``."""
    height, width = image.shape
    cx, cy = width / 2, height / 2  # PIL samples at pixel centres: the image centre is w/2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    mirror = -1.0 if flip else 1.0
    # PIL maps each output pixel to its input: input = centre + M (output - centre).
    a, b, d, e = cos * mirror, -sin, sin * mirror, cos
    coefficients = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
    out = Image.fromarray(image).transform(
        (width, height), Image.Transform.AFFINE, coefficients, resample=resample, fillcolor=0
    )
    return np.asarray(out)


def _intensity(image: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
    """Gamma, then contrast about mid-grey, as one 256-entry lookup table."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mapped = (levels**gamma - 0.5) * contrast + 0.5
    table = np.clip(np.round(mapped * 255.0), 0, 255).astype(np.uint8)
    return table[image]
