"""``tune@<run>``: a Ray Tune search over one run's hyperparameters or augmentation policy.

- ``tpe_asha``: ``OptunaSearch`` (TPE) samples, ``ASHAScheduler`` stops weak trials at its rungs;
- ``random``: random sampling, every trial to the end (the baseline of bench/search_efficiency.py);
- ``pbt``: Population Based Training over a PBA policy space (components.search.pba);
- ``faster_autoaugment``: the differentiable policy searcher, for classification.

A trial on one worker (the default, ``search.trial_training``) trains in the trial's own process
and reports every epoch to Tune, so ASHA sees validation curves and a stopped trial frees its
CPU at once; a trial on several workers runs the method's Ray Train ``TorchTrainer(...).fit()``
and forwards each report (``TuneReportCallback``). A PBT trial always trains in its own process
(Tune hands it another trial's checkpoint when it exploits). MLflow gets a parent run per search and a child run per
trial (the trial's params and curves; pruned trials end KILLED with ``tune.pruned``). A killed
search resumes: its parent run is found by fingerprint, the Tune experiment named after it is
restored with ``Tuner.restore`` (finished trials are not re-run), a restarted trial reopens its
own child run, and its Ray Train run resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.tune.stopper import Stopper

from components.config import ConfigError, deep_merge, from_dict, to_dict
from components.data.canonical import read_info
from components.models.pretrained import PRETRAINED_ROOT, load_trunk
from components.search import space as spaces
from components.search.config import SearchConfig
from components.search.report import summarize, write_outputs
from components.search.trial_runs import TrialRunCloser, close_child_runs, open_child_run
from components.storage.cluster import RayStorage
from components.tasks import get_task
from components.tracking import mlflow_run as tracking
from components.training.hooks import STATE_FILE
from components.training.platform import PROJECT_ROOT, Platform, data_payload, init_ray, storage_for
from components.training.ray_trainer import torch_trainer
from components.training.resources import fit_within_wait
from components.training.spec import RunSpec, load_run_spec

FINGERPRINT_TAG = "search_fingerprint"
SEED_KEY = "training.seed"
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes Ray reserves for a trial's driver (it waits on its TorchTrainer)


@dataclass
class SearchOutcome:
    best: dict[str, Any]
    summary: dict[str, Any]
    parent_run_id: str
    resumed: bool
    trials: list[dict[str, Any]]  # the summary's trials with their validation curves


def search_fingerprint(spec: RunSpec, search: SearchConfig, data_checksum: str) -> str:
    blob = json.dumps({"run": spec.resolved(), "search": to_dict(search), "data": data_checksum}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def trial_overrides(search: SearchConfig, config: dict[str, Any]) -> dict[str, Any]:
    """What a trial trains: the sampled point over the search's ``trial_training``, for the
    search's epochs, validated every epoch (the scheduler compares curves)."""
    sampled = spaces.overrides(config)
    training = deep_merge(search.trial_training, sampled.get("training", {}))
    training = deep_merge(training, {"epochs": search.epochs, "eval_every": 1, "figures_every": 0})
    return {"config": sampled.get("config", {}), "training": training}


def validate_search(params: dict[str, Any], run: str, search: SearchConfig, source: str) -> dict[str, Any]:
    """The Tune param space, after checking that a point of it makes a valid run (so a typo in a
    searched key fails here, naming it, not inside a trial)."""
    key = f"runs.{run}.search.space"
    space = search.space
    if not space and search.algorithm in ("tpe_asha", "random"):
        method = load_run_spec(params, run, source).create_method()
        space = spaces.method_space(method.search_space())
        if not space:
            raise ConfigError(source, key, f"method {method.name!r} has no default search space; give one here")
    param_space = spaces.tune_space(space, search.algorithm, source, key)
    if param_space:
        point = trial_overrides(search, spaces.first_point(param_space))
        load_run_spec(params, run, source, overrides=point, overrides_source=key)
    if search.algorithm == "faster_autoaugment":
        from components.search.faster_autoaugment import FasterAAConfig

        from_dict(FasterAAConfig, search.faster_autoaugment, source=source, key=f"runs.{run}.search.faster_autoaugment")
    return param_space


def run_search(
    params: dict[str, Any],
    run: str,
    search: SearchConfig,
    platform: Platform,
    data_root: str | Path,
    out_dir: str | Path,
    source: str = "params.yaml",
    pretrained_root: str | Path = PRETRAINED_ROOT,
) -> SearchOutcome:
    """Search, then write ``best.yaml`` (the overrides train@<run> merges), ``summary.json``,
    ``trials.csv`` and figures into ``out_dir``; nothing is left there unless all are written."""
    import mlflow

    spec = load_run_spec(params, run, source)
    param_space = validate_search(params, run, search, source)
    method = spec.create_method()
    task = get_task(method.task)
    if search.algorithm == "faster_autoaugment" and method.task != "classification":
        raise ConfigError(source, f"runs.{run}.search.algorithm", "faster_autoaugment searches classification runs")
    info = read_info(data_root)
    metric, mode = f"val/{task.primary_metric}", "max" if task.higher_is_better else "min"
    fingerprint = search_fingerprint(spec, search, info.checksum)
    trunk_state = None
    if method.pretrained_trunk() is not None:
        trunk_state, _ = load_trunk(
            pretrained_root, method.pretrained_trunk(), source=source, key=f"{spec.key}.config.backbone.pretrained"
        )

    tracking.apply_privacy_defaults(platform.mlflow.telemetry)
    uri = tracking.use_tracking(platform.mlflow)
    client = mlflow.MlflowClient()
    experiment = tracking.use_experiment(tracking.experiment_name(spec.dataset, method.task))
    resume_id = tracking.find_resumable_run(client, experiment.experiment_id, fingerprint, tag=FINGERPRINT_TAG)
    started = time.time()
    with mlflow.start_run(run_id=resume_id, experiment_id=experiment.experiment_id, run_name=f"tune-{run}") as parent:
        parent_id = parent.info.run_id
        mlflow.set_tags(
            {
                "stage": "tune",
                tracking.RUN_KIND: "search",
                "run": run,
                "method": spec.method,
                "task": method.task,
                "dataset": spec.dataset,
                "algorithm": search.algorithm,
                "paper": f"arXiv:{method.paper}",
                "git_commit": tracking.git_commit(PROJECT_ROOT),
                "data_checksum": info.checksum,
                FINGERPRINT_TAG: fingerprint,
            }
        )
        if resume_id is None:
            tracking.log_params(client, parent_id, {"search": to_dict(search), "base": spec.resolved()})
        try:
            if search.algorithm == "faster_autoaugment":
                best, trials = _faster_autoaugment(spec, search, info, source)
            else:
                storage = storage_for(platform.storage)
                ctx = {
                    "params": params,
                    "run": run,
                    "source": source,
                    "search": to_dict(search),
                    "data": data_payload(info, storage),
                    "tracking_uri": uri,
                    "experiment_id": experiment.experiment_id,
                    "parent_run_id": parent_id,
                    "storage": storage,
                    "name": f"tune-{run}-{parent_id[:12]}",
                    "trunk_state": trunk_state,
                }
                best, trials = _tune(ctx, search, param_space, metric, mode, platform, client)
            summary = summarize(run, search, metric, mode, best, trials, time.time() - started, parent_id)
            best["mlflow_parent_run_id"] = parent_id
            write_outputs(Path(out_dir), best, summary, trials, metric)
            for name in sorted(os.listdir(out_dir)):
                mlflow.log_artifact(str(Path(out_dir) / name))
            if best.get("best_value") is not None:
                mlflow.log_metric(f"best/{task.primary_metric}", best["best_value"])
            mlflow.log_metrics({f"search/{k}": float(v) for k, v in summary["counts"].items()})
            mlflow.log_metric("search/wall_s", summary["wall_s"])
        except BaseException as exc:  # also SystemExit from SIGTERM: the run ends FAILED, saying why
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
    return SearchOutcome(best, summary, parent_id, resume_id is not None, trials)


def in_trial_process(search: SearchConfig, scaling) -> bool:
    """Whether a trial trains in its own process: PBT's always (its scheduler swaps weights
    between trials), a one-worker trial unless ``single_worker_in_trial`` is off. Other trials
    start a Ray Train worker group of their own."""
    return search.algorithm == "pbt" or (search.single_worker_in_trial and scaling.num_workers == 1)


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial, in a Tune trial actor: the run with the sampled point, tracked as a child run."""
    import ray.tune
    from mlflow import MlflowClient

    from components.training.loop import train_loop_in_trial, train_loop_per_worker

    search = from_dict(SearchConfig, ctx["search"], source="search")
    trial_id = ray.tune.get_context().get_trial_id()
    spec = load_run_spec(
        ctx["params"], ctx["run"], ctx["source"], overrides=trial_overrides(search, config), overrides_source="trial"
    )
    client = MlflowClient(ctx["tracking_uri"])
    run_id = open_child_run(client, ctx, trial_id, spec, config)
    payload = {
        "spec": spec.to_payload(),
        **ctx["data"],
        "mlflow": {"tracking_uri": ctx["tracking_uri"], "registry_uri": None, "run_id": run_id},
        "trunk_state": ctx["trunk_state"],
    }
    if in_trial_process(search, spec.training.scaling):
        train_loop_in_trial(payload)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        # The same name after a restore: Ray Train resumes the trial from its checkpoint.
        name = f"{ctx['name']}-{trial_id}"
        fit_within_wait(
            lambda: torch_trainer(
                train_loop_per_worker, payload, spec.training, name, ctx["storage"], callbacks=[TuneReportCallback()]
            ),
            spec.training,
            f"{ctx['run']} trial {trial_id}",
        )
    client.set_terminated(run_id, "FINISHED")  # PBT's last segment; otherwise TrialRunCloser


def _tune(ctx, search: SearchConfig, param_space, metric: str, mode: str, platform: Platform, client):
    from ray import tune

    init_ray(platform.ray)
    # Tune saves the experiment's state at most every 10 s by default; a trial that finished
    # after the last save runs again after a restore. Trials take many seconds: save every second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    trainable = tune.with_parameters(_trial, ctx=ctx)
    first = load_run_spec(ctx["params"], ctx["run"], ctx["source"], overrides=trial_overrides(search, {}))
    scaling = first.training.scaling
    if in_trial_process(search, scaling):  # the trial trains in its own process and holds the CPUs
        trainable = tune.with_resources(
            trainable, {"cpu": scaling.cpus_per_worker, "gpu": scaling.gpus_per_worker if scaling.use_gpu else 0}
        )
    else:  # the trial only waits on its TorchTrainer, whose workers hold the CPUs; Tune refuses an
        # empty request, and any CPU share would leave the last worker group short of a whole CPU
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if search.algorithm == "pbt":  # members differ by seed (data order, sampled ops) before any exploration
        param_space = {**param_space, SEED_KEY: tune.randint(0, 2**16)}
    storage: RayStorage = ctx["storage"]
    path, filesystem = storage.ray_path(ctx["name"]), storage.filesystem()
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                search_alg=_search_alg(search, metric, mode),
                scheduler=_scheduler(search, param_space, metric, mode),
                num_samples=search.num_samples,
                max_concurrent_trials=search.max_concurrent_trials,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=ctx["name"],
                **storage.run_config_args(),
                verbose=1,
                stop=_EpochBudget(search.budget_epochs),
                callbacks=[TrialRunCloser(ctx, search.epochs, search.algorithm)],
            ),
        )
    grid = tuner.fit()
    trials = [_trial_record(result, search, metric, mode) for result in grid]
    trials.sort(key=lambda t: t["trial_id"])
    close_child_runs(client, ctx, trials)
    # Among every trial that validated, not only those that ran to the end: ASHA stops a trial
    # when others did better at its rung, and a budget (budget_epochs) can stop a leading one.
    scored = [t for t in trials if t["status"] != "errored" and t["best_value"] is not None]
    if not scored:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"])
        raise RuntimeError(f"no trial of tune@{ctx['run']} validated ({errors or 'none ran'})")
    pick = max if mode == "max" else min
    best_trial = pick(scored, key=lambda t: t["best_value"])
    best_trial["best"] = True
    best_result = next(r for r in grid if Path(r.path).name == best_trial["trial_id"])
    overrides = spaces.overrides(best_result.config)
    if search.algorithm == "pbt":  # the schedule, not the member's seed, is what was found
        overrides.setdefault("training", {})["augment"] = _pbt_schedule(best_result, search.epochs)
        overrides["training"].pop("seed", None)
    best = {
        "run": ctx["run"],
        "algorithm": search.algorithm,
        "metric": metric,
        "mode": mode,
        "best_value": best_trial["best_value"],
        "best_trial": best_trial["trial_id"],
        "overrides": overrides,
    }
    return best, trials


def _trial_dirname(trial) -> str:
    """A trial's folder is its id, so results map back to trials (and child runs) by path."""
    return trial.trial_id


class _EpochBudget(Stopper):
    """Tune stopper: every trial stops once all trials together have trained ``budget`` epochs."""

    def __init__(self, budget: int | None) -> None:
        self.budget, self.epochs = budget, 0

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not result.get("done"):  # one report per epoch, then a closing one when the trial returns
            self.epochs += 1
        return self.stop_all()

    def stop_all(self) -> bool:
        return self.budget is not None and self.epochs >= self.budget


def _search_alg(search: SearchConfig, metric: str, mode: str):
    if search.algorithm == "tpe_asha":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=search.seed))
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed)


def _scheduler(search: SearchConfig, param_space: dict[str, Any], metric: str, mode: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search.sample import Domain

    if search.algorithm == "tpe_asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=search.epochs,
            grace_period=search.asha.grace_period,
            reduction_factor=search.asha.reduction_factor,
        )
    if search.algorithm == "pbt":
        from components.search.pba import explore_fn

        mutations = {k: v for k, v in param_space.items() if isinstance(v, Domain) and k != SEED_KEY}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=search.pbt.perturbation_interval,
            quantile_fraction=search.pbt.quantile_fraction,
            resample_probability=search.pbt.resample_probability,
            hyperparam_mutations=mutations or None,
            custom_explore_fn=explore_fn(search.pbt.resample_probability, search.seed),
            # Synchronous: the population is compared at the same epoch. Asynchronous PBT with
            # fewer concurrent trials than members compares a trial that just trained with ones
            # paused epochs earlier, so the one reporting always looks best and nobody is exploited.
            synch=True,
        )
    return FIFOScheduler()


def _trial_record(result, search: SearchConfig, metric: str, mode: str) -> dict[str, Any]:
    frame = result.metrics_dataframe
    rows = [] if frame is None or metric not in frame else frame[frame[metric].notna()]
    curve = [float(v) for v in rows[metric]] if len(rows) else []
    times = [float(v) for v in rows["timestamp"]] if len(rows) and "timestamp" in rows else []
    epochs = int(result.metrics.get("training_iteration", 0) or 0)
    if result.error is not None:
        status = "errored"
    elif epochs >= search.epochs or search.algorithm == "pbt":
        status = "completed"
    else:
        status = "pruned"
    pick = max if mode == "max" else min
    return {
        # Not result.metrics["trial_id"]: a PBT member that cloned another reports the donor's.
        "trial_id": Path(result.path).name,
        "status": status,
        "epochs": epochs,
        "best_value": pick(curve) if curve else None,
        "last_value": curve[-1] if curve else None,
        "curve": curve,
        "times": times,  # when each point was reported (Unix seconds)
        "config": {k: v for k, v in result.config.items()},
        "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:500],
        "best": False,
    }


def _lineage(result) -> list[dict[str, Any]]:
    """The policies a PBT member's latest weights were trained under (kept by the loop)."""
    with result.checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    return state["augment_schedule"]


def _pbt_schedule(result, epochs: int) -> dict[str, Any]:
    from components.search.pba import schedule_from_lineage

    return schedule_from_lineage(_lineage(result), epochs)


def _faster_autoaugment(spec: RunSpec, search: SearchConfig, info, source: str):
    import mlflow

    from components.search.faster_autoaugment import FasterAAConfig, search_policy

    key = f"{spec.key}.search.faster_autoaugment"
    cfg = from_dict(FasterAAConfig, search.faster_autoaugment, source=source, key=key)
    train_set = get_task("classification").dataset(Path(info.root), "train", train=False)
    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    labels = torch.tensor([train_set[i][1] for i in range(len(train_set))], dtype=torch.int64)

    def log(epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"faa/{k}": float(v) for k, v in metrics.items()}, step=epoch)

    result = search_policy(images, labels, info.num_classes, cfg, log=log)
    mlflow.log_dict(result.op_weights, "op_weights.json")
    best = {
        "run": spec.name,
        "algorithm": search.algorithm,
        "metric": None,
        "mode": None,
        "best_value": None,
        "best_trial": None,
        "overrides": {"training": {"augment": result.policy}},
    }
    trials = [
        {
            "trial_id": "faster_autoaugment",
            "status": "completed",
            "epochs": len(result.history),
            "curve": [],
            "best_value": None,
            "last_value": None,
            "config": {},
            "error": None,
            "best": True,
        }  # fmt: skip
    ]
    return best, trials
