"""Ray Train + MLflow: a run is tracked, checkpointed, and resumes where it stopped.

These start Ray Train worker groups (two workers, DDP over gloo) on a tiny dataset.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from components.training.driver import load_platform, train
from components.training.spec import load_run_spec
from tests.conftest import without_trunk

pytestmark = pytest.mark.slow


@pytest.fixture()
def platform(tmp_path, tiny_params, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CVFLOW_STORAGE_PATH", raising=False)
    p = copy.deepcopy(tiny_params)
    p["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    p["storage"]["path"] = str(tmp_path / "ray_results")
    return load_platform(p)


def _spec(params, run="classifier", **training):
    p = copy.deepcopy(params)
    p["runs"][run].setdefault("training", {})
    for key, value in training.items():
        section, _, leaf = key.rpartition(".")
        node = p["runs"][run]["training"]
        for part in filter(None, section.split(".")):
            node = node.setdefault(part, {})
        node[leaf] = value
    return load_run_spec(p, run)


def _client(platform):
    import mlflow

    return mlflow.MlflowClient(platform.mlflow.tracking_uri)


def _steps(client, run_id, key="val/top1"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _run(spec, platform, data, tmp_path, tag):
    return train(spec, platform, data, tmp_path / tag / "model", tmp_path / tag / "results")


def test_tracked_run_registers_champion(ray_session, tiny_dataset, tiny_params, platform, tmp_path):
    spec = _spec(tiny_params, epochs=2)
    out = _run(spec, platform, tiny_dataset, tmp_path, "a")
    client = _client(platform)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["method"] == "classifier" and tags["dataset"] == "digits" and tags["task"] == "classification"
    assert len(tags["data_checksum"]) == 64 and tags["git_commit"]
    assert run.data.params["training.optimizer.lr"] == str(spec.training.optimizer.lr)
    assert _steps(client, out.run_id) == [0, 1]
    assert "test/top1" in run.data.metrics
    version = client.get_model_version_by_alias("digits-classifier", "champion")
    assert version.run_id == out.run_id
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.yaml", "metrics.json", "curves.png", "test_predictions.png", "dataset"} <= artifacts
    assert {a.path for a in client.list_artifacts(out.run_id, "dataset")} == {
        "dataset/manifest.json",
        "dataset/card.png",
    }
    assert (tmp_path / "a" / "model" / "model.pt").is_file()
    assert out.champion and out.model_version == str(version.version)
    _assert_compute_ledger(run, out, spec, tiny_dataset, tmp_path / "a" / "results")
    # lineage: each split the run read, with the manifest's checksum as digest
    inputs = run.inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["digits/crops/test", "digits/crops/train", "digits/crops/val"]
    assert {i.dataset.digest for i in inputs} == {tags["data_checksum"][:32]}


def _assert_compute_ledger(run, out, spec, data, results):
    """compute/ in MLflow and metrics.json: training FLOPs are one step's forward and backward on
    every worker times the steps, so 2-4x the forward FLOPs of every image trained on."""
    import json

    from components.data.canonical import read_info

    m = run.data.metrics
    assert m["compute/parameters"] > 0 and m["compute/forward_flops_per_image"] > 0
    world, batch = spec.training.scaling.num_workers, spec.training.batch_size
    n = read_info(data).views["crops"]["counts"]["train"]["images"]
    images = (n // world) // (batch // world) * batch * spec.training.epochs  # drop_last on each worker
    ratio = m["compute/train_flops"] / (m["compute/forward_flops_per_image"] * images)
    assert 2.0 <= ratio <= 4.0, ratio
    assert 0 < m["compute/mfu"] <= 1 and m["compute/peak_flops_per_s"] > 0
    assert m["compute/device_seconds"] == pytest.approx(world * (m["compute/train_wall_s"] + m["compute/eval_wall_s"]))
    assert {f"compute/peak_memory_mb/rank_{r}" for r in range(world)} <= set(m)
    assert json.loads((results / "metrics.json").read_text())["compute"]["train_flops"] == m["compute/train_flops"]
    assert out.compute["mfu"] == pytest.approx(m["compute/mfu"])


def test_resume_continues_the_same_run_and_ends_where_an_uninterrupted_one_would(
    ray_session, tiny_dataset, tiny_params, platform, tmp_path
):
    client = _client(platform)
    reference = _run(_spec(tiny_params, epochs=3), platform, tiny_dataset, tmp_path, "ref")

    # The driver's run fails at epoch 2 (after the checkpoint of epoch 1) with no retries left.
    crashing = _spec(tiny_params, epochs=3, **{"failure.fail_at_epoch": 2, "failure.max_failures": 0})
    with pytest.raises(Exception, match="fault drill"):
        _run(crashing, platform, tiny_dataset, tmp_path, "crash")
    failed = client.search_runs(
        [client.get_run(reference.run_id).info.experiment_id],
        filter_string="attributes.status = 'FAILED' and tags.run_kind = 'seed'",
    )
    assert len(failed) == 1 and _steps(client, failed[0].info.run_id) == [0, 1]
    assert "fault drill" in failed[0].data.tags["error"]

    # Restarting the stage reopens that run and continues from the checkpoint.
    resumed = _run(_spec(tiny_params, epochs=3), platform, tiny_dataset, tmp_path, "resume")
    assert resumed.resumed and resumed.run_id == failed[0].info.run_id
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "1"
    assert _steps(client, resumed.run_id) == [0, 1, 2]  # no epoch logged twice
    # model, optimiser, scheduler and RNG state restored: the same numbers as without the crash
    for a, b in zip(reference.history, resumed.history, strict=True):
        for key in ("train/loss", "val/top1", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["epoch"])
    ref_w = torch.load(tmp_path / "ref" / "model" / "model.pt", weights_only=True)
    res_w = torch.load(tmp_path / "resume" / "model" / "model.pt", weights_only=True)
    for key in ref_w:
        torch.testing.assert_close(ref_w[key], res_w[key], rtol=1e-4, atol=1e-5)


def test_worker_failure_recovers_within_the_run(ray_session, tiny_dataset, tiny_params, platform, tmp_path):
    """FailureConfig: a worker error restarts the worker group from the last checkpoint."""
    spec = _spec(tiny_params, epochs=3, **{"failure.fail_at_epoch": 1, "failure.max_failures": 1})
    out = _run(spec, platform, tiny_dataset, tmp_path, "ft")
    client = _client(platform)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "0"
    assert _steps(client, out.run_id) == [0, 1, 2] and len(out.history) == 3


@pytest.mark.parametrize("run", ["retinanet", "detr"])
def test_tracked_detection_run(run, ray_session, tiny_dataset, tiny_params, platform, tmp_path):
    """A detector through the whole path: DDP on 2 workers, an augmentation policy moving the
    boxes, COCO mAP per epoch, a predictions PNG per evaluation, and a registered model that
    loads back and detects."""
    import mlflow

    spec = _spec(tiny_params, run=run, epochs=2, figures_every=1, augment={"kind": "trivialaugment"})
    client = _client(platform)
    trunk = spec.create_method().pretrained_trunk()
    pretrained_root = tmp_path / "pretrained"
    if trunk is not None:  # pretrain@<entry> first, as `dvc repro` orders it
        pre = load_run_spec(tiny_params, trunk.pretrained, kind="pretrain")
        folder = pretrained_root / trunk.pretrained
        pre_out = train(pre, platform, tiny_dataset, folder, folder)
        pre_run = client.get_run(pre_out.run_id)
        assert pre_run.info.status == "FINISHED" and pre_run.data.tags["stage"] == "pretrain"
        assert pre_out.model_version is None  # a trunk, not a model to compare
    out = train(spec, platform, tiny_dataset, tmp_path / run / "model", tmp_path / run / "results", pretrained_root)
    mlrun = client.get_run(out.run_id)
    assert ("pretrained_checksum" in mlrun.data.tags) == (trunk is not None)
    assert mlrun.data.params["training.augment.kind"] == "trivialaugment"
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["task"] == "detection"
    assert _steps(client, out.run_id, "val/mAP") == [0, 1]
    assert {"test/mAP", "test/mAP50", "test/mAP75"} <= set(mlrun.data.metrics)
    figures = {a.path for a in client.list_artifacts(out.run_id, "val_predictions")}
    assert figures == {"val_predictions/epoch_000.png", "val_predictions/epoch_001.png"}
    # The 2 workers scored the test split, each a slice on its own device; the gathered mAP is
    # that of the whole split scored here in one process.
    _assert_test_scores_of_the_best_weights(spec, tiny_dataset, tmp_path / run / "model", out.test_metrics)
    version = client.get_model_version_by_alias(f"digits-{run}", "champion")
    assert version.run_id == out.run_id
    mlflow.set_tracking_uri(platform.mlflow.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/digits-{run}@champion").eval()
    with torch.no_grad():
        detections = model([torch.rand(3, 64, 64)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("run", ["unet", "condinst"])
def test_tracked_segmentation_run(run, ray_session, tiny_dataset, tiny_params, platform, tmp_path):
    """Semantic and instance segmentation through the whole path: the family's metrics per
    epoch, mask PNGs, and a registered model that loads back and segments."""
    import mlflow

    augment = {"kind": "randaugment", "n": 2, "m": 0.5}  # geometric ops move the masks (semantic: fill 255)
    # eval_every 1: params validate mask AP runs less often
    # from random init: the trunk's path is that of test_tracked_detection_run
    spec = _spec(without_trunk(tiny_params, run), run=run, epochs=2, figures_every=1, eval_every=1, augment=augment)
    family = spec.create_method().task
    out = train(spec, platform, tiny_dataset, tmp_path / run / "model", tmp_path / run / "results")
    client = _client(platform)
    mlrun = client.get_run(out.run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["task"] == family
    assert mlrun.data.params["training.augment.kind"] == "randaugment"
    primary = {"semantic_segmentation": "mIoU", "instance_segmentation": "mask_mAP"}[family]
    assert _steps(client, out.run_id, f"val/{primary}") == [0, 1]
    expected = {"mIoU", "pixel_acc", "IoU/background"} if primary == "mIoU" else {"mask_mAP", "mask_mAP50", "mAP"}
    assert {f"test/{k}" for k in expected} <= set(mlrun.data.metrics)
    figures = {a.path for a in client.list_artifacts(out.run_id, "val_predictions")}
    assert figures == {"val_predictions/epoch_000.png", "val_predictions/epoch_001.png"}
    # The 2 workers scored the test split, each a slice on its own device; the gathered mAP is
    # that of the whole split scored here in one process.
    _assert_test_scores_of_the_best_weights(spec, tiny_dataset, tmp_path / run / "model", out.test_metrics)
    assert (tmp_path / run / "results" / "test_predictions.png").stat().st_size > 0
    assert client.get_model_version_by_alias(f"digits-{run}", "champion").run_id == out.run_id
    mlflow.set_tracking_uri(platform.mlflow.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/digits-{run}@champion").eval()
    with torch.no_grad():
        if primary == "mIoU":
            logits = model(torch.rand(2, 3, 64, 64))
            assert logits.shape[0] == 2 and logits.shape[-2:] == (64, 64)
        else:
            predictions = model([torch.rand(3, 64, 64)])
            assert set(predictions[0]) == {"boxes", "scores", "labels", "masks"}
            assert predictions[0]["masks"].shape[-2:] == (64, 64)


def test_eval_every_validates_some_epochs_and_picks_the_best_among_them(
    ray_session, tiny_dataset, tiny_params, platform, tmp_path
):
    out = _run(_spec(tiny_params, epochs=3, eval_every=2), platform, tiny_dataset, tmp_path, "every")
    client = _client(platform)
    assert _steps(client, out.run_id) == [1, 2]  # every 2nd epoch, and always the last
    assert _steps(client, out.run_id, "time/epoch_s") == [0, 1, 2]
    assert ["val/top1" in h for h in out.history] == [False, True, True]
    assert out.best_val == max(h["val/top1"] for h in out.history[1:])


def test_untrained_baseline_is_scored_on_the_driver_and_not_registered(tiny_dataset, tiny_params, platform, tmp_path):
    """``epochs: 0``: the initial weights, scored by the same protocol, as a row to compare with."""
    out = _run(_spec(tiny_params, epochs=0), platform, tiny_dataset, tmp_path, "baseline")
    client = _client(platform)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, out.run_id) == [0] and "test/top1" in run.data.metrics
    assert out.model_version is None and not client.search_registered_models()
    # The weights the loop's workers start from (seeded the same way): only training is missing.
    from components.data.canonical import read_info
    from components.training.loop import seed_all

    spec = _spec(tiny_params, epochs=0)
    seed_all(spec.training.seed)
    start = spec.create_method().build(read_info(tiny_dataset)).state_dict()
    scored = torch.load(tmp_path / "baseline" / "model" / "model.pt", weights_only=True)
    assert scored.keys() == start.keys() and all(torch.equal(scored[k], start[k]) for k in start)


@pytest.mark.parametrize("run", ["triplet"])
def test_tracked_embedding_run(run, ray_session, tiny_dataset, tiny_params, platform, tmp_path):
    """A representation or metric-learning method through the whole path: DDP on 2 workers with
    the family's batches, its protocol per epoch, and a registered model that embeds images."""
    import mlflow

    spec = _spec(tiny_params, run=run, epochs=2, figures_every=1)
    family = spec.create_method().task
    primary = {"representation": "knn_top1", "retrieval": "recall_at_1"}[family]
    out = train(spec, platform, tiny_dataset, tmp_path / run / "model", tmp_path / run / "results")
    client = _client(platform)
    mlrun = client.get_run(out.run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["task"] == family
    assert _steps(client, out.run_id, f"val/{primary}") == [0, 1]
    expected = {"knn_top1", "linear_top1"} if family == "representation" else {"recall_at_1", "recall_at_8", "map_at_r"}
    assert {f"test/{k}" for k in expected} <= set(mlrun.data.metrics)
    figures = {a.path for a in client.list_artifacts(out.run_id, "val_predictions")}
    assert figures == {"val_predictions/epoch_000.png", "val_predictions/epoch_001.png"}
    # The 2 workers scored the test split, each a slice on its own device; the gathered mAP is
    # that of the whole split scored here in one process.
    _assert_test_scores_of_the_best_weights(spec, tiny_dataset, tmp_path / run / "model", out.test_metrics)
    assert client.get_model_version_by_alias(f"digits-{spec.method}", "champion").run_id == out.run_id
    mlflow.set_tracking_uri(platform.mlflow.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/digits-{spec.method}@champion").eval()
    with torch.no_grad():
        embedding = model(torch.rand(4, 3, 16, 16))
    assert embedding.dim() == 2 and embedding.shape[0] == 4


def _assert_test_scores_of_the_best_weights(spec, data, model_dir, test_metrics):
    from components.data.canonical import read_info
    from components.tasks import get_task
    from components.training.evaluation import evaluate, split_loader

    method, info = spec.create_method(), read_info(data)
    task = get_task(method.task)
    model = method.build(info)
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    scores, _ = evaluate(method, task, model, split_loader(task, info, "test", 16), info.num_classes)
    assert test_metrics == pytest.approx({f"test/{k}": v for k, v in scores.items()}, abs=1e-6)


def test_seeds_train_under_a_group_run_that_carries_their_aggregates(
    ray_session, tiny_dataset, tiny_params, platform, tmp_path
):
    import json

    from components.report.stats import interval

    spec = _spec(tiny_params, epochs=1, **{"scaling.num_workers": 1})  # seeds, not DDP, are the point here
    spec = dataclasses.replace(spec, seeds=(3, 4))
    out = _run(spec, platform, tiny_dataset, tmp_path, "seeds")
    client = _client(platform)
    group = client.get_run(out.group_run_id)
    assert group.info.status == "FINISHED" and group.data.tags["run_kind"] == "group"
    assert group.data.tags["seeds"] == "3,4" and "training.seed" not in group.data.params
    children = client.search_runs(
        [group.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out.group_run_id}'"
    )
    by_seed = {int(c.data.tags["seed"]): c for c in children}
    assert sorted(by_seed) == [3, 4] and [s.seed for s in out.seeds] == [3, 4]
    assert all(c.info.status == "FINISHED" and c.data.params["training.seed"] == str(s) for s, c in by_seed.items())
    # the seeds differ (their own initialisation and order), and the group's numbers are theirs
    tops = [by_seed[s].data.metrics["test/top1"] for s in (3, 4)]
    assert by_seed[3].data.metrics["train/loss"] != by_seed[4].data.metrics["train/loss"]
    iv = interval(tops)
    m = group.data.metrics
    assert m["test/top1_mean"] == pytest.approx(sum(tops) / 2) and m["test/top1_n"] == 2
    assert (m["test/top1_ci_low"], m["test/top1_ci_high"]) == pytest.approx((iv.low, iv.high))
    assert min(tops) <= m["test/top1_ci_low"] <= m["test/top1_ci_high"] <= max(tops)
    bests = {s: by_seed[s].data.metrics["best/top1"] for s in (3, 4)}
    assert m["best/top1_mean"] == pytest.approx(sum(bests.values()) / 2)
    # the registered model and the entry's files are the best seed's by validation (first on ties)
    best_seed = 3 if bests[3] >= bests[4] else 4
    assert out.run_id == by_seed[best_seed].info.run_id and group.data.tags["best_seed"] == str(best_seed)
    version = client.get_model_version_by_alias("digits-classifier", "champion")
    assert version.run_id == out.run_id
    model_dir, results = tmp_path / "seeds" / "model", tmp_path / "seeds" / "results"
    assert (model_dir / "model.pt").read_bytes() == (model_dir / "seeds" / str(best_seed) / "model.pt").read_bytes()
    summary = json.loads((results / "metrics.json").read_text())
    assert summary["mlflow_group_run_id"] == out.group_run_id and summary["best_seed"] == best_seed
    assert [row["seed"] for row in summary["per_seed"]] == [3, 4]
    assert summary["aggregate"]["test/top1"]["mean"] == pytest.approx(m["test/top1_mean"])

    # A group cut short after its first seed: that seed is read back from MLflow, not retrained.
    client.set_terminated(out.group_run_id, "FAILED")
    client.delete_run(by_seed[4].info.run_id)
    again = _run(spec, platform, tiny_dataset, tmp_path, "seeds-again")
    assert again.group_run_id == out.group_run_id
    first, second = again.seeds
    assert first.reused and first.run_id == by_seed[3].info.run_id and first.history == out.seeds[0].history
    assert not second.reused and second.run_id != by_seed[4].info.run_id
    assert _steps(client, first.run_id) == [0]  # no epoch logged twice
    assert client.get_run(out.group_run_id).info.status == "FINISHED"
