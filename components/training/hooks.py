"""The trainer's hooks: everything a run does besides its training steps.

A hook overrides any of ``before_train``, ``before_epoch``, ``step_context``, ``after_epoch`` and
``after_train``; the trainer calls every hook at every event in list order. The order of
:func:`default_hooks`, and why:

1. :class:`Resume` restores the last checkpoint (weights, optimiser, scheduler, epoch, best,
   history, this worker's RNG, the policy lineage, the ledger) before anything reads that state;
   a fresh run seeds each worker apart instead.
2. :class:`PolicyLineage` appends the policy now in force to the restored lineage (Population
   Based Training resumes another trial's checkpoint under a new policy) and advances a
   scheduled policy each epoch.
3. :class:`FaultDrill` raises at ``training.failure.fail_at_epoch`` on an attempt that has not
   resumed, before the epoch trains.
4. :class:`Evaluation` validates on schedule and keeps the best weights (rank 0).
5. :class:`ComputeLedger` counts one real step's FLOPs, the steps, peak memory and the host's
   matmul peak (a GEMM probe before the first epoch).
6. :class:`Checkpoint` closes the epoch (its time, the history) and reports it to Ray with a
   checkpoint from rank 0: after evaluation and the ledger, so the checkpoint holds both.
7. :class:`MlflowLogger` logs the epoch from rank 0, after the report returns, so an attempt
   that dies before its checkpoint counts never leaves a second point for one epoch.
8. :class:`Figures` logs a PNG of validation predictions every ``figures_every`` epochs.
9. :class:`Progress` prints one plain line per epoch (losses, the primary metric, s/epoch, ETA).
10. :class:`TestScore` (runs only, not Tune trials), after the last epoch: the best weights
    scored on the test split on the workers' devices, reported with a last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.config import to_dict
from components.tasks.base import all_gather_objects, all_reduce_sum, broadcast_object
from components.training import ledger
from components.training.evaluation import eval_loader_for, evaluate
from components.training.rng import gather_rng, seed_all, set_rng

if TYPE_CHECKING:
    from components.training.trainer import Trainer

STATE_FILE = "state.pt"
BEST_MODEL_FILE = "best_model.pt"
HISTORY_FILE = "history.json"
LEDGER_FILE = "ledger.json"
TEST_FILE = "test.json"  # the test scores, in the last checkpoint of a run
TEST_SAMPLE_FILE = "test_sample.pt"  # a test batch and its predictions, for the figure
EPOCH_KEY = "time/epoch_s"  # logged every epoch, validated or not


class FaultDrillError(RuntimeError):
    """Raised on purpose by ``training.failure.fail_at_epoch`` to exercise recovery."""


class Hook:
    def before_train(self, t: Trainer) -> None: ...

    def before_epoch(self, t: Trainer) -> None: ...

    def step_context(self, t: Trainer) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_epoch(self, t: Trainer) -> None: ...

    def after_train(self, t: Trainer) -> None: ...


class Resume(Hook):
    def before_train(self, t: Trainer) -> None:
        restored = t.session.get_checkpoint()
        if restored is None:
            seed_all(t.cfg.seed + t.rank)
            return
        with restored.as_directory() as ckpt_dir:
            folder = Path(ckpt_dir)
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            t.history = json.loads((folder / HISTORY_FILE).read_text())
            if t.rank == 0:
                t.best_state = torch.load(folder / BEST_MODEL_FILE, map_location="cpu", weights_only=True)
            if (folder / LEDGER_FILE).is_file():
                t.ledger = json.loads((folder / LEDGER_FILE).read_text())
        t.core.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        t.start_epoch, t.best, t.resumed_from = state["epoch"] + 1, state["best"], state["epoch"]
        t.augment_schedule = state.get("augment_schedule", [])
        if t.scaler is not None and state.get("scaler"):
            t.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        set_rng(rng[t.rank] if t.rank < len(rng) else rng[0], t.device)


class PolicyLineage(Hook):
    """The policies a model was trained under, from which epoch: a PBA schedule's lineage."""

    def __init__(self, policy_dataset: Any | None) -> None:
        self.dataset = policy_dataset  # a PolicyDataset, or None without a policy

    def before_train(self, t: Trainer) -> None:
        current = to_dict(t.cfg.augment)
        if not t.augment_schedule or t.augment_schedule[-1]["augment"] != current:
            t.augment_schedule.append({"from_epoch": t.start_epoch, "augment": current})

    def before_epoch(self, t: Trainer) -> None:
        if self.dataset is not None:
            self.dataset.set_epoch(t.epoch, t.cfg.epochs)


class FaultDrill(Hook):
    def before_epoch(self, t: Trainer) -> None:
        if t.cfg.failure.fail_at_epoch == t.epoch and t.resumed_from is None:
            raise FaultDrillError(f"fault drill: training.failure.fail_at_epoch={t.epoch} on a run not resumed yet")


class Evaluation(Hook):
    """Validation every ``eval_every`` epochs and at the last; the best model among those."""

    def after_epoch(self, t: Trainer) -> None:
        t.improved, t.sample = False, None
        if (t.epoch + 1) % t.cfg.eval_every == 0 or t.epoch == t.total_epochs - 1:
            t0 = time.perf_counter()
            scores, t.sample = evaluate(t.method, t.task, t.core, t.val_loader, t.info.num_classes, t.device)
            t.metrics.update({f"val/{k}": v for k, v in scores.items()})
            t.metrics["time/eval_s"] = time.perf_counter() - t0
            value = t.metrics[f"val/{t.task.primary_metric}"]
            t.improved = t.best is None or (value > t.best if t.task.higher_is_better else value < t.best)
            if t.improved:
                t.best = value
        if t.best is not None:
            t.metrics[f"best/{t.task.primary_metric}"] = t.best
        if t.rank == 0 and (t.improved or t.best_state is None):
            t.best_state = {k: v.detach().cpu().clone() for k, v in t.core.state_dict().items()}


class ComputeLedger(Hook):
    """Running totals of what the run cost: training FLOPs (one real step counted, times the
    steps, over all workers), each worker's peak memory and the host's matmul peak."""

    def __init__(self) -> None:
        self.counter = ledger.StepFlops()
        self.global_step_flops: float | None = None

    def before_train(self, t: Trainer) -> None:
        if t.rank == 0:  # once per host and dtype (cached); the other workers wait, so it runs alone
            dtype = t.amp_dtype() or torch.float32
            t.ledger["peak_flops_per_s"] = ledger.matmul_peak_flops(t.device, dtype, torch.get_num_threads())
        all_reduce_sum(torch.zeros(1, device=t.device))
        t.ledger.setdefault("train_flops", 0.0)

    def step_context(self, t: Trainer) -> contextlib.AbstractContextManager:
        return self.counter.measure()

    def after_epoch(self, t: Trainer) -> None:
        if self.global_step_flops is None and t.steps:
            local = torch.tensor([float(self.counter.flops or 0)], dtype=torch.float64, device=t.device)
            self.global_step_flops = float(all_reduce_sum(local).item())
        t.ledger["train_flops"] += (self.global_step_flops or 0.0) * t.steps
        memory = all_gather_objects(ledger.peak_memory_bytes(t.device))
        before = t.ledger.get("peak_memory_bytes") or [0] * len(memory)
        t.ledger["peak_memory_bytes"] = [max(a, b) for a, b in zip(before, memory, strict=False)]


class Checkpoint(Hook):
    """Closes the epoch and reports it to Ray; rank 0 attaches the checkpoint."""

    def after_epoch(self, t: Trainer) -> None:
        t.metrics[EPOCH_KEY] = time.perf_counter() - t.epoch_start
        t.history.append(t.metrics)
        report(t, t.metrics, gather_rng(t.device))


def report(t: Trainer, metrics: dict[str, float], rng_states: list, extra: dict[str, Any] | None = None) -> None:
    """Every worker reports ``metrics`` to Ray; rank 0 with a checkpoint of the whole state and
    ``extra`` files (name: JSON-able value, or tensors saved with torch)."""
    if t.rank != 0:
        t.session.report(metrics)
        return
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        state = {
            "model": t.core.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler is not None else None,
            "epoch": t.epoch,
            "best": t.best,
            "rng": rng_states,
            "augment_schedule": t.augment_schedule,
        }
        torch.save(state, Path(tmp) / STATE_FILE)
        torch.save(t.best_state, Path(tmp) / BEST_MODEL_FILE)
        (Path(tmp) / HISTORY_FILE).write_text(json.dumps(t.history))
        (Path(tmp) / LEDGER_FILE).write_text(json.dumps(t.ledger))
        for name, value in (extra or {}).items():
            if name.endswith(".json"):
                (Path(tmp) / name).write_text(json.dumps(value))
            else:
                torch.save(value, Path(tmp) / name)
        t.session.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _plain(obj: Any) -> Any:
    """``obj`` with tensor subclasses (torchvision's ``tv_tensors``) as plain tensors, so the
    driver can read it back with ``torch.load(weights_only=True)``."""
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(torch.Tensor)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


class TestScore(Hook):
    """After the last epoch, the best validated weights scored on the test split where training
    ran: each worker scores a disjoint slice on its own device (the GPUs, not a cluster's head
    node) and the evaluator sums across workers, as in validation. Rank 0 reports the scores and
    a sample batch with a last checkpoint, which the driver reads. Runs only (not Tune trials)."""

    def after_train(self, t: Trainer) -> None:
        best = broadcast_object(t.best_state if t.rank == 0 else None)
        rng_states = gather_rng(t.device)
        last = {k: v.detach().cpu().clone() for k, v in t.core.state_dict().items()}
        t.core.load_state_dict(best)
        t0 = time.perf_counter()
        loader = eval_loader_for(t.task, t.info, "test", t.cfg, t.rank, t.world, t.device)
        scores, sample = evaluate(t.method, t.task, t.core, loader, t.info.num_classes, t.device)
        t.ledger["test_eval_s"] = time.perf_counter() - t0
        t.core.load_state_dict(last)  # the checkpoint keeps the last epoch's weights, as before
        metrics = {"epoch": float(t.epoch), **{f"test/{k}": v for k, v in scores.items()}}
        cpu_sample = _plain(t.task.to_device(sample, torch.device("cpu"))) if sample is not None else None
        report(t, metrics, rng_states, {TEST_FILE: scores, TEST_SAMPLE_FILE: cpu_sample})


class MlflowLogger(Hook):
    """Logs to the driver's MLflow run from rank 0 only; a no-op elsewhere or without a run.

    An attempt after a failure (or a resumed stage) starts after epochs already logged: those
    are read first, the checkpointed epochs that never reached MLflow are logged, and an epoch
    that was logged but not checkpointed (a worker lost after rank 0 logged it, before Ray Train
    took its checkpoint) is trained again and its second pass left out, so every epoch has one
    point (the replay, from the restored RNG states, gives the same values)."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int) -> None:
        self.client, self.run_id, self.logged = None, None, set()
        if mlflow_cfg and rank == 0:
            from mlflow import MlflowClient

            self.client = MlflowClient(mlflow_cfg["tracking_uri"], mlflow_cfg.get("registry_uri"))
            self.run_id = mlflow_cfg["run_id"]
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_KEY)}

    def before_train(self, t: Trainer) -> None:
        if self.run_id is None or t.resumed_from is None:
            return
        for metrics in t.history:
            self.log(metrics, step=int(metrics["epoch"]))
        self.client.set_tag(self.run_id, "resumed_from_epoch", str(t.resumed_from))

    def after_epoch(self, t: Trainer) -> None:
        self.log(t.metrics, step=t.epoch)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None or step in self.logged:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=items)
        self.logged.add(step)


class Figures(Hook):
    def __init__(self, logger: MlflowLogger, every: int) -> None:
        self.logger, self.every = logger, every

    def after_epoch(self, t: Trainer) -> None:
        if self.logger.run_id is None or not self.every or t.sample is None or (t.epoch + 1) % self.every:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"epoch_{t.epoch:03d}.png"
            t.task.sample_figure(t.task.to_device(t.sample, torch.device("cpu")), t.info.classes, path)
            self.logger.client.log_artifact(self.logger.run_id, str(path), "val_predictions")


class Progress(Hook):
    """One plain line per epoch from rank 0, readable in a DVC log, a Ray job log and a terminal."""

    def __init__(self, name: str, stream: Any = None) -> None:
        self.name, self.stream, self.durations = name, stream, []

    def after_epoch(self, t: Trainer) -> None:
        self.durations.append(t.metrics.get(EPOCH_KEY, time.perf_counter() - t.epoch_start))
        if t.rank != 0:
            return
        remaining = (t.total_epochs - t.epoch - 1) * sum(self.durations) / len(self.durations)
        line = progress_line(
            self.name, t.epoch, t.total_epochs, t.metrics, t.task.primary_metric, self.durations[-1], remaining
        )
        # Written, not printed: Ray Train replaces print in its workers with one that logs the
        # message and, when stdout is wrapped (it is, in a Ray worker), prints it too: two lines.
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


def progress_line(
    name: str, epoch: int, epochs: int, metrics: dict[str, float], primary: str, seconds: float, eta_s: float
) -> str:
    """``run epoch k/N | loss 0.51 (cls 0.40, box 0.11) | val/top1 0.912 | 2.3 s/epoch | ETA 1m02s``."""
    parts = [f"{name} epoch {epoch + 1}/{epochs}"]
    terms = sorted(k for k in metrics if k.startswith("train/") and k != "train/loss")
    if "train/loss" in metrics:
        detail = ", ".join(f"{k.removeprefix('train/')} {metrics[k]:.4f}" for k in terms)
        parts.append(f"loss {metrics['train/loss']:.4f}" + (f" ({detail})" if len(terms) > 1 else ""))
    if f"val/{primary}" in metrics:
        parts.append(f"val/{primary} {metrics[f'val/{primary}']:.4f}")
    parts.append(f"{seconds:.1f} s/epoch")
    parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def default_hooks(
    name: str,
    mlflow_cfg: dict[str, str] | None,
    rank: int,
    policy_dataset: Any | None,
    figures_every: int,
    score_test: bool = False,
):
    """The hooks of a run, in the order documented above (``score_test``: a run, not a trial)."""
    logger = MlflowLogger(mlflow_cfg, rank)
    return [
        Resume(),
        PolicyLineage(policy_dataset),
        FaultDrill(),
        Evaluation(),
        ComputeLedger(),
        Checkpoint(),
        logger,
        Figures(logger, figures_every),
        Progress(name),
        *([TestScore()] if score_test else []),
    ]
