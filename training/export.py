"""Export a trained model to ONNX with Grad-CAM inside the graph, plus its model card.

The legacy exporter cannot trace autograd, and ``autograd.grad`` inside ``forward``
does not export directly with either exporter. What works: trace
:class:`training.gradcam.Explainer` (the Grad-CAM map's way to the logits, and the
gradient of the target logit back) into a plain aten graph with
``make_fx(tracing_mode="symbolic")`` while oneDNN is off (otherwise the CPU LSTM
becomes an op ONNX lacks) and with the backward passes of convolutions and VGG's
max-pools decomposed into ops ONNX Runtime runs fast (ONNX has no
``convolution_backward``); then export :class:`training.gradcam.ExplainedModel` with
that graph as its explainer, the encoder and segmentation head as plain modules, with
the dynamo exporter and a dynamic batch dimension.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from service.datasets.records import Record
from service.model.guard import calibrated
from service.model_card import (
    DISCLAIMER,
    InputSpec,
    ModelCard,
    card_path_for,
    sha256_file,
)
from service.monitoring.classification import classification_metrics
from training.calibration import Outputs
from training.export_lstm import TRANSLATIONS as LSTM_TRANSLATIONS
from training.export_lstm import ExportedRowLSTM
from training.gradcam import ExplainedModel, Explainer, cam_name
from training.models import RowRNN, SonoModel
from training.train import (
    DataSource,
    TrainedModel,
    class_counts,
    fit_guard_and_calibration,
    make_split,
    resize_images,
    to_tensor,
)

INPUT_NAMES = ["image", "target_class"]
EXPLAINED_OUTPUTS = ["probabilities", "embedding", "gradcam"]
#: The fourth output of a model with a segmentation head (``service.model_card``).
SEGMENTATION_OUTPUT = "lesion_mask"
PLAIN_OUTPUTS = ["probabilities", "embedding"]
INTENDED_USE = (
    "Research and demonstration: second-reader triage support for breast ultrasound "
    "(normal / benign / malignant), Grad-CAM explanation and similar-case retrieval. "
    "Not a medical device; not for primary diagnosis."
)


def fold_batch_norm(model: SonoModel) -> SonoModel:
    """An eval-mode copy with every Conv2d -> BatchNorm2d pair folded into one conv,
    so the exported graph has no separate normalisation arithmetic."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return folded


class Forward(nn.Module):
    """What the explained export gives less the heatmap (probabilities, embedding and,
    with a segmentation head, the lesion mask): the Grad-CAM-free baseline that
    ``bench/inference.py`` measures the explained export against."""

    def __init__(self, model: SonoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded, skips = self.model.encode(image)
        embedding = self.model.embed(encoded)
        outputs = (torch.softmax(self.model.head(embedding), dim=1), torch.nn.functional.normalize(embedding, dim=1))
        if not self.model.config.segmentation:
            return outputs
        return (*outputs, torch.sigmoid(self.model.segment(encoded, skips)))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs every graph pass at INFO and warns about tracing internals
    (and about torchvision's ops, which we never install); :func:`ship` verifies the
    export numerically instead (:func:`check_export`)."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _convolution_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, None, None]:
    """The input gradient of a convolution: ONNX has no ``convolution_backward``, and a
    Grad-CAM layer below the last convolutions (``cam_layer`` conv4_3) puts their
    backward pass in the graph. A stride-1 convolution's is a plain convolution of
    the output gradient with the kernel flipped and its in/out channels swapped (ONNX
    Runtime runs Conv in its blocked layout on all threads, ConvTranspose several
    times slower); other strides take the transposed convolution it is. The weights
    are constants of the exported graph, so no weight or bias gradient is ever asked
    for."""
    if transposed or output_mask[1] or output_mask[2]:
        raise NotImplementedError("export traces only the input gradient of a plain convolution")
    if not output_mask[0]:
        return None, None, None
    kernel = [int(k) for k in weight.shape[2:]]
    if (
        groups == 1
        and all(s == 1 and d == 1 for s, d in zip(stride, dilation, strict=True))
        and all(0 <= p < k for p, k in zip(padding, kernel, strict=True))
    ):
        flipped = weight.transpose(0, 1).flip([2, 3])
        padded = [k - 1 - p for k, p in zip(kernel, padding, strict=True)]
        grad_input = torch.ops.aten.convolution.default(
            grad_output, flipped, None, [1, 1], padded, [1, 1], False, [0, 0], 1
        )
        return grad_input, None, None
    # The spatial size a transposed convolution gives, less the input's: what stride
    # dropped at the far edge (output_padding of the transposed convolution).
    extra = [
        int(size) - ((int(out) - 1) * st - 2 * pad + dil * (int(k) - 1) + 1)
        for size, out, st, pad, dil, k in zip(
            input.shape[2:], grad_output.shape[2:], stride, padding, dilation, kernel, strict=True
        )
    ]
    grad_input = torch.ops.aten.convolution.default(
        grad_output, weight, None, list(stride), list(padding), list(dilation), True, extra, groups
    )
    return grad_input, None, None


def _max_pool2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """The input gradient of VGG's 2x2 max-pool without the pooling indices: each
    output's gradient goes to the first position of its window (row by row) that holds
    the window's maximum, found by ArgMax, as PyTorch's pooling picks it (a one-hot
    product: ONNX Runtime's ScatterElements is slower here).
    The exporter's own route turns pooling indices into per-plane ones with an extra
    pooling pass and scatters with them, most of the gradient graph's time besides its
    convolutions. Other poolings keep PyTorch's decomposition."""
    n, c, h, w = input.shape
    vgg_pool = list(kernel_size) == list(stride) == [2, 2] and not any(padding) and list(dilation) in ([1, 1], [1])
    if not vgg_pool or h % 2 or w % 2:
        return torch._decomp.decompositions.max_pool2d_with_indices_backward(  # type: ignore[attr-defined]
            grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices
        )
    # [N, C, h/2, w/2, 4]: each window's four positions in raster order on the last axis
    windows = input.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    first = windows.argmax(dim=4, keepdim=True) == torch.arange(4)
    shares = first.to(grad_output.dtype) * grad_output.unsqueeze(4)
    return shares.reshape(n, c, h // 2, w // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def _threshold_backward(grad_output: torch.Tensor, input: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's input gradient as a multiply by its mask: ONNX Runtime's Where, which
    PyTorch's decomposition becomes, is several times slower than Mul on these maps."""
    return grad_output * (input > threshold).to(grad_output.dtype)


def _with_exported_lstm(model: SonoModel) -> SonoModel:
    """A copy of ``model`` whose row LSTM, if it has a one-directional one, is an
    :class:`ExportedRowLSTM`: one ONNX node forward and a backward of a few ops per
    row instead of autograd's unrolled cells (a GRU or a bidirectional LSTM keeps them)."""
    rows = getattr(model, "rows", None)
    if not isinstance(rows, RowRNN) or not ExportedRowLSTM.handles(rows):
        return model
    copied = copy.deepcopy(model)
    copied.rows = ExportedRowLSTM(copied.rows)
    return copied


def export_onnx(model: SonoModel, path: Path, *, explain: bool = True) -> None:
    """Write ``model`` as one self-contained ONNX file with a dynamic batch.

    ``explain`` adds the ``target_class`` input and the ``gradcam`` output, and for a
    model with a segmentation head the ``lesion_mask`` output (the interface in
    ``service.model_card``); without it only ``image`` -> ``probabilities``,
    ``embedding``.
    """
    with _quiet_exporter():
        _export(model, path, explain)


def _export(model: SonoModel, path: Path, explain: bool) -> None:
    size = model.config.size
    image = torch.zeros(2, 1, size, size)
    folded = fold_batch_norm(model)
    batch = torch.export.Dim("batch")
    if explain:
        args: tuple[torch.Tensor, ...] = (image, torch.tensor([-1, 0]))
        # Only the explainer (the map's way to the logits, and back) goes through
        # autograd; the encoder and segmentation head export as plain modules.
        # Parameters are real tensors while the inputs are symbolic: they become
        # constants of the traced graph, hence _allow_non_fake_inputs.
        with torch.no_grad():
            fmap = folded.features(image)
        with torch.backends.mkldnn.flags(enabled=False):
            explainer = make_fx(
                Explainer(_with_exported_lstm(folded)),
                tracing_mode="symbolic",
                _allow_non_fake_inputs=True,
                decomposition_table={
                    torch.ops.aten.convolution_backward.default: _convolution_backward,
                    torch.ops.aten.max_pool2d_with_indices_backward.default: _max_pool2d_backward,
                    torch.ops.aten.threshold_backward.default: _threshold_backward,
                },
            )(fmap, args[1])
        module: nn.Module = ExplainedModel(folded, explainer)
        names, outputs, dynamic = INPUT_NAMES, explained_outputs(model), ({0: batch}, {0: batch})
    else:
        args, module = (image,), Forward(folded)
        names, outputs, dynamic = INPUT_NAMES[:1], plain_outputs(model), ({0: batch},)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=names,
        output_names=outputs,
        dynamic_shapes=dynamic,
        optimize=True,
        verbose=False,
        custom_translation_table=LSTM_TRANSLATIONS,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    onnx.save_model(program.model_proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)


def explained_outputs(model: SonoModel) -> list[str]:
    """The output names of ``model``'s explained export, in order."""
    return EXPLAINED_OUTPUTS + ([SEGMENTATION_OUTPUT] if model.config.segmentation else [])


def plain_outputs(model: SonoModel) -> list[str]:
    """The output names of ``model``'s export without the heatmap, in order."""
    return PLAIN_OUTPUTS + ([SEGMENTATION_OUTPUT] if model.config.segmentation else [])


def onnx_opset(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def architecture_name(trained: TrainedModel) -> str:
    c = trained.model_config
    rnn = f"{'bi' if c.bidirectional else ''}{c.rnn_type.upper()}({c.rnn_hidden})"
    return (
        {
            "hybrid": f"VGG16-D conv x{c.width:g}{' +BN' if c.batch_norm else ''} -> {rnn} over rows -> "
            f"{c.embedding_dim}-d embedding -> {c.num_classes}-class head",
            "cnn": f"4-conv CNN x{c.width:g} -> {c.embedding_dim}-d dense -> {c.num_classes}-class head",
            "rnn": f"{rnn} over pixel rows -> {c.embedding_dim}-d embedding -> {c.num_classes}-class head",
            "mobilenetv2": f"MobileNetV2 x{c.width:g} -> {c.embedding_dim}-d embedding -> {c.num_classes}-class head",
        }[c.arch]
        + f"; {cam_name(c)}"
        + ("; lesion segmentation head (U-Net-style decoder, H/2 mask)" if c.segmentation else "")
    )


def build_card(
    trained: TrainedModel,
    onnx_path: Path,
    *,
    name: str,
    version: str,
    metrics: dict[str, Any] | None = None,
    command: str | None = None,
) -> ModelCard:
    """The card for ``onnx_path`` (which must already be written: its hash goes in)."""
    c = trained.model_config
    counts = trained.class_counts
    training_data: dict[str, object] = {
        "description": trained.source.describe(),
        "source": trained.source.kind,
        "synthetic": trained.source.kind == "synthetic",
        "counts": counts,
        "split": (
            f"stratified group split before augmentation: test {trained.train_config.test_fraction:g}, "
            f"validation {trained.train_config.val_fraction:g} of the rest (early stopping only)"
        ),
    }
    if command:
        training_data["command"] = command
    hyper: dict[str, object] = {
        **c.to_dict(),
        **{k: v for k, v in vars(trained.train_config).items() if k != "initial_weights"},
    }
    hyper["initial_weights"] = "user file" if trained.train_config.initial_weights else "Kaiming (He) init"
    hyper["epochs_run"] = len(trained.history)
    return ModelCard(
        name=name,
        version=version,
        architecture=f"{c.arch}: {architecture_name(trained)}",
        classes=list(trained.classes),
        input=InputSpec(height=c.size, width=c.size, mean=trained.norm.mean, std=trained.norm.std),
        embedding_dim=c.embedding_dim,
        onnx_file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        opset=onnx_opset(onnx_path),
        ood=trained.ood,
        calibration=trained.calibration,
        segmentation=trained.segmentation,
        hyperparameters=hyper,
        training_data=training_data,
        metrics=metrics or {},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        intended_use=INTENDED_USE,
        disclaimer=DISCLAIMER,
    )


def write_card(card: ModelCard, onnx_path: Path) -> Path:
    path = card_path_for(onnx_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card.model_dump(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an evaluation report (``training.evaluate``) for the card."""
    keys = (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_roc_auc",
        "ece",
        "retrieval",
        "per_class",
        "n_test",
        "ood",
        "calibration",
        "localisation",
        "segmentation",
    )
    metrics = {k: report[k] for k in keys if k in report}
    if "sources" in metrics.get("ood", {}):
        metrics["ood"] = _headline_guard(metrics["ood"])
    metrics["evaluated_on"] = report.get("evaluated_on", "held-out test split")
    return metrics


def run_onnx(
    session: ort.InferenceSession, x: np.ndarray, target_class: np.ndarray | None = None, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, embeddings and Grad-CAM maps of normalised images [N, 1, H, W]
    from an exported (explained) model, batch by batch."""
    targets = np.full(len(x), -1, dtype=np.int64) if target_class is None else target_class.astype(np.int64)
    outputs = [
        session.run(EXPLAINED_OUTPUTS, {"image": x[i : i + batch_size], "target_class": targets[i : i + batch_size]})
        for i in range(0, len(x), batch_size)
    ]
    probs, emb, cams = (np.concatenate([o[k] for o in outputs]) for k in range(3))
    return probs, emb, cams


def check_export(model: SonoModel, onnx_path: Path, tolerance: float = 1e-4) -> float:
    """Run the ONNX file and the PyTorch model on the same random batch; raise when
    probabilities, embeddings or lesion masks differ by more than ``tolerance``.
    Returns the largest difference."""
    size = model.config.size
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1, size, size)).astype(np.float32))
    target = torch.tensor([-1, 0, model.config.num_classes - 1])
    expected = ExplainedModel(model.eval())(x, target)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(explained_outputs(model), {"image": x.numpy(), "target_class": target.numpy()})
    compared = [0, 1, 3] if model.config.segmentation else [0, 1]
    worst = max(float(np.abs(got[k] - expected[k].numpy()).max()) for k in compared)
    if worst > tolerance:
        raise RuntimeError(f"{onnx_path}: ONNX Runtime and PyTorch differ by {worst:.2e} (> {tolerance:g})")
    return worst


def ship(
    trained: TrainedModel,
    onnx_path: Path,
    *,
    report: dict[str, Any] | None = None,
    name: str | None = None,
    version: str = "0.1.0",
) -> ModelCard:
    """Export, check the export against PyTorch, and write the card beside it."""
    export_onnx(trained.model, onnx_path)
    check_export(trained.model, onnx_path)
    card = build_card(
        trained,
        onnx_path,
        name=name or onnx_path.stem,
        version=version,
        metrics=card_metrics(report) if report else None,
        command=trained.command or None,
    )
    write_card(card, onnx_path)
    return card


class _Calibration(CalibrationDataReader):
    """Feeds training images (never test images) to the int8 calibrator."""

    def __init__(self, x: np.ndarray, batch_size: int = 16) -> None:
        self._batches = iter(
            {"image": x[i : i + batch_size], "target_class": np.full(len(x[i : i + batch_size]), -1, dtype=np.int64)}
            for i in range(0, len(x), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps; 1 where both are constant (all zero)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    denominator = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    same_constant = (denominator == 0) & np.all(a == b, axis=1)
    return np.where(same_constant, 1.0, (a * b).sum(1) / np.where(denominator == 0, 1.0, denominator))


def quantize_and_compare(
    trained: TrainedModel, records: Sequence[Record], onnx_path: Path, calibration_images: int = 128
) -> dict[str, Any]:
    """Static int8 quantisation (QDQ, per-channel weights) of ``onnx_path``, calibrated
    on training images; write ``<stem>.int8.onnx`` + card and ``<stem>.quantization.json``
    with the change in accuracy, balanced accuracy, mAP@5 and Grad-CAM agreement on
    the held-out split."""
    from training.evaluate import score

    labels = np.array([r.label for r in records], dtype=np.int64)
    images = to_tensor(resize_images(records, trained.model_config.size), trained.norm).numpy()
    train_idx, test_idx = trained.split.train, trained.split.test
    rng = np.random.default_rng(trained.train_config.seed)
    calibration = images[np.sort(rng.choice(train_idx, min(calibration_images, len(train_idx)), replace=False))]
    int8_path = onnx_path.with_name(f"{onnx_path.stem}.int8.onnx")
    # Convolutions only: they hold most weights and time. The gradient graph reuses the
    # LSTM and dense weights transposed, which per-channel QDQ cannot express.
    quantize_static(
        str(onnx_path),
        str(int8_path),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    results: dict[str, dict[str, Any]] = {}
    maps: dict[str, np.ndarray] = {}
    reference_target: np.ndarray | None = None
    for variant, path in (("float32", onnx_path), ("int8", int8_path)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs, test_emb, _ = run_onnx(session, images[test_idx])
        _, train_emb, _ = run_onnx(session, images[train_idx])
        if reference_target is None:
            reference_target = probs.argmax(1)
        # Grad-CAM of the same class (float32's prediction) in both variants
        _, _, maps[variant] = run_onnx(session, images[test_idx], reference_target)
        report = score(labels[test_idx], probs, test_emb, labels[train_idx], train_emb, trained.classes)
        results[variant] = {
            "accuracy": report["accuracy"],
            "balanced_accuracy": report["balanced_accuracy"],
            "map@5": report["retrieval"]["map@5"],
            "predictions": probs.argmax(1),
            "file_bytes": path.stat().st_size,
        }
    agreement = _pearson_rows(maps["float32"], maps["int8"])
    summary: dict[str, Any] = {
        "float32": {k: v for k, v in results["float32"].items() if k != "predictions"},
        "int8": {k: v for k, v in results["int8"].items() if k != "predictions"},
        "change": {k: results["int8"][k] - results["float32"][k] for k in ("accuracy", "balanced_accuracy", "map@5")},
        "prediction_agreement": float(np.mean(results["int8"]["predictions"] == results["float32"]["predictions"])),
        "gradcam_pearson": {"mean": float(agreement.mean()), "min": float(agreement.min())},
        "calibration": (
            f"{len(calibration)} training-split images; QDQ convolutions: per-channel int8 weights, uint8 activations"
        ),
        "n_test": len(test_idx),
    }
    card = build_card(
        trained,
        int8_path,
        name=f"{onnx_path.stem}-int8",
        version="0.1.0",
        metrics={**{k: v for k, v in summary["int8"].items() if k != "file_bytes"}, "quantization": summary},
        command=trained.command or None,
    )
    write_card(card, int8_path)
    tmp = onnx_path.with_name(f"{onnx_path.stem}.quantization.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, onnx_path.with_name(f"{onnx_path.stem}.quantization.json"))
    return summary


def onnx_outputs(session: ort.InferenceSession, spec: InputSpec) -> Outputs:
    """An exported model as training.calibration's ``Outputs`` (the raw graph: no
    calibration applied)."""

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = ((images.astype(np.float32) / 255.0 - spec.mean) / spec.std)[:, None]
        probs, emb, _ = run_onnx(session, np.ascontiguousarray(x, dtype=np.float32))
        return probs, emb

    return outputs


def calibrate(onnx_path: Path, source: DataSource) -> dict[str, Any]:
    """Refit the domain guard and the probability calibration of an exported model on
    the split it was trained with (rebuilt from ``source`` and the card's fractions and
    seed) and on fresh images where the source makes them, write them into its card, and add the guard and calibration sections to the report
    beside it (``<stem>.report.json`` / ``.md``). The ONNX file is not touched."""
    from training.band_calibration import band_calibration
    from training.evaluate import guard_and_calibration, markdown_report, plot_confusion, plot_roc

    raw = json.loads(card_path_for(onnx_path).read_text())  # read as data: a card of before has another guard
    if sha256_file(onnx_path) != raw.get("sha256"):
        raise ValueError(f"{onnx_path} is not the file its model card describes (sha256 differs)")
    spec, hyper = InputSpec(**raw["input"]), raw["hyperparameters"]
    records = source.load()
    labels = np.array([r.label for r in records], dtype=np.int64)
    split = make_split(
        records, float(str(hyper["test_fraction"])), float(str(hyper["val_fraction"])), int(str(hyper["seed"]))
    )
    if class_counts(labels, split) != raw["training_data"].get("counts"):
        raise ValueError(
            f"these records ({source.describe()}) are not the ones {onnx_path.name} was trained on: "
            "give the data options of the card's training command"
        )
    images = resize_images(records, spec.height)
    outputs = onnx_outputs(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]), spec)
    ood, calibration = fit_guard_and_calibration(outputs, images, records, split, source, spec.height)
    report_path = onnx_path.with_suffix(".report.json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    sections = guard_and_calibration(
        outputs, images, labels, split, ood, calibration, source, onnx_path.with_suffix(".reliability.png")
    )
    report.update(sections)
    metrics = {
        **raw.get("metrics", {}),
        "ood": _headline_guard(sections["ood"]),
        "calibration": sections["calibration"],
    }
    if "per_class" in report:
        # A map other than temperature may move the predicted class: the held-out
        # split's classification metrics, bands and plots follow the new probabilities.
        probs = calibrated(outputs(images[split.test])[0], calibration)
        classification = classification_metrics(labels[split.test], probs, raw["classes"])
        report.update(classification, birads_bands=band_calibration(labels[split.test], probs, raw["classes"]))
        plot_confusion(
            np.array(classification["confusion_matrix"]), raw["classes"], onnx_path.with_suffix(".confusion.png")
        )
        plot_roc(labels[split.test], probs, raw["classes"], onnx_path.with_suffix(".roc.png"))
        report.setdefault("plots", {})["reliability"] = onnx_path.with_suffix(".reliability.png").name
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        onnx_path.with_suffix(".report.md").write_text(markdown_report(report))
        metrics.update({k: v for k, v in classification.items() if k != "confusion_matrix"})
    write_card(
        ModelCard.model_validate(
            {**raw, "ood": ood.model_dump(), "calibration": calibration.model_dump(), "metrics": metrics}
        ),
        onnx_path,
    )
    return sections


def _headline_guard(ood: dict[str, Any]) -> dict[str, Any]:
    """The guard's numbers for the card: per source without the list of misses."""
    return {
        **{k: v for k, v in ood.items() if k not in ("sources", "candidates")},
        "sources": [{k: v for k, v in s.items() if k != "missed"} for s in ood["sources"]],
    }
