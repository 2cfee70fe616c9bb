"""What one search is, read from ``params.yaml``: ``runs.<run>.search`` over the ``search`` defaults.

::

    search:                          # defaults of every search
      max_concurrent_trials: 2
      trial_training: {scaling: {num_workers: 1}}
    runs:
      classifier:
        method: classifier
        search:                      # tune@classifier; train@classifier then uses its best.yaml
          algorithm: tpe_asha
          num_samples: 8
          epochs: 4
          space:
            training.optimizer.lr: {loguniform: [1.0e-3, 0.3]}
            config.label_smoothing: {uniform: [0.0, 0.2]}
            training.augment: {policy_space: subpolicies, sub_policies: 3}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.config import ConfigError, deep_merge, from_dict

TUNE_ROOT = Path("results/tune")  # tune@<run> writes results/tune/<run>/


def best_file(run: str) -> Path:
    """The overrides tune@<run> found, which train@<run> trains with."""
    return TUNE_ROOT / run / "best.yaml"


ALGORITHMS = ("tpe_asha", "random", "pbt", "faster_autoaugment")


@dataclass
class AshaParams:
    """ASHA (arXiv 1810.05934): trials are compared at rungs of grace_period * rf^k epochs."""

    grace_period: int = 1
    reduction_factor: int = 2

    def validate(self) -> None:
        if self.grace_period < 1:
            raise ValueError("grace_period must be >= 1")
        if self.reduction_factor < 2:
            raise ValueError("reduction_factor must be >= 2")


@dataclass
class PbtParams:
    """Population Based Training (arXiv 1711.09846) as PBA uses it (arXiv 1905.05393): every
    ``perturbation_interval`` epochs the bottom ``quantile_fraction`` of the population copies a
    top trial's weights and policy and explores around that policy."""

    perturbation_interval: int = 1
    quantile_fraction: float = 0.25
    resample_probability: float = 0.2  # PBA: a parameter is resampled uniformly with this probability

    def validate(self) -> None:
        if self.perturbation_interval < 1:
            raise ValueError("perturbation_interval must be >= 1")
        if not 0.0 < self.quantile_fraction <= 0.5:
            raise ValueError("quantile_fraction must be in (0, 0.5]")
        if not 0.0 <= self.resample_probability <= 1.0:
            raise ValueError("resample_probability must be in [0, 1]")


@dataclass
class SearchConfig:
    algorithm: Literal["tpe_asha", "random", "pbt", "faster_autoaugment"] = "tpe_asha"
    num_samples: int = 8  # trials (PBT: the population)
    max_concurrent_trials: int = 2  # Ray Train runs at once; each takes trial_training's workers
    epochs: int = 4  # every trial's schedule (ASHA's max_t); the final run keeps its own epochs
    seed: int = 0
    budget_epochs: int | None = None  # stop the whole search once its trials trained this many epochs in all
    trial_training: dict[str, Any] = field(default_factory=dict)  # `training` overrides for trials only
    # A trial on one worker trains in the trial's own process instead of starting a Ray Train
    # worker group (seconds per trial); false: every trial starts one, as multi-worker trials do.
    single_worker_in_trial: bool = True
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> distribution; empty: the method's default
    asha: AshaParams = field(default_factory=AshaParams)
    pbt: PbtParams = field(default_factory=PbtParams)
    faster_autoaugment: dict[str, Any] = field(default_factory=dict)  # FasterAAConfig fields

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if self.max_concurrent_trials < 1:
            raise ValueError("max_concurrent_trials must be >= 1")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.budget_epochs is not None and self.budget_epochs < self.epochs:
            raise ValueError("budget_epochs must be >= epochs (one trial's schedule) or null")
        if self.algorithm == "pbt" and self.num_samples < 2:
            raise ValueError("pbt needs a population: num_samples >= 2")
        if self.algorithm == "pbt" and not self.space:
            raise ValueError("algorithm pbt needs a space (e.g. training.augment: {policy_space: pba})")


def load_search(params: dict[str, Any], run: str, source: str = "params.yaml") -> SearchConfig | None:
    """``runs.<run>.search`` merged over the ``search`` defaults, validated; None without one."""
    entry = (params.get("runs") or {}).get(run)
    if not isinstance(entry, dict) or entry.get("search") is None:
        return None
    own = entry["search"]
    if not isinstance(own, dict):
        raise ConfigError(source, f"runs.{run}.search", f"expected a mapping, got {type(own).__name__}")
    defaults = params.get("search") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(source, "search", f"expected a mapping, got {type(defaults).__name__}")
    return from_dict(SearchConfig, deep_merge(defaults, own), source=source, key=f"runs.{run}.search")
