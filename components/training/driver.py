"""The driver side of a training run: Ray Train ``TorchTrainer`` + the MLflow run around it.

The driver owns the MLflow run: it creates it (or reopens an unfinished one with the same
fingerprint, whose Ray Train storage then resumes from its last checkpoint), lets rank 0 of the
workers log per-epoch metrics into it, then scores the best checkpoint on the test split,
logs and registers the model, and ends the run FINISHED, or FAILED with the error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from components.config import from_dict
from components.data.canonical import MANIFEST, DatasetInfo, read_info
from components.data.card import CARD
from components.models.pretrained import PRETRAINED_ROOT, load_trunk
from components.storage import DvcRemoteParams
from components.storage.cluster import RayStorage, ray_storage, stage_dataset
from components.tasks import get_task
from components.tracking import figures
from components.tracking import mlflow_run as tracking
from components.training.loop import BEST_MODEL_FILE, HISTORY_FILE, train_loop_per_worker
from components.training.spec import RunSpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RayParams:
    """``ray`` in params.yaml; ``RAY_ADDRESS`` in the environment wins over ``address``."""

    address: str | None = None  # None: start a local Ray on this machine
    num_cpus: int | None = None  # local Ray only; None: all cores
    usage_stats: bool = False  # Ray's usage stats collection; off unless a user opts in
    dashboard: bool = True  # local Ray only, bound to 127.0.0.1; Ray Train's state API needs it
    train_poll_interval_s: float = 0.25  # local Ray only: how often Ray Train's controller polls workers


@dataclass
class StorageParams:
    """``storage`` in params.yaml; ``CVFLOW_STORAGE_PATH`` in the environment wins over ``path``."""

    path: str = "ray_results"  # Ray Train checkpoints and results: a folder (or a URI Ray accepts)
    s3_endpoint_url: str | None = None  # an S3-compatible server; AWS_ENDPOINT_URL(_S3) wins
    dvc_remote: DvcRemoteParams = field(default_factory=DvcRemoteParams)


@dataclass
class Platform:
    ray: RayParams = field(default_factory=RayParams)
    mlflow: tracking.MlflowParams = field(default_factory=tracking.MlflowParams)
    storage: StorageParams = field(default_factory=StorageParams)


def load_platform(params: dict[str, Any], source: str = "params.yaml") -> Platform:
    picked = {k: params[k] for k in ("ray", "mlflow", "storage") if k in params}
    return from_dict(Platform, picked, source=source)


def init_ray(cfg: RayParams) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray's usage stats stay off unless params opt in; a value the user set is respected.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "1" if cfg.usage_stats else "0")
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    # Ray Train's controller polls its workers every 2 s by default: seconds of idle start-up and
    # shutdown in every short CPU run. Processes of a local Ray inherit this environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(cfg.train_poll_interval_s))
    pythonpath = os.environ.get("PYTHONPATH")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        # Workers of a local Ray import the project from this checkout.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), pythonpath]))}},
    )


def storage_for(cfg: StorageParams) -> RayStorage:
    """Where checkpoints go: ``CVFLOW_STORAGE_PATH`` or ``storage.path``, with the S3 endpoint."""
    return ray_storage(os.environ.get("CVFLOW_STORAGE_PATH") or cfg.path, cfg.s3_endpoint_url)


def data_payload(info: DatasetInfo, storage: RayStorage) -> dict[str, str | None]:
    """How workers find the dataset: the local folder, and with S3 storage its staged copy."""
    staged = stage_dataset(info.root, info.name, info.checksum, storage)
    return {"data_root": str(Path(info.root).resolve()), "data_uri": staged, "s3_endpoint": storage.endpoint_url}


@dataclass
class RunOutcome:
    run_id: str
    resumed: bool
    test_metrics: dict[str, float]
    best_val: float
    model_version: str | None
    champion: bool
    history: list[dict[str, float]]


def train(
    spec: RunSpec,
    platform: Platform,
    data_root: str | Path,
    model_dir: str | Path,
    results_dir: str | Path,
    pretrained_root: str | Path = PRETRAINED_ROOT,
    tags: dict[str, str] | None = None,
) -> RunOutcome:
    """Train ``spec`` on Ray Train, tracked in MLflow; write the model and metrics files.

    A run whose backbone names a ``pretrain`` entry starts from the trunk saved under
    ``pretrained_root``; pretrain entries themselves are not registered as models. ``tags`` are
    added to the run's lineage tags (e.g. the search that chose its hyperparameters)."""
    import mlflow

    tracking.apply_privacy_defaults(platform.mlflow.telemetry)
    info = read_info(data_root)
    method = spec.create_method()
    task = get_task(method.task)
    resolved = spec.resolved()
    trunk_state, trunk_checksum = None, None
    backbone = method.pretrained_trunk()
    if backbone is not None:
        trunk_state, trunk_checksum = load_trunk(
            pretrained_root, backbone, source=spec.source, key=f"{spec.key}.config.backbone.pretrained"
        )
    fingerprint = spec.fingerprint(info.checksum, trunk_checksum)
    drill = resolved["training"]["failure"].pop("fail_at_epoch")

    uri = tracking.resolve_tracking_uri(platform.mlflow)
    mlflow.set_tracking_uri(uri)
    if platform.mlflow.registry_uri:
        mlflow.set_registry_uri(platform.mlflow.registry_uri)
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment(tracking.experiment_name(spec.dataset, method.task))
    resume_id = tracking.find_resumable_run(client, experiment.experiment_id, fingerprint)

    with mlflow.start_run(run_id=resume_id, experiment_id=experiment.experiment_id, run_name=spec.name) as run:
        run_id = run.info.run_id
        mlflow.set_tags(
            {
                "method": spec.method,
                "task": method.task,
                "dataset": spec.dataset,
                "run": spec.name,
                "stage": "pretrain" if spec.section == "pretrain" else "train",
                "paper": f"arXiv:{method.paper}",
                "git_commit": tracking.git_commit(PROJECT_ROOT),
                "data_checksum": info.checksum,
                "fingerprint": fingerprint,
                "fault_drill_epoch": str(drill),
                **({"pretrained_checksum": trunk_checksum} if trunk_checksum else {}),
                **(tags or {}),
            }
        )
        if resume_id is None:
            tracking.log_params(client, run_id, resolved)
        mlflow.log_text(yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
        for card in (MANIFEST, CARD):  # the dataset card: what the numbers were computed on
            if (Path(info.root) / card).is_file():
                mlflow.log_artifact(str(Path(info.root) / card), "dataset")

        try:
            mlflow_payload = {"tracking_uri": uri, "registry_uri": platform.mlflow.registry_uri, "run_id": run_id}
            if spec.training.epochs == 0:  # a baseline of the initial weights: nothing to distribute
                best_state, history = _score_initial_weights(spec, method, task, info, trunk_state)
            else:
                result = fit(spec, platform, info, f"{spec.name}-{run_id[:12]}", mlflow_payload, trunk_state)
                with result.checkpoint.as_directory() as ckpt_dir:
                    best_state = torch.load(Path(ckpt_dir) / BEST_MODEL_FILE, map_location="cpu", weights_only=True)
                    history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
            outcome = _finish(
                spec, platform, client, method, task, info, resolved, best_state, history, model_dir, results_dir
            )
        except BaseException as exc:  # also SystemExit from SIGTERM (`ray job stop`, a pod's eviction)
            # The run ends FAILED (start_run's context); say why where the run is looked at.
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
    return RunOutcome(run_id, resume_id is not None, **outcome)


def _score_initial_weights(spec, method, task, info, trunk_state) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``epochs: 0``: the weights every worker of the loop would start from, scored on the
    validation split as the loop's epoch 0 and logged to the active run."""
    import time

    import mlflow

    from components.training.loop import seed_all

    t0 = time.perf_counter()
    seed_all(spec.training.seed)
    model = method.build(info)
    if trunk_state is not None:
        method.trunk(model).load_state_dict(trunk_state)
    model.eval()
    scores, _ = _evaluate(method, task, model, info, "val")
    metrics = {f"val/{k}": v for k, v in scores.items()}
    metrics[f"best/{task.primary_metric}"] = metrics[f"val/{task.primary_metric}"]
    metrics["time/epoch_s"] = time.perf_counter() - t0
    mlflow.log_metrics(metrics, step=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [{"epoch": 0.0, **metrics}]


def _finish(
    spec, platform, client, method, task, info, resolved, best_state, history, model_dir, results_dir
) -> dict[str, Any]:
    """Score the best weights on the test split; write, log and register what the run made."""
    import mlflow

    model = method.build(info)
    model.load_state_dict(best_state)
    model.eval()
    test_metrics, sample = _evaluate(method, task, model, info, "test")
    test_metrics = {f"test/{k}": v for k, v in test_metrics.items()}
    mlflow.log_metrics(test_metrics, step=spec.training.epochs)
    best_val = history[-1][f"best/{task.primary_metric}"]

    model_dir, results_dir = Path(model_dir), Path(results_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, model_dir / "model.pt")
    (model_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    summary = {
        "run": spec.name,
        "method": spec.method,
        "mlflow_run_id": mlflow.active_run().info.run_id,
        f"best_val/{task.primary_metric}": best_val,
        **test_metrics,
        "epochs": len(history),
    }
    (results_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_history_csv(history, results_dir / "history.csv")
    figures.training_curves(history, results_dir / "curves.png")
    task.sample_figure(sample, info.classes, results_dir / "test_predictions.png")
    for name in ("metrics.json", "history.csv", "curves.png", "test_predictions.png"):
        mlflow.log_artifact(str(results_dir / name))

    version, champion = None, False
    # Pretrain entries and untrained baselines (epochs: 0) are compared, not deployed.
    if platform.mlflow.register_models and spec.section == "runs" and spec.training.epochs > 0:
        version, champion = _log_and_register(
            client, method, model, info, spec.dataset, f"val/{task.primary_metric}", best_val, task, platform
        )
    return {
        "test_metrics": test_metrics,
        "best_val": best_val,
        "model_version": version,
        "champion": champion,
        "history": history,
    }


def fit(
    spec: RunSpec,
    platform: Platform,
    info: DatasetInfo,
    ray_name: str,
    mlflow_payload: dict | None = None,
    trunk_state: dict[str, torch.Tensor] | None = None,
):
    """Run the generic loop on a Ray Train worker group; rank 0 logs to ``mlflow_payload``'s run;
    ``trunk_state`` initialises the model's trunk on every worker."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(platform.ray)
    storage = storage_for(platform.storage)
    scaling = spec.training.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.to_payload(),
            **data_payload(info, storage),
            "mlflow": mlflow_payload,
            "trunk_state": trunk_state,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            accelerator_type=scaling.accelerator_type,
        ),
        run_config=RunConfig(
            name=ray_name,
            **storage.run_config_args(),
            failure_config=FailureConfig(max_failures=spec.training.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.training.checkpoints_to_keep),
        ),
    )
    return trainer.fit()


@torch.no_grad()
def _evaluate(method, task, model, info: DatasetInfo, split: str) -> tuple[dict[str, float], Any]:
    loader = torch.utils.data.DataLoader(
        task.dataset(info.root, split, train=False), batch_size=256, collate_fn=task.collate()
    )
    evaluator = task.evaluator(info.num_classes)
    sample = None
    for batch in loader:
        predictions = method.predict(model, batch)
        evaluator.update(predictions, batch)
        if sample is None:
            sample = (batch, predictions)
    return evaluator.compute(), sample


def _log_and_register(client, method, model, info, dataset, metric_key, value, task, platform):
    import mlflow
    from mlflow.models import infer_signature

    example = method.example_input(info)
    with torch.no_grad():
        output = model(example)
    if isinstance(output, (list, tuple)):  # detectors: one dict of tensors per image
        output = output[0]
    output = {k: v.numpy() for k, v in output.items()} if isinstance(output, dict) else output.numpy()
    name = tracking.registered_model_name(dataset, method.name)
    logged = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example.numpy(), output),
        registered_model_name=name,
        # Pickled with the project's code beside it: every method's model loads the same way,
        # including those torch.export cannot trace.
        serialization_format="pickle",
        code_paths=[str(PROJECT_ROOT / "components")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    version = str(logged.registered_model_version)
    champion = tracking.update_champion(
        client, name, version, metric_key, value, task.higher_is_better, platform.mlflow.champion_alias
    )
    return version, champion


def _write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in history]
    path.write_text("\n".join(lines) + "\n")
