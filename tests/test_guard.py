"""The domain guard and the calibration: the statistics, the fits, and the shipped
model's guard on the real ultrasound files and on synthetic studies as the node
receives them."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from sklearn.covariance import LedoitWolf

from service.datasets.synthetic import synthetic_study
from service.model.guard import FEATURES, DomainGuard, bmode_statistics, calibrated, pixels_of
from service.model.imaging import prepare_instance
from service.model.inference import OnnxModel
from service.model_card import CalibrationSpec
from service.monitoring.classification import expected_calibration_error
from service.settings import Settings
from training.calibration import (
    ODIR_STRENGTHS,
    auroc,
    choose_calibration,
    fit_calibration,
    fit_gaussian,
    fit_guard,
    ledoit_wolf,
)
from training.ood_sources import generated, real_ultrasound_files


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(Settings().model_path, "cpu")


def _speckle(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """Fully developed speckle: Rayleigh amplitude, log-compressed like a scanner's,
    fading with depth."""
    amplitude = rng.rayleigh(1.0, (n, size, size)) * np.linspace(1.0, 0.4, size)[None, :, None]
    return np.clip(60 + 40 * np.log1p(4 * amplitude), 0, 255)


def test_bmode_statistics_tell_speckle_from_flat_and_from_noise() -> None:
    rng = np.random.default_rng(0)
    speckle = bmode_statistics(_speckle(rng, 3))
    flat = bmode_statistics(np.full((1, 64, 64), 128.0))
    noise = bmode_statistics(rng.integers(0, 256, (1, 64, 64)).astype(np.float64))
    column = {name: i for i, name in enumerate(FEATURES)}
    assert speckle.shape == (3, len(FEATURES))
    assert flat[0, column["flat_patch_fraction"]] == 1.0 and speckle[0, column["flat_patch_fraction"]] == 0.0
    assert noise[0, column["speckle_snr"]] < speckle[0, column["speckle_snr"]]
    assert speckle[0, column["depth_band_1"]] > speckle[0, column["depth_band_16"]]  # fades with depth
    odd = bmode_statistics(_speckle(rng, 1, size=60))  # a size that is no multiple of the patches
    assert odd.shape == (1, len(FEATURES)) and np.isfinite(odd).all()


def test_ledoit_wolf_is_sklearns() -> None:
    x = np.random.default_rng(1).standard_normal((40, 6)) @ np.diag([1, 2, 3, 1, 1, 5])
    x -= x.mean(axis=0)
    assert np.allclose(ledoit_wolf(x), LedoitWolf(assume_centered=True).fit(x).covariance_)


def test_a_fitted_guard_flags_what_it_was_not_fitted_on() -> None:
    rng = np.random.default_rng(2)
    fit, val, held_out = _speckle(rng, 200), _speckle(rng, 100), _speckle(rng, 100)
    spec = fit_guard(fit, val, percentile=99.0)
    mean, precision = fit_gaussian(bmode_statistics(fit))
    assert np.allclose(spec.mean, mean) and np.allclose(spec.precision, precision)
    guard = DomainGuard(spec)
    assert np.mean(guard.score(held_out) > spec.threshold) <= 0.05
    for kind in ("noise", "shapes", "smooth", "text"):
        assert np.all(guard.score(generated(kind, 5, 64, seed=3).astype(np.float64)) > spec.threshold), kind


def test_temperature_is_recovered_and_never_changes_the_class() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (4000, 3))
    truth = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(axis=1, keepdims=True)
    labels = (rng.random((4000, 1)) > np.cumsum(truth, axis=1)).sum(axis=1)
    overconfident = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    spec = fit_calibration(overconfident, labels, "temperature")
    assert spec.temperature == pytest.approx(2.0, rel=0.1)
    fixed = calibrated(overconfident, spec)
    assert np.allclose(fixed, truth, atol=0.05) and np.array_equal(fixed.argmax(1), overconfident.argmax(1))
    assert calibrated(overconfident, CalibrationSpec(temperature=1.0)) is overconfident


def _draw(rng: np.random.Generator, truth: np.ndarray) -> np.ndarray:
    """One label per row drawn from the row's probabilities."""
    return np.minimum((rng.random((len(truth), 1)) > np.cumsum(truth, axis=1)).sum(axis=1), truth.shape[1] - 1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_vector_scaling_undoes_a_class_wise_bias_that_temperature_cannot() -> None:
    """One class underconfident, another overconfident (as the shipped model's
    malignant and normal): a single temperature cannot fix both, vector scaling can;
    cross-validation on the set alone chooses it, and the card's map reproduces it."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2.5, (6000, 3))
    truth = _softmax(logits)
    labels = _draw(rng, truth)
    skewed = _softmax(logits * np.array([1.6, 1.0, 0.7]) + np.array([0.5, 0.0, -0.6]))
    before = expected_calibration_error(skewed, labels)
    temperature = calibrated(skewed, fit_calibration(skewed, labels, "temperature"))
    vector = fit_calibration(skewed, labels, "vector")
    fixed = calibrated(skewed, vector)
    assert expected_calibration_error(fixed, labels) < 0.02 < before
    assert expected_calibration_error(fixed, labels) < expected_calibration_error(temperature, labels)
    assert np.abs(fixed - truth).mean() < np.abs(temperature - truth).mean()
    chosen = choose_calibration(skewed, labels, [str(i // 3) for i in range(len(labels))], 15, "test")
    assert chosen.method != "temperature" and len(chosen.candidates) == 1 + 2 + len(ODIR_STRENGTHS)
    assert CalibrationSpec.model_validate_json(chosen.model_dump_json()) == chosen


def test_dirichlet_with_strong_odir_shrinks_to_no_off_diagonal_weights() -> None:
    rng = np.random.default_rng(6)
    probabilities = _softmax(rng.normal(0, 2, (2000, 3)))
    labels = _draw(rng, probabilities)
    loose = fit_calibration(probabilities, labels, "dirichlet-odir", odir=0.0)
    tight = fit_calibration(probabilities, labels, "dirichlet-odir", odir=100.0)
    off = ~np.eye(3, dtype=bool)
    assert loose.weights is not None and tight.weights is not None and tight.bias is not None
    assert np.abs(np.array(tight.weights)[off]).max() < 0.01 < np.abs(np.array(loose.weights)[off]).max()
    assert np.abs(tight.bias).max() < 0.01


def test_a_calibration_spec_needs_square_weights_and_a_bias_with_them() -> None:
    with pytest.raises(ValueError, match="come together"):
        CalibrationSpec(method="vector", weights=[[1.0]])
    with pytest.raises(ValueError, match="2 x 2"):
        CalibrationSpec(method="vector", weights=[[1.0, 0.0]], bias=[0.0, 0.0])


def test_auroc_counts_ties_half() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([2.0, 3.0]), np.array([0.0])) == 0.0


@pytest.mark.heavy
def test_the_shipped_guard_flags_every_frame_of_the_real_ultrasound_files(model: OnnxModel) -> None:
    """Echocardiograms, obstetric and abdominal scans: not one breast, and not one
    frame the node would analyse passes the guard."""
    frames = 0
    for path in real_ultrasound_files():
        prepared = prepare_instance(dcmread(path), model.card.input, Settings().max_cine_frames)
        if not prepared.frames:
            continue
        out = model.run(np.stack([f.tensor for f in prepared.frames]))
        assert out.out_of_distribution.all(), (path.name, out.ood_distance.tolist(), model.card.ood.threshold)
        frames += len(prepared.frames)
    assert frames >= 20


@pytest.mark.heavy
def test_the_shipped_guard_passes_synthetic_studies_as_the_node_receives_them(model: OnnxModel) -> None:
    scores = []
    for k, label in enumerate(("normal", "benign", "malignant") * 4):
        for ds in synthetic_study(2, label, seed=900 + k, variant="ybr_jpeg"):
            prepared = prepare_instance(ds, model.card.input, 1)
            scores += model.guard.score(
                pixels_of(np.stack([f.tensor for f in prepared.frames]), model.card.input)
            ).tolist()
    assert np.mean(np.array(scores) > model.card.ood.threshold) <= 0.1
