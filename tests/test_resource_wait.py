"""A run never waits forever for its workers: queued behind live work it waits, otherwise it fails
after ``training.scaling.resource_wait_s`` saying what holds the cluster; a run whose controller
dies leaves no reservation behind, also with a second Ray on the machine."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from components.config import ConfigError
from components.training import resources
from components.training.resources import ClusterView, Holder, describe, queued_behind_live_work
from components.training.spec import load_run_spec
from tests.conftest import ROOT

ASK = [{"CPU": 1.0}, {"CPU": 1.0}]


def _view(*holders: Holder, total=None, free=None, dead=(), error=None) -> ClusterView:
    return ClusterView(total or {"CPU": 2.0}, free or {"CPU": 0.0}, list(holders), {}, list(dead), error)


def _holder(pg="a" * 16, cpus=2.0, actors=(), owner="python -m pipelines.train --run other"):
    return Holder(pg, {"CPU": cpus}, "02000000", owner, list(actors))


def test_behind_a_live_run_the_request_stays_queued():
    view = _view(_holder(actors=["RayTrainWorker", "RayTrainWorker"]))
    assert queued_behind_live_work(ASK, view)


def test_a_reservation_nothing_alive_uses_is_not_waited_for_and_is_named():
    stale = _holder(pg="f00dfeed" * 4, actors=())
    view = _view(stale)
    assert not queued_behind_live_work(ASK, view)
    text = describe(ASK, view, 30, "train@classifier")
    assert "train@classifier" in text and "resource_wait_s" in text
    assert "2 × {CPU: 1} = {CPU: 2}" in text and "free now: {}" in text
    assert "f00dfeedf00d" in text and "python -m pipelines.train --run other" in text and "stale" in text
    assert "remove them" in text


def test_a_cluster_smaller_than_the_request_fails_and_says_it_lost_a_node():
    view = _view(total={"CPU": 1.0}, free={"CPU": 1.0}, dead=["127.0.0.1/0123456789ab"])
    assert not queued_behind_live_work(ASK, view)
    text = describe(ASK, view, 30, "train@classifier")
    assert "nodes lost: 127.0.0.1/0123456789ab" in text and "smaller than the request" in text


def test_a_live_holder_seen_in_either_look_is_live():
    first = _view(_holder(actors=["RayTrainWorker"]))
    later = _view(_holder(actors=()))
    assert queued_behind_live_work(ASK, first.merged(later))


def test_without_the_state_api_the_wait_is_not_extended():
    view = _view(error="ConnectionError: no dashboard")
    assert not queued_behind_live_work(ASK, view)
    assert "holders unknown" in describe(ASK, view, 30, "train@x")


def test_resource_wait_must_be_positive_and_is_not_part_of_the_fingerprint(tiny_params):
    params = copy.deepcopy(tiny_params)
    params["runs"]["classifier"].setdefault("training", {}).setdefault("scaling", {})["resource_wait_s"] = 0
    with pytest.raises(ConfigError, match="resource_wait_s"):
        load_run_spec(params, "classifier")
    params["runs"]["classifier"]["training"]["scaling"]["resource_wait_s"] = 5
    waited = load_run_spec(params, "classifier")
    assert waited.fingerprint("x") == load_run_spec(tiny_params, "classifier").fingerprint("x")


@pytest.fixture(autouse=True)
def _process_wide_tracking_uri_restored(monkeypatch):
    """train() sets MLflow's tracking URI for the process; it would outrank later tests' env."""
    from mlflow.tracking._tracking_service import utils as mlflow_utils

    monkeypatch.setattr(mlflow_utils, "_tracking_uri", mlflow_utils._tracking_uri)


def _one_epoch_run(tiny_params, tmp_path, resource_wait_s: float):
    from components.training.driver import load_platform

    params = copy.deepcopy(tiny_params)
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    params["storage"]["path"] = str(tmp_path / "ray_results")
    params["runs"]["classifier"].setdefault("training", {})
    params["runs"]["classifier"]["training"].update({"epochs": 1, "scaling": {"resource_wait_s": resource_wait_s}})
    return load_run_spec(params, "classifier"), load_platform(params)


@pytest.mark.slow
def test_a_run_behind_a_stale_reservation_fails_in_bounded_time_naming_it(ray_session, tiny_dataset, tiny_params,
                                                                          tmp_path):  # fmt: skip
    """The hang: CPUs reserved by a placement group that nothing alive uses. Before, the run's
    worker group waited for them without end; now the run ends FAILED after its resource wait."""
    import mlflow
    from ray.util.placement_group import placement_group, remove_placement_group

    from components.training.driver import train

    spec, platform = _one_epoch_run(tiny_params, tmp_path, resource_wait_s=3)
    stale = placement_group([{"CPU": 2}], lifetime="detached")
    ray_session.get(stale.ready(), timeout=60)
    try:
        t0 = time.monotonic()
        with pytest.raises(resources.ResourceWaitError) as err:
            train(spec, platform, tiny_dataset, tmp_path / "model", tmp_path / "results")
        took = time.monotonic() - t0
    finally:
        remove_placement_group(stale)
    text = str(err.value)
    assert stale.id.hex()[:12] in text and "stale" in text and "{CPU: 2}" in text
    assert took < 120  # one bounded wait and a look at the cluster, not a wait without end
    client = mlflow.MlflowClient(platform.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("digits/classification").experiment_id])
    assert sorted(r.data.tags["run_kind"] for r in runs) == ["group", "seed"]  # the entry's and its seed's
    assert all(r.info.status == "FAILED" and "ResourceWaitError" in r.data.tags["error"] for r in runs)
    (run,) = [r for r in runs if r.data.tags["run_kind"] == "seed"]
    assert stale.id.hex()[:12] in run.data.tags["error"]
    assert not (tmp_path / "results" / "metrics.json").exists()


@pytest.mark.slow
def test_behind_live_work_a_run_waits_past_its_resource_wait_and_then_trains(ray_session, tiny_dataset, tiny_params,
                                                                             tmp_path, capfd):  # fmt: skip
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from components.training.driver import train

    spec, platform = _one_epoch_run(tiny_params, tmp_path, resource_wait_s=2)
    busy = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(busy.ready(), timeout=60)

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self):
            return True

    holders = [Busy.options(scheduling_strategy=PlacementGroupSchedulingStrategy(busy, i)).remote() for i in (0, 1)]
    ray.get([h.ping.remote() for h in holders])

    def release(*_):
        for h in holders:
            ray.kill(h)
        remove_placement_group(busy)

    done = threading.Event()

    def release_after_several_waits():
        # The live work ends a few resource waits after the run asked for its workers: timed from
        # the run's request, not from the test's start, so a slow start on a busy machine cannot
        # let the run find its CPUs free.
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            table = ray.util.placement_group_table().values()
            if any(g["state"] == "PENDING" and g["placement_group_id"] != busy.id.hex() for g in table):
                break
            time.sleep(0.2)
        done.wait(4 * 2)  # resource_wait_s is 2
        release()

    releaser = threading.Thread(target=release_after_several_waits)
    releaser.start()
    try:
        out = train(spec, platform, tiny_dataset, tmp_path / "model", tmp_path / "results")
    finally:
        done.set()
        releaser.join()
    assert out.history and (tmp_path / "results" / "metrics.json").is_file()
    assert "still queued for {CPU: 2}" in capfd.readouterr().out


CONTROLLER_KILL = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from components.training.local_ray import start_local_ray
    start_local_ray(1, dashboard=True, project_root=Path(sys.argv[1]))
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.state import list_actors, list_placement_groups

    def loop(config):
        Path(config["marker"]).touch()
        time.sleep(300)

    marker = Path(sys.argv[2]) / "training"
    trainer = TorchTrainer(loop, train_loop_config={"marker": str(marker)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="doomed", storage_path=sys.argv[2]))
    threading.Thread(target=lambda: trainer.fit(), daemon=True).start()
    api = os.environ.get("RAY_API_SERVER_ADDRESS") or ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + 120
    while not marker.exists():  # the worker group started: its placement group is registered for cleaning
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.5)
    (controller,) = list_actors(address=api, filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
    os.kill(controller.pid, signal.SIGKILL)  # dies without cleaning up, as when its node or owner is lost
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = [g for g in list_placement_groups(address=api) if g.state == "CREATED"]
        if not held and ray.available_resources().get("CPU") == 1.0:
            print("RELEASED", flush=True)
            break
        time.sleep(0.5)
    else:
        print("STILL HELD", held, ray.available_resources(), flush=True)
    os._exit(0)
    """
)


@pytest.mark.slow
def test_a_dead_controllers_reservation_is_released_with_another_ray_on_the_machine(ray_session, tmp_path):
    """``ray_session`` is the other Ray. Ray Train's placement-group cleaner then found two Rays,
    its monitor thread died, and the dead run's CPU stayed reserved."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    (tmp_path / "results").mkdir()
    proc = subprocess.run([sys.executable, "-c", CONTROLLER_KILL, str(ROOT), str(tmp_path / "results")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "RELEASED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Found multiple active Ray instances" not in proc.stderr


@pytest.mark.slow
def test_a_trial_whose_worker_is_killed_gives_back_every_cpu(ray_session, tiny_dataset, tiny_params, tmp_path):
    """Two-worker trials; one worker process of the first trial is killed. Ray Train restarts the
    trial's worker group from its checkpoint, the search finishes, and the cluster's free
    resources are what they were before it."""
    import psutil
    from ray.util.state import list_actors

    from components.search.config import load_search
    from components.search.tuner import run_search
    from components.training.driver import load_platform
    from tests.test_search import _search_project

    _, p = _search_project(tmp_path, tiny_params, algorithm="tpe_asha", num_samples=2, epochs=3,
                           max_concurrent_trials=1, space={"training.optimizer.lr": {"loguniform": [0.01, 0.3]}},
                           trial_training={"scaling": {"num_workers": 2}, "failure": {"max_failures": 1}})  # fmt: skip
    free_before = ray_session.available_resources().get("CPU")
    assert free_before == ray_session.cluster_resources().get("CPU") == 2.0
    killed: list[int] = []
    api = ray_session.get_runtime_context().gcs_address

    def kill_a_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            workers = list_actors(address=api, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if len(workers) == 2:
                time.sleep(2)  # into its training
                psutil.Process(workers[-1].pid).kill()
                killed.append(workers[-1].pid)
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    out = tmp_path / "tune_out"
    outcome = run_search(p, "classifier", load_search(p, "classifier"), load_platform(p), tiny_dataset, out)
    killer.join(timeout=5)
    assert killed, "no trial worker was seen"
    assert outcome.summary["counts"]["errored"] == 0
    deadline = time.monotonic() + 30  # the last worker group's shutdown is asynchronous
    while ray_session.available_resources().get("CPU") != free_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU") == free_before
