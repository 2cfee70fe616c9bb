"""The trainer: a short loop whose step is the method's ``training_step``; everything else is a hook.

Per epoch: ``before_epoch`` hooks, one pass over this worker's shard of the training set (each
step: the method's named losses, their sum back-propagated, an optimiser and a scheduler step),
the losses averaged over workers into ``metrics``, then ``after_epoch`` hooks. Hooks run in the
order of ``hooks`` at every event; :func:`components.training.hooks.default_hooks` documents the
order a run uses. ``epochs: 0`` runs one epoch without steps, so the hooks score the initial
weights (a baseline row).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods import Method
from components.tasks.base import TaskFamily, all_reduce_mean
from components.training.sessions import Session
from components.training.spec import TrainingConfig


@dataclass(eq=False)
class Trainer:
    name: str
    method: Method
    task: TaskFamily
    info: DatasetInfo
    cfg: TrainingConfig
    session: Session
    model: nn.Module  # what training steps call (DDP-wrapped on several workers)
    core: nn.Module  # the model itself: evaluated, checkpointed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    sampler: Any  # has set_epoch: shuffles each epoch differently, the same on every worker
    val_loader: Any
    hooks: list[Any] = field(default_factory=list)
    # state the hooks read and write
    start_epoch: int = 0
    epoch: int = 0
    epoch_start: float = 0.0
    steps: int = 0  # steps of the current epoch on this worker
    metrics: dict[str, float] = field(default_factory=dict)  # the current epoch's
    history: list[dict[str, float]] = field(default_factory=list)
    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None  # rank 0: the best validated weights
    improved: bool = False
    sample: tuple[Any, Any] | None = None  # a validation batch and its predictions
    resumed_from: int | None = None  # the checkpointed epoch this attempt restored
    augment_schedule: list[dict[str, Any]] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)  # the compute ledger's running totals
    scaler: Any = None  # fp16 autocast's loss scaler (older GPUs); None in bf16 or full precision

    def __post_init__(self) -> None:
        if self.scaler is None and self.amp_dtype() == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def total_epochs(self) -> int:
        return max(self.cfg.epochs, 1)

    def train(self) -> None:
        self._call("before_train")
        for epoch in range(self.start_epoch, self.total_epochs):
            self.epoch, self.metrics, self.epoch_start = epoch, {"epoch": float(epoch)}, time.perf_counter()
            self._call("before_epoch")
            self.train_epoch()
            self._call("after_epoch")
        self._call("after_train")

    def train_epoch(self) -> None:
        t0 = time.perf_counter()
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        for batch in self.train_loader if self.cfg.epochs > 0 else ():
            for name, value in self.step(batch).items():
                sums[name] = sums.get(name, torch.zeros((), device=self.device)) + value.detach().float()
            self.steps += 1
        train_time = time.perf_counter() - t0
        if self.steps:
            names = sorted(sums)
            reduced = all_reduce_mean(torch.stack([sums[n] for n in names]) / self.steps).cpu()
            self.metrics.update({f"train/{n}": float(v) for n, v in zip(names, reduced, strict=True)})
            self.metrics["train/loss"] = float(reduced.sum())
            self.metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            self.metrics["throughput/train_images_per_s"] = self.steps * self.cfg.batch_size / train_time
        self.metrics["time/train_epoch_s"] = train_time

    def step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimisation step; hooks may wrap it (the compute ledger counts one's FLOPs)."""
        batch = self.task.to_device(batch, self.device)
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.step_context(self))
            with self.autocast():
                losses = self.method.training_step(self.model, batch)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
            else:  # fp16: gradients of a scaled loss, unscaled before clipping; inf/nan steps skipped
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            if self.cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.grad_clip_norm)
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.scheduler.step()
        return losses

    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of training steps with ``training.amp`` on GPU: bf16 where the GPU
        computes it natively (Ampere and later), else fp16 with loss scaling (V100 and T4 only
        emulate bf16, slowly); None (full precision) on CPU or without ``amp``."""
        if self.device.type != "cuda" or not self.cfg.amp:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.amp_dtype()
        return contextlib.nullcontext() if dtype is None else torch.autocast(device_type="cuda", dtype=dtype)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self)
