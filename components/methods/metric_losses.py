"""What the metric-learning methods (``triplet``, ``contrastive``, ``smooth_ap``) share.

- The model: the family's shared encoder (``embedding_base``) and a linear embedding;
  ``model(images)`` returns the raw embedding, which the losses below and the retrieval
  evaluator L2-normalise (so distances live in [0, 2] and similarities in [-1, 1]).
- The global batch: every loss here compares each image with all the others of the batch
  (mining, pairs, rankings), so it runs over the batch of *all* workers (:func:`global_batch`).
- Pairwise similarities, distances and label masks, computed once for every loss.

Gradient scale under data parallelism. Every worker computes the same loss ``L`` on the same
gathered batch. The backward of ``gather_with_grad`` gives each worker's own rows the sum over
the ``W`` workers' (identical) losses, ``W * dL/dx``; DDP then averages parameter gradients over
the ``W`` workers, so each update is exactly ``dL/dtheta`` of the global batch, as one worker
holding the whole batch would compute it (up to BatchNorm's per-worker statistics). Computing
the O(N^2) loss on every worker costs nothing next to the encoder at these batch sizes.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.embedding_base import (
    EmbeddingMethod,
    EncoderConfig,
    build_encoder,
    gather_no_grad,
    gather_with_grad,
)


@dataclass
class MetricConfig:
    """Keys every metric-learning method has; each method's config extends it with its loss."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embedding_dim: int = 64
    # m images of each class in every worker's batch (read by the retrieval family's sampler):
    # every anchor has m - 1 positives, whatever the worker count.
    samples_per_class: int = 4

    def validate(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be positive")
        if self.samples_per_class < 2:
            raise ValueError("samples_per_class must be at least 2 (an anchor needs a positive)")


class EmbeddingNet(nn.Module):
    """Encoder, then a linear embedding; ``forward(images)`` returns the unnormalised embedding."""

    def __init__(self, encoder: nn.Module, out_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.embedding = nn.Linear(out_dim, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.encoder(images))


def global_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's embeddings (differentiable for this worker's rows) and labels, in rank order.

    The loss computed on these is the same on every worker; see the module docstring for why the
    resulting update equals the single-worker one without any rescaling."""
    return gather_with_grad(embeddings), gather_no_grad(labels)


def cosine_similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarities of the rows (the evaluator's measure)."""
    unit = F.normalize(embeddings, dim=1)
    return unit @ unit.T


def distance_matrix(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, N) Euclidean distances between the L2-normalised rows: sqrt(2 - 2 cos).

    The clamp keeps sqrt's gradient finite for identical rows (an image sampled twice)."""
    return (2.0 - 2.0 * cosine_similarity_matrix(embeddings)).clamp_min(eps).sqrt()


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (N, N) masks: ``positive[i, j]`` same label and i != j, ``negative[i, j]`` other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph connected (DDP expects a gradient for every parameter)."""
    return like.sum() * 0.0


class MetricLearningMethod(EmbeddingMethod):
    """Builds :class:`EmbeddingNet`; ``training_step`` gathers the global batch and calls ``loss``."""

    def build(self, info: DatasetInfo) -> nn.Module:
        encoder = build_encoder(self.cfg.encoder, info.in_channels)
        return EmbeddingNet(encoder, encoder.out_dim, self.cfg.embedding_dim)

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        embeddings, labels = global_batch(model(images).float(), labels)
        # The losses rank similarities that differ by ~1e-2 (Smooth-AP's tau, margins): bf16
        # (the loop's AMP on GPU) resolves ~4e-3 near 1, so they run in float32, outside autocast.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.loss(embeddings, labels)

    @abstractmethod
    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named losses of the (global) batch's raw embeddings and labels."""
