"""What every detection method shares: the input transform, the config keys for it, and the
train/predict calls of the torchvision detector convention.

A detection model takes a list of images (CxHxW, [0, 1]); in train mode, with the targets, it
returns a dict of named losses, in eval mode one dict per image with ``boxes`` (XYXY pixels of
the input image), ``scores`` and ``labels`` (category indices, no background class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from components.data.canonical import DatasetInfo
from components.methods.base import Method
from components.models.fpn import BackboneConfig


@dataclass
class DetectorInput:
    """How images enter a detector: resized so the short side is ``min_size`` (the long side at
    most ``max_size``), then normalised. 64-px canvases default to 128 (COCO: 800 / 1333)."""

    min_size: int = 128
    max_size: int = 128
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])

    def validate(self) -> None:
        if self.min_size < 16 or self.max_size < self.min_size:
            raise ValueError("need 16 <= min_size <= max_size")

    def torchvision_kwargs(self) -> dict[str, Any]:
        """The same settings as keyword arguments of torchvision's detector constructors."""
        return {
            "min_size": self.min_size,
            "max_size": self.max_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def transform(self, in_channels: int) -> GeneralizedRCNNTransform:
        mean, std = list(self.image_mean), list(self.image_std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"image_mean/image_std need {in_channels} values (the data's channels)")
        return GeneralizedRCNNTransform(self.min_size, self.max_size, mean, std)


@dataclass
class DetectorConfig:
    """Keys every detector has; a method's config extends it."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    input: DetectorInput = field(default_factory=DetectorInput)
    score_thresh: float = 0.05  # detections below this score are dropped at inference
    detections_per_image: int = 100
    backbone_lr_ratio: float = 1.0  # the trunk's learning rate relative to the rest

    def validate(self) -> None:
        if not 0.0 <= self.score_thresh < 1.0:
            raise ValueError("score_thresh must be in [0, 1)")
        if self.backbone_lr_ratio <= 0:
            raise ValueError("backbone_lr_ratio must be > 0")
        if self.detections_per_image < 1:
            raise ValueError("detections_per_image must be >= 1")


def check_levels(values: list[Any], cfg: DetectorConfig, what: str) -> None:
    strides = cfg.backbone.strides()
    if len(values) != len(strides):
        raise ValueError(
            f"{what} needs one entry per pyramid level: {len(strides)} levels (strides {strides}), got {len(values)}"
        )


class Detector(Method):
    """A method whose model follows the torchvision detector convention (see module docstring)."""

    task = "detection"
    label_offset = 0  # 1 for models with a softmax background class at index 0

    def _targets(self, targets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        return [
            {"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"] + self.label_offset}
            for t in targets
        ]

    def trunk(self, model: nn.Module) -> nn.Module:
        return model.backbone.body

    def param_groups(self, model: nn.Module) -> list[tuple[list[nn.Parameter], float]]:
        trunk = {id(p) for p in self.trunk(model).parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        return [
            ([p for p in params if id(p) not in trunk], 1.0),
            ([p for p in params if id(p) in trunk], self.cfg.backbone_lr_ratio),
        ]

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [img.as_subclass(torch.Tensor) for img in images]
        return model(images, self._targets(targets))

    def predict(self, model: nn.Module, batch) -> list[dict[str, torch.Tensor]]:
        images = [img.as_subclass(torch.Tensor) for img in batch[0]]
        out = model(images)
        if self.label_offset:
            out = [{**d, "labels": d["labels"] - self.label_offset} for d in out]
        return out

    def example_input(self, info: DatasetInfo) -> torch.Tensor:
        """A batch of one image at the model's input size (the model resizes any size)."""
        size = self.cfg.input.min_size
        return torch.rand(1, info.in_channels, size, size)


class InstanceSegmenter(Detector):
    """A detector that also predicts a mask per detection: targets carry ``masks`` (N x H x W),
    predictions add ``masks`` (N x H x W probabilities at the input image's size)."""

    task = "instance_segmentation"

    def _targets(self, targets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        out = super()._targets(targets)
        for o, t in zip(out, targets, strict=True):
            o["masks"] = t["masks"].as_subclass(torch.Tensor)
        return out
