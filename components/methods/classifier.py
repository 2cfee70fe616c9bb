"""Baseline image classifier: a small ResNet with a linear head, trained with cross-entropy.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", arXiv 1512.03385.
Training techniques (Gradient Centralization, ...) are options of the optimiser and the loop,
so every technique is compared on this same model.

With ``backbone`` set, the network is a detection trunk (``components.models.fpn``) with the same
pooled linear head: classification pretraining of a detector's backbone, the stand-in here for
the ImageNet initialisation the detection papers start from (see ``pretrain`` in params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import Method, register_method
from components.models.fpn import BackboneConfig, build_trunk
from components.models.resnet import SmallResNet


@dataclass
class ClassifierConfig:
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    norm: Literal["batch", "group"] = "batch"
    dropout: float = 0.0
    label_smoothing: float = 0.0
    # A detection trunk instead of the CIFAR-style ResNet above (widths/blocks/norm then unused).
    backbone: BackboneConfig | None = None
    # Images resized (bilinear) to this side before the network; null: as they come. A trunk
    # pretrained for a detector sees digits at the scale its detector's input gives them.
    input_size: int | None = None

    def validate(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty lists of equal length")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.input_size is not None and self.input_size < 8:
            raise ValueError("input_size must be >= 8 (or null)")
        if self.input_size is not None and self.backbone is None:
            raise ValueError("input_size applies to a classifier with `backbone` set")


class ClassifierNet(nn.Module):
    def __init__(self, backbone: SmallResNet, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


class TrunkClassifierNet(nn.Module):
    """A detection trunk (``body``), global average pooling and a linear head."""

    def __init__(
        self, body: nn.Module, channels: int, num_classes: int, dropout: float, input_size: int | None = None
    ) -> None:
        super().__init__()
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)
        return self.head(self.dropout(pooled))


@register_method
class Classifier(Method):
    name = "classifier"
    task = "classification"
    paper = "1512.03385"
    Config = ClassifierConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        if self.cfg.backbone is not None:
            body, channels = build_trunk(self.cfg.backbone, info.in_channels)
            return TrunkClassifierNet(body, channels[-1], info.num_classes, self.cfg.dropout, self.cfg.input_size)
        backbone = SmallResNet(info.in_channels, tuple(self.cfg.widths), tuple(self.cfg.blocks), self.cfg.norm)
        return ClassifierNet(backbone, info.num_classes, self.cfg.dropout)

    def trunk(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, TrunkClassifierNet):
            raise NotImplementedError("only a classifier with `backbone` set has a pretrainable trunk")
        return model.body

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        logits = model(images)
        return {"ce": nn.functional.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)}

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0])

    def search_space(self) -> dict:
        return {"dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}
