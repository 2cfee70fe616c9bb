"""Gradient Centralization (arXiv 2004.01461): centralised gradients have zero mean per output channel."""

from __future__ import annotations

import copy

import pytest
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
    centralize_gradients(model)
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


class _Mixed(nn.Module):
    """Every kind of parameter a model here has: conv, transposed conv (U-Net's up-convs),
    linear, an embedding table (DETR's queries), a raw 2-D table and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.up_grouped = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.queries = nn.Embedding(5, 4)
        self.table = nn.Parameter(torch.randn(5, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.up_grouped(self.up(self.grouped(self.conv(x)))))
        pooled = x.mean(dim=(2, 3))  # (B, 4)
        scores = pooled @ (self.queries.weight * self.table).T  # (B, 5)
        return self.fc(pooled) + scores[:, :3]


def _mixed_grads(via: str = "optimizer") -> tuple[_Mixed, dict[str, torch.Tensor]]:
    """The model and its raw gradients; its ``.grad`` then holds them after GC, applied by the
    optimiser's pre-step hook (which leaves the gradients centralised in place) or directly."""
    torch.manual_seed(0)
    model = _Mixed()
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.0, gradient_centralization=True))
    torch.manual_seed(1)
    model(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    if via == "optimizer":
        opt.step()
    else:
        centralize_gradients(model)
    return model, before


def _transposed_output_means(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean gradient of each output channel of a ConvTranspose weight (in, out/groups, *k): output
    channel g*out_g + j holds the rows of group g at column j."""
    in_g, out_g = grad.shape[0] // groups, grad.shape[1]
    return torch.stack([grad[g * in_g : (g + 1) * in_g, j].mean() for g in range(groups) for j in range(out_g)])


@pytest.mark.parametrize("via", ["optimizer", "function"])
def test_transposed_conv_is_centred_per_output_channel(via):
    model, before = _mixed_grads(via)
    assert _transposed_output_means(before["up.weight"], 1).abs().max() > 1e-6  # not already centred
    for name, groups in (("up.weight", 1), ("up_grouped.weight", 2)):
        grad = getattr(model, name.split(".")[0]).weight.grad
        assert _transposed_output_means(grad, groups).abs().max() < 1e-6, name
        expected, in_g = before[name].clone(), grad.shape[0] // groups
        for g in range(groups):  # the projection: each channel's entries minus their mean
            for j in range(grad.shape[1]):
                expected[g * in_g : (g + 1) * in_g, j] -= before[name][g * in_g : (g + 1) * in_g, j].mean()
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("via", ["optimizer", "function"])
def test_embeddings_tables_norms_and_biases_are_left_alone(via):
    model, before = _mixed_grads(via)
    for name in ("queries.weight", "table", "norm.weight", "norm.bias", "conv.bias", "up.bias", "fc.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("via", ["optimizer", "function"])
def test_conv_and_linear_are_centred_over_all_but_the_output_dim(via):
    model, before = _mixed_grads(via)
    for name in ("conv.weight", "grouped.weight", "fc.weight"):
        g = before[name]
        expected = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, expected)


def test_optimizer_hook_centralizes_only_conv_and_linear_weights():
    """One SGD_GC step: GC(g + wd*w) for conv, transposed-conv and linear weights, g + wd*w for
    everything else (embedding tables included)."""
    lr, wd = 0.1, 0.01
    cfg = OptimizerConfig(
        name="sgd", lr=lr, momentum=0.0, nesterov=False, weight_decay=wd, gradient_centralization=True
    )
    torch.manual_seed(0)
    model = _Mixed()
    start = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, cfg)
    torch.manual_seed(1)
    model(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    params = dict(model.named_parameters())
    for name in ("up.weight", "up_grouped.weight"):
        groups = getattr(model, name.split(".")[0]).groups
        step = (start[name] - params[name].detach()) / lr
        assert _transposed_output_means(step, groups).abs().max() < 1e-6, name
    for name in ("conv.weight", "fc.weight"):
        g = grads[name] + wd * start[name]
        g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        torch.testing.assert_close(params[name].detach(), start[name] - lr * g)
    for name in ("queries.weight", "table", "norm.weight", "fc.bias"):
        torch.testing.assert_close(params[name].detach(), start[name] - lr * (grads[name] + wd * start[name]))


def test_attention_projections_are_centred_as_fully_connected_weights():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2)
    tokens = torch.randn(5, 2, 8)
    attn(tokens, tokens, tokens)[0].pow(2).sum().backward()
    raw = attn.in_proj_weight.grad.clone()
    assert raw.mean(dim=1).abs().max() > 1e-6  # not already centred
    centralize_gradients(attn)
    torch.testing.assert_close(attn.in_proj_weight.grad, raw - raw.mean(dim=1, keepdim=True))
    assert attn.out_proj.weight.grad.mean(dim=1).abs().max() < 1e-6
