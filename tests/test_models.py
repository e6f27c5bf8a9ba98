"""The four hand-written architectures: one interface, width multiplier, Kaiming
init that keeps Grad-CAM alive, initial weights from a user file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.gradcam import ExplainedModel
from training.models import (
    ARCHITECTURES,
    VGG16_D,
    HybridVGGRNN,
    ModelConfig,
    build_model,
    load_initial_weights,
    scaled,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SIZE = 64


def tiny(arch: str, **kw: object) -> ModelConfig:
    return ModelConfig(arch=arch, size=SIZE, embedding_dim=32, rnn_hidden=32, **{"width": 0.125, **kw})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_interface_for_every_architecture(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(arch)).eval()
    x = torch.randn(3, 1, SIZE, SIZE)
    seen: list[torch.Tensor] = []
    model.target_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        logits = model(x)
        fmap = model.features(x)
        emb = model.embed(fmap)
    assert logits.shape == (3, 3)
    assert fmap.dim() == 4 and fmap.shape[0] == 3
    assert emb.shape == (3, 32)
    assert torch.allclose(model.head(emb), logits)
    # the target layer is the module that outputs the explained map (hook-based Grad-CAM tools)
    assert torch.equal(seen[0], fmap)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kaiming_init_keeps_gradcam_alive(arch: str) -> None:
    """With PyTorch's default init VGG16's activations vanish and every map is zero."""
    torch.manual_seed(1)
    model = build_model(tiny(arch)).eval()
    x = torch.randn(4, 1, SIZE, SIZE)
    _, _, cams = ExplainedModel(model)(x, torch.tensor([0, 1, 2, -1]))
    assert model.features(x).std() > 0.1
    assert (cams.amax(dim=(1, 2)) > 0).sum() >= 3


def test_hybrid_is_vgg16_d_with_width_multiplier() -> None:
    full = HybridVGGRNN(ModelConfig(arch="hybrid", size=32))
    convs = [m for m in full.conv if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [c for c in VGG16_D if c != "M"]
    assert sum(isinstance(m, nn.MaxPool2d) for m in full.modules()) == 5
    quarter = HybridVGGRNN(ModelConfig(arch="hybrid", size=32, width=0.25))
    assert next(m.out_channels for m in quarter.conv if isinstance(m, nn.Conv2d)) == 16
    assert sum(p.numel() for p in quarter.conv.parameters()) < sum(p.numel() for p in full.conv.parameters()) / 10


@pytest.mark.parametrize("kw", [{"rnn_type": "gru"}, {"bidirectional": True}, {"batch_norm": False}])
def test_hybrid_variants(kw: dict[str, object]) -> None:
    model = build_model(tiny("hybrid", **kw)).eval()
    assert model(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 3)
    if kw.get("rnn_type") == "gru":
        assert isinstance(model.rows.rnn, nn.GRU)


@pytest.mark.heavy
@pytest.mark.parametrize(("layer", "side"), [("conv5_3", SIZE // 16), ("conv4_3", SIZE // 8), ("conv3_3", SIZE // 4)])
def test_hybrid_cam_layer_moves_the_map_not_the_weights(layer: str, side: int) -> None:
    """A finer Grad-CAM layer splits the same network elsewhere: same parameters,
    same logits, a map of the chosen layer's resolution from its target layer."""
    torch.manual_seed(0)
    reference = build_model(tiny("hybrid")).eval()
    model = build_model(tiny("hybrid", cam_layer=layer)).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, SIZE, SIZE)
    seen: list[torch.Tensor] = []
    model.target_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        fmap = model.features(x)
        torch.testing.assert_close(model.head(model.embed(fmap)), reference(x))
    assert fmap.shape[-2:] == (side, side)
    assert torch.equal(seen[0], fmap)


@pytest.mark.parametrize(
    ("layer", "skips"),
    [("conv5_3", [SIZE // 2, SIZE // 4, SIZE // 8]), ("conv4_3", [SIZE // 2, SIZE // 4]), ("conv3_3", [SIZE // 2])],
)
def test_hybrid_segmentation_head_outlines_at_half_the_input_size(layer: str, skips: list[int]) -> None:
    """The head reads the Grad-CAM layer's map and every block end above it from
    conv2_2 on, and gives one lesion logit per pixel of an H/2 grid; the
    classification path is that of the same weights without a head."""
    torch.manual_seed(0)
    model = build_model(tiny("hybrid", cam_layer=layer, segmentation=True)).eval()
    plain = build_model(tiny("hybrid", cam_layer=layer)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")})
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        fmap, finer = model.encode(x)
        logits = model.segment(fmap, finer)
        torch.testing.assert_close(model(x), plain(x))
    assert torch.equal(fmap, model.features(x))
    assert [t.shape[-1] for t in finer] == skips
    assert logits.shape == (2, SIZE // 2, SIZE // 2) and logits.std() > 0
    _probs, _emb, _cam, mask = ExplainedModel(model)(x, torch.tensor([-1, 1]))
    torch.testing.assert_close(mask, torch.sigmoid(logits))
    assert len(ExplainedModel(plain)(x, torch.tensor([-1, 1]))) == 3
    with pytest.raises(ValueError, match="no segmentation head"):
        plain.segment(*plain.encode(x))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"arch": "resnet"}, "unknown architecture"),
        ({"size": 100}, "multiple of 32"),
        ({"width": 0}, "width multiplier"),
        ({"rnn_type": "transformer"}, "rnn_type"),
        ({"cam_layer": "conv2_2"}, "cam_layer must be one of"),
        ({"arch": "cnn", "cam_layer": "conv4_3"}, "hybrid only"),
        ({"cam_method": "scorecam"}, "cam_method must be one of"),
        ({"arch": "cnn", "segmentation": True}, "segmentation head exists only for hybrid"),
    ],
)
def test_bad_config_is_named(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)  # type: ignore[arg-type]


def test_scaled_channels_never_vanish() -> None:
    assert scaled(64, 1.0) == 64
    assert scaled(64, 0.25) == 16
    assert scaled(32, 0.01) == 8


def test_initial_weights_from_our_own_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(tiny("cnn"))
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = build_model(tiny("cnn"))
    loaded = load_initial_weights(target, path)
    assert "head.1.weight" in loaded
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


def test_initial_weights_from_torchvision_vgg16_layout(tmp_path: Path) -> None:
    """The layout of torchvision's ``vgg16`` state dict (RGB first layer), as a user
    would download it: the conv stack is copied in order, RGB summed to gray."""
    state: dict[str, torch.Tensor] = {}
    c_in, index = 3, 0
    for item in VGG16_D:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(int(item), c_in, 3, 3)
        state[f"features.{index}.bias"] = torch.randn(int(item))
        c_in, index = int(item), index + 2  # conv, ReLU
    state["classifier.0.weight"] = torch.randn(8, 8)  # not ours: ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = HybridVGGRNN(ModelConfig(arch="hybrid", size=32, batch_norm=False, rnn_hidden=8, embedding_dim=8))
    loaded = load_initial_weights(model, path)
    assert len(loaded) == 26  # 13 weights + 13 biases
    convs = [m for m in model.conv if isinstance(m, nn.Conv2d)]
    assert torch.allclose(convs[0].weight, state["features.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(convs[-1].weight, state["features.28.weight"])

    narrow = HybridVGGRNN(ModelConfig(arch="hybrid", size=32, width=0.5, rnn_hidden=8, embedding_dim=8))
    with pytest.raises(ValueError, match=r"--width 1.0"):
        load_initial_weights(narrow, path)


def test_initial_weights_that_match_nothing_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_initial_weights(build_model(tiny("rnn")), path)
    with pytest.raises(FileNotFoundError):
        load_initial_weights(build_model(tiny("rnn")), tmp_path / "missing.pt")
