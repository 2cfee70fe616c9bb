"""Optimisers, learning-rate schedules and Gradient Centralization.

Gradient Centralization (Yong et al., "Gradient Centralization: A New Optimization Technique
for Deep Neural Networks", arXiv 2004.01461): before the update, the gradient of every conv and
fully-connected weight has its mean over all dimensions but the output channel subtracted, so
each output channel's gradient has zero mean. The weights are those of ``nn.Linear`` and
``nn.Conv{1,2,3}d`` (output channel = dim 0) and ``nn.ConvTranspose{1,2,3}d``, whose weight is
(in, out/groups, *kernel): output channel ``g * out/groups + j`` is column ``j`` of group ``g``'s
input rows; ``nn.MultiheadAttention``'s query/key/value projection matrices count as
fully-connected weights. Embedding tables, other raw parameters, norms and biases are left alone. As in the
paper's SGD variant, a coupled L2 weight-decay term is added to the gradient before centralising.
"""

from __future__ import annotations

import math
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


_OUTPUT_DIM_0 = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def centralized_weights(model: nn.Module) -> dict[int, int]:
    """``id(weight) -> groups`` for the weights Gradient Centralization acts on: ``groups`` is that
    of a transposed conv (its output channels span dims 0 and 1), 0 for a weight whose output
    channel is dim 0."""
    out: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):  # its q/k/v projections are raw (out, in) matrices
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                w = getattr(module, name, None)
                if isinstance(w, nn.Parameter):
                    out.setdefault(id(w), 0)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):  # e.g. a weight computed by a parametrization
            continue
        if isinstance(module, _TRANSPOSED):
            out.setdefault(id(weight), module.groups)
        elif isinstance(module, _OUTPUT_DIM_0):
            out.setdefault(id(weight), 0)
    return out


def _centralize(grad: torch.Tensor, groups: int) -> None:
    """In place: subtract from ``grad`` its mean over each output channel's entries."""
    if groups == 0:  # (out, ...)
        grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))
        return
    # (in, out/groups, *kernel) -> (groups, in/groups, out/groups, *kernel): a channel is (g, :, j, ...)
    view = grad.reshape(groups, grad.shape[0] // groups, *grad.shape[1:])
    grad.copy_((view - view.mean(dim=(1, *range(3, view.dim())), keepdim=True)).reshape(grad.shape))


@torch.no_grad()
def centralize_gradients(model: nn.Module) -> None:
    """In place: ``g <- g - mean(g over each output channel)`` for the gradient of every conv,
    transposed-conv, linear and attention-projection weight of ``model``."""
    targets = centralized_weights(model)
    for p in model.parameters():
        if p.grad is not None and id(p) in targets:
            _centralize(p.grad, targets[id(p)])


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
        targets = centralized_weights(model)  # id -> transposed groups

        @torch.no_grad()
        def _gc_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if fold_wd and wd:
                        p.grad.add_(p, alpha=wd)
                    if id(p) in targets:
                        _centralize(p.grad, targets[id(p)])

        opt.register_step_pre_hook(_gc_hook)
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
