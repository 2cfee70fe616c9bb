"""MLflow conventions against a real (SQLite-backed) tracking store and model registry."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from components.tracking import mlflow_run as tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def client(tmp_path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _version(client, name: str) -> str:
    exp = client.create_experiment("e") if not client.get_experiment_by_name("e") else None
    exp = exp or client.get_experiment_by_name("e").experiment_id
    run = client.create_run(exp)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_champion_alias_goes_to_the_best_version(client, higher_is_better):
    name, key = "digits-classifier", "val/top1"
    sign = 1 if higher_is_better else -1
    v1 = _version(client, name)
    assert tracking.update_champion(client, name, v1, key, 0.5 * sign, higher_is_better, "champion")
    v2 = _version(client, name)
    assert not tracking.update_champion(client, name, v2, key, 0.4 * sign, higher_is_better, "champion")
    assert client.get_model_version_by_alias(name, "champion").version == v1
    v3 = _version(client, name)
    assert tracking.update_champion(client, name, v3, key, 0.9 * sign, higher_is_better, "champion")
    assert client.get_model_version_by_alias(name, "champion").version == v3
    assert client.get_model_version(name, v2).tags[key] == str(0.4 * sign)


def test_resumable_run_is_the_newest_unfinished_with_the_fingerprint(client):
    exp = client.create_experiment("e")
    done = client.create_run(exp, tags={"fingerprint": "abc"})
    client.set_terminated(done.info.run_id, "FINISHED")
    assert tracking.find_resumable_run(client, exp, "abc") is None
    crashed = client.create_run(exp, tags={"fingerprint": "abc"})
    client.set_terminated(crashed.info.run_id, "FAILED")
    client.create_run(exp, tags={"fingerprint": "other"})
    assert tracking.find_resumable_run(client, exp, "abc") == crashed.info.run_id


def test_secrets_are_redacted_from_params():
    flat = tracking.redact({"storage": {"aws_secret_access_key": "s3cr3t", "path": "s3://b"}, "mlflow": {"token": "t"}})
    assert flat["storage.aws_secret_access_key"] == tracking.REDACTED and flat["mlflow.token"] == tracking.REDACTED
    assert flat["storage.path"] == "s3://b"


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri(tracking.MlflowParams(tracking_uri="sqlite:///mlflow.db"), tmp_path)
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(tracking.MlflowParams(), tmp_path) == "http://127.0.0.1:5000"


def test_telemetry_off_by_default_and_switchable(monkeypatch):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    tracking.apply_privacy_defaults(telemetry=False)
    assert tracking.os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")
    tracking.apply_privacy_defaults(telemetry=True)
    assert tracking.os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # the user's own setting is kept
    tracking.apply_privacy_defaults(telemetry=True)
    assert tracking.os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_runs_view_shows_each_metric_s_aggregates_and_sorts_by_the_first(client):
    view = tracking.runs_view(["mAP", "mAP_50"])
    assert view["selectedColumns"][:6] == [
        "attributes.`Dataset`",
        "metrics.`test/mAP_mean`",
        "metrics.`test/mAP_ci_low`",
        "metrics.`test/mAP_ci_high`",
        "metrics.`test/mAP_n`",
        "metrics.`best/mAP_mean`",
    ]
    assert "metrics.`test/mAP_50_mean`" in view["selectedColumns"]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`test/mAP_mean`", False)


def test_saved_runs_view_is_written_once_and_replaced_when_it_changes(client):
    exp = client.create_experiment("digits/detection")
    key = tracking.VIEW_TAG_PREFIX + tracking.VIEW_KEY
    tracking.save_runs_view(client, exp, ["mAP"])
    first = client.get_experiment(exp).tags[key]
    assert json.loads(first) == tracking.runs_view(["mAP"])
    client.set_experiment_tag(exp, "marker", "1")
    tracking.save_runs_view(client, exp, ["mAP"])  # unchanged: not rewritten
    assert client.get_experiment(exp).tags[key] == first
    tracking.save_runs_view(client, exp, ["top1"])
    assert json.loads(client.get_experiment(exp).tags[key])["orderByKey"] == "metrics.`test/top1_mean`"


def test_ui_links_open_each_tracked_experiment_on_its_runs_view(client, tmp_path):
    from pipelines.ui import links

    exp = client.create_experiment("digits/classification")
    client.create_experiment("Default-ish")  # no saved view: not a training experiment of ours
    tracking.save_runs_view(client, exp, ["top1"])
    lines = links(f"sqlite:///{tmp_path}/mlflow.db", "http://127.0.0.1:5123")
    assert len(lines) == 1 and "digits/classification" in lines[0]
    assert lines[0].endswith(
        f"http://127.0.0.1:5123/#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=seeds"
    )


# A stage's process: MLflow imported, then (once every stage is ready) the store opened at once.
_STAGE = """
import sys, time
from pathlib import Path
import mlflow.store.model_registry.sqlalchemy_store, mlflow.store.tracking.sqlalchemy_store
from mlflow import MlflowClient
from components.tracking import mlflow_run as tracking

folder, uri, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
tracking.ready_store(uri)
client = MlflowClient(uri)
client.create_experiment(name)
client.create_registered_model(name)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    """A child's environment: this checkout importable; lock files in the test's own temp folder."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}


def test_stages_opening_a_fresh_sqlite_store_together_all_get_it(tmp_path):
    """Without the lock, all but one of these fail in MLflow's migrations (``table ... already exists``)."""
    uri, names = f"sqlite:///{tmp_path}/mlflow.db", [f"stage-{i}" for i in range(4)]
    stages = [
        subprocess.Popen(
            [sys.executable, "-c", _STAGE, str(tmp_path), uri, name],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < len(names) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in stages), [p.communicate()[0][-2000:] for p in stages]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=60)[0] for p in stages]
    finally:
        for p in stages:
            p.kill()
    assert [p.returncode for p in stages] == [0] * len(names), [out[-2000:] for out in outputs]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert {e.name for e in client.search_experiments()} >= set(names)
    assert {m.name for m in client.search_registered_models()} == set(names)


_WAITER = """
import sys
from components.tracking import mlflow_run as tracking

print("opening the store", flush=True)
tracking.ready_store(sys.argv[1])
"""


def test_a_store_whose_lock_is_held_waits_and_touches_nothing(tmp_path, monkeypatch):
    import fcntl

    env = _env(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])  # the child's temp folder, so its lock file
    db = tmp_path / "mlflow.db"
    with open(tracking.store_lock_path(db), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = subprocess.Popen(
            [sys.executable, "-c", _WAITER, f"sqlite:///{db}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout.readline() == "opening the store\n", child.communicate()[1][-2000:]
            time.sleep(3)
            assert child.poll() is None and not db.exists()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-2000:]
    assert {"alembic_version", "experiments", "registered_models"} <= _tables(db)


def test_a_store_that_is_not_sqlite_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uris = ["http://127.0.0.1:5000", "postgresql://mlflow@db/mlflow", f"file://{tmp_path}/mlruns", "sqlite://"]
    for uri in uris:
        tracking.ready_store(uri)
    assert list(tmp_path.iterdir()) == []  # no lock file, no store
    assert not tracking._READY_STORES & set(uris)


def test_use_tracking_points_mlflow_at_ready_stores(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # MLflow exports the URIs it is set to
        monkeypatch.setenv(var, "")
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    registry = f"sqlite:///{tmp_path.resolve()}/registry.db"
    uri = tracking.use_tracking(tracking.MlflowParams(tracking_uri="sqlite:///mlflow.db", registry_uri=registry))
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" == mlflow.get_tracking_uri()
    assert mlflow.get_registry_uri() == registry
    for db in ("mlflow.db", "registry.db"):
        assert {"alembic_version", "experiments", "registered_models"} <= _tables(tmp_path / db)
    assert {uri, registry} <= tracking._READY_STORES
