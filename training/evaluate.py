"""Honest evaluation: never one accuracy figure alone.

Metrics are computed in numpy from probabilities and embeddings (so the same
functions score the PyTorch model, its ONNX export and an int8 variant):
accuracy, balanced accuracy, per-class precision / recall / F1, confusion matrix,
one-vs-rest ROC AUC, expected calibration error, and retrieval on the embedding
(test images querying the training images: mAP@k, precision@k, ACC@1).
:func:`evaluate` writes them as ``<prefix>.report.json`` and ``<prefix>.report.md``
with PNG plots beside them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from service.datasets.records import CLASSES, Record
from service.model.guard import calibrated
from service.model.imaging import resize_map
from service.model_card import DISCLAIMER, CalibrationSpec, OodSpec
from service.monitoring.classification import (
    ECE_BINS,
    classification_metrics,
    roc_auc,
    roc_curve,
)
from training.band_calibration import band_calibration, band_markdown
from training.calibration import CALIBRATION_FOLDS, Outputs, assess
from training.gradcam import ExplainedModel, cam_name
from training.localisation import localisation_metrics, segmentation_metrics
from training.models import SEGMENTING_ARCHS, ModelConfig
from training.train import (
    MEASURE_SEED,
    DataSource,
    Split,
    TrainConfig,
    TrainedModel,
    class_counts,
    make_split,
    predict,
    predict_masks,
    resize_images,
    resize_masks,
    split_off_validation,
    to_tensor,
    torch_outputs,
    train,
)

log = logging.getLogger(__name__)

RETRIEVAL_K = 5
#: Headline metrics summarised across cross-validation folds and architectures.
HEADLINE = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "macro_roc_auc",
    "ece",
    "retrieval.map@5",
    "retrieval.precision@5",
    "retrieval.acc@1",
)
#: The seed paper's reported figure (Fawzy et al., Sci Rep 2026, BUSI). Its split is
#: not clearly described (random image-level splits of BUSI leak near-duplicates),
#: so it is not comparable with a group-aware held-out split.
PAPER_ACCURACY = {"hybrid": 0.9924}


def retrieval_metrics(
    query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, k: int = RETRIEVAL_K
) -> dict[str, float]:
    """Each query's ``k`` nearest gallery images by Euclidean distance; relevant = same
    class. AP@k = sum over ranks i <= k of precision@i at relevant ranks, divided by
    min(k, relevant images in the gallery), so a list that is right only at rank 1
    does not score 1."""
    distances = np.linalg.norm(query[:, None, :] - gallery[None], axis=2)
    top = np.argsort(distances, axis=1, kind="stable")[:, :k]
    relevant = gallery_labels[top] == query_labels[:, None]
    precision_at_i = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    available = np.minimum(k, (gallery_labels[None] == query_labels[:, None]).sum(axis=1))
    ap = (precision_at_i * relevant).sum(axis=1) / np.maximum(available, 1)
    return {
        f"map@{k}": float(ap.mean()),
        f"precision@{k}": float(relevant.mean()),
        "acc@1": float(relevant[:, 0].mean()),
    }


def score(
    y_test: np.ndarray,
    probs: np.ndarray,
    test_emb: np.ndarray,
    y_train: np.ndarray,
    train_emb: np.ndarray,
    classes: Sequence[str],
) -> dict[str, Any]:
    """Classification + retrieval metrics for one model's outputs on one split."""
    report = classification_metrics(y_test, probs, classes)
    report["retrieval"] = retrieval_metrics(test_emb, y_test, train_emb, y_train)
    return report


def headline(report: dict[str, Any], key: str) -> float | None:
    value: Any = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else float(value)


def summarize(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and standard deviation (ddof 1) of the headline metrics across folds."""
    summary: dict[str, dict[str, float | None]] = {}
    for key in HEADLINE:
        values = np.array([v for r in reports if (v := headline(r, key)) is not None], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n": len(values),
        }
    return summary


def evaluate(
    trained: TrainedModel,
    records: Sequence[Record],
    out_dir: Path,
    prefix: str = "evaluation",
    *,
    gradcam_examples: int = 6,
) -> dict[str, Any]:
    """Score ``trained`` on its held-out test split and write the report files."""
    labels = np.array([r.label for r in records], dtype=np.int64)
    test, train = trained.split.test, trained.split.train
    if max(test + train) >= len(records) or class_counts(labels, trained.split) != trained.class_counts:
        raise ValueError(
            f"these {len(records)} records are not the ones this model's split was made on "
            f"({trained.source.describe()})"
        )
    images = resize_images(records, trained.model_config.size)
    _, raw_probs, test_emb = predict(trained.model, images[test], trained.norm)
    probs = calibrated(raw_probs, trained.calibration)
    _, _, train_emb = predict(trained.model, images[train], trained.norm)
    report = score(labels[test], probs, test_emb, labels[train], train_emb, trained.classes)
    report["birads_bands"] = band_calibration(labels[test], probs, trained.classes)
    heatmaps = explain(trained, images[test])
    test_masks = [records[i].mask for i in test]
    localisation = localisation_metrics(heatmaps, test_masks, labels[test], trained.classes)
    if localisation is not None:
        report["localisation"] = {"heatmap": cam_name(trained.model_config), **localisation}
    lesion_maps = None
    if trained.segmentation is not None:
        lesion_maps = predict_masks(trained.model, images[test], trained.norm)
        report["segmentation"] = {
            "map_size": [trained.segmentation.height, trained.segmentation.width],
            "threshold_fitted_on": trained.segmentation.fitted_on,
            **segmentation_metrics(
                lesion_maps, test_masks, labels[test], trained.classes, trained.segmentation.threshold
            ),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    report.update(
        guard_and_calibration(
            torch_outputs(trained.model, trained.norm),
            images,
            labels,
            trained.split,
            trained.ood,
            trained.calibration,
            trained.source,
            out_dir / f"{prefix}.reliability.png",
        )
    )
    report.update(
        evaluated_on=f"held-out test split ({len(test)} images; groups never span train and test)",
        model={"arch": trained.model_config.arch, **trained.model_config.to_dict()},
        data=trained.source.describe(),
        class_counts=trained.class_counts,
        epochs_run=len(trained.history),
        disclaimer=DISCLAIMER,
        best_epoch=min(trained.history, key=lambda h: h["val_loss"])["epoch"] if trained.history else None,
    )
    plots = {
        "confusion": plot_confusion(
            np.array(report["confusion_matrix"]), trained.classes, out_dir / f"{prefix}.confusion.png"
        ),
        "roc": plot_roc(labels[test], probs, trained.classes, out_dir / f"{prefix}.roc.png"),
        "learning": plot_learning(trained.history, out_dir / f"{prefix}.learning.png"),
        "gradcam": plot_gradcam(
            trained,
            images[test],
            labels[test],
            probs,
            heatmaps,
            resize_masks([records[i] for i in test], trained.model_config.size),
            out_dir / f"{prefix}.gradcam.png",
            gradcam_examples,
            None
            if lesion_maps is None or trained.segmentation is None
            else lesion_maps > trained.segmentation.threshold,
        ),
    }
    report["plots"] = {**{name: path.name for name, path in plots.items()}, "reliability": f"{prefix}.reliability.png"}
    _write_text(out_dir / f"{prefix}.report.json", json.dumps(report, indent=2) + "\n")
    _write_text(out_dir / f"{prefix}.report.md", markdown_report(report))
    return report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    classes = list(report["per_class"])
    retrieval = report["retrieval"]
    lines = [
        f"# Evaluation: {report['model']['arch']}",
        "",
        f"> {report['disclaimer']}",
        "",
        f"- Data: {report['data']}",
        f"- Evaluated on: {report['evaluated_on']}",
        f"- Epochs run: {report['epochs_run']}; weights of epoch {report['best_epoch']} (lowest validation loss)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_fmt(report['accuracy'])} |",
        f"| balanced accuracy | {_fmt(report['balanced_accuracy'])} |",
        f"| macro F1 | {_fmt(report['macro_f1'])} |",
        f"| macro one-vs-rest ROC AUC | {_fmt(report['macro_roc_auc'])} |",
        f"| expected calibration error ({ECE_BINS} bins) | {_fmt(report['ece'])} |",
        *(f"| retrieval {k} (test queries the training set) | {_fmt(v)} |" for k, v in retrieval.items()),
        f"| held-out images the domain guard flags | {_fmt(report['ood']['test_flagged_fraction'])} |",
        "",
        "| class | precision | recall | F1 | ROC AUC | support |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | {_fmt(m['roc_auc'])} "
            f"| {m['support']} |"
            for name, m in report["per_class"].items()
        ),
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
        *(
            f"| {name} | " + " | ".join(str(v) for v in row) + " |"
            for name, row in zip(classes, report["confusion_matrix"], strict=True)
        ),
        "",
        *localisation_markdown(report.get("localisation")),
        *segmentation_markdown(report.get("segmentation")),
        *guard_markdown(report["ood"]),
        *calibration_markdown(report.get("calibration")),
        *band_markdown(report.get("birads_bands")),
    ]
    lines += [f"![{name}]({file})" for name, file in report.get("plots", {}).items()]
    return "\n".join(lines) + "\n"


def guard_and_calibration(
    outputs: Outputs,
    images: np.ndarray,
    labels: np.ndarray,
    split: Split,
    ood: OodSpec,
    calibration: CalibrationSpec | None,
    source: DataSource,
    reliability_path: Path,
) -> dict[str, Any]:
    """The report's guard and calibration sections (training.calibration.assess) for a
    model given as ``outputs``, on its own split."""
    fresh = source.fresh(MEASURE_SEED)
    measure = None if fresh is None else (resize_images(fresh, images.shape[1]), np.array([r.label for r in fresh]))
    return assess(
        outputs,
        images,
        labels,
        {"fit": split.fit, "val": split.val, "test": split.test},
        ood,
        calibration or CalibrationSpec(temperature=1.0, fitted_on="none"),
        measure,
        CLASSES,
        ECE_BINS,
        reliability_path,
    )


def guard_markdown(ood: dict[str, Any]) -> list[str]:
    """The report's section on the domain guard: per source, and the candidates."""
    if "sources" not in ood:
        return []
    return [
        f"Domain guard ({ood['method']}): an image whose score exceeds {ood['threshold']:.2f} (the "
        f"{ood['percentile']:g}th percentile of the validation split) is not assessed. Held-out split flagged: "
        f"{_fmt(ood['test_flagged_fraction'])}; AUROC against the held-out out-of-domain sources: "
        f"{_fmt(ood['auroc_held_out'], 4)}. Sources marked held out played no part in choosing the detector.",
        "",
        "| source | held out | images | flagged | AUROC vs held-out split | not flagged |",
        "|---|---|---|---|---|---|",
        *(
            f"| {s['source']} | {'yes' if s['held_out'] else 'no (tuning)'} | {s['images']} | {_fmt(s['flagged'])} "
            f"| {_fmt(s['auroc'], 4)} | {', '.join(s['missed'][:4]) + (' ...' if len(s['missed']) > 4 else '')} |"
            for s in ood["sources"]
        ),
        "",
        "The detectors compared (each at the same percentile of its own validation scores):",
        "",
        "| detector | held-out split flagged | AUROC, tuning sources | AUROC, held-out sources | real ultrasound flagged |",
        "|---|---|---|---|---|",
        *(
            f"| {c['detector']} | {_fmt(c['test_flagged'])} | {_fmt(c['auroc_tuning'], 4)} "
            f"| {_fmt(c['auroc_held_out'], 4)} | {_fmt(c['flagged'].get('real-ultrasound'))} |"
            for c in ood["candidates"]
        ),
        "",
    ]


def calibration_map(calibration: dict[str, Any]) -> str:
    """The fitted map in words: its temperature, or its weights and bias."""
    if calibration.get("weights") is None:
        return f"T = {calibration['temperature']:.3f}"
    rows = "; ".join(" ".join(f"{w:.3f}" for w in row) for row in calibration["weights"])
    return f"softmax(W log p + b), W = [{rows}], b = [{' '.join(f'{b:.3f}' for b in calibration['bias'])}]"


def calibration_markdown(calibration: dict[str, Any] | None) -> list[str]:
    """The report's section on calibration: the candidates compared, the ECE before
    and after with its noise floor, and the balanced accuracy before and after."""
    if calibration is None:
        return []
    candidates = calibration.get("candidates") or []
    lines = [
        f"Calibration: {calibration['method']}, {calibration_map(calibration)}, fitted on {calibration['fitted_on']}.",
        "",
    ]
    if candidates:
        lines += [
            f"The method was chosen by the lowest ECE of out-of-fold probabilities ({CALIBRATION_FOLDS}-fold "
            "cross-validation by patient on those images alone; no held-out image below played a part):",
            "",
            "| method | ECE (out of fold) | NLL (out of fold) | predicted class changed |",
            "|---|---|---|---|",
            *(
                f"| {c['method']} | {_fmt(c['ece'])} | {_fmt(c['nll'])} | {_fmt(c['class_changed'])} |"
                for c in candidates
            ),
            "",
        ]
    return [
        *lines,
        "The noise floor is the mean ECE a perfectly calibrated model with the same confidences shows on that many "
        "images: an ECE near it cannot be told from perfect calibration.",
        "",
        "| images | n | ECE before | ECE after | noise floor | balanced accuracy before | after |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {v['images']} | {_fmt(v['ece_before'])} | {_fmt(v['ece_after'])} "
            f"| {_fmt(v['ece_noise_floor'])} | {_fmt(v.get('balanced_accuracy_before'))} "
            f"| {_fmt(v.get('balanced_accuracy_after'))} |"
            for name, v in calibration["sets"].items()
        ),
        "",
        *band_markdown(calibration.get("birads_bands"), calibration.get("birads_bands_on", "")),
    ]


def localisation_markdown(localisation: dict[str, Any] | None) -> list[str]:
    """The report's section on whether Grad-CAM points at the lesion (empty when the
    test images carry no lesion masks)."""
    if localisation is None:
        return []
    rows = [*localisation["per_class"].items(), ("all with a lesion", localisation["all"])]
    return [
        f"Does the heatmap ({localisation.get('heatmap', 'Grad-CAM')}) point at the lesion? The map of the "
        "predicted class, resized to "
        f"{localisation['size_px']} x {localisation['size_px']} as the node resizes it, against the lesion mask "
        f"(test images with one). Pointing game: the map's peak lies within {localisation['tolerance_px']:g} px of "
        "the lesion; heat share: the part of the map's heat inside the lesion. Chance levels beside them: a "
        "uniformly random point, a uniform map.",
        "",
        "| class | images | pointing game | random point | heat share | uniform map |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {m['n']} | {_fmt(m['pointing_game'])} | {_fmt(m['random_pointing_game'])} "
            f"| {_fmt(m['heat_share'])} | {_fmt(m['uniform_heat_share'])} |"
            for name, m in rows
        ),
        "",
    ]


def segmentation_markdown(segmentation: dict[str, Any] | None) -> list[str]:
    """The report's section on the lesion masks the segmentation head outlines (empty
    for a model without one or test images without lesion masks)."""
    if segmentation is None:
        return []
    rows = [*segmentation["per_class"].items(), ("all with a lesion", segmentation["all"])]
    normal = segmentation["no_lesion"]
    return [
        f"Lesion outline (segmentation head, {segmentation['map_size'][0]} x {segmentation['map_size'][1]} map): "
        f"the lesion probability resized to {segmentation['size_px']} x {segmentation['size_px']} as the node "
        f"resizes it, thresholded at {segmentation['threshold']:g} ({segmentation['threshold_fitted_on']}), "
        "against the lesion mask of each test image with one.",
        "",
        "| class | images | Dice | IoU |",
        "|---|---|---|---|",
        *(f"| {name} | {m['n']} | {_fmt(m['dice'])} | {_fmt(m['iou'])} |" for name, m in rows),
        "",
        f"Images without a lesion ({normal['n']}): {_fmt(normal['false_positive_rate'])} have a pixel above the "
        f"threshold (an outline of a lesion that is not there), {_fmt(normal['false_positive_rate_over_min_area'])} "
        f"an area above {normal['min_area_fraction']:.1%} of the image; mean area so marked "
        f"{_fmt(normal['mean_area_fraction'], 4)} of the image.",
        "",
    ]


def _figure(path: Path, fig: Figure) -> Path:
    """Save with matplotlib's object API (no pyplot: no global state, no display)."""
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    return path


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    fig = Figure(figsize=(3.6, 3.2))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    return _figure(path, fig)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    fig = Figure(figsize=(3.6, 3.2))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        auc = roc_auc(y_true == c, probs[:, c])
        if auc is not None:
            fpr, tpr = roc_curve(y_true == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    if ax.lines:  # no curve when the test split lacks a class's positives or negatives
        ax.legend(fontsize=7, loc="lower right")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC, one vs rest")
    return _figure(path, fig)


def plot_learning(history: Sequence[dict[str, float]], path: Path) -> Path:
    fig = Figure(figsize=(6.4, 2.8))
    left, right = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history], label="train (augmented)")
    left.plot(epochs, [h["val_loss"] for h in history], label="validation")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    left.legend(fontsize=7)
    right.plot(epochs, [h["val_balanced_accuracy"] for h in history], color="C2")
    right.set(xlabel="epoch", ylabel="balanced accuracy", title="Validation", ylim=(0, 1.02))
    return _figure(path, fig)


def explain(trained: TrainedModel, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps [N, h, w] of the predicted class, as the ONNX file computes them."""
    explained = ExplainedModel(trained.model.eval())
    maps = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], trained.norm)
        maps.append(explained(x, torch.full((len(x),), -1))[2].numpy())
    return np.concatenate(maps) if maps else np.zeros((0, 0, 0), np.float32)


def plot_gradcam(
    trained: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    heatmaps: np.ndarray,
    masks: np.ndarray,
    path: Path,
    count: int,
    outlines: np.ndarray | None = None,
) -> Path:
    """A few test images per class with the Grad-CAM of the predicted class, its peak
    (+), the lesion outline (white) where there is one and the segmentation head's
    thresholded mask (``outlines``, dashed lime) where the model has one."""
    per_class = max(1, count // len(trained.classes))
    chosen = [i for c in range(len(trained.classes)) for i in np.flatnonzero(labels == c)[:per_class]]
    fig = Figure(figsize=(1.4 * len(chosen), 1.75))
    axes = fig.subplots(1, len(chosen), squeeze=False)
    for ax, i in zip(axes[0], chosen, strict=True):
        height, width = images[i].shape
        cam = resize_map(heatmaps[i], width, height)
        ax.imshow(images[i], cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        if masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="white", linewidths=0.6)
        if outlines is not None and outlines[i].any():
            ax.contour(
                resize_map(outlines[i].astype(np.float32), width, height),
                levels=[0.5],
                colors="lime",
                linewidths=0.6,
                linestyles="dashed",
            )
        peak_y, peak_x = np.unravel_index(int(np.argmax(cam)), cam.shape)
        ax.plot(peak_x, peak_y, "w+", markersize=6)
        p = probs[i]
        predicted = int(p.argmax())
        ax.set_title(
            f"true {trained.classes[labels[i]]}\npred {trained.classes[predicted]} {float(p[predicted]):.2f}",
            fontsize=6,
        )
        ax.axis("off")
    return _figure(path, fig)


def cross_validate(
    records: Sequence[Record],
    source: DataSource,
    model_config: ModelConfig,
    train_config: TrainConfig,
    k: int,
    out_dir: Path,
    *,
    progress: bool = True,
    command: str = "",
) -> dict[str, dict[str, float | None]]:
    """Stratified group k-fold: train and evaluate one model per fold (in
    ``out_dir/fold-<i>``), then write ``cv.json`` / ``cv.md`` with mean and spread."""
    from service.datasets.splits import stratified_group_kfold

    reports = []
    for i, (train_idx, test_idx) in enumerate(stratified_group_kfold(list(records), k, train_config.seed), start=1):
        split = split_off_validation(records, train_idx, test_idx, train_config.val_fraction, train_config.seed)
        fold_dir = out_dir / f"fold-{i}"
        trained = train(
            records, split, model_config, train_config, source, fold_dir, progress=progress, command=command
        )
        reports.append(evaluate(trained, records, fold_dir))
    summary = summarize(reports)
    per_fold = [{key: headline(r, key) for key in HEADLINE} for r in reports]
    _write_text(
        out_dir / "cv.json",
        json.dumps(
            {
                "folds": k,
                "model": model_config.to_dict(),
                "data": source.describe(),
                "summary": summary,
                "per_fold": per_fold,
            },
            indent=2,
        )
        + "\n",
    )
    lines = [
        f"# {k}-fold cross-validation: {model_config.arch}",
        "",
        f"> {DISCLAIMER}",
        "",
        f"- Data: {source.describe()}",
        f"- Settings: {settings_line(model_config, train_config)}",
        f"- Command: `{command}`" if command else "- Command: (called from Python)",
        (
            "- Folds: stratified group k-fold (no group spans train and test); validation for early "
            "stopping is split off each fold's training part."
        ),
        "",
        "| metric | mean | std | " + " | ".join(f"fold {i}" for i in range(1, k + 1)) + " |",
        "|---" * (k + 3) + "|",
    ]
    lines += [
        f"| {key} | {_fmt(summary[key]['mean'])} | {_fmt(summary[key]['std'])} | "
        + " | ".join(_fmt(f[key]) for f in per_fold)
        + " |"
        for key in HEADLINE
    ]
    _write_text(out_dir / "cv.md", "\n".join(lines) + "\n")
    return summary


def compare_architectures(
    records: Sequence[Record],
    source: DataSource,
    archs: Sequence[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    command: str = "",
) -> list[dict[str, Any]]:
    """Train and evaluate each architecture on one and the same split (in
    ``out_dir/<arch>``); write ``compare.json`` / ``compare.md`` with the seed
    paper's reported figure beside ours."""
    if not archs:
        raise ValueError("no architectures to compare")
    split = make_split(records, train_config.test_fraction, train_config.val_fraction, train_config.seed)
    rows = []
    for arch in archs:
        config = replace(model_config, arch=arch, segmentation=model_config.segmentation and arch in SEGMENTING_ARCHS)
        started = time.monotonic()
        trained = train(
            records, split, config, train_config, source, out_dir / arch, progress=progress, command=command
        )
        seconds = time.monotonic() - started
        report = evaluate(trained, records, out_dir / arch)
        rows.append(
            {
                "arch": arch,
                "parameters": sum(p.numel() for p in trained.model.parameters()),
                "epochs": len(trained.history),
                "train_seconds": round(seconds, 1),
                **{key: headline(report, key) for key in HEADLINE},
                "paper_accuracy": PAPER_ACCURACY.get(arch),
            }
        )
    _write_text(
        out_dir / "compare.json",
        json.dumps({"data": source.describe(), "split": asdict(split), "rows": rows}, indent=2) + "\n",
    )
    _write_text(
        out_dir / "compare.md",
        compare_markdown(rows, source.describe(), len(split.test), settings_line(model_config, train_config), command),
    )
    return rows


def settings_line(model_config: ModelConfig, train_config: TrainConfig) -> str:
    c, t = model_config, train_config
    return (
        f"input {c.size}x{c.size}, width {c.width:g}, {c.rnn_type.upper()} hidden {c.rnn_hidden}, "
        f"embedding {c.embedding_dim}; up to {t.epochs} epochs (early-stopping patience {t.patience}), "
        f"batch {t.batch_size}, Adam lr {t.lr:g}, augmentation {'on' if t.augment else 'off'}, seed {t.seed}"
    )


def compare_markdown(rows: Sequence[dict[str, Any]], data: str, n_test: int, settings: str, command: str) -> str:
    lines = [
        "# Architecture comparison",
        "",
        f"> {DISCLAIMER}",
        "",
        (
            f"- Data: {data}; every architecture trained on the same split and scored on the same "
            f"{n_test} held-out images (groups never span train and test)."
        ),
        f"- Settings (all architectures): {settings}",
        f"- Command: `{command}`" if command else "- Command: (called from Python)",
        (
            "- Seed paper: Fawzy et al., Scientific Reports 2026 (BUSI). It reports 99.24 % accuracy for the "
            "VGG16 + RNN hybrid from a split it does not clearly describe; image-level random splits of BUSI "
            "leak near-duplicates, and honest 3-class balanced accuracy on BUSI in the literature is about "
            "0.79-0.86. Only the paper's headline figure is restated here; its other rows are in the paper."
        ),
        "",
        (
            "| architecture | parameters | epochs | train s | accuracy | balanced acc. | macro F1 | ROC AUC | ECE "
            "| mAP@5 | ACC@1 | paper accuracy (BUSI) |"
        ),
        "|---" * 12 + "|",
    ]
    for r in rows:
        paper = f"{r['paper_accuracy']:.4f}" if r["paper_accuracy"] is not None else "see paper"
        lines.append(
            f"| {r['arch']} | {r['parameters']:,} | {r['epochs']} | {r['train_seconds']:.0f} | {_fmt(r['accuracy'])} "
            f"| {_fmt(r['balanced_accuracy'])} | {_fmt(r['macro_f1'])} | {_fmt(r['macro_roc_auc'])} | {_fmt(r['ece'])} "
            f"| {_fmt(r['retrieval.map@5'])} | {_fmt(r['retrieval.acc@1'])} | {paper} |"
        )
    return "\n".join(lines) + "\n"
