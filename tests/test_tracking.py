"""MLflow conventions against a real (SQLite-backed) tracking store and model registry."""

from __future__ import annotations

import json

import pytest

from components.tracking import mlflow_run as tracking


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
