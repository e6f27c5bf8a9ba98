"""Post-market monitoring (service.monitoring): the metrics shared with ``sonocase
evaluate`` checked against scikit-learn, the confidence intervals, the drift test,
and bench/monitoring.py's scenario on the shipped model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from service.monitoring.classification import classification_metrics, expected_calibration_error, roc_auc
from service.monitoring.drift import DriftConfig, guard_unit, mmd_test, study_embeddings, watch
from service.monitoring.performance import Case, agreement, bootstrap, cohen_kappa, grouped, performance, trends, wilson

ROOT = Path(__file__).resolve().parents[1]
MALIGNANT = 2


# ---- metrics, checked against scikit-learn -------------------------------------------


def _random_outputs(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, np.round(probs, 2)  # rounding makes ties, which ROC AUC must handle


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_agree_with_scikit_learn(seed: int) -> None:
    y, probs = _random_outputs(seed)
    got = classification_metrics(y, probs, ["normal", "benign", "malignant"])
    pred = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    precision, recall, _, _ = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    for c, name in enumerate(["normal", "benign", "malignant"]):
        assert got["per_class"][name]["precision"] == pytest.approx(precision[c])
        assert got["per_class"][name]["recall"] == pytest.approx(recall[c])
        assert got["per_class"][name]["roc_auc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
    assert got["macro_roc_auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(3)]))


def test_roc_auc_is_undefined_without_both_classes() -> None:
    assert roc_auc(np.array([True, True]), np.array([0.2, 0.9])) is None


def test_expected_calibration_error() -> None:
    # perfectly calibrated: 80 % confident, 80 % right
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, y) == pytest.approx(0.0)
    # always 90 % confident and always wrong
    assert expected_calibration_error(np.tile([0.9, 0.05, 0.05], (4, 1)), np.ones(4, dtype=int)) == pytest.approx(0.9)


# ---- real-world performance ------------------------------------------------------


def test_wilson_interval_by_hand() -> None:
    # Wilson (1927) for 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), as in Newcombe 1998, table I
    got = wilson(8, 10)
    assert (got.value, got.n) == (0.8, 10)
    assert got.low == pytest.approx(0.4902, abs=1e-4) and got.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0).value is None
    assert wilson(0, 20).low == 0.0 and wilson(20, 20).high == 1.0 and wilson(8, 8).high == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_performance_equals_evaluate_on_the_same_outputs(seed: int) -> None:
    """The node's real-world numbers and ``sonocase evaluate``'s are the same numbers."""
    y, probs = _random_outputs(seed, n=120)
    offline = classification_metrics(y, probs, ["normal", "benign", "malignant"])
    online = performance(probs, y, MALIGNANT, np.random.default_rng(seed))
    malignant = offline["per_class"]["malignant"]
    assert online["sensitivity"].value == pytest.approx(malignant["recall"])
    assert online["ppv"].value == pytest.approx(malignant["precision"])
    assert online["roc_auc"].value == malignant["roc_auc"]
    assert online["ece"].value == offline["ece"]
    matrix = np.array(offline["confusion_matrix"])
    negatives = np.delete(np.delete(matrix, MALIGNANT, 0), MALIGNANT, 1).sum()
    assert online["specificity"].value == pytest.approx(negatives / np.delete(matrix, MALIGNANT, 0).sum())
    for estimate in online.values():
        assert estimate.low is not None and estimate.high is not None
        assert estimate.low <= estimate.value <= estimate.high


@pytest.mark.heavy
def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    """Wilson's interval of sensitivity and the bootstrap interval of ROC AUC, on 100
    samples of 150 cases from a population whose values are known."""
    population_y, population_p = _random_outputs(99, n=20000)
    positive = population_y == MALIGNANT
    sensitivity = np.mean(population_p[positive].argmax(1) == MALIGNANT)
    auc = roc_auc(positive, population_p[:, MALIGNANT])
    rng = np.random.default_rng(1)
    covered = np.zeros(2)
    for _ in range(100):
        rows = rng.integers(0, len(population_y), 150)
        y, p = population_y[rows], population_p[rows]
        hits = int(np.sum((p.argmax(1) == MALIGNANT) & (y == MALIGNANT)))
        got = (
            wilson(hits, int(np.sum(y == MALIGNANT))),
            bootstrap(lambda r, y=y, p=p: roc_auc(y[r] == MALIGNANT, p[r, MALIGNANT]), len(y), rng, resamples=200),
        )
        covered += [est.low <= truth <= est.high for est, truth in zip(got, (sensitivity, auc), strict=True)]
    assert all(0.86 <= share <= 1.0 for share in covered / 100), covered


def test_cohen_kappa_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    model = rng.integers(0, 3, 80)
    readers = np.where(rng.random(80) < 0.7, model, rng.integers(0, 3, 80))
    assert cohen_kappa(model, readers, 3) == pytest.approx(skm.cohen_kappa_score(model, readers))
    got = agreement(model, readers, 3, rng)
    assert got.low < got.value < got.high
    assert cohen_kappa(np.zeros(5, int), np.zeros(5, int), 3) is None  # all agree on one class: undefined


@pytest.mark.heavy
def test_grouped_by_month_and_scanner() -> None:
    cases = [
        Case((0.1, 0.2, 0.7), 2, "2026-11", "ACME Sono 1"),
        Case((0.8, 0.1, 0.1), 0, "2026-11", "ACME Sono 2"),
        Case((0.2, 0.2, 0.6), 1, "2026-12", "ACME Sono 1"),
    ]
    got = grouped(cases, MALIGNANT, np.random.default_rng(0))
    assert set(got["month"]) == {"2026-11", "2026-12"} and set(got["scanner"]) == {"ACME Sono 1", "ACME Sono 2"}
    assert got["all"]["all"]["ppv"].value == pytest.approx(0.5)
    assert got["scanner"]["ACME Sono 1"]["sensitivity"].value == 1.0
    assert got["month"]["2026-12"]["sensitivity"].n == 0 and got["month"]["2026-12"]["sensitivity"].value is None


def test_trends_per_scanner_then_month_in_order() -> None:
    cases = [
        Case((0.8, 0.1, 0.1), 0, "2026-11", "ACME Sono 2"),
        Case((0.1, 0.2, 0.7), 2, "2026-12", "ACME Sono 1"),
        Case((0.2, 0.2, 0.6), 2, "2026-11", "ACME Sono 1"),
        Case((0.7, 0.2, 0.1), 2, "2026-11", "ACME Sono 1"),
    ]
    got = trends(cases, MALIGNANT, np.random.default_rng(0))
    assert list(got) == ["ACME Sono 1", "ACME Sono 2"] and list(got["ACME Sono 1"]) == ["2026-11", "2026-12"]
    assert got["ACME Sono 1"]["2026-11"]["sensitivity"].value == pytest.approx(0.5)
    assert got["ACME Sono 1"]["2026-12"]["sensitivity"].value == 1.0
    assert list(got["ACME Sono 2"]) == ["2026-11"] and got["ACME Sono 2"]["2026-11"]["specificity"].n == 1


# ---- drift ----------------------------------------------------------------------


def _embedding_like(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Three well separated classes (as a classifier's embedding has) in 32
    dimensions; ``shift`` moves every point along a direction of little variance."""
    centres = np.eye(3, 32) * 8.0
    points = centres[rng.integers(0, 3, n)] + rng.normal(scale=1.0, size=(n, 32))
    points[:, 31] += shift
    return points


@pytest.mark.heavy
def test_mmd_finds_a_shift_the_classes_hide_and_stays_calm_without_one() -> None:
    rng = np.random.default_rng(0)
    reference = _embedding_like(rng, 100)
    assert mmd_test(reference, _embedding_like(rng, 40, shift=1.5), 999, rng).p_value <= 0.001
    null = [mmd_test(reference, _embedding_like(rng, 40), 199, rng).p_value for _ in range(40)]
    assert min(null) > 0.005 and 0.3 < float(np.median(null)) < 0.7  # exact test: p uniform under the null


def test_study_embeddings_average_each_studys_images_in_arrival_order() -> None:
    embeddings = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    assert study_embeddings(embeddings, ["b", "b", "a", "c"]).tolist() == [[2.0, 0.0], [0.0, 2.0], [5.0, 5.0]]


@pytest.mark.heavy
def test_watch_alarms_only_after_the_change() -> None:
    rng = np.random.default_rng(5)
    stream = np.concatenate([_embedding_like(rng, 200), _embedding_like(rng, 100, shift=1.5)])
    windows = watch(stream, np.zeros(300), np.zeros(300), np.zeros(300, int), 3, DriftConfig(), rng)
    assert [w.end for w in windows][:2] == [140, 150] and windows[-1].end == 300
    assert not any(w.alarm for w in windows if w.end <= 200)
    assert min(w.end for w in windows if w.alarm) <= 240
    assert windows[0].class_mix == (1.0, 0.0, 0.0)


@pytest.mark.heavy
def test_watch_alarms_on_the_pictures_when_the_embedding_does_not_move() -> None:
    """A probe swap the model's embedding ignores still moves the domain guard's score."""
    rng = np.random.default_rng(6)
    stream = _embedding_like(rng, 300)
    guard = np.concatenate([rng.normal(2.5, 0.3, 200), rng.normal(3.2, 0.3, 100)])
    windows = watch(stream, guard, np.zeros(300), np.zeros(300, int), 3, DriftConfig(), rng)
    assert not any(w.alarm for w in windows if w.end <= 200)
    assert min(w.end for w in windows if w.alarm) <= 240
    assert guard_unit([0.0, np.e - 1]) == pytest.approx(0.5)


def test_drift_config_refuses_a_level_its_permutations_cannot_reach() -> None:
    with pytest.raises(ValueError, match="at least 1999"):
        DriftConfig(alpha=0.001, permutations=999)


@pytest.mark.integration
@pytest.mark.slow
def test_bench_quick_detects_the_probe_swap_without_false_alarm(tmp_path: Path) -> None:
    """bench/monitoring.py --quick on the shipped model: rendered phantom, real ONNX Runtime."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "monitoring.py"), "--quick", "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    last = run.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"detection delay median (\S+) studies \(max (\S+)\), false alarms (\d+) of (\d+) seeds", last)
    assert match, run.stdout + run.stderr
    assert int(match[2]) <= 60 and match.groups()[2:] == ("0", "1")
    assert run.returncode == 0
