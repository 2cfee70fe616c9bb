"""Triplet loss with online mining over the global batch, three miners.

- ``batch_hard``: Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", arXiv 1703.07737. For every anchor, its farthest positive and nearest
  negative in the batch, ``[d_ap - d_an + margin]_+`` averaged over anchors. Made for the P x K
  batches that the retrieval family's m-per-class sampler composes.
- ``semi_hard``: Schroff, Kalenichenko, Philbin, "FaceNet: A Unified Embedding for Face
  Recognition and Clustering", arXiv 1503.03832. Every anchor-positive pair, with the nearest
  negative that is still farther than the positive (``d_ap < d_an``): inside the margin band
  ``d_ap < d_an < d_ap + margin`` whenever the batch holds one there, otherwise a negative past
  the band (loss 0, the triplet is already satisfied). Fallback when every negative is nearer
  than the positive (no semi-hard one): the farthest negative, the least hard, as TensorFlow's
  ``triplet_semihard_loss`` does, so that early training does not collapse on the hardest ones.
  Averaged over all anchor-positive pairs.
- ``hard_negatives``: the selectively contrastive triplet loss (SCT) of Xuan, Stylianou, Liu,
  Pless, "Hard negative examples are hard, but useful", ECCV 2020, arXiv 2007.12749. In cosine
  similarity ``S``, every anchor with its most similar positive (the easy positive, as in the
  authors' code) and its most similar negative (the hardest). A triplet is hard when
  ``S_an > S_ap``; then the loss is ``lambda * S_an``: it only pushes the negative away and
  gives the anchor-positive pair no gradient at all (pulling it in would also pull the close
  negative in, the failure the paper analyses). Otherwise the paper's NCA-form triplet loss
  ``-log(exp(S_ap/tau) / (exp(S_ap/tau) + exp(S_an/tau)))`` with tau = 0.1. Averaged over
  anchors (the authors' code divides by easy + hard triplets). Not taken from their code: its
  extra rule that ``S_an > 0.8`` also counts as hard, which the paper does not state.

Distances for the margin losses are Euclidean between L2-normalised embeddings (in [0, 2]), so
the margin is on a fixed scale; FaceNet's 0.2 is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from components.methods.base import register_method
from components.methods.metric_losses import (
    MetricConfig,
    MetricLearningMethod,
    cosine_similarity_matrix,
    distance_matrix,
    label_masks,
    zero_loss,
)


@dataclass
class TripletConfig(MetricConfig):
    # batch_hard by default: the standard miner for the P x K batches the family composes;
    # semi-hard needs the large batches FaceNet used (1800). Trained from scratch on the digits,
    # batch_hard collapses (every distance -> 0, loss -> margin): the failure hard_negatives fixes.
    miner: Literal["batch_hard", "semi_hard", "hard_negatives"] = "batch_hard"
    margin: float = 0.2  # batch_hard / semi_hard, on distances in [0, 2]
    sct_temperature: float = 0.1  # hard_negatives: the NCA triplet's temperature (paper 0.1)
    sct_lambda: float = 1.0  # hard_negatives: weight of S_an on hard triplets (paper 1)

    def validate(self) -> None:
        super().validate()
        if self.margin <= 0:
            raise ValueError("margin must be positive")
        if self.sct_temperature <= 0 or self.sct_lambda <= 0:
            raise ValueError("sct_temperature and sct_lambda must be positive")


# --- miners: indices only; the losses read the (differentiable) matrices at them -----------------


def batch_hard_mine(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor: the index of its farthest positive, of its nearest negative, and whether it has both."""
    positive, negative = label_masks(labels)
    d = dist.detach()
    hardest_positive = d.masked_fill(~positive, -float("inf")).argmax(dim=1)
    hardest_negative = d.masked_fill(~negative, float("inf")).argmin(dim=1)
    return hardest_positive, hardest_negative, positive.any(dim=1) & negative.any(dim=1)


def semi_hard_mine(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, positive, negative) index triplets, one per anchor-positive pair (see module doc)."""
    positive, negative = label_masks(labels)
    d = dist.detach()
    anchors, positives = positive.nonzero(as_tuple=True)
    keep = negative[anchors].any(dim=1)  # an anchor whose batch holds only its own class has none
    anchors, positives = anchors[keep], positives[keep]
    d_an = d[anchors]  # (pairs, N)
    is_negative = negative[anchors]
    farther = is_negative & (d_an > d[anchors, positives][:, None])
    semi_hard = d_an.masked_fill(~farther, float("inf")).argmin(dim=1)
    easiest = d_an.masked_fill(~is_negative, -float("inf")).argmax(dim=1)
    return anchors, positives, torch.where(farther.any(dim=1), semi_hard, easiest)


def easy_positive_hard_negative_mine(
    sim: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor: its most similar positive, its most similar negative, and whether it has both."""
    positive, negative = label_masks(labels)
    s = sim.detach()
    easy_positive = s.masked_fill(~positive, -float("inf")).argmax(dim=1)
    hard_negative = s.masked_fill(~negative, -float("inf")).argmax(dim=1)
    return easy_positive, hard_negative, positive.any(dim=1) & negative.any(dim=1)


# --- losses ---------------------------------------------------------------------------------------


def batch_hard_triplet_loss(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    pos, neg, valid = batch_hard_mine(dist, labels)
    rows = torch.arange(len(labels), device=dist.device)[valid]
    if len(rows) == 0:
        return zero_loss(dist)
    return F.relu(dist[rows, pos[valid]] - dist[rows, neg[valid]] + margin).mean()


def semi_hard_triplet_loss(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    a, p, n = semi_hard_mine(dist, labels)
    if len(a) == 0:
        return zero_loss(dist)
    return F.relu(dist[a, p] - dist[a, n] + margin).mean()


def selectively_contrastive_terms(
    s_ap: torch.Tensor, s_an: torch.Tensor, temperature: float, lam: float
) -> torch.Tensor:
    """Per-triplet SCT loss: ``lam * S_an`` where ``S_an > S_ap`` (no gradient to ``S_ap``), else
    the NCA triplet loss ``softplus((S_an - S_ap) / tau)`` (= -log softmax over {S_ap, S_an})."""
    hard = s_an.detach() > s_ap.detach()
    # where() sends the unselected branch a zero gradient, so S_ap gets exactly none on hard rows.
    return torch.where(hard, lam * s_an, F.softplus((s_an - s_ap) / temperature))


def selectively_contrastive_loss(
    sim: torch.Tensor, labels: torch.Tensor, temperature: float, lam: float
) -> torch.Tensor:
    pos, neg, valid = easy_positive_hard_negative_mine(sim, labels)
    rows = torch.arange(len(labels), device=sim.device)[valid]
    if len(rows) == 0:
        return zero_loss(sim)
    return selectively_contrastive_terms(sim[rows, pos[valid]], sim[rows, neg[valid]], temperature, lam).mean()


@register_method
class Triplet(MetricLearningMethod):
    name = "triplet"
    task = "retrieval"
    paper = "1703.07737"  # batch-hard; semi-hard 1503.03832; hard_negatives (SCT) 2007.12749
    Config = TripletConfig

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.miner == "hard_negatives":
            sim = cosine_similarity_matrix(embeddings)
            return {"sct": selectively_contrastive_loss(sim, labels, cfg.sct_temperature, cfg.sct_lambda)}
        dist = distance_matrix(embeddings)
        if cfg.miner == "semi_hard":
            return {"triplet": semi_hard_triplet_loss(dist, labels, cfg.margin)}
        return {"triplet": batch_hard_triplet_loss(dist, labels, cfg.margin)}

    def search_space(self) -> dict:
        if self.cfg.miner == "hard_negatives":
            return {"sct_temperature": {"type": "uniform", "low": 0.05, "high": 0.2}}
        return {"margin": {"type": "uniform", "low": 0.05, "high": 0.5}}
