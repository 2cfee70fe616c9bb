"""Bounded waits for a run's workers: what a worker group asks for, who holds the cluster, and
a clear error instead of a wait without end.

Ray Train's controller waits ``training.scaling.resource_wait_s`` for the placement group of a
worker group to be placed (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, which the driver sets
from it) and, with ``controller_failure_limit=0``, gives up after one such wait instead of
retrying forever. :func:`fit_within_wait` then looks at the cluster through Ray's state API:

- the cluster could fit the request once live work ends (runs and trials whose actors are
  alive hold the resources): the run is queued behind them, says so, and starts again;
- otherwise (the cluster is too small for the request now, e.g. a node was lost, or what holds
  the resources is a reservation nothing alive uses) it raises :class:`ResourceWaitError`
  naming what was asked for, what is free, and what holds the rest, by placement group, owner
  job and actor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
STALE_RECHECK_S = 5.0  # a reservation is stale only if no alive actor used it in two looks this far apart


class ResourceWaitError(RuntimeError):
    """A worker group waited ``resource_wait_s`` for resources that no live work will free."""


@dataclass
class Holder:
    """One placement group that reserves resources: whose it is and whether anything alive uses it."""

    placement_group_id: str
    resources: dict[str, float]
    job_id: str
    owner: str  # the job's entrypoint (a stage's command line) or its id
    actors: list[str] = field(default_factory=list)  # class names of its alive actors
    detached: bool = False

    @property
    def live(self) -> bool:
        return bool(self.actors)


@dataclass
class ClusterView:
    """The cluster when a wait ran out: resources of its alive nodes, what is free, who holds it."""

    total: dict[str, float]
    free: dict[str, float]
    holders: list[Holder]
    actors_outside_groups: dict[str, float]  # resources of alive actors that no placement group holds
    dead_nodes: list[str]  # nodes the cluster has lost (address and id)
    error: str | None = None  # the state API's, if it could not be read

    def merged(self, later: ClusterView) -> ClusterView:
        """``later``, with a group counted live if it was live in either look."""
        earlier = {h.placement_group_id: h for h in self.holders}
        for h in later.holders:
            if not h.live and h.placement_group_id in earlier:
                h.actors = list(earlier[h.placement_group_id].actors)
        return later

    def stale(self) -> dict[str, float]:
        """Resources reserved by placement groups that no alive actor uses."""
        return _sum(h.resources for h in self.holders if not h.live)


def worker_bundles(training) -> list[dict[str, float]]:
    """One bundle per worker, as Ray Train requests them."""
    from components.training.ray_trainer import worker_resources

    return [worker_resources(training)] * training.scaling.num_workers


def fits(ask: list[dict[str, float]], available: dict[str, float]) -> bool:
    need = _sum(ask)
    return all(available.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def queued_behind_live_work(ask: list[dict[str, float]], view: ClusterView) -> bool:
    """Whether the request fits the cluster's alive nodes once the live holders let go: only
    reservations nothing alive uses are taken as lost."""
    if view.error is not None:
        return False
    usable = {k: v - view.stale().get(k, 0.0) for k, v in view.total.items()}
    return fits(ask, usable)


def describe(ask: list[dict[str, float]], view: ClusterView, waited_s: float, label: str) -> str:
    need = _sum(ask)
    lines = [
        f"{label}: its worker group waited {waited_s:.0f} s (training.scaling.resource_wait_s) for "
        f"{len(ask)} × {_fmt(ask[0]) if ask else '{}'} = {_fmt(need)} and did not get it.",
        f"  the cluster's alive nodes have {_fmt(view.total)}; free now: {_fmt(view.free)}",
    ]
    if view.error:
        lines.append(f"  Ray's state API could not be read ({view.error}); holders unknown")
    if view.dead_nodes:
        lines.append(f"  nodes lost: {', '.join(view.dead_nodes)}")
    for h in sorted(view.holders, key=lambda h: h.live):
        what = f"alive actors: {', '.join(sorted(set(h.actors)))}" if h.live else "no alive actor uses it (stale)"
        detached = ", detached" if h.detached else ""
        lines.append(
            f"  placement group {h.placement_group_id[:12]} holds {_fmt(h.resources)} for {h.owner} "
            f"(job {h.job_id}{detached}); {what}"
        )
    if view.actors_outside_groups:
        lines.append(f"  alive actors outside placement groups hold {_fmt(view.actors_outside_groups)}")
    if not queued_behind_live_work(ask, view) and view.error is None:
        if fits(ask, view.total):
            lines.append("  -> reservations that nothing alive uses keep it from fitting: remove them "
                         "(ray.util.remove_placement_group) or restart the cluster")  # fmt: skip
        else:
            lines.append("  -> the cluster is smaller than the request: add nodes, ask for fewer workers, "
                         "or raise resource_wait_s where the cluster autoscales")  # fmt: skip
    return "\n".join(lines)


def cluster_view() -> ClusterView:
    """Read the connected cluster through Ray's state API (its dashboard); never raises."""
    import ray

    total = _alive_totals()
    free = {k: float(v) for k, v in ray.available_resources().items() if not k.startswith("node:")}
    try:
        from ray.util.state import list_actors, list_jobs, list_nodes, list_placement_groups

        # This Ray's own address: without one the state API fails on a machine with two Rays.
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ray.get_runtime_context().gcs_address
        opts = {"address": address, "limit": 10000, "raise_on_missing_output": False, "timeout": 10}
        groups = list_placement_groups(detail=True, **opts)
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, **opts)
        nodes = list_nodes(detail=True, **opts)
        entrypoints = {}
        for job in list_jobs(address=address, timeout=10):
            if getattr(job, "job_id", None):
                entrypoints[job.job_id] = (job.entrypoint or "").strip()
    except Exception as exc:  # no dashboard, a timeout: the error still says what was asked and free
        return ClusterView(total, free, [], {}, [], error=f"{type(exc).__name__}: {exc}"[:300])
    in_group: dict[str, list[str]] = {}
    outside: list[dict[str, float]] = []
    for actor in actors:
        if actor.placement_group_id:
            in_group.setdefault(actor.placement_group_id, []).append(actor.class_name)
        else:
            outside.append(actor.required_resources or {})
    holders = []
    for group in groups:
        if group.state != "CREATED":
            continue
        resources = _sum(_bundle_resources(b) for b in group.bundles or [])
        job = group.creator_job_id
        holders.append(
            Holder(
                group.placement_group_id,
                resources,
                job,
                _owner(entrypoints.get(job), job),
                in_group.get(group.placement_group_id, []),
                bool(group.is_detached),
            )
        )
    dead = [f"{n.node_ip}/{n.node_id[:12]}" for n in nodes if n.state == "DEAD"]
    return ClusterView(total, free, holders, _sum(outside), dead)


def fit_within_wait(make_trainer: Callable[[], Any], training, label: str, *, log=print):
    """``make_trainer().fit()`` with its worker group's wait for resources bounded by
    ``training.scaling.resource_wait_s``: queued behind live work it starts again, otherwise
    :class:`ResourceWaitError`. A worker group that failed to start (a node lost while starting
    it) is started again up to ``training.failure.max_failures`` times."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    wait_s = training.scaling.resource_wait_s
    os.environ[START_TIMEOUT_ENV] = str(wait_s)  # read by the controller, which gets it from here
    ask = worker_bundles(training)
    start_failures, first = 0, time.monotonic()
    while True:
        try:
            return make_trainer().fit()
        except ControllerError as exc:
            cause = exc.controller_failure
            if isinstance(cause, WorkerGroupStartupFailedError) and start_failures < training.failure.max_failures:
                start_failures += 1
                log(f"{label}: its worker group failed to start ({cause}); starting it again", flush=True)
                continue
            if not isinstance(cause, WorkerGroupStartupTimeoutError):
                raise
            try:
                judge_wait(ask, wait_s, label, first, log=log)
            except ResourceWaitError as err:
                raise err from exc


def judge_wait(ask: list[dict[str, float]], wait_s: float, label: str, first: float, *, log=print) -> None:
    """After one wait of ``wait_s`` for ``ask`` ran out: return (saying so) if the request is
    queued behind live work, else raise :class:`ResourceWaitError` saying what holds the cluster."""
    view = cluster_view()
    if not queued_behind_live_work(ask, view) and any(not h.live for h in view.holders):
        time.sleep(STALE_RECHECK_S)  # a group between its placement and its workers' start
        view = view.merged(cluster_view())
    if queued_behind_live_work(ask, view):
        busy = ", ".join(sorted({h.owner for h in view.holders if h.live})) or "other work"
        log(f"{label}: still queued for {_fmt(_sum(ask))} after {time.monotonic() - first:.0f} s, "
            f"behind {busy}; waiting again", flush=True)  # fmt: skip
        return
    raise ResourceWaitError(describe(ask, view, wait_s, label))


def alive_nodes() -> dict[str, str]:
    """The cluster's alive nodes: id -> address."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def report_lost_nodes(before: dict[str, str], label: str, *, log=print) -> list[str]:
    """Nodes of ``before`` that the cluster has lost since (its health checks took them for
    dead): a log line, and the tag ``ray.nodes_lost`` on the active MLflow run."""
    try:
        import mlflow

        now = alive_nodes()
        lost = [f"{addr}/{node[:12]}" for node, addr in before.items() if node not in now]
        if lost:
            log(f"{label}: the cluster lost {len(lost)} node(s) during the run: {', '.join(lost)}", flush=True)
            if mlflow.active_run() is not None:
                mlflow.set_tag("ray.nodes_lost", ", ".join(lost))
        return lost
    except Exception:  # a report, never the reason a run fails
        return []


def _alive_totals() -> dict[str, float]:
    import ray

    total: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                if not k.startswith("node:") and not k.startswith("accelerator_type"):
                    total[k] = total.get(k, 0.0) + float(v)
    return total


def _bundle_resources(bundle: dict) -> dict[str, float]:
    resources = bundle.get("unit_resources", bundle)
    return {k: float(v) for k, v in resources.items() if isinstance(v, (int, float))}


def _owner(entrypoint: str | None, job_id: str) -> str:
    if not entrypoint:
        return f"job {job_id}"
    return entrypoint if len(entrypoint) <= 120 else entrypoint[:117] + "..."


def _sum(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: (int(v) if float(v).is_integer() else round(v, 3)) for k, v in sorted(resources.items())
             if v and k != "memory" and k != "object_store_memory"}  # fmt: skip
    return "{" + ", ".join(f"{k}: {v}" for k, v in shown.items()) + "}"
