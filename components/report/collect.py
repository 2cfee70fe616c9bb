"""What a comparison is made of, read from MLflow (the source of truth): each entry's group run,
its seeds' child runs, their final metrics, validation curves and the compute each got.

Works against any tracking URI: the embedded SQLite store or the scale-out stack's server.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from components.tracking.mlflow_run import RUN_KIND


class ReportError(ValueError):
    """The runs to compare are missing or incomplete in MLflow."""


@dataclass
class SeedRun:
    seed: int
    run_id: str
    metrics: dict[str, float]  # the run's latest value of each metric
    curve: list[tuple[int, float]]  # (epoch, val/<primary>) in step order


@dataclass
class Entry:
    """One entry of ``runs``: a method trained with its seeds."""

    name: str
    method: str
    task: str
    dataset: str
    group_run_id: str
    paper: str
    epochs: int
    seeds: list[SeedRun] = field(default_factory=list)

    @property
    def family(self) -> str:
        return f"{self.dataset}/{self.task}"

    @property
    def baseline(self) -> bool:
        """A random-init row (``epochs: 0``): the family's reference, not a contender."""
        return self.epochs == 0

    def values(self, metric: str) -> list[float]:
        """One value per seed; a seed without it is an error, not a silent drop."""
        missing = [s.seed for s in self.seeds if metric not in s.metrics]
        if missing:
            raise ReportError(f"run {self.name}: seeds {missing} have no metric {metric!r} in MLflow")
        return [s.metrics[metric] for s in self.seeds]

    def median(self, metric: str) -> float | None:
        present = [s.metrics[metric] for s in self.seeds if metric in s.metrics]
        return statistics.median(present) if present else None


def collect(client, groups: dict[str, str], primary_of) -> list[Entry]:
    """``groups``: entry name -> its group run's id (from ``results/<run>/metrics.json``);
    ``primary_of(task)``: the task family's primary metric, for the validation curves."""
    entries = []
    for name, group_id in groups.items():
        try:
            group = client.get_run(group_id)
        except Exception as exc:  # MlflowException: not in this tracking store
            raise ReportError(f"run {name}: group run {group_id} not found in MLflow ({exc})") from None
        tags = group.data.tags
        if group.info.status != "FINISHED" or tags.get(RUN_KIND) != "group":
            raise ReportError(f"run {name}: MLflow run {group_id} is not a finished group run")
        entry = Entry(
            name=name,
            method=tags["method"],
            task=tags["task"],
            dataset=tags["dataset"],
            group_run_id=group_id,
            paper=tags.get("paper", ""),
            epochs=int(group.data.params.get("training.epochs", "0")),
        )
        wanted = [int(s) for s in tags["seeds"].split(",")]
        children = client.search_runs(
            [group.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{group_id}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        by_seed = {}
        for child in children:  # the newest finished run of each seed
            seed = int(child.data.tags.get("seed", "-1"))
            by_seed.setdefault(seed, child)
        missing = [s for s in wanted if s not in by_seed]
        if missing:
            raise ReportError(f"run {name}: group run {group_id} has no finished run for seeds {missing}")
        key = f"val/{primary_of(entry.task)}"
        for seed in wanted:
            child = by_seed[seed]
            curve = [(int(m.step), float(m.value)) for m in client.get_metric_history(child.info.run_id, key)]
            entry.seeds.append(SeedRun(seed, child.info.run_id, dict(child.data.metrics), sorted(curve)))
        entries.append(entry)
    return entries
