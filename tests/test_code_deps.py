"""What a stage depends on is the code it runs (pipelines/code.py): a method's edit re-runs its
own runs, an edit of the loop re-runs every run."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from components.config import load_yaml
from pipelines.code import all_manifests, closure, manifest, method_task
from tests.conftest import ROOT


@pytest.fixture
def tree(tmp_path):
    for name in ("components", "pipelines"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(name for name in before if before[name] != after[name])


def test_a_run_depends_on_its_method_and_family_not_on_others():
    files = set(manifest("train", "classifier")["files"])
    assert {
        "pipelines/train.py",
        "components/training/loop.py",
        "components/training/trainer.py",
        "components/methods/classifier.py",
        "components/tasks/classification.py",
    } <= files
    assert not any(f.startswith(("components/methods/detr", "components/tasks/detection")) for f in files)
    detr = set(manifest("train", "detr")["files"])
    assert {
        "components/methods/detr.py",
        "components/methods/detection_base.py",
        "components/tasks/detection.py",
    } <= detr
    assert "components/methods/classifier.py" not in detr
    tune = set(manifest("tune", "classifier")["files"])
    assert {"pipelines/tune.py", "components/search/tuner.py"} <= tune
    assert "components/search/tuner.py" not in files  # training does not run the search code


def test_prepare_depends_on_the_importers_and_storage():
    files = set(manifest("prepare")["files"])
    assert {"pipelines/prepare.py", "components/data/digits.py", "components/storage/s3.py"} <= files
    assert {"components/data/importers/coco.py", "components/data/importers/voc.py"} <= files
    assert not any(f.startswith("components/training/") for f in files)


def test_editing_one_method_changes_its_manifests_only(tree):
    before = all_manifests(tree)
    with open(tree / "components" / "methods" / "detr.py", "a") as f:
        f.write("\n# an edit\n")
    assert _changed(before, all_manifests(tree)) == ["train-detr.json", "tune-detr.json"]


def test_editing_the_loop_changes_every_run_and_no_prepare(tree):
    before = all_manifests(tree)
    with open(tree / "components" / "training" / "loop.py", "a") as f:
        f.write("\n# an edit\n")
    changed = _changed(before, all_manifests(tree))
    assert "prepare.json" not in changed and "compare.json" not in changed
    assert changed == sorted(name for name in before if name not in ("prepare.json", "compare.json"))


def test_the_report_s_code_re_runs_compare_only(tree):
    before = all_manifests(tree)
    with open(tree / "components" / "report" / "render.py", "a") as f:
        f.write("\n# an edit\n")
    assert _changed(before, all_manifests(tree)) == ["compare.json"]
    files = set(before["compare.json"]["files"])
    assert {"pipelines/compare.py", "components/report/stats.py", "components/tasks/retrieval.py"} <= files


def test_a_method_s_task_family_is_read_without_importing_it():
    from components.methods import METHOD_MODULES, get_method_class

    for name in METHOD_MODULES:
        assert method_task(name) == get_method_class(name).task, name


def test_importing_the_registries_imports_no_method_or_family():
    code = (
        "import sys, components.methods, components.tasks; "
        "print(sorted(m for m in sys.modules if m.startswith(('components.methods.', 'components.tasks.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['components.methods.base', 'components.tasks.base']"


def test_stages_depend_on_their_manifest_and_not_on_where_runs_go():
    stages = load_yaml(ROOT / "dvc.yaml")["stages"]
    assert stages["code"]["deps"] == ["components", "pipelines"]
    for name, manifest_dep in (
        ("pretrain", "results/code/train-${item.method}.json"),
        ("tune", "results/code/tune-${item.method}.json"),
        ("train", "results/code/train-${item.method}.json"),
    ):
        do = stages[name]["do"]
        assert manifest_dep in do["deps"], name
        assert not any(d.startswith(("components", "pipelines/")) for d in do["deps"]), name
        assert not {"ray", "mlflow"} & set(do["params"]), name
    # prepare names its code itself, so that it runs beside `code`: every file it imports, no more
    deps = stages["prepare"]["do"]["deps"]
    files = set(manifest("prepare")["files"])
    assert all(f in deps or any(f.startswith(d + "/") for d in deps) for f in files), sorted(files)
    assert all(d in files or any(f.startswith(d + "/") for f in files) for d in deps), deps
    assert not any(d.startswith("results/code") for d in deps)


def test_closure_follows_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "components"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import x\n")
    (pkg / "c.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("")
    found = {str(p.relative_to(tmp_path)) for p in closure(["components.sub.a"], tmp_path)}
    assert found == {"components/__init__.py", "components/sub/__init__.py", "components/sub/a.py",
                     "components/sub/b.py", "components/c.py"}  # fmt: skip
