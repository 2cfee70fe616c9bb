"""What one training run is, read from ``params.yaml``.

``training`` holds the defaults of the generic loop; ``runs.<name>`` picks a method and dataset,
gives the method's typed config under ``config`` and may override any key of ``training``::

    training: {epochs: 10, optimizer: {lr: 0.05}}
    runs:
      classifier_gc:
        method: classifier
        dataset: digits
        config: {widths: [16, 32, 64]}
        training: {optimizer: {gradient_centralization: true}}

``pretrain.<name>`` entries have the same form; they train the trunks that runs start from with
``config.backbone.pretrained: <name>``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from components.augment.policy import AugmentConfig
from components.config import ConfigError, deep_merge, from_dict, section, to_dict
from components.methods import Method, create_method
from components.tasks import get_task
from components.training.optim import OptimizerConfig, SchedulerConfig


@dataclass
class ScalingParams:
    """Ray Train ``ScalingConfig``: workers, CPU or GPU, resources per worker."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    accelerator_type: str | None = None
    # How long a worker group waits for resources that live work does not hold (a node lost, a
    # stale reservation, a request larger than the cluster) before the run fails with what holds
    # them; behind other runs it stays queued. Raise it where the cluster autoscales.
    resource_wait_s: float = 600.0
    # A one-worker run trains in one Ray actor holding the worker's resources (checkpoints,
    # retries and the bounded wait kept) instead of a Ray Train worker group, whose controller,
    # workers and process group cost seconds to start; false: a worker group for it too.
    one_worker_in_actor: bool = True

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if not self.resource_wait_s > 0:
            raise ValueError(f"resource_wait_s must be > 0 seconds, got {self.resource_wait_s}")


@dataclass
class FailureParams:
    max_failures: int = 2  # worker/node failures Ray Train recovers from, resuming from a checkpoint
    fail_at_epoch: int | None = None  # fault drill: the first attempt of the run raises at this epoch


@dataclass
class TrainingConfig:
    epochs: int = 10  # 0: no training, the initial weights are scored (a random-init baseline row)
    batch_size: int = 64  # global: split evenly across workers, so results do not depend on the count
    eval_batch_size: int = 256
    seed: int = 0
    loader_workers: int = 0
    amp: bool = True  # autocast on GPU only: bf16, or fp16 with loss scaling where bf16 is not native
    channels_last: bool = True  # on GPU only
    checkpoints_to_keep: int = 2
    grad_clip_norm: float | None = None  # clip the global gradient norm to this (DETR: 0.1)
    figures_every: int = 1  # log a PNG of validation predictions every N epochs (0: never)
    eval_every: int = 1  # validate every N epochs (and always at the last); the best model is picked among them
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # an augmentation policy on training items
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    scaling: ScalingParams = field(default_factory=ScalingParams)
    failure: FailureParams = field(default_factory=FailureParams)

    def validate(self) -> None:
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0 (0: score the initial weights, a random-init baseline)")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError("grad_clip_norm must be > 0 or null")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")
        if self.figures_every < 0:
            raise ValueError("figures_every must be >= 0")
        if self.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by scaling.num_workers {self.scaling.num_workers}"
            )


@dataclass
class RunEntry:
    method: str
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] | None = None  # tune@<run>: validated by components.search.config
    # One Ray Train run and one MLflow child run per seed, under the entry's group run; null: the
    # one seed of ``training.seed``.
    seeds: list[int] | None = None

    def validate(self) -> None:
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError("seeds must list at least one seed (or be null: training.seed)")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds must be distinct, got {self.seeds}")


@dataclass
class RunSpec:
    """A resolved, validated run: everything the training loop needs besides the data."""

    name: str
    method: str
    dataset: str
    method_config: dict[str, Any]
    training: TrainingConfig
    source: str = "params.yaml"
    section: str = "runs"  # or "pretrain"
    seeds: tuple[int, ...] = ()  # empty: the one seed of training.seed

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) or [self.training.seed]

    def for_seed(self, seed: int) -> RunSpec:
        """The run of one seed: ``training.seed`` set to it."""
        training = copy.deepcopy(self.training)
        training.seed = seed
        return dataclasses.replace(self, training=training, seeds=(seed,))

    def group_fingerprint(self, data_checksum: str, init_checksum: str | None = None) -> str:
        """Identifies the entry's group run: the fingerprints of its seeds' runs, in order."""
        runs = [self.for_seed(s).fingerprint(data_checksum, init_checksum) for s in self.seed_list]
        return hashlib.sha256(json.dumps(runs).encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        """Dotted key of the entry in the params file."""
        return f"{self.section}.{self.name}"

    def create_method(self) -> Method:
        return create_method(self.method, self.method_config, source=self.source, key=f"{self.key}.config")

    def resolved(self) -> dict[str, Any]:
        """The full resolved configuration (method config with its defaults filled in)."""
        return {
            "run": self.name,
            "method": self.method,
            "dataset": self.dataset,
            "config": to_dict(self.create_method().cfg),
            "training": to_dict(self.training),
        }

    def fingerprint(self, data_checksum: str, init_checksum: str | None = None) -> str:
        """Identifies the run's inputs; a restarted stage with the same fingerprint resumes.

        Settings of how a run is executed, not of what it computes (failure handling, the fault
        drill, checkpoint retention, loader processes, figures, the wait for resources), are left out, so a run
        restarted with more retries still resumes.
        """
        resolved = self.resolved()
        for key in ("failure", "checkpoints_to_keep", "loader_workers", "figures_every"):
            resolved["training"].pop(key)
        resolved["training"]["scaling"].pop("resource_wait_s")
        resolved["training"]["scaling"].pop("one_worker_in_actor")
        resolved["data_checksum"] = data_checksum
        if init_checksum is not None:  # a retrained pretrained trunk makes a new run
            resolved["init_checksum"] = init_checksum
        blob = json.dumps(resolved, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_payload(self) -> dict[str, Any]:
        """Plain-data form, sent to Ray workers."""
        return {
            "name": self.name,
            "method": self.method,
            "dataset": self.dataset,
            "method_config": self.method_config,
            "training": to_dict(self.training),
            "source": self.source,
            "section": self.section,
            "seeds": list(self.seeds),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RunSpec:
        training = from_dict(TrainingConfig, payload["training"], source=payload["source"], key="training")
        return cls(
            name=payload["name"],
            method=payload["method"],
            dataset=payload["dataset"],
            method_config=payload["method_config"],
            training=training,
            source=payload["source"],
            section=payload.get("section", "runs"),
            seeds=tuple(payload.get("seeds", ())),
        )


SECTIONS = ("runs", "pretrain")


RESERVED_RUN_NAMES = ("tune",)  # results/tune/ holds the searches' outputs


def load_run_spec(
    params: dict[str, Any],
    run: str,
    source: str = "params.yaml",
    kind: str = "runs",
    overrides: dict[str, Any] | None = None,
    overrides_source: str | None = None,
) -> RunSpec:
    """Validate ``<kind>.<run>`` (method, config) and ``training`` merged with its overrides;
    ``kind`` is ``runs`` or ``pretrain``. ``overrides`` (``{"config": ..., "training": ...}``, a
    search's best trial or a trial's sample) are merged over the entry; errors in them name
    ``overrides_source``."""
    if kind not in SECTIONS:
        raise ValueError(f"kind must be one of {SECTIONS}, got {kind!r}")
    entries = section(params, kind, source)
    if run not in entries:
        what = "run" if kind == "runs" else "pretrain entry"
        raise ConfigError(source, f"{kind}.{run}", f"no such {what}; {kind} in the file: {', '.join(entries)}")
    if kind == "runs" and run in RESERVED_RUN_NAMES:
        raise ConfigError(source, f"{kind}.{run}", f"{run!r} is reserved (results/{run}/); rename the run")
    entry = from_dict(RunEntry, entries[run], source=source, key=f"{kind}.{run}")
    if overrides:
        where = overrides_source or source
        unknown = sorted(set(overrides) - {"config", "training"})
        if unknown:
            raise ConfigError(where, unknown[0], "unknown key (overrides hold only config and training)")
        entry.config = deep_merge(entry.config, overrides.get("config") or {})
        entry.training = deep_merge(entry.training, overrides.get("training") or {})
        source = f"{source} + {where}"
    defaults = params.get("training") or {}
    from_dict(TrainingConfig, defaults, source=source, key="training")  # errors in defaults name them
    training = from_dict(
        TrainingConfig, deep_merge(defaults, entry.training), source=source, key=f"{kind}.{run}.training"
    )
    seeds = tuple(entry.seeds or ())
    spec = RunSpec(run, entry.method, entry.dataset, entry.config, training, os.fspath(source), kind, seeds)
    method = spec.create_method()  # validates the method name and its config now, not inside a worker
    if training.augment.kind != "none" and not get_task(method.task).augment_policies:
        raise ConfigError(
            source,
            f"{kind}.{run}.training.augment",
            f"the {method.task} family makes its own views; augmentation policies apply to items "
            "(image, target) of the other families",
        )
    trunk = method.pretrained_trunk()
    if trunk is not None:
        key = f"{spec.key}.config.backbone.pretrained"
        if kind == "pretrain":
            raise ConfigError(source, key, "a pretrain entry cannot start from another one")
        if trunk.pretrained not in (params.get("pretrain") or {}):
            known = ", ".join(params.get("pretrain") or {}) or "none"
            raise ConfigError(source, key, f"no pretrain entry {trunk.pretrained!r} (entries: {known})")
    return spec
