"""Classification: image-level labels from the ``crops`` view, scored by top-1 / top-5."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from components.data.loaders import ImageLabelDataset
from components.data.visualize import image_grid
from components.tasks.base import Evaluator, TaskFamily, all_reduce_sum, register_task


class ClassificationEvaluator(Evaluator):
    """Top-1 and top-5 accuracy, plus per-class accuracy; exact across workers (counts summed)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.correct = torch.zeros(num_classes, dtype=torch.float64)
        self.seen = torch.zeros(num_classes, dtype=torch.float64)
        self.top5 = torch.zeros((), dtype=torch.float64)

    def update(self, predictions: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``predictions``: logits (N, C)."""
        targets = batch[1].detach().cpu()
        logits = predictions.detach().float().cpu()
        hits = (logits.argmax(dim=1) == targets).double()
        self.correct.index_add_(0, targets, hits)
        self.seen.index_add_(0, targets, torch.ones_like(hits))
        k = min(5, self.num_classes)
        topk = logits.topk(k, dim=1).indices
        self.top5 += (topk == targets[:, None]).any(dim=1).double().sum()

    def compute(self) -> dict[str, float]:
        stats = all_reduce_sum(torch.cat([self.correct, self.seen, self.top5.view(1)]))
        correct, seen = stats[: self.num_classes], stats[self.num_classes : 2 * self.num_classes]
        total = seen.sum().clamp(min=1)
        out = {"top1": float(correct.sum() / total), "top5": float(stats[-1] / total)}
        present = seen > 0
        out["mean_class_acc"] = float((correct[present] / seen[present]).mean()) if present.any() else 0.0
        return out


class Classification(TaskFamily):
    name = "classification"
    primary_metric = "top1"
    view = "crops"

    def dataset(self, root: Path, split: str, train: bool) -> Dataset:
        return ImageLabelDataset(root, self.view, split)

    def evaluator(self, num_classes: int) -> Evaluator:
        return ClassificationEvaluator(num_classes)

    def sample_figure(self, sample, classes: tuple[str, ...], path: Path, count: int = 32) -> None:
        """Test images titled ``predicted (true)``: green when right, red when wrong."""
        (images, targets), logits = sample
        predicted = logits.argmax(dim=1)[:count].tolist()
        truth = targets[:count].tolist()
        pixels = images[:count].permute(0, 2, 3, 1).float().cpu().numpy()
        titles = [f"{classes[p]} ({classes[t]})" for p, t in zip(predicted, truth, strict=True)]
        colours = ["green" if p == t else "red" for p, t in zip(predicted, truth, strict=True)]
        image_grid(pixels, titles, colours, path)


CLASSIFICATION = register_task(Classification())
