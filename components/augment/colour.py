"""Colour distortion applied to a batch of views inside a method's training step (SimCLR, MoCo,
NPID): what the family's per-image transforms (crop, rotation, mild jitter) do not cover."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ColourConfig:
    """Colour distortion the method adds to the family's views (crop, rotation, mild jitter).

    The paper finds colour distortion essential: without it two crops of one image are matched
    by their colour histogram alone. The digits here have random foreground and background
    colours, so a feature that matches views by colour learns nothing about the digit. Each is
    the probability, per view, of: a random permutation of the RGB channels (a large hue
    change), grayscale (the paper's p=0.2) and inversion (light digits on dark and the reverse
    both occur)."""

    channel_shuffle: float = 0.5
    grayscale: float = 0.2
    invert: float = 0.2

    def validate(self) -> None:
        for name in ("channel_shuffle", "grayscale", "invert"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"colour.{name} is a probability, in [0, 1]")


def colour_distort(images: torch.Tensor, cfg: ColourConfig) -> torch.Tensor:
    """``images`` (N, 3, H, W) in [0, 1], each independently colour-distorted per ``cfg``."""
    if images.shape[1] != 3:
        return images
    n, device = images.shape[0], images.device

    def chosen(p: float) -> torch.Tensor:
        return torch.rand(n, 1, 1, 1, device=device) < p

    if cfg.channel_shuffle > 0:
        perm = torch.rand(n, 3, device=device).argsort(dim=1)  # a uniform random permutation per image
        images = torch.where(
            chosen(cfg.channel_shuffle), images.gather(1, perm[:, :, None, None].expand_as(images)), images
        )
    if cfg.grayscale > 0:
        luma = torch.tensor([0.299, 0.587, 0.114], device=device, dtype=images.dtype).view(1, 3, 1, 1)
        images = torch.where(chosen(cfg.grayscale), (images * luma).sum(1, keepdim=True).expand_as(images), images)
    if cfg.invert > 0:
        images = torch.where(chosen(cfg.invert), 1 - images, images)
    return images
