"""Pre-flight checks: a run that cannot work with its dataset or resources fails before MLflow
or Ray start, naming the params key."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml

from components.data.canonical import MANIFEST, read_info
from components.training.preflight import PreflightError, check_resources, check_run, local_resources
from components.training.spec import load_run_spec


def _spec(params, run, **training):
    p = copy.deepcopy(params)
    p["runs"][run].setdefault("training", {})
    for key, value in training.items():
        node = p["runs"][run]["training"]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return load_run_spec(p, run)


def _copy(tiny_dataset, tmp_path):
    out = tmp_path / "digits"
    shutil.copytree(tiny_dataset, out)
    return out


def test_every_shipped_run_passes(tiny_params, tiny_dataset):
    info = read_info(tiny_dataset)
    for run in tiny_params["runs"]:
        check_run(load_run_spec(tiny_params, run), info)


def test_batch_larger_than_the_train_split(tiny_params, tiny_dataset):
    with pytest.raises(PreflightError, match=r"runs\.classifier\.training\.batch_size: 4096 is larger than the \d+"):
        check_run(_spec(tiny_params, "classifier", batch_size=4096), read_info(tiny_dataset))
    # a baseline row trains nothing: its batch does not matter
    check_run(_spec(tiny_params, "classifier", batch_size=4096, epochs=0), read_info(tiny_dataset))


def test_fewer_validation_images_than_workers(tiny_params, tiny_dataset):
    spec = _spec(tiny_params, "retinanet", **{"scaling.num_workers": 8, "batch_size": 8})
    with pytest.raises(PreflightError, match=r"retinanet\.training\.scaling\.num_workers: 8 workers but 4 validation"):
        check_run(spec, read_info(tiny_dataset))


def test_metric_learning_batch_asks_for_more_classes_than_the_protocol_trains_on(tiny_params, tiny_dataset):
    # 5 training classes, 4 samples of each per batch: a worker's batch holds at most 20 images
    info = read_info(tiny_dataset)
    check_run(_spec(tiny_params, "contrastive", batch_size=32, **{"scaling.num_workers": 2}), info)
    spec = _spec(tiny_params, "contrastive", batch_size=32, **{"scaling.num_workers": 1})
    with pytest.raises(
        PreflightError,
        match=r"runs\.contrastive\.training\.batch_size: a per-worker batch of 32 .* "
        r"needs 8 classes per batch, but the retrieval protocol of 'digits' trains on 5",
    ):
        check_run(spec, info)
    with pytest.raises(PreflightError, match=r"per-worker batch \(6\) is not a multiple of samples_per_class \(4\)"):
        check_run(_spec(tiny_params, "contrastive", batch_size=12, **{"scaling.num_workers": 2}), info)


def test_instance_segmenter_on_scenes_without_masks(tiny_params, tiny_dataset, tmp_path):
    root = _copy(tiny_dataset, tmp_path)
    for split in ("train", "val", "test"):
        path = root / "scenes" / f"{split}.json"
        coco = json.loads(path.read_text())
        for ann in coco["annotations"]:
            ann.pop("segmentation", None)
        path.write_text(json.dumps(coco))
    with pytest.raises(PreflightError, match=r"runs\.mask_rcnn\.method: instance_segmentation needs instance masks"):
        check_run(load_run_spec(tiny_params, "mask_rcnn"), read_info(root))
    check_run(load_run_spec(tiny_params, "retinanet"), read_info(root))  # boxes are still there


def test_crops_only_dataset_for_a_detector(tiny_params, tiny_dataset, tmp_path):
    root = _copy(tiny_dataset, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["views"]["scenes"]
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PreflightError, match=r"runs\.retinanet\.dataset: dataset 'digits' has no 'scenes' view"):
        check_run(load_run_spec(tiny_params, "retinanet"), read_info(root))


def test_resources(tiny_params):
    spec = _spec(tiny_params, "classifier", **{"scaling.num_workers": 4, "batch_size": 16})
    with pytest.raises(PreflightError, match=r"4 workers x 1.0 CPUs = 4 CPUs, but this machine has 2"):
        check_resources(spec, {"CPU": 2.0}, "this machine")
    gpu = _spec(tiny_params, "classifier", **{"scaling.use_gpu": True})
    with pytest.raises(PreflightError, match=r"scaling\.use_gpu: this machine has no GPU"):
        check_resources(gpu, {"CPU": 8.0, "GPU": 0.0}, "this machine")
    shared = _spec(tiny_params, "classifier", **{"scaling.use_gpu": True, "scaling.gpus_per_worker": 0.5})
    with pytest.raises(PreflightError, match=r"scaling\.gpus_per_worker: 0.5 with 2 workers"):
        check_resources(shared, {"CPU": 8.0, "GPU": 8.0}, "a cluster")
    check_resources(load_run_spec(tiny_params, "classifier"), local_resources(2), "this machine")


def test_the_stage_exits_2_before_any_mlflow_run(tiny_params, tiny_dataset, tmp_path, capsys, monkeypatch):
    from pipelines.train import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = copy.deepcopy(tiny_params)
    p["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/m.db"
    p["runs"]["classifier"].setdefault("training", {})["batch_size"] = 4096
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    code = main(["--run", "classifier", "--params", str(tmp_path / "params.yaml"), "--data", str(tiny_dataset)])
    assert code == 2
    assert "runs.classifier.training.batch_size" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()
