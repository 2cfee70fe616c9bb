"""Faster AutoAugment: a differentiable search for an augmentation policy (Hataya, Zdenek, Yoshizoe,
Nakayama, "Faster AutoAugment: Learning Augmentation Strategies using Backpropagation", arXiv
1911.06987).

A policy is ``num_sub_policies`` sub-policies of ``ops_per_sub_policy`` stages. Every stage holds,
for every op, a selection weight, a probability p and a magnitude mu in [0, 1]. Each image takes one
sub-policy drawn uniformly; a stage picks its op by a straight-through Gumbel-softmax over the
weights and applies it by a relaxed Bernoulli mask, ``b * op(x, mu) + (1 - b) * x``. The policy is
trained to make augmented images indistinguishable from original ones (WGAN-GP critic, gradient
penalty 10) while keeping their class (cross-entropy of the critic's class head, weight 0.1); Adam
lr 1e-3, betas (0, 0.999) for both. The result is the top op of every stage with its p and mu, in
the format ``components.augment.policy`` applies, and each op means what ``components.augment.ops``
says at that magnitude (the kernels below mirror torchvision's, which that module uses).

Deviations from the paper (and choices it leaves open):
- the op set and ranges are this project's (``ops.OPS``: 15 ops, no flips or cutout);
- the critic is a small plain CNN (no normalisation, which the per-sample gradient penalty rules
  out; features pooled to 2x2) with a critic and a class head, not WideResNet-40-2; its class head
  is trained on the original images with weight 1;
- one critic step, then one policy step, per mini-batch; each mini-batch is split in two halves,
  the originals the critic sees and the images the policy augments;
- the op is drawn per image, and the forward value is the hard one-hot choice (gradients through
  the soft weights), so the output is always an image the sampled policy could produce; one
  temperature serves the Gumbel-softmax and the relaxed Bernoulli;
- straight-through estimator: for ops not differentiable in mu (posterize, solarize, and the ops
  without a magnitude) d out / d mu = 1 per pixel; posterize and equalize also pass the gradient
  to their input unchanged, so earlier stages still learn through them;
- the final policy keeps each stage's arg-max op, p and mu rounded to 4 decimals; the learnt
  distributions over ops are returned beside it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.augment.ops import GEOMETRIC_OPS, MAGNITUDE_RANGES, OPS, SIGNED_OPS


@dataclass
class FasterAAConfig:
    num_sub_policies: int = 10
    ops_per_sub_policy: int = 2
    ops: list[str] = field(default_factory=lambda: list(OPS))
    epochs: int = 10
    batch_size: int = 64  # split in halves: original images and images to augment
    lr: float = 1e-3
    temperature: float = 0.05  # of the Gumbel-softmax and of the relaxed Bernoulli
    classification_weight: float = 0.1
    gp_weight: float = 10.0
    critic_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_sub_policies", "ops_per_sub_policy", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ops:
            raise ValueError("ops must name at least one op")
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise ValueError(f"ops: unknown op {unknown[0]!r} (known: {', '.join(OPS)})")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must not repeat an op, got {self.ops}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (half original, half augmented), got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.classification_weight < 0 or self.gp_weight < 0:
            raise ValueError("classification_weight and gp_weight must be >= 0")
        if not self.critic_widths or any(w < 1 for w in self.critic_widths):
            raise ValueError(f"critic_widths must be positive channel counts, got {self.critic_widths}")


@dataclass
class SearchResult:
    policy: dict
    history: list[dict[str, float]]
    op_weights: list[list[dict[str, float]]]


# ---------------------------------------------------------------- differentiable ops
# Each takes a batch x (N, C, H, W) in [0, 1], per-image magnitudes m (N,) in [0, 1] and signs (N,).

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _value(op: str, m: torch.Tensor) -> torch.Tensor:
    lo, hi = MAGNITUDE_RANGES[op]  # ops.op_value, on tensors
    return lo + (hi - lo) * m


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _sharpness_degenerate(x: torch.Tensor) -> torch.Tensor:
    """torchvision's: the image smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13, border pixels unchanged."""
    c = x.shape[1]
    kernel = x.new_ones(3, 3)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    inner = F.conv2d(x, kernel, groups=c)
    border = torch.ones_like(x, dtype=torch.bool)
    border[..., 1:-1, 1:-1] = False
    return torch.where(border, x, F.pad(inner, (1, 1, 1, 1)))


def _affine(x: torch.Tensor, lin: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Sample x at ``lin @ p + shift`` for every output pixel offset p from the image centre
    (pixels); zero fill. ``lin`` (N, 2, 2), ``shift`` (N, 2). In affine_grid's normalised
    coordinates (align_corners=False) that is S^-1 lin S, S = diag(W/2, H/2)."""
    h, w = x.shape[-2:]
    s = x.new_tensor([w / 2.0, h / 2.0])
    theta = torch.cat([lin * (s.view(1, 1, 2) / s.view(1, 2, 1)), (shift / s).unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometric(op: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op at signed value v (N,) with torchvision's F.affine conventions (positive angle:
    anticlockwise; translate moves the content by +v), as ``components.augment.policy`` applies it."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    h, w = x.shape[-2:]
    shift = torch.stack([zero, zero], 1)
    if op == "shear_x":
        rows = (one, v, zero, one)
    elif op == "shear_y":
        rows = (one, zero, v, one)
    elif op == "rotate":
        a = v * (math.pi / 180.0)
        rows = (torch.cos(a), torch.sin(a), -torch.sin(a), torch.cos(a))
    else:
        rows = (one, zero, zero, one)
        shift = torch.stack([-v * w, zero], 1) if op == "translate_x" else torch.stack([zero, -v * h], 1)
    return _affine(x, torch.stack(rows, 1).view(-1, 2, 2), shift)


def _to_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.detach().mul(255.0).round().clamp(0, 255)  # as policy.py does before uint8 kernels


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = torch.pow(2.0, 8.0 - bits.clamp(max=8.0)).view(-1, 1, 1, 1)
    out = torch.floor(_to_bytes(x) / step) * step / 255.0
    # 8 bits keep the image as it is (the sampled op skips the uint8 round trip then)
    return torch.where((bits >= 8).view(-1, 1, 1, 1), x.detach(), out)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize, per image and channel, on the image's bytes."""
    n, c, h, w = x.shape
    q = _to_bytes(x).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    top = hist.gather(1, q.max(1, keepdim=True).values)  # count of the brightest value present
    step = torch.div(h * w - top, 255, rounding_mode="floor")
    lut = torch.div(
        hist.cumsum(1) + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor"
    )
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return (out.float() / 255.0).view(n, c, h, w).to(x.dtype)


def apply_op(op: str, x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``op`` at magnitudes ``m`` (N,) in [0, 1], signed ops times ``sign`` (N,), differentiable in
    x and m (straight-through where the op is not)."""
    v = _value(op, m) * (sign if op in SIGNED_OPS else 1.0) if op in MAGNITUDE_RANGES else None
    if op in GEOMETRIC_OPS:
        return _geometric(op, x, v)
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), 1.0 + v)
    if op == "contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1.0 + v)
    if op == "color":
        return _blend(x, _gray(x), 1.0 + v)
    if op == "sharpness":
        return _blend(x, _sharpness_degenerate(x), 1.0 + v)
    if op in ("posterize", "equalize"):  # flat in x as well: straight through for x too
        hard = _posterize(x, torch.floor(v.detach())) if op == "posterize" else _equalize(x)
        out = x + (hard - x).detach()
    elif op == "solarize":
        out = torch.where(x >= v.detach().view(-1, 1, 1, 1), 1.0 - x, x)
    elif op == "autocontrast":
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        flat = hi <= lo
        out = torch.where(flat, x, ((x - lo) / torch.where(flat, torch.ones_like(hi), hi - lo)).clamp(0, 1))
    elif op == "invert":
        out = 1.0 - x
    elif op == "identity":
        out = x
    else:
        raise KeyError(f"unknown augmentation op {op!r}; known: {', '.join(OPS)}")
    return out + (m - m.detach()).view(-1, 1, 1, 1)  # value unchanged; d out / d m = 1 (the paper's STE)


# ---------------------------------------------------------------- policy and critic


def _relaxed_bernoulli(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """A reparameterised sample of RelaxedBernoulli(p, temperature); finite and differentiable
    at p = 0 and p = 1 (where torch's logits would be infinite)."""
    u = torch.rand_like(p).clamp(1e-6, 1 - 1e-6)
    logits = torch.log(p + 1e-7) - torch.log1p(1e-7 - p)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


class DifferentiablePolicy(nn.Module):
    """Sub-policies with learnable op weights, probabilities and magnitudes, each of shape
    (num_sub_policies, ops_per_sub_policy, len(ops))."""

    def __init__(self, ops: list[str], num_sub_policies: int, ops_per_sub_policy: int, temperature: float) -> None:
        super().__init__()
        self.ops, self.temperature = list(ops), temperature
        shape = (num_sub_policies, ops_per_sub_policy, len(self.ops))
        self.op_weights = nn.Parameter(torch.zeros(shape))  # uniform over ops at the start
        self.probs = nn.Parameter(torch.full(shape, 0.5))
        self.magnitudes = nn.Parameter(torch.full(shape, 0.5))

    def forward(self, x: torch.Tensor, sub_policy: torch.Tensor | None = None) -> torch.Tensor:
        """Augment every image of ``x`` by a sub-policy (``sub_policy`` (N,), uniform if None)."""
        n = x.shape[0]
        if sub_policy is None:
            sub_policy = torch.randint(self.op_weights.shape[0], (n,), device=x.device)
        for stage in range(self.op_weights.shape[1]):
            # Per image: the hard one-hot op (its gradient is the soft one's), the mask and magnitudes.
            w = F.gumbel_softmax(self.op_weights[sub_policy, stage], tau=self.temperature, hard=True)
            b = _relaxed_bernoulli(self.probs[sub_policy, stage].clamp(0, 1), self.temperature)
            m = self.magnitudes[sub_policy, stage].clamp(0, 1)
            sign = torch.randint(0, 2, m.shape, device=x.device, dtype=x.dtype) * 2 - 1
            ys = torch.stack([apply_op(op, x, m[:, k], sign[:, k]) for k, op in enumerate(self.ops)])
            applied = (w * b).t().reshape(len(self.ops), n, 1, 1, 1)
            x = (applied * ys).sum(0) + (w * (1 - b)).sum(1).view(n, 1, 1, 1) * x
        return x

    @torch.no_grad()
    def clamp_(self) -> None:
        """Back into [0, 1] after an optimiser step."""
        self.probs.clamp_(0, 1)
        self.magnitudes.clamp_(0, 1)

    @torch.no_grad()
    def op_distributions(self) -> list[list[dict[str, float]]]:
        """Every stage's softmax over ops: the probabilities its Gumbel-softmax samples from."""
        soft = self.op_weights.softmax(-1)
        return [[dict(zip(self.ops, stage.tolist(), strict=True)) for stage in sub] for sub in soft]

    @torch.no_grad()
    def to_policy(self) -> dict:
        """The top op of every stage with its probability and magnitude."""
        top = self.op_weights.argmax(-1)
        subs = []
        for s in range(top.shape[0]):
            stages = []
            for k in range(top.shape[1]):
                i = int(top[s, k])
                p, m = self.probs[s, k, i].clamp(0, 1), self.magnitudes[s, k, i].clamp(0, 1)
                stages.append({"op": self.ops[i], "prob": round(float(p), 4), "magnitude": round(float(m), 4)})
            subs.append(stages)
        return {"kind": "subpolicies", "sub_policies": subs}


class Critic(nn.Module):
    """A plain CNN (stride-2 3x3 convs, LeakyReLU) with a critic score head and a class head. No
    normalisation layers: the gradient penalty is per sample. Features are pooled to a 2x2 grid, not
    to one vector, so the critic sees the coarse layout that rotation and translation change."""

    def __init__(self, num_classes: int, widths: list[int], in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(4 * in_channels, 1)
        self.classes = nn.Linear(4 * in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.adaptive_avg_pool2d(self.features(x), 2).flatten(1)
        return self.score(h).squeeze(1), self.classes(h)


def critic_step(
    critic: Critic,
    opt: torch.optim.Optimizer,
    real: torch.Tensor,
    labels: torch.Tensor,
    fake: torch.Tensor,
    gp_weight: float,
) -> dict[str, float]:
    """One WGAN-GP step (Gulrajani et al., arXiv 1704.00028) plus classification of the originals."""
    n = min(len(real), len(fake))
    alpha = torch.rand(n, 1, 1, 1, device=real.device)
    mix = (alpha * real[:n] + (1 - alpha) * fake[:n]).requires_grad_(True)
    scores, logits = critic(torch.cat([real, fake, mix]))  # no batch statistics: one pass for all
    real_score, fake_score, mix_score = scores.split([len(real), len(fake), n])
    (grad,) = torch.autograd.grad(mix_score.sum(), mix, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    wasserstein = real_score.mean() - fake_score.mean()
    ce = F.cross_entropy(logits[: len(real)], labels)
    loss = -wasserstein + gp_weight * penalty + ce
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {
        "wasserstein": wasserstein.item(),
        "critic_loss": loss.item(),
        "critic_classification_loss": ce.item(),
    }


def policy_step(
    policy: DifferentiablePolicy,
    opt: torch.optim.Optimizer,
    critic: Critic,
    augmented: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    classification_weight: float,
) -> dict[str, float]:
    """Minimise the critic's distance between ``real`` and ``augmented`` (``policy``'s output, with
    its graph) plus the weighted cross-entropy of the augmented images; then clamp p and mu."""
    critic.requires_grad_(False)  # only the policy learns here; skips the critic's weight gradients
    try:
        score, logits = critic(augmented)
        with torch.no_grad():
            real_score = critic(real)[0].mean()
        ce = F.cross_entropy(logits, labels)
        loss = real_score - score.mean() + classification_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        policy.clamp_()
    finally:
        critic.requires_grad_(True)
    return {"policy_loss": loss.item(), "classification_loss": ce.item()}


def _adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999))  # the paper's betas


def search_policy(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cfg: FasterAAConfig,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> SearchResult:
    """Search a sub-policy augmentation for ``images`` (N, 3, H, W) in [0, 1] with int64 ``labels``.

    ``log(epoch, metrics)`` is called after every epoch. Deterministic for ``cfg.seed``; the
    caller's RNG state is left as it was."""
    cfg.validate()
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a float (N, 3, H, W) batch, got {tuple(images.shape)} {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.shape[0] < 2 or min(images.shape[-2:]) < 3:
        raise ValueError("need at least 2 images of at least 3x3 pixels")
    n, device = images.shape[0], images.device
    batch = min(cfg.batch_size, n) // 2 * 2
    half, steps = batch // 2, max(1, n // batch)
    labels = labels.to(device=device, dtype=torch.long)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        policy = DifferentiablePolicy(cfg.ops, cfg.num_sub_policies, cfg.ops_per_sub_policy, cfg.temperature)
        critic = Critic(num_classes, cfg.critic_widths).to(device)
        policy.to(device)
        opt_policy, opt_critic = _adam(policy.parameters(), cfg.lr), _adam(critic.parameters(), cfg.lr)
        history = []
        for epoch in range(cfg.epochs):
            start, sums = time.perf_counter(), {}
            order = torch.randperm(n, device=device)
            for i in range(steps):
                idx = order[i * batch : (i + 1) * batch]
                real, real_y = images[idx[:half]], labels[idx[:half]]
                source, source_y = images[idx[half:]], labels[idx[half:]]
                augmented = policy(source)  # one forward serves both steps
                metrics = critic_step(critic, opt_critic, real, real_y, augmented.detach(), cfg.gp_weight)
                metrics |= policy_step(policy, opt_policy, critic, augmented, source_y, real, cfg.classification_weight)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
            row = {key: value / steps for key, value in sums.items()}
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            if log is not None:
                log(epoch, dict(row))
    return SearchResult(policy=policy.to_policy(), history=history, op_weights=policy.op_distributions())
