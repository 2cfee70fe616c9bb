"""What every Ray Train worker (and a Tune trial that trains in its own process) runs.

It knows the method only through the contract in ``components.methods.base`` and the task
family only through ``components.tasks``: it builds the model, the loaders of this worker's
shard and the optimiser, then hands them to :class:`~components.training.trainer.Trainer` with
the run's hooks (:mod:`components.training.hooks` documents them and their order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from components.augment.policy import PolicyDataset, build_policy
from components.data.canonical import DatasetInfo, read_info
from components.methods import Method
from components.tasks import get_task
from components.tasks.base import TaskFamily
from components.training.evaluation import eval_loader_for
from components.training.hooks import BEST_MODEL_FILE, HISTORY_FILE, LEDGER_FILE, STATE_FILE, default_hooks
from components.training.optim import build_optimizer, build_scheduler
from components.training.rng import seed_all
from components.training.sessions import Session, TrainSession, TrialSession
from components.training.spec import RunSpec, TrainingConfig
from components.training.trainer import Trainer

__all__ = ["BEST_MODEL_FILE", "HISTORY_FILE", "LEDGER_FILE", "STATE_FILE", "assemble", "build_trainer", "seed_all"]


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one worker of a distributed run."""
    build_trainer(payload, TrainSession()).train()


def train_loop_in_trial(payload: dict[str, Any]) -> None:
    """The same loop inside a Ray Tune trial, without a Ray Train worker group."""
    build_trainer(payload, TrialSession()).train()


def build_trainer(payload: dict[str, Any], session: Session) -> Trainer:
    """The trainer of one worker, with the run's hooks, from the plain-data payload the driver sends."""
    spec = RunSpec.from_payload(payload["spec"])
    cfg = spec.training
    method = spec.create_method()
    task = get_task(method.task)
    info = read_info(data_root(payload))
    train_set, policy_set = _train_set(task, info, cfg)
    score_test = bool(payload.get("score_test"))
    hooks = default_hooks(spec.name, payload.get("mlflow"), session.rank, policy_set, cfg.figures_every, score_test)
    return assemble(spec.key, method, info, cfg, session, hooks, train_set, payload.get("trunk_state"))


def assemble(
    key: str,
    method: Method,
    info: DatasetInfo,
    cfg: TrainingConfig,
    session: Session,
    hooks: list[Any],
    train_set=None,
    trunk_state: dict | None = None,
) -> Trainer:
    """A trainer for ``method`` on ``info`` with ``hooks``: the model, this worker's loaders and the
    optimiser (``key``: the params entry, named in errors; ``train_set``: the family's by default)."""
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    task = get_task(method.task)
    model, core = build_model(method, info, cfg, session, trunk_state)
    train_set = train_set if train_set is not None else task.dataset(info.root, "train", train=True)
    train_loader, sampler = train_loader_for(task, train_set, cfg, session, method.cfg)
    if len(train_loader) == 0:
        raise ValueError(
            f"{info.root}: the train split has {len(train_set)} samples, fewer than one global batch "
            f"({cfg.batch_size}); lower {key}.training.batch_size"
        )
    optimizer = build_optimizer(core, cfg.optimizer, method.param_groups(core))
    return Trainer(
        name=key.rpartition(".")[2],
        method=method,
        task=task,
        info=info,
        cfg=cfg,
        session=session,
        model=model,
        core=core,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.scheduler, cfg.epochs, len(train_loader)),
        train_loader=train_loader,
        sampler=sampler,
        val_loader=val_loader_for(task, info, cfg, session),
        hooks=hooks,
    )


def build_model(
    method: Method, info: DatasetInfo, cfg: TrainingConfig, session: Session, trunk_state: dict | None
) -> tuple[nn.Module, nn.Module]:
    """The model as training steps call it (DDP-wrapped on several workers) and the bare model;
    the same initial weights on every worker, then a pretrained trunk if the run starts from one
    (a restored checkpoint overrides both)."""
    seed_all(cfg.seed)
    model = method.build(info)
    if trunk_state is not None:
        method.trunk(model).load_state_dict(trunk_state)
    if session.device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return model, core


def _train_set(task: TaskFamily, info: DatasetInfo, cfg: TrainingConfig):
    train_set = task.dataset(info.root, "train", train=True)
    policy = build_policy(cfg.augment, mask_fill=task.augment_mask_fill)
    if policy is None:
        return train_set, None
    wrapped = PolicyDataset(train_set, policy)  # after the family's own transforms, on every item
    return wrapped, wrapped


def train_loader_for(task: TaskFamily, train_set, cfg: TrainingConfig, session: Session, method_cfg: Any):
    """This worker's shard of the global batch, and the sampler that reshuffles it each epoch."""
    per_worker = cfg.batch_size // session.world
    on_gpu = session.device.type == "cuda"
    common = {"num_workers": cfg.loader_workers, "collate_fn": task.collate(), "pin_memory": on_gpu}
    batch_sampler = task.train_batch_sampler(train_set, per_worker, session.rank, session.world, cfg.seed, method_cfg)
    if batch_sampler is not None:  # the family composes the batches (e.g. m samples per class)
        return DataLoader(train_set, batch_sampler=batch_sampler, **common), batch_sampler
    sampler = DistributedSampler(
        train_set, num_replicas=session.world, rank=session.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    return DataLoader(train_set, batch_size=per_worker, sampler=sampler, drop_last=True, **common), sampler


def val_loader_for(task: TaskFamily, info: DatasetInfo, cfg: TrainingConfig, session: Session) -> DataLoader:
    """This worker's disjoint slice of the validation set."""
    return eval_loader_for(task, info, "val", cfg, session.rank, session.world, session.device)


def data_root(payload: dict[str, Any]) -> Path:
    """The dataset on this node: with S3 storage the staged copy (downloaded once per node), so
    workers on machines without the driver's disk read the same data; otherwise the driver's folder."""
    if payload.get("data_uri"):
        from components.storage.cluster import local_dataset

        return local_dataset(payload["data_uri"], payload.get("s3_endpoint"))
    return Path(payload["data_root"])
