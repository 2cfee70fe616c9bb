"""Population Based Augmentation (Ho et al., arXiv 1905.05393): PBT over an augmentation schedule.

Every trial trains under a policy that gives each op a probability and a magnitude, all zero at
the start. When PBT replaces a weak trial by a copy of a strong one, the copy's policy is explored
as the paper's Algorithm 2 does: each value is resampled uniformly with probability 0.2,
otherwise moved up or down by 0, 1, 2 or 3 grid steps of a tenth, and clipped to [0, 1]. The
schedule a model was trained under is its lineage of policies over epochs (kept in the
checkpoint by the training loop); the best trial's lineage is the found schedule.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from components.search.space import PREFIX

STEP = 0.1
MAX_STEPS = 3


def explore_fn(resample_probability: float, seed: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """PBT's ``custom_explore_fn``: PBA's exploration of every policy value in a config."""
    rng = random.Random(seed)

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for name, value in config.items():
            if not (name.startswith(PREFIX) and name.endswith((".prob", ".magnitude"))):
                continue
            if rng.random() < resample_probability:
                new = rng.randint(0, 10) * STEP
            else:
                new = value + rng.choice((-1, 1)) * rng.randint(0, MAX_STEPS) * STEP
            config[name] = round(min(1.0, max(0.0, new)), 6)
        return config

    return explore


def schedule_from_lineage(lineage: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The ``training.augment`` of kind ``pba`` whose steps are the lineage's policies, each from
    the fraction of training at which it took over (so it stretches to a run of any length)."""
    steps: list[dict[str, Any]] = []
    for entry in lineage:
        policy = entry["augment"]
        if policy.get("kind") != "pba":
            continue
        fraction = round(entry["from_epoch"] / max(epochs, 1), 6)
        ops = policy["schedule"][0]["ops"]
        if steps and steps[-1]["from_fraction"] == fraction:
            steps[-1]["ops"] = ops  # replaced before any epoch trained under it
        elif not steps or steps[-1]["ops"] != ops:
            steps.append({"from_fraction": fraction, "ops": ops})
    if not steps:
        raise ValueError("the lineage holds no pba policy")
    steps[0]["from_fraction"] = 0.0
    return {"kind": "pba", "schedule": steps}
