"""Fitting and measuring the domain guard and the probability calibration.

The guard (service.model.guard) is chosen by measurement: :func:`compare_detectors`
scores the candidates the literature offers that this model's outputs allow - the
distance to the nearest class centroid of the training embeddings (the guard before),
class-conditional Mahalanobis distance and k-th-nearest-neighbour distance on the
embedding, the maximum softmax probability, and the B-mode input statistics - on the
out-of-domain sources (training.ood_sources), AUROC against the held-out split and
flag rates at each detector's own validation threshold. The B-mode statistics win
(see the report); :func:`fit_guard` fits them.

Calibration is chosen by measurement too: :func:`compare_calibrators` fits the maps
of the family softmax(W log p + b) - temperature scaling (Guo et al. 2017), vector
scaling (Guo et al. 2017) and Dirichlet calibration with off-diagonal and intercept
regularisation (ODIR, Kull et al. 2019) - by negative log-likelihood and scores each
by cross-validation on the calibration set alone; :func:`choose_calibration` fits
the one of lowest out-of-fold ECE on the whole set. A held-out set that measures
the result plays no part in the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize

from service.model.guard import FEATURES, DomainGuard, bmode_statistics, calibrated, mahalanobis
from service.model_card import CalibrationSpec, OodSpec
from service.monitoring.classification import expected_calibration_error, reliability_bins
from training.band_calibration import band_calibration
from training.ood_sources import OodSource, ood_sources

#: The guard's threshold: this percentile of the validation split's scores.
GUARD_PERCENTILE = 99.0
#: k of the k-th-nearest-neighbour candidate.
KNN_K = 5
#: Draws of the simulation that measures the ECE a perfectly calibrated model would show.
NOISE_FLOOR_DRAWS = 200

#: uint8 images [N, H, W] -> (probabilities [N, C] uncalibrated, embeddings [N, D]).
Outputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk covariance of the rows of ``x`` (already centred): the
    sample covariance pulled towards a scaled identity by the amount that minimises
    the expected error (Ledoit & Wolf 2004), invertible even with few images."""
    n, p = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / p
    squared = x**2
    beta = (np.sum(squared.T @ squared) / n - np.sum(sample**2)) / (n * p)
    delta = np.sum((sample - mu * np.eye(p)) ** 2) / p
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return (1.0 - shrinkage) * sample + shrinkage * mu * np.eye(p)


def fit_gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision (inverse shrunk covariance) of ``features``; the features are
    standardised first so that shrinkage does not depend on their units."""
    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), 1e-9)
    covariance = ledoit_wolf((features - mean) / scale)
    precision = np.linalg.inv(covariance) / np.outer(scale, scale)
    return mean, precision


def fit_guard(
    fit_images: np.ndarray, val_images: np.ndarray, percentile: float = GUARD_PERCENTILE, fitted_on: str = ""
) -> OodSpec:
    """The B-mode-statistics guard: mean and precision from the training images
    ``fit_images``, threshold the ``percentile`` of the validation images' scores
    (images the fit never saw, so the threshold is not set on the fit's own scores)."""
    mean, precision = fit_gaussian(bmode_statistics(fit_images))
    threshold = float(np.percentile(mahalanobis(bmode_statistics(val_images), mean, precision), percentile))
    return OodSpec(
        features=list(FEATURES),
        mean=mean.tolist(),
        precision=precision.tolist(),
        threshold=threshold,
        percentile=percentile,
        fitted_on=fitted_on,
    )


#: The calibration maps compared, all softmax(W log p + b): W = I / T; W diagonal
#: with b; W full with b, regularised (Dirichlet ODIR).
CALIBRATORS = ("temperature", "vector", "dirichlet-odir")
#: ODIR strengths tried (one for the off-diagonal weights and the bias alike).
ODIR_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)
#: Folds of the cross-validation that chooses the calibration.
CALIBRATION_FOLDS = 5


def _unpack(theta: np.ndarray, method: str, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the parameter vector of ``method``."""
    if method == "temperature":
        return theta[0] * np.eye(c), np.zeros(c)
    if method == "vector":
        return np.diag(theta[:c]), theta[c:]
    return theta[: c * c].reshape(c, c), theta[c * c :]


def _loss(
    theta: np.ndarray, log_p: np.ndarray, onehot: np.ndarray, method: str, odir: float
) -> tuple[float, np.ndarray]:
    """Mean negative log-likelihood of softmax(W log p + b) (plus the ODIR penalty)
    and its gradient in ``theta``."""
    n, c = onehot.shape
    w, b = _unpack(theta, method, c)
    z = log_p @ w.T + b
    z -= z.max(axis=1, keepdims=True)
    log_s = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-np.sum(onehot * log_s) / n)
    residual = (np.exp(log_s) - onehot) / n
    grad_w, grad_b = residual.T @ log_p, residual.sum(axis=0)
    if method == "temperature":
        return loss, np.array([np.trace(grad_w)])
    if method == "vector":
        return loss, np.concatenate([np.diag(grad_w), grad_b])
    off = 1.0 - np.eye(c)
    loss += odir * (float(np.sum((w * off) ** 2)) / (c * (c - 1)) + float(b @ b) / c)
    grad_w = grad_w + odir * 2.0 * w * off / (c * (c - 1))
    return loss, np.concatenate([grad_w.ravel(), grad_b + odir * 2.0 * b / c])


def fit_calibration(
    probabilities: np.ndarray, labels: np.ndarray, method: str = "temperature", odir: float = 0.0, fitted_on: str = ""
) -> CalibrationSpec:
    """The map of ``method`` (one of CALIBRATORS) that minimises the negative
    log-likelihood of ``labels``; ``odir`` weighs Dirichlet's regularisation."""
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}: one of {CALIBRATORS}")
    c = probabilities.shape[1]
    log_p = np.log(np.maximum(probabilities.astype(np.float64), 1e-12))
    onehot = np.eye(c)[labels]
    start = {"temperature": np.ones(1), "vector": np.r_[np.ones(c), np.zeros(c)]}.get(
        method, np.r_[np.eye(c).ravel(), np.zeros(c)]
    )
    bounds = [(1 / 20.0, 20.0)] if method == "temperature" else None
    theta = minimize(_loss, start, args=(log_p, onehot, method, odir), jac=True, method="L-BFGS-B", bounds=bounds).x
    if method == "temperature":
        return CalibrationSpec(temperature=round(float(1.0 / theta[0]), 6), fitted_on=fitted_on)
    w, b = _unpack(theta, method, c)
    return CalibrationSpec(
        method=method if method == "vector" else f"{method} (strength {odir:g})",
        weights=np.round(w, 6).tolist(),
        bias=np.round(b, 6).tolist(),
        fitted_on=fitted_on,
    )


#: Every (method, ODIR strength) that :func:`compare_calibrators` tries.
CANDIDATES: tuple[tuple[str, float], ...] = (
    ("temperature", 0.0),
    ("vector", 0.0),
    *(("dirichlet-odir", strength) for strength in ODIR_STRENGTHS),
)


def compare_calibrators(
    probabilities: np.ndarray, labels: np.ndarray, groups: Sequence[str], bins: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Per candidate (none, then each of CANDIDATES): ECE
    and negative log-likelihood of the out-of-fold calibrated probabilities of a
    CALIBRATION_FOLDS-fold cross-validation on this set (folds by ``groups``, so
    views of one patient never sit on both sides), and whether the predicted class
    changes anywhere."""
    names = sorted(set(groups))
    fold_of_group = dict(
        zip(names, np.random.default_rng(seed).permutation(len(names)) % CALIBRATION_FOLDS, strict=True)
    )
    fold = np.array([fold_of_group[g] for g in groups])
    rows = [
        {
            "method": "none",
            "ece": expected_calibration_error(probabilities, labels, bins),
            "nll": _nll(probabilities, labels),
            "class_changed": 0.0,
        }
    ]
    for method, odir in CANDIDATES:
        out_of_fold = np.zeros_like(probabilities, dtype=np.float32)
        for k in range(CALIBRATION_FOLDS):
            held = fold == k
            spec = fit_calibration(probabilities[~held], labels[~held], method, odir)
            out_of_fold[held] = calibrated(probabilities[held], spec)
        rows.append(
            {
                "method": spec.method,
                "calibrator": method,
                "odir": odir,
                "ece": expected_calibration_error(out_of_fold, labels, bins),
                "nll": _nll(out_of_fold, labels),
                "class_changed": float(np.mean(out_of_fold.argmax(axis=1) != probabilities.argmax(axis=1))),
            }
        )
    return rows


def choose_calibration(
    probabilities: np.ndarray, labels: np.ndarray, groups: Sequence[str], bins: int, fitted_on: str
) -> CalibrationSpec:
    """The candidate of lowest out-of-fold ECE (:func:`compare_calibrators`), fitted on
    the whole set, with the comparison that chose it."""
    rows = compare_calibrators(probabilities, labels, groups, bins)
    best = min(rows[1:], key=lambda r: r["ece"])
    spec = fit_calibration(probabilities, labels, best["calibrator"], best["odir"], fitted_on)
    return CalibrationSpec.model_validate({**spec.model_dump(), "candidates": rows})


def _nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12))))


def ece_noise_floor(probabilities: np.ndarray, bins: int, seed: int = 0) -> float:
    """Mean ECE that a perfectly calibrated model with these confidences shows on this
    many images (labels drawn from its own probabilities): below it, a measured ECE
    says nothing more."""
    rng = np.random.default_rng(seed)
    p = probabilities / probabilities.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(p, axis=1)
    draws = []
    for _ in range(NOISE_FLOOR_DRAWS):
        labels = (rng.random((len(p), 1)) > cumulative).sum(axis=1)
        draws.append(expected_calibration_error(p, np.minimum(labels, p.shape[1] - 1), bins))
    return float(np.mean(draws))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Probability that an out-of-domain score exceeds an in-domain one (ties half)."""
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + 0.5 * ties)


@dataclass(frozen=True)
class Scored:
    """One part of the labelled data with a model's uncalibrated outputs on it."""

    images: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray


def _detectors(fit: Scored, num_classes: int) -> dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """Candidate scores (higher = more foreign) fitted on the training images: each
    takes (images, probabilities, embeddings)."""
    centroids = np.stack([fit.embeddings[fit.labels == c].mean(axis=0) for c in range(num_classes)])
    _, shared = fit_gaussian(fit.embeddings - centroids[fit.labels])
    mean, precision = fit_gaussian(bmode_statistics(fit.images))
    return {
        "centroid distance (embedding; the guard before)": lambda _i, _p, e: np.linalg.norm(
            e[:, None] - centroids[None], axis=2
        ).min(axis=1),
        "class-conditional Mahalanobis (embedding)": lambda _i, _p, e: np.min(
            [mahalanobis(e, c, shared) for c in centroids], axis=0
        ),
        f"{KNN_K}th-nearest training image (embedding, cosine)": lambda _i, _p, e: np.sort(
            1.0 - e @ fit.embeddings.T, axis=1
        )[:, KNN_K - 1],
        "maximum softmax probability": lambda _i, p, _e: 1.0 - p.max(axis=1),
        "B-mode input statistics (Mahalanobis)": lambda i, _p, _e: mahalanobis(bmode_statistics(i), mean, precision),
    }


def compare_detectors(
    fit: Scored, val: Scored, test: Scored, sources: Sequence[OodSource], outputs: Outputs, num_classes: int
) -> list[dict[str, Any]]:
    """Per candidate: the held-out split's flag rate at the candidate's own threshold
    (GUARD_PERCENTILE of the validation scores), per source the flag rate, and the
    AUROC of the held-out split against the tuning sources and against the held-out
    sources."""
    source_outputs = {s.name: outputs(s.images) for s in sources}
    rows = []
    for name, detector in _detectors(fit, num_classes).items():
        threshold = float(np.percentile(detector(val.images, val.probabilities, val.embeddings), GUARD_PERCENTILE))
        inside = detector(test.images, test.probabilities, test.embeddings)
        scores = {s.name: detector(s.images, *source_outputs[s.name]) for s in sources}
        tuning = np.concatenate([scores[s.name] for s in sources if not s.held_out])
        held_out = np.concatenate([scores[s.name] for s in sources if s.held_out])
        rows.append(
            {
                "detector": name,
                "test_flagged": float(np.mean(inside > threshold)),
                "auroc_tuning": auroc(inside, tuning),
                "auroc_held_out": auroc(inside, held_out),
                "flagged": {s.name: float(np.mean(scores[s.name] > threshold)) for s in sources},
            }
        )
    return rows


def guard_report(spec: OodSpec, test: Scored, sources: Sequence[OodSource]) -> dict[str, Any]:
    """The fitted guard on the held-out split and on each source."""
    guard = DomainGuard(spec)
    inside = guard.score(test.images)
    scores = {source.name: guard.score(source.images) for source in sources}
    per_source = [
        {
            "source": source.name,
            "held_out": source.held_out,
            "images": len(scores[source.name]),
            "flagged": float(np.mean(scores[source.name] > spec.threshold)),
            "auroc": auroc(inside, scores[source.name]),
            "missed": [item for item, s in zip(source.items, scores[source.name], strict=True) if s <= spec.threshold],
        }
        for source in sources
    ]
    held_out = np.concatenate([scores[s.name] for s in sources if s.held_out])
    return {
        "method": spec.method,
        "threshold": spec.threshold,
        "percentile": spec.percentile,
        "test_flagged_fraction": float(np.mean(inside > spec.threshold)),
        "auroc_held_out": auroc(inside, held_out),
        "sources": per_source,
    }


def _balanced_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([np.mean(probabilities[labels == c].argmax(axis=1) == c) for c in np.unique(labels)]))


def calibration_report(
    spec: CalibrationSpec, splits: dict[str, tuple[np.ndarray, np.ndarray]], bins: int
) -> dict[str, Any]:
    """ECE (and balanced accuracy, which a map other than temperature may move) before
    and after calibration on each named (probabilities, labels) set, with the noise
    floor of a perfectly calibrated model on that many images."""
    report: dict[str, Any] = {
        "method": spec.method,
        "temperature": spec.temperature,
        "weights": spec.weights,
        "bias": spec.bias,
        "fitted_on": spec.fitted_on,
        "candidates": spec.candidates,
    }
    report["sets"] = {}
    for name, (probabilities, labels) in splits.items():
        after = calibrated(probabilities, spec)
        report["sets"][name] = {
            "images": len(labels),
            "ece_before": expected_calibration_error(probabilities, labels, bins),
            "ece_after": expected_calibration_error(after, labels, bins),
            "ece_noise_floor": ece_noise_floor(after, bins),
            "balanced_accuracy_before": _balanced_accuracy(probabilities, labels),
            "balanced_accuracy_after": _balanced_accuracy(after, labels),
        }
    return report


def plot_reliability(
    probabilities: np.ndarray, labels: np.ndarray, spec: CalibrationSpec, bins: int, path: Path, title: str
) -> Path:
    """Accuracy against confidence per bin, before and after calibration, with the
    share of images per bin beneath (a point over few images says little)."""
    from training.evaluate import _figure

    fig = Figure(figsize=(3.8, 4.2))
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0, 1, bins + 1)
    for probs, label in ((probabilities, "before"), (calibrated(probabilities, spec), f"after ({spec.method})")):
        points = reliability_bins(probs, labels, bins)
        ax.plot([c for _, c, _ in points], [a for _, _, a in points], "o-", ms=3, label=label)
        counts.hist(probs.max(axis=1), bins=edges, histtype="step", label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(ylabel="accuracy", xlim=(edges[0], 1), ylim=(0, 1.02))
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    counts.set(xlabel="confidence (top class)", ylabel="images")
    return _figure(path, fig)


def assess(
    outputs: Outputs,
    images: np.ndarray,
    labels: np.ndarray,
    parts: dict[str, Sequence[int]],
    ood: OodSpec,
    calibration: CalibrationSpec,
    measure: tuple[np.ndarray, np.ndarray] | None,
    classes: Sequence[str],
    bins: int,
    reliability_path: Path,
) -> dict[str, Any]:
    """The report's sections on the guard (``ood``: the fitted guard per source and
    the candidates it beat) and on calibration, for a model given as ``outputs``;
    ``parts`` indexes fit, val and test in ``images``; ``measure`` is a further
    held-out set (uint8 images, labels) where the source makes one: the reliability
    diagram and the BI-RADS bands are drawn on the largest held-out set."""
    scored = {
        name: Scored(images[list(idx)], labels[list(idx)], *outputs(images[list(idx)])) for name, idx in parts.items()
    }
    test = scored["test"]
    sources = [
        *ood_sources(images.shape[1]),
        OodSource(
            "synthetic-upside-down",
            test.images[:, ::-1].copy(),
            tuple(f"test image {i} flipped" for i in range(len(test.images))),
        ),
    ]
    guard = guard_report(ood, test, sources)
    guard["candidates"] = compare_detectors(scored["fit"], scored["val"], test, sources, outputs, len(classes))
    sets = {"held-out split": (test.probabilities, test.labels)}
    if measure is not None:
        sets["fresh held-out images"] = (outputs(measure[0])[0], measure[1])
    name, largest = max(sets.items(), key=lambda s: len(s[1][1]))
    plot_reliability(*largest, calibration, bins, reliability_path, f"{name}, n = {len(largest[1])}")
    report = calibration_report(calibration, sets, bins)
    # The node's BI-RADS band comes from the calibrated probability: check it on the most images.
    report["birads_bands_on"] = name
    report["birads_bands"] = band_calibration(largest[1], calibrated(largest[0], calibration), classes)
    return {"ood": guard, "calibration": report}
