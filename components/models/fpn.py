"""Multi-scale backbones for dense prediction: a ResNet (small, or torchvision's full-size ones)
with a Feature Pyramid Network on top (Lin et al., "Feature Pyramid Networks for Object
Detection", arXiv 1612.03144).

``build_fpn_backbone`` returns a module mapping an image batch to an ordered dict of pyramid
levels, each with ``out_channels`` channels, which is what torchvision's detectors consume.
``build_plain_backbone`` returns the last feature map only (DETR's C5).

The small ResNet has a stride-2 3x3 stem and one stride-2 stage per entry of ``widths``, so
stage ``i`` has stride ``2 ** (i + 2)``; the pyramid uses the last ``levels`` stages. Full-size
ResNets (``resnet18/34/50/101``) come randomly initialised from torchvision (no weights are
downloaded). A trunk can start from one trained by a ``pretrain`` entry
(``components.models.pretrained``), usually with ``norm: frozen``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from components.models.resnet import BasicBlock, _norm

@dataclass
class BackboneConfig:
    name: Literal["small", "resnet18", "resnet34", "resnet50", "resnet101"] = "small"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # small only
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # small only
    # frozen: BatchNorm whose statistics and affine stay those of the pretrained trunk (DETR, and
    # torchvision's detection references); it loads weights trained with batch.
    norm: Literal["batch", "group", "frozen"] = "batch"
    levels: int = 3  # pyramid levels taken from the last stages (C3-C5 for a 4-stage net)
    fpn_channels: int = 64
    extra: Literal["none", "pool", "p6p7"] = "none"  # extra coarse levels: max-pool P6 or P6-P7 convs
    # A `pretrain` entry of params.yaml whose trained trunk initialises this one (null: random init).
    pretrained: str | None = None

    def validate(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty lists of equal length")
        if not 1 <= self.levels <= self.num_stages:
            raise ValueError(f"levels must be between 1 and the number of stages ({self.num_stages})")
        if self.fpn_channels < 1:
            raise ValueError("fpn_channels must be >= 1")

    @property
    def num_stages(self) -> int:
        return len(self.widths) if self.name == "small" else 4

    def architecture(self) -> dict[str, object]:
        """The fields that decide the trunk's parameters: two configs with equal architecture
        can exchange trunk weights."""
        norm = "batch" if self.norm == "frozen" else self.norm  # the same parameters and buffers
        if self.name != "small":
            return {"name": self.name, "norm": norm}
        return {"name": self.name, "widths": list(self.widths), "blocks": list(self.blocks), "norm": norm}

    def strides(self) -> list[int]:
        """Stride of every pyramid level, finest first (extra levels included)."""
        stages = self.num_stages
        out = [2 ** (i + 2) for i in range(stages - self.levels, stages)]
        extra = {"none": 0, "pool": 1, "p6p7": 2}[self.extra]
        return out + [out[-1] * 2 ** (k + 1) for k in range(extra)]


class SmallStridedResNet(nn.Module):
    """Stem (3x3, stride 2) then ``layer1..layerN``, each halving the resolution."""

    def __init__(self, in_channels: int, widths: list[int], blocks: list[int], norm: str) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False), _norm(norm, widths[0]), nn.ReLU(inplace=True)
        )
        in_ch = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = [BasicBlock(in_ch if j == 0 else width, width, 2 if j == 0 else 1, norm) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            in_ch = width
        self.widths = list(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def build_trunk(cfg: BackboneConfig, in_channels: int) -> tuple[nn.Module, list[int]]:
    """The ResNet trunk (children named ``layer1..``) and the channel count of each stage."""
    if cfg.name == "small":
        return SmallStridedResNet(in_channels, cfg.widths, cfg.blocks, cfg.norm), list(cfg.widths)
    import torchvision

    net = getattr(torchvision.models, cfg.name)(weights=None, norm_layer=partial(_norm, cfg.norm))
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    expansion = 4 if cfg.name in ("resnet50", "resnet101") else 1
    body = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
        )
    )
    return body, [64 * expansion * 2**i for i in range(4)]


class BackboneWithPyramid(nn.Module):
    """Trunk stages -> FPN levels (``"0"``, ``"1"``, ... finest first, then any extra ones)."""

    def __init__(self, body: nn.Module, return_layers: dict[str, str], in_channels: list[int], cfg: BackboneConfig):
        super().__init__()
        extra = {
            "none": None,
            "pool": LastLevelMaxPool(),
            # RetinaNet/FCOS: P6 = conv(P5) (equal widths), then P7 = conv(relu(P6)).
            "p6p7": LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels),
        }[cfg.extra]
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(in_channels, cfg.fpn_channels, extra_blocks=extra)
        self.out_channels = cfg.fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_fpn_backbone(cfg: BackboneConfig, in_channels: int = 3) -> BackboneWithPyramid:
    body, channels = build_trunk(cfg, in_channels)
    stages = len(channels)
    picked = list(range(stages - cfg.levels, stages))
    return BackboneWithPyramid(
        body, {f"layer{i + 1}": str(k) for k, i in enumerate(picked)}, [channels[i] for i in picked], cfg
    )


class PlainBackbone(nn.Module):
    """The trunk's last feature map, with its channel count as ``out_channels``."""

    def __init__(self, cfg: BackboneConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.body, channels = build_trunk(cfg, in_channels)
        self.out_channels = channels[-1]
        self.stride = 2 ** (len(channels) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_plain_backbone(cfg: BackboneConfig, in_channels: int = 3) -> PlainBackbone:
    return PlainBackbone(cfg, in_channels)
