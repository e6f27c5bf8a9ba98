"""Fitting and measuring the domain guard and the probability calibration.

The guard (service.model.guard) is chosen by measurement: :func:`compare_detectors`
scores the candidates the literature offers that this model's outputs allow - the
distance to the nearest class centroid of the training embeddings (the guard before),
class-conditional Mahalanobis distance and k-th-nearest-neighbour distance on the
embedding, the maximum softmax probability, and the B-mode input statistics - on the
out-of-domain sources (training.ood_sources), AUROC against the held-out split and
flag rates at each detector's own validation threshold. The B-mode statistics win
(see the report); :func:`fit_guard` fits them.

Calibration is temperature scaling (Guo et al. 2017), fitted by negative
log-likelihood; it never changes the predicted class, so accuracy is untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

from service.model.guard import FEATURES, DomainGuard, bmode_statistics, calibrated, mahalanobis
from service.model_card import CalibrationSpec, OodSpec
from service.monitoring.classification import expected_calibration_error, reliability_bins
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


def _nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12))))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray, fitted_on: str = "") -> CalibrationSpec:
    """The temperature that minimises the negative log-likelihood of ``labels``."""

    def loss(log_t: float) -> float:
        return _nll(calibrated(probabilities, CalibrationSpec(temperature=float(np.exp(log_t)))), labels)

    best = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return CalibrationSpec(temperature=round(float(np.exp(best.x)), 6), fitted_on=fitted_on)


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


def calibration_report(
    spec: CalibrationSpec, splits: dict[str, tuple[np.ndarray, np.ndarray]], bins: int
) -> dict[str, Any]:
    """ECE before and after calibration on each named (probabilities, labels) set,
    with the noise floor of a perfectly calibrated model on that many images."""
    report: dict[str, Any] = {"method": spec.method, "temperature": spec.temperature, "fitted_on": spec.fitted_on}
    for name, (probabilities, labels) in splits.items():
        after = calibrated(probabilities, spec)
        report[name] = {
            "images": len(labels),
            "ece_before": expected_calibration_error(probabilities, labels, bins),
            "ece_after": expected_calibration_error(after, labels, bins),
            "ece_noise_floor": ece_noise_floor(after, bins),
        }
    return report


def plot_reliability(
    probabilities: np.ndarray, labels: np.ndarray, spec: CalibrationSpec, bins: int, path: Path
) -> Path:
    """Accuracy against confidence per bin, before and after calibration."""
    from training.evaluate import _figure

    fig = Figure(figsize=(3.6, 3.4))
    ax = fig.subplots()
    edges = np.linspace(0, 1, bins + 1)
    for probs, label in (
        (probabilities, "before"),
        (calibrated(probabilities, spec), f"after (T={spec.temperature:.2f})"),
    ):
        points = reliability_bins(probs, labels, bins)
        ax.plot([c for _, c, _ in points], [a for _, _, a in points], "o-", ms=3, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(edges[0], 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper left")
    return _figure(path, fig)


def assess(
    outputs: Outputs,
    images: np.ndarray,
    labels: np.ndarray,
    parts: dict[str, Sequence[int]],
    ood: OodSpec,
    calibration: CalibrationSpec,
    measure: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    bins: int,
    reliability_path: Path,
) -> dict[str, Any]:
    """The report's sections on the guard (``ood``: the fitted guard per source and
    the candidates it beat) and on calibration, for a model given as ``outputs``;
    ``parts`` indexes fit, val and test in ``images``; ``measure`` is a further
    held-out set (uint8 images, labels) where the source makes one."""
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
    guard["candidates"] = compare_detectors(scored["fit"], scored["val"], test, sources, outputs, num_classes)
    sets = {"held-out split": (test.probabilities, test.labels)}
    if measure is not None:
        sets[f"fresh held-out images ({len(measure[1])})"] = (outputs(measure[0])[0], measure[1])
    largest = max(sets.values(), key=lambda s: len(s[1]))
    plot_reliability(*largest, calibration, bins, reliability_path)
    return {"ood": guard, "calibration": calibration_report(calibration, sets, bins)}
