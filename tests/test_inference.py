"""The ONNX model at run time, with the shipped model and real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.datasets.records import CLASSES
from service.datasets.synthetic import generate_records, synthetic_study
from service.model.guard import pixels_of
from service.model.imaging import model_input, prepare_instance
from service.model.inference import CPU, CUDA, ModelError, OnnxModel, choose_providers
from service.model_card import ModelCard, card_path_for, sha256_file
from service.settings import Settings
from training.localisation import localisation_metrics, segmentation_metrics


@pytest.fixture
def model_path(settings: Settings) -> Path:
    """The model the node runs by default (setting model_path: the shipped one)."""
    if not settings.model_path.is_file():
        pytest.fail(f"the model {settings.model_path} is missing: it ships in onnx_models/")
    return settings.model_path


@pytest.fixture
def model(model_path: Path) -> OnnxModel:
    return OnnxModel(model_path, "cpu", batch_size=8)


def _batch(model: OnnxModel, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spec = model.card.input
    return ((rng.random((n, 1, spec.height, spec.width)) - spec.mean) / spec.std).astype(np.float32)


def _copy_with_card(model_path: Path, tmp_path: Path, **changes: object) -> Path:
    """The model beside a card with ``changes`` (dotted keys for nested fields)."""
    target = tmp_path / model_path.name
    shutil.copyfile(model_path, target)
    card = json.loads(card_path_for(model_path).read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = card
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    card_path_for(target).write_text(json.dumps(card))
    return target


def test_outputs_follow_the_interface(model: OnnxModel) -> None:
    out = model.run(_batch(model, 5))
    assert out.probabilities.shape == (5, len(model.card.classes))
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert out.embedding.shape == (5, model.card.embedding_dim)
    assert np.allclose(np.linalg.norm(out.embedding, axis=1), 1.0, atol=1e-4)
    assert out.gradcam.ndim == 3 and len(out.gradcam) == 5
    assert out.gradcam.min() >= 0.0 and out.gradcam.max() <= 1.0 + 1e-6
    segmentation = model.card.segmentation
    assert segmentation is not None and out.lesion_mask is not None
    assert out.lesion_mask.shape == (5, segmentation.height, segmentation.width)
    assert out.lesion_mask.dtype == np.float32 and out.lesion_mask.min() >= 0.0 and out.lesion_mask.max() <= 1.0
    assert model.provider == CPU and model.identity.sha256 == model.card.sha256


@pytest.mark.heavy
def test_batches_are_split_at_batch_size_without_changing_results(model_path: Path) -> None:
    batch = _batch(OnnxModel(model_path, "cpu"), 7, seed=1)
    small = OnnxModel(model_path, "cpu", batch_size=3).run(batch)
    large = OnnxModel(model_path, "cpu", batch_size=16).run(batch)
    for a, b in (
        (small.probabilities, large.probabilities),
        (small.embedding, large.embedding),
        (small.gradcam, large.gradcam),
        (small.lesion_mask, large.lesion_mask),
    ):
        assert np.allclose(a, b, atol=1e-5)


@pytest.mark.heavy
def test_gradcam_explains_the_predicted_class_unless_told_otherwise(model: OnnxModel) -> None:
    batch = _batch(model, 6, seed=2)
    default = model.run(batch)
    explicit = model.run(batch, default.predicted)
    assert np.allclose(default.gradcam, explicit.gradcam, atol=1e-5)
    other = model.run(batch, (default.predicted + 1) % len(model.card.classes))
    assert not np.allclose(default.gradcam, other.gradcam, atol=1e-3)
    with pytest.raises(ValueError, match="one entry per image"):
        model.run(batch, np.zeros(2, np.int64))


def test_ood_score_is_the_guard_on_the_model_input(model: OnnxModel) -> None:
    batch = _batch(model, 4, seed=3)
    out = model.run(batch)
    expected = model.guard.score(pixels_of(batch, model.card.input))
    assert np.allclose(out.ood_distance, expected, rtol=1e-5)
    assert np.array_equal(out.out_of_distribution, out.ood_distance > model.card.ood.threshold)


@pytest.mark.parametrize(
    ("calibration", "factor"),
    [
        ({"method": "temperature", "temperature": 0.5}, [1.0, 1.0, 1.0]),  # softmax(2 log p) = p^2 / sum
        # softmax(W log p + b) with W = 2 I, b = (0, 0, log 3): p^2 with the last class tripled
        (
            {"method": "vector", "weights": [[2, 0, 0], [0, 2, 0], [0, 0, 2]], "bias": [0, 0, float(np.log(3))]},
            [1, 1, 3],
        ),
    ],
)
def test_probabilities_are_calibrated_as_the_card_says(
    model: OnnxModel, model_path: Path, tmp_path: Path, calibration: dict[str, object], factor: list[float]
) -> None:
    batch = _batch(model, 4, seed=4)
    raw = model.session.run(["probabilities"], {"image": batch, "target_class": np.full(4, -1)})[0]
    mapped = OnnxModel(_copy_with_card(model_path, tmp_path, calibration=calibration), "cpu")
    got = mapped.run(batch).probabilities
    expected = raw.astype(np.float64) ** 2 * np.array(factor)
    assert np.allclose(got, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize(("threshold", "expected"), [(0.0, True), (1e9, False)])
def test_ood_threshold_comes_from_the_card(model_path: Path, tmp_path: Path, threshold: float, expected: bool) -> None:
    path = _copy_with_card(model_path, tmp_path, **{"ood.threshold": threshold})
    model = OnnxModel(path, "cpu")
    assert model.run(_batch(model, 3)).out_of_distribution.tolist() == [expected] * 3


def test_a_model_file_that_is_not_the_one_its_card_describes_is_refused(model_path: Path, tmp_path: Path) -> None:
    path = _copy_with_card(model_path, tmp_path, sha256="0" * 64)
    with pytest.raises(ModelError, match="sha256"):
        OnnxModel(path)


def test_a_card_that_does_not_match_the_graph_is_refused(model_path: Path, tmp_path: Path) -> None:
    card = ModelCard.load(model_path)
    path = _copy_with_card(
        model_path, tmp_path, **{"input.height": card.input.height + 32, "embedding_dim": card.embedding_dim + 1}
    )
    with pytest.raises(ModelError, match=r"input 'image' has shape .* output 'embedding'"):
        OnnxModel(path)


def test_a_card_without_segmentation_gives_no_mask(model_path: Path, tmp_path: Path) -> None:
    """Models of before (and architectures without a head) load; they outline nothing."""
    model = OnnxModel(_copy_with_card(model_path, tmp_path, segmentation=None), "cpu")
    assert model.run(_batch(model, 2)).lesion_mask is None
    assert model.run(_batch(model, 0)).lesion_mask is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"segmentation.output": "contour"}, "output 'contour' is missing"),
        ({"segmentation.height": 7}, "output 'lesion_mask' has shape .* segmentation says"),
    ],
)
def test_a_segmentation_the_graph_lacks_is_refused(
    model_path: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        OnnxModel(_copy_with_card(model_path, tmp_path, **changes))


def test_missing_model_or_card_is_a_clear_error(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        OnnxModel(tmp_path / "absent.onnx")
    lonely = tmp_path / "lonely.onnx"
    shutil.copyfile(model_path, lonely)
    with pytest.raises(ModelError, match=r"model card .* is missing"):
        OnnxModel(lonely)


def test_a_file_onnx_runtime_cannot_load_is_a_clear_error(model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an ONNX graph")
    card = json.loads(card_path_for(model_path).read_text())
    card["sha256"] = sha256_file(broken)  # the card describes the file: only ONNX Runtime can object
    card_path_for(broken).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        OnnxModel(broken)


def test_execution_provider_choice() -> None:
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(ModelError, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])


@pytest.mark.heavy
def test_synthetic_dicom_studies_through_the_worker_preparation_are_classified_above_chance(
    model: OnnxModel,
) -> None:
    """DICOM -> service.model.imaging -> ONNX Runtime must reproduce what training measured:
    a preparation that differs from training's (crop, grayscale, resize, normalise)
    would drop this to chance."""
    tensors, labels = [], []
    for label, name in enumerate(CLASSES):
        for index in range(8):
            for ds in synthetic_study(2, name, seed=1000 + index, index=index):
                tensors.extend(f.tensor for f in prepare_instance(ds, model.card.input, 1).frames)
                labels.append(label)
    predicted = model.run(np.stack(tensors)).predicted
    labels_arr = np.asarray(labels)
    recalls = [np.mean(predicted[labels_arr == c] == c) for c in range(len(CLASSES))]
    assert np.mean(recalls) > 0.6, recalls


@pytest.mark.heavy
def test_the_shipped_heatmap_points_at_the_lesion(model: OnnxModel) -> None:
    """The issue's fixed sample of unseen synthetic lesions (generate_records(40,
    size=256, seed=777), benign and malignant), prepared as the node prepares a crop
    and the heatmap resized as the node resizes it: the map's peak must lie within
    15 px of the lesion in at least 80 % of images, far above a random point. (The
    held-out split's full numbers are in the model card and its report.)"""
    records = [r for r in generate_records(40, size=256, seed=777) if r.mask is not None]
    batch = np.stack([model_input(r.image, model.card.input) for r in records])
    prediction = model.run(batch)
    metrics = localisation_metrics(
        prediction.gradcam, [r.mask for r in records], np.array([r.label for r in records]), CLASSES
    )
    assert metrics is not None and metrics["all"]["n"] == 80
    assert metrics["all"]["pointing_game"] >= 0.8, metrics
    assert metrics["all"]["pointing_game"] > 4 * metrics["all"]["random_pointing_game"], metrics
    assert metrics["all"]["heat_share"] > 2 * metrics["all"]["uniform_heat_share"], metrics


@pytest.mark.heavy
def test_the_shipped_mask_outlines_the_lesion(model: OnnxModel) -> None:
    """The same fixed sample of unseen synthetic images, prepared as the node prepares
    a crop, the mask resized as the node resizes it and thresholded at the card's
    threshold: mean Dice at least 0.7 for benign and for malignant lesions. (The
    held-out split's full numbers are in the model card and its report.)"""
    records = generate_records(40, size=256, seed=777)
    batch = np.stack([model_input(r.image, model.card.input) for r in records])
    prediction = model.run(batch)
    assert prediction.lesion_mask is not None and model.card.segmentation is not None
    metrics = segmentation_metrics(
        prediction.lesion_mask,
        [r.mask for r in records],
        np.array([r.label for r in records]),
        CLASSES,
        model.card.segmentation.threshold,
    )
    assert metrics["per_class"]["benign"]["n"] == metrics["per_class"]["malignant"]["n"] == 40
    assert metrics["per_class"]["benign"]["dice"] >= 0.7, metrics
    assert metrics["per_class"]["malignant"]["dice"] >= 0.7, metrics
