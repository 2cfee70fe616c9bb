"""U-Net: an encoder-decoder with skip connections for per-pixel classification.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
arXiv 1505.04597.

- Contracting path: per level two 3x3 convolutions with ReLU, then 2x2 max pooling (stride 2);
  the number of channels doubles at each downsampling (paper: 64 ... 1024 over four poolings).
- Expanding path: per level a 2x2 up-convolution that halves the channels, concatenation with
  the contracting path's feature map of the same resolution (the skip connection), and two 3x3
  convolutions with ReLU; a final 1x1 convolution maps to the classes.
- Loss: pixel-wise softmax cross-entropy. ``loss: dice`` (or ``ce+dice``) uses the soft Dice
  loss instead (Milletari et al., arXiv 1606.04797), which optimises per-class overlap directly.

Differences from the paper, on purpose: the convolutions are padded, so the output has the
input's resolution and no overlap-tile strategy is needed (inputs whose sides are not a
multiple of ``2**depth`` are padded and the logits cropped back); ``norm: batch`` adds
BatchNorm after each convolution (the paper has none; ``norm: none`` is the paper's); the
paper's border weight map for touching cells is not used (digits rarely touch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.segmentation_base import SemanticConfig, SemanticSegmenter


@dataclass
class UNetConfig(SemanticConfig):
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024])  # per level; depth = len - 1
    norm: Literal["none", "batch"] = "batch"

    def validate(self) -> None:
        super().validate()
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ValueError("widths needs at least two positive entries (one per level, the bottom included)")


def double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNetModel(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: list[int], norm: str, normalize: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(double_conv(cin, w, norm))
            cin = w
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconv.append(nn.ConvTranspose2d(cin, w, 2, stride=2))  # halves the channels
            self.up.append(double_conv(2 * w, w, norm))  # after concatenating the skip
            cin = w
        self.head = nn.Conv2d(cin, num_classes, 1)
        self.depth = len(widths) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        multiple = 2**self.depth
        x = F.pad(self.normalize(x), (0, -w % multiple, 0, -h % multiple))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips), strict=True):
            x = block(torch.cat([skip, upconv(x)], dim=1))
        return self.head(x)[..., :h, :w]


@register_method
class UNet(SemanticSegmenter):
    name = "unet"
    paper = "1505.04597"
    Config = UNetConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        cfg = self.cfg
        return UNetModel(info.in_channels, info.num_classes + 1, cfg.widths, cfg.norm, self.normalize(info.in_channels))
