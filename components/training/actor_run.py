"""A one-worker run in one Ray actor: the loop without a Ray Train worker group.

With one worker there is nothing to distribute, yet Ray Train starts a controller actor, a
worker group, a torch process group and then the training function, each a hand-over of
seconds (about 10 s of a run on an idle 2-core machine, several times that under load). A
one-worker run (``training.scaling.one_worker_in_actor``, on by default) instead trains in a
single Ray actor that holds the worker's resources, so Ray still places it on the cluster and
queues it when the cluster is full, and keeps what Ray Train gave it:

- checkpoints: rank 0's checkpoint of every epoch is written to the run's folder in the Ray
  storage (a local folder or ``s3://``), the newest ``checkpoints_to_keep`` kept
  (:class:`CheckpointStore`); the same run name again resumes from the newest one;
- retries: an attempt that fails (an error in the loop, the actor's process or node lost) is
  started again in a new actor from the last checkpoint, up to ``training.failure.max_failures``
  times (``-1``: without limit), as ``FailureConfig(max_failures)`` does;
- a bounded wait: the actor's reservation (a one-bundle placement group) waits at most
  ``training.scaling.resource_wait_s`` at a time, judged as a worker group's
  (:func:`components.training.resources.judge_wait`).

The loop, its hooks and their results are the same: with one worker Ray Train does not wrap the
model in DDP and the samplers are given the rank and world size explicitly.

The driver asks for the actor as soon as its checks pass (:func:`prestart`), so the actor's
process starts and imports the loop while the driver sets up tracking; an entry's seeds train
one after another in the same actor (``keep_warm``), each from its own seeded state, and the
driver lets the actor go when the entry is done (:func:`release_warm`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from components.storage.cluster import RayStorage
from components.training.sessions import Session

COMPLETE = ".complete"  # written last into a persisted checkpoint: its files are all there
PREFIX = "checkpoint_"


class CheckpointStore:
    """Numbered checkpoints of one run under ``<storage>/<name>/``: ``checkpoint_000003`` holds
    the fourth checkpoint reported, and counts once its ``.complete`` marker is there (an
    attempt that died while writing leaves a folder without it, which is never read).

    The folder is listed once per store object; the actor's copy is the run's only writer while
    an attempt lasts, so it keeps that list up to date as it writes instead of listing the
    folder again (on S3, requests) every epoch."""

    def __init__(self, storage: RayStorage, name: str, keep: int | None) -> None:
        self.storage, self.name, self.keep = storage, name, keep
        self._found: list[tuple[int, str]] | None = None  # complete checkpoints, oldest first

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_found": None}  # each process lists the folder itself

    def _complete(self) -> list[tuple[int, str]]:
        from pyarrow import fs

        if self._found is None:
            filesystem, root = self.storage.arrow_location(self.name)
            found = []
            for entry in filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)):
                name, number = entry.base_name, entry.base_name[len(PREFIX) :]
                numbered = entry.type == fs.FileType.Directory and name.startswith(PREFIX) and number.isdigit()
                if numbered and filesystem.get_file_info(f"{entry.path}/{COMPLETE}").type == fs.FileType.File:
                    found.append((int(number), entry.path))
            self._found = sorted(found)
        return self._found

    def latest(self):
        """The newest complete checkpoint as a ``ray.train.Checkpoint``, or ``None``."""
        import ray.train

        found = self._complete()
        if not found:
            return None
        filesystem, _ = self.storage.arrow_location(self.name)
        return ray.train.Checkpoint(found[-1][1], filesystem=filesystem)

    def persist(self, directory: str) -> None:
        """Copy a local checkpoint folder in as the next checkpoint, then drop the oldest."""
        from pyarrow import fs

        filesystem, root = self.storage.arrow_location(self.name)
        found = self._complete()
        index = found[-1][0] + 1 if found else 0
        dest = f"{root}/{PREFIX}{index:06d}"
        filesystem.create_dir(dest, recursive=True)
        fs.copy_files(directory, dest, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
        with filesystem.open_output_stream(f"{dest}/{COMPLETE}") as out:
            out.write(b"")
        found.append((index, dest))
        while self.keep and len(found) > self.keep:
            filesystem.delete_dir(found.pop(0)[1])


class ActorSession(Session):
    """The trainer's runtime inside the run's actor: rank 0 of one, checkpoints through the store."""

    def __init__(self, store: CheckpointStore, use_gpu: bool) -> None:
        import torch

        self.store = store
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        self.restored = store.latest()

    def get_checkpoint(self) -> Any | None:
        return self.restored

    def report(self, metrics: dict[str, float], checkpoint: Any | None = None) -> None:
        if checkpoint is not None:
            self.store.persist(checkpoint.path)


class RunActor:
    """The process a one-worker run trains in (made a Ray actor by :func:`fit_in_actor`)."""

    def __init__(self) -> None:
        import components.training.loop  # noqa: F401  (imported while the driver sets up, not after)

    def train(self, payload: dict[str, Any], store: CheckpointStore) -> None:
        from components.training.loop import build_trainer

        use_gpu = bool(payload["spec"]["training"]["scaling"]["use_gpu"])
        build_trainer(payload, ActorSession(store, use_gpu)).train()


@dataclass
class ActorResult:
    """What the driver reads of a finished run, as of a Ray Train ``Result``."""

    checkpoint: Any


_warm: tuple[str, Any, Any] | None = None  # this process's actor kept for its next run: key, reservation, actor


def _bundle(training) -> dict[str, float]:
    from components.training.ray_trainer import worker_resources

    bundle = dict(worker_resources(training))
    if training.scaling.accelerator_type:
        bundle[f"accelerator_type:{training.scaling.accelerator_type}"] = 0.001
    return bundle


def _key(bundle: dict[str, float]) -> str:
    return json.dumps(bundle, sort_keys=True)


def prestart(training) -> None:
    """Ask Ray for a run's reservation and actor now, without waiting for either: the next
    :func:`fit_in_actor` with the same resources takes them."""
    global _warm
    bundle = _bundle(training)
    if _warm is None or _warm[0] != _key(bundle):
        release_warm()
        _warm = (_key(bundle), *_create(bundle))


def release_warm() -> None:
    """Let go of the actor kept for a next run (an entry's last seed is done)."""
    global _warm
    if _warm is not None:
        _stop(*_warm[1:])
        _warm = None


def fit_in_actor(payload: dict[str, Any], training, name: str, storage: RayStorage, label: str,
                 *, keep_warm: bool = False, log=print) -> ActorResult:  # fmt: skip
    """Train ``payload``'s run in one actor with ``training.scaling``'s per-worker resources,
    retried from its last checkpoint on failure; the newest checkpoint is the result.
    ``keep_warm``: the actor stays for this process's next run (an entry's next seed)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    global _warm
    store = CheckpointStore(storage, name, training.checkpoints_to_keep)
    bundle = _bundle(training)
    limit = training.failure.max_failures
    failures = 0
    while True:
        group, actor = _placed(bundle, training.scaling.resource_wait_s, label, log)
        finished = False
        try:
            ray.get(actor.train.remote(payload, store))
            finished = True
            break
        except (RayActorError, RayTaskError) as exc:
            failures += 1
            if limit != -1 and failures > limit:
                cause = exc.as_instanceof_cause() if isinstance(exc, RayTaskError) else exc
                raise cause from None  # the loop's own error, as Ray Train raises it
            log(f"{label}: attempt {failures} failed ({type(exc).__name__}: {_last_line(exc)}); "
                f"starting again from the last checkpoint", flush=True)  # fmt: skip
        finally:
            if finished and keep_warm:
                _warm = (_key(bundle), group, actor)
            else:
                _stop(group, actor)
    checkpoint = store.latest()
    if checkpoint is None:
        raise RuntimeError(f"{label}: the run finished without a checkpoint in {storage.ray_path(name)}")
    return ActorResult(checkpoint)


def _create(bundle: dict[str, float]):
    """A one-bundle reservation and an actor scheduled into it; neither is waited for."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([bundle])
    actor = (
        ray.remote(RunActor)
        .options(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")} or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
            max_restarts=0,
        )
        .remote()
    )
    return group, actor


def _placed(bundle: dict[str, float], wait_s: float, label: str, log):
    """The kept actor for these resources, or a new one, once its reservation is placed within
    the bounded wait (:func:`components.training.resources.judge_wait`)."""
    import ray

    from components.training.resources import judge_wait

    global _warm
    if _warm is not None and _warm[0] == _key(bundle):
        group, actor = _warm[1:]
        _warm = None
    else:
        release_warm()  # asked for other resources: not this run's
        group, actor = _create(bundle)
    first = time.monotonic()
    try:
        while not ray.wait([group.ready()], timeout=wait_s)[0]:
            judge_wait([bundle], wait_s, label, first, log=log)
    except BaseException:
        _stop(group, actor)
        raise
    return group, actor


def _stop(group, actor) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    with contextlib.suppress(Exception):  # already dead with its node
        ray.kill(actor, no_restart=True)
    with contextlib.suppress(Exception):
        remove_placement_group(group)


def _last_line(exc: BaseException) -> str:
    """The exception's own message: the last line of a remote error's text (its traceback first)."""
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else ""
