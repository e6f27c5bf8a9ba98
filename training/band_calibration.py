"""Is the BI-RADS likelihood band worth printing? Each band's observed malignancy rate
on held-out images, with its 95 % confidence interval, against the band's range.

The node suggests the band of the calibrated probability of malignancy
(service.reports.birads): "4B" claims a malignancy likelihood above 10 % and up to
50 %. On held-out images the share of those in a band that are truly malignant
should fall in that range; the Wilson score interval says how sure that share is
(a band with a handful of images says little).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.reports.birads import MALIGNANT, NEGATIVE, likelihood_band

#: z of a two-sided 95 % interval.
Z95 = 1.959964


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (n > 0): unlike k/n +- z SE it
    stays in [0, 1] and is sound for small n and for k = 0 or n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def band_calibration(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per band (in rising likelihood; only bands that hold images): its range, how
    many held-out images fall in it, how many are malignant, the observed rate and
    its 95 % interval, and whether that interval meets the range (the band is then
    consistent with being calibrated; a few images leave a wide interval)."""
    if MALIGNANT not in classes:
        return []
    malignant = list(classes).index(MALIGNANT)
    predicted = [classes[i] for i in probs.argmax(axis=1)]
    bands = [likelihood_band(float(p), c) for p, c in zip(probs[:, malignant], predicted, strict=True)]
    rows = []
    for band in sorted(set(bands), key=lambda b: (b.high, b is not NEGATIVE)):
        members = [i for i, b in enumerate(bands) if b == band]
        k = int(sum(int(y_true[i]) == malignant for i in members))
        low, high = wilson_interval(k, len(members))
        rate = k / len(members)
        rows.append(
            {
                "category": band.category,
                "range": [band.low, band.high],
                "n": len(members),
                "malignant": k,
                "rate": rate,
                "ci95": [low, high],
                "consistent": low <= band.high and high >= band.low,
            }
        )
    return rows


def band_markdown(rows: list[dict[str, Any]] | None, images: str = "held-out split") -> list[str]:
    """The report's table of the bands on the named ``images`` (empty for a model
    without a malignant class)."""
    if not rows:
        return []
    return [
        "BI-RADS likelihood bands (the AI's suggestion, from the calibrated probability of malignancy), on the "
        f"{images}: the images in each band, the share truly malignant with its 95 % Wilson interval, against the "
        "band's range. A band whose interval misses its range is not calibrated.",
        "",
        "| band | range of malignancy | images | malignant | observed rate | 95 % interval | interval meets range |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['category']} | {100 * r['range'][0]:g}-{100 * r['range'][1]:g} % | {r['n']} | {r['malignant']} "
            f"| {100 * r['rate']:.1f} % | {100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f} % "
            f"| {'yes' if r['consistent'] else 'no'} |"
            for r in rows
        ),
        "",
    ]
