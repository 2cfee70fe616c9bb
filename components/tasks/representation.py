"""Representation learning: self-supervised encoders scored on frozen features of the ``crops`` view.

Two protocols, both on the encoder's features of the train split (the reference set, labels used
here only) and of the scored split (the queries):

- ``knn_top1`` (primary): weighted k-nearest-neighbour classification as in NPID (arXiv
  1805.01978, Sec. 3.4): the top-k cosine neighbours vote with weight ``exp(s / tau)``; k=200,
  tau=0.07 as in the paper.
- ``linear_top1``: a linear probe, a softmax classifier trained on the frozen, standardised
  reference features (full batch, L-BFGS, seeded) and scored on the queries.

Training batches are two independently augmented views of each image with its index:
``(view_1, view_2, label, index)`` (the label is never used by a method's loss). Evaluation batches
are ``(image, label, is_query, index)``: the scored split's images first (``is_query`` 1), then the
train split's (0); ``index`` is the image's position in its own split, so a train image's index is
the one its training items carry (NPID's memory bank slot). Features of every worker are gathered,
so the scores are exact under DDP.

A method's predictions are the features ``(N, D)`` of the batch, or a dict holding them under
``features`` plus other named ``(N, D')`` feature sets of the same rows: each is scored by the same
weighted kNN, its queries against its own reference rows, as ``{name}_knn_top1`` next to the two
protocols above (NPID's ``bank``: the query's embedding against the memory bank's entries, the
paper's own evaluation). The primary metric stays ``knn_top1``, so every method is ranked alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, Dataset

from components.augment.geometric import crop_train_transforms
from components.data.loaders import ImageLabelDataset, TwoViews
from components.data.visualize import image_grid
from components.tasks.base import Evaluator, TaskFamily, all_gather_objects, register_task

KNN_K = 200
KNN_TAU = 0.07


def weighted_knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    tau: float = KNN_TAU,
) -> torch.Tensor:
    """Class predicted for each query by NPID's weighted kNN over L2-normalised features."""
    query, reference = F.normalize(query.float(), dim=1), F.normalize(reference.float(), dim=1)
    k = min(k, len(reference))
    sims, idx = (query @ reference.T).topk(k, dim=1)
    votes = torch.zeros(len(query), num_classes, dtype=torch.float64)
    # exp((s - s_max) / tau): the same vote ratios, without overflow at small tau.
    weights = torch.exp((sims.double() - sims[:, :1].double()) / tau)
    votes.scatter_add_(1, reference_labels[idx], weights)
    return votes.argmax(dim=1)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    steps: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """Class predicted for each test row by a softmax classifier fit on frozen ``train_x``."""
    # L2-normalised like the kNN's inputs, then centred and scaled by one global factor (a
    # per-dimension scale would blow up dimensions that barely vary on the train split).
    train_x, test_x = F.normalize(train_x.double(), dim=1), F.normalize(test_x.double(), dim=1)
    mean = train_x.mean(0, keepdim=True)
    scale = (train_x - mean).pow(2).sum(1).mean().sqrt().clamp(min=1e-12)
    xs, xt = (train_x - mean) / scale, (test_x - mean) / scale
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(xs.shape[1], num_classes, generator=generator, dtype=torch.float64) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (xt @ weight + bias).argmax(dim=1)


def split_predictions(
    predictions: torch.Tensor | dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A method's predictions as the scored features and the extra named feature sets (see above)."""
    if not isinstance(predictions, dict):
        return predictions, {}
    extra = dict(predictions)
    return extra.pop("features"), extra


class RepresentationEvaluator(Evaluator):
    """kNN and linear-probe top-1 of the queries against the reference (train) features, and the
    kNN top-1 of each extra feature set a method's predictions carry."""

    def __init__(self, num_classes: int, k: int = KNN_K, tau: float = KNN_TAU) -> None:
        self.num_classes, self.k, self.tau = num_classes, k, tau
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def update(self, predictions: torch.Tensor | dict[str, torch.Tensor], batch) -> None:
        """``predictions``: features (N, D) of ``batch = (images, labels, is_query, ...)``, or a
        dict of them (``features``) and extra named feature sets of the same N rows."""
        features, extra = split_predictions(predictions)
        self.parts.append(
            (
                features.detach().float().cpu(),
                batch[1].detach().cpu().long(),
                batch[2].detach().cpu().bool(),
                {name: value.detach().float().cpu() for name, value in extra.items()},
            )
        )

    def compute(self) -> dict[str, float]:
        gathered = [p for worker in all_gather_objects(self.parts) for p in worker]
        features = torch.cat([p[0] for p in gathered])
        labels = torch.cat([p[1] for p in gathered])
        is_query = torch.cat([p[2] for p in gathered])
        q, r = is_query, ~is_query
        if not q.any() or not r.any():
            raise ValueError("representation evaluation needs both query and reference (train) images")
        knn = weighted_knn(features[q], features[r], labels[r], self.num_classes, self.k, self.tau)
        probe = linear_probe(features[r], labels[r], features[q], self.num_classes)
        scores = {
            "knn_top1": float((knn == labels[q]).double().mean()),
            "linear_top1": float((probe == labels[q]).double().mean()),
        }
        for name in sorted(gathered[0][3]):
            extra = torch.cat([p[3][name] for p in gathered])
            predicted = weighted_knn(extra[q], extra[r], labels[r], self.num_classes, self.k, self.tau)
            scores[f"{name}_knn_top1"] = float((predicted == labels[q]).double().mean())
        return scores


class _WithRole(Dataset):
    """Items ``(image, label, is_query, index)`` of one split (``index``: the position in it)."""

    def __init__(self, base: ImageLabelDataset, is_query: bool) -> None:
        self.base, self.is_query = base, int(is_query)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, label, self.is_query, i


def neighbour_figure(
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor,
    classes,
    path: Path,
    queries: int = 8,
    neighbours: int = 5,
) -> None:
    """Rows of a query and its nearest neighbours (cosine) among the other images of the batch;
    a neighbour is green when it has the query's class, red otherwise."""
    n = min(queries, len(images))
    feats = F.normalize(features.float(), dim=1)
    sims = feats[:n] @ feats.T
    sims[torch.arange(n), torch.arange(n)] = -float("inf")
    nearest = sims.topk(min(neighbours, len(images) - 1), dim=1).indices
    pixels, titles, colours = [], [], []
    for i in range(n):
        row = [i, *nearest[i].tolist()]
        for j, idx in enumerate(row):
            pixels.append(images[idx].permute(1, 2, 0).float().cpu().numpy())
            titles.append(("query " if j == 0 else "") + classes[int(labels[idx])])
            colours.append("black" if j == 0 else ("green" if labels[idx] == labels[i] else "red"))
    image_grid(np.stack(pixels), titles, colours, path, cols=nearest.shape[1] + 1)


class Representation(TaskFamily):
    name = "representation"
    primary_metric = "knn_top1"
    augment_policies = False  # items are two views and an index: the method makes its own distortions
    view = "crops"

    def dataset(self, root: Path, split: str, train: bool) -> Dataset:
        if train:
            base = ImageLabelDataset(root, self.view, split)
            size = int(base[0][0].shape[-1]) if len(base) else 32
            return TwoViews(base, crop_train_transforms(size, scale=(0.5, 1.0)))
        queries = _WithRole(ImageLabelDataset(root, self.view, split), is_query=True)
        return ConcatDataset([queries, _WithRole(ImageLabelDataset(root, self.view, "train"), is_query=False)])

    def evaluator(self, num_classes: int) -> Evaluator:
        return RepresentationEvaluator(num_classes)

    def sample_figure(self, sample: tuple[Any, Any], classes: tuple[str, ...], path: Path) -> None:
        batch, predictions = sample
        neighbour_figure(batch[0], batch[1], split_predictions(predictions)[0], classes, path)


REPRESENTATION = register_task(Representation())
