"""The BI-RADS likelihood band an AI probability of malignancy falls in.

ACR BI-RADS (5th edition) ties its final assessment categories to likelihoods of
malignancy: 3 "probably benign" <= 2 %, 4A > 2 to <= 10 %, 4B > 10 to <= 50 %,
4C > 50 to < 95 %, 5 >= 95 %. The reports print the band of the model's calibrated
probability of malignancy as an AI suggestion, never as the radiologist's
assessment. An image the model calls normal, with a probability of malignancy in
category 3's range, is suggested as category 1 ("negative": no finding); category 2
("benign") says a finding is certainly benign (a simple cyst), which no probability
says, so it is never suggested.

A band is only worth printing if the probability is calibrated: ``training/evaluate.py``
prints each band's observed malignancy rate on held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.results import NO_LESION

#: The class whose probability the band reads.
MALIGNANT = "malignant"


@dataclass(frozen=True)
class Band:
    """A BI-RADS category and its likelihood of malignancy, ``low`` < p <= ``high``
    (fractions; category 3 and 1 include 0, category 5 starts at 0.95 inclusive)."""

    category: str
    low: float
    high: float


NEGATIVE = Band("1", 0.0, 0.02)
#: The bands by rising likelihood (category 1 shares category 3's range).
BANDS: tuple[Band, ...] = (
    Band("3", 0.0, 0.02),
    Band("4A", 0.02, 0.10),
    Band("4B", 0.10, 0.50),
    Band("4C", 0.50, 0.95),
    Band("5", 0.95, 1.0),
)
CATEGORIES: tuple[str, ...] = (NEGATIVE.category, *(b.category for b in BANDS))


def likelihood_band(p_malignant: float, predicted: str) -> Band:
    """The band of a probability of malignancy; ``predicted`` (the model's class)
    turns category 3 into 1 for an image it calls normal."""
    if not 0.0 <= p_malignant <= 1.0:
        raise ValueError(f"a probability of malignancy must lie in [0, 1], got {p_malignant}")
    if p_malignant >= BANDS[-1].low:
        return BANDS[-1]
    band = next(b for b in BANDS if p_malignant <= b.high)
    return NEGATIVE if band is BANDS[0] and predicted == NO_LESION else band


def frame_band(probabilities: dict[str, float], predicted: str) -> Band | None:
    """The band of one frame's probabilities; None for a model without a malignant class."""
    p = probabilities.get(MALIGNANT)
    return None if p is None else likelihood_band(p, predicted)
