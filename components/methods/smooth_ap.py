"""Smooth-AP: average precision, made differentiable, optimised directly.

Brown, Xie, Kalogeiton, Zisserman, "Smooth-AP: Smoothing the Path Towards Large-Scale Image
Retrieval", ECCV 2020, arXiv 2007.12163.

Every image of the (global) batch is a query ``q`` against all the others, its retrieval set
``Omega`` (the query itself excluded), with positives ``P`` (same class). With the query's cosine
similarities ``s`` and ``D_ij = s_j - s_i``, the rank of a positive ``i`` is
``R(i, Omega) = 1 + sum_{j in Omega, j != i} 1[D_ij > 0]`` (among positives alone likewise),
and ``AP_q = 1/|P| sum_{i in P} R(i, P) / R(i, Omega)``. Smooth-AP replaces the Heaviside step
``1[x > 0]`` with ``sigmoid(x / tau)``; the loss is ``1 - mean_q AP_q``. The paper's tau = 0.01
is the default: small enough that the smoothed rank is close to the true rank, large enough
(on similarities in [-1, 1]) to give gradients to pairs ranked close to each other.

Faithful: the sigmoid relaxation, tau, one term per positive, every batch image a query,
batches of ``samples_per_class`` images per class (the paper's sampling). Differs from the
authors' code: it counts the query in its own retrieval set (adding about 1 to every rank);
here it is excluded, per the paper's definition of ``Omega``. The (N, N, N) difference tensor is
small at the batch sizes used here (32 images: 32k entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.methods.base import register_method
from components.methods.metric_losses import (
    MetricConfig,
    MetricLearningMethod,
    cosine_similarity_matrix,
    label_masks,
    zero_loss,
)


@dataclass
class SmoothAPConfig(MetricConfig):
    temperature: float = 0.01  # tau of the sigmoid replacing the step function (paper 0.01)

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


def smooth_ap(sim: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query smoothed AP of every row of ``sim`` against the other rows, and which queries
    have a positive (the others have no AP)."""
    n = len(labels)
    positive, _ = label_masks(labels)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    # diff[q, i, j] = s_qj - s_qi: how far j is ranked above i for query q.
    diff = sim[:, None, :] - sim[:, :, None]
    # Neither the query (j == q) nor the item itself (j == i) counts towards i's rank.
    counted = ~eye[:, None, :] & ~eye[None, :, :]
    above = torch.sigmoid(diff / temperature) * counted
    rank_all = 1.0 + above.sum(dim=2)  # (q, i)
    rank_positive = 1.0 + (above * positive[:, None, :]).sum(dim=2)
    n_positive = positive.sum(dim=1)
    ap = (rank_positive / rank_all * positive).sum(dim=1) / n_positive.clamp_min(1)
    return ap, n_positive > 0


def smooth_ap_loss(sim: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    ap, has_positive = smooth_ap(sim, labels, temperature)
    if not has_positive.any():
        return zero_loss(sim)
    return 1.0 - ap[has_positive].mean()


@register_method
class SmoothAP(MetricLearningMethod):
    name = "smooth_ap"
    task = "retrieval"
    paper = "2007.12163"
    Config = SmoothAPConfig

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"smooth_ap": smooth_ap_loss(cosine_similarity_matrix(embeddings), labels, self.cfg.temperature)}

    def search_space(self) -> dict:
        return {"temperature": {"type": "uniform", "low": 0.005, "high": 0.05}}
