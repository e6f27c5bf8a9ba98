"""The one colour map for heat: the burned-in heatmap SC, the SEG's segment colours and
the status page's thumbnail all show Grad-CAM in the same colours."""

from __future__ import annotations

import numpy as np

#: Jet colour map anchors: heat -> RGB in [0, 1].
_JET = np.array(
    [
        (0.000, 0.0, 0.0, 0.5),
        (0.125, 0.0, 0.0, 1.0),
        (0.375, 0.0, 1.0, 1.0),
        (0.625, 1.0, 1.0, 0.0),
        (0.875, 1.0, 0.0, 0.0),
        (1.000, 0.5, 0.0, 0.0),
    ]
)

#: The jet colour map at 1024 levels of heat (a lookup beats interpolating every pixel).
_JET_LUT = np.rint(
    np.stack([np.interp(np.linspace(0.0, 1.0, 1024), _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1) * 255
).astype(np.uint8)


def jet(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] -> RGB uint8 with the jet colour map (outside [0, 1] clipped)."""
    levels = len(_JET_LUT) - 1
    # take(): the same rows as indexing _JET_LUT[...], several times faster on a whole map
    rgb: np.ndarray = np.take(_JET_LUT, np.rint(np.clip(heat, 0.0, 1.0) * levels).astype(np.intp), axis=0)
    return rgb
