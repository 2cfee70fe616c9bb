"""The generic training loop, run by every Ray Train worker for every method.

It knows the method only through the contract in ``components.methods.base`` and the task
family only through ``components.tasks``. Per epoch: train on this worker's shard of the global
batch, validate with the task's evaluator (counts reduced across workers), then report metrics
and a checkpoint to Ray Train. Rank 0 writes the checkpoint and logs metrics to MLflow, after
the report returns, so a resumed run never holds two points for one epoch.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from components.augment.policy import PolicyDataset, build_policy
from components.config import to_dict
from components.data.canonical import read_info
from components.tasks import get_task
from components.tasks.base import all_gather_objects, all_reduce_mean
from components.training.optim import build_optimizer, build_scheduler
from components.training.spec import RunSpec

STATE_FILE = "state.pt"
BEST_MODEL_FILE = "best_model.pt"
HISTORY_FILE = "history.json"


class FaultDrill(RuntimeError):
    """Raised on purpose by ``training.failure.fail_at_epoch`` to exercise recovery."""


class _TrainSession:
    """The loop's view of Ray Train: one of the run's workers."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    def get_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint: ray.train.Checkpoint | None = None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


class _TrialSession:
    """The loop's view of a Ray Tune trial that trains in its own process (one worker): what
    Population Based Training needs, since it hands a trial another trial's checkpoint."""

    rank, world = 0, 1

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def get_checkpoint(self) -> ray.train.Checkpoint | None:
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint: ray.train.Checkpoint | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one worker of a distributed run."""
    _train(payload, _TrainSession())


def train_loop_in_trial(payload: dict[str, Any]) -> None:
    """The same loop inside a Ray Tune trial, without a Ray Train worker group."""
    _train(payload, _TrialSession())


def _train(payload: dict[str, Any], session: _TrainSession | _TrialSession) -> None:
    spec = RunSpec.from_payload(payload["spec"])
    cfg = spec.training
    rank, world, device = session.rank, session.world, session.device
    on_gpu = device.type == "cuda"
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    method = spec.create_method()
    task = get_task(method.task)
    root = _data_root(payload)
    info = read_info(root)

    seed_all(cfg.seed)  # same initial weights on every worker
    model = method.build(info)
    if payload.get("trunk_state") is not None:  # a pretrained trunk (checkpoints below override it)
        method.trunk(model).load_state_dict(payload["trunk_state"])
    if on_gpu and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    train_set = task.dataset(root, "train", train=True)
    policy = build_policy(cfg.augment, mask_fill=task.augment_mask_fill)
    if policy is not None:  # applied after the family's own transforms, to every training item
        train_set = PolicyDataset(train_set, policy)
    val_set = task.dataset(root, "val", train=False)
    per_worker = cfg.batch_size // world
    batch_sampler = task.train_batch_sampler(train_set, per_worker, rank, world, cfg.seed, method.cfg)
    if batch_sampler is not None:  # the family composes the batches (e.g. m samples per class)
        sampler = batch_sampler
        train_loader = DataLoader(
            train_set,
            batch_sampler=batch_sampler,
            num_workers=cfg.loader_workers,
            collate_fn=task.collate(),
            pin_memory=on_gpu,
        )
    else:
        sampler = DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        train_loader = DataLoader(
            train_set,
            batch_size=per_worker,
            sampler=sampler,
            num_workers=cfg.loader_workers,
            collate_fn=task.collate(),
            drop_last=True,
            pin_memory=on_gpu,
        )
    # Every worker scores a disjoint slice of the validation set (no padding duplicates);
    # the evaluator sums counts across workers, so the score is exact.
    val_loader = DataLoader(
        Subset(val_set, range(rank, len(val_set), world)),
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.loader_workers,
        collate_fn=task.collate(),
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{root}: the train split has {len(train_set)} samples, fewer than one global batch "
            f"({cfg.batch_size}); lower {spec.key}.training.batch_size"
        )

    optimizer = build_optimizer(core, cfg.optimizer, method.param_groups(core))
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs, len(train_loader))
    primary = f"val/{task.primary_metric}"
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if (on_gpu and cfg.amp) else None

    tracker = _RankZeroTracker(payload.get("mlflow"), rank)
    start_epoch, best, history, best_state = 0, None, [], None
    augment_schedule: list[dict[str, Any]] = []  # the policies this model was trained under, from which epoch
    restored = session.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
            history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
            if rank == 0:
                best_state = torch.load(Path(ckpt_dir) / BEST_MODEL_FILE, map_location="cpu", weights_only=True)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        augment_schedule = state.get("augment_schedule", [])
        _set_rng(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        tracker.backfill(history)
        tracker.tag("resumed_from_epoch", str(state["epoch"]))
    else:
        seed_all(cfg.seed + rank)

    # A trial of Population Based Training may resume another trial's checkpoint under a new
    # policy: the schedule that made the model is its lineage, kept in the checkpoint.
    current = to_dict(cfg.augment)
    if not augment_schedule or augment_schedule[-1]["augment"] != current:
        augment_schedule.append({"from_epoch": start_epoch, "augment": current})

    # epochs: 0 scores the initial (random) weights once, at epoch 0: a baseline row.
    for epoch in range(start_epoch, max(cfg.epochs, 1)):
        if cfg.failure.fail_at_epoch == epoch and restored is None:
            raise FaultDrill(f"fault drill: training.failure.fail_at_epoch={epoch} on a run not resumed yet")
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        if policy is not None:
            train_set.set_epoch(epoch, cfg.epochs)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        for batch in train_loader if cfg.epochs > 0 else ():
            batch = task.to_device(batch, device)
            with amp if amp is not None else contextlib.nullcontext():
                losses = method.training_step(model, batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach().float()
            steps += 1
        train_time = time.perf_counter() - t0
        metrics: dict[str, float] = {"epoch": float(epoch)}
        if steps:
            names = sorted(sums)
            reduced = all_reduce_mean(torch.stack([sums[n] for n in names]) / steps).cpu()
            metrics.update({f"train/{n}": float(v) for n, v in zip(names, reduced, strict=True)})
            metrics["train/loss"] = float(reduced.sum())
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            metrics["throughput/train_images_per_s"] = steps * cfg.batch_size / train_time
        metrics["time/train_epoch_s"] = train_time

        # Validation every `eval_every` epochs and always at the last; the best model is chosen
        # among the validated epochs.
        validate = (epoch + 1) % cfg.eval_every == 0 or epoch == max(cfg.epochs, 1) - 1
        sample, improved = None, False
        if validate:
            core.eval()
            evaluator = task.evaluator(info.num_classes)
            with torch.no_grad(), amp if amp is not None else contextlib.nullcontext():
                for batch in val_loader:
                    batch = task.to_device(batch, device)
                    predictions = method.predict(core, batch)
                    evaluator.update(predictions, batch)
                    if sample is None:
                        sample = (batch, predictions)
            metrics.update({f"val/{k}": v for k, v in evaluator.compute().items()})
            improved = best is None or (metrics[primary] > best if task.higher_is_better else metrics[primary] < best)
            if improved:
                best = metrics[primary]
        metrics["time/epoch_s"] = time.perf_counter() - t0
        if best is not None:
            metrics[f"best/{task.primary_metric}"] = best
        history.append(metrics)
        rng_states = _gather_rng()
        if rank == 0:
            if improved or best_state is None:
                best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
            with tempfile.TemporaryDirectory() as tmp:
                state = {
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": None,  # bf16 autocast needs no grad scaler
                    "epoch": epoch,
                    "best": best,
                    "rng": rng_states,
                    "augment_schedule": augment_schedule,
                }
                torch.save(state, Path(tmp) / STATE_FILE)
                torch.save(best_state, Path(tmp) / BEST_MODEL_FILE)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                session.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            tracker.log(metrics, step=epoch)
            if cfg.figures_every and sample is not None and (epoch + 1) % cfg.figures_every == 0:
                tracker.figure(task, sample, info.classes, f"val_predictions/epoch_{epoch:03d}.png")
        else:
            session.report(metrics)


def _data_root(payload: dict[str, Any]) -> Path:
    """The dataset on this node: with S3 storage the staged copy (downloaded once per node), so
    workers on machines without the driver's disk read the same data; otherwise the driver's folder."""
    if payload.get("data_uri"):
        from components.storage.cluster import local_dataset

        return local_dataset(payload["data_uri"], payload.get("s3_endpoint"))
    return Path(payload["data_root"])


EPOCH_KEY = "time/epoch_s"  # logged every epoch, validated or not


class _RankZeroTracker:
    """Logs to the driver's MLflow run from rank 0 only; a no-op elsewhere or without a run."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int) -> None:
        self.run_id = None
        self.logged: set[int] = set()  # epochs an earlier attempt already logged (see backfill)
        if mlflow_cfg and rank == 0:
            from mlflow import MlflowClient

            self.client = MlflowClient(mlflow_cfg["tracking_uri"], mlflow_cfg.get("registry_uri"))
            self.run_id = mlflow_cfg["run_id"]
            # An attempt after a failure (or a resumed stage) starts after epochs already logged.
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_KEY)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None or step in self.logged:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=items)
        self.logged.add(step)

    def figure(self, task, sample, classes: tuple[str, ...], artifact: str) -> None:
        """Draw ``sample`` (a validation batch and its predictions) and log it as ``artifact``."""
        if self.run_id is None:
            return
        folder, name = artifact.rsplit("/", 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            task.sample_figure(task.to_device(sample, torch.device("cpu")), classes, path)
            self.client.log_artifact(self.run_id, str(path), folder)

    def tag(self, key: str, value: str) -> None:
        if self.run_id is not None:
            self.client.set_tag(self.run_id, key, value)

    def backfill(self, history: list[dict[str, float]]) -> None:
        """After a restart: log the checkpointed epochs that did not reach MLflow before the crash.

        The other way round, an epoch can be logged but not be the checkpoint restored (a worker
        lost after rank 0 logged it, before Ray Train took that checkpoint as the latest): the run
        goes back and trains it again from the previous checkpoint, and ``log`` leaves its second
        pass out, so every epoch has one point (the replay, from the restored RNG states, gives
        the same values)."""
        if self.run_id is None:
            return
        for metrics in history:
            if int(metrics["epoch"]) not in self.logged:
                self.log(metrics, step=int(metrics["epoch"]))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng() -> list[dict[str, Any]]:
    """Every worker's RNG state, in rank order (so each resumes with its own)."""
    return all_gather_objects(_get_rng())
