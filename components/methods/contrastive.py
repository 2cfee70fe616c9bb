"""Margin contrastive loss over all pairs of the global batch: the simple metric-learning baseline.

Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006
(the "contrastive loss"). That paper has no arXiv id; the registry's ``paper`` is the benchmark
that runs this loss as its baseline on the same open-set retrieval protocol and MAP@R as this
family: Musgrave, Belongie, Lim, "A Metric Learning Reality Check", arXiv 2003.08505 (its
contrastive loss also averages positive and negative pairs separately). For a pair at
Euclidean distance ``D``:

    L = 1/2 D^2                   (same class)
    L = 1/2 max(0, m - D)^2        (different classes)

Faithful: the per-pair loss, on the distances between L2-normalised embeddings (``D`` in
[0, 2], so the margin has a fixed scale). Where this differs from the paper: the pairs are not
sampled ahead of time but are all the pairs of the global batch (each unordered pair once), and
the two terms are averaged separately and added, because an m-per-class batch of ``C`` classes
has about ``C`` times more negative pairs than positive ones and a plain mean would let the
(mostly inactive) negatives decide the scale of the positives' pull.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.methods.base import register_method
from components.methods.metric_losses import MetricConfig, MetricLearningMethod, distance_matrix, label_masks, zero_loss


@dataclass
class ContrastiveConfig(MetricConfig):
    # A negative pair stops pushing beyond this distance. On the unit sphere, sqrt(2) ~ 1.41 is
    # the distance of orthogonal embeddings; a margin below it leaves room for many classes.
    margin: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not 0 < self.margin <= 2:
            raise ValueError("margin must be in (0, 2] (distances between unit vectors)")


def contrastive_loss(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``1/2 D^2`` over positive pairs and of ``1/2 [m - D]_+^2`` over negative pairs,
    each unordered pair counted once; a term without pairs is zero."""
    positive, negative = label_masks(labels)
    upper = torch.ones_like(positive).triu(diagonal=1)  # i < j: each pair once
    d_pos = dist[positive & upper]
    d_neg = dist[negative & upper]
    pull = 0.5 * d_pos.pow(2).mean() if d_pos.numel() else zero_loss(dist)
    push = 0.5 * (margin - d_neg).clamp_min(0).pow(2).mean() if d_neg.numel() else zero_loss(dist)
    return pull, push


@register_method
class Contrastive(MetricLearningMethod):
    name = "contrastive"
    task = "retrieval"
    paper = "2003.08505"  # the loss: Hadsell et al., CVPR 2006 (no arXiv id); see the module doc
    Config = ContrastiveConfig

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        pull, push = contrastive_loss(distance_matrix(embeddings), labels, self.cfg.margin)
        return {"positive": pull, "negative": push}

    def search_space(self) -> dict:
        return {"margin": {"type": "uniform", "low": 0.5, "high": 1.4}}
