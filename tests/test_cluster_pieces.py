"""The pieces of running on a cluster that need no cluster: checkpoint storage on S3, the dataset
staged for workers on other machines, the job submission wrapper, and SIGTERM ending a run FAILED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from components.storage.cluster import RayStorage, local_dataset, ray_storage, stage_dataset
from components.storage.s3 import list_objects, s3_client
from components.tracking.mlflow_run import GIT_COMMIT_ENV, git_commit
from pipelines.cluster_job import api_address, job_entrypoint, job_runtime_env
from tests.conftest import ROOT
from tests.s3_server import s3_endpoint_fixture  # noqa: F401


def test_ray_storage_local_and_s3(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.chdir(tmp_path)
    local = ray_storage("ray_results")
    assert local.uri == str(tmp_path.resolve() / "ray_results")
    assert local.run_config_args() == {"storage_path": local.uri, "storage_filesystem": None}
    aws = ray_storage("s3://bucket/ray")  # AWS itself: Ray infers the filesystem from the URI
    assert aws.run_config_args() == {"storage_path": "s3://bucket/ray", "storage_filesystem": None}
    compat = ray_storage("s3://bucket/ray/", "http://127.0.0.1:9000")
    args = compat.run_config_args()
    assert args["storage_path"] == "bucket/ray"  # with an explicit filesystem, no scheme
    assert type(args["storage_filesystem"]).__name__ == "S3FileSystem"
    assert compat.ray_path("tune-x") == "bucket/ray/tune-x"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")  # the environment wins over params
    assert ray_storage("s3://bucket/ray", "http://127.0.0.1:9000").endpoint_url == "http://127.0.0.1:9999"
    with pytest.raises(ValueError, match="no bucket"):
        ray_storage("s3:///ray")
    with pytest.raises(ValueError, match="http"):
        RayStorage("s3://bucket/ray", "127.0.0.1:9000").filesystem()


def test_dataset_staged_once_and_fetched_once_per_node(s3_endpoint, tiny_dataset, tmp_path, monkeypatch):
    from components.data.canonical import read_info

    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="bkt")
    info = read_info(tiny_dataset)
    storage = RayStorage("s3://bkt/ray", s3_endpoint)
    assert stage_dataset(tiny_dataset, info.name, info.checksum, RayStorage(str(tmp_path))) is None  # local: as is
    uri = stage_dataset(tiny_dataset, info.name, info.checksum, storage)
    assert uri == f"s3://bkt/ray/datasets/{info.name}-{info.checksum[:16]}"
    keys = [k for k, _ in list_objects(client, uri)]
    files = sorted(p for p in tiny_dataset.rglob("*") if p.is_file())
    assert len(keys) == len(files)
    # Staged again (another run, same data): nothing is uploaded, the manifest marks it complete.
    client.delete_object(Bucket="bkt", Key=[k for k in keys if not k.endswith("manifest.json")][0])
    assert stage_dataset(tiny_dataset, info.name, info.checksum, storage) == uri
    assert len(list_objects(client, uri)) == len(files) - 1
    # A node downloads a complete copy once; it reads as the same dataset.
    complete = stage_dataset(tiny_dataset, info.name, "f" * 64, storage)
    monkeypatch.setenv("CVFLOW_DATA_CACHE", str(tmp_path / "cache"))
    local = local_dataset(complete, s3_endpoint)
    assert local.is_relative_to(tmp_path / "cache")
    assert read_info(local).checksum == info.checksum
    assert len([p for p in local.rglob("*") if p.is_file()]) == len(files)
    stamp = (local / "manifest.json").stat().st_mtime_ns
    assert local_dataset(complete, s3_endpoint) == local
    assert (local / "manifest.json").stat().st_mtime_ns == stamp  # not downloaded again


def test_job_runtime_env_forwards_only_non_secret_variables(tmp_path):
    env = job_runtime_env(ROOT, ["MLFLOW_TRACKING_URI"], {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert env["working_dir"] == str(ROOT)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"][GIT_COMMIT_ENV] == git_commit(ROOT)
    for secret in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "WANDB_API_KEY"):
        with pytest.raises(ValueError, match=f"--env {secret}: looks like a credential"):
            job_runtime_env(ROOT, [secret], {secret: "x"})
    with pytest.raises(ValueError, match="--env NOPE: not set"):
        job_runtime_env(ROOT, ["NOPE"], {})
    with pytest.raises(ValueError, match="RAY_API_SERVER_ADDRESS"):
        api_address(None, {})
    assert api_address(None, {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265"
    assert api_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:8265", "RAY_ADDRESS": "b"}) == "http://a:8265"
    assert job_entrypoint(["dvc", "repro", "train@x"]) == "python -m pipelines.cluster_job run -- dvc repro train@x"


def test_git_commit_from_the_environment_outside_git(tmp_path, monkeypatch):
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc123")
    assert git_commit(tmp_path) == "abc123"  # a Ray job's copy has no .git
    assert git_commit(ROOT) != "abc123"  # a checkout says its own commit


def test_sigterm_ends_the_run_failed_with_the_reason(tiny_dataset, tiny_params, tmp_path):
    """`ray job stop` or a pod eviction sends SIGTERM: the stage's MLflow run ends FAILED with the
    reason, not RUNNING (training is replaced by a long sleep; the signal lands in the driver)."""
    from mlflow import MlflowClient

    params = tmp_path / "params.yaml"
    tiny = {**tiny_params, "mlflow": {**tiny_params["mlflow"], "tracking_uri": f"sqlite:///{tmp_path}/m.db"}}
    params.write_text(yaml.safe_dump(tiny, sort_keys=False))
    code = (
        "import sys, time\n"
        "import components.training.driver as d\n"
        "d.fit = lambda *a, **k: time.sleep(120)\n"
        "from pipelines.train import main\n"
        f"sys.exit(main(['--run', 'classifier', '--params', {str(params)!r}, '--data', {str(tiny_dataset)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    deadline = time.monotonic() + 120
    runs = []
    while time.monotonic() < deadline and not runs:
        time.sleep(0.5)
        exp = client.get_experiment_by_name("digits/classification") if (tmp_path / "m.db").exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
    assert runs, "the run never started"
    time.sleep(1.0)  # inside fit()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FAILED"
    assert "terminated by signal SIGTERM" in run.data.tags["error"]
