"""compare reads each family's primary metric and direction from the runs' metrics.json, so it
needs neither torch nor the task modules; results written before the files stated them fall back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import ConfigError
from pipelines.compare import _task_info, group_runs

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"runs": {"small": {"method": "classifier"}, "boxes": {"method": "retinanet"}}}


def _write(results: Path, name: str, **summary) -> Path:
    path = results / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": name, "mlflow_group_run_id": f"group-{name}", **summary}))
    return path


def _stated(results: Path) -> None:
    _write(results, "small", task="classification", primary_metric="top1", higher_is_better=True)
    _write(results, "boxes", task="detection", primary_metric="mAP", higher_is_better=True)


_READ = """
import json, sys
from pathlib import Path
from pipelines.compare import _task_info, group_runs

groups, stated = group_runs(json.loads(sys.argv[2]), "params.yaml", Path(sys.argv[1]))
info = {task: _task_info(task, stated) for task in ("classification", "detection")}
print(json.dumps({"groups": groups, "info": info, "torch": "torch" in sys.modules}))
"""


def test_task_info_is_read_from_metrics_json_without_importing_torch(tmp_path):
    _stated(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _READ, str(tmp_path), json.dumps(PARAMS)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["groups"] == {"small": "group-small", "boxes": "group-boxes"}
    assert out["info"] == {"classification": ["top1", True], "detection": ["mAP", True]}
    assert out["torch"] is False


def test_stated_direction_is_the_file_s(tmp_path):
    params = {"runs": {"depth": {"method": "x"}}}
    _write(tmp_path, "depth", task="depth", primary_metric="abs_rel", higher_is_better=False)
    _, stated = group_runs(params, "params.yaml", tmp_path)
    assert _task_info("depth", stated) == ("abs_rel", False)  # no such family in components.tasks


def test_results_written_before_the_fields_fall_back_to_the_task_family(tmp_path):
    from components.tasks import get_task

    _write(tmp_path, "small", task="classification", primary_metric="top1", higher_is_better=True)
    _write(tmp_path, "boxes", task="detection")  # an older file: no primary_metric, higher_is_better
    groups, stated = group_runs(PARAMS, "params.yaml", tmp_path)
    assert set(groups) == {"small", "boxes"} and set(stated) == {"classification"}
    detection = get_task("detection")
    assert _task_info("detection", stated) == (detection.primary_metric, detection.higher_is_better) == ("mAP", True)


def test_a_half_stated_or_conflicting_family_names_the_file_and_field(tmp_path):
    _stated(tmp_path)
    path = _write(tmp_path, "boxes", task="detection", primary_metric="mAP")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: higher_is_better: missing or not a bool"):
        group_runs(PARAMS, "params.yaml", tmp_path)
    path = _write(tmp_path, "boxes", task="classification", primary_metric="top5", higher_is_better=True)
    where = re.escape(str(path))
    with pytest.raises(ConfigError, match=rf"{where}: primary_metric: classification: .*small/metrics.json"):
        group_runs(PARAMS, "params.yaml", tmp_path)
