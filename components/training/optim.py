"""Optimisers, learning-rate schedules and Gradient Centralization.

Gradient Centralization (Yong et al., "Gradient Centralization: A New Optimization Technique
for Deep Neural Networks", arXiv 2004.01461): before the update, the gradient of every weight
with more than one dimension (conv kernels, fully connected matrices) has its mean over all
dimensions but the output one subtracted, so each output channel's gradient has zero mean.
As in the paper's SGD variant, a coupled L2 weight-decay term is added to the gradient before
centralising; 1-d parameters (biases, norm scales) are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    gradient_centralization: bool = False

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0")


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0


@torch.no_grad()
def centralize_gradients(params: Iterable[torch.Tensor]) -> None:
    """In place: ``g <- g - mean(g over all dims but the first)`` for every parameter with more
    than one dimension."""
    for p in params:
        if p.grad is not None and p.grad.dim() > 1:
            p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.dim())), keepdim=True))


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, groups: list[tuple[list[nn.Parameter], float]] | None = None
) -> torch.optim.Optimizer:
    """The optimiser over ``model``'s trainable parameters; ``groups`` (parameters, learning-rate
    multiplier) must cover each of them exactly once."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if groups is None:
        groups = [(trainable, 1.0)]
    covered = [id(p) for ps, _ in groups for p in ps]
    if sorted(covered) != sorted(id(p) for p in trainable):
        raise ValueError("parameter groups must hold every trainable parameter exactly once")
    params = [{"params": list(ps), "lr": cfg.lr * scale} for ps, scale in groups if ps]
    wd = cfg.weight_decay
    # With GC on SGD, weight decay is folded into the gradient before centralising (the paper's
    # SGD_GC), so the optimiser itself must not add it again.
    fold_wd = cfg.gradient_centralization and cfg.name == "sgd"
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=0.0 if fold_wd else wd,
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
    if cfg.gradient_centralization:

        @torch.no_grad()
        def _centralize(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
            for group in optimizer.param_groups:
                if fold_wd and wd:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.add_(p, alpha=wd)
                centralize_gradients(group["params"])

        opt.register_step_pre_hook(_centralize)
    return opt


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
