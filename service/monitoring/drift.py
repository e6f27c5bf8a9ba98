"""Input drift: has what the scanners send moved away from what the model saw here?

A probe swap or a new preset keeps the Manufacturer and Model Name, so the headers
cannot tell; the images can. Each window of recent studies is compared with a
reference window on the model's own embedding by the maximum mean discrepancy
(Gretton et al., JMLR 2012) with a Gaussian kernel, its p-value from a permutation
test. Why this test: it needs no model of the embedding's distribution (256
dimensions, a hundred studies: no density estimate works there), it sees any change
of the distribution, not only of its mean, and the permutation p-value is exact at
any sample size, so the alarm's false-alarm rate is set by one number (``alpha``).

Why whitened: the embedding is made to separate the classes, so distances in it are
mostly class differences, and a probe swap moves it along directions the classes
hardly use. With the plain embedding the shift of bench/monitoring.py's probe swap
is invisible (p about 0.5 on 40 studies); projected on the pooled windows' leading
principal components, each scaled to unit variance, it is found in every window.
Everything the test derives from the data (components, scale, the kernel's width:
the median distance) is computed on the pooled studies of both windows, which a
permutation does not change, so the p-value stays exact.

A second test looks at the pictures themselves: the same MMD on each study's mean
domain-guard score (log of service.model.guard's Mahalanobis distance of the B-mode
statistics), since a probe's speckle grain and dynamic range move those statistics
whatever a model's embedding does (with the shipped model that learned to segment,
the embedding test alone found bench/monitoring.py's probe swap in 6 of 10 seeds
within 110 studies). The window's p-value is the smaller of the two, doubled
(Bonferroni), so ``alpha`` still bounds each window's false-alarm probability.

A study is one unit (the mean embedding of its images): the views of one breast
are alike, so permuting images would count one patient several times and make the
p-value too small. The out-of-domain rate and the predicted-class mix of each
window are reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Tests per window (the embedding, the domain-guard score): the Bonferroni factor.
TESTS = 2


@dataclass(frozen=True)
class DriftConfig:
    """How drift is watched: window sizes in studies and the alarm's level.

    ``alpha`` is the level of each window's test; the windows of one stream overlap
    and are tested every ``step`` studies, so the alarm's false-alarm rate over a
    month is higher than ``alpha`` and the default is small (bench/monitoring.py
    measures the rate)."""

    reference_size: int = 100
    window_size: int = 40
    step: int = 10
    alpha: float = 0.001
    permutations: int = 1999
    components: int = 10

    def __post_init__(self) -> None:
        if min(self.reference_size, self.window_size, self.step, self.permutations, self.components) < 1:
            raise ValueError(f"drift windows, step and permutations must be positive: {self}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"drift alpha must be between 0 and 1, got {self.alpha}")
        if self.alpha / TESTS * (self.permutations + 1) < 1.0:
            raise ValueError(
                f"{self.permutations} permutations cannot give each of the {TESTS} tests a p-value of "
                f"{self.alpha / TESTS:g} or less: use at least {int(np.ceil(TESTS / self.alpha)) - 1}"
            )


@dataclass(frozen=True)
class MmdTest:
    """One window against the reference: squared MMD (biased estimate) and its
    permutation p-value."""

    mmd2: float
    p_value: float


@dataclass(frozen=True)
class WindowDrift:
    """The drift of the window of studies ``[start, end)`` of a stream."""

    start: int
    end: int
    mmd2: float
    p_value: float
    alarm: bool
    out_of_domain_rate: float
    class_mix: tuple[float, ...]


def whitened(pooled: np.ndarray, components: int) -> np.ndarray:
    """``pooled`` (rows are units) on its leading principal components, each scaled
    to unit variance; components with no variance are dropped. From the units' Gram
    matrix (n x n, n a few hundred) rather than an SVD of the 256-wide data: the
    unit-variance scores are its eigenvectors times sqrt(n - 1)."""
    centred = pooled - pooled.mean(axis=0)
    values, vectors = np.linalg.eigh(centred @ centred.T)
    order = np.argsort(values)[::-1][:components]
    order = order[values[order] > values[order[0]] * 1e-12]
    return vectors[:, order] * np.sqrt(len(pooled) - 1)


def _squared_distances(x: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(axis=1)
    return np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0)


def mmd_test(
    reference: np.ndarray, window: np.ndarray, permutations: int, rng: np.random.Generator, components: int = 10
) -> MmdTest:
    """Squared MMD of ``window`` against ``reference`` (rows are units), whitened on
    ``components`` principal components of the pooled units, Gaussian kernel of the
    median pooled distance; p-value = (1 + permutations at least as large) /
    (1 + permutations)."""
    m, n = len(reference), len(window)
    if m < 2 or n < 2:
        raise ValueError(f"an MMD test needs at least 2 units on each side, got {m} and {n}")
    pooled = whitened(np.concatenate([reference, window]).astype(np.float64), components)
    distances = _squared_distances(pooled)
    median = float(np.median(distances[np.triu_indices(m + n, k=1)]))
    kernel = np.exp(-distances / (median if median > 0 else 1.0))
    signs = np.r_[np.full(m, 1.0 / m), np.full(n, -1.0 / n)]
    # Each row of ``weights`` is one labelling: the observed one, then the shuffles.
    weights = np.empty((permutations + 1, m + n))
    weights[0] = signs
    weights[1:] = rng.permuted(np.tile(signs, (permutations, 1)), axis=1)
    statistics = np.einsum("pi,pi->p", weights @ kernel, weights)
    observed = statistics[0]
    p_value = (1 + int(np.count_nonzero(statistics[1:] >= observed - 1e-12))) / (permutations + 1)
    return MmdTest(mmd2=float(observed), p_value=p_value)


def study_embeddings(embeddings: np.ndarray, study_of_image: Sequence[int]) -> np.ndarray:
    """One unit per study: the mean of its images' embeddings, studies in order of
    first appearance."""
    keys = np.asarray(study_of_image)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    sums = np.zeros((len(first), embeddings.shape[1]))
    np.add.at(sums, inverse, embeddings)
    means = sums / np.bincount(inverse)[:, None]
    return means[np.argsort(first)]


def guard_unit(scores: Sequence[float] | np.ndarray) -> float:
    """A study's domain-guard unit: the mean log of its images' guard scores (the
    squared Mahalanobis distances spread over orders of magnitude)."""
    return float(np.mean(np.log1p(np.maximum(np.asarray(scores, dtype=np.float64), 0.0))))


def window_drift(
    embeddings: np.ndarray,
    guard: np.ndarray,
    out_of_domain: np.ndarray,
    predicted: np.ndarray,
    n_classes: int,
    config: DriftConfig,
    rng: np.random.Generator,
    end: int,
) -> WindowDrift:
    """The window of the ``window_size`` studies before ``end`` against the first
    ``reference_size`` of the stream (rows in arrival order), on the embedding and
    on the guard unit (:func:`guard_unit`). ``out_of_domain`` is the share of a
    study's images the domain guard flagged, ``predicted`` its class index (-1: not
    assessed, counted in no class of the mix)."""
    start = end - config.window_size
    if start < config.reference_size:
        raise ValueError(f"a window ending at study {end} overlaps the reference ({config.reference_size} studies)")
    reference, window = slice(0, config.reference_size), slice(start, end)
    test = mmd_test(embeddings[reference], embeddings[window], config.permutations, rng, config.components)
    units = np.asarray(guard, dtype=np.float64)[:, None]
    pictures = mmd_test(units[reference], units[window], config.permutations, rng, components=1)
    p_value = min(1.0, TESTS * min(test.p_value, pictures.p_value))
    classes = predicted[start:end]
    mix = np.bincount(classes[classes >= 0], minlength=n_classes) / config.window_size
    return WindowDrift(
        start=start,
        end=end,
        mmd2=test.mmd2,
        p_value=p_value,
        alarm=p_value <= config.alpha,
        out_of_domain_rate=float(np.mean(out_of_domain[start:end])),
        class_mix=tuple(float(v) for v in mix),
    )


def watch(
    embeddings: np.ndarray,
    guard: np.ndarray,
    out_of_domain: np.ndarray,
    predicted: np.ndarray,
    n_classes: int,
    config: DriftConfig,
    rng: np.random.Generator,
) -> list[WindowDrift]:
    """:func:`window_drift` every ``step`` studies, from the first window after the
    reference to the end of the stream."""
    first_end = config.reference_size + config.window_size
    return [
        window_drift(embeddings, guard, out_of_domain, predicted, n_classes, config, rng, end)
        for end in range(first_end, len(embeddings) + 1, config.step)
    ]
