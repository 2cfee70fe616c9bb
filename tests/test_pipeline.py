"""The whole pipeline: `make repro`'s runner in a temporary copy of the project with shrunk params."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.methods import get_method_class
from components.tasks import get_task
from tests.conftest import ROOT, shrink

pytestmark = pytest.mark.slow
# The real params' runs that go through the pipeline here: every task family, a pretrained trunk
# before the run that starts from it (detr), an untrained baseline row (epochs: 0), and methods
# whose Ray Train path no other test tracks end to end. Every registered method also has its own
# train/eval smoke test (test_registry) and, through the generic loop, the same Ray Train path.
PIPELINE_RUNS = ("classifier", "detr", "segformer", "mask_rcnn", "moco", "representation_random_init", "smooth_ap")


def _copy_project(dst: Path) -> None:
    for name in ("components", "pipelines", "dvc.yaml", "dvc.runs.yaml", "params.yaml", "pyproject.toml", ".dvcignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)


def _dvc(cwd: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _repro(cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.repro", "-j", "3"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_repro_end_to_end(tmp_path, params):
    project = tmp_path / "project"
    project.mkdir()
    _copy_project(project)
    tiny = shrink(params, epochs=1, workers=1)  # one worker per run, as the default job trains
    tiny["runs"] = {name: tiny["runs"][name] for name in PIPELINE_RUNS}
    for name in ("classifier", "smooth_ap"):  # seeds as the default job has them, two to stay quick
        tiny["runs"][name]["seeds"] = [0, 1]
    (project / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(project)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    assert _dvc(project, "init", "-q", env=env).returncode == 0

    first = _repro(project, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "one local Ray for every stage" in first.stdout
    runs, pretrain = tiny["runs"], tiny["pretrain"]
    assert "wrote dvc.runs.yaml" in first.stdout  # the tiny params' runs, refreshed before the plan
    for name, run in runs.items():  # a run that starts from a trunk runs after it, the trunk after the data
        trunk = run["config"].get("backbone", {}).get("pretrained")
        if trunk:
            started = first.stdout.index(f"Running stage 'pretrain@{trunk}'")
            assert first.stdout.index("Running stage 'prepare@digits'") < started
            assert first.stdout.index(f"Running stage 'train@{name}'") > started, name
    assert {"detr", "mask_rcnn"} <= {n for n, r in runs.items() if r["config"].get("backbone", {}).get("pretrained")}
    # No run searches here, so there is no tune stage (test_scale_out runs one).
    assert not any(run.get("search") for run in runs.values()) and "Running stage 'tune@" not in first.stdout

    db = sqlite3.connect(project / "mlflow.db")
    finished = db.execute(
        "select r.name, r.status from runs r join tags t on r.run_uuid = t.run_uuid "
        "where t.key = 'run_kind' and t.value = 'group'"
    ).fetchall()
    assert sorted(finished) == sorted((name, "FINISHED") for name in [*runs, *pretrain])
    seeds = {name: len(entry.get("seeds") or [0]) for name, entry in [*runs.items(), *pretrain.items()]}
    children = db.execute(
        "select t.value, count(*) from runs r join tags t on r.run_uuid = t.run_uuid join tags k "
        "on k.run_uuid = r.run_uuid where t.key = 'run' and k.key = 'run_kind' and k.value = 'seed' "
        "and r.status = 'FINISHED' group by t.value"
    ).fetchall()
    assert dict(children) == seeds
    # the comparison: read from MLflow, written to reports/, logged as a compare run
    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert summary["digits-classification"]["runs"]["classifier"]["n"] == 2
    assert "smooth_ap" in summary["digits-retrieval"]["runs"]
    assert (project / "reports" / "index.html").is_file()
    assert (project / "reports" / "families" / "digits-retrieval.md").is_file()
    (compare_status,) = db.execute(
        "select r.status from runs r join tags t on r.run_uuid = t.run_uuid where t.key = 'run_kind' "
        "and t.value = 'compare'"
    ).fetchone()
    assert compare_status == "FINISHED"
    searched = [name for name, run in runs.items() if run.get("search")]
    for name in searched:  # a parent run per search, a child per trial, and the run trained with its best
        best = yaml.safe_load((project / "results" / "tune" / name / "best.yaml").read_text())
        parent = best["mlflow_parent_run_id"]
        (status,) = db.execute("select status from runs where run_uuid = ?", (parent,)).fetchone()
        assert status == "FINISHED"
        children = db.execute(
            "select count(*) from tags where key = 'mlflow.parentRunId' and value = ?", (parent,)
        ).fetchone()[0]
        assert children == (runs[name]["search"]["num_samples"] if best["algorithm"] != "faster_autoaugment" else 0)
        tuned_by = db.execute(
            "select t.value from tags t join runs r on r.run_uuid = t.run_uuid where t.key = 'tuned_by' and r.name = ?",
            (name,),
        ).fetchall()
        assert tuned_by == [(parent,)]
    logged_by = {  # each family's primary metric; instance segmentation also logs box mAP
        "val/top1": {"classification"},
        "val/mAP": {"detection", "instance_segmentation"},
        "val/mIoU": {"semantic_segmentation"},
        "val/mask_mAP": {"instance_segmentation"},
        "val/knn_top1": {"representation"},
        "val/recall_at_1": {"retrieval"},
    }
    for key, families in logged_by.items():
        entries = [*runs.values(), *pretrain.values()]
        expected = sum(get_task(get_method_class(r["method"]).task).name in families for r in entries)
        assert expected > 0, key
        expected = sum(
            seeds[n]
            for n, r in [*runs.items(), *pretrain.items()]
            if get_task(get_method_class(r["method"]).task).name in families
        )
        steps = db.execute(
            "select count(*) from metrics m join tags t on m.run_uuid = t.run_uuid "
            "where m.key = ? and t.key = 'stage' and t.value in ('train', 'pretrain')",
            (key,),
        ).fetchone()[0]
        assert steps == expected  # one epoch each, of each seed
    aliases = db.execute("select name, alias from registered_model_aliases").fetchall()
    # Pretrained trunks and untrained baselines (epochs: 0) are not registered models.
    methods = {r["method"] for r in runs.values() if r.get("training", {}).get("epochs", 1) > 0}
    assert sorted(aliases) == sorted((f"digits-{m}", "champion") for m in methods)
    for run in runs:  # each run states its family's metric, which compare reads without importing it
        stated = json.loads((project / "results" / run / "metrics.json").read_text())
        family = get_task(get_method_class(runs[run]["method"]).task)
        assert (stated["task"], stated["primary_metric"], stated["higher_is_better"]) == (
            family.name, family.primary_metric, family.higher_is_better)  # fmt: skip
        assert (project / "models" / run / "model.pt").is_file()
    for name in pretrain:
        assert (project / "pretrained" / name / "model.pt").is_file()
    assert (project / "dvc.lock").is_file()

    second = _repro(project, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "up to date" in second.stdout and "Running stage" not in second.stdout, second.stdout
    status = _dvc(project, "status", env=env)
    assert "up to date" in status.stdout, status.stdout

    # Editing one method's module leaves every other run up to date.
    with open(project / "components" / "methods" / "detr.py", "a") as module:
        module.write("\n# an edit\n")
    assert _dvc(project, "repro", "code", env=env).returncode == 0
    changed = json.loads(_dvc(project, "status", "--json", env=env).stdout)
    # ... and re-runs detr's stage and the comparison (it reads every run's results), nothing else
    assert sorted(changed) == ["compare", "train@detr"], changed
