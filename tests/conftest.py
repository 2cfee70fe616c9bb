"""Shared fixtures: the real params.yaml shrunk to seconds, a tiny generated dataset, one Ray."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from components.config import deep_merge, load_yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def shrink(params: dict, *, epochs: int = 2, workers: int = 2) -> dict:
    """The real params with every run cut to a few seconds on CPU."""
    from components.methods import get_method_class

    p = copy.deepcopy(params)
    digits = p["datasets"]["digits"]
    # fixed sizes, not the default job's budget: two renderings per training digit
    digits.update(max_per_class=6, crop_size=16, crops_per_digit={"train": 2, "val": 1, "test": 1})
    digits["scenes"].update(canvases={"train": 8, "val": 4, "test": 4})
    t = p["training"]
    t.update(epochs=epochs, batch_size=16, eval_batch_size=64)
    t["scaling"].update(num_workers=workers, use_gpu=False)
    t["scheduler"]["warmup_epochs"] = 0.0
    for run in [*p["runs"].values(), *(p.get("pretrain") or {}).values()]:
        run.pop("seeds", None)  # one seed (training.seed); a test that trains several says so
        run["config"] = deep_merge(run.get("config", {}), TINY_MODELS[run["method"]])
        if "training" in run:  # runs with their own schedule are cut down the same way
            short = {"epochs": epochs if run["training"].get("epochs", 1) > 0 else 0, "eval_batch_size": 64}
            # Retrieval batches hold m samples of several classes on each worker.
            short["batch_size"] = 16 if get_method_class(run["method"]).task == "retrieval" else 8
            run["training"] = deep_merge(run["training"], short)
    for run in p["runs"].values():  # searches: two trials of one epoch
        if run.get("search"):
            run["search"].update(num_samples=2, epochs=1)
            if run["search"].get("algorithm") == "faster_autoaugment":
                run["search"]["faster_autoaugment"] = {**run["search"].get("faster_autoaugment", {}), "epochs": 1}
    for run in p["runs"].values():  # a pretrained trunk shrinks with the runs that start from it
        backbone = run["config"].get("backbone", {})
        if backbone.get("pretrained"):
            trunk = p["pretrain"][backbone["pretrained"]]["config"]["backbone"]
            trunk.update({k: backbone[k] for k in ("name", "widths", "blocks", "norm") if k in backbone})
    return p


def without_trunk(params: dict, run: str) -> dict:
    """A copy of the params in which the run starts from random init, for the tests of a path that
    a pretrained trunk does not change (those of the trunk train it first, as `dvc repro` does)."""
    p = copy.deepcopy(params)
    p["runs"][run].get("config", {}).get("backbone", {}).pop("pretrained", None)
    return p


_TINY_PYRAMID = {"backbone": {"widths": [8, 16, 16, 32], "blocks": [1, 1, 1, 1], "fpn_channels": 16}}
TINY_MODELS = {  # the smallest model of each method: seconds per run on CPU
    "classifier": {"widths": [8, 16], "blocks": [1, 1]},
    "retinanet": _TINY_PYRAMID,
    "fcos": {"backbone": {**_TINY_PYRAMID["backbone"], "fpn_channels": 32}},  # GroupNorm(32) in its head
    "faster_rcnn": {**_TINY_PYRAMID, "representation_size": 32},
    "detr": {
        "backbone": {"widths": [8, 16], "blocks": [1, 1]},
        "hidden_dim": 32,
        "nheads": 4,
        "dim_feedforward": 64,
        "enc_layers": 1,
        "dec_layers": 2,
        "num_queries": 6,
    },
    "unet": {"widths": [4, 8, 16]},
    "segformer": {"widths": [8, 16, 24, 32], "heads": [1, 1, 2, 2], "depths": [1, 1, 1, 1], "decoder_width": 16},
    "mask_rcnn": {**_TINY_PYRAMID, "representation_size": 32, "mask_head_layers": [8, 8], "mask_predictor_width": 8},
    "simclr": {"encoder": {"widths": [8, 16], "blocks": [1, 1]}, "projection_hidden": 16, "projection_dim": 8},
    "moco": {
        "encoder": {"widths": [8, 16], "blocks": [1, 1]},
        "projection_hidden": 16,
        "projection_dim": 8,
        "queue_size": 32,
    },
    "npid": {"encoder": {"widths": [8, 16], "blocks": [1, 1]}, "embedding_dim": 8, "nce_negatives": 64},
    "rotnet": {"encoder": {"widths": [8, 16], "blocks": [1, 1]}},
    "triplet": {"encoder": {"widths": [8, 16], "blocks": [1, 1]}, "embedding_dim": 16},
    "contrastive": {"encoder": {"widths": [8, 16], "blocks": [1, 1]}, "embedding_dim": 16},
    "smooth_ap": {"encoder": {"widths": [8, 16], "blocks": [1, 1]}, "embedding_dim": 16},
    "condinst": {
        "backbone": {**_TINY_PYRAMID["backbone"], "fpn_channels": 32},  # GroupNorm(32) in its FCOS head
        "mask_branch_channels": 8,
        "mask_branch_convs": 1,
    },
}


@pytest.fixture(scope="session")
def params() -> dict:
    return load_yaml(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_params(params) -> dict:
    return shrink(params)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_params) -> Path:
    from components.config import from_dict
    from components.data import digits
    from components.data.card import contact_sheet

    cfg = from_dict(digits.DigitsConfig, tiny_params["datasets"]["digits"], source="test")
    out = tmp_path_factory.mktemp("data") / "digits"
    digits.generate(out, cfg)
    contact_sheet(out)
    return out


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from components.training.local_ray import API_SERVER, SINGLE_NODE, own_dashboard, reload_ray_settings

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Every server of this Ray on 127.0.0.1, and its processes' state API on its own dashboard
    # (see components/training/local_ray.py); the settings are taken back at once so that
    # clusters the tests start later can have several nodes and their own dashboards.
    from ray._private import ray_constants

    before = {k: os.environ.get(k) for k in (SINGLE_NODE, API_SERVER)}
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE] = "0"
    try:
        reload_ray_settings()  # Ray is imported already (collecting the tests imports it)
        port = own_dashboard(os.environ)
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cpu_hog():
    """One busy process on one core for the duration of a module's tests: stages, Ray's
    processes and its health checks run on a machine that is not idle, as in CI beside other jobs."""
    import subprocess
    import sys

    code = "import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\nwhile True:\n    pass\n"
    hog = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield hog
        assert hog.poll() is None, "the busy process ended before the tests did"
    finally:
        hog.kill()
        hog.wait()


# Set for the whole process by mlflow.set_tracking_uri / set_registry_uri / set_experiment.
MLFLOW_PROCESS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(autouse=True)
def _mlflow_process_state_restored(monkeypatch):
    """``train()`` sets MLflow's tracking and registry URIs and its active experiment for the whole
    process, and MLflow exports them to the environment too (for subprocesses), where they outrank
    what a later test gives in params. Each test leaves them as it found them, so no test depends
    on which ran before it."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    before = {k: os.environ.get(k) for k in MLFLOW_PROCESS_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
