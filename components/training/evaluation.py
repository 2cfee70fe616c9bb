"""The one evaluation loop: a model's predictions on a loader, scored by its task family.

Used by the training loop (validation and test scoring on each worker's slice), by the driver
(the ``epochs: 0`` baseline on CPU), by the benchmarks and by the tests. It always runs in full
precision: under bf16 autocast, detectors would decode boxes and run NMS in bf16, and the
validation score that picks the best checkpoint would disagree with the test score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from components.data.canonical import DatasetInfo
from components.methods import Method
from components.tasks.base import TaskFamily
from components.training.spec import TrainingConfig


@torch.no_grad()
def evaluate(
    method: Method, task: TaskFamily, model: nn.Module, loader, num_classes: int, device: torch.device | None = None
) -> tuple[dict[str, float], tuple[Any, Any] | None]:
    """Scores (bare metric names) and the first batch with its predictions, for a figure."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    evaluator = task.evaluator(num_classes)
    sample = None
    with torch.autocast(device_type=device.type, enabled=False):
        for batch in loader:
            batch = task.to_device(batch, device)
            predictions = method.predict(model, batch)
            evaluator.update(predictions, batch)
            if sample is None:
                sample = (batch, predictions)
    model.train(was_training)
    return evaluator.compute(), sample


def eval_loader_for(
    task: TaskFamily, info: DatasetInfo, split: str, cfg: TrainingConfig, rank: int, world: int, device: torch.device
) -> DataLoader:
    """Worker ``rank``'s disjoint slice of ``split`` (no padding duplicates); the evaluators sum
    their counts across workers, so the score is that of the whole split."""
    dataset = task.dataset(info.root, split, train=False)
    return DataLoader(
        Subset(dataset, range(rank, len(dataset), world)),
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.loader_workers,
        collate_fn=task.collate(),
        pin_memory=device.type == "cuda",
    )


def split_loader(task: TaskFamily, info: DatasetInfo, split: str, batch_size: int, **kwargs: Any) -> DataLoader:
    """The evaluation loader of one split, in the task family's batches."""
    dataset = task.dataset(info.root, split, train=False)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=task.collate(), **kwargs)
