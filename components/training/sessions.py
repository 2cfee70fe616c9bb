"""Where the trainer runs: the few things it asks of Ray (rank, device, checkpoints, reports).

- :class:`TrainSession`: one worker of a Ray Train worker group (a run, or a Tune trial's run);
- :class:`TrialSession`: a Ray Tune trial that trains in its own process, which Population Based
  Training needs, since it hands a trial another trial's checkpoint;
- :class:`LocalSession`: this process alone, no Ray (benchmarks and tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Session:
    """The trainer's view of its runtime; subclasses fill in what differs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def get_checkpoint(self) -> Any | None:
        return None

    def report(self, metrics: dict[str, float], checkpoint: Any | None = None) -> None:
        """Hand an epoch's metrics (and rank 0's checkpoint) to the runtime."""


class TrainSession(Session):
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def get_checkpoint(self) -> Any | None:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint: Any | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)


class TrialSession(Session):
    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def get_checkpoint(self) -> Any | None:
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint: Any | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=checkpoint)


class LocalSession(Session):
    """One process, no Ray: nothing is checkpointed, reports are kept in ``reports``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.reports: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint: Any | None = None) -> None:
        self.reports.append(dict(metrics))
