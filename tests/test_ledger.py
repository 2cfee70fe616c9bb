"""The compute ledger: FlopCounterMode's counting convention, the cached matmul peak, MFU and metrics."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from components.training import ledger
from components.training.ledger import (
    ComputeLedger,
    StepFlops,
    count_flops,
    count_parameters,
    matmul_peak_flops,
    peak_memory_bytes,
)

MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-./ ]+$")


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_is_two_flops_per_multiply_add_bias_not_counted(bias):
    i, o, b = 7, 5, 3
    lin = nn.Linear(i, o, bias=bias)
    x = torch.randn(b, i)
    assert count_flops(lambda: lin(x)) == 2 * i * o * b == 210


def test_conv_forward_counts_output_positions():
    cin, cout, k, stride, padding, b, h, w = 3, 4, 3, 2, 1, 2, 9, 11
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)
    x = torch.randn(b, cin, h, w)
    h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    assert conv(x).shape[-2:] == (h_out, w_out) == (5, 6)
    assert count_flops(lambda: conv(x)) == 2 * cin * cout * k * k * h_out * w_out * b == 2 * 3 * 4 * 9 * 30 * 2


def test_step_flops_counts_forward_and_backward_once():
    i, o, b = 7, 5, 3
    lin = nn.Linear(i, o)
    forward = 2 * i * o * b
    step_flops = StepFlops()
    assert step_flops.flops is None
    x = torch.randn(b, i, requires_grad=True)
    with step_flops.measure():  # forward + grad of the weight + grad of the input
        lin(x).sum().backward()
    assert step_flops.flops == 3 * forward == 630
    with step_flops.measure():  # already measured: a no-op, and nothing is added
        lin(x).sum().backward()
        lin(x).sum().backward()
    assert step_flops.flops == 630
    # An input that needs no gradient (a network's first layer): forward + weight gradient only.
    assert count_flops(lambda: lin(torch.randn(b, i)).sum().backward()) == 2 * forward


def test_step_flops_measures_again_after_a_failed_step():
    step_flops = StepFlops()
    lin = nn.Linear(4, 2)
    with pytest.raises(RuntimeError), step_flops.measure():
        lin(torch.randn(1, 4))
        raise RuntimeError("step failed")
    assert step_flops.flops is None
    with step_flops.measure():
        lin(torch.randn(1, 4))
    assert step_flops.flops == 2 * 4 * 2


def test_counts_a_detr_forward_without_gradients(tiny_params, tiny_dataset):
    """The driver counts the trained model's forward under ``no_grad``; FlopCounterMode's module
    tracker fails on DETR there ("Expected gradient function to be set"), the totals-only counter
    gives what the tracker gives with gradients on."""
    from components.data.canonical import read_info
    from tests.test_trainer import _trainer

    trainer = _trainer(tiny_params, tiny_dataset, [], run="detr", epochs=1)
    model = trainer.core.eval()
    example = trainer.method.example_input(read_info(tiny_dataset))
    with FlopCounterMode(display=False) as tracked:
        model(example)
    with torch.no_grad():
        assert count_flops(lambda: model(example)) == tracked.get_total_flops() > 0


def test_count_parameters():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3, bias=False), nn.BatchNorm1d(3))
    assert count_parameters(model) == (10 * 20 + 20) + 20 * 3 + 2 * 3
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 20 * 3 + 2 * 3
    tied = nn.Sequential(model[2], model[2])  # a shared layer counts once
    assert count_parameters(tied) == 20 * 3


def test_matmul_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch, one_thread):
    cache = tmp_path / "peak.json"
    cpu = torch.device("cpu")
    peak = matmul_peak_flops(cpu, torch.float32, threads=1, cache=cache)
    assert 1e8 < peak < 1e14

    probes = []

    def fake_probe(device, dtype, budget_s=1.0):
        probes.append((dtype, torch.get_num_threads()))
        return 1e9 * len(probes)

    monkeypatch.setattr(ledger, "_probe_matmul", fake_probe)
    t0 = time.perf_counter()
    assert matmul_peak_flops(cpu, torch.float32, threads=1, cache=cache) == peak
    assert time.perf_counter() - t0 < 0.1 and probes == []
    # Another dtype or thread count is another entry, probed with that many threads.
    assert matmul_peak_flops(cpu, torch.float64, threads=1, cache=cache) == 1e9
    assert matmul_peak_flops(cpu, torch.float32, threads=2, cache=cache) == 2e9
    assert probes == [(torch.float64, 1), (torch.float32, 2)]
    assert torch.get_num_threads() == 1  # restored after the probe
    assert sorted(json.loads(cache.read_text()).values()) == sorted([peak, 1e9, 2e9])
    assert list(tmp_path.iterdir()) == [cache]  # no temporary file left behind
    # Any process reading the same file gets the same numbers; the env var names the default file.
    monkeypatch.setenv("CVFLOW_PEAK_CACHE", str(cache))
    assert matmul_peak_flops(cpu, torch.float64, threads=1) == 1e9
    assert len(probes) == 2


def test_the_probe_keeps_the_best_run(monkeypatch):
    # The deadline, then timed runs of 4 s, 1 s and 3 s, then past the deadline.
    clock = iter([0.0, 0.0, 4.0, 4.0, 5.0, 5.0, 8.0, 100.0])
    monkeypatch.setattr(ledger, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(torch, "matmul", lambda a, b, out=None: out)
    assert ledger._probe_matmul(torch.device("cpu"), torch.float32) == 2.0 * 1024**3 / 1.0


def test_short_training_has_an_mfu_between_zero_and_one(tmp_path, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    step_flops, steps = StepFlops(), 30

    def step():
        with step_flops.measure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # the measured step is slowed down by counting: it is not part of the timed run
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    forward = 2 * 128 * (256 * 512 + 512 * 10)
    assert step_flops.flops == forward + forward + 2 * 128 * 512 * 10  # no input gradient for the first layer

    peak = matmul_peak_flops(torch.device("cpu"), torch.float32, threads=1, cache=tmp_path / "peak.json")
    run = ComputeLedger(
        parameters=count_parameters(model),
        forward_flops_per_image=forward / 128,
        train_flops=float(step_flops.flops * steps),
        train_wall_s=wall,
        eval_wall_s=0.0,
        workers=1,
        device="cpu",
        peak_memory_bytes=[peak_memory_bytes(torch.device("cpu"))],
        peak_flops_per_device=peak,
    )
    assert 0 < run.mfu <= 1


def test_to_metrics_of_a_hand_made_ledger():
    from mlflow.utils.validation import _validate_metric_name

    run = ComputeLedger(
        parameters=1000,
        forward_flops_per_image=2e6,
        train_flops=8e12,
        train_wall_s=100.0,
        eval_wall_s=20.0,
        workers=4,
        device="cuda",
        peak_memory_bytes=[3 * 2**20, 5 * 2**20, 4 * 2**20, 2**20],
        peak_flops_per_device=1e11,
    )
    assert run.device_seconds == 4 * 120.0
    assert run.achieved_flops_per_s == 8e12 / 100.0 / 4 == 2e10
    assert run.mfu == pytest.approx(0.2)
    metrics = run.to_metrics()
    assert metrics["compute/parameters"] == 1000.0
    assert metrics["compute/forward_flops_per_image"] == 2e6
    assert metrics["compute/train_flops"] == 8e12
    assert metrics["compute/train_wall_s"] == 100.0 and metrics["compute/eval_wall_s"] == 20.0
    assert metrics["compute/device_seconds"] == metrics["compute/gpu_seconds"] == 480.0
    assert metrics["compute/peak_memory_mb"] == 5.0
    assert [metrics[f"compute/peak_memory_mb/rank_{r}"] for r in range(4)] == [3.0, 5.0, 4.0, 1.0]
    assert metrics["compute/achieved_flops_per_s"] == 2e10
    assert metrics["compute/peak_flops_per_s"] == 1e11
    assert metrics["compute/mfu"] == pytest.approx(0.2)
    for name, value in metrics.items():
        assert MLFLOW_NAME.match(name) and type(value) is float
        _validate_metric_name(name)

    on_cpu = ComputeLedger(1, 1.0, 0.0, 0.0, 1.0, 2, "cpu", [0, 0], 0.0)
    cpu_metrics = on_cpu.to_metrics(prefix="")
    assert "gpu_seconds" not in cpu_metrics and cpu_metrics["device_seconds"] == 2.0
    assert on_cpu.achieved_flops_per_s == 0.0 and on_cpu.mfu == 0.0

    data = json.loads(json.dumps(run.to_dict()))
    assert data["peak_memory_mb_per_rank"] == [3.0, 5.0, 4.0, 1.0]
    assert data["device"] == "cuda" and data["mfu"] == pytest.approx(0.2)
    assert {f"compute/{k}" for k in data} - set(metrics) == {"compute/peak_memory_mb_per_rank", "compute/device"}


def test_cpu_peak_memory_is_the_peak_rss():
    before = peak_memory_bytes(torch.device("cpu"))
    assert before > 10 * 2**20  # a Python process with torch loaded is well over 10 MiB
    # Touching more bytes than the peak so far puts the resident set above it: the peak is in bytes.
    big = torch.ones(before + 128 * 2**20, dtype=torch.uint8)
    assert peak_memory_bytes(torch.device("cpu")) >= big.numel() > before
