"""Collectives run on a device their process group supports: with GPUs Ray's group is NCCL alone,
and the evaluators' CPU counts must then be reduced on the GPU, not fail."""

from __future__ import annotations

import torch
import torch.distributed as dist

from components.tasks import base


def _group(tmp_path, backend: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/store", rank=0, world_size=1)


def test_a_cpu_tensor_goes_to_the_gpu_when_the_group_is_nccl_only(monkeypatch):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert base.collective_device(torch.device("cpu")) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    assert base.collective_device(torch.device("cpu")) == torch.device("cpu")
    assert base.collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_a_cuda_only_group_rejects_cpu_tensors_that_the_helper_moves(tmp_path, monkeypatch):
    """The fault itself, on CPU: a group whose only backend is registered for CUDA refuses a CPU
    tensor. The helper routes it to the group's device and back (here, where no GPU exists, the
    group's device is pretended to be the CPU, so the route is taken but the copy lands here)."""
    _group(tmp_path, "cuda:gloo")
    try:
        counts = torch.tensor([3.0, 4.0], dtype=torch.float64)
        try:
            dist.all_reduce(counts.clone())
            raised = None
        except RuntimeError as exc:
            raised = str(exc)
        assert raised is not None and "cpu" in raised.lower()
        moved = []
        monkeypatch.setattr(base, "collective_device", lambda device: moved.append(device) or torch.device("cpu"))
        monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.mul_(1))
        out = base.all_reduce_sum(counts)
        assert moved == [torch.device("cpu")] and out.device.type == "cpu" and torch.equal(out, counts)
    finally:
        dist.destroy_process_group()


def test_the_evaluators_reduce_through_the_helper(tmp_path):
    """Classification counts (CPU float64) reduce over a real gloo group through all_reduce_sum."""
    from components.tasks import get_task

    _group(tmp_path, "gloo")
    try:
        evaluator = get_task("classification").evaluator(3)
        logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
        evaluator.update(logits, (None, torch.tensor([0, 2])))
        assert evaluator.compute()["top1"] == 0.5
    finally:
        dist.destroy_process_group()
