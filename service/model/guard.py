"""The domain guard and the probability calibration, both read from the model card.

Why input statistics and not the embedding: measured on the shipped model (see
``onnx_models/README.md``), real non-breast ultrasound, CT, MR, photographs and
generated images land next to the training images in the model's own embedding
(class-centroid distance, Mahalanobis and k-nearest-neighbour distance flag 10-48 %
of the real ultrasound frames), while the picture's own B-mode statistics - speckle
contrast, grey-level spread, texture direction, brightness by depth - are ten times
farther from the training images than any training image is. The guard is the
Mahalanobis distance of those statistics to the training images' (mean and
Ledoit-Wolf shrunk covariance fitted on the training split, threshold a percentile
of the validation split; ``training/calibration.py`` fits both).

Pure numpy, the same function in training and at run time, on the model's input
(the resized crop), so a model trained on a site's own images gets a guard fitted
to its own images unchanged.
"""

from __future__ import annotations

import numpy as np

from service.model_card import CalibrationSpec, InputSpec, OodSpec

#: Side of the square patches whose speckle contrast is measured (model-input pixels).
PATCH = 8
#: A patch darker than this mean grey level is background: no speckle to measure.
PATCH_DARK = 20.0
#: Grey level at or below which a pixel is dark, at or above which it is saturated.
DARK, SATURATED = 16.0, 240.0
#: Horizontal bands whose brightness, relative to the whole picture's, describes
#: how the echo changes with depth (ultrasound is brighter near the skin line and
#: shadowed below, never the other way round).
DEPTH_BANDS = 16
#: Grey-level histogram bins of the entropy feature.
HISTOGRAM_BINS = 32

#: What :func:`bmode_statistics` returns per image, in this order (the card stores it).
FEATURES: tuple[str, ...] = (
    "mean",
    "std",
    "dark_fraction",
    "saturated_fraction",
    "horizontal_gradient",
    "vertical_gradient",
    "speckle_snr",
    "flat_patch_fraction",
    "histogram_entropy",
    *(f"depth_band_{k + 1}" for k in range(DEPTH_BANDS)),
)


def pixels_of(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """float32 [N, H, W] grey levels 0..255 of a prepared batch [N, 1, H, W] (the
    model card's normalisation undone)."""
    return (batch[:, 0] * spec.std + spec.mean) * 255.0


def bmode_statistics(images: np.ndarray) -> np.ndarray:
    """float64 [N, len(FEATURES)]: evidence that each grey image [N, H, W] (0..255)
    is B-mode ultrasound of the kind the model learned.

    Speckle signal-to-noise (mean / standard deviation of small bright patches) is
    close to 1.9 for fully developed speckle and far from it in CT, MR, photographs
    and drawings; the other features catch flat regions, saturated graphics and an
    echo that does not fade with depth. Patches are whole PATCH x PATCH squares (a
    remainder at the right and bottom is left out of them); H must be at least
    DEPTH_BANDS and PATCH, W at least PATCH.
    """
    x = np.asarray(images, dtype=np.float64)
    n, height, width = x.shape
    mean = x.mean(axis=(1, 2))
    whole = x[:, : height - height % PATCH, : width - width % PATCH]  # whole patches only
    patches = whole.reshape(n, height // PATCH, PATCH, width // PATCH, PATCH).transpose(0, 1, 3, 2, 4)
    patches = patches.reshape(n, -1, PATCH * PATCH)
    patch_mean, patch_std = patches.mean(axis=2), patches.std(axis=2)
    bright = patch_mean > PATCH_DARK
    snr = patch_mean / np.maximum(patch_std, 1e-3)
    speckle = np.array([np.median(s[b]) if b.any() else 0.0 for s, b in zip(snr, bright, strict=True)])
    levels = np.clip((x * (HISTOGRAM_BINS / 256.0)).astype(np.int64), 0, HISTOGRAM_BINS - 1).reshape(n, -1)
    histogram = np.stack([np.bincount(row, minlength=HISTOGRAM_BINS) for row in levels]) / levels.shape[1]
    entropy = -np.sum(np.where(histogram > 0, histogram * np.log(np.maximum(histogram, 1e-12)), 0.0), axis=1)
    bands = np.stack([band.mean(axis=(1, 2)) for band in np.array_split(x, DEPTH_BANDS, axis=1)], axis=1)
    bands /= np.maximum(mean, 1.0)[:, None]
    return np.column_stack(
        [
            mean,
            x.std(axis=(1, 2)),
            (x <= DARK).mean(axis=(1, 2)),
            (x >= SATURATED).mean(axis=(1, 2)),
            np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)),
            np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)),
            speckle,
            (patch_std < 2.0).mean(axis=1),
            entropy,
            bands,
        ]
    )


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``features`` to ``mean``."""
    centred = features - mean
    return np.einsum("nd,de,ne->n", centred, precision, centred)


class DomainGuard:
    """The card's guard: a score per image (higher = farther from the training
    images) and whether it passes the card's threshold."""

    def __init__(self, spec: OodSpec) -> None:
        if tuple(spec.features) != FEATURES:
            raise ValueError(
                f"the card's guard uses features {spec.features}, this node computes {list(FEATURES)}: "
                "refit it with `sonocase calibrate`"
            )
        self.spec = spec
        self._mean = np.asarray(spec.mean, dtype=np.float64)
        self._precision = np.asarray(spec.precision, dtype=np.float64)

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    def score(self, images: np.ndarray) -> np.ndarray:
        """float32 [N]: the guard's score of grey images [N, H, W] (0..255)."""
        if len(images) == 0:
            return np.zeros(0, np.float32)
        return mahalanobis(bmode_statistics(images), self._mean, self._precision).astype(np.float32)


def calibrated(probabilities: np.ndarray, calibration: CalibrationSpec | None) -> np.ndarray:
    """The card's calibration of softmax outputs: softmax(W log p + b) (Dirichlet
    calibration, Kull et al. 2019; vector scaling where W is diagonal), or without W
    temperature scaling (Guo et al. 2017), softmax(log p / T), which equals
    softmax(logits / T) since log p differs from the logits by a constant per row and
    never changes the predicted class."""
    if calibration is None or len(probabilities) == 0:
        return probabilities
    log_p = np.log(np.maximum(probabilities.astype(np.float64), 1e-12))
    if calibration.weights is not None and calibration.bias is not None:
        logits = log_p @ np.asarray(calibration.weights).T + np.asarray(calibration.bias)
    elif calibration.temperature != 1.0:
        logits = log_p / calibration.temperature
    else:
        return probabilities
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)
