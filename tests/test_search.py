"""Search spaces, PBA's exploration and schedules, and the search stage (Ray Tune + MLflow).

The slow tests run real searches on the tiny dataset: a TPE + ASHA search killed mid-run and
restored, and a Population Based Augmentation search.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, from_dict
from components.search import space as spaces
from components.search.config import SearchConfig, load_search
from components.search.pba import explore_fn, schedule_from_lineage
from components.search.tuner import trial_overrides, validate_search
from components.training.spec import load_run_spec
from tests.conftest import ROOT


def _with_search(params: dict, run: str = "classifier", **search) -> dict:
    p = copy.deepcopy(params)
    p["runs"][run]["search"] = search
    return p


def test_space_gives_tune_distributions_and_nested_overrides():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {
        "training.optimizer.lr": {"loguniform": [1e-3, 0.3]},
        "training.batch_size": {"choice": [32, 64]},
        "config.label_smoothing": {"quniform": [0.0, 0.2, 0.05]},
        "training.epochs": {"randint": [2, 4]},
    }
    tune_space = spaces.tune_space(space, "tpe_asha", "p.yaml", "runs.x.search.space")
    assert isinstance(tune_space["training.optimizer.lr"], Float)
    assert tune_space["training.optimizer.lr"].lower == 1e-3
    assert isinstance(tune_space["training.batch_size"], Categorical)
    assert isinstance(tune_space["training.epochs"], Integer)
    assert tune_space["training.epochs"].upper == 5  # both ends included, unlike Tune's randint
    point = {"training.optimizer.lr": 0.01, "training.batch_size": 32, "config.label_smoothing": 0.1}
    assert spaces.overrides(point) == {
        "training": {"optimizer": {"lr": 0.01}, "batch_size": 32},
        "config": {"label_smoothing": 0.1},
    }


@pytest.mark.parametrize(
    ("space", "key"),
    [
        ({"optimizer.lr": {"uniform": [0, 1]}}, "runs.x.search.space.optimizer.lr"),
        ({"training.optimizer.lr": {"gaussian": [0, 1]}}, "runs.x.search.space.training.optimizer.lr"),
        ({"training.optimizer.lr": {"loguniform": [0, 1]}}, "runs.x.search.space.training.optimizer.lr.loguniform"),
        ({"training.optimizer.lr": {"uniform": [1, 0]}}, "runs.x.search.space.training.optimizer.lr.uniform"),
        ({"training.augment": {"policy_space": "autoaugment"}}, "runs.x.search.space.training.augment.policy_space"),
        (
            {"training.augment": {"policy_space": "subpolicies", "ops": ["warp"]}},
            "runs.x.search.space.training.augment.ops",
        ),
        ({"training.augment": {"policy_space": "pba"}}, "runs.x.search.space.training.augment.policy_space"),
    ],
)
def test_bad_spaces_name_the_entry(space, key):
    with pytest.raises(ConfigError) as err:
        spaces.tune_space(space, "tpe_asha", "p.yaml", "runs.x.search.space")
    assert err.value.key == key
    assert str(err.value).startswith("p.yaml: ")


def test_subpolicy_space_expands_to_a_decision_per_stage_and_assembles_back():
    tune_space = spaces.tune_space(
        {"training.augment": {"policy_space": "subpolicies", "sub_policies": 3, "ops_per_sub_policy": 2}},
        "tpe_asha",
        "p.yaml",
        "k",
    )
    decisions = [k for k in tune_space if k != "augment.kind"]
    assert len(decisions) == 3 * 2 * 3  # op, prob, magnitude per stage
    point = spaces.first_point(tune_space)
    point.update({"augment.1.0.op": "rotate", "augment.1.0.prob": 0.7, "augment.1.0.magnitude": 0.30000000000000004})
    policy = spaces.overrides(point)["training"]["augment"]
    assert policy["kind"] == "subpolicies"
    assert [len(s) for s in policy["sub_policies"]] == [2, 2, 2]
    assert policy["sub_policies"][1][0] == {"op": "rotate", "prob": 0.7, "magnitude": 0.3}
    from components.augment.policy import policy_from_dict

    assert policy_from_dict(policy).kind == "subpolicies"  # a valid training.augment


def test_randaugment_and_pba_spaces():
    ra = spaces.tune_space({"training.augment": {"policy_space": "randaugment", "n": [1, 3]}}, "tpe_asha", "p", "k")
    assert ra["augment.n"].lower == 1 and ra["augment.n"].upper == 4
    assert spaces.assemble_policy({"augment.kind": "randaugment", "augment.n": 2, "augment.m": 0.35}) == {
        "kind": "randaugment",
        "n": 2,
        "m": 0.35,
    }
    pba = spaces.tune_space({"training.augment": {"policy_space": "pba", "ops": ["rotate", "invert"]}}, "pbt", "p", "k")
    assert pba == {
        "augment.kind": "pba",
        "augment.rotate.prob": 0.0,
        "augment.rotate.magnitude": 0.0,
        "augment.invert.prob": 0.0,
        "augment.invert.magnitude": 0.0,
    }  # PBA starts from no augmentation
    policy = spaces.assemble_policy({**pba, "augment.rotate.prob": 0.3})
    assert policy["schedule"][0]["ops"][0] == {"op": "rotate", "prob": 0.3, "magnitude": 0.0}


def test_pba_exploration_stays_on_the_grid_and_moves_at_most_three_steps():
    explore = explore_fn(resample_probability=0.0, seed=1)
    config = {"augment.rotate.prob": 0.5, "augment.rotate.magnitude": 0.0, "training.optimizer.lr": 0.1}
    moved = set()
    for _ in range(200):
        new = explore(dict(config))
        assert new["training.optimizer.lr"] == 0.1  # only policy values are explored
        for key in ("augment.rotate.prob", "augment.rotate.magnitude"):
            assert 0.0 <= new[key] <= 1.0
            assert abs(new[key] * 10 - round(new[key] * 10)) < 1e-6  # tenths
            assert abs(new[key] - config[key]) <= 0.3 + 1e-9
            moved.add(round(new[key] - config[key], 6))
    assert {-0.3, 0.3, 0.0} <= moved
    resampled = [explore_fn(1.0, s)({"augment.rotate.prob": 0.5})["augment.rotate.prob"] for s in range(60)]
    assert max(resampled) - min(resampled) > 0.6  # resampling draws from the whole range


def test_pba_schedule_is_the_lineage_as_fractions_of_training():
    def pba(p):
        ops = [{"op": "rotate", "prob": p, "magnitude": 0.1}]
        return {"kind": "pba", "schedule": [{"from_fraction": 0.0, "ops": ops}]}

    lineage = [
        {"from_epoch": 0, "augment": pba(0.0)},
        {"from_epoch": 2, "augment": pba(0.2)},
        {"from_epoch": 2, "augment": pba(0.4)},  # replaced before an epoch ran under 0.2
        {"from_epoch": 3, "augment": pba(0.4)},  # unchanged: no new step
        {"from_epoch": 6, "augment": pba(0.6)},
    ]
    schedule = schedule_from_lineage(lineage, epochs=8)
    assert [s["from_fraction"] for s in schedule["schedule"]] == [0.0, 0.25, 0.75]
    assert [s["ops"][0]["prob"] for s in schedule["schedule"]] == [0.0, 0.4, 0.6]
    from components.augment.policy import policy_from_dict

    assert policy_from_dict(schedule).kind == "pba"


def test_search_config_merges_defaults_and_validates(params):
    p = _with_search(params, space={"training.optimizer.lr": {"uniform": [0.01, 0.1]}}, epochs=3)
    search = load_search(p, "classifier")
    assert search.epochs == 3
    assert search.max_concurrent_trials == params["search"]["max_concurrent_trials"]
    assert search.trial_training == params["search"]["trial_training"]
    assert load_search(params, "classifier_gc") is None
    with pytest.raises(ConfigError, match=r"runs\.classifier\.search\.algorithm"):
        load_search(_with_search(params, algorithm="bayes", space={"x": 1}), "classifier")
    with pytest.raises(ConfigError, match="pbt needs a space"):
        load_search(_with_search(params, algorithm="pbt", num_samples=2), "classifier")
    with pytest.raises(ConfigError, match="population"):
        load_search(_with_search(params, algorithm="pbt", num_samples=1, space={"x": 1}), "classifier")


def test_a_typo_in_a_searched_key_fails_before_any_trial(params):
    p = _with_search(params, space={"training.optimizer.lrr": {"uniform": [0.01, 0.1]}})
    with pytest.raises(ConfigError, match=r"training\.optimizer\.lrr: unknown key"):
        validate_search(p, "classifier", load_search(p, "classifier"), "params.yaml")
    p = _with_search(params, space={"training.augment": {"policy_space": "subpolicies"}})
    p["runs"]["simclr"]["search"] = p["runs"]["classifier"]["search"]
    with pytest.raises(ConfigError, match="makes its own views"):
        validate_search(p, "simclr", load_search(p, "simclr"), "params.yaml")


def test_an_empty_space_is_the_methods_default(params):
    p = _with_search(params)  # no space: the classifier's own (dropout)
    space = validate_search(p, "classifier", load_search(p, "classifier"), "params.yaml")
    assert set(space) == {"config.dropout"} and space["config.dropout"].upper == 0.3
    p["runs"]["retinanet"]["search"] = {}
    with pytest.raises(ConfigError, match="no default search space"):
        validate_search(p, "retinanet", load_search(p, "retinanet"), "params.yaml")


def test_trial_overrides_apply_trial_training_and_the_search_budget(params):
    p = _with_search(params, space={"training.optimizer.lr": {"uniform": [0.01, 0.1]}}, epochs=3)
    search = load_search(p, "classifier")
    over = trial_overrides(search, {"training.optimizer.lr": 0.05})
    spec = load_run_spec(p, "classifier", overrides=over, overrides_source="trial")
    assert spec.training.epochs == 3 and spec.training.eval_every == 1
    assert spec.training.optimizer.lr == 0.05
    assert spec.training.scaling.num_workers == 1  # the search defaults' trial_training
    final = load_run_spec(p, "classifier", overrides=spaces.overrides({"training.optimizer.lr": 0.05}))
    assert final.training.epochs == params["runs"]["classifier"].get("training", {}).get("epochs", 8)


def test_overrides_with_unknown_sections_name_the_file(params):
    with pytest.raises(ConfigError, match=r"best\.yaml: model: unknown key"):
        load_run_spec(params, "classifier", overrides={"model": {}}, overrides_source="best.yaml")


def test_a_run_named_tune_is_refused(params):
    p = copy.deepcopy(params)
    p["runs"]["tune"] = p["runs"]["classifier"]
    with pytest.raises(ConfigError, match="reserved"):
        load_run_spec(p, "tune")


def test_search_defaults_in_params_validate(params):
    search = from_dict(SearchConfig, {**params["search"], "space": {"x": 1}}, source="params.yaml", key="search")
    assert search.max_concurrent_trials >= 1


# --- real searches -------------------------------------------------------------------------------


def _search_project(tmp_path, tiny_params, **search) -> tuple[Path, dict]:
    p = copy.deepcopy(tiny_params)
    p["runs"] = {"classifier": p["runs"]["classifier"]}
    p["pretrain"] = {}
    p["runs"]["classifier"]["search"] = search
    p["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    p["storage"]["path"] = str(tmp_path / "ray_results")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path, p


def _tune_command(params_path: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.tune", "--run", "classifier", "--params", str(params_path)] + [
        "--data",
        str(data),
        "--out",
        str(out),
    ]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _child_runs(db_path: Path) -> list[tuple[str, str, str]]:
    """(trial_id, run id, status) of every trial's MLflow run."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return db.execute(
            "select t.value, r.run_uuid, r.status from runs r join tags t on r.run_uuid = t.run_uuid "
            "where t.key = 'trial_id'"
        ).fetchall()


def _child_runs_while_starting(db_path: Path) -> list[tuple[str, str, str]]:
    """As _child_runs, but empty while MLflow is still creating the database or its schema."""
    if not db_path.exists():
        return []
    try:
        return _child_runs(db_path)
    except sqlite3.OperationalError:  # file created, tables not yet migrated, or locked mid-migration
        return []


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(tmp_path, tiny_dataset, tiny_params):
    samples, epochs = 3, 2
    params_path, _ = _search_project(
        tmp_path,
        tiny_params,
        algorithm="tpe_asha",
        num_samples=samples,
        epochs=epochs,
        max_concurrent_trials=1,
        space={"training.optimizer.lr": {"loguniform": [0.01, 0.3]}},
    )
    out, db = tmp_path / "tune_out", tmp_path / "mlflow.db"
    cmd = _tune_command(params_path, tiny_dataset, out)
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    try:
        while time.time() < deadline and first.poll() is None:
            done = [r for r in _child_runs_while_starting(db) if r[2] in ("FINISHED", "KILLED")]
            if done:
                time.sleep(3)  # Tune saves the experiment's state every second (TUNE_GLOBAL_CHECKPOINT_S)
                break
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    assert done, "no trial finished before the deadline"
    assert not (out / "best.yaml").exists()  # nothing written as if complete
    finished_before = {trial: run for trial, run, _ in done}  # ended at least 3 s before the kill
    started_before = len(_child_runs(db))
    assert started_before < samples

    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(resumed)" in second.stdout

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("digits/classification")
    parents = client.search_runs([experiment.experiment_id], "tags.stage = 'tune'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    experiments = [d for d in (tmp_path / "ray_results").iterdir() if d.name.count("-") == 2]
    assert [d.name for d in experiments] == [f"tune-classifier-{parents[0].info.run_id[:12]}"]  # restored, not new
    children = _child_runs(db)
    trial_ids = [trial for trial, _, _ in children]
    assert len(trial_ids) == samples and len(set(trial_ids)) == samples  # no duplicate runs
    by_trial = {trial: run for trial, run, _ in children}
    summary = yaml.safe_load((out / "summary.json").read_text())
    for trial, run_id in finished_before.items():
        assert by_trial[trial] == run_id
        run = client.get_run(run_id)
        assert "tune.reopened" not in run.data.tags  # a finished trial was not run again
        steps = [m.step for m in client.get_metric_history(run_id, "val/top1")]
        assert sorted(steps) == list(range(len(steps))) and len(steps) <= epochs  # one point per epoch, once
    statuses = {t["trial_id"]: t["status"] for t in summary["trials"]}
    assert len(statuses) == samples
    expected = {"completed": "FINISHED", "pruned": "KILLED"}
    for trial, run_id in by_trial.items():
        assert client.get_run(run_id).info.status == expected[statuses[trial]]
    assert summary["counts"]["completed"] >= 1

    best = yaml.safe_load((out / "best.yaml").read_text())
    best_values = {t["trial_id"]: t["best_value"] for t in summary["trials"]}
    assert best["best_value"] == max(best_values.values()) == best_values[best["best_trial"]]
    assert best["mlflow_parent_run_id"] == parents[0].info.run_id
    assert set(best["overrides"]) == {"training"} and "lr" in best["overrides"]["training"]["optimizer"]
    for name in ("search.png", "trials.csv"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_population_based_augmentation_finds_a_schedule(tmp_path, tiny_dataset, tiny_params):
    from components.search.tuner import run_search
    from components.training.driver import load_platform

    _, p = _search_project(
        tmp_path,
        tiny_params,
        algorithm="pbt",
        num_samples=2,
        epochs=3,
        pbt={"perturbation_interval": 1, "quantile_fraction": 0.5},
        space={"training.augment": {"policy_space": "pba", "ops": ["rotate", "invert", "contrast"]}},
    )
    out = tmp_path / "pba"
    outcome = run_search(p, "classifier", load_search(p, "classifier"), load_platform(p), tiny_dataset, out)
    augment = outcome.best["overrides"]["training"]["augment"]
    assert augment["kind"] == "pba"
    assert augment["schedule"][0]["from_fraction"] == 0.0
    assert {op["op"] for op in augment["schedule"][0]["ops"]} == {"rotate", "invert", "contrast"}
    assert outcome.summary["counts"] == {"completed": 2, "pruned": 0, "errored": 0, "trials": 2, "epochs_total": 6}
    # Synchronous PBT over two members: after every epoch the weaker copies the stronger's weights
    # and explores its policy, so a checkpoint trained after an exploit has a longer lineage.
    import torch

    lineages = [
        torch.load(state, weights_only=True)["augment_schedule"]
        for state in (tmp_path / "ray_results").glob("tune-classifier-*/*/checkpoint_*/state.pt")
    ]
    assert lineages and max(len(lineage) for lineage in lineages) >= 2
    assert any(op["prob"] > 0 for lineage in lineages for e in lineage for op in e["augment"]["schedule"][0]["ops"])
    assert (out / "policy.png").stat().st_size > 0
    spec = load_run_spec(p, "classifier", overrides=outcome.best["overrides"], overrides_source="best.yaml")
    assert spec.training.augment.kind == "pba"
