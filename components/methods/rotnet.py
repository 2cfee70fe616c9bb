"""RotNet: self-supervision by predicting which of four rotations was applied to an image.

Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", arXiv 1803.07728.

Faithful to the paper:
- the pretext task is a 4-way classification of the rotation, 0, 90, 180 or 270 degrees, by
  cross-entropy;
- every image of the batch appears in all four rotations in the same batch (the paper found this
  better than one random rotation per image): a batch of B images trains on 4B;
- rotations by multiples of 90 degrees are exact (transposes and flips, no interpolation
  artefacts a network could use to tell them apart).

The classifier sits on the encoder's pooled features (``head_hidden`` 0: linear, else one hidden
layer); the scored features are the encoder's pooled features. The paper finds the best features
in the middle of its networks; here the encoder is the family's shared one, so the comparison
with the other methods is on the same features. The family's views are slightly rotated crops
(up to 10 degrees), which leaves the four classes distinct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.embedding_base import EmbeddingMethod, EncoderConfig, build_encoder


@dataclass
class RotNetConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head_hidden: int = 0  # 0: a linear classifier on the pooled features
    both_views: bool = False  # also train on the second view (twice the images per step)

    def validate(self) -> None:
        self.encoder.validate()
        if self.head_hidden < 0:
            raise ValueError("head_hidden must be >= 0 (0: linear classifier)")


def rotate_all(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four rotations of each image (N, C, H, W): (4N, C, H, W), rotation k of all images
    in block k, and the labels k (counter-clockwise quarter turns)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError("rotnet needs square images (a quarter turn must keep the shape)")
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
    return rotated, labels


class RotNetNet(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.out_dim
        self.classifier = (
            nn.Linear(d, 4)
            if hidden == 0
            else nn.Sequential(
                nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4)
            )
        )

    def forward(self, images: torch.Tensor, classify: bool = False) -> torch.Tensor:
        """Encoder features; with ``classify``, the rotation logits (N, 4)."""
        features = self.encoder(images)
        return self.classifier(features) if classify else features


@register_method
class RotNet(EmbeddingMethod):
    name = "rotnet"
    task = "representation"
    paper = "1803.07728"
    Config = RotNetConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        return RotNetNet(build_encoder(self.cfg.encoder, info.in_channels), self.cfg.head_hidden)

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images = torch.cat([batch[0], batch[1]]) if self.cfg.both_views else batch[0]
        rotated, labels = rotate_all(images)
        return {"rotation_ce": F.cross_entropy(model(rotated, classify=True), labels)}
