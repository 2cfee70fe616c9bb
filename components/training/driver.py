"""The driver side of a training run: the MLflow run around a Ray Train ``TorchTrainer``.

The driver owns the MLflow run. It checks the run against its dataset's manifest and the
resources at hand before anything starts, creates the run (or reopens an unfinished one with the
same fingerprint, whose Ray Train storage then resumes from its last checkpoint), lets rank 0 of
the workers log per-epoch metrics into it, then scores the best checkpoint on the test split,
logs the compute ledger, logs and registers the model, and ends the run FINISHED, or FAILED
with the error.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from components.data.canonical import MANIFEST, DatasetInfo, read_info
from components.data.card import CARD
from components.models.pretrained import PRETRAINED_ROOT, load_trunk
from components.tasks import get_task
from components.tracking import figures, lineage
from components.tracking import mlflow_run as tracking
from components.training import actor_run, ledger, preflight
from components.training.actor_run import fit_in_actor
from components.training.evaluation import evaluate, split_loader
from components.training.hooks import (
    BEST_MODEL_FILE,
    HISTORY_FILE,
    LEDGER_FILE,
    TEST_FILE,
    TEST_SAMPLE_FILE,
    progress_line,
)
from components.training.loop import train_loop_per_worker
from components.training.platform import (  # noqa: F401  (the platform's names, re-exported)
    PROJECT_ROOT,
    Platform,
    RayParams,
    StorageParams,
    data_payload,
    init_ray,
    load_platform,
    ray_address,
    storage_for,
)
from components.training.ray_trainer import torch_trainer
from components.training.resources import alive_nodes, fit_within_wait, report_lost_nodes
from components.training.rng import seed_all
from components.training.spec import RunSpec


@dataclass
class SeedOutcome:
    """One seed of an entry: its own Ray Train run and MLflow child run."""

    seed: int
    run_id: str
    resumed: bool  # reopened after a crash, resumed from its last checkpoint
    reused: bool  # finished in an earlier attempt of the group: read back, not trained again
    test_metrics: dict[str, float]
    best_val: float
    history: list[dict[str, float]]
    compute: dict[str, Any]


@dataclass
class RunOutcome:
    run_id: str  # the best seed's run (by validation): the one whose model is registered
    resumed: bool
    test_metrics: dict[str, float]  # the best seed's
    best_val: float
    model_version: str | None
    champion: bool
    history: list[dict[str, float]]
    compute: dict[str, Any]
    group_run_id: str = ""
    seeds: list[SeedOutcome] = field(default_factory=list)
    aggregates: dict[str, float] = field(default_factory=dict)  # the group run's metrics


@dataclass
class _Run:
    """What the driver knows of a run once it is checked: passed between its steps."""

    spec: RunSpec
    platform: Platform
    info: DatasetInfo
    method: Any
    task: Any
    resolved: dict[str, Any]
    trunk_state: dict[str, torch.Tensor] | None
    trunk_checksum: str | None


SEED_WEIGHTS = "weights/model.pt"  # in a seed's MLflow run: its best weights, to finish a resumed group
SEED_FILES = ("metrics.json", "history.csv", "curves.png", "test_predictions.png")


def train(
    spec: RunSpec,
    platform: Platform,
    data_root: str | Path,
    model_dir: str | Path,
    results_dir: str | Path,
    pretrained_root: str | Path = PRETRAINED_ROOT,
    tags: dict[str, str] | None = None,
) -> RunOutcome:
    """Train ``spec`` on Ray Train, one run per seed, tracked in MLflow; write the model and
    metrics files.

    The entry gets a group run; each seed a child run under it, trained one after another. The
    group run carries the seeds' aggregates (:func:`group_metrics`); the best seed by validation
    gives ``model_dir``'s model and the registered one. A group that failed part-way reopens with
    its finished seeds read back from MLflow and its unfinished one resumed from its checkpoint.

    A run whose backbone names a ``pretrain`` entry starts from the trunk saved under
    ``pretrained_root``; pretrain entries themselves are not registered as models. ``tags`` are
    added to the runs' lineage tags (e.g. the search that chose its hyperparameters)."""
    tracking.apply_privacy_defaults(platform.mlflow.telemetry)
    run = _prepare(spec, platform, data_root, pretrained_root)
    if spec.training.epochs > 0 and in_actor(spec.training.scaling):
        init_ray(platform.ray)
        actor_run.prestart(spec.training)  # its process starts and imports while MLflow is set up
    try:
        return _train_group(run, tags or {}, Path(model_dir), Path(results_dir))
    finally:
        actor_run.release_warm()


def _train_group(run: _Run, tags: dict[str, str], model_dir: Path, results_dir: Path) -> RunOutcome:
    import mlflow

    spec, platform = run.spec, run.platform
    group_fp = spec.group_fingerprint(run.info.checksum, run.trunk_checksum)
    client, experiment_id = _tracking(platform, spec, run.method.task)
    tracking.save_runs_view(client, experiment_id, [run.task.primary_metric])
    resume_id = tracking.find_resumable_run(client, experiment_id, group_fp, tag=tracking.GROUP_FINGERPRINT)
    with mlflow.start_run(run_id=resume_id, experiment_id=experiment_id, run_name=spec.name) as group:
        group_id = group.info.run_id
        _describe_group(run, client, group_id, group_fp, tags, new=resume_id is None)
        try:
            last = len(spec.seed_list) - 1
            seeds = [
                _train_seed(run, seed, client, experiment_id, group_id, tags, model_dir, results_dir, i < last)
                for i, seed in enumerate(spec.seed_list)
            ]
            return _finish_group(run, client, group_id, seeds, model_dir, results_dir)
        except BaseException as exc:  # also SystemExit from SIGTERM (`ray job stop`, a pod's eviction)
            # The run ends FAILED (start_run's context); say why where the run is looked at.
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            raise


def _train_seed(
    run: _Run, seed: int, client, experiment_id: str, group_id: str, tags: dict[str, str], model_dir: Path,
    results_dir: Path, more: bool = False,
) -> SeedOutcome:  # fmt: skip
    """One seed's child run: read back if it finished in this group before, else trained
    (resumed from its checkpoint if it was cut short); ``more``: seeds follow (a one-worker
    run's actor is kept for them)."""
    import mlflow

    spec = run.spec.for_seed(seed)
    seeded = dataclasses.replace(run, spec=spec, resolved=spec.resolved())
    fingerprint = spec.fingerprint(run.info.checksum, run.trunk_checksum)
    seed_dir, weights = results_dir / "seeds" / str(seed), model_dir / "seeds" / str(seed) / "model.pt"
    earlier = tracking.child_run(client, experiment_id, group_id, fingerprint)
    if earlier is not None and earlier.info.status == "FINISHED":
        return _read_back(client, earlier, seed, seed_dir, weights)
    resume_id = earlier.info.run_id if earlier is not None else None
    resume_id = resume_id or tracking.find_resumable_run(client, experiment_id, fingerprint)
    with mlflow.start_run(
        run_id=resume_id, experiment_id=experiment_id, run_name=f"{spec.name} seed {seed}", nested=True,
        log_system_metrics=run.platform.mlflow.system_metrics,
    ) as active:  # fmt: skip
        child_tags = {**tags, tracking.RUN_KIND: "seed", "seed": str(seed), "mlflow.parentRunId": group_id}
        _describe(seeded, client, active.info.run_id, fingerprint, child_tags, new=resume_id is None)
        try:
            done = _train_and_finish(seeded, client, active.info.run_id, weights.parent, seed_dir, more)
            mlflow.log_artifact(str(weights), Path(SEED_WEIGHTS).parent.as_posix())
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
    return SeedOutcome(seed, active.info.run_id, resume_id is not None, False, done["test_metrics"],
                       done["best_val"], done["history"], done["compute"])  # fmt: skip


def _read_back(client, earlier, seed: int, seed_dir: Path, weights: Path) -> SeedOutcome:
    """A seed that finished in an earlier attempt of its group: its files from its MLflow run."""
    import shutil
    import tempfile

    run_id = earlier.info.run_id
    seed_dir.mkdir(parents=True, exist_ok=True)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        places = {name: seed_dir / name for name in SEED_FILES}
        places.update({SEED_WEIGHTS: weights, "config.yaml": weights.parent / "config.yaml"})
        for name, place in places.items():
            shutil.copyfile(client.download_artifacts(run_id, name, tmp), place)
    summary = json.loads((seed_dir / "metrics.json").read_text())
    history = _read_history_csv(seed_dir / "history.csv")
    tests = {k: float(v) for k, v in summary.items() if k.startswith("test/")}
    best_val = next(float(v) for k, v in summary.items() if k.startswith("best_val/"))
    print(f"{earlier.data.tags.get('run', '?')} seed {seed}: finished before in this group (run {run_id})", flush=True)
    return SeedOutcome(seed, run_id, False, True, tests, best_val, history, summary["compute"])


def _describe_group(run: _Run, client, run_id: str, fingerprint: str, tags: dict[str, str], new: bool) -> None:
    """The group run: the entry's tags and params (without the seed: its children differ in it)."""
    import mlflow

    spec, info = run.spec, run.info
    mlflow.set_tags(
        {
            "method": spec.method,
            "task": run.method.task,
            "dataset": spec.dataset,
            "run": spec.name,
            "stage": "pretrain" if spec.section == "pretrain" else "train",
            "paper": f"arXiv:{run.method.paper}",
            "git_commit": tracking.git_commit(PROJECT_ROOT),
            "data_checksum": info.checksum,
            tracking.GROUP_FINGERPRINT: fingerprint,
            tracking.RUN_KIND: "group",
            "seeds": ",".join(str(s) for s in spec.seed_list),
            **({"pretrained_checksum": run.trunk_checksum} if run.trunk_checksum else {}),
            **tags,
        }
    )
    if new:
        resolved = spec.resolved()
        resolved["training"].pop("seed")
        resolved["training"]["failure"].pop("fail_at_epoch")
        resolved["seeds"] = ",".join(str(s) for s in spec.seed_list)
        tracking.log_params(client, run_id, resolved)
        lineage.log_dataset_inputs(info, run.task.view)


def _prepare(spec: RunSpec, platform: Platform, data_root, pretrained_root) -> _Run:
    """Read and check everything a run needs before MLflow or Ray start: a mistake the params
    and the manifest show is an error naming the key (PreflightError), not a crash in a worker."""
    info = read_info(data_root)
    method = spec.create_method()
    preflight.check_run(spec, info)
    if spec.training.epochs > 0:
        _check_resources(spec, platform)
    trunk_state, trunk_checksum = None, None
    backbone = method.pretrained_trunk()
    if backbone is not None:
        key = f"{spec.key}.config.backbone.pretrained"
        trunk_state, trunk_checksum = load_trunk(pretrained_root, backbone, source=spec.source, key=key)
    return _Run(spec, platform, info, method, get_task(method.task), spec.resolved(), trunk_state, trunk_checksum)


def _check_resources(spec: RunSpec, platform: Platform) -> None:
    """Workers against what Ray has: a Ray already started in this process, or this machine for
    the local Ray a run starts. A cluster (``ray.address``) may autoscale, so it is not judged by
    what it has now."""
    import ray

    if ray.is_initialized():
        preflight.check_resources(spec, ray.cluster_resources(), "the Ray cluster this process is connected to")
    elif ray_address(platform.ray) is None:
        preflight.check_resources(spec, preflight.local_resources(platform.ray.num_cpus), "this machine (local Ray)")
    else:
        preflight.check_resources(spec, {"CPU": float("inf"), "GPU": float("inf")}, "the Ray cluster")


def _tracking(platform: Platform, spec: RunSpec, task: str):
    import mlflow

    tracking.use_tracking(platform.mlflow)
    experiment = tracking.use_experiment(tracking.experiment_name(spec.dataset, task))
    return mlflow.MlflowClient(), experiment.experiment_id


def _describe(run: _Run, client, run_id: str, fingerprint: str, tags: dict[str, str], new: bool) -> None:
    """Tags, params, the resolved config, the dataset card and the dataset inputs of the run."""
    import mlflow

    spec, info = run.spec, run.info
    drill = run.resolved["training"]["failure"].pop("fail_at_epoch")
    mlflow.set_tags(
        {
            "method": spec.method,
            "task": run.method.task,
            "dataset": spec.dataset,
            "run": spec.name,
            "stage": "pretrain" if spec.section == "pretrain" else "train",
            "paper": f"arXiv:{run.method.paper}",
            "git_commit": tracking.git_commit(PROJECT_ROOT),
            "data_checksum": info.checksum,
            "fingerprint": fingerprint,
            "fault_drill_epoch": str(drill),
            **({"pretrained_checksum": run.trunk_checksum} if run.trunk_checksum else {}),
            **tags,
        }
    )
    if new:  # a reopened run already has them
        tracking.log_params(client, run_id, run.resolved)
        lineage.log_dataset_inputs(info, run.task.view)
    mlflow.log_text(yaml.safe_dump(run.resolved, sort_keys=False), "config.yaml")
    for card in (MANIFEST, CARD):  # the dataset card: what the numbers were computed on
        if (Path(info.root) / card).is_file():
            mlflow.log_artifact(str(Path(info.root) / card), "dataset")


def _train_and_finish(
    run: _Run, client, run_id: str, model_dir: Path, results_dir: Path, keep_warm: bool = False
) -> dict[str, Any]:
    spec = run.spec
    if spec.training.epochs == 0 and not spec.training.scaling.use_gpu:
        # A CPU baseline of the initial weights: nothing to distribute, scored right here.
        best_state, history, totals = _score_initial_weights(run)
        return _finish(run, client, best_state, history, totals, model_dir, results_dir)
    payload = {"tracking_uri": tracking.resolve_tracking_uri(run.platform.mlflow), "run_id": run_id}
    payload["registry_uri"] = run.platform.mlflow.registry_uri
    name = f"{spec.name}-{run_id[:12]}"
    result = fit(spec, run.platform, run.info, name, payload, run.trunk_state, score_test=True, keep_warm=keep_warm)
    with result.checkpoint.as_directory() as ckpt_dir:
        folder = Path(ckpt_dir)
        best_state = torch.load(folder / BEST_MODEL_FILE, map_location="cpu", weights_only=True)
        history = json.loads((folder / HISTORY_FILE).read_text())
        totals = json.loads((folder / LEDGER_FILE).read_text()) if (folder / LEDGER_FILE).is_file() else {}
        scored = None
        if (folder / TEST_FILE).is_file():  # scored by the workers, on their devices
            sample = torch.load(folder / TEST_SAMPLE_FILE, map_location="cpu", weights_only=True)
            scored = (json.loads((folder / TEST_FILE).read_text()), sample)
    return _finish(run, client, best_state, history, totals, model_dir, results_dir, scored)


def _score_initial_weights(run: _Run) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, Any]]:
    """``epochs: 0``: the weights every worker of the loop would start from, scored on the
    validation split as the loop's epoch 0 and logged to the active run."""
    import mlflow

    t0 = time.perf_counter()
    model = _initial_model(run)
    scores, _ = evaluate(run.method, run.task, model, _loader(run, "val"), run.info.num_classes)
    primary = run.task.primary_metric
    metrics = {f"val/{k}": v for k, v in scores.items()}
    metrics[f"best/{primary}"] = metrics[f"val/{primary}"]
    metrics["time/eval_s"] = metrics["time/epoch_s"] = time.perf_counter() - t0
    mlflow.log_metrics(metrics, step=0)
    print(progress_line(run.spec.name, 0, 1, metrics, primary, metrics["time/epoch_s"], 0.0), flush=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [{"epoch": 0.0, **metrics}], {"train_flops": 0.0}


def _initial_model(run: _Run) -> torch.nn.Module:
    seed_all(run.spec.training.seed)
    model = run.method.build(run.info)
    if run.trunk_state is not None:
        run.method.trunk(model).load_state_dict(run.trunk_state)
    return model.eval()


def _loader(run: _Run, split: str):
    return split_loader(run.task, run.info, split, run.spec.training.eval_batch_size)


def _finish(
    run: _Run, client, best_state, history, totals, model_dir: Path, results_dir: Path, scored=None
) -> dict[str, Any]:
    """Score the best weights on the test split (unless the workers did: ``scored``, the scores and
    a sample batch); write and log what the seed's run made (the group registers the best seed's)."""
    import mlflow

    spec, task = run.spec, run.task
    model = run.method.build(run.info)
    model.load_state_dict(best_state)
    model.eval()
    t0 = time.perf_counter()
    scores, sample = scored or evaluate(run.method, task, model, _loader(run, "test"), run.info.num_classes)
    test_s = float(totals["test_eval_s"]) if scored else time.perf_counter() - t0
    test_metrics = {f"test/{k}": v for k, v in scores.items()}
    compute = compute_ledger(run, model, history, totals, test_s)
    mlflow.log_metrics({**test_metrics, **compute.to_metrics()}, step=spec.training.epochs)
    best_val = history[-1][f"best/{task.primary_metric}"]
    summary = {
        "run": spec.name,
        "method": spec.method,
        "seed": spec.training.seed,
        "primary_metric": task.primary_metric,
        "higher_is_better": task.higher_is_better,
        "mlflow_run_id": mlflow.active_run().info.run_id,
        f"best_val/{task.primary_metric}": best_val,
        **test_metrics,
        "epochs": len(history),
        "compute": compute.to_dict(),
    }
    _write_outputs(run, best_state, summary, history, sample, model_dir, results_dir)
    return {"test_metrics": test_metrics, "best_val": best_val, "history": history, "compute": compute.to_dict()}


def group_metrics(seeds: list[SeedOutcome], primary: str) -> dict[str, float]:
    """The group run's metrics: for each test metric, the best validation score (``best/<primary>``),
    each validation metric of the last epoch and the compute each seed got, the mean over seeds
    with its 95% bootstrap interval and n (``<key>_mean``, ``_ci_low``, ``_ci_high``, ``_n``; and
    ``_iqm`` from 4 seeds on): :mod:`components.report.stats`."""
    from components.report.stats import interval

    per_key: dict[str, list[float]] = {}
    for s in seeds:
        last = s.history[-1] if s.history else {}
        values = {**{k: v for k, v in last.items() if k.startswith("val/")}, **s.test_metrics}
        values[f"best/{primary}"] = s.best_val
        for key in ("device_seconds", "train_wall_s"):
            if key in s.compute:
                values[f"compute/{key}"] = s.compute[key]
        for k, v in values.items():
            per_key.setdefault(k, []).append(float(v))
    out: dict[str, float] = {}
    for key, values in sorted(per_key.items()):
        if len(values) != len(seeds):  # a metric some seeds lack is not a mean over the seeds
            continue
        iv = interval(values)
        out.update({f"{key}_mean": iv.mean, f"{key}_ci_low": iv.low, f"{key}_ci_high": iv.high, f"{key}_n": iv.n})
        if iv.iqm is not None:
            out[f"{key}_iqm"] = iv.iqm
    return out


def _finish_group(
    run: _Run, client, group_id: str, seeds: list[SeedOutcome], model_dir: Path, results_dir: Path
) -> RunOutcome:
    """The group run's aggregates; the best seed by validation (first on ties) gives the entry's
    model and files and is the one registered; ``metrics.json`` holds it, the aggregates and every seed."""
    import shutil

    import mlflow

    spec, task = run.spec, run.task
    primary = task.primary_metric
    best = seeds[0]
    for s in seeds[1:]:
        if tracking.metric_is_better(s.best_val, best.best_val, task.higher_is_better):
            best = s
    aggregates = group_metrics(seeds, primary)
    mlflow.log_metrics(aggregates, step=0)
    seed_model = model_dir / "seeds" / str(best.seed)
    for name in ("model.pt", "config.yaml"):
        shutil.copyfile(seed_model / name, model_dir / name)
    for name in SEED_FILES[1:]:
        shutil.copyfile(results_dir / "seeds" / str(best.seed) / name, results_dir / name)
    aggregate = {
        key[: -len("_mean")]: {
            stat: aggregates[f"{key[: -len('_mean')]}_{stat}"] for stat in ("mean", "ci_low", "ci_high", "n")
        }
        for key in aggregates
        if key.endswith("_mean")
    }
    summary = {
        "run": spec.name,
        "method": spec.method,
        "task": task.name,
        "primary_metric": primary,
        "higher_is_better": task.higher_is_better,
        "mlflow_group_run_id": group_id,
        "mlflow_run_id": best.run_id,
        "seeds": [s.seed for s in seeds],
        "best_seed": best.seed,
        f"best_val/{primary}": best.best_val,
        **best.test_metrics,
        "epochs": len(best.history),
        "compute": best.compute,
        "aggregate": aggregate,
        "per_seed": [
            {"seed": s.seed, "mlflow_run_id": s.run_id, f"best_val/{primary}": s.best_val, **s.test_metrics}
            for s in seeds
        ],
    }
    (results_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_artifact(str(results_dir / "metrics.json"))
    version, champion = None, False
    # Pretrain entries and untrained baselines (epochs: 0) are compared, not deployed.
    if run.platform.mlflow.register_models and spec.section == "runs" and spec.training.epochs > 0:
        model = run.method.build(run.info)
        model.load_state_dict(torch.load(seed_model / "model.pt", map_location="cpu", weights_only=True))
        with mlflow.start_run(run_id=best.run_id, nested=True):
            version, champion = _log_and_register(run, client, model.eval(), best.best_val)
    mlflow.set_tags({"best_seed": str(best.seed), "best_run_id": best.run_id,
                     **({"model_version": version} if version else {})})  # fmt: skip
    return RunOutcome(
        run_id=best.run_id,
        resumed=any(s.resumed for s in seeds),
        test_metrics=best.test_metrics,
        best_val=best.best_val,
        model_version=version,
        champion=champion,
        history=best.history,
        compute=best.compute,
        group_run_id=group_id,
        seeds=seeds,
        aggregates=aggregates,
    )


def compute_ledger(run: _Run, model, history: list[dict], totals: dict[str, Any], test_s: float):
    """What the run cost (:mod:`components.training.ledger`): the workers' totals from the last
    checkpoint, the epochs' wall times, and the model's forward FLOPs on one input image."""
    example = run.method.example_input(run.info)
    with torch.no_grad():
        forward = ledger.count_flops(lambda: model(example))
    trained = run.spec.training.epochs > 0 or "peak_flops_per_s" in totals  # or a baseline on GPU workers
    scaling = run.spec.training.scaling
    return ledger.ComputeLedger(
        parameters=ledger.count_parameters(model),
        forward_flops_per_image=forward / example.shape[0],
        train_flops=float(totals.get("train_flops", 0.0)),
        train_wall_s=sum(h.get("time/train_epoch_s", 0.0) for h in history),
        eval_wall_s=sum(h.get("time/eval_s", 0.0) for h in history) + test_s,
        workers=scaling.num_workers if trained else 1,
        device="cuda" if (trained and scaling.use_gpu) else "cpu",
        peak_memory_bytes=totals.get("peak_memory_bytes") or [ledger.peak_memory_bytes(torch.device("cpu"))],
        peak_flops_per_device=float(totals.get("peak_flops_per_s", 0.0)),
    )


def _write_outputs(run: _Run, best_state, summary, history, sample, model_dir: Path, results_dir: Path) -> None:
    import mlflow

    model_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, model_dir / "model.pt")
    (model_dir / "config.yaml").write_text(yaml.safe_dump(run.resolved, sort_keys=False))
    (results_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_history_csv(history, results_dir / "history.csv")
    figures.training_curves(history, results_dir / "curves.png")
    run.task.sample_figure(sample, run.info.classes, results_dir / "test_predictions.png")
    for name in ("metrics.json", "history.csv", "curves.png", "test_predictions.png"):
        mlflow.log_artifact(str(results_dir / name))


def fit(
    spec: RunSpec,
    platform: Platform,
    info: DatasetInfo,
    ray_name: str,
    mlflow_payload: dict | None = None,
    trunk_state: dict[str, torch.Tensor] | None = None,
    score_test: bool = False,
    keep_warm: bool = False,
):
    """Run the generic loop on a Ray Train worker group (a one-worker run: in one actor,
    :func:`in_actor`); rank 0 logs to ``mlflow_payload``'s run;
    ``trunk_state`` initialises the model's trunk on every worker; ``score_test``: the workers
    also score the best weights on the test split after the last epoch; ``keep_warm``: a one-worker
    run's actor stays for this process's next run."""
    init_ray(platform.ray)
    storage = storage_for(platform.storage)
    payload = {
        "spec": spec.to_payload(),
        **data_payload(info, storage),
        "mlflow": mlflow_payload,
        "trunk_state": trunk_state,
        "score_test": score_test,
    }
    nodes = alive_nodes()
    try:
        if in_actor(spec.training.scaling):
            return fit_in_actor(payload, spec.training, ray_name, storage, spec.name, keep_warm=keep_warm)
        trainer = lambda: torch_trainer(train_loop_per_worker, payload, spec.training, ray_name, storage)  # noqa: E731
        return fit_within_wait(trainer, spec.training, spec.name)
    finally:
        report_lost_nodes(nodes, spec.name)


def in_actor(scaling) -> bool:
    """Whether a run trains in one actor (:mod:`components.training.actor_run`) rather than on a
    Ray Train worker group: one worker, unless ``one_worker_in_actor`` is off."""
    return scaling.num_workers == 1 and scaling.one_worker_in_actor


def _log_and_register(run: _Run, client, model, best_val: float) -> tuple[str, bool]:
    import mlflow
    from mlflow.models import infer_signature

    example = run.method.example_input(run.info)
    with torch.no_grad():
        output = model(example)
    if isinstance(output, (list, tuple)):  # detectors: one dict of tensors per image
        output = output[0]
    output = {k: v.numpy() for k, v in output.items()} if isinstance(output, dict) else output.numpy()
    name = tracking.registered_model_name(run.spec.dataset, run.method.name)
    logged = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example.numpy(), output),
        registered_model_name=name,
        # Pickled with the project's code beside it: every method's model loads the same way,
        # including those torch.export cannot trace.
        serialization_format="pickle",
        code_paths=[str(PROJECT_ROOT / "components")],
        pip_requirements=lineage.model_requirements(type(run.method).__module__, PROJECT_ROOT),
    )
    version = str(logged.registered_model_version)
    metric_key = f"val/{run.task.primary_metric}"
    alias = run.platform.mlflow.champion_alias
    champion = tracking.update_champion(client, name, version, metric_key, best_val, run.task.higher_is_better, alias)
    return version, champion


def _read_history_csv(path: Path) -> list[dict[str, float]]:
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [{k: float(v) for k, v in zip(keys, line.split(","), strict=True) if v != ""} for line in lines[1:]]


def _write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in history]
    path.write_text("\n".join(lines) + "\n")
