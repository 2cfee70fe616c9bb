"""The one builder of Ray Train's ``TorchTrainer``, for runs and for Tune trials alike, so both
get the same scaling (workers, GPUs, accelerator type), retries and checkpoint retention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from components.storage.cluster import RayStorage
from components.training.spec import TrainingConfig


def worker_resources(training: TrainingConfig) -> dict[str, float]:
    scaling = training.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return resources


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    training: TrainingConfig,
    name: str,
    storage: RayStorage,
    callbacks: list[Any] | None = None,
):
    """A ``TorchTrainer`` running ``loop(loop_config)`` on ``training.scaling``'s workers; ``name``
    is the Ray Train run (the same name again resumes it from its last checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = training.scaling
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=worker_resources(training),
            accelerator_type=scaling.accelerator_type,
        ),
        run_config=RunConfig(
            name=name,
            **storage.run_config_args(),
            # A worker group that cannot start is not retried by the controller without end:
            # components.training.resources.fit_within_wait decides after one bounded wait.
            failure_config=FailureConfig(max_failures=training.failure.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=training.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
