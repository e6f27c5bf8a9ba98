"""Does Grad-CAM point at the lesion: the pointing game and heat share (checked by
hand and by brute force), the localisation loss that trains it, masks that move
with their augmented images, and the report section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.datasets.records import CLASSES
from service.datasets.synthetic import generate_records
from training.augment import augment, augment_with_mask
from training.evaluate import evaluate, localisation_markdown, markdown_report
from training.gradcam import grad_cam
from training.localisation import localisation_metrics, score_map
from training.models import ModelConfig, build_model
from training.train import DataSource, TrainConfig, localisation_loss, make_split, resize_masks, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _disc(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def _peak_at(size: int, y: int, x: int) -> np.ndarray:
    heatmap = np.zeros((size, size), np.float32)
    heatmap[y, x] = 1.0
    return heatmap


def test_pointing_game_counts_a_peak_within_15_px_of_the_lesion() -> None:
    mask = np.zeros((256, 256), bool)
    mask[100:120, 100:120] = True  # right edge at column 119
    assert score_map(_peak_at(256, 110, 110), mask)["pointing_game"] == 1.0
    assert score_map(_peak_at(256, 110, 119 + 15), mask)["pointing_game"] == 1.0
    assert score_map(_peak_at(256, 110, 119 + 16), mask)["pointing_game"] == 0.0
    empty = score_map(np.zeros((8, 8), np.float32), mask)  # an all-zero map points nowhere
    assert empty["pointing_game"] == 0.0 and empty["heat_share"] == 0.0
    assert empty["uniform_heat_share"] == pytest.approx(400 / 256**2)
    with pytest.raises(ValueError, match="at least one lesion pixel"):
        score_map(_peak_at(256, 0, 0), np.zeros((256, 256), bool))


def test_chance_levels_and_heat_share_by_brute_force() -> None:
    mask = _disc(256, 60, 180, 12) | _disc(256, 200, 40, 5)
    rng = np.random.default_rng(0)
    heatmap = rng.random((256, 256)).astype(np.float32)
    got = score_map(heatmap, mask)
    ys, xs = np.nonzero(mask)
    grid_y, grid_x = np.mgrid[0:256, 0:256]
    nearest = np.full((256, 256), np.inf)
    for y, x in zip(ys, xs, strict=True):
        nearest = np.minimum(nearest, np.hypot(grid_y - y, grid_x - x))
    assert got["random_pointing_game"] == pytest.approx(np.mean(nearest <= 15))
    assert got["uniform_heat_share"] == pytest.approx(mask.mean())
    assert got["heat_share"] == pytest.approx((heatmap * mask).sum() / heatmap.sum(), rel=1e-5)


def test_a_coarse_map_is_resized_as_the_node_resizes_it() -> None:
    """An 8x8 map whose hot cell covers the lesion points at it; one cell off misses."""
    mask = np.zeros((256, 256), bool)
    mask[70:90, 166:186] = True  # inside cell (row 2, column 5) of an 8x8 grid (32 px cells)
    cell = np.zeros((8, 8), np.float32)
    cell[2, 5] = 1.0
    assert score_map(cell, mask)["pointing_game"] == 1.0
    assert score_map(np.roll(cell, 2, axis=0), mask)["pointing_game"] == 0.0


def test_metrics_per_class_leave_out_images_without_a_lesion() -> None:
    lesion = np.zeros((128, 128), bool)
    lesion[40:60, 40:60] = True
    hit, miss = _peak_at(16, 6, 6), _peak_at(16, 14, 14)
    metrics = localisation_metrics(
        np.stack([hit, miss, hit, hit]), [lesion, lesion, lesion, None], np.array([1, 1, 2, 0]), CLASSES
    )
    assert metrics is not None
    assert set(metrics["per_class"]) == {"benign", "malignant"}
    assert metrics["per_class"]["benign"]["n"] == 2 and metrics["per_class"]["benign"]["pointing_game"] == 0.5
    assert metrics["all"]["n"] == 3 and metrics["all"]["pointing_game"] == pytest.approx(2 / 3)
    assert localisation_metrics(np.stack([hit]), [None], np.array([0]), CLASSES) is None
    assert "| all with a lesion | 3 | 0.667 |" in "\n".join(localisation_markdown(metrics))


# ---- the localisation loss --------------------------------------------------------------


def test_localisation_loss_is_the_share_of_heat_outside_the_lesion_cells() -> None:
    masks = torch.zeros(3, 32, 32)
    masks[0, 0:4, 0:4] = 1  # lesion in map cell (0, 0) of a 4x4 map
    masks[1, 30:32, 30:32] = 1  # lesion in cell (3, 3)
    cam = torch.zeros(3, 4, 4)
    cam[0, 0, 0] = cam[0, 1, 1] = 2.0  # half the heat outside
    cam[1, 3, 3] = 5.0  # all inside
    cam[2, 2, 2] = 9.0  # no lesion (normal): left out
    assert float(localisation_loss(cam, masks)) == pytest.approx((0.5 + 0.0) / 2, abs=1e-6)
    assert float(localisation_loss(cam, torch.zeros(3, 32, 32))) == 0.0  # no lesion anywhere
    dead = cam.clone()
    dead[1] = 0  # an all-zero map is the worst, never a way out
    assert float(localisation_loss(dead, masks)) == pytest.approx((0.5 + 1.0) / 2, abs=1e-6)


@pytest.mark.heavy
def test_localisation_loss_moves_the_heat_of_a_real_hybrid_into_the_lesion() -> None:
    """Through the LSTM (second-order gradients): a few Adam steps on one batch with
    the localisation loss alone shrink the heat outside the lesion."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="hybrid", width=0.125, size=64, embedding_dim=16, rnn_hidden=16)).train()
    records = [r for r in generate_records(4, size=64, seed=5) if r.mask is not None]
    x = torch.from_numpy(np.stack([r.image for r in records]).astype(np.float32) / 255.0 - 0.45).unsqueeze(1) / 0.2
    y = torch.tensor([r.label for r in records])
    masks = torch.from_numpy(resize_masks(records, 64).astype(np.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        fmap = model.features(x)
        loss = localisation_loss(grad_cam(fmap, model.head(model.embed(fmap)), y, create_graph=True), masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ---- masks follow their images -----------------------------------------------------------


def test_the_mask_moves_with_its_augmented_image() -> None:
    """A bright disc on black and its mask: after rotation, scale and flip the bright
    pixels and the moved mask coincide; the image is what plain augment gives."""
    mask = _disc(64, 20, 44, 9)
    image = np.where(mask, 220, 30).astype(np.uint8)
    for seed in range(5):
        moved_image, moved_mask = augment_with_mask(image, mask, np.random.default_rng(seed))
        assert moved_mask is not None and moved_mask.dtype == bool
        assert np.array_equal(moved_image, augment(image, np.random.default_rng(seed)))
        bright = moved_image > moved_image.mean()
        assert (bright & moved_mask).sum() / (bright | moved_mask).sum() > 0.85, seed
    _flipped_image, flipped_mask = augment_with_mask(
        image, mask, np.random.default_rng(0), max_rotation_deg=0.0, scale_range=(1.0, 1.0), flip_probability=1.0
    )
    assert np.array_equal(flipped_mask, mask[:, ::-1])
    with pytest.raises(ValueError, match="mask shape"):
        augment_with_mask(image, mask[:32], np.random.default_rng(0))


# ---- training and the report --------------------------------------------------------------


@pytest.mark.heavy
def test_training_with_the_localisation_loss_reports_how_grad_cam_points(tmp_path: Path) -> None:
    source = DataSource(kind="synthetic", synthetic_per_class=8, seed=0)
    records = source.load()
    split = make_split(records, 0.25, 0.25, seed=0)
    config = ModelConfig(arch="hybrid", width=0.125, size=64, embedding_dim=16, rnn_hidden=16, cam_layer="conv4_3")
    trained = train(
        records, split, config, TrainConfig(epochs=2, localisation_weight=1.0), source, tmp_path, progress=False
    )
    assert all(0 < h["train_localisation_loss"] <= 1 for h in trained.history)
    report = evaluate(trained, records, tmp_path)
    localisation = report["localisation"]
    lesions = sum(records[i].mask is not None for i in split.test)
    assert localisation["all"]["n"] == lesions and set(localisation["per_class"]) == {"benign", "malignant"}
    assert 0 < localisation["all"]["random_pointing_game"] < 1
    assert "| all with a lesion | " in markdown_report(report)
