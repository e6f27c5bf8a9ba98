"""The similar-case library's test inputs: a small ONNX model with the node's
interface, the ``sonocase index`` command run in-process, study labels, a report
that is not an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pydicom
from click.testing import CliRunner, Result
from onnx import TensorProto, helper
from pydicom.uid import BasicTextSRStorage, generate_uid

from service.cli import cli
from service.model_card import DISCLAIMER, ModelCard, card_path_for, sha256_file
from tests.support.common import guard_card_entry

CLASSES = ["normal", "benign", "malignant"]
SIDE = 16  # model input side: small, so a test embeds a study in milliseconds
DIM = 24


def write_model(path: Path, seed: int, version: str) -> Path:
    """A small ONNX model with the node's interface (see service.model_card): a
    random projection of the image as the L2-normalised embedding, a linear
    classifier on it, the input itself as the "Grad-CAM". It stands in for the
    shipped model, which is far slower and trained by another stage."""
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", TensorProto.FLOAT, [SIDE * SIDE, DIM], rng.normal(size=SIDE * SIDE * DIM).tolist())
    c = helper.make_tensor("c", TensorProto.FLOAT, [DIM, len(CLASSES)], rng.normal(size=DIM * len(CLASSES)).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, SIDE, SIDE])
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["features"]),
        helper.make_node("LpNormalization", ["features"], ["embedding"], axis=1, p=2),
        helper.make_node("MatMul", ["embedding", "c"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("Reshape", ["image", "shape"], ["plane"]),
        helper.make_node("Sigmoid", ["plane"], ["gradcam"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIDE, SIDE]),
            helper.make_tensor_value_info("target_class", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(CLASSES)]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM]),
            helper.make_tensor_value_info("gradcam", TensorProto.FLOAT, ["N", SIDE, SIDE]),
        ],
        initializer=[w, c, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    card = ModelCard(
        name="tiny-test",
        version=version,
        architecture="random projection",
        classes=CLASSES,
        input={"height": SIDE, "width": SIDE, "mean": 0.5, "std": 0.25},
        embedding_dim=DIM,
        onnx_file=path.name,
        sha256=sha256_file(path),
        opset=17,
        ood=guard_card_entry(1e12),
        training_data={"source": "none"},
        created="2026-01-01T00:00:00Z",
        intended_use="tests",
        disclaimer=DISCLAIMER,
    )
    card_path_for(path).write_text(card.model_dump_json())
    return path


def study_labels(labels_csv: Path) -> dict[str, str]:
    return dict(line.split(",")[:2] for line in labels_csv.read_text().splitlines()[1:])


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, ["index", *args], env=env, catch_exceptions=False)


def write_report(image: Path, out: Path) -> pydicom.Dataset:
    """A report (Basic Text SR, no pixels) in the study of ``image``, written to
    ``out``: not an image, so a copy from the PACS must leave it there."""
    report = pydicom.dcmread(image)
    del report.PixelData
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.Modality = "SR"
    report.save_as(out)
    return report
