"""What every semantic segmentation method shares: input normalisation inside the model, the
pixel-wise losses (cross-entropy, Dice) and the train/predict calls.

A semantic segmentation model takes images B x C x H x W in [0, 1] and returns logits
B x K x H x W at the input's resolution, K being the background plus the dataset's classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import Method
from components.tasks.segmentation import IGNORE_INDEX


def soft_dice_loss(
    probs: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0
) -> torch.Tensor:
    """Multi-class soft Dice loss: ``1 - mean_c (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)``.

    ``probs`` B x K x H x W class probabilities, ``target`` B x H x W class indices. The soft
    Dice coefficient is 2TP / (2TP + FP + FN) with probabilities in place of counts (the F1
    score of the class); ``smooth`` keeps classes absent from both prediction and truth at a
    coefficient of 1. Pixels labelled ``ignore_index`` count nowhere.
    """
    k = probs.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target), k).permute(0, 3, 1, 2).to(probs.dtype)
    probs, onehot = probs * valid, onehot * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    coefficient = (2 * intersection + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return 1 - coefficient.mean()


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so a logged model takes images in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class SemanticConfig:
    """Keys every semantic segmentation method has; a method's config extends it."""

    loss: Literal["ce", "dice", "ce+dice"] = "ce"
    dice_weight: float = 1.0  # weight of the Dice term in "ce+dice"
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])

    def validate(self) -> None:
        if self.dice_weight < 0:
            raise ValueError("dice_weight must be >= 0")
        if len(self.image_mean) != len(self.image_std) or any(s <= 0 for s in self.image_std):
            raise ValueError("image_mean and image_std need one value per channel, std > 0")


class SemanticSegmenter(Method):
    """A method whose model maps images to per-pixel logits (see the module docstring)."""

    task = "semantic_segmentation"

    def normalize(self, in_channels: int) -> Normalize:
        if len(self.cfg.image_mean) != in_channels:
            raise ValueError(f"image_mean/image_std need {in_channels} values (the data's channels)")
        return Normalize(self.cfg.image_mean, self.cfg.image_std)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits.float()
        losses: dict[str, torch.Tensor] = {}
        if self.cfg.loss in ("ce", "ce+dice"):
            losses["ce"] = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        if self.cfg.loss in ("dice", "ce+dice"):
            weight = self.cfg.dice_weight if self.cfg.loss == "ce+dice" else 1.0
            losses["dice"] = weight * soft_dice_loss(logits.softmax(dim=1), target)
        return losses

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, target = batch
        return self.loss(model(images), target)

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0]).argmax(dim=1)

    def example_input(self, info: DatasetInfo) -> torch.Tensor:
        """A 64 x 64 image: the models take any size, and ``info.image_size`` is the crops'."""
        return torch.rand(1, info.in_channels, 64, 64)
