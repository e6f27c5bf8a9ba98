"""The seed paper's four architectures, written by hand (no torchvision).

Every model has the same three-stage shape, so training, Grad-CAM, export and
retrieval never ask which architecture they hold:

``features(x)``
    image [N, 1, H, W] -> the last convolutional map [N, C, h, w], the layer Grad-CAM
    explains (``target_layer`` is the module that outputs it, for hook-based tools);
``embed(fmap)``
    map -> penultimate features [N, D] (the retrieval embedding before L2 norm);
``head(emb)``
    embedding -> class logits [N, classes].

``forward(x) = head(embed(features(x)))``.

Architectures in ``SEGMENTING_ARCHS`` may also carry a segmentation head
(``ModelConfig.segmentation``): ``encode(x)`` gives the map and the finer maps the head
reads, ``segment(fmap, skips)`` the per-pixel lesion logits [N, H/2, W/2].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHITECTURES: tuple[str, ...] = ("hybrid", "cnn", "rnn", "mobilenetv2")
#: Layers of the hybrid's VGG16 whose map Grad-CAM can explain (the last conv of a
#: block, VGG naming): conv5_3 gives an H/16 map, conv4_3 H/8, conv3_3 H/4.
CAM_LAYERS: tuple[str, ...] = ("conv5_3", "conv4_3", "conv3_3")
#: How the class activation map weighs the channels (``training.gradcam.grad_cam``).
CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++")
#: Architectures that can carry a lesion segmentation head (a decoder over VGG stages).
SEGMENTING_ARCHS: tuple[str, ...] = ("hybrid",)

#: VGG16, configuration D (Simonyan & Zisserman, table 1): channels, "M" = 2x2 max-pool.
VGG16_D: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
#: MobileNetV2 inverted-residual stages (Sandler et al., table 2): expansion t,
#: channels c, repeats n, first stride s.
MOBILENETV2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model before loading its weights."""

    arch: str = "hybrid"
    width: float = 1.0
    size: int = 224
    num_classes: int = 3
    embedding_dim: int = 256
    batch_norm: bool = True
    rnn_type: str = "lstm"
    rnn_hidden: int = 256
    bidirectional: bool = False
    dropout: float = 0.5
    #: hybrid only: the VGG16 layer whose map ``features`` returns and Grad-CAM explains.
    cam_layer: str = "conv5_3"
    #: the class activation map the exported model computes (``training.gradcam``).
    cam_method: str = "gradcam"
    #: a lesion segmentation head (``SEGMENTING_ARCHS`` only), trained on lesion masks.
    segmentation: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width multiplier must be in (0, 4], got {self.width}")
        if self.size < 32 or self.size % 32:
            raise ValueError(
                f"input size must be a multiple of 32 and at least 32 (five 2x downsamplings), got {self.size}"
            )
        if self.rnn_type not in ("lstm", "gru"):
            raise ValueError(f"rnn_type must be 'lstm' or 'gru', got {self.rnn_type!r}")
        if self.cam_layer not in CAM_LAYERS or (self.arch != "hybrid" and self.cam_layer != CAM_LAYERS[0]):
            raise ValueError(
                f"cam_layer must be one of {', '.join(CAM_LAYERS)} (hybrid only; the other "
                f"architectures explain their last conv map), got {self.cam_layer!r} for {self.arch}"
            )
        if self.cam_method not in CAM_METHODS:
            raise ValueError(f"cam_method must be one of {', '.join(CAM_METHODS)}, got {self.cam_method!r}")
        if self.segmentation and self.arch not in SEGMENTING_ARCHS:
            raise ValueError(f"a segmentation head exists only for {', '.join(SEGMENTING_ARCHS)}, not {self.arch}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def scaled(channels: int, width: float, divisor: int = 8) -> int:
    """Channels times the width multiplier, rounded to a multiple of ``divisor`` (never
    down by more than 10 %), as MobileNet does: tiny widths stay cheap yet usable."""
    value = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    return value + divisor if value < 0.9 * channels * width else value


class SonoModel(nn.Module):
    """The interface shared by the four architectures (see the module docstring).

    The defaults fit the common layout (a ``conv`` stack, then an ``embedding``
    stack); an architecture laid out otherwise overrides them."""

    config: ModelConfig
    conv: nn.Sequential
    embedding: nn.Sequential
    head: nn.Module

    def features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def embed(self, fmap: Tensor) -> Tensor:
        return self.embedding(fmap)

    def encode(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``features(x)`` and the finer maps the segmentation head reads (none here)."""
        return self.features(x), ()

    @property
    def cam_pool(self) -> nn.MaxPool2d | None:
        """The 2x2 max-pool (kernel = stride) that ``embed`` passes the map through
        first, if it does: then ``embed(fmap) == embed_pooled(cam_pool(fmap))`` and
        Grad-CAM can take its gradient at the pool's output (``training.gradcam``)."""
        return None

    def embed_pooled(self, pooled: Tensor) -> Tensor:
        """``embed`` from ``cam_pool``'s output on."""
        raise ValueError(f"this {self.config.arch} model does not pool the Grad-CAM map first")

    def segment(self, fmap: Tensor, skips: tuple[Tensor, ...]) -> Tensor:
        """Lesion logits [N, h, w] from ``encode``'s maps; only a model built with
        ``segmentation`` has a head."""
        raise ValueError(f"this {self.config.arch} model has no segmentation head")

    @property
    def target_layer(self) -> nn.Module:
        """The module whose output is ``features(x)``: the Grad-CAM target layer."""
        return self.conv[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(self.features(x)))


def _init_weights(modules: Iterator[nn.Module]) -> None:
    """Kaiming (He) initialisation for ReLU networks. With PyTorch's default init the
    activations vanish through VGG16's 13 convolutions and Grad-CAM maps are all zero."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


def _classifier(embedding_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(embedding_dim, num_classes))


class RowRNN(nn.Module):
    """Read a map [N, C, h, w] as a sequence of h rows of C*w values; return the last
    hidden state of the top layer (both directions when bidirectional)."""

    def __init__(self, row_features: int, config: ModelConfig) -> None:
        super().__init__()
        rnn_cls = nn.LSTM if config.rnn_type == "lstm" else nn.GRU
        self.rnn = rnn_cls(row_features, config.rnn_hidden, batch_first=True, bidirectional=config.bidirectional)
        self.out_features = config.rnn_hidden * (2 if config.bidirectional else 1)

    @staticmethod
    def sequence(fmap: Tensor, *, time_major: bool = False) -> Tensor:
        """The map's rows as the sequence the RNN reads: [N, h, C*w], or [h, N, C*w]."""
        n, c, h, w = fmap.shape
        if time_major:
            return fmap.permute(2, 0, 1, 3).reshape(h, n, c * w)
        return fmap.permute(0, 2, 1, 3).reshape(n, h, c * w)

    def forward(self, fmap: Tensor) -> Tensor:
        _, state = self.rnn(self.sequence(fmap))
        final = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n); GRU: h_n
        # [directions, N, hidden] -> [N, directions * hidden]; the backward direction
        # ends at the first row
        return torch.cat(list(final), dim=1)


class _SkipDecoder(nn.Module):
    """A U-Net-style decoder (Ronneberger et al. 2015), kept small: from the coarsest
    map, each stage upsamples 2x (bilinear), concatenates the VGG block end of that
    resolution and mixes them with two 3x3 convs (half the skip's channels), as U-Net
    does; a 1x1 conv gives one lesion logit per pixel. Bilinear upsampling has no
    weights and no checkerboard artefacts."""

    def __init__(self, c_in: int, skip_channels: list[int], batch_norm: bool) -> None:
        super().__init__()
        stages = []
        for c_skip in reversed(skip_channels):
            c_out = max(8, c_skip // 2)
            stages.append(
                nn.Sequential(*_conv_block(c_in + c_skip, c_out, batch_norm), *_conv_block(c_out, c_out, batch_norm))
            )
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(c_in, 1, 1)

    def forward(self, fmap: Tensor, skips: tuple[Tensor, ...]) -> Tensor:
        x = fmap
        for stage, skip in zip(self.stages, reversed(skips), strict=True):
            up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = stage(torch.cat([up, skip], dim=1))
        return self.out(x)[:, 0]


class HybridVGGRNN(SonoModel):
    """The product model: VGG16-D convolutions (width multiplier, optional batch-norm),
    an LSTM/GRU reading the pooled last map row by row, a penultimate embedding layer
    and a 3-class head. Grad-CAM explains the map of ``config.cam_layer`` (conv5_3,
    before the last pool, or a finer one): ``features`` stops there and ``embed``
    runs the remaining convolutions, so the weights are the same whichever is chosen.

    With ``config.segmentation`` a :class:`_SkipDecoder` reads that map and the block
    ends above it from conv2_2 (H/2) on; conv1_2's full-resolution map is left out:
    an H/2 mask, bilinearly resized to the crop, outlines a lesion as well at a
    quarter of the decoder's cost."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        block_ends: list[int] = []  # channels of each block end above the Grad-CAM layer
        cam_end, cam_channels = 0, 0
        c_in, block, conv = 1, 1, 0
        for item in VGG16_D[:-1]:  # the final pool belongs to embed(): Grad-CAM wants the finer map
            if item == "M":
                if not cam_end:
                    block_ends.append(c_in)
                layers.append(nn.MaxPool2d(2))
                block, conv = block + 1, 0
            else:
                c_out = scaled(int(item), config.width)
                layers += _conv_block(c_in, c_out, config.batch_norm)
                c_in, conv = c_out, conv + 1
                if f"conv{block}_{conv}" == config.cam_layer:
                    cam_end, cam_channels = len(layers), c_out  # after the layer's ReLU
        self.conv = nn.Sequential(*layers)
        self._cam_end = cam_end
        self.pool = nn.MaxPool2d(2)
        self.rows = RowRNN(c_in * (config.size // 32), config)
        self.embedding = nn.Sequential(nn.Linear(self.rows.out_features, config.embedding_dim), nn.ReLU())
        self.head = _classifier(config.embedding_dim, config.num_classes, config.dropout)
        self.decoder = _SkipDecoder(cam_channels, block_ends[1:], config.batch_norm) if config.segmentation else None
        _init_weights(self.modules())

    def features(self, x: Tensor) -> Tensor:
        return self.conv[: self._cam_end](x)

    def encode(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        skips = []
        for layer in self.conv[: self._cam_end]:
            if isinstance(layer, nn.MaxPool2d):
                skips.append(x)
            x = layer(x)
        return x, tuple(skips[1:])

    def segment(self, fmap: Tensor, skips: tuple[Tensor, ...]) -> Tensor:
        if self.decoder is None:
            return super().segment(fmap, skips)
        return self.decoder(fmap, skips)

    def _tail(self) -> list[nn.Module]:
        """The layers between the Grad-CAM map and the row reader: the rest of the VGG
        blocks (each block starts with its pool) and the final pool."""
        return [*self.conv[self._cam_end :], self.pool]

    @property
    def cam_pool(self) -> nn.MaxPool2d:
        pool = self._tail()[0]
        assert isinstance(pool, nn.MaxPool2d)
        return pool

    def embed_pooled(self, pooled: Tensor) -> Tensor:
        x = pooled
        for layer in self._tail()[1:]:
            x = layer(x)
        return self.embedding(self.rows(x))

    def embed(self, fmap: Tensor) -> Tensor:
        return self.embed_pooled(self.cam_pool(fmap))

    @property
    def target_layer(self) -> nn.Module:
        return self.conv[self._cam_end - 1]


class SimpleCNN(SonoModel):
    """The paper's baseline CNN: four 3x3 conv layers with growing filters (32..256 at
    width 1), ReLU and 2x2 max-pooling each, then dense + dropout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 1
        for i, channels in enumerate((32, 64, 128, 256)):
            if i:
                layers.append(nn.MaxPool2d(2))
            c_out = scaled(channels, config.width)
            layers += _conv_block(c_in, c_out, config.batch_norm)
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        side = config.size // 16
        self.embedding = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c_in * side * side, config.embedding_dim),
            nn.ReLU(),
        )
        self.head = _classifier(config.embedding_dim, config.num_classes, config.dropout)
        _init_weights(self.modules())


class PixelRowRNN(SonoModel):
    """The paper's RNN: an LSTM over the image's pixel rows. The LSTM's input
    projection is split out as a (1 x W) convolution so the rows have a "feature map"
    [N, D, H, 1] that Grad-CAM can explain (one weight per row); the function class is
    that of a plain LSTM over rows with a rank-D input projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        row_dim = scaled(128, config.width)
        self.project = nn.Sequential(nn.Conv2d(1, row_dim, (1, config.size)), nn.ReLU())
        self.rows = RowRNN(row_dim, config)
        self.embedding = nn.Sequential(nn.Linear(self.rows.out_features, config.embedding_dim), nn.ReLU())
        self.head = _classifier(config.embedding_dim, config.num_classes, config.dropout)
        _init_weights(self.modules())

    @property
    def target_layer(self) -> nn.Module:
        return self.project[-1]

    def features(self, x: Tensor) -> Tensor:
        return self.project(x)

    def embed(self, fmap: Tensor) -> Tensor:
        return self.embedding(self.rows(fmap))


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(SonoModel):
    """MobileNetV2 (inverted residuals, linear bottlenecks) with a width multiplier;
    the last 1x1 conv keeps 1280 channels for widths below 1, as in the paper. An
    embedding layer after global pooling gives the retrieval features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c_in = scaled(32, config.width)
        layers: list[nn.Module] = [nn.Conv2d(1, c_in, 3, 2, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6()]
        for expansion, channels, repeats, stride in MOBILENETV2_STAGES:
            c_out = scaled(channels, config.width)
            for i in range(repeats):
                layers.append(_InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        last = scaled(1280, max(1.0, config.width))
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.conv = nn.Sequential(*layers)
        self.embedding = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(last, config.embedding_dim),
            nn.ReLU(),
        )
        self.head = _classifier(config.embedding_dim, config.num_classes, config.dropout)
        _init_weights(self.modules())


_BUILDERS: dict[str, type[SonoModel]] = {
    "hybrid": HybridVGGRNN,
    "cnn": SimpleCNN,
    "rnn": PixelRowRNN,
    "mobilenetv2": MobileNetV2,
}


def build_model(config: ModelConfig) -> SonoModel:
    return _BUILDERS[config.arch](config)


def load_initial_weights(model: SonoModel, path: Path) -> list[str]:
    """Load user-supplied initial weights (a state dict saved with ``torch.save``);
    nothing is ever downloaded. Two layouts are understood:

    * our own (a previous Sonocase model of the same architecture): matching keys
      with matching shapes are loaded;
    * torchvision's VGG16 (``features.<i>.weight``, e.g. ImageNet weights the user
      downloaded) for ``hybrid``: the 13 conv layers are copied in order, the first
      one's RGB filters summed to one grayscale channel (our input is grayscale);
      with batch-norm on, the conv biases are dropped (batch-norm's shift replaces them).

    Returns the names of our parameters that were loaded; a file that matches
    nothing is an error, not a silent no-op.
    """
    if not path.is_file():
        raise FileNotFoundError(f"initial weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if isinstance(model, HybridVGGRNN) and any(k.startswith("features.") for k in state):
        return _load_torchvision_vgg(model, state, path)
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise ValueError(f"{path}: no tensor matches this {model.config.arch} model (names or shapes differ)")
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def _load_torchvision_vgg(model: HybridVGGRNN, state: dict[str, Tensor], path: Path) -> list[str]:
    theirs = sorted(
        (k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].dim() == 4),
        key=lambda k: int(k.split(".")[1]),
    )
    ours = [m for m in model.conv if isinstance(m, nn.Conv2d)]
    if len(theirs) != len(ours):
        raise ValueError(f"{path}: expected {len(ours)} VGG16 conv layers, found {len(theirs)}")
    loaded: list[str] = []
    names = {m: name for name, m in model.conv.named_children()}
    with torch.no_grad():
        for key, conv in zip(theirs, ours, strict=True):
            weight = state[key]
            if conv.in_channels == 1 and weight.shape[1] == 3:
                weight = weight.sum(dim=1, keepdim=True)
            if weight.shape != conv.weight.shape:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(weight.shape)}, this model needs {tuple(conv.weight.shape)} "
                    f"(torchvision VGG16 weights need --width 1.0)"
                )
            conv.weight.copy_(weight)
            loaded.append(f"conv.{names[conv]}.weight")
            bias_key = key[: -len("weight")] + "bias"
            if conv.bias is not None and bias_key in state:
                conv.bias.copy_(state[bias_key])
                loaded.append(f"conv.{names[conv]}.bias")
    return loaded
