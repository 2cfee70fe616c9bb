"""The compute ledger of a training run: what it cost, so methods can be compared at equal compute.

Conventions:

* FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 FLOPs per
  multiply-add, and only for the ops it has formulas for (matmul/addmm/bmm, convolution and its
  backward, scaled-dot-product attention, ...). Bias additions, elementwise ops, norms, activations,
  losses, optimiser updates, NMS and data loading are not counted. A ``Linear(i, o)`` on ``b`` rows
  is therefore ``2*i*o*b`` with or without bias; its backward adds ``2*i*o*b`` for the weight
  gradient plus ``2*i*o*b`` for the input gradient when the input needs one (the first layer's
  input does not, so a network's backward is a little under 2x its forward).
* Training FLOPs are those of real steps (forward + backward), counted once with ``StepFlops`` and
  multiplied by the number of steps; they exclude evaluation.
* The peak is the host's *measured* matmul throughput (best of several timed GEMMs), not a data
  sheet number, so MFU = achieved / peak is the fraction of what this machine can really do with
  the same dtype and thread count, and tends to stay <= 1.
* Everything per device is per worker: ``achieved_flops_per_s`` divides by the number of workers.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

DEFAULT_PEAK_CACHE = Path("~/.cache/cvflow/matmul_peak.json")
_MIB = 2**20


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; shared ones count once, as ``model.parameters()`` yields them once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class _TotalsOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to the ``Global`` total.

    The tracker attributes FLOPs to modules by hooking autograd on each module's inputs and
    outputs; under DDP that breaks on modules fed with a leaf parameter's view (DETR's query
    embeddings: "Expected gradient function to be set"). The ledger needs only the total.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _flop_counter() -> FlopCounterMode:
    mode = FlopCounterMode(display=False)
    mode.mod_tracker = _TotalsOnly()  # type: ignore[assignment]
    return mode


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running ``fn()`` once, in FlopCounterMode's convention (see the module docstring)."""
    mode = _flop_counter()
    with mode:
        fn()
    return int(mode.get_total_flops())


class StepFlops:
    """Counts the FLOPs of one real training step, so no extra step is run just to measure.

    ``with step_flops.measure(): <forward + backward>``: the first block that completes is
    counted into ``flops``; later blocks run untouched, since counting slows every op down.
    """

    def __init__(self) -> None:
        self.flops: int | None = None

    def measure(self) -> AbstractContextManager[None]:
        return nullcontext() if self.flops is not None else self._count()

    @contextmanager
    def _count(self) -> Iterator[None]:
        mode = _flop_counter()
        with mode:
            yield
        # Only reached when the block did not raise: a failed step is measured again next time.
        self.flops = int(mode.get_total_flops())


def _probe_matmul(device: torch.device, dtype: torch.dtype, budget_s: float = 1.0) -> float:
    """Best-of-several timed square matmuls, in FLOP/s (``2*n**3`` per ``n x n`` product)."""
    # Large enough to saturate the BLAS/cuBLAS kernels, small enough to stay well under budget.
    n, per_timing = (8192, 4) if device.type == "cuda" else (1024, 1)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: thread pool start, kernel selection, allocations
    sync()
    best = math.inf
    deadline = time.perf_counter() + budget_s
    for i in range(10):
        sync()
        t0 = time.perf_counter()
        for _ in range(per_timing):  # several products per timing hide the launch latency on CUDA
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) / per_timing)
        if i >= 2 and time.perf_counter() > deadline:
            break
    # The fastest run is the closest to what the hardware can do; slower ones measured interference.
    return 2.0 * n**3 / best


def _peak_cache_key(device: torch.device, dtype: torch.dtype, threads: int) -> str:
    if device.type == "cuda":
        # A GPU's matmul speed does not depend on the host's CPU threads, but differs per model.
        return f"{socket.gethostname()}|cuda|{torch.cuda.get_device_name(device)}|{dtype}"
    return f"{socket.gethostname()}|{device.type}|{dtype}|threads={threads}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or unreadable: probe again rather than fail the run
    return data if isinstance(data, dict) else {}


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Readers in other processes see the old file or the new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, threads: int | None = None, cache: Path | None = None
) -> float:
    """This host's measured matmul peak in FLOP/s, probed once per host, device, dtype and thread count.

    ``threads`` is ``torch.get_num_threads()`` during the probe (default: the current value); it
    matters on CPU, where the peak scales with it. The result is cached in ``cache`` (default
    ``$CVFLOW_PEAK_CACHE`` or ``~/.cache/cvflow/matmul_peak.json``) so that workers and later runs
    read it instead of spending time and perturbing each other with probes.
    """
    device = torch.device(device)
    threads = torch.get_num_threads() if threads is None else threads
    path = Path(cache if cache is not None else os.environ.get("CVFLOW_PEAK_CACHE") or DEFAULT_PEAK_CACHE).expanduser()
    key = _peak_cache_key(device, dtype, threads)
    cached = _read_json(path).get(key)
    if isinstance(cached, int | float) and cached > 0:
        return float(cached)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = _probe_matmul(device, dtype)
    finally:
        torch.set_num_threads(before)
    # Re-read just before writing to keep entries other processes added meanwhile.
    _write_json_atomically(path, {**_read_json(path), key: peak})
    return peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device``: CUDA's allocator peak, or the peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


@dataclass
class ComputeLedger:
    """What a run cost. FLOPs and wall times are totals; ``peak_memory_bytes`` is one per worker by rank."""

    parameters: int
    forward_flops_per_image: float
    train_flops: float  # all workers together
    train_wall_s: float
    eval_wall_s: float
    workers: int
    device: str  # "cpu" or "cuda"
    peak_memory_bytes: list[int] = field(default_factory=list)
    peak_flops_per_device: float = 0.0

    @property
    def device_seconds(self) -> float:
        """Every worker holds a device for the whole run, training and evaluation alike."""
        return self.workers * (self.train_wall_s + self.eval_wall_s)

    @property
    def achieved_flops_per_s(self) -> float:
        """Training FLOP/s per device."""
        if self.train_wall_s <= 0 or self.workers <= 0:
            return 0.0
        return self.train_flops / self.train_wall_s / self.workers

    @property
    def mfu(self) -> float:
        """Model-FLOPs utilisation: achieved per device / measured peak per device."""
        return self.achieved_flops_per_s / self.peak_flops_per_device if self.peak_flops_per_device > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for a JSON file; memory per worker as a list in rank order."""
        memory_mb = [b / _MIB for b in self.peak_memory_bytes]
        data: dict[str, Any] = {
            "parameters": self.parameters,
            "forward_flops_per_image": float(self.forward_flops_per_image),
            "train_flops": float(self.train_flops),
            "train_wall_s": float(self.train_wall_s),
            "eval_wall_s": float(self.eval_wall_s),
            "workers": self.workers,
            "device": self.device,
            "device_seconds": self.device_seconds,
            "peak_memory_mb": max(memory_mb, default=0.0),
            "peak_memory_mb_per_rank": memory_mb,
            "achieved_flops_per_s": self.achieved_flops_per_s,
            "peak_flops_per_s": float(self.peak_flops_per_device),
            "mfu": self.mfu,
        }
        if self.device == "cuda":
            data["gpu_seconds"] = self.device_seconds
        return data

    def to_metrics(self, prefix: str = "compute/") -> dict[str, float]:
        """Flat float metrics with MLflow-valid names; memory in MiB, also per rank."""
        data = self.to_dict()
        per_rank = data.pop("peak_memory_mb_per_rank")
        data.pop("device")  # a tag, not a metric
        metrics = {f"{prefix}{k}": float(v) for k, v in data.items()}
        metrics.update({f"{prefix}peak_memory_mb/rank_{r}": float(mb) for r, mb in enumerate(per_rank)})
        return metrics
