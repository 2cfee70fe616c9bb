"""Task families: what a method's predictions look like, how they are scored, and the primary
metric that Tune and the model registry rank by.

Metric names follow one scheme, ``{split}/{metric}`` (``val/top1``, ``val/mAP``...); evaluators
return bare names (``top1``) and the caller adds the split.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

_TASKS: dict[str, TaskFamily] = {}


class Evaluator(ABC):
    """Accumulates over batches; ``compute`` reduces across workers when a process group exists."""

    @abstractmethod
    def update(self, predictions: Any, batch: Any) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...


class TaskFamily(ABC):
    name: str
    primary_metric: str  # bare name, e.g. "top1"
    higher_is_better: bool = True
    # ``training.augment`` policies apply to training items ``(image, target)``; families whose
    # items are something else (two views, m-per-class crops) set this False.
    augment_policies: bool = True
    augment_mask_fill: int = 0  # what a geometric policy op fills a mask with where it had no pixels

    @abstractmethod
    def dataset(self, root: Path, split: str, train: bool) -> Dataset: ...

    @abstractmethod
    def evaluator(self, num_classes: int) -> Evaluator: ...

    @abstractmethod
    def sample_figure(self, sample: tuple[Any, Any], classes: tuple[str, ...], path: Path) -> None:
        """Write a PNG of ``(batch, predictions)`` drawn for a person to look at."""

    def train_batch_sampler(
        self, dataset: Dataset, per_worker: int, rank: int, world: int, seed: int, method_cfg: Any
    ) -> Sampler[list[int]] | None:
        """Batches of training indices for one worker (with ``set_epoch``), or ``None``: the loop
        then shards a shuffled order with a ``DistributedSampler``."""
        return None

    def collate(self) -> Callable[[list[Any]], Any] | None:
        """A DataLoader ``collate_fn``; ``None`` means PyTorch's default."""
        return None

    @staticmethod
    def to_device(batch: Any, device: torch.device) -> Any:
        if isinstance(batch, torch.Tensor):  # asynchronous only towards a GPU: a copy to the CPU
            return batch.to(device, non_blocking=device.type == "cuda")  # must be complete when read
        if isinstance(batch, (list, tuple)):
            return type(batch)(TaskFamily.to_device(b, device) for b in batch)
        if isinstance(batch, dict):
            return {k: TaskFamily.to_device(v, device) for k, v in batch.items()}
        return batch


def register_task(task: TaskFamily) -> TaskFamily:
    if task.name in _TASKS:
        raise ValueError(f"task family {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def _import_task_module(name: str) -> None:
    from components.tasks import TASK_MODULES

    if name in TASK_MODULES:
        importlib.import_module(f"components.tasks.{TASK_MODULES[name]}")


def get_task(name: str) -> TaskFamily:
    """The family registered under ``name``, importing its module on first use."""
    if name not in _TASKS:
        _import_task_module(name)
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task family {name!r}; available: {', '.join(available_tasks())}") from None


def available_tasks() -> list[str]:
    from components.tasks import TASK_MODULES

    for name in TASK_MODULES:
        _import_task_module(name)
    return sorted(_TASKS)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device(device: torch.device) -> torch.device:
    """Where a collective on a tensor of ``device`` must run: the device itself when the process
    group has a backend for its type, else the group's own (with GPUs Ray's group is NCCL alone,
    and a CPU tensor there fails with "No backend type associated with device type cpu")."""
    config = torch.distributed.get_backend_config()  # e.g. "cpu:gloo,cuda:nccl" or "cuda:nccl"
    supported = {part.split(":")[0] for part in config.split(",")}
    if device.type in supported:
        return device
    if "cuda" in supported:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all workers (no-op without a process group), on a device the group
    supports; the result is on the tensor's own device."""
    if _distributed():
        reduced = values.to(collective_device(values.device), copy=True)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced.to(values.device)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all workers (no-op without a process group)."""
    if _distributed():
        return all_reduce_sum(values) / torch.distributed.get_world_size()
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """Every worker's ``obj``, in rank order (``[obj]`` without a process group)."""
    if _distributed():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every worker (``obj`` itself without a process group)."""
    if _distributed():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
    return obj
