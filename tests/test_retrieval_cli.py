"""``sonocase index``: the commands on real synthetic DICOM studies, a real ONNX model
run by ONNX Runtime, and the real index, started as the user starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper

from service.cli import cli
from service.model_card import DISCLAIMER, ModelCard, card_path_for, sha256_file
from service.results import ModelIdentity
from service.retrieval import SimilarCaseIndex
from service.retrieval_cli import read_labels_csv
from training.data.synthetic import write_busi_layout, write_dicom_dataset

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
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIDE, SIDE]),
         helper.make_tensor_value_info("target_class", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(CLASSES)]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM]),
         helper.make_tensor_value_info("gradcam", TensorProto.FLOAT, ["N", SIDE, SIDE])],
        initializer=[w, c, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    card = ModelCard(
        name="tiny-test", version=version, architecture="random projection", classes=CLASSES,
        input={"height": SIDE, "width": SIDE, "mean": 0.5, "std": 0.25}, embedding_dim=DIM,
        onnx_file=path.name, sha256=sha256_file(path), opset=17,
        ood={"centroids": [[0.0] * DIM], "threshold": 10.0, "percentile": 99.0},
        training_data={"source": "none"}, created="2026-01-01T00:00:00Z", intended_use="tests",
        disclaimer=DISCLAIMER,
    )
    card_path_for(path).write_text(card.model_dump_json())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    return write_model(folder / "a.onnx", 1, "1"), write_model(folder / "b.onnx", 2, "2")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic studies, 3 images per class, and their labels CSV."""
    folder = tmp_path_factory.mktemp("studies")
    _, labels = write_dicom_dataset(folder, 3, seed=5)
    return folder, labels


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, ["index", *args], env=env, catch_exceptions=False)


@pytest.fixture
def env(tmp_path: Path, models: tuple[Path, Path]) -> dict[str, str]:
    return {"SONOCASE_DATA_DIR": str(tmp_path / "data"), "SONOCASE_MODEL_PATH": str(models[0]),
            "SONOCASE_EXECUTION_PROVIDER": "cpu", "SONOCASE_DURABILITY": "none"}


def test_labels_csv_errors_name_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("study_instance_uid,label,label_source\n1.2,benign,biopsy\n1.3,cyst,biopsy\n"
                    ",benign,biopsy\n1.4,malignant,hearsay\n1.2,malignant,biopsy\n")
    with pytest.raises(ValueError) as err:
        read_labels_csv(path, CLASSES)
    message = str(err.value)
    for expected in ("line 3: label 'cyst'", "line 4: no study_instance_uid", "line 5: label_source 'hearsay'",
                     "line 6: 1.2 is labelled twice"):
        assert expected in message
    path.write_text("sop_instance_uid,label,label_source\n1.5,Benign,synthetic phantom\n")
    assert read_labels_csv(path, CLASSES, source="radiologist")["1.5"].label == "benign"
    with pytest.raises(ValueError, match="label_source 'synthetic phantom'.*--label-source"):
        read_labels_csv(path, CLASSES)
    path.write_text("uid,label\n1.5,benign\n")
    with pytest.raises(ValueError, match="needs a header with label and one of study_instance_uid"):
        read_labels_csv(path, CLASSES, source="biopsy")
