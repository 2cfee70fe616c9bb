"""dvc.runs.yaml (pipelines/stages.py): each run's stages wait for what they read and no more."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, load_yaml
from pipelines.stages import RUNS_FILE, check_fresh, refresh, render, stage_inputs
from tests.conftest import ROOT

DVC = str(Path(sys.executable).with_name("dvc"))


def test_the_committed_file_is_what_params_give():
    """Stale if this fails: run `python -m pipelines.stages` and commit dvc.runs.yaml."""
    assert (ROOT / RUNS_FILE).read_text() == render(load_yaml(ROOT / "params.yaml"))


def test_only_a_run_that_starts_from_a_trunk_depends_on_one(params):
    inputs = stage_inputs(params)["run_inputs"]
    named = {
        name: (run.get("config") or {}).get("backbone", {}).get("pretrained") for name, run in params["runs"].items()
    }
    with_trunk = {name: item["trunk"] for name, item in inputs.items() if item["trunk"].startswith("pretrained/")}
    assert with_trunk == {name: f"pretrained/{trunk}" for name, trunk in named.items() if trunk}
    assert with_trunk["detr"] == "pretrained/digits_trunk_s8" and with_trunk["fcos"] == "pretrained/digits_trunk_fpn"
    for name, item in inputs.items():
        assert item["dataset"] == params["runs"][name]["dataset"]
        assert item["method"] == params["runs"][name]["method"]
        if not named[name]:
            assert item["trunk"] == f"data/prepared/{item['dataset']}"


def test_only_a_searched_run_has_a_tune_input(params):
    p = copy.deepcopy(params)
    assert stage_inputs(p)["searches"] == {}  # the default job searches nothing
    p["runs"]["classifier"]["search"] = {"algorithm": "random", "num_samples": 2}
    got = stage_inputs(p)
    assert list(got["searches"]) == ["classifier"]
    assert got["run_inputs"]["classifier"]["tuned"] == "results/tune/classifier/best.yaml"
    assert got["run_inputs"]["fcos"]["tuned"] == "data/prepared/digits"
    assert "&" not in render(p) and "*" not in render(p)  # written out, not as YAML aliases


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda r: r.pop("dataset"), "runs.classifier.dataset"),
        (lambda r: r.update(dataset="nowhere"), "runs.classifier.dataset"),
        (lambda r: r.update(method=["classifier"]), "runs.classifier.method"),
        (lambda r: r["config"].update(backbone={"pretrained": "nope"}), "runs.classifier.config.backbone.pretrained"),
    ],
)
def test_a_bad_run_is_named(params, edit, key):
    p = copy.deepcopy(params)
    edit(p["runs"]["classifier"])
    with pytest.raises(ConfigError) as err:
        stage_inputs(p, "my.yaml")
    assert err.value.source == "my.yaml" and err.value.key == key


def _project(tmp_path: Path, params: dict) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def test_refresh_writes_only_on_a_change(tmp_path, params):
    project = _project(tmp_path, params)
    assert refresh(project) is True
    first = (project / RUNS_FILE).stat()
    assert refresh(project) is False
    assert (project / RUNS_FILE).stat().st_ino == first.st_ino
    assert (project / RUNS_FILE).stat().st_mtime_ns == first.st_mtime_ns
    p = copy.deepcopy(params)
    p["runs"]["fcos"]["search"] = {"algorithm": "random"}
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert refresh(project) is True
    assert "fcos" in yaml.safe_load((project / RUNS_FILE).read_text())["searches"]


def test_a_project_whose_dvc_yaml_does_not_read_the_file_is_left_alone(tmp_path, params):
    project = _project(tmp_path, params)
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": {"cmd": "true"}}}))
    assert refresh(project) is False
    assert not (project / RUNS_FILE).exists()


def test_a_stale_file_is_an_error_under_dvc_only(tmp_path, params, monkeypatch):
    project = _project(tmp_path, params)
    refresh(project)
    p = copy.deepcopy(params)
    p["runs"]["extra"] = copy.deepcopy(p["runs"]["fcos"])
    monkeypatch.delenv("DVC_STAGE", raising=False)
    check_fresh(p, "params.yaml", project)  # outside DVC: the runner refreshes it first
    monkeypatch.setenv("DVC_STAGE", "train@extra")
    with pytest.raises(ConfigError) as err:
        check_fresh(p, "params.yaml", project)
    assert err.value.key == "run_inputs.extra" and "python -m pipelines.stages" in str(err.value)
    check_fresh(params, "params.yaml", project)  # the file agrees with the params it came from


def test_a_train_stage_with_a_stale_file_exits_before_any_work(tmp_path, params):
    project = _project(tmp_path, params)
    refresh(project)
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["config"]["backbone"] = {"pretrained": "digits_trunk_s8"}
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "DVC_STAGE": "train@classifier", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "pipelines.train", "--run", "classifier"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "dvc.runs.yaml: run_inputs.classifier: stale" in done.stderr
    assert sorted(x.name for x in project.iterdir()) == ["dvc.runs.yaml", "dvc.yaml", "params.yaml"]


def _plan(project: Path, monkeypatch):
    from pipelines.repro import make_plan

    monkeypatch.chdir(project)  # DVC names stages relative to the working directory
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=project, check=True)
    refresh(project)
    return make_plan(project)


def test_in_dvc_s_graph_only_detr_waits_for_its_trunk(tmp_path, params, monkeypatch):
    plan = _plan(_project(tmp_path, params), monkeypatch)
    waiting = {name for name, up in plan.upstream.items() if "pretrain@digits_trunk_s8" in up}
    assert waiting == {"train@detr", "compare"}
    assert not any(name.startswith("tune@") for name in plan.order)  # no search, no tune stage
    assert plan.upstream["train@fcos"] == {"code", "prepare@digits", "pretrain@digits_trunk_fpn"}
    assert plan.upstream["train@unet"] == {"code", "prepare@digits"}


def test_a_search_adds_its_tune_stage_before_its_run_only(tmp_path, params, monkeypatch):
    p = copy.deepcopy(params)
    p["runs"]["classifier"]["search"] = {"algorithm": "random", "num_samples": 2}
    plan = _plan(_project(tmp_path, p), monkeypatch)
    assert [name for name in plan.order if name.startswith("tune@")] == ["tune@classifier"]
    assert "tune@classifier" in plan.upstream["train@classifier"]
    assert not any(up.startswith("tune@") for up in plan.upstream["train@fcos"])
