"""``compare``: the comparison of every run in params.yaml, from MLflow, into ``reports/``.

python -m pipelines.compare [--params params.yaml] [--results results] [--out reports]

Each ``results/<run>/metrics.json`` (written by train@<run>) names the run's MLflow group run;
the runs themselves are read from MLflow, the source of truth, at the tracking URI in params (or
``MLFLOW_TRACKING_URI``). Writes ``reports/index.html`` (opens from disk), per family Markdown,
CSV and figures under ``reports/families/``, and ``reports/summary.json``; logs the report to
MLflow as a ``compare`` run in the experiment ``compare``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

from components.config import ConfigError, load_yaml, section
from pipelines.stages import check_fresh

COMPARE_EXPERIMENT = "compare"
REPORT_FILES = ("index.html", "families", "summary.json")


def group_runs(params: dict, source: str, results: Path) -> tuple[dict[str, str], dict[str, tuple[str, bool]]]:
    """Entry name -> group run id, and task family -> (primary metric, higher_is_better), from each
    run's metrics.json; a missing file or field names it. A file written before metrics.json stated
    the family's metric gives no family entry (:func:`_task_info` looks it up instead)."""
    groups: dict[str, str] = {}
    tasks: dict[str, tuple[str, bool]] = {}
    stated_in: dict[str, Path] = {}
    for name in section(params, "runs", source):
        path = results / name / "metrics.json"
        try:
            summary = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(str(path), "", f"missing: train run {name} first (`dvc repro train@{name}`)") from None
        except ValueError as exc:
            raise ConfigError(str(path), "", f"not JSON ({exc})") from None
        if "mlflow_group_run_id" not in summary:
            raise ConfigError(str(path), "mlflow_group_run_id", f"missing: re-run train@{name}")
        groups[name] = summary["mlflow_group_run_id"]
        info = _stated_task_info(summary, path, name)
        if info is None:
            continue
        task = summary["task"]
        if task in tasks and tasks[task] != info:
            where = f"{task}: {info} here, {tasks[task]} in {stated_in[task]}"
            raise ConfigError(str(path), "primary_metric", f"{where}; re-run the stale one")
        tasks[task], stated_in[task] = info, path
    return groups, tasks


def _stated_task_info(summary: dict, path: Path, name: str) -> tuple[str, bool] | None:
    """The family's (primary metric, higher_is_better) as one metrics.json states them; None where
    it states neither (written before it did)."""
    keys = ("task", "primary_metric", "higher_is_better")
    if not any(k in summary for k in keys[1:]):
        return None
    for key, kind in zip(keys, (str, str, bool), strict=True):
        if not isinstance(summary.get(key), kind):
            raise ConfigError(str(path), key, f"missing or not a {kind.__name__}: re-run train@{name}")
    return summary["primary_metric"], summary["higher_is_better"]


def _task_info(task: str, stated: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    """(primary metric, higher_is_better) of a task family: as its runs' metrics.json state them
    (``stated``), else from its definition, which imports torch and torchvision (seconds)."""
    if task in stated:
        return stated[task]
    from components.tasks import get_task

    family = get_task(task)
    return family.primary_metric, family.higher_is_better


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)

    import mlflow

    from components.report.collect import ReportError, collect
    from components.report.render import build_families, write_report
    from components.tracking import mlflow_run as tracking
    from components.training.platform import load_platform

    try:
        params = load_yaml(args.params)
        check_fresh(params, args.params)
        platform = load_platform(params, args.params)
        groups, stated = group_runs(params, args.params, args.results)
    except ConfigError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    tracking.apply_privacy_defaults(platform.mlflow.telemetry)
    uri = tracking.use_tracking(platform.mlflow)
    client = mlflow.MlflowClient(uri)
    task_info = functools.partial(_task_info, stated=stated)
    try:
        entries = collect(client, groups, lambda task: task_info(task)[0])
    except ReportError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    families = build_families(entries, task_info)
    commit = tracking.git_commit(".")
    meta = {
        "git commit": commit,
        "tracking": uri if uri.startswith("http") else "local MLflow store",
        "runs": str(len(entries)),
    }
    # Written aside, then moved in: a failed report leaves no half-written one behind.
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out, prefix=".compare-") as tmp:
        summary = write_report(families, Path(tmp), meta)
        for name in REPORT_FILES:
            target = args.out / name
            if target.is_dir():
                shutil.rmtree(target)
            target.unlink(missing_ok=True)
            (Path(tmp) / name).rename(target)
    experiment = tracking.use_experiment(COMPARE_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="compare") as run:
        mlflow.set_tags({tracking.RUN_KIND: "compare", "stage": "compare", "git_commit": commit})
        mlflow.log_params({f"group/{name}": gid for name, gid in groups.items()})
        mlflow.log_artifacts(str(args.out), "reports")
        for fam in families:
            mlflow.set_tag(f"claim/{fam.slug}", fam.sentence)
    for fam in families:
        print(f"compare {fam.slug}: {fam.sentence}")
    print(
        f"compare: {len(families)} families, {len(entries)} runs; wrote {args.out / 'index.html'}; "
        f"mlflow run {run.info.run_id} ({sum(len(f['runs']) for f in summary.values())} rows)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
