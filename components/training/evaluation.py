"""The one evaluation loop: a model's predictions on a loader, scored by its task family.

Used by the training loop (validation on each worker's slice), by the driver (test scoring and
the ``epochs: 0`` baseline), by the benchmarks and by the tests. It always runs in full
precision: under bf16 autocast, detectors would decode boxes and run NMS in bf16, and the
validation score that picks the best checkpoint would disagree with the test score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from components.data.canonical import DatasetInfo
from components.methods import Method
from components.tasks.base import TaskFamily


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


def split_loader(task: TaskFamily, info: DatasetInfo, split: str, batch_size: int, **kwargs: Any) -> DataLoader:
    """The evaluation loader of one split, in the task family's batches."""
    dataset = task.dataset(info.root, split, train=False)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=task.collate(), **kwargs)
