"""Retrieval (metric learning), scored on classes never seen in training (open set).

The dataset's manifest fixes the protocol under ``protocols.retrieval``: the ``train_classes``
train the embedding (batches of ``m`` samples per class, for losses that need positives in every
batch), the ``eval_classes`` are retrieved. Every image of the scored split's eval classes is a
query against all the others (leave-one-out, cosine similarity), as in the seeds' CUB/Cars/SOP
protocols:

- ``recall_at_k`` for k in 1, 2, 4, 8: a query counts when one of its k nearest has its class;
  ``recall_at_1`` is the primary metric;
- ``map_at_r``: MAP@R (Musgrave et al., arXiv 2003.08505): for a query with R same-class images,
  the mean over its first R neighbours of precision@i at each correct one, divided by R.

MLflow forbids ``@`` in metric names, so the scheme's ``recall@1`` and ``map@r`` are logged as
``recall_at_1`` and ``map_at_r``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from components.augment.geometric import crop_train_transforms
from components.data.canonical import MANIFEST, DatasetError, read_split
from components.data.loaders import ImageLabelDataset, MPerClassBatchSampler
from components.tasks.base import Evaluator, TaskFamily, all_gather_objects, register_task
from components.tasks.representation import neighbour_figure

RECALL_KS = (1, 2, 4, 8)


def retrieval_metrics(
    features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """Leave-one-out recall@k and MAP@R of every row against all the others (cosine)."""
    feats = F.normalize(features.double(), dim=1)
    n = len(feats)
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 images, got {n}")
    sims = feats @ feats.T
    sims.fill_diagonal_(-float("inf"))
    order = sims.argsort(dim=1, descending=True)[:, : n - 1]
    hits = labels[order] == labels[:, None]  # (n, n-1): is the i-th neighbour of the same class
    out = {f"recall_at_{k}": float(hits[:, : min(k, n - 1)].any(dim=1).double().mean()) for k in ks}
    relevant = hits.sum(dim=1)  # R per query
    ranks = torch.arange(1, n, dtype=torch.float64)
    precision = hits.double().cumsum(dim=1) / ranks
    within_r = ranks[None, :] <= relevant[:, None]
    ap_r = (precision * hits * within_r).sum(dim=1) / relevant.clamp(min=1)
    has_relevant = relevant > 0
    out["map_at_r"] = float(ap_r[has_relevant].mean()) if has_relevant.any() else 0.0
    return out


class RetrievalEvaluator(Evaluator):
    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, predictions: torch.Tensor, batch) -> None:
        """``predictions``: embeddings (N, D) of ``batch = (images, labels)``."""
        self.parts.append((predictions.detach().float().cpu(), batch[1].detach().cpu().long()))

    def compute(self) -> dict[str, float]:
        gathered = [p for worker in all_gather_objects(self.parts) for p in worker]
        return retrieval_metrics(torch.cat([p[0] for p in gathered]), torch.cat([p[1] for p in gathered]))


def retrieval_protocol(root: Path) -> dict[str, list[int]]:
    """``protocols.retrieval`` of the dataset's manifest, checked."""
    path = Path(root) / MANIFEST
    manifest = json.loads(path.read_text())
    protocol = manifest.get("protocols", {}).get("retrieval")
    if not protocol:
        raise DatasetError(
            f"{path}: no 'protocols.retrieval' (train_classes / eval_classes); the retrieval family "
            "needs the classes held out of training"
        )
    for key in ("train_classes", "eval_classes"):
        if not protocol.get(key):
            raise DatasetError(f"{path}: protocols.retrieval.{key} is missing or empty")
    overlap = set(protocol["train_classes"]) & set(protocol["eval_classes"])
    if overlap:
        raise DatasetError(f"{path}: protocols.retrieval classes {sorted(overlap)} are both trained on and held out")
    return protocol


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


class Retrieval(TaskFamily):
    name = "retrieval"
    primary_metric = "recall_at_1"
    view = "crops"

    def dataset(self, root: Path, split: str, train: bool) -> Dataset:
        protocol = retrieval_protocol(root)
        base = ImageLabelDataset(root, self.view, split)
        # The protocol names category ids; the loader's labels are indices into the categories.
        ids = [c["id"] for c in read_split(root, self.view, split)["categories"]]
        wanted = protocol["train_classes"] if train else protocol["eval_classes"]
        unknown = sorted(set(wanted) - set(ids))
        if unknown:
            raise DatasetError(f"{Path(root) / MANIFEST}: protocols.retrieval names unknown categories {unknown}")
        keep = {ids.index(c) for c in wanted}
        subset = Subset(base, [i for i, label in enumerate(base.labels) if label in keep])
        if len(subset) == 0:
            raise DatasetError(f"{Path(root) / self.view / split}.json: no images of classes {sorted(keep)}")
        subset.labels = [base.labels[i] for i in subset.indices]
        if train:
            size = int(base[0][0].shape[-1])
            wrapped = _Transformed(subset, crop_train_transforms(size, scale=(0.7, 1.0)))
            wrapped.labels = subset.labels
            return wrapped
        return subset

    def train_batch_sampler(self, dataset: Dataset, per_worker: int, rank: int, world: int, seed: int, method_cfg):
        """``m`` samples per class (the method's ``samples_per_class``, default 4) in every batch."""
        m = int(getattr(method_cfg, "samples_per_class", 4))
        if per_worker % m:
            raise ValueError(f"the per-worker batch ({per_worker}) is not a multiple of samples_per_class ({m})")
        classes, available = per_worker // m, len(set(dataset.labels))
        if classes > available:
            raise ValueError(
                f"a per-worker batch of {per_worker} at samples_per_class {m} needs {classes} classes per batch, "
                f"but the retrieval protocol trains on {available}; lower training.batch_size"
            )
        return MPerClassBatchSampler(dataset.labels, m, classes, seed=seed, rank=rank, world=world)

    def evaluator(self, num_classes: int) -> Evaluator:
        return RetrievalEvaluator()

    def sample_figure(self, sample: tuple[Any, Any], classes: tuple[str, ...], path: Path) -> None:
        (images, labels), features = sample
        neighbour_figure(images, labels, features, classes, path)


RETRIEVAL = register_task(Retrieval())
