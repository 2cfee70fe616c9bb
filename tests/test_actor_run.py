"""A one-worker run in one Ray actor (components/training/actor_run.py): its checkpoints, and
that it computes what the same run computes on a Ray Train worker group."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from components.storage.cluster import RayStorage, ray_storage
from components.training.actor_run import COMPLETE, CheckpointStore
from tests.conftest import without_trunk
from tests.s3_server import s3_endpoint_fixture  # noqa: F401


def _checkpoint(tmp_path, tag: str):
    folder = tmp_path / f"src-{tag}"
    (folder / "sub").mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"tag": tag}))
    (folder / "sub" / "w.bin").write_bytes(tag.encode() * 100)
    return folder


def _read(checkpoint) -> str:
    with checkpoint.as_directory() as d:
        from pathlib import Path

        assert (Path(d) / "sub" / "w.bin").is_file()
        return json.loads((Path(d) / "state.json").read_text())["tag"]


def test_the_store_keeps_the_newest_checkpoints_and_reads_back_the_last(tmp_path):
    store = CheckpointStore(ray_storage(str(tmp_path / "results")), "run-a", keep=2)
    assert store.latest() is None
    for tag in ("e0", "e1", "e2"):
        store.persist(str(_checkpoint(tmp_path, tag)))
    kept = sorted(p.name for p in (tmp_path / "results" / "run-a").iterdir())
    assert kept == ["checkpoint_000001", "checkpoint_000002"]
    assert _read(store.latest()) == "e2"
    # another process (a retried attempt) finds the same checkpoint by the run's name
    assert _read(CheckpointStore(ray_storage(str(tmp_path / "results")), "run-a", keep=2).latest()) == "e2"


def test_a_checkpoint_cut_off_while_written_is_never_read(tmp_path):
    store = CheckpointStore(ray_storage(str(tmp_path / "results")), "run-b", keep=None)
    store.persist(str(_checkpoint(tmp_path, "e0")))
    torn = tmp_path / "results" / "run-b" / "checkpoint_000001"  # an attempt died before its marker
    torn.mkdir()
    (torn / "state.json").write_text("{")
    assert _read(store.latest()) == "e0"
    # a retried attempt lists the folder anew and still skips it
    assert _read(CheckpointStore(ray_storage(str(tmp_path / "results")), "run-b", keep=None).latest()) == "e0"
    store.persist(str(_checkpoint(tmp_path, "e1")))  # the next one is written over it, completely
    assert (torn / COMPLETE).is_file() and _read(store.latest()) == "e1"


def test_the_store_writes_to_s3_through_an_explicit_endpoint(s3_endpoint, tmp_path):
    from components.storage.s3 import s3_client

    s3_client(s3_endpoint).create_bucket(Bucket="ckpt")
    storage = RayStorage("s3://ckpt/results", s3_endpoint)
    store = CheckpointStore(storage, "run-c", keep=1)
    store.persist(str(_checkpoint(tmp_path, "e0")))
    store.persist(str(_checkpoint(tmp_path, "e1")))
    objects = s3_client(s3_endpoint).list_objects_v2(Bucket="ckpt")["Contents"]
    keys = sorted(o["Key"] for o in objects if not o["Key"].endswith("/"))  # pyarrow's folder markers aside
    assert keys == [f"results/run-c/checkpoint_000001/{n}" for n in (COMPLETE, "state.json", "sub/w.bin")]
    assert _read(store.latest()) == "e1"


def test_one_worker_runs_go_to_an_actor_unless_switched_off(tiny_params):
    from components.training.driver import in_actor
    from components.training.spec import load_run_spec

    p = copy.deepcopy(tiny_params)
    p["runs"]["classifier"]["training"] = {"scaling": {"num_workers": 1}}
    one = load_run_spec(p, "classifier")
    assert in_actor(one.training.scaling)
    p["runs"]["classifier"]["training"]["scaling"]["one_worker_in_actor"] = False
    switched_off = load_run_spec(p, "classifier")
    assert not in_actor(switched_off.training.scaling)
    assert one.fingerprint("x") == switched_off.fingerprint("x")  # where it runs, not what it computes
    assert not in_actor(load_run_spec(tiny_params, "classifier").training.scaling)  # two workers: DDP


def _platform(tiny_params, tmp_path):
    from components.training.driver import load_platform

    p = copy.deepcopy(tiny_params)
    p["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    p["storage"]["path"] = str(tmp_path / "ray_results")
    return load_platform(p)


def _one_worker(tiny_params, in_actor: bool, run: str = "classifier", **failure):
    from components.training.spec import load_run_spec

    p = without_trunk(tiny_params, run)  # the trunk's path is tested in test_training.py
    training = p["runs"][run].setdefault("training", {})
    training.update({"epochs": 3, "scaling": {"num_workers": 1, "one_worker_in_actor": in_actor}})
    training["failure"] = failure
    return load_run_spec(p, run)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["classifier", "retinanet"])
def test_an_actor_run_computes_what_the_same_run_computes_on_a_worker_group(
    run, ray_session, tiny_dataset, tiny_params, tmp_path, monkeypatch
):
    """Same params, same data: the per-epoch history, the best weights and the test scores of the
    one-worker run in an actor equal those of the run on a one-worker Ray Train group."""
    import mlflow

    from components.training.driver import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    platform = _platform(tiny_params, tmp_path)
    outs = {}
    for in_actor in (False, True):
        tag = "actor" if in_actor else "group"
        spec = _one_worker(tiny_params, in_actor, run)
        outs[tag] = train(spec, platform, tiny_dataset, tmp_path / tag / "model", tmp_path / tag / "results")
    group, actor = outs["group"], outs["actor"]
    assert len(actor.history) == 3
    for a, b in zip(group.history, actor.history, strict=True):
        for key in a:
            if key.startswith(("train/", "val/", "best/", "lr")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["epoch"])
    assert actor.test_metrics == pytest.approx(group.test_metrics, rel=1e-5, abs=1e-6)
    w_group = torch.load(tmp_path / "group" / "model" / "model.pt", weights_only=True)
    w_actor = torch.load(tmp_path / "actor" / "model" / "model.pt", weights_only=True)
    for key in w_group:
        torch.testing.assert_close(w_group[key], w_actor[key], rtol=1e-4, atol=1e-5)
    client = mlflow.MlflowClient(platform.mlflow.tracking_uri)
    actor_run = client.get_run(actor.run_id)
    assert actor_run.info.status == "FINISHED"
    assert actor_run.data.params["training.scaling.one_worker_in_actor"] == "True"
    # checkpoints are the store's, the newest checkpoints_to_keep of them
    folders = list((tmp_path / "ray_results").glob(f"{spec.name}-{actor.run_id[:12]}/checkpoint_*"))
    assert len(folders) == spec.training.checkpoints_to_keep and all((f / COMPLETE).is_file() for f in folders)


@pytest.mark.slow
def test_an_actor_run_that_fails_resumes_from_its_checkpoint_in_a_new_actor(
    ray_session, tiny_dataset, tiny_params, tmp_path, monkeypatch, capfd
):
    """training.failure: the fault drill fails the first attempt at epoch 1; the run goes on in a
    new actor from the checkpoint of epoch 0 and ends where an uninterrupted one ends."""
    import mlflow

    from components.training.driver import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    platform = _platform(tiny_params, tmp_path)
    uninterrupted = _one_worker(tiny_params, True)
    reference = train(uninterrupted, platform, tiny_dataset, tmp_path / "r" / "m", tmp_path / "r" / "r")
    spec = _one_worker(tiny_params, True, fail_at_epoch=1, max_failures=1)
    out = train(spec, platform, tiny_dataset, tmp_path / "f" / "m", tmp_path / "f" / "r")
    assert "attempt 1 failed (RayTaskError" in capfd.readouterr().out
    client = mlflow.MlflowClient(platform.mlflow.tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "0"
    assert sorted(m.step for m in client.get_metric_history(out.run_id, "val/top1")) == [0, 1, 2]
    for a, b in zip(reference.history, out.history, strict=True):
        for key in ("train/loss", "val/top1", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["epoch"])

    # with no retries left the loop's own error ends the run FAILED
    spec = _one_worker(tiny_params, True, fail_at_epoch=1, max_failures=0)
    with pytest.raises(Exception, match="fault drill") as err:
        train(spec, platform, tiny_dataset, tmp_path / "g" / "m", tmp_path / "g" / "r")
    from components.training.hooks import FaultDrillError

    assert isinstance(err.value, FaultDrillError)
    import time

    import ray

    deadline = time.monotonic() + 30  # the failed run's reservation and actor are gone (released async)
    while ray.available_resources().get("CPU") != 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2.0


@pytest.mark.slow
def test_an_entrys_seeds_share_one_actor_and_compute_what_each_computes_alone(
    ray_session, tiny_dataset, tiny_params, tmp_path, monkeypatch
):
    """Seeds 3 and 4 of one entry train one after another in the actor asked for before tracking
    started; seed 4 in that used actor ends exactly as seed 4 trained alone in a fresh one, and
    the entry's reservation is released when it is done."""
    import dataclasses
    import time

    import ray

    from components.training import actor_run
    from components.training.driver import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    platform = _platform(tiny_params, tmp_path)
    created = []
    real_create = actor_run._create
    monkeypatch.setattr(actor_run, "_create", lambda bundle: created.append(bundle) or real_create(bundle))
    spec = _one_worker(tiny_params, True)
    both = train(
        dataclasses.replace(spec, seeds=(3, 4)), platform, tiny_dataset, tmp_path / "b" / "m", tmp_path / "b" / "r"
    )
    assert len(created) == 1  # one actor for the entry's two seeds
    alone = train(
        dataclasses.replace(spec, seeds=(4,)), platform, tiny_dataset, tmp_path / "a" / "m", tmp_path / "a" / "r"
    )
    assert len(created) == 2
    for a, b in zip(both.seeds[1].history, alone.seeds[0].history, strict=True):
        for key in ("train/loss", "val/top1", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a["epoch"])
    assert both.seeds[0].history[-1]["train/loss"] != both.seeds[1].history[-1]["train/loss"]
    assert not actor_run._warm
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2.0
