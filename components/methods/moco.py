"""MoCo v2: momentum contrast with a queue of negatives, an MLP head and InfoNCE.

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
Learning", arXiv 1911.05722; Chen, Fan, Girshick, He, "Improved Baselines with Momentum
Contrastive Learning", arXiv 2003.04297 (v2: the MLP head, temperature 0.2, stronger
augmentation).

Faithful to the papers:
- a query encoder (trained) and a key encoder updated only as an exponential moving average of
  it, ``theta_k <- m * theta_k + (1 - m) * theta_q``, done inside the module's forward (training
  runs through DDP's wrapper, so the loop never sees the inner module);
- a FIFO queue of the last ``queue_size`` keys as negatives (a persistent buffer with its
  pointer, so a checkpoint carries both; lightly's are not persistent), enqueued with the keys of
  ALL workers in rank order, so every worker's queue is identical;
- InfoNCE: ``-log(exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_queue exp(q.k- / tau)))`` over
  L2-normalised projections; the queue is read before this batch's keys enter it;
- shuffle BN: the key inputs of every worker are gathered, permuted with one permutation drawn
  on rank 0 and broadcast, each worker encodes its slice, the keys are gathered and unshuffled,
  so a query and its positive key never share batch statistics.

Adapted: ``key_bn_splits`` cuts the shuffled global key batch into that many BN groups (each
worker encodes ``key_bn_splits / world`` of them one after the other). With one group per worker
it is the paper's shuffle BN; fixing the number of groups makes the keys independent of the
worker count and keeps shuffle BN meaningful on a single process (as the authors' one-GPU CIFAR
demo does with its split BatchNorm). The query encoder keeps ordinary per-worker BN, as in the
paper; that is the one place where 1 and 2 workers differ.

Defaults for a short run: momentum 0.99 instead of 0.999, since a 0.999 average has a time
constant of 1000 steps, longer than the ~270 steps of a 7-epoch run at batch 64 here, so the keys
would come from a nearly untrained encoder (0.9 and 0.95 measured no better); a queue of 1024
keys (65536 in the paper, more than the 2518 train images here). The views get the colour
distortion of ``simclr.ColourConfig`` as v2's stronger augmentation. Measured on the digits
crops, MoCo learns the slowest of the four here: its loss stays near chance for several epochs
(the queue's negatives carry no gradient, so nothing but the lagging keys spreads the features).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from components.augment.colour import ColourConfig, colour_distort
from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.embedding_base import (
    EmbeddingMethod,
    EncoderConfig,
    build_encoder,
    distributed,
    gather_no_grad,
    rank,
    world_size,
)


@dataclass
class MoCoConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projection_hidden: int = 128  # v2's MLP head: Linear, ReLU, Linear
    projection_dim: int = 64
    queue_size: int = 1024  # paper 65536 on ImageNet; here well under the 2518 train images
    momentum: float = 0.99  # paper 0.999; see the module docstring
    temperature: float = 0.2  # v2
    key_bn_splits: int = 2  # BN groups of the shuffled key batch; a multiple of the worker count
    colour: ColourConfig = field(default_factory=ColourConfig)

    def validate(self) -> None:
        self.encoder.validate()
        self.colour.validate()
        if self.projection_hidden < 1 or self.projection_dim < 1 or self.queue_size < 1:
            raise ValueError("projection_hidden, projection_dim and queue_size must be positive")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.key_bn_splits < 1:
            raise ValueError("key_bn_splits must be at least 1")


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class MoCoNet(nn.Module):
    """Query encoder + head (trained), key encoder + head (EMA), and the queue of keys."""

    def __init__(self, cfg: MoCoConfig, in_channels: int) -> None:
        super().__init__()
        self.encoder = build_encoder(cfg.encoder, in_channels)
        self.projector = projection_head(self.encoder.out_dim, cfg.projection_hidden, cfg.projection_dim)
        # The key side starts as a copy of the query side and never receives gradients.
        self.key_encoder = build_encoder(cfg.encoder, in_channels)
        self.key_projector = projection_head(self.encoder.out_dim, cfg.projection_hidden, cfg.projection_dim)
        self.key_encoder.load_state_dict(self.encoder.state_dict())
        self.key_projector.load_state_dict(self.projector.state_dict())
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.momentum, self.temperature, self.key_bn_splits = cfg.momentum, cfg.temperature, cfg.key_bn_splits
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_encoder.parameters(), *self.key_projector.parameters()]

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``k <- m * k + (1 - m) * q`` for every key parameter (buffers: the key encoder's own)."""
        m = self.momentum
        for k, q in zip(self.key_parameters(), self.query_parameters(), strict=True):
            k.copy_(m * k + (1 - m) * q.detach())

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` over the oldest entries, wrapping around the end of the queue."""
        size = self.queue.shape[0]
        keys = keys[-size:]  # more keys than slots: only the newest survive anyway
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    @torch.no_grad()
    def encode_keys(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys of this worker's ``images`` with shuffle BN (module docstring)."""
        world, splits = world_size(), self.key_bn_splits
        if splits % world:
            raise ValueError(f"moco: key_bn_splits ({splits}) must be a multiple of the worker count ({world})")
        everything = gather_no_grad(images)
        order = torch.randperm(len(everything), device=images.device)
        if distributed():
            dist.broadcast(order, src=0)  # one permutation on every worker
        mine = everything[order].chunk(world)[rank()]
        keys = torch.cat([self.key_projector(self.key_encoder(part)) for part in mine.chunk(splits // world)])
        keys = gather_no_grad(F.normalize(keys.float(), dim=1))
        unshuffled = torch.empty_like(keys)
        unshuffled[order] = keys
        return unshuffled

    def forward(self, images: torch.Tensor, key_images: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features of ``images``; with ``key_images``, the InfoNCE logits (N, 1 + K)
        whose column 0 is the positive (and the momentum update and enqueue as side effects)."""
        if key_images is None:
            return self.encoder(images)
        q = F.normalize(self.projector(self.encoder(images)).float(), dim=1)
        self.momentum_update()
        all_keys = self.encode_keys(key_images)
        n, start = len(images), rank() * len(images)
        k = all_keys[start : start + n]
        with torch.autocast(q.device.type, enabled=False):  # similarities / tau need float32
            positive = (q * k).sum(1, keepdim=True)
            negative = q @ self.queue.clone().T  # a copy: the enqueue below must not touch autograd's saved tensor
        self.enqueue(all_keys)
        return torch.cat([positive, negative], dim=1) / self.temperature


@register_method
class MoCo(EmbeddingMethod):
    name = "moco"
    task = "representation"
    paper = "2003.04297"
    Config = MoCoConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        return MoCoNet(self.cfg, info.in_channels)

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        view_1, view_2 = colour_distort(batch[0], self.cfg.colour), colour_distort(batch[1], self.cfg.colour)
        logits = model(view_1, view_2)
        # Each worker's mean over its own queries; DDP's gradient average makes it the global mean.
        return {"info_nce": F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))}

    def search_space(self) -> dict:
        return {
            "temperature": {"type": "uniform", "low": 0.05, "high": 0.5},
            "momentum": {"type": "uniform", "low": 0.9, "high": 0.999},
        }
