"""Lineage in MLflow's own terms: the dataset inputs of a run and what loading its model needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.data.canonical import read_info
from components.tracking.lineage import DIGEST_LENGTH, dataset_source, log_dataset_inputs, model_requirements

ROOT = Path(__file__).resolve().parents[1]


def test_model_requirements_are_what_importing_the_method_needs():
    names = {r.split("==")[0].lower() for r in model_requirements("components.methods.retinanet", ROOT)}
    assert {"torch", "torchvision", "numpy"} <= names
    # imported only inside functions (tracking, training, search): not needed to load a model
    assert not names & {"ray", "mlflow", "dvc", "optuna", "boto3"}
    pins = model_requirements("components.methods.classifier", ROOT)
    assert all("==" in r and "+" not in r for r in pins)


def test_relative_and_package_imports_are_followed(tmp_path):
    pkg = tmp_path / "proj"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import yaml\n")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from __future__ import annotations\nfrom ..other import x\ndef f():\n    import mlflow\n"
    )
    (pkg / "other.py").write_text("import numpy as np\nx = 1\n")
    names = {r.split("==")[0].lower() for r in model_requirements("proj.sub.leaf", tmp_path)}
    assert names == {"pyyaml", "numpy"}


def test_dataset_sources():
    assert dataset_source("generated:sklearn.datasets.load_digits").to_dict() == {
        "tags": {"generator": "sklearn.datasets.load_digits"}
    }
    assert dataset_source("s3://bucket/coco")._get_source_type() == "s3"
    assert dataset_source("/data/voc")._get_source_type() == "local"


def test_each_split_is_an_input_with_the_manifest_checksum(tiny_dataset, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_utils

    info = read_info(tiny_dataset)
    uri = f"sqlite:///{tmp_path}/m.db"
    # mlflow.set_tracking_uri is process-wide and outranks MLFLOW_TRACKING_URI for later tests;
    # monkeypatch puts back exactly what was there (usually nothing).
    monkeypatch.setattr(mlflow_utils, "_tracking_uri", uri)
    with mlflow.start_run() as run:
        log_dataset_inputs(info, "scenes")
    inputs = mlflow.MlflowClient(uri).get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"training", "validation", "testing"}
    train = by_context["training"]
    assert train.dataset.name == "digits/scenes/train"
    assert train.dataset.digest == info.checksum[:DIGEST_LENGTH]
    assert {t.key: t.value for t in train.tags}["checksum"] == info.checksum
    assert "load_digits" in train.dataset.source


@pytest.mark.parametrize("origin", ["generated:x", "s3://b/p", "/a/b"])
def test_sources_serialise(origin):
    assert dataset_source(origin).to_json()
