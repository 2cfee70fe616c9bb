"""Gradient Centralization (arXiv 2004.01461): centralised gradients have zero mean per output channel."""

from __future__ import annotations

import copy

import torch
from torch import nn

from components.training.optim import OptimizerConfig, build_optimizer, centralize_gradients


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _backward(model: nn.Module) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    nn.functional.cross_entropy(model(x), y).backward()


def test_centralized_gradients_have_zero_mean_per_output_channel():
    model = _net()
    _backward(model)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert before["0.weight"].mean(dim=(1, 2, 3)).abs().max() > 1e-6  # not already centred
    centralize_gradients(model.parameters())
    for name, p in model.named_parameters():
        if p.dim() > 1:
            means = p.grad.mean(dim=tuple(range(1, p.dim())))
            assert means.abs().max() < 1e-7, name
            # the centred gradient is the projection: g - mean(g)
            expected = before[name] - before[name].mean(dim=tuple(range(1, p.dim())), keepdim=True)
            torch.testing.assert_close(p.grad, expected)
        else:  # biases and BN parameters are left alone
            torch.testing.assert_close(p.grad, before[name])


def test_sgd_with_gc_matches_the_papers_update():
    """One SGD_GC step equals w - lr * GC(g + wd*w) for weights, plain SGD with L2 for 1-d params."""
    lr, wd = 0.1, 0.01
    cfg = OptimizerConfig(
        name="sgd", lr=lr, momentum=0.0, nesterov=False, weight_decay=wd, gradient_centralization=True
    )
    model = _net()
    start = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, cfg)
    _backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        g = grads[name] + wd * start[name]
        if g.dim() > 1:
            g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        torch.testing.assert_close(p.detach(), start[name] - lr * g)


def test_gc_off_is_plain_sgd():
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)
    model = _net()
    start = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, cfg)
    _backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name] - 0.1 * grads[name])


def test_gc_with_adamw_centralizes_before_the_step():
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0, gradient_centralization=True)
    model = _net()
    opt = build_optimizer(model, cfg)
    _backward(model)
    opt.step()
    w = model[0].weight
    assert w.grad.mean(dim=(1, 2, 3)).abs().max() < 1e-7
