"""Baseline image classifier: a small ResNet with a linear head, trained with cross-entropy.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", arXiv 1512.03385.
Training techniques (Gradient Centralization, ...) are options of the optimiser and the loop,
so every technique is compared on this same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import Method, register_method
from components.models.resnet import SmallResNet


@dataclass
class ClassifierConfig:
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    norm: Literal["batch", "group"] = "batch"
    dropout: float = 0.0
    label_smoothing: float = 0.0

    def validate(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty lists of equal length")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")


class ClassifierNet(nn.Module):
    def __init__(self, backbone: SmallResNet, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


@register_method
class Classifier(Method):
    name = "classifier"
    task = "classification"
    paper = "1512.03385"
    Config = ClassifierConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        backbone = SmallResNet(info.in_channels, tuple(self.cfg.widths), tuple(self.cfg.blocks), self.cfg.norm)
        return ClassifierNet(backbone, info.num_classes, self.cfg.dropout)

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        logits = model(images)
        return {"ce": nn.functional.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)}

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0])

    def search_space(self) -> dict:
        return {"dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}
