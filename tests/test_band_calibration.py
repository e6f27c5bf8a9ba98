"""The BI-RADS bands' calibration table of the evaluation report: the Wilson interval
matches its textbook values; each band's observed malignancy rate is counted from the
held-out images the band holds; the table says when a band is not calibrated."""

from __future__ import annotations

import numpy as np
import pytest

from training.band_calibration import band_calibration, band_markdown, wilson_interval

CLASSES = ("normal", "benign", "malignant")


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)), (1, 100, (0.0018, 0.0545))],
)
def test_wilson_interval(k: int, n: int, expected: tuple[float, float]) -> None:
    assert wilson_interval(k, n) == pytest.approx(expected, abs=5e-4)


def test_wilson_interval_needs_a_proportion() -> None:
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(1, 0)


def _probs(p_malignant: float, predicted: str) -> list[float]:
    rest = 1.0 - p_malignant
    return {
        "normal": [rest, 0.0, p_malignant],
        "benign": [0.0, rest, p_malignant],
        "malignant": [rest / 2, rest / 2, p_malignant],
    }[predicted]


def test_each_band_counts_its_images_and_their_malignancy() -> None:
    # band 1: 4 normal images, none malignant; band 4C: 10 images at p = 0.8, 7 malignant;
    # band 4A: 5 benign images at p = 0.05, 3 malignant (60 %, interval 23-88 %: misses 2-10 %, not calibrated)
    # band 4B: 5 benign images at p = 0.3, none malignant (0 %, but interval 0-43 % meets 10-50 %: too few to tell)
    rows = (
        [_probs(0.01, "normal")] * 4
        + [_probs(0.8, "malignant")] * 10
        + [_probs(0.05, "benign")] * 5
        + [_probs(0.3, "benign")] * 5
    )
    truth = [0] * 4 + [2] * 7 + [1] * 3 + [2] * 3 + [1] * 2 + [1] * 5
    found = band_calibration(np.array(truth), np.array(rows), CLASSES)
    assert [(r["category"], r["n"], r["malignant"], r["consistent"]) for r in found] == [
        ("1", 4, 0, True),
        ("4A", 5, 3, False),
        ("4B", 5, 0, True),
        ("4C", 10, 7, True),
    ]
    assert found[3]["rate"] == pytest.approx(0.7)
    assert found[3]["ci95"] == pytest.approx(list(wilson_interval(7, 10)))
    table = band_markdown(found)
    assert "| 4A | 2-10 % | 5 | 3 | 60.0 % | 23.1-88.2 % | no |" in table
    assert band_calibration(np.array([0]), np.array([[1.0, 0.0]]), ("normal", "benign")) == []
    assert band_markdown([]) == []
