"""Training: leak-free split, augmentation on the training split only, Adam +
cross-entropy (plus, optionally, a localisation loss on Grad-CAM and a Dice + BCE
loss on the segmentation head), reduce-on-plateau, early stopping, resumable
checkpoints.

Files written to the output folder:

``checkpoint.pt``  everything needed to resume after an interruption (rewritten
                   atomically after every epoch);
``model.pt``       the finished model: best-validation weights, configs, input
                   normalisation, the split, the learning history and the
                   out-of-distribution statistics of the training embeddings,
                   the segmentation threshold (read by ``evaluate`` and ``export``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from service.datasets.records import CLASSES, Record
from service.model_card import CalibrationSpec, OodSpec, SegmentationSpec
from service.monitoring.classification import ECE_BINS
from training.calibration import Outputs
from training.gradcam import grad_cam
from training.localisation import NORMAL, choose_threshold, resize_mask
from training.models import ModelConfig, SonoModel, build_model, load_initial_weights

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
#: Synthetic data: images per class generated afresh, patients in no split, to fit
#: and choose the calibration on and to measure it with: FRESH_MULTIPLE times the
#: source's count, at most FRESH_PER_CLASS. The validation split is small and biased
#: by early stopping (it chose the weights), and on a few hundred images the ECE of
#: even a perfectly calibrated model is above 0.03 (its noise floor).
FRESH_PER_CLASS, FRESH_MULTIPLE = 1000, 4
#: Seed offsets of those fresh sets: one to fit on, one held out for measuring.
CALIBRATION_SEED, MEASURE_SEED = 1000, 2000


@dataclass(frozen=True)
class DataSource:
    """Where the labelled images come from; stored with the model so that
    ``evaluate`` can rebuild exactly the same records and split."""

    kind: str  # "synthetic" | "busi" | "dicom"
    synthetic_per_class: int = 0
    path: str | None = None
    labels: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind == "synthetic" and self.synthetic_per_class < 2:
            raise ValueError("--synthetic needs at least 2 images per class (one for each side of the split)")
        if self.kind in ("busi", "dicom") and not self.path:
            raise ValueError(f"the {self.kind} data source needs a folder path")
        if self.kind == "dicom" and not self.labels:
            raise ValueError("the dicom data source needs a labels CSV (--labels)")
        if self.kind not in ("synthetic", "busi", "dicom"):
            raise ValueError(f"unknown data source kind {self.kind!r}")

    def load(self) -> list[Record]:
        if self.kind == "synthetic":
            from service.datasets.synthetic import generate_records

            return generate_records(self.synthetic_per_class, seed=self.seed)
        if self.kind == "busi":
            from service.datasets.busi import load_busi

            return load_busi(Path(str(self.path)))
        from service.datasets.dicom_csv import load_dicom_labels

        return load_dicom_labels(Path(str(self.path)), Path(str(self.labels)))

    def fresh(self, seed_offset: int) -> list[Record] | None:
        """New labelled images from the same source that no split holds (synthetic
        only: real data sets have no more images than they have)."""
        if self.kind != "synthetic":
            return None
        from service.datasets.synthetic import generate_records

        return generate_records(
            min(FRESH_PER_CLASS, FRESH_MULTIPLE * self.synthetic_per_class), seed=self.seed + seed_offset
        )

    def describe(self) -> str:
        if self.kind == "synthetic":
            return (
                f"synthetic breast-ultrasound-like images (service.datasets.synthetic, seed {self.seed}), "
                f"{self.synthetic_per_class} per class"
            )
        if self.kind == "busi":
            return f"BUSI folder layout at {self.path}"
        return f"DICOM files at {self.path} labelled by {self.labels}"


@dataclass(frozen=True)
class Split:
    """Indices into the record list: ``fit`` trains, ``val`` drives early stopping
    and the LR schedule, ``test`` is touched only by evaluation."""

    fit: list[int]
    val: list[int]
    test: list[int]

    @property
    def train(self) -> list[int]:
        """Everything the model may learn from (fit + val): the retrieval gallery
        and the out-of-distribution reference."""
        return sorted(self.fit + self.val)


def make_split(records: Sequence[Record], test_fraction: float, val_fraction: float, seed: int) -> Split:
    """Stratified, group-aware train/val/test split, made before any augmentation."""
    from service.datasets.splits import stratified_split

    train_idx, test_idx = stratified_split(list(records), test_fraction, seed)
    return split_off_validation(records, train_idx, test_idx, val_fraction, seed)


def split_off_validation(
    records: Sequence[Record], train_idx: Sequence[int], test_idx: Sequence[int], val_fraction: float, seed: int
) -> Split:
    """Carve the early-stopping validation set out of the training indices, by
    group and stratified like the test split."""
    from service.datasets.splits import stratified_split

    train_list = [int(i) for i in train_idx]
    fit_rel, val_rel = stratified_split([records[i] for i in train_list], val_fraction, seed + 1)
    return Split(
        fit=sorted(train_list[int(i)] for i in fit_rel),
        val=sorted(train_list[int(i)] for i in val_rel),
        test=sorted(int(i) for i in test_idx),
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 6
    lr_patience: int = 2
    lr_factor: float = 0.5
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    class_weights: bool = False
    augment: bool = True
    seed: int = 0
    initial_weights: str | None = None
    #: Weight of the localisation loss (:func:`localisation_loss`) on images with a
    #: lesion mask; 0 trains on the labels alone.
    localisation_weight: float = 0.0
    #: Weight of the segmentation loss (:func:`segmentation_loss`) on images whose
    #: lesion extent is known (a mask, or a normal image); used by models built with
    #: a segmentation head (``ModelConfig.segmentation``).
    segmentation_weight: float = 0.0


@dataclass(frozen=True)
class Normalisation:
    mean: float
    std: float


@dataclass
class TrainedModel:
    """A finished model as ``model.pt`` stores it."""

    model: SonoModel
    model_config: ModelConfig
    train_config: TrainConfig
    norm: Normalisation
    source: DataSource
    split: Split
    class_counts: dict[str, int]
    history: list[dict[str, float]]
    ood: OodSpec
    calibration: CalibrationSpec | None
    created: str
    classes: tuple[str, ...] = field(default=CLASSES)
    command: str = ""  # the command line that trained it, for the model card
    segmentation: SegmentationSpec | None = None  # the head's output and threshold; None: no head


def resize_images(records: Sequence[Record], size: int) -> np.ndarray:
    """uint8 [N, size, size]: the whole image resized bilinearly (aspect not kept), as
    the node prepares pixels (``service.model_card.InputSpec.resize``)."""
    out = np.empty((len(records), size, size), dtype=np.uint8)
    for i, record in enumerate(records):
        image = record.image
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"{record.source}: expected a uint8 grayscale image, got {image.dtype} {image.shape}")
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return out


def resize_masks(records: Sequence[Record], size: int) -> np.ndarray:
    """bool [N, size, size]: each lesion mask resized as its image is; all False where
    a record has no mask."""
    out = np.zeros((len(records), size, size), dtype=bool)
    for i, record in enumerate(records):
        if record.mask is not None:
            out[i] = resize_mask(record.mask, size)
    return out


def lesion_known(records: Sequence[Record]) -> np.ndarray:
    """bool [N]: whether a record's lesion extent is known, i.e. it has a mask or is
    a normal image (no lesion: every pixel background). A lesion image without a
    mask (DICOM + labels) teaches the segmentation head nothing."""
    return np.array([r.mask is not None or r.label_name == NORMAL for r in records], dtype=bool)


def to_tensor(images: np.ndarray, norm: Normalisation) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] normalised like the ONNX input."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - norm.mean) / norm.std


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict(
    model: SonoModel, images: np.ndarray, norm: Normalisation, batch_size: int = 64, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits [N, C], probabilities [N, C] and L2-normalised embeddings [N, D]."""
    device = device or next(model.parameters()).device
    model.eval()
    logits, embeddings = [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], norm).to(device)
        emb = model.embed(model.features(x))
        logits.append(model.head(emb).cpu())
        embeddings.append(F.normalize(emb, dim=1).cpu())
    logit = torch.cat(logits)
    return logit.numpy(), torch.softmax(logit, dim=1).numpy(), torch.cat(embeddings).numpy()


@torch.no_grad()
def predict_masks(model: SonoModel, images: np.ndarray, norm: Normalisation, batch_size: int = 64) -> np.ndarray:
    """The segmentation head's lesion probabilities [N, h, w] (as the ONNX file's
    ``lesion_mask``)."""
    device = next(model.parameters()).device
    model.eval()
    maps = [
        torch.sigmoid(
            model.segment(*model.encode(to_tensor(images[start : start + batch_size], norm).to(device)))
        ).cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(maps).numpy()


def fit_segmentation(
    model: SonoModel, norm: Normalisation, records: Sequence[Record], fitted_on: str
) -> SegmentationSpec:
    """The card's segmentation entry: the threshold that maximises the mean Dice on
    ``records`` (the validation split) and the map's size."""
    maps = predict_masks(model, resize_images(records, model.config.size), norm)
    threshold = choose_threshold(maps, [r.mask for r in records], np.array([r.label for r in records]), CLASSES)
    return SegmentationSpec(
        threshold=threshold,
        height=maps.shape[1],
        width=maps.shape[2],
        fitted_on=f"{fitted_on}: the threshold of best mean Dice on its lesion images",
    )


def fit_guard_and_calibration(
    outputs: Outputs,
    images: np.ndarray,
    records: Sequence[Record],
    split: Split,
    source: DataSource,
    size: int,
) -> tuple[OodSpec, CalibrationSpec]:
    """The domain guard (fitted on the fit split, threshold from the validation split)
    and the calibration (chosen by cross-validation and fitted on fresh images where
    the source makes them, else on the validation split, which early stopping has
    already tuned the weights on); ``outputs`` gives a model's uncalibrated
    probabilities of uint8 ``images`` (those of ``records``). training.calibration
    says why these."""
    from training.calibration import choose_calibration, fit_guard

    guard = fit_guard(images[split.fit], images[split.val], fitted_on="fit split; threshold: validation split")
    fresh = source.fresh(CALIBRATION_SEED)
    if fresh is None:
        chosen_on, fitted_on, chosen_images = [records[i] for i in split.val], "validation split", images[split.val]
    else:
        chosen_on = fresh
        fitted_on = f"{len(fresh)} fresh images of the source (seed +{CALIBRATION_SEED})"
        chosen_images = resize_images(fresh, size)
    return guard, choose_calibration(
        outputs(chosen_images)[0],
        np.array([r.label for r in chosen_on]),
        [r.group for r in chosen_on],
        ECE_BINS,
        fitted_on=fitted_on,
    )


def torch_outputs(model: SonoModel, norm: Normalisation) -> Outputs:
    """The trained model as training.calibration's ``Outputs``."""

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, probs, embeddings = predict(model, images, norm)
        return probs, embeddings

    return outputs


def _class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1: rare classes count as much as common ones."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def _augment_batch(
    images: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augmented copies of a batch, and of its masks moved with them (None: no masks)."""
    from training.augment import augment_with_mask

    pairs = [augment_with_mask(image, None if masks is None else masks[i], rng) for i, image in enumerate(images)]
    moved = None if masks is None else np.stack([m for _, m in pairs])
    return np.stack([image for image, _ in pairs]), moved


def localisation_loss(cam: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean share of the class activation map's heat (``cam`` [N, h, w], unscaled, from
    :func:`training.gradcam.grad_cam`) that lies outside the lesion, over the images
    that have one (``masks`` [N, H, W], 0/1 at input size).

    A map cell counts as lesion when any lesion pixel falls in it, so a coarse map
    is not asked for more precision than it has. The share is scale-free: it moves
    the heat, not its size; an all-zero map scores 1, the worst (were it 0, a class
    could "pass" by cancelling its map everywhere). Images without a lesion (normal)
    add nothing."""
    cells = F.adaptive_max_pool2d(masks.unsqueeze(1), cam.shape[-2:])[:, 0]
    outside = 1 - (cam * cells).sum(dim=(1, 2)) / (cam.sum(dim=(1, 2)) + 1e-6)
    has_lesion = cells.flatten(1).amax(dim=1)
    return (outside * has_lesion).sum() / has_lesion.sum().clamp_min(1)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean per-image BCE + (1 - soft Dice) of the head's lesion logits [N, h, w]
    against ``masks`` [N, H, W] (0/1 at input size, area-averaged down to the head's
    grid), over the images whose lesion extent is ``known`` [N].

    BCE gives every pixel a gradient from the start; Dice weighs a small lesion as
    much as a large one (BCE alone favours background). The Dice is smoothed by 1
    pixel, so an empty mask (a normal image) asks for an empty prediction: the
    head learns to outline nothing where there is no lesion."""
    target = F.adaptive_avg_pool2d(masks.unsqueeze(1), logits.shape[-2:])[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum(dim=(1, 2)) + 1) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    weight = known.to(logits.dtype)
    return ((bce + 1 - dice) * weight).sum() / weight.sum().clamp_min(1)


def _evaluate_loss(
    model: SonoModel,
    images: np.ndarray,
    labels: np.ndarray,
    norm: Normalisation,
    loss_fn: torch.nn.Module,
    device: torch.device,
) -> tuple[float, float]:
    logits, _, _ = predict(model, images, norm, device=device)
    loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(labels)))
    predicted = logits.argmax(axis=1)
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    return loss, float(np.mean(recalls))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _batches(
    images: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    known: np.ndarray | None,
    norm: Normalisation,
    config: TrainConfig,
    rng: np.random.Generator,
    drop_single: bool,
) -> Iterator[Batch]:
    """One epoch of shuffled, augmented (training split only), normalised batches:
    images, labels and (when ``masks`` is given) lesion masks as 0/1 floats and
    whether each mask is known (:func:`lesion_known`)."""
    order = rng.permutation(len(images))
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        if drop_single and len(idx) < 2:
            continue  # batch-norm cannot normalise a batch of one
        batch, batch_masks = images[idx], None if masks is None else masks[idx]
        if config.augment:
            batch, batch_masks = _augment_batch(batch, batch_masks, rng)
        mask_tensor = None if batch_masks is None else torch.from_numpy(batch_masks.astype(np.float32))
        known_tensor = None if known is None else torch.from_numpy(known[idx])
        yield to_tensor(batch, norm), torch.from_numpy(labels[idx]), mask_tensor, known_tensor


def _fit_epoch(
    model: SonoModel,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """One pass of Adam steps; returns the mean training cross-entropy, accuracy,
    localisation and segmentation losses (0 when unused or the batches carry no
    masks). The localisation loss shapes the map of the true class, the one the node
    shows when it is right."""
    model.train()
    sums = {"train_loss": 0.0, "train_accuracy": 0.0, "train_localisation_loss": 0.0, "train_segmentation_loss": 0.0}
    seen = 0
    for x, y, masks, known in batches:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        fmap, skips = model.encode(x)
        logits = model.head(model.embed(fmap))
        loss = loss_fn(logits, y)
        total = loss
        if masks is not None and config.localisation_weight:
            cam = grad_cam(fmap, logits, y, method=model.config.cam_method, create_graph=True)
            localisation = localisation_loss(cam, masks.to(device))
            total = total + config.localisation_weight * localisation
            sums["train_localisation_loss"] += localisation.item() * len(y)
        if masks is not None and known is not None and model.config.segmentation:
            segmentation = segmentation_loss(model.segment(fmap, skips), masks.to(device), known.to(device))
            total = total + config.segmentation_weight * segmentation
            sums["train_segmentation_loss"] += segmentation.item() * len(y)
        total.backward()
        optimizer.step()
        sums["train_loss"] += loss.item() * len(y)
        sums["train_accuracy"] += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return {key: value / max(seen, 1) for key, value in sums.items()}


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary name: an interrupted save never corrupts the
    previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    records: Sequence[Record],
    split: Split,
    model_config: ModelConfig,
    train_config: TrainConfig,
    source: DataSource,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | None = None,
    command: str = "",
) -> TrainedModel:
    """Train one model on ``split`` (on CUDA when present) and write ``model.pt`` (see
    the module docstring); the returned model is on the CPU.

    With ``resume`` and a ``checkpoint.pt`` from the same configuration in
    ``out_dir``, training continues after the last finished epoch.
    """
    device = device or default_device()
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([r.label for r in records], dtype=np.int64)
    images = resize_images(records, model_config.size)
    fit_x, fit_y = images[split.fit], labels[split.fit]
    fit_records = [records[i] for i in split.fit]
    has_masks = any(r.mask is not None for r in fit_records)
    if train_config.localisation_weight and not has_masks:
        log.warning("--localisation-weight: no training image has a lesion mask; training on the labels alone")
    if model_config.segmentation and not has_masks:
        log.warning("--segmentation-weight: no training image has a lesion mask; the model gets no segmentation head")
        model_config = dataclasses.replace(model_config, segmentation=False)
        train_config = dataclasses.replace(train_config, segmentation_weight=0.0)
    fit_masks: np.ndarray | None = None
    fit_known: np.ndarray | None = None
    if has_masks and (train_config.localisation_weight or model_config.segmentation):
        fit_masks, fit_known = resize_masks(fit_records, model_config.size), lesion_known(fit_records)
    val_x, val_y = images[split.val], labels[split.val]
    pixels = fit_x.astype(np.float32) / 255.0
    norm = Normalisation(mean=round(float(pixels.mean()), 6), std=round(float(pixels.std()) or 1.0, 6))

    torch.manual_seed(train_config.seed)
    model = build_model(model_config)
    if train_config.initial_weights:
        loaded = load_initial_weights(model, Path(train_config.initial_weights))
        log.info("initial weights: %d tensors from %s", len(loaded), train_config.initial_weights)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=train_config.lr_factor, patience=train_config.lr_patience
    )
    weight = _class_weights(fit_y, model_config.num_classes) if train_config.class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    val_loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    rng = np.random.default_rng(train_config.seed)
    state: dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "best_val_loss": float("inf"),
        "bad_epochs": 0,
        "best_state": copy.deepcopy(model.state_dict()),
    }
    # What must not change between an interrupted run and its resumption (more
    # epochs or more patience may be asked for).
    identity = {
        "model_config": model_config.to_dict(),
        "train_config": {k: v for k, v in asdict(train_config).items() if k not in ("epochs", "patience")},
        "source": asdict(source),
        "split": asdict(split),
    }

    checkpoint_path = out_dir / CHECKPOINT
    if resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=True)
        for key, value in identity.items():
            if saved[key] != value:
                raise ValueError(
                    f"{checkpoint_path} was made with a different {key.replace('_', ' ')}; "
                    f"start a new output folder or drop --resume"
                )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log.info("resuming %s after epoch %d", out_dir, state["epoch"])

    while state["epoch"] < train_config.epochs and state["bad_epochs"] < train_config.patience:
        epoch = state["epoch"] + 1
        started = time.monotonic()
        batches = tqdm(
            _batches(fit_x, fit_y, fit_masks, fit_known, norm, train_config, rng, drop_single=model_config.batch_norm),
            desc=f"epoch {epoch}/{train_config.epochs}",
            disable=not progress,
            leave=False,
            total=-(-len(fit_x) // train_config.batch_size),
        )
        losses = _fit_epoch(model, batches, optimizer, loss_fn, train_config, device)
        val_loss, val_bacc = _evaluate_loss(model, val_x, val_y, norm, val_loss_fn, device)
        scheduler.step(val_loss)
        record = {
            "epoch": epoch,
            **losses,
            "val_loss": val_loss,
            "val_balanced_accuracy": val_bacc,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.monotonic() - started,
        }
        state["history"].append(record)
        if val_loss < state["best_val_loss"] - 1e-4:
            state.update(best_val_loss=val_loss, bad_epochs=0, best_state=copy.deepcopy(model.state_dict()))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        log.info(
            "epoch %d: train loss %.4f (localisation %.4f, segmentation %.4f), val loss %.4f, "
            "val balanced accuracy %.3f (%.0f s)",
            epoch,
            record["train_loss"],
            record["train_localisation_loss"],
            record["train_segmentation_loss"],
            val_loss,
            val_bacc,
            record["seconds"],
        )
        _save_atomic(
            {
                **identity,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "state": state,
            },
            checkpoint_path,
        )

    model.load_state_dict(state["best_state"])
    model.cpu().eval()  # evaluation and export run on the CPU, like the node
    ood, calibration = fit_guard_and_calibration(
        torch_outputs(model, norm), images, records, split, source, model_config.size
    )
    segmentation = None
    if model_config.segmentation:
        val_records = [records[i] for i in split.val]
        if any(r.mask is not None and r.mask.any() for r in val_records):
            segmentation = fit_segmentation(model, norm, val_records, "validation split")
        else:
            segmentation = fit_segmentation(model, norm, fit_records, "fit split (no validation image has a lesion)")
    trained = TrainedModel(
        model=model,
        model_config=model_config,
        train_config=train_config,
        norm=norm,
        source=source,
        split=split,
        class_counts=class_counts(labels, split),
        history=state["history"],
        ood=ood,
        calibration=calibration,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        segmentation=segmentation,
    )
    save_trained(trained, out_dir / MODEL)
    return trained


def class_counts(labels: np.ndarray, split: Split) -> dict[str, int]:
    """Images per part and class: the card's data description, and the fingerprint
    that tells ``evaluate`` it was given the records the split was made on."""
    counts: dict[str, int] = {}
    for part in ("fit", "val", "test"):
        idx = getattr(split, part)
        for c, name in enumerate(CLASSES):
            counts[f"{part}_{name}"] = int(np.sum(labels[idx] == c))
    return counts


def save_trained(trained: TrainedModel, path: Path) -> None:
    _save_atomic(
        {
            "model_config": trained.model_config.to_dict(),
            "train_config": asdict(trained.train_config),
            "state_dict": trained.model.state_dict(),
            "norm": asdict(trained.norm),
            "source": asdict(trained.source),
            "split": asdict(trained.split),
            "class_counts": trained.class_counts,
            "history": trained.history,
            "ood": trained.ood.model_dump(),
            "calibration": trained.calibration.model_dump() if trained.calibration else None,
            "created": trained.created,
            "classes": list(trained.classes),
            "command": trained.command,
            "segmentation": trained.segmentation.model_dump() if trained.segmentation else None,
        },
        path,
    )


def load_trained(path: Path) -> TrainedModel:
    """Read ``model.pt`` (or a folder holding one) written by :func:`train`; the model
    is on the CPU."""
    if path.is_dir():
        path = path / MODEL
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path} (run 'sonocase train' first)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "model_config" not in saved:
        raise ValueError(f"{path} is not a model written by 'sonocase train'")
    if "features" not in saved["ood"]:
        raise ValueError(
            f"{path} has the domain guard of an older Sonocase (embedding centroids): export it and "
            "refit its guard with 'sonocase calibrate MODEL.onnx' and the same data options"
        )
    config = ModelConfig(**saved["model_config"])
    model = build_model(config)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return TrainedModel(
        model=model,
        model_config=config,
        train_config=TrainConfig(**saved["train_config"]),
        norm=Normalisation(**saved["norm"]),
        source=DataSource(**saved["source"]),
        split=Split(**saved["split"]),
        class_counts=saved["class_counts"],
        history=saved["history"],
        ood=OodSpec(**saved["ood"]),
        calibration=CalibrationSpec(**saved["calibration"]) if saved.get("calibration") else None,
        created=saved["created"],
        classes=tuple(saved["classes"]),
        command=saved["command"],
        segmentation=SegmentationSpec(**saved["segmentation"]) if saved.get("segmentation") else None,
    )
