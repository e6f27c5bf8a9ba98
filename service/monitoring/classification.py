"""Classification metrics of probabilities against true classes, in numpy.

One implementation for offline evaluation (``sonocase evaluate``, training/evaluate.py)
and the node's real-world performance (service.monitoring.performance): on the same
images both must give the same numbers, so neither keeps a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold (ties kept
    together), from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(positive)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = positive.sum(), len(positive) - positive.sum()
    return np.r_[0.0, fps / max(n_neg, 1)], np.r_[0.0, tps / max(n_pos, 1)]


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (trapezoids, ties count half); None when the test
    set lacks positives or negatives."""
    if positive.all() or not positive.any():
        return None
    fpr, tpr = roc_curve(positive, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, float]]:
    """Per non-empty equal-width confidence bin: (share of images, mean confidence,
    accuracy) of the top-label prediction: the reliability diagram's points."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    points = []
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            points.append((float(in_bin.mean()), float(confidence[in_bin].mean()), float(correct[in_bin].mean())))
    return points


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the
    bin's share of images (Guo et al. 2017)."""
    return float(
        sum(share * abs(accuracy - confidence) for share, confidence, accuracy in reliability_bins(probs, y_true, bins))
    )


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    n = len(classes)
    y_pred = probs.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, n)
    per_class: dict[str, dict[str, float | int | None]] = {}
    recalls, f1s, aucs = [], [], []
    for c, name in enumerate(classes):
        tp, support, predicted = matrix[c, c], matrix[c].sum(), matrix[:, c].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        auc = roc_auc(y_true == c, probs[:, c])
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "roc_auc": auc,
            "support": int(support),
        }
        if support:
            recalls.append(recall)
            f1s.append(f1)
        if auc is not None:
            aucs.append(auc)
    return {
        "n_test": len(y_true),
        "accuracy": float(np.mean(y_pred == y_true)),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "ece": expected_calibration_error(probs, y_true),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }
