"""The model at run time: one ONNX Runtime session per process, no torch.

:class:`OnnxModel` loads the ONNX file with its model card (the card's sha256 must
match the file), checks the graph has the interface the card describes
(service.model_card), picks the execution provider, and runs batches of prepared
images: calibrated class probabilities, the retrieval embedding, the Grad-CAM
heatmap of the predicted (or a chosen) class, the lesion mask where the card
declares one, and the domain guard's verdict (service.model.guard).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.model.guard import DomainGuard, calibrated, pixels_of
from service.model_card import ModelCard
from service.results import ModelIdentity

LOG = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
INPUTS = ("image", "target_class")
OUTPUTS = ("probabilities", "embedding", "gradcam")

Provider = Literal["auto", "cpu", "cuda"]


class ModelError(RuntimeError):
    """The model cannot be used as configured; the message says what to fix."""


@dataclass(frozen=True)
class Prediction:
    """The model's output for N images (row i belongs to input image i)."""

    probabilities: np.ndarray  # float32 [N, C], calibrated as the card says
    embedding: np.ndarray  # float32 [N, D], L2-normalised
    gradcam: np.ndarray  # float32 [N, h, w] in [0, 1]
    ood_distance: np.ndarray  # float32 [N]: the domain guard's score (service.model.guard)
    out_of_distribution: np.ndarray  # bool [N]: ood_distance > the card's threshold
    #: float32 [N, h, w] in [0, 1]: per-pixel lesion probability (threshold: the card's
    #: ``segmentation.threshold``); None when the card declares no segmentation
    lesion_mask: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def choose_providers(requested: Provider, available: list[str]) -> list[str]:
    """Execution providers to ask ONNX Runtime for, in order of preference.

    ``auto`` takes CUDA when ``onnxruntime-gpu`` offers it (ONNX Runtime itself falls
    back to CPU when no GPU answers, which :class:`OnnxModel` logs); ``cuda`` insists.
    """
    if requested == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if requested == "cuda":
        raise ModelError(
            f"execution_provider is 'cuda' but this ONNX Runtime offers only {', '.join(available)}: "
            "install the 'gpu' extra (onnxruntime-gpu) or set SONOCASE_EXECUTION_PROVIDER=auto"
        )
    return [CPU]


class OnnxModel:
    """The model of ``path`` and its card, ready to run batches of prepared images."""

    def __init__(self, path: Path, provider: Provider = "auto", batch_size: int = 8, threads: int = 0) -> None:
        """``threads``: ONNX Runtime intra-op threads (0 = one per core); a host
        running several worker processes gives each a share of the cores."""
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist (setting model_path)")
        try:
            self.card = ModelCard.load(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelError(str(exc)) from exc
        self.path = path
        self.batch_size = batch_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        requested = choose_providers(provider, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
        except Exception as exc:  # ONNX Runtime's errors derive from Exception only
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        segmentation = self.card.segmentation
        self._outputs = list(OUTPUTS) + ([segmentation.output] if segmentation else [])
        self.provider = self.session.get_providers()[0]
        if requested[0] != self.provider:
            LOG.warning(
                "model %s: %s was requested but ONNX Runtime runs on %s", path.name, requested[0], self.provider
            )
        self._check_interface()
        try:
            self.guard = DomainGuard(self.card.ood)
        except ValueError as exc:
            raise ModelError(f"model {path}: {exc}") from exc
        LOG.info(
            "model %s %s (sha256 %s) runs on %s",
            self.card.name,
            self.card.version,
            self.card.sha256[:12],
            self.provider,
        )

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(name=self.card.name, version=self.card.version, sha256=self.card.sha256)

    def _check_interface(self) -> None:
        """The graph must be what the card says, or every result would be wrong."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        problems = [f"input {n!r} is missing" for n in INPUTS if n not in inputs]
        problems += [f"output {n!r} is missing" for n in self._outputs if n not in outputs]
        spec = self.card.input
        if "image" in inputs and list(inputs["image"][1:]) != [spec.channels, spec.height, spec.width]:
            problems.append(
                f"input 'image' has shape {inputs['image']}, the card says "
                f"[N, {spec.channels}, {spec.height}, {spec.width}]"
            )
        for name, size, what in (
            ("probabilities", len(self.card.classes), "classes"),
            ("embedding", self.card.embedding_dim, "embedding_dim"),
        ):
            if name in outputs and outputs[name][1] != size:
                problems.append(f"output {name!r} has shape {outputs[name]}, the card's {what} is {size}")
        segmentation = self.card.segmentation
        if (
            segmentation
            and segmentation.output in outputs
            and list(outputs[segmentation.output][1:]) != [segmentation.height, segmentation.width]
        ):
            problems.append(
                f"output {segmentation.output!r} has shape {outputs[segmentation.output]}, the card's "
                f"segmentation says [N, {segmentation.height}, {segmentation.width}]"
            )
        features = len(self.card.ood.features)
        if len(self.card.ood.mean) != features or any(len(row) != features for row in self.card.ood.precision):
            problems.append("the card's domain guard has no mean and precision of one value per feature")
        if problems:
            raise ModelError(f"model {self.path} does not match its card: " + "; ".join(problems))

    def run(self, batch: np.ndarray, target_class: np.ndarray | None = None) -> Prediction:
        """Run ``batch`` (float32 [N, 1, H, W], prepared by service.model.imaging) in chunks
        of ``batch_size``; Grad-CAM explains ``target_class`` per image, or the
        predicted class where it is None or -1."""
        n = len(batch)
        targets = np.full(n, -1, np.int64) if target_class is None else np.asarray(target_class, np.int64)
        if targets.shape != (n,):
            raise ValueError(f"target_class must have one entry per image ({n}), got shape {targets.shape}")
        segmentation = self.card.segmentation
        if n == 0:
            empty = np.zeros((0,), np.float32)
            return Prediction(
                np.zeros((0, len(self.card.classes)), np.float32),
                np.zeros((0, self.card.embedding_dim), np.float32),
                np.zeros((0, 0, 0), np.float32),
                empty,
                empty.astype(bool),
                np.zeros((0, segmentation.height, segmentation.width), np.float32) if segmentation else None,
            )
        parts = [
            self.session.run(
                self._outputs,
                {
                    "image": np.ascontiguousarray(batch[i : i + self.batch_size], np.float32),
                    "target_class": targets[i : i + self.batch_size],
                },
            )
            for i in range(0, n, self.batch_size)
        ]
        probabilities, embedding, gradcam, *mask = (
            np.concatenate([p[k] for p in parts]) for k in range(len(self._outputs))
        )
        score = self.guard.score(pixels_of(batch, self.card.input))
        return Prediction(
            calibrated(probabilities, self.card.calibration),
            embedding,
            gradcam,
            score,
            score > self.guard.threshold,
            mask[0] if mask else None,
        )
