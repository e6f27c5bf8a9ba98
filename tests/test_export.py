"""ONNX export with Grad-CAM in the graph: equal to PyTorch, equal to the ``grad-cam``
package's GradCAM, and a model card the node can load."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.datasets.synthetic import generate_records
from service.model.guard import FEATURES
from service.model.inference import OnnxModel
from service.model_card import DISCLAIMER, ModelCard, card_path_for
from training.calibration import GUARD_PERCENTILE
from training.export import (
    EXPLAINED_OUTPUTS,
    SEGMENTATION_OUTPUT,
    _convolution_backward,
    _max_pool2d_backward,
    _threshold_backward,
    build_card,
    export_onnx,
    fold_batch_norm,
    quantize_and_compare,
    run_onnx,
    ship,
    write_card,
)
from training.gradcam import ExplainedModel, grad_cam
from training.models import ModelConfig, SonoModel, build_model
from training.train import (
    DataSource,
    Normalisation,
    TrainConfig,
    TrainedModel,
    make_split,
    resize_images,
    to_tensor,
    train,
)

pytestmark = [pytest.mark.heavy, pytest.mark.usefixtures("torch_single_thread")]

SIZE = 64


def _import_grad_cam() -> tuple[dict[str, type], type]:
    """The ``grad-cam`` package (installed with --no-deps, see scripts/setup.sh).

    Its package ``__init__`` imports ``torchvision`` (``utils/image.py``: transforms
    for its preprocessing helpers; ``utils/model_targets.py``: ``ops.box_iou`` for
    detection targets; ``sess.py``: ``resize``), and importing any submodule runs that
    ``__init__``, so no submodule avoids it. We never install torchvision: stand-in
    modules carrying those names exist only while the package imports (a fake for an
    import only: the CAM classes and ClassifierOutputTarget call none of them), then
    leave ``sys.modules`` so nothing else mistakes them for torchvision. Returns the
    package's class for each of our ``cam_method`` names, and its target class.
    """
    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.Compose = transforms.Normalize = transforms.ToTensor = None  # type: ignore[attr-defined]
    functional.resize = None  # type: ignore[attr-defined]
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    stand_ins = {
        "torchvision": torchvision,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }
    assert not set(stand_ins) & set(sys.modules), "torchvision must not be installed (see scripts/setup.sh)"
    sys.modules.update(stand_ins)
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}, ClassifierOutputTarget


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two synthetic ultrasound images of each class, normalised like the model input."""
    records = generate_records(2, seed=3)
    return to_tensor(resize_images(records, SIZE), Normalisation(mean=0.45, std=0.2))


def _with_batch_statistics(model: SonoModel, x: torch.Tensor) -> SonoModel:
    """Give batch-norm real running statistics (a train-mode pass over real images),
    so folding them into the convolutions is actually exercised."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def hybrid(images: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> tuple[SonoModel, Path]:
    torch.manual_seed(0)
    model = _with_batch_statistics(
        build_model(ModelConfig(arch="hybrid", width=0.125, size=SIZE, embedding_dim=32, rnn_hidden=32)), images
    )
    path = tmp_path_factory.mktemp("onnx") / "hybrid.onnx"
    export_onnx(model, path)
    return model, path


def test_interface_matches_the_model_card(hybrid: tuple[SonoModel, Path]) -> None:
    _, path = hybrid
    session = ort.InferenceSession(str(path))
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert inputs == {
        "image": ("tensor(float)", ["batch", 1, SIZE, SIZE]),
        "target_class": ("tensor(int64)", ["batch"]),
    }
    assert list(outputs) == EXPLAINED_OUTPUTS
    assert outputs["gradcam"] == ["batch", SIZE // 16, SIZE // 16]


@pytest.mark.parametrize("batch", [1, 6])
def test_onnx_equals_pytorch(hybrid: tuple[SonoModel, Path], images: torch.Tensor, batch: int) -> None:
    model, path = hybrid
    x = images[:batch]
    target = torch.tensor([-1, 0, 1, 2, -1, 1][:batch])
    probs, emb, cam = ExplainedModel(model)(x, target)
    got = ort.InferenceSession(str(path)).run(None, {"image": x.numpy(), "target_class": target.numpy()})
    np.testing.assert_allclose(got[0], probs.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[1], emb.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[2], cam.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got[1], axis=1), 1.0, atol=1e-5)
    assert np.all((got[2] >= 0) & (got[2] <= 1))
    np.testing.assert_allclose(got[2].max(axis=(1, 2)), 1.0, atol=1e-6)


def test_minus_one_explains_the_predicted_class(hybrid: tuple[SonoModel, Path], images: torch.Tensor) -> None:
    _, path = hybrid
    session = ort.InferenceSession(str(path))
    probs, _, predicted_cam = run_onnx(session, images.numpy())
    _, _, explicit_cam = run_onnx(session, images.numpy(), probs.argmax(axis=1))
    np.testing.assert_array_equal(predicted_cam, explicit_cam)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize(
    "arch", ["hybrid", "hybrid-conv4_3-gradcam++", "cnn", pytest.param("mobilenetv2", marks=pytest.mark.slow)]
)
def test_gradcam_matches_the_grad_cam_package(
    arch: str, hybrid: tuple[SonoModel, Path], images: torch.Tensor, tmp_path: Path
) -> None:
    """Pearson >= 0.99 for every class on several inputs, against pytorch_grad_cam's
    class for the model's CAM method (GradCAM, GradCAMPlusPlus) on the same model and
    target layer. An export whose gradient was frozen at trace time (or that ignored
    target_class) would fail: maps of different classes differ, and they differ
    between inputs."""
    cam_classes, ClassifierOutputTarget = _import_grad_cam()
    if arch == "hybrid":
        model, path = hybrid
    else:
        torch.manual_seed(1)  # untrained GAP networks often give a class an all-zero map; this seed does not
        name, *variant = arch.split("-")
        options = dict(zip(("cam_layer", "cam_method"), variant, strict=False))
        model = _with_batch_statistics(
            build_model(ModelConfig(arch=name, width=0.25, size=SIZE, embedding_dim=32, **options)), images
        )
        path = tmp_path / f"{arch}.onnx"
        export_onnx(model, path)
    session = ort.InferenceSession(str(path))
    x = images.numpy()
    per_class = []
    for cls in range(3):
        _, _, ours = session.run(None, {"image": x, "target_class": np.full(len(x), cls, dtype=np.int64)})
        assert ours.shape[1:] == model.features(images[:1]).shape[2:]
        with cam_classes[model.config.cam_method](model=model, target_layers=[model.target_layer]) as cam:
            reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(cls)] * len(x))
        live = [i for i in range(len(x)) if ours[i].max() > 0]
        assert len(live) >= 2, f"class {cls}: fewer than two non-zero maps to compare"
        for i in live:
            # pytorch_grad_cam scales to [0, 1] and resizes (cv2, bilinear) to the input size
            upsampled = cv2.resize(ours[i], (SIZE, SIZE))
            assert _pearson(upsampled, reference[i]) >= 0.99, (arch, cls, i)
        per_class.append(ours)
    assert not np.allclose(per_class[0], per_class[2]), "Grad-CAM ignores target_class"
    assert not np.allclose(per_class[1][0], per_class[1][-1]), "Grad-CAM ignores the image"


def test_a_class_with_no_evidence_gives_an_all_zero_map(images: torch.Tensor, tmp_path: Path) -> None:
    """A zero head row for class 0: no gradient, so the map must stay 0 (not NaN)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", width=0.25, size=SIZE, embedding_dim=16)).eval()
    with torch.no_grad():
        model.head[1].weight[0] = 0
    path = tmp_path / "cnn.onnx"
    export_onnx(model, path)
    _, _, cams = run_onnx(ort.InferenceSession(str(path)), images.numpy(), np.zeros(len(images), dtype=np.int64))
    assert np.all(cams == 0)


def test_batch_norm_folding_keeps_the_outputs(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _with_batch_statistics(build_model(ModelConfig(arch="mobilenetv2", width=0.25, size=SIZE)), images)
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), atol=1e-4, rtol=1e-4)


def test_plain_export_has_no_gradcam(hybrid: tuple[SonoModel, Path], images: torch.Tensor, tmp_path: Path) -> None:
    model, _ = hybrid
    path = tmp_path / "plain.onnx"
    export_onnx(model, path, explain=False)
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["probabilities", "embedding"]
    probs, _ = session.run(None, {"image": images.numpy()})
    expected, _, _ = ExplainedModel(model)(images, torch.full((len(images),), -1))
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """One short real training run (its OOD statistics and counts go into the card)."""
    source = DataSource(kind="synthetic", synthetic_per_class=8, seed=0)
    records = source.load()
    split = make_split(records, 0.25, 0.25, seed=0)
    return train(
        records,
        split,
        ModelConfig(arch="cnn", width=0.125, size=SIZE, embedding_dim=16),
        TrainConfig(epochs=1, augment=False),
        source,
        tmp_path_factory.mktemp("run"),
        progress=False,
    )


def test_card_is_written_beside_the_file_and_loads(trained_tiny: TrainedModel, tmp_path: Path) -> None:
    path = tmp_path / "sonocase-tiny.onnx"
    export_onnx(trained_tiny.model, path)
    card = build_card(
        trained_tiny,
        path,
        name="sonocase-tiny",
        version="9.9.9",
        metrics={"balanced_accuracy": 0.5},
        command="sonocase train --synthetic 6",
    )
    write_card(card, path)
    assert card_path_for(path).name == "sonocase-tiny.card.json"
    loaded = ModelCard.load(path)
    assert loaded == card
    assert loaded.disclaimer == DISCLAIMER and "not for primary diagnosis" in loaded.intended_use
    assert loaded.input.height == loaded.input.width == trained_tiny.model_config.size
    assert loaded.ood.features == list(FEATURES) and len(loaded.ood.precision) == len(FEATURES)
    assert loaded.ood.threshold > 0 and loaded.ood.percentile == GUARD_PERCENTILE
    assert loaded.calibration is not None and loaded.calibration.temperature > 0
    assert loaded.training_data["synthetic"] is True
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        ModelCard.load(path)


def test_ship_checks_the_export_and_writes_the_card(trained_tiny: TrainedModel, tmp_path: Path) -> None:
    path = tmp_path / "shipped.onnx"
    card = ship(trained_tiny, path, report={"balanced_accuracy": 0.5, "n_test": 6, "ignored": 1})
    assert ModelCard.load(path) == card
    assert card.metrics == {"balanced_accuracy": 0.5, "n_test": 6, "evaluated_on": "held-out test split"}


def test_int8_quantisation_reports_its_changes(trained_tiny: TrainedModel, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(trained_tiny.model, path)
    summary = quantize_and_compare(trained_tiny, trained_tiny.source.load(), path, calibration_images=16)
    int8 = tmp_path / "m.int8.onnx"
    card = ModelCard.load(int8)
    assert card.metrics["quantization"] == summary
    assert summary["int8"]["file_bytes"] < summary["float32"]["file_bytes"]
    for key in ("accuracy", "balanced_accuracy", "map@5"):
        assert summary["change"][key] == pytest.approx(summary["int8"][key] - summary["float32"][key])
    assert 0 <= summary["prediction_agreement"] <= 1
    assert -1 <= summary["gradcam_pearson"]["min"] <= summary["gradcam_pearson"]["mean"] <= 1
    assert (tmp_path / "m.quantization.json").is_file()
    session = ort.InferenceSession(str(int8))
    assert [o.name for o in session.get_outputs()] == EXPLAINED_OUTPUTS


def test_the_segmentation_head_exports_as_a_fourth_output(images: torch.Tensor, tmp_path: Path) -> None:
    """A hybrid with a segmentation head (batch-norm statistics folded into its
    decoder too) gives lesion_mask [N, H/2, W/2] equal to PyTorch's; the card
    declares it, round-trips, and the node reads the mask."""
    source = DataSource(kind="synthetic", synthetic_per_class=6, seed=0)
    records = source.load()
    split = make_split(records, 0.25, 0.25, seed=0)
    config = ModelConfig(
        arch="hybrid", width=0.125, size=SIZE, embedding_dim=16, rnn_hidden=16, cam_layer="conv4_3", segmentation=True
    )
    trained = train(
        records, split, config, TrainConfig(epochs=1, segmentation_weight=1.0), source, tmp_path / "run", progress=False
    )
    path = tmp_path / "seg.onnx"
    card = ship(trained, path)
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == [*EXPLAINED_OUTPUTS, SEGMENTATION_OUTPUT]
    assert session.get_outputs()[3].shape == ["batch", SIZE // 2, SIZE // 2]
    target = torch.tensor([-1, 0, 1, 2, -1, 1])
    expected = ExplainedModel(trained.model)(images, target)
    got = session.run(None, {"image": images.numpy(), "target_class": target.numpy()})
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)
    assert np.all((got[3] >= 0) & (got[3] <= 1)) and got[3].std() > 0

    assert card.segmentation == trained.segmentation and card.segmentation is not None
    assert card.segmentation.output == SEGMENTATION_OUTPUT
    assert (card.segmentation.height, card.segmentation.width) == (SIZE // 2, SIZE // 2)
    assert ModelCard.load(path) == card
    prediction = OnnxModel(path, "cpu").run(images.numpy())
    assert prediction.lesion_mask is not None
    np.testing.assert_allclose(prediction.lesion_mask, got[3], atol=1e-6)


def test_row_rnn_gradcam_matches_the_grad_cam_package(images: torch.Tensor) -> None:
    """The pixel-row LSTM explains rows (an [H, 1] map). Its export unrolls one LSTM
    step per pixel row and takes minutes, so this checks the in-graph computation
    (ExplainedModel, which export traces) in eager PyTorch."""
    cam_classes, ClassifierOutputTarget = _import_grad_cam()
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="rnn", width=0.25, size=SIZE, embedding_dim=16, rnn_hidden=16)).eval()
    for cls in range(3):
        _, _, ours = ExplainedModel(model)(images, torch.full((len(images),), cls))
        assert ours.shape == (len(images), SIZE, 1)
        with cam_classes["gradcam"](model=model, target_layers=[model.target_layer]) as cam:
            reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(cls)] * len(images))
        live = [i for i in range(len(images)) if ours[i].max() > 0]
        assert len(live) >= 2
        for i in live:
            assert _pearson(cv2.resize(ours[i].numpy(), (SIZE, SIZE)), reference[i]) >= 0.99, (cls, i)


def test_the_exported_backward_passes_equal_autograd() -> None:
    """The decompositions the export traces the gradient with: a stride-1 conv's input
    gradient as a flipped-kernel conv, VGG's 2x2 max-pool's by comparison, the gradient
    going to the first maximum of a window, ties included (ReLU's zeros), and ReLU's
    as a multiply by its mask."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    x[0, 0, :4, :4] = -1  # all-zero windows after the ReLU: four-way ties
    x[1, 1, 0, :2] = x[1, 1, 1, :2] = 5.0  # a tie at a positive maximum
    weight = torch.randn(5, 6, 3, 3)
    leaf = x.clone().requires_grad_(True)
    out = torch.nn.functional.conv2d(torch.nn.functional.max_pool2d(torch.relu(leaf), 2), weight, padding=1)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, leaf, grad_out)
    activated = torch.relu(x)
    pooled, indices = torch.ops.aten.max_pool2d_with_indices(activated, [2, 2], [2, 2])
    grad_pooled, _, _ = _convolution_backward(
        grad_out, pooled, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
    )
    grad_activated = _max_pool2d_backward(grad_pooled, activated, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
    assert (grad_activated[0, 0, 0:4:2, 0:4:2] != 0).all() and (grad_activated[0, 0, 1:4:2, :4] == 0).all()
    got = _threshold_backward(grad_activated, activated, 0.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[0, 0, :4, :4] == 0).all() and (got[1, 1, 0, 0] != 0) and (got[1, 1, :2, 1:2] == 0).all()


def test_the_row_lstm_is_one_onnx_node(hybrid: tuple[SonoModel, Path]) -> None:
    """The explained graph runs the LSTM forward as ONNX's LSTM node and its backward
    batched over rows (``training.export_lstm``), not as autograd's unrolled cells:
    a sigmoid and two tanh in all, not four and eight."""
    _, path = hybrid
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert (ops.count("LSTM"), ops.count("Sigmoid"), ops.count("Tanh")) == (1, 1, 2)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("layer", ["conv4_3", "conv5_3"])
def test_gradcam_at_the_pool_equals_gradcam_at_the_map(images: torch.Tensor, method: str, layer: str) -> None:
    """Taking the gradient at the max-pool after the map (what the explainer and the
    export do) gives the map that autograd through the pool gives."""
    torch.manual_seed(0)
    model = _with_batch_statistics(
        build_model(
            ModelConfig(arch="hybrid", width=0.125, size=SIZE, embedding_dim=16, cam_layer=layer, cam_method=method)
        ),
        images,
    )
    fmap = model.features(images).detach()
    assert (fmap == 0).any()  # ReLU's zeros: pooling windows with ties
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    leaf = fmap.clone().requires_grad_(True)
    through_pool = grad_cam(leaf, model.head(model.embed(leaf)), target, method=method).detach()
    pooled = model.cam_pool(fmap).requires_grad_(True)
    at_pool = grad_cam(fmap, model.head(model.embed_pooled(pooled)), target, method=method, pooled=pooled).detach()
    assert through_pool.amax() > 0
    torch.testing.assert_close(at_pool, through_pool, atol=1e-6 * float(through_pool.amax()), rtol=1e-4)
