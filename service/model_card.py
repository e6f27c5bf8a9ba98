"""The model card: what the node must know about a model, read, never hard-coded.

``training/`` writes one JSON card beside each ONNX file; the worker reads it to
prepare pixels exactly as the model was trained, to name the classes, to guard
against images outside the model's experience, and to identify the model in every
output object. The ONNX interface it describes:

inputs
  ``image``         float32 [N, 1, H, W], grayscale, ``(pixel/255 - mean) / std``
  ``target_class``  int64 [N], the class to explain; -1 explains the predicted class
outputs
  ``probabilities`` float32 [N, C], softmax over ``classes`` (before the card's
                    ``calibration``, which the node applies)
  ``embedding``     float32 [N, D], L2-normalised penultimate features (retrieval)
  ``gradcam``       float32 [N, h, w], the class activation map of the target class
                    (Grad-CAM or Grad-CAM++ on a convolutional map of the model's
                    input region; ``hyperparameters`` name which), ReLU'd and scaled
                    to [0, 1] per image
  ``lesion_mask``   float32 [N, h, w], only where the card has ``segmentation``:
                    the per-pixel probability of lesion in [0, 1] on the model
                    input's grid; the node resizes it to the crop and thresholds it
                    at the card's ``segmentation.threshold``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

DISCLAIMER = (
    "AI result, not for primary diagnosis. The shipped model was trained on synthetic "
    "images only; a qualified radiologist must review every image."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = 1
    mean: float
    std: float = Field(gt=0)
    grayscale: str = "ITU-R BT.601 luma of RGB; MONOCHROME1 inverted"
    resize: str = "bilinear, whole crop to height x width (aspect not kept)"


class OodSpec(_Strict):
    """The domain guard (service.model.guard): squared Mahalanobis distance of an
    image's B-mode statistics (``features``, in order) to the training images'
    ``mean`` under the shrunk inverse covariance ``precision``; above ``threshold``
    (the ``percentile`` of the validation split's scores) the image is outside the
    model's training domain and is not assessed."""

    method: str = "bmode-statistics-mahalanobis"
    features: list[str]
    mean: list[float]
    precision: list[list[float]]
    threshold: float = Field(ge=0)
    percentile: float = Field(gt=0, le=100)
    fitted_on: str = ""


class CalibrationSpec(_Strict):
    """The calibration of the class probabilities (service.model.guard.calibrated
    applies it): softmax(``weights`` @ log p + ``bias``), the Dirichlet-calibration map
    (Kull et al. 2019) of which vector scaling (diagonal ``weights``) and temperature
    scaling (``weights`` I / T) are special cases; a card with no ``weights`` is
    temperature scaling by ``temperature`` alone."""

    method: str = "temperature"
    temperature: float = Field(default=1.0, gt=0)
    weights: list[list[float]] | None = None
    bias: list[float] | None = None
    fitted_on: str = ""
    #: The cross-validated comparison that chose ``method`` (for the report; the node
    #: does not read it).
    candidates: list[dict[str, float | str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _square(self) -> CalibrationSpec:
        if (self.weights is None) != (self.bias is None):
            raise ValueError("calibration: weights and bias come together")
        if self.weights is not None and self.bias is not None:
            c = len(self.bias)
            if len(self.weights) != c or any(len(row) != c for row in self.weights):
                raise ValueError(f"calibration: weights must be {c} x {c}, one row and column per bias entry")
        return self


class SegmentationSpec(_Strict):
    """The model's lesion segmentation output: its name in the graph, its map size
    (``height`` x ``width``, any fraction of the input; the node resizes it), and the
    probability above which a pixel is lesion (chosen on the validation split to
    maximise Dice)."""

    output: str = "lesion_mask"
    threshold: float = Field(gt=0, lt=1)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    fitted_on: str = ""


class ModelCard(_Strict):
    name: str
    version: str
    architecture: str
    classes: list[str]
    input: InputSpec
    embedding_dim: int
    onnx_file: str
    sha256: str
    opset: int
    ood: OodSpec
    calibration: CalibrationSpec | None = None
    #: None: the model outlines no lesion (older models, architectures without a head).
    segmentation: SegmentationSpec | None = None
    hyperparameters: dict[str, object] = Field(default_factory=dict)
    training_data: dict[str, object]
    metrics: dict[str, object] = Field(default_factory=dict)
    created: str
    intended_use: str
    disclaimer: str = DISCLAIMER

    @classmethod
    def load(cls, onnx_path: Path) -> ModelCard:
        """Read the card beside ``onnx_path`` and check the file is the one it describes."""
        card_path = card_path_for(onnx_path)
        if not card_path.is_file():
            raise FileNotFoundError(f"model card {card_path} is missing for {onnx_path}")
        card = cls.model_validate(json.loads(card_path.read_text()))
        actual = sha256_file(onnx_path)
        if actual != card.sha256:
            raise ValueError(f"{onnx_path} has sha256 {actual}, its model card says {card.sha256}")
        return card


def card_path_for(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".card.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
