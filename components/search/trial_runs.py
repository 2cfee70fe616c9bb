"""The MLflow runs of a search's trials: one child run per trial under the search's parent run.

A trial opens its own child run (or reopens it after a restore or a PBT exploit); the search
driver ends it when Tune ends the trial, since Tune stops the trial's process as soon as its last
result arrives. Pruned trials end KILLED with the tag ``tune.pruned``.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from components.tracking import mlflow_run as tracking
from components.training.spec import RunSpec


def find_child(client, ctx: dict[str, Any], trial_id: str) -> list:
    return client.search_runs(
        [ctx["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{ctx['parent_run_id']}' and tags.trial_id = '{trial_id}'",
        max_results=1,
    )


def open_child_run(client, ctx: dict[str, Any], trial_id: str, spec: RunSpec, config: dict[str, Any]) -> str:
    """The trial's MLflow child run: its own from before a restart, or a new one."""
    found = find_child(client, ctx, trial_id)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        # Reopened after a restored search restarted the trial, or after PBT handed it a checkpoint.
        client.set_tag(run_id, "tune.reopened", str(int(found[0].data.tags.get("tune.reopened", "0")) + 1))
        return run_id
    run = client.create_run(
        ctx["experiment_id"],
        run_name=f"{ctx['run']}/{trial_id}",
        tags={
            "mlflow.parentRunId": ctx["parent_run_id"],
            "trial_id": trial_id,
            "stage": "tune-trial",
            tracking.RUN_KIND: "trial",
            "run": ctx["run"],
            "method": spec.method,
            "dataset": spec.dataset,
        },
    )
    tracking.log_params(client, run.info.run_id, {**spec.resolved(), "sampled": dict(config)})
    return run.info.run_id


class TrialRunCloser(Callback):
    """Ends a trial's child run when Tune ends the trial, in the search driver: the trial's own
    process is stopped as soon as its last result arrives (or the scheduler prunes it), so it
    cannot do this itself. Holds only plain data: Tune pickles it with the experiment."""

    def __init__(self, ctx: dict[str, Any], epochs: int, algorithm: str) -> None:
        self.uri, self.epochs, self.algorithm = ctx["tracking_uri"], epochs, algorithm
        self.ids = {k: ctx[k] for k in ("experiment_id", "parent_run_id")}

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        reached = int((trial.last_result or {}).get("training_iteration", 0) or 0)
        pruned = reached < self.epochs and self.algorithm != "pbt"
        self._close(trial.trial_id, "pruned" if pruned else "completed")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial.trial_id, "errored")

    def _close(self, trial_id: str, status: str) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        found = find_child(client, self.ids, trial_id)
        if found:
            mark(client, found[0], status)


def mark(client, run, status: str, error: str | None = None) -> None:
    """Tag a trial's run with how the trial ended and end it accordingly (pruned: KILLED)."""
    run_id = run.info.run_id
    client.set_tag(run_id, "tune.status", status)
    if status == "pruned":
        client.set_tag(run_id, "tune.pruned", "true")
    if error:
        client.set_tag(run_id, "error", error)
    end = {"pruned": "KILLED", "errored": "FAILED"}.get(status, "FINISHED")
    if run.info.status != end:
        client.set_terminated(run_id, end)


def close_child_runs(client, ctx: dict[str, Any], trials: list[dict[str, Any]]) -> None:
    """Every trial's run ends as its trial did (again, for trials ended before a restore)."""
    for trial in trials:
        found = find_child(client, ctx, trial["trial_id"])
        if not found:
            continue
        trial["mlflow_run_id"] = found[0].info.run_id
        mark(client, found[0], trial["status"], trial["error"])
