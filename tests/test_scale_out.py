"""Scale-out on a real multi-node Ray cluster on 127.0.0.1 (infra/local/stack.sh): a Ray head
and two worker nodes with token authentication, an MLflow server with basic auth, artifacts and
checkpoints in an S3-compatible server. The pipeline is submitted as a Ray job; training survives
a killed worker process and a lost node; a run that cannot recover ends FAILED; concurrent
writers lose no metric points; no credential reaches MLflow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, shrink
from tests.local_stack import kill, local_stack, wait_for
from tests.test_pipeline import _copy_project

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cpu_hog")]  # beside a busy core
BUCKET = "cvflow"  # stack.sh's default bucket
SEARCHES = {  # tune@classifier on the cluster: two trials of one epoch, then train@classifier with the best
    "classifier": {
        "algorithm": "tpe_asha",
        "num_samples": 2,
        "epochs": 1,
        "space": {
            "training.optimizer.lr": {"loguniform": [0.01, 0.3]},
            "training.augment": {"policy_space": "randaugment", "n": [1, 2]},
        },
    }
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with local_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory, tiny_params) -> Path:
    """Digits with enough crops that an epoch lasts about a second: time to hit one mid-epoch."""
    from components.config import from_dict
    from components.data import digits

    cfg = from_dict(digits.DigitsConfig, {**tiny_params["datasets"]["digits"], "max_per_class": 40}, source="test")
    out = tmp_path_factory.mktemp("fault-data") / "digits"
    digits.generate(out, cfg)
    return out


def _s3_keys(stack, prefix: str) -> list[str]:
    from components.storage.s3 import list_objects, s3_client

    with stack.client_env():
        return [key for key, _ in list_objects(s3_client(), f"s3://{BUCKET}/{prefix}")]


def _mlflow(stack):
    from mlflow import MlflowClient

    return MlflowClient(stack.env["MLFLOW_TRACKING_URI"])


def _runs(stack, experiment: str, run_name: str) -> list:
    """The training runs of entry ``run_name`` (its seeds' runs; one seed here), or the runs of
    that name (``tune-<run>``, a search's parent)."""
    client = _mlflow(stack)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    if run_name.startswith("tune-"):
        return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.run = '{run_name}' and tags.run_kind = 'seed'")


# ----------------------------------------------------------------------------- the pipeline as a Ray job


def test_pipeline_as_ray_job_tracks_to_the_server_and_stores_in_s3(stack, tmp_path, params):
    project = tmp_path / "project"
    project.mkdir()
    _copy_project(project)
    tiny = shrink(params, epochs=2)
    # Two more runs on one worker each, ready at once: the runner starts both, and Ray places their
    # worker groups on the two worker nodes side by side.
    tiny["training"]["scaling"]["num_workers"] = 1
    tiny["runs"] = {
        "classifier": {**tiny["runs"]["classifier"], "search": SEARCHES["classifier"]},
        "classifier_gc": tiny["runs"]["classifier_gc"],
        "classifier_seed1": {**tiny["runs"]["classifier"], "training": {"seed": 1}},
    }
    tiny["pretrain"] = {}
    tiny["storage"]["dvc_remote"]["url"] = f"s3://{BUCKET}/dvc"
    (project / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=project, check=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny project"], cwd=project, check=True)

    job = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cluster_job", "submit", "--working-dir", str(project)],
        cwd=ROOT,
        env=stack.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    nodes_training_at_once = 0
    reader = threading.Thread(target=lambda: setattr(job, "log", job.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 900
    while job.poll() is None and time.monotonic() < deadline:
        raylets = set()
        for worker in stack.train_workers():
            with suppress(Exception):  # exited meanwhile
                raylets.add(worker.ppid())
        nodes_training_at_once = max(nodes_training_at_once, len(raylets))
        time.sleep(0.3)
    if job.poll() is None:
        job.kill()
    reader.join(timeout=30)
    log = getattr(job, "log", "")
    assert job.returncode == 0, log[-6000:]
    assert "Running stage 'tune@classifier'" in log and "Running stage 'train@classifier'" in log
    # The job ran the pipeline's runner: two runs trained at the same time on different nodes.
    assert "one local Ray" not in log and "start   train@classifier_seed1" in log
    assert nodes_training_at_once == 2, "no moment with Ray Train workers on both worker nodes"

    with stack.client_env():
        client = _mlflow(stack)
        for other in ("classifier_gc", "classifier_seed1"):
            assert [r.info.status for r in _runs(stack, "digits/classification", other)] == ["FINISHED"]
        [run] = _runs(stack, "digits/classification", "classifier")
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] != "unknown"  # the submitter's commit, though .git stays home
        assert "test/top1" in run.data.metrics
        [parent] = _runs(stack, "digits/classification", "tune-classifier")
        assert run.data.tags["tuned_by"] == parent.info.run_id
        children = client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        # Artifacts go through the server into S3; the registry holds the model.
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "config.yaml", "curves.png"} <= names
        version = client.get_model_version_by_alias("digits-classifier", "champion")
        same_method = [r.info.run_id for n in ("classifier", "classifier_gc", "classifier_seed1")
                       for r in _runs(stack, "digits/classification", n)]  # fmt: skip
        assert version.run_id in same_method
    mlflow_keys = _s3_keys(stack, "mlflow")
    assert any(k.endswith("/metrics.json") for k in mlflow_keys)
    assert any("/MLmodel" in k for k in mlflow_keys)
    # Checkpoints of Ray Train (the run and each trial) and the staged dataset are in S3 too.
    ray_keys = _s3_keys(stack, "ray")
    assert any(k.startswith(f"ray/classifier-{run.info.run_id[:12]}/checkpoint_") for k in ray_keys)
    # A one-worker trial trains in its own process: its checkpoints are in the Tune experiment's folder.
    search = f"ray/tune-classifier-{parent.info.run_id[:12]}"
    assert any(k.startswith(search) and "/checkpoint_" in k for k in ray_keys), [k for k in ray_keys if "tune" in k]
    assert any(k.startswith("ray/datasets/digits-") and k.endswith("/manifest.json") for k in ray_keys)
    # The job pushed its DVC outputs to the S3 remote.
    assert len(_s3_keys(stack, "dvc")) > 10


def test_no_credential_reaches_mlflow(stack, tmp_path):
    """Runs started with S3, MLflow and Ray credentials in their environment: none of those values
    is in any run's params or tags, nor in any artifact file of any run."""
    from mlflow.artifacts import download_artifacts

    with stack.client_env():
        client = _mlflow(stack)
        experiments = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in experiments])
        assert runs, "no runs to check: the job test runs first"
        values = [v.encode() for v in stack.secrets.values()]
        for run in runs:
            text = json.dumps({"params": run.data.params, "tags": run.data.tags})
            for name, value in stack.secrets.items():
                assert value not in text, f"{name} in run {run.info.run_id}'s params or tags"
        # Every artifact of every run, and every registered model (MLflow keeps those apart).
        sources = [{"run_id": run.info.run_id} for run in runs]
        for model in client.search_registered_models():
            for version in client.search_model_versions(f"name = '{model.name}'"):
                sources.append({"artifact_uri": f"models:/{model.name}/{version.version}"})
        checked = []
        for i, source in enumerate(sources):
            dest = tmp_path / str(i)
            dest.mkdir()
            # The stack's server, not a URI an earlier test set process-wide (it outranks the env)
            uri = stack.env["MLFLOW_TRACKING_URI"]
            download_artifacts(**source, dst_path=str(dest), tracking_uri=uri, registry_uri=uri)
            for path in (p for p in dest.rglob("*") if p.is_file()):
                data = path.read_bytes()
                assert not any(v in data for v in values), f"a credential in {source}: {path.relative_to(dest)}"
                checked.append(path.name)
    # configs, search outputs, figures, and the model: pickled, with the project's code beside it
    assert {"config.yaml", "best.yaml", "curves.png", "MLmodel", "model.pth", "mlflow_run.py"} <= set(checked)


# ----------------------------------------------------------------------------- fault tolerance


FAULT_EPOCHS = 8


def _fault_params(params: dict, name: str, *, max_failures: int, epochs: int = FAULT_EPOCHS) -> dict:
    tiny = shrink(params, epochs=epochs)
    run = {**tiny["runs"]["classifier"], "training": {"failure": {"max_failures": max_failures}}}
    tiny["runs"] = {name: run}
    tiny["pretrain"] = {}
    tiny["mlflow"]["register_models"] = False  # the registry is the job test's; here only the run counts
    tiny["training"].update(batch_size=32, eval_every=1)
    tiny["training"]["scaling"].update(num_workers=2)
    return tiny


def _start_driver(stack, tmp_path: Path, params: dict, run: str, data: Path) -> subprocess.Popen:
    """``python -m pipelines.train`` on this machine as the cluster's driver (RAY_ADDRESS)."""
    path = tmp_path / f"{run}.params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = stack.environ(RAY_ADDRESS=f"127.0.0.1:{stack.ray_port}", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pipelines.train", "--run", run, "--params", str(path), "--data", str(data)]
    log = open(tmp_path / f"{run}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_driver(proc: subprocess.Popen, tmp_path: Path, run: str, timeout: float = 300) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, (tmp_path / f"{run}.log").read_text()


def _epochs_logged(stack, run_name: str) -> int:
    runs = _runs(stack, "digits/classification", run_name)
    if not runs:
        return 0
    return len(_mlflow(stack).get_metric_history(runs[0].info.run_id, "time/epoch_s"))


def _assert_one_finished_run(stack, name: str, epochs: int):
    with stack.client_env():
        runs = _runs(stack, "digits/classification", name)
        assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}"
        run = runs[0]
        assert run.info.status == "FINISHED"
        history = _mlflow(stack).get_metric_history(run.info.run_id, "val/top1")
        assert sorted(m.step for m in history) == list(range(epochs))  # every epoch once, none twice
        return run


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory, params, fault_data):
    """The same run as the fault drills, uninterrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _fault_params(params, "ft_reference", max_failures=2)
    code, log = _wait_driver(_start_driver(stack, tmp, cfg, "ft_reference", fault_data), tmp, "ft_reference")
    assert code == 0, log[-3000:]
    with stack.client_env():
        [run] = _runs(stack, "digits/classification", "ft_reference")
    return run.data.metrics


def test_lost_worker_process_and_lost_worker_node_resume_from_checkpoint(
    stack, tmp_path, params, fault_data, reference
):
    """DDP over two worker nodes. Mid-run a training worker process is killed; later the raylet of
    a node running a worker is killed (the node and all its workers are gone) and a replacement
    node joins, as an autoscaler would add one. Each time Ray Train restarts the worker group from
    the last checkpoint in S3: one MLflow run, FINISHED, every epoch logged once, and the result of
    the uninterrupted run within noise."""
    name = "ft_interrupted"
    proc = _start_driver(stack, tmp_path, _fault_params(params, name, max_failures=2), name, data=fault_data)
    log = tmp_path / f"{name}.log"
    with stack.client_env():
        client = _mlflow(stack)

        def reached(epochs: int):
            return _epochs_logged(stack, name) >= epochs or proc.poll() is not None

        wait_for(lambda: reached(2), 240, f"{name}'s 2nd epoch")
        assert proc.poll() is None, log.read_text()[-3000:]
        kill(wait_for(stack.train_workers, 30, "a Ray Train worker process")[-1])
        [run] = _runs(stack, "digits/classification", name)
        wait_for(lambda: "resumed_from_epoch" in client.get_run(run.info.run_id).data.tags, 120, "a resume")
        first_resume = int(client.get_run(run.info.run_id).data.tags["resumed_from_epoch"])
        # Two epochs of the resumed attempt: on a busy machine the surviving worker can log an epoch
        # more before the worker group stops, and those points do not count.
        logged_at_resume = _epochs_logged(stack, name)
        wait_for(lambda: reached(max(first_resume + 3, logged_at_resume + 2)), 240, "two more epochs")
        assert proc.poll() is None, log.read_text()[-3000:]
        raylet = wait_for(stack.train_workers, 30, "a Ray Train worker process")[-1].parent()
        assert raylet.name() == "raylet"
        kill(raylet)
        stack.add_worker_node(f"replacement-{int(time.time())}")
    code, text = _wait_driver(proc, tmp_path, name)
    assert code == 0, text[-4000:]
    run = _assert_one_finished_run(stack, name, epochs=FAULT_EPOCHS)
    assert int(run.data.tags["resumed_from_epoch"]) > first_resume  # resumed a second time, further on
    assert re.fullmatch(r"[\d.]+/[0-9a-f]{12}", run.data.tags["ray.nodes_lost"])  # the killed node, said in the run
    assert "the cluster lost 1 node(s) during the run" in text
    # Every worker's RNG state is in the checkpoint: the resumed run ends where the uninterrupted one did.
    print(f"interrupted twice: {run.data.metrics}; uninterrupted: {reference}")
    for key in ("test/top1", "best/top1"):
        assert abs(run.data.metrics[key] - reference[key]) <= 0.05, (key, run.data.metrics[key], reference[key])


def test_unrecoverable_run_ends_failed_with_the_error(stack, tmp_path, params, fault_data):
    """No retries left: the worker's error (the fault drill at epoch 1) fails the run, which ends
    FAILED in MLflow with the error, not RUNNING."""
    cfg = _fault_params(params, "ft_unrecoverable", max_failures=0)
    cfg["runs"]["ft_unrecoverable"]["training"]["failure"]["fail_at_epoch"] = 1
    code, log = _wait_driver(_start_driver(stack, tmp_path, cfg, "ft_unrecoverable", fault_data), tmp_path,
                             "ft_unrecoverable")  # fmt: skip
    assert code != 0, log[-3000:]
    with stack.client_env():
        [run] = _runs(stack, "digits/classification", "ft_unrecoverable")
        assert run.info.status == "FAILED"  # never left RUNNING
        assert "fault drill" in run.data.tags["error"], run.data.tags["error"]
        assert [m.step for m in _mlflow(stack).get_metric_history(run.info.run_id, "val/top1")] == [0]


# ----------------------------------------------------------------------------- concurrent writers

WRITER = """
import json, sys, time
from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune

STEPS = int(sys.argv[1])
exp = MlflowClient().create_experiment("concurrency")


def trial(config):
    client = MlflowClient()  # in the trial's process, with the node's credentials
    run = client.create_run(exp, run_name=f"writer-{config['i']}").info.run_id
    sent = 0
    for step in range(STEPS):
        client.log_metric(run, "loss", 1.0 / (step + 1), step=step)  # one request per point
        now = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(f"m{k}", float(step * k), now, step) for k in range(5)])
        sent += 6
        tune.report({"sent": sent})
    client.set_terminated(run)


tuner = tune.Tuner(
    tune.with_resources(trial, {"cpu": 0.5}),
    param_space={"i": tune.grid_search([0, 1, 2, 3])},
    tune_config=tune.TuneConfig(max_concurrent_trials=4),
    run_config=tune.RunConfig(name="concurrency", storage_path="/tmp/cvflow-concurrency", verbose=0),
)
print("SENT", json.dumps({r.config["i"]: r.metrics["sent"] for r in tuner.fit()}))
"""


def test_concurrent_writers_lose_no_metric_points(stack, tmp_path):
    """Four Tune trials at once on the cluster's nodes, each logging per step as trials do (a
    point per request and a batch of five): the server holds every point that was sent."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "writer.py").write_text(WRITER)
    steps = 20
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(job_dir), "--",
         "python", "writer.py", str(steps)],
        env=stack.environ(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    sent = json.loads(out.split("SENT ", 1)[1].splitlines()[0])
    assert sent == {str(i): steps * 6 for i in range(4)}  # what the trials say they sent
    with stack.client_env():
        client = _mlflow(stack)
        exp = client.get_experiment_by_name("concurrency")
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.info.run_name for r in runs) == [f"writer-{i}" for i in range(4)]
        for run in runs:
            assert run.info.status == "FINISHED"
            received = client.get_metric_history(run.info.run_id, "loss")
            assert sorted(m.step for m in received) == list(range(steps))
            for k in range(5):
                history = client.get_metric_history(run.info.run_id, f"m{k}")
                assert sorted((m.step, m.value) for m in history) == [(s, float(s * k)) for s in range(steps)]
                received += history
            assert len(received) == sent[run.info.run_name.split("-")[1]]
