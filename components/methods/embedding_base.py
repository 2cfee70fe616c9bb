"""What the representation and metric-learning methods share.

Every such method trains an encoder (the small ResNet of ``components.models.resnet``, the same
for all of them, so their rows compare the learning signal and not the architecture) plus its own
heads. Its model follows one convention:

- ``model.encoder`` is the ``SmallResNet``;
- ``model(images)`` with images alone returns the features the family scores (for a logged
  model: the embedding of each image); training paths take more arguments (a second view,
  instance indices...), so that they run through DDP's wrapper;
- ``predict`` returns ``model(images)`` for the family's evaluator, which normalises.

Distributed helpers: losses whose negatives or normaliser span the global batch gather with
:func:`gather_with_grad`, whose backward sends each worker the gradient of its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import Method
from components.models.resnet import SmallResNet


@dataclass
class EncoderConfig:
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    norm: Literal["batch", "group"] = "batch"

    def validate(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty lists of equal length")


def build_encoder(cfg: EncoderConfig, in_channels: int) -> SmallResNet:
    return SmallResNet(in_channels, tuple(cfg.widths), tuple(cfg.blocks), cfg.norm)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every worker's ``x`` concatenated in rank order (dim 0), differentiable w.r.t. this worker's
    rows: the backward pass sums each row's gradient over all workers' losses."""
    if not distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every worker's ``x`` concatenated in rank order (dim 0), without gradient."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class EmbeddingMethod(Method):
    """Base of the representation and retrieval methods: shared encoder, predict, trunk."""

    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0])

    def trunk(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def example_input(self, info: DatasetInfo) -> torch.Tensor:
        h, w = info.image_size
        return torch.zeros(1, info.in_channels, h, w)
