"""Random-number state: seeding, and the per-worker state a checkpoint carries so that a resumed
run draws the same numbers an uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from components.tasks.base import all_gather_objects


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG state; on a GPU only its own device's CUDA generator (a worker draws from
    no other, and a resume on a node with fewer GPUs then still finds the state it needs)."""
    np_state = np.random.get_state()
    on_cuda = device is not None and device.type == "cuda"
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if on_cuda else None,
    }


def set_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints of earlier versions saved every visible device's state
        cuda = cuda[0] if cuda else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def gather_rng(device: torch.device | None = None) -> list[dict[str, Any]]:
    """Every worker's RNG state, in rank order (so each resumes with its own)."""
    return all_gather_objects(get_rng(device))
