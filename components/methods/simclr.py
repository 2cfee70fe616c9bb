"""SimCLR: contrastive learning of two augmented views with a projection head and NT-Xent.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv 2002.05709.

Faithful to the paper:
- two independently augmented views of every image (the representation family's ``TwoViews``);
- the encoder's pooled features ``h`` go through an MLP projection head ``g`` (Linear, BN, ReLU,
  Linear) and the loss is on ``z = g(h)``; the features scored afterwards are ``h`` (the paper's
  finding: ``h`` keeps more information than ``z``);
- NT-Xent with temperature tau over the GLOBAL batch: the 2N projections of every worker are
  gathered, every one of the 2N anchors has its other view as positive and the other 2N - 2 as
  negatives, and the loss is the mean over the 2N anchors;
- global BatchNorm: the paper aggregates BN mean and variance over all devices, so that the
  positive pair cannot be told apart by per-device batch statistics. ``torch.nn.SyncBatchNorm``
  raises on CPU tensors once a process group exists (torch 2.14 checks the device type and only
  accepts GPU-like ones), so :class:`GlobalBatchNorm` below does it with two differentiable
  all-reduces; on one process it is plain BatchNorm.
With both, the loss and the update do not depend on the worker count (up to float summation
order): the test checks 1 against 2 workers.

Not from the paper: LARS and the very large batches (a short CPU schedule here uses AdamW and a
batch of 64). The views are the family's (crop, small rotation, mild colour jitter) plus the
colour distortion of :class:`ColourConfig`, applied here on the batch: the paper finds colour
distortion essential, and without it (``colour`` all 0) kNN accuracy stayed at the random-init
level in our runs on the digits crops, whose colours are random and say nothing of the digit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.augment.colour import ColourConfig, colour_distort
from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.embedding_base import (
    EmbeddingMethod,
    EncoderConfig,
    build_encoder,
    distributed,
    gather_with_grad,
)


@dataclass
class SimCLRConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projection_hidden: int = 128
    projection_dim: int = 64
    temperature: float = 0.2
    global_bn: bool = True  # BN statistics over all workers' samples (the paper's global BN)
    colour: ColourConfig = field(default_factory=ColourConfig)

    def validate(self) -> None:
        self.encoder.validate()
        self.colour.validate()
        if self.projection_hidden < 1 or self.projection_dim < 1:
            raise ValueError("projection_hidden and projection_dim must be positive")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every worker's batch (differentiably).

    Same parameters and buffers as ``nn.BatchNorm1d/2d`` (state dicts are interchangeable).
    Two passes (mean, then the centred second moment) rather than E[x^2] - E[x]^2, which
    loses precision in float32. The backward of each all-reduce sums the gradient over
    workers, so each worker's inputs get the gradient of the global statistics."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        total = _all_reduce_sum(xf.sum(dims))
        if distributed():
            torch.distributed.all_reduce(count)  # shards may differ in size (no gradient needed)
        mean = total / count
        centred = xf - mean.view(shape)
        var = _all_reduce_sum(centred.pow(2).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * count / (count - 1).clamp(min=1))
                self.num_batches_tracked.add_(1)
        return out.to(x.dtype)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d/2d replaced by a :class:`GlobalBatchNorm` (same state)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_bn(child))
    return module


def nt_xent(z: torch.Tensor, temperature: float, block: int | None = None) -> torch.Tensor:
    """NT-Xent over the rows of ``z`` (2N, d): mean over the 2N anchors of
    ``-log(exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau))``, ``s`` the cosine similarity and
    ``p`` the anchor's other view.

    Rows come in blocks of ``block`` = 2B, one per worker in rank order (as gathered): the B
    first views, then the B second views in the same order. ``block`` defaults to all rows."""
    n = z.shape[0]
    with torch.autocast(z.device.type, enabled=False):  # similarities / tau need float32
        unit = F.normalize(z.float(), dim=1)
        logits = unit @ unit.T / temperature
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
        return F.cross_entropy(logits, pair_index(n, block or n, z.device))


def pair_index(n: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """For each of ``n`` rows in blocks of ``block`` (first views, then second views), the row
    of its other view."""
    half = block // 2
    i = torch.arange(n, device=device)
    within = i % block
    return i - within + (within + half) % block


class SimCLRNet(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(
            nn.Linear(encoder.out_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, images: torch.Tensor, second_view: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features of ``images``; with ``second_view``, the projections of both views
        (one forward over the concatenated views, so BN sees all 2B samples)."""
        if second_view is None:
            return self.encoder(images)
        return self.projector(self.encoder(torch.cat([images, second_view])))


@register_method
class SimCLR(EmbeddingMethod):
    name = "simclr"
    task = "representation"
    paper = "2002.05709"
    Config = SimCLRConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        cfg = self.cfg
        model = SimCLRNet(build_encoder(cfg.encoder, info.in_channels), cfg.projection_hidden, cfg.projection_dim)
        return convert_to_global_bn(model) if cfg.global_bn else model

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        view_1, view_2 = batch[0], batch[1]
        view_1, view_2 = colour_distort(view_1, self.cfg.colour), colour_distort(view_2, self.cfg.colour)
        z = model(view_1, view_2)
        # Every worker computes the loss of the whole global batch (identical on all workers):
        # the gather's backward hands each worker W times the gradient of its rows and DDP
        # averages over the W workers, so the update is that of one worker holding everything.
        return {"nt_xent": nt_xent(gather_with_grad(z), self.cfg.temperature, block=2 * view_1.shape[0])}

    def search_space(self) -> dict:
        return {"temperature": {"type": "uniform", "low": 0.05, "high": 0.5}}
