"""MLflow conventions: where runs go, what they are tagged with, and how models are registered.

- experiment per dataset and task family: ``<dataset>/<task>``;
- one run per training run (``runs.<name>`` in params), named after it;
- lineage tags: method, task, dataset, stage, git commit, prepared data checksum, fingerprint;
- the model registered as ``<dataset>-<method>``; the version with the best primary metric
  carries the alias ``champion``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import flatten

CHAMPION = "champion"
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|api[_-]?key|access[_-]?key|auth)", re.I)
REDACTED = "<redacted>"
GIT_COMMIT_ENV = "CVFLOW_GIT_COMMIT"
RUN_KIND = "run_kind"  # group (an entry), seed (one seed of it), search, trial, compare
GROUP_FINGERPRINT = "group_fingerprint"  # the commit, where the checkout has no .git (a Ray job's copy)


@dataclass
class MlflowParams:
    """``mlflow`` in params.yaml; ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking_uri``."""

    tracking_uri: str = "sqlite:///mlflow.db"
    registry_uri: str | None = None
    telemetry: bool = False  # MLflow's usage telemetry; off unless a user opts in
    register_models: bool = True
    champion_alias: str = CHAMPION
    # MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of the driver's machine,
    # sampled every 10 s into each run: off by default, since they add a thread and many points.
    system_metrics: bool = False


def resolve_tracking_uri(cfg: MlflowParams, base_dir: str | Path = ".") -> str:
    """The tracking URI to use; a relative ``sqlite:///`` path is made absolute so Ray workers
    (which run in other directories) write to the same database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((Path(base_dir) / uri[len(prefix) :]).resolve())
    return uri


SQLITE_PREFIX = "sqlite:///"
_READY_STORES: set[str] = set()  # URIs whose tables this process has made sure of


def store_lock_path(db_path: str | Path) -> Path:
    """The lock file that serialises creating the tables of the SQLite database at ``db_path``:
    one per database, in the temp folder (the database's own folder may be shared or synced).
    It is left in place: removing a lock file another process may be about to take is a race."""
    digest = hashlib.sha256(str(Path(db_path).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"cvflow-mlflow-{digest}.lock"


def ready_store(uri: str) -> None:
    """Create the tables of a ``sqlite:///`` store, one process at a time. MLflow's tracking and
    registry stores migrate a new database without a lock, so stages that start together on a
    fresh ``mlflow.db`` fail (``table _alembic_tmp_experiments already exists``). The stores are
    MLflow's own, cached per URI, so the client that follows reuses them. Other stores (a server,
    a database server) handle their own schema and are left alone; once per URI and process."""
    path = uri[len(SQLITE_PREFIX) :].split("?", 1)[0] if uri.startswith(SQLITE_PREFIX) else ""
    if uri in _READY_STORES or path in ("", ":memory:"):
        return
    import fcntl

    # MLflow's store modules take ~1 s to import: before the lock, not while others wait on it
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with open(store_lock_path(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            tracking_utils._get_store(uri)
            registry_utils._get_store(uri, uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(uri)


def use_tracking(cfg: MlflowParams) -> str:
    """Point MLflow at the configured tracking store (and registry, if one is set), its tables
    made sure of first (:func:`ready_store`); the tracking URI."""
    import mlflow

    uri = resolve_tracking_uri(cfg)
    ready_store(uri)
    mlflow.set_tracking_uri(uri)
    if cfg.registry_uri:
        ready_store(cfg.registry_uri)
        mlflow.set_registry_uri(cfg.registry_uri)
    return uri


def apply_privacy_defaults(telemetry: bool) -> None:
    """Switch off MLflow's usage telemetry unless params opt in; a value already set in the
    environment by the user is respected."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "false" if telemetry else "true")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``ray job stop``, a pod eviction, ``kill``) into ``SystemExit`` in the main
    thread, so ``with mlflow.start_run()`` ends the run FAILED with the reason instead of the
    process vanishing and leaving it RUNNING. The next ``dvc repro`` reopens the run and resumes."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(f"terminated by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _exit)


def experiment_name(dataset: str, task: str) -> str:
    return f"{dataset}/{task}"


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow's kind for model training


def use_experiment(name: str):
    """``mlflow.set_experiment(name)``, its kind recorded as model training. The kind is for
    readers of the store; the 3.17 UI does not read it to pick a landing page (it takes that
    from the address, ``workflowType``, or the browser's last toggle: :func:`runs_view_url`)."""
    import mlflow

    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment


# MLflow 3.17's UI opens every experiment on its GenAI overview unless the URL (or the browser's
# toggle) says otherwise, and shows no metric column until one is picked. A shared view state,
# an experiment tag the runs page reads for ``viewStateShareKey=<key>``, opens the runs table with
# the columns that compare methods: the group runs' means and 95% intervals.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "seeds"
AGGREGATE_STATS = ("mean", "ci_low", "ci_high", "n")


def runs_view(primary_metrics: list[str]) -> dict[str, Any]:
    """The runs table's state: the datasets column, then for each metric its group aggregates
    (``test/<m>_mean``, ``_ci_low``, ``_ci_high``, ``_n``) and the best validation mean; sorted by
    the first metric's mean, best first."""
    columns = ["attributes.`Dataset`"]
    for metric in primary_metrics:
        columns += [f"metrics.`test/{metric}_{stat}`" for stat in AGGREGATE_STATS]
        columns.append(f"metrics.`best/{metric}_mean`")
    return {
        "searchFilter": "",
        "orderByKey": f"metrics.`test/{primary_metrics[0]}_mean`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "runsExpanded": {},
    }


def save_runs_view(client, experiment_id: str, primary_metrics: list[str]) -> None:
    """Store :func:`runs_view` on the experiment (unchanged ones are not rewritten)."""
    value = json.dumps(runs_view(primary_metrics), sort_keys=True)
    if client.get_experiment(experiment_id).tags.get(VIEW_TAG_PREFIX + VIEW_KEY) != value:
        client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, value)


def runs_view_url(ui: str, experiment_id: str) -> str:
    """Where the MLflow UI at ``ui`` opens an experiment on its runs, in the saved view."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def registered_model_name(dataset: str, method: str) -> str:
    return f"{dataset}-{method}"


def is_secret_key(name: str) -> bool:
    """Whether a parameter or variable name looks like it holds a credential."""
    return bool(_SECRET_KEY.search(name))


def git_commit(cwd: str | Path = ".") -> str:
    """The checked-out commit (``+dirty`` when tracked files changed); outside git, the commit
    in ``CVFLOW_GIT_COMMIT`` (set for a Ray job by its submitter), else ``unknown``."""
    if not (Path(cwd) / ".git").exists() and os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Flattened params with values of secret-looking keys replaced."""
    return {k: (REDACTED if is_secret_key(k) else v) for k, v in flatten(params).items()}


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log a nested config as flattened, redacted params (in batches of 100, MLflow's limit)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(redact(params).items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def find_resumable_run(client, experiment_id: str, fingerprint: str, tag: str = "fingerprint") -> str | None:
    """The newest unfinished run whose ``tag`` is ``fingerprint`` (crashed or failed), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{tag} = '{fingerprint}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs and runs[0].info.status != "FINISHED":
        return runs[0].info.run_id
    return None


def child_run(client, experiment_id: str, parent_id: str, fingerprint: str):
    """The newest run under ``parent_id`` whose fingerprint is ``fingerprint``, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.fingerprint = '{fingerprint}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def metric_is_better(new: float, old: float, higher_is_better: bool) -> bool:
    return new > old if higher_is_better else new < old


def update_champion(
    client, model_name: str, version: str, metric_key: str, value: float, higher_is_better: bool, alias: str
) -> bool:
    """Give ``version`` the alias if its metric beats the current holder's; return whether it did."""
    from mlflow.exceptions import MlflowException

    client.set_model_version_tag(model_name, version, metric_key, str(value))
    try:
        current = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        current = None
    if current is not None and str(current.version) != str(version):
        old = current.tags.get(metric_key)
        if old is not None and not metric_is_better(value, float(old), higher_is_better):
            return False
    client.set_registered_model_alias(model_name, alias, str(version))
    return True
