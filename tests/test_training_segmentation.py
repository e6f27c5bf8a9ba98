"""The lesion segmentation head: Dice, IoU and outlines on normal images (checked by
hand), the threshold chosen on validation, the Dice + BCE loss, and a tiny training
run that learns, stores its threshold and reports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.datasets.records import CLASSES
from training.evaluate import evaluate, markdown_report
from training.localisation import MIN_AREA_FRACTION, THRESHOLDS, choose_threshold, segmentation_metrics
from training.models import ModelConfig
from training.train import (
    DataSource,
    TrainConfig,
    lesion_known,
    load_trained,
    make_split,
    segmentation_loss,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NORMAL, BENIGN, MALIGNANT = range(3)


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dice_iou_and_outlines_on_normal_images_by_hand() -> None:
    """Maps at the judging size (no resizing blur): a perfect outline, one that covers
    half the lesion, a normal image with a speck above threshold, a clean normal
    image, and a lesion image without a mask (unknown: left out)."""
    size = 64
    lesion = _square(size, 8, 8, 16)  # 256 px
    half = np.zeros((size, size), dtype=bool)
    half[8:24, 8:16] = True  # 128 px, all inside
    speck = np.zeros((size, size), np.float32)
    speck[40, 40] = 0.9
    maps = np.stack(
        [
            lesion.astype(np.float32),
            half.astype(np.float32),
            speck,
            np.zeros((size, size), np.float32),
            np.ones((size, size), np.float32),
        ]
    )
    masks = [lesion, lesion, None, None, None]
    labels = np.array([BENIGN, MALIGNANT, NORMAL, NORMAL, MALIGNANT])
    metrics = segmentation_metrics(maps, masks, labels, CLASSES, threshold=0.5, size=size)
    assert metrics["per_class"]["benign"] == {"n": 1, "dice": 1.0, "iou": 1.0}
    assert metrics["per_class"]["malignant"]["n"] == 1  # the maskless malignant image is unknown
    assert metrics["per_class"]["malignant"]["dice"] == pytest.approx(2 * 128 / (128 + 256))
    assert metrics["per_class"]["malignant"]["iou"] == pytest.approx(0.5)
    assert metrics["all"]["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["no_lesion"] == {
        "n": 2,
        "false_positive_rate": 0.5,
        "min_area_fraction": MIN_AREA_FRACTION,
        "false_positive_rate_over_min_area": 0.0,
        "mean_area_fraction": 0.5 / size**2,
    }
    blot = maps.copy()
    blot[3, :8, :8] = 1.0  # 64 px of 4096: above the minimum area
    assert (
        segmentation_metrics(blot, masks, labels, CLASSES, threshold=0.5, size=size)["no_lesion"][
            "false_positive_rate_over_min_area"
        ]
        == 0.5
    )


def test_the_threshold_is_the_one_of_best_mean_dice() -> None:
    """A map that is 0.7 on the lesion and 0.4 on a ring around it: any threshold in
    [0.4, 0.7) outlines the lesion exactly, lower ones take the ring in too."""
    size = 64
    lesion = _square(size, 20, 20, 16)
    ring = _square(size, 16, 16, 24) & ~lesion
    prob = np.where(lesion, 0.7, np.where(ring, 0.4, 0.0)).astype(np.float32)
    chosen = choose_threshold(prob[None], [lesion], np.array([BENIGN]), CLASSES, size=size)
    assert 0.4 <= chosen < 0.7 and chosen in THRESHOLDS
    with pytest.raises(ValueError, match="lesion mask"):
        choose_threshold(prob[None], [None], np.array([NORMAL]), CLASSES, size=size)


def test_segmentation_loss_rewards_the_right_outline_and_skips_unknown_masks() -> None:
    masks = torch.zeros(3, 8, 8)
    masks[0, 2:6, 2:6] = 1
    right = torch.full((3, 4, 4), -8.0)
    right[0, 1:3, 1:3] = 8.0  # the lesion, on the head's 4x4 grid
    wrong = -right
    known = torch.tensor([True, True, False])
    assert float(segmentation_loss(right, masks, known)) < 0.01
    assert float(segmentation_loss(wrong, masks, known)) > 1.5
    # the third image's extent is unknown: whatever the head says there costs nothing
    outlined = right.clone()
    outlined[2] = 8.0
    assert float(segmentation_loss(outlined, masks, known)) == pytest.approx(
        float(segmentation_loss(right, masks, known))
    )
    # a normal image (known, empty mask) is asked for an empty outline
    assert float(segmentation_loss(outlined, masks, torch.tensor([True, True, True]))) > 0.5


@pytest.mark.heavy
def test_training_with_the_segmentation_loss_learns_outlines_and_reports_them(tmp_path: Path) -> None:
    source = DataSource(kind="synthetic", synthetic_per_class=8, seed=0)
    records = source.load()
    split = make_split(records, 0.25, 0.25, seed=0)
    config = ModelConfig(
        arch="hybrid", width=0.125, size=64, embedding_dim=16, rnn_hidden=16, cam_layer="conv4_3", segmentation=True
    )
    train_config = TrainConfig(
        epochs=5, batch_size=4, lr=3e-3, augment=False, seed=0, patience=10, segmentation_weight=1.0
    )
    trained = train(records, split, config, train_config, source, tmp_path, progress=False)
    losses = [h["train_segmentation_loss"] for h in trained.history]
    assert losses[-1] < losses[0] - 0.15, losses
    assert lesion_known([records[i] for i in split.fit]).all()  # synthetic: masks, and normal images

    spec = trained.segmentation
    assert spec is not None and spec.threshold in THRESHOLDS and (spec.height, spec.width) == (32, 32)
    assert spec.fitted_on.startswith("validation split")
    assert load_trained(tmp_path).segmentation == spec
    report = evaluate(trained, records, tmp_path)
    segmentation = report["segmentation"]
    assert segmentation["threshold"] == spec.threshold
    assert set(segmentation["per_class"]) == {"benign", "malignant"}
    assert segmentation["all"]["n"] == sum(records[i].mask is not None for i in split.test)
    assert segmentation["no_lesion"]["n"] == sum(records[i].mask is None for i in split.test)
    assert "Lesion outline (segmentation head, 32 x 32 map)" in markdown_report(report)


@pytest.mark.heavy
def test_without_lesion_masks_the_model_gets_no_head(tmp_path: Path) -> None:
    """DICOM + labels data has no masks: a head would learn nothing, so none is built."""
    source = DataSource(kind="synthetic", synthetic_per_class=4, seed=0)
    records = [type(r)(image=r.image, label=r.label, mask=None, group=r.group, source=r.source) for r in source.load()]
    split = make_split(records, 0.25, 0.25, seed=0)
    config = ModelConfig(arch="hybrid", width=0.125, size=64, embedding_dim=16, rnn_hidden=16, segmentation=True)
    trained = train(
        records, split, config, TrainConfig(epochs=1, segmentation_weight=1.0), source, tmp_path, progress=False
    )
    assert not trained.model_config.segmentation and trained.segmentation is None
    assert trained.train_config.segmentation_weight == 0.0
