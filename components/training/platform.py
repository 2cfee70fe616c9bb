"""Where runs execute and what they talk to: the ``ray``, ``mlflow`` and ``storage`` params,
the local or cluster Ray, and how workers find the dataset and write checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import from_dict
from components.data.canonical import DatasetInfo
from components.storage import DvcRemoteParams
from components.storage.cluster import RayStorage, ray_storage, stage_dataset
from components.tracking import mlflow_run as tracking
from components.training.local_ray import python_signal_handlers_kept, start_local_ray

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


def ray_address(cfg: RayParams) -> str | None:
    """The cluster a run goes to, or None for a local Ray on this machine."""
    return os.environ.get("RAY_ADDRESS") or cfg.address


def init_ray(cfg: RayParams) -> None:
    """Join the cluster (``RAY_ADDRESS`` or ``ray.address``: a cluster, or the one Ray that
    ``pipelines.repro`` started for every stage), or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # Ray's usage stats stay off unless params opt in; a value the user set is respected.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "1" if cfg.usage_stats else "0")
    address = ray_address(cfg)
    if address:
        with python_signal_handlers_kept():  # SIGTERM still ends the MLflow run FAILED
            ray.init(address=address, log_to_driver=True)
        return
    start_local_ray(cfg.num_cpus, dashboard=cfg.dashboard, project_root=PROJECT_ROOT,
                    poll_interval_s=cfg.train_poll_interval_s, usage_stats=cfg.usage_stats)  # fmt: skip


def storage_for(cfg: StorageParams) -> RayStorage:
    """Where checkpoints go: ``CVFLOW_STORAGE_PATH`` or ``storage.path``, with the S3 endpoint."""
    return ray_storage(os.environ.get("CVFLOW_STORAGE_PATH") or cfg.path, cfg.s3_endpoint_url)


def data_payload(info: DatasetInfo, storage: RayStorage) -> dict[str, str | None]:
    """How workers find the dataset: the local folder, and with S3 storage its staged copy."""
    staged = stage_dataset(info.root, info.name, info.checksum, storage)
    return {"data_root": str(Path(info.root).resolve()), "data_uri": staged, "s3_endpoint": storage.endpoint_url}
