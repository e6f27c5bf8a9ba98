"""Real-world performance: the model's results against what turned out to be true.

Pure functions over cases (the model's calibrated probabilities, the truth from an
outcome, the month and the scanner), so the status page, the CSV/JSON export and
bench/monitoring.py compute the same numbers, and those equal ``sonocase evaluate``
on the same images: the point estimates come from service.monitoring.classification,
the one implementation both use.

The call that matters clinically is "malignant or not" (biopsy or not):
sensitivity, specificity, PPV and NPV are for the ``positive`` class against the
rest, ROC AUC is its one-vs-rest area; ECE is the top-label calibration error over
all classes, as evaluate reports it. Each comes with a 95 % interval: Wilson's score
interval for the four proportions (right near 0 and 1, where a site's numbers often
are, unlike the normal approximation), a percentile bootstrap over cases for AUC,
ECE and Cohen's kappa (no closed form that holds at these sample sizes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from service.monitoring.classification import ECE_BINS, confusion_matrix, expected_calibration_error, roc_auc

#: 97.5th percentile of the standard normal: two-sided 95 % intervals.
Z_95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % interval; None where the data cannot say
    (no case in the denominator, one class only)."""

    value: float | None
    low: float | None
    high: float | None
    n: int


#: Metric name -> estimate.
Report = dict[str, Estimate]


@dataclass(frozen=True)
class Case:
    """One study the model judged and whose truth is known."""

    probabilities: tuple[float, ...]  # calibrated, one per class
    truth: int  # class index
    month: str  # YYYY-MM of the study date
    scanner: str  # Manufacturer + Manufacturer's Model Name


def wilson(successes: int, n: int, z: float = Z_95) -> Estimate:
    """The proportion ``successes / n`` with Wilson's score interval."""
    if n == 0:
        return Estimate(None, None, None, 0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n the bound is exactly 0 or 1, which rounding would miss by an ulp.
    low = 0.0 if successes == 0 else float(max(0.0, centre - half))
    high = 1.0 if successes == n else float(min(1.0, centre + half))
    return Estimate(p, low, high, n)


def bootstrap(
    statistic: Callable[[np.ndarray], float | None],
    n: int,
    rng: np.random.Generator,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Estimate:
    """``statistic`` of all ``n`` cases (it gets their indices) with the percentile
    interval of its values on ``resamples`` resamples of the cases; resamples on
    which it is undefined (one class only) are left out."""
    value = statistic(np.arange(n)) if n else None
    if value is None:
        return Estimate(None, None, None, n)
    draws = [v for _ in range(resamples) if (v := statistic(rng.integers(0, n, n))) is not None]
    if not draws:
        return Estimate(value, None, None, n)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n)


def cohen_kappa(a: np.ndarray, b: np.ndarray, n_classes: int) -> float | None:
    """Agreement of two raters beyond chance; None when chance agreement is total."""
    if len(a) == 0:
        return None
    matrix = confusion_matrix(a, b, n_classes) / len(a)
    observed = float(np.trace(matrix))
    chance = float(matrix.sum(axis=1) @ matrix.sum(axis=0))
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def performance(
    probabilities: np.ndarray, truth: np.ndarray, positive: int, rng: np.random.Generator, bins: int = ECE_BINS
) -> Report:
    """Sensitivity, specificity, PPV, NPV of calling ``positive`` (the most probable
    class), its ROC AUC, and the ECE, each with its 95 % interval."""
    called = probabilities.argmax(axis=1) == positive if len(truth) else np.zeros(0, bool)
    actual = truth == positive
    tp, fp = int(np.sum(called & actual)), int(np.sum(called & ~actual))
    fn, tn = int(np.sum(~called & actual)), int(np.sum(~called & ~actual))
    scores = probabilities[:, positive] if len(truth) else np.zeros(0)
    return {
        "sensitivity": wilson(tp, tp + fn),
        "specificity": wilson(tn, tn + fp),
        "ppv": wilson(tp, tp + fp),
        "npv": wilson(tn, tn + fn),
        "roc_auc": bootstrap(lambda rows: roc_auc(actual[rows], scores[rows]), len(truth), rng),
        "ece": bootstrap(
            lambda rows: expected_calibration_error(probabilities[rows], truth[rows], bins), len(truth), rng
        ),
    }


def agreement(model: np.ndarray, readers: np.ndarray, n_classes: int, rng: np.random.Generator) -> Estimate:
    """Cohen's kappa of the model's classes against the radiologists' (their
    corrected class where they corrected, the model's where they agreed)."""
    return bootstrap(lambda rows: cohen_kappa(model[rows], readers[rows], n_classes), len(model), rng)


def grouped(cases: Iterable[Case], positive: int, rng: np.random.Generator) -> dict[str, dict[str, Report]]:
    """:func:`performance` of all cases, per month and per scanner:
    ``{"all": {"all": ...}, "month": {"2026-11": ...}, "scanner": {...}}``."""
    groups: dict[str, dict[str, list[Case]]] = {
        "all": defaultdict(list),
        "month": defaultdict(list),
        "scanner": defaultdict(list),
    }
    for case in cases:
        groups["all"]["all"].append(case)
        groups["month"][case.month].append(case)
        groups["scanner"][case.scanner].append(case)
    return {
        kind: {name: _of(members, positive, rng) for name, members in sorted(by.items())} for kind, by in groups.items()
    }


def trends(cases: Iterable[Case], positive: int, rng: np.random.Generator) -> dict[str, dict[str, Report]]:
    """:func:`performance` per scanner and, within each, per month (``{scanner: {month:
    ...}}``, months in order): a scanner's change over time, which the month-only and
    scanner-only groups of :func:`grouped` blur together."""
    by: dict[str, dict[str, list[Case]]] = defaultdict(lambda: defaultdict(list))
    for case in cases:
        by[case.scanner][case.month].append(case)
    return {
        scanner: {month: _of(members, positive, rng) for month, members in sorted(months.items())}
        for scanner, months in sorted(by.items())
    }


def _of(cases: Sequence[Case], positive: int, rng: np.random.Generator) -> Report:
    probabilities = np.array([c.probabilities for c in cases], dtype=np.float64)
    truth = np.array([c.truth for c in cases], dtype=np.int64)
    return performance(probabilities, truth, positive, rng)
