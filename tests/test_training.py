"""Training, evaluation metrics and the command-line paths (train, evaluate, export,
compare, cross-validation) on tiny synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from service.cli import cli
from service.datasets.synthetic import write_busi_layout, write_dicom_dataset
from service.model_card import ModelCard
from training.evaluate import compare_architectures, cross_validate, evaluate, retrieval_metrics, summarize
from training.models import ModelConfig, build_model
from training.train import (
    DataSource,
    Split,
    TrainConfig,
    load_trained,
    make_split,
    predict,
    resize_images,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = ModelConfig(arch="hybrid", width=0.125, size=64, embedding_dim=16, rnn_hidden=16)
SOURCE = DataSource(kind="synthetic", synthetic_per_class=10, seed=0)


@pytest.fixture(scope="module")
def records():  # type: ignore[no-untyped-def]
    return SOURCE.load()


@pytest.fixture(scope="module")
def split(records) -> Split:  # type: ignore[no-untyped-def]
    return make_split(records, 0.2, 0.2, seed=0)


def test_split_is_disjoint_and_never_splits_a_group(records, split: Split) -> None:  # type: ignore[no-untyped-def]
    parts = [set(split.fit), set(split.val), set(split.test)]
    assert sum(map(len, parts)) == len(records)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    groups = [{records[i].group for i in part} for part in parts]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert {records[i].label for i in split.test} == {0, 1, 2}


@pytest.mark.heavy
def test_a_short_training_run_lowers_the_loss(records, split: Split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = TrainConfig(epochs=4, batch_size=4, augment=True, seed=0, patience=10)
    trained = train(records, split, TINY, config, SOURCE, tmp_path, progress=False)
    labels = torch.tensor([records[i].label for i in split.fit])
    images = resize_images([records[i] for i in split.fit], TINY.size)
    torch.manual_seed(config.seed)  # the same initial weights train() started from
    initial = build_model(TINY)
    before = torch.nn.functional.cross_entropy(torch.from_numpy(predict(initial, images, trained.norm)[0]), labels)
    after = torch.nn.functional.cross_entropy(torch.from_numpy(predict(trained.model, images, trained.norm)[0]), labels)
    assert float(after) < float(before) - 0.05
    assert len(trained.history) == 4
    # model.pt round trip: same weights, configs and split
    loaded = load_trained(tmp_path)
    assert loaded.split == split and loaded.model_config == TINY and loaded.norm == trained.norm
    np.testing.assert_allclose(
        predict(loaded.model, images, loaded.norm)[1], predict(trained.model, images, trained.norm)[1], atol=1e-6
    )
    assert loaded.ood == trained.ood and loaded.calibration == trained.calibration
    assert loaded.calibration is not None and "fresh images" in loaded.calibration.fitted_on
    with pytest.raises(ValueError, match="not the ones this model's split was made on"):
        evaluate(trained, records[:-3], tmp_path)


@pytest.mark.heavy
def test_resume_continues_where_it_stopped(records, split: Split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    straight = train(records, split, TINY, TrainConfig(epochs=2, patience=10), SOURCE, tmp_path / "a", progress=False)
    train(records, split, TINY, TrainConfig(epochs=1, patience=10), SOURCE, tmp_path / "b", progress=False)
    resumed = train(
        records, split, TINY, TrainConfig(epochs=2, patience=10), SOURCE, tmp_path / "b", resume=True, progress=False
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="different model config"):
        train(
            records,
            split,
            ModelConfig(**{**TINY.to_dict(), "rnn_hidden": 8}),
            TrainConfig(epochs=3),
            SOURCE,
            tmp_path / "b",
            resume=True,
            progress=False,
        )


# ---- retrieval and summaries ------------------------------------------------------


def test_retrieval_metrics_by_hand() -> None:
    gallery = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    gallery_labels = np.array([0, 1, 0, 1, 1, 0])
    query, query_labels = np.array([[0.1]]), np.array([0])
    got = retrieval_metrics(query, query_labels, gallery, gallery_labels, k=3)
    # ranks: 0 (rel), 1 (not), 2 (rel): AP = (1/1 + 2/3) / min(3, 3 relevant)
    assert got["map@3"] == pytest.approx((1 + 2 / 3) / 3)
    assert got["precision@3"] == pytest.approx(2 / 3)
    assert got["acc@1"] == 1.0


def test_summarize_gives_mean_and_spread() -> None:
    reports = [{"accuracy": a, "balanced_accuracy": a, "retrieval": {"map@5": a}} for a in (0.6, 0.8)]
    summary = summarize(reports)
    assert summary["accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["accuracy"]["std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert summary["retrieval.map@5"]["n"] == 2 and summary["ece"]["n"] == 0


# ---- cross-validation and comparison -------------------------------------------------


@pytest.mark.heavy
def test_cross_validation_and_comparison_write_their_tables(records, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fast = TrainConfig(epochs=1, augment=False)
    summary = cross_validate(records, SOURCE, TINY, fast, 2, tmp_path / "cv", progress=False)
    assert summary["balanced_accuracy"]["n"] == 2 and summary["balanced_accuracy"]["std"] is not None
    assert (
        "± " not in (tmp_path / "cv" / "cv.md").read_text()
        and "| balanced_accuracy |" in (tmp_path / "cv" / "cv.md").read_text()
    )
    rows = compare_architectures(records, SOURCE, ["cnn", "rnn"], TINY, fast, tmp_path / "cmp", progress=False)
    assert [r["arch"] for r in rows] == ["cnn", "rnn"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "99.24" in table and "not clearly describe" in table and "| cnn |" in table
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][1]["arch"] == "rnn"


# ---- command line --------------------------------------------------------------------


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, prog_name="sonocase", catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.heavy
def test_cli_train_export_evaluate(tmp_path: Path) -> None:
    out, onnx_path = tmp_path / "run", tmp_path / "ship" / "tiny.onnx"
    code, output = _run(
        [
            "train",
            "--synthetic",
            "6",
            "--arch",
            "cnn",
            "--width",
            "0.125",
            "--size",
            "64",
            "--embedding-dim",
            "16",
            "--epochs",
            "1",
            "--no-augment",
            "--no-progress",
            "--out",
            str(out),
            "--export",
            str(onnx_path),
        ]
    )
    assert code == 0, output
    assert "balanced accuracy" in output and "pointing game" in output
    card = ModelCard.load(onnx_path)
    assert card.training_data["command"].startswith("sonocase train --synthetic 6 --arch cnn --width 0.125")
    assert card.metrics["n_test"] > 0 and "balanced_accuracy" in card.metrics
    assert card.metrics["localisation"]["all"]["n"] > 0  # the synthetic lesions carry masks
    for suffix in (
        ".report.md",
        ".report.json",
        ".confusion.png",
        ".roc.png",
        ".learning.png",
        ".gradcam.png",
        ".reliability.png",
    ):
        assert onnx_path.with_name(f"tiny{suffix}").is_file(), suffix
    assert card.metrics["ood"]["sources"] and card.calibration is not None

    code, output = _run(["evaluate", str(out)])
    assert code == 0, output
    assert "BI-RADS likelihood bands" in (out / "evaluation.report.md").read_text()
    bands = json.loads((out / "evaluation.report.json").read_text())["birads_bands"]
    assert sum(band["n"] for band in bands) == card.metrics["n_test"]  # every held-out image in one band
    for line in ("domain guard: threshold", "real-ultrasound          held out flagged", "ECE on held-out split"):
        assert line in output, output
    assert "Domain guard" in (out / "evaluation.report.md").read_text()

    code, output = _run(["calibrate", str(onnx_path), "--synthetic", "6"])
    assert code == 0 and "AUROC against held-out sources" in output, output
    assert ModelCard.load(onnx_path).ood.threshold > 0
    code, output = _run(["calibrate", str(onnx_path), "--synthetic", "7"])
    assert code != 0 and "not the ones" in output, output
    code, output = _run(["export", str(out), "--out", str(tmp_path / "again.onnx")])
    assert code == 0, output
    assert (
        ModelCard.load(tmp_path / "again.onnx").metrics["balanced_accuracy"]
        == json.loads((out / "evaluation.report.json").read_text())["balanced_accuracy"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train"], "exactly one of --synthetic"),
        (["train", "--synthetic", "4", "--busi", "."], "exactly one of --synthetic"),
        (["train", "--dicom", "."], "--dicom needs --labels"),
        (["train", "--synthetic", "4", "--size", "100"], "multiple of 32"),
        (["evaluate", "."], "no trained model"),
    ],
)
def test_cli_bad_input_gets_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert message in result.output


def test_cli_empty_busi_class_folder_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "Dataset_BUSI_with_GT"
    for name in ("benign", "malignant", "normal"):
        (root / name).mkdir(parents=True)
    result = CliRunner().invoke(cli, ["train", "--busi", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "holds no images" in result.output


@pytest.mark.integration
def test_python_dash_m_training_runs_the_same_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: python -m training train")
    for option in (
        "--synthetic",
        "--busi",
        "--dicom",
        "--arch",
        "--width",
        "--size",
        "--resume",
        "--folds",
        "--export",
    ):
        assert option in result.stdout


@pytest.mark.heavy
@pytest.mark.parametrize("layout", ["busi", "dicom"])
def test_cli_trains_from_a_busi_folder_and_from_dicom_with_labels(layout: str, tmp_path: Path) -> None:
    """The two real-data sources, written by the synthetic generator: a BUSI-layout
    folder, and ultrasound DICOM studies (grayscale and RGB/YBR JPEG) with a CSV."""
    if layout == "busi":
        folder = write_busi_layout(tmp_path / "data", 6, size=96, seed=1)
        data_args = ["--busi", str(folder)]
    else:
        _, labels = write_dicom_dataset(tmp_path / "data", 6, seed=1, size=96)
        data_args = ["--dicom", str(tmp_path / "data"), "--labels", str(labels)]
    out = tmp_path / "run"
    code, output = _run(
        [
            "train",
            *data_args,
            "--arch",
            "cnn",
            "--width",
            "0.125",
            "--size",
            "64",
            "--embedding-dim",
            "16",
            "--epochs",
            "1",
            "--no-augment",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0, output
    trained = load_trained(out)
    assert trained.source.kind == layout
    assert sum(trained.class_counts.values()) >= 18
    code, output = _run(["evaluate", str(out)])  # reloads the same records from the stored source
    assert code == 0, output
