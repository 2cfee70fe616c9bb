"""NPID: instance discrimination with a memory bank, NCE and proximal regularisation.

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
arXiv 1805.01978.

Faithful to the paper:
- every training image is its own class; the encoder is followed by a linear map to a 128-d
  L2-normalised feature ``f_i``;
- a memory bank ``V`` holds one feature per training image (a persistent buffer, so checkpoints
  carry it), initialised to random unit vectors; the non-parametric softmax scores ``f`` against
  it, ``P(i | f) = exp(v_i . f / tau) / Z``;
- NCE with ``m`` noise samples drawn uniformly from the bank (``P_n = 1/n``): each sample is a
  binary choice data/noise with ``h(i, f) = P(i | f) / (P(i | f) + m / n)``, the loss
  ``-log h(i, f_i) - sum_k log(1 - h(j_k, f_i))``, written with log-sigmoids (stable at small tau);
- ``Z`` is the Monte-Carlo estimate ``n * mean_j exp(v_j . f / tau)`` over the noise samples of
  the first ``z_batches`` batches, then fixed; it lives in a buffer, so a resumed run keeps it;
- proximal regularisation ``lambda * ||f_i - v_i^(t-1)||^2`` against the batch's own bank entries;
- after the loss the bank entries of the batch become its features (``bank_momentum`` 0, the
  paper's text; the authors' code mixes in half of the old entry, ``bank_momentum: 0.5``).

Under DDP every worker keeps an identical bank: the indices and features of every worker are
gathered before the update, and the Z estimate is averaged over workers. Each worker draws its own
noise samples; one draw is shared by the rows of a worker's batch (a (B, m) matrix product instead
of a (B, m, 128) gather; the estimate is unbiased either way).

Adapted to a run of ~8 epochs on 2.5k images (measured on the digits crops):
- tau 0.2 instead of the paper's 0.07: Z is fixed while the bank is still random (similarities
  near 0), so at tau 0.07 every noise sample closer than ~0.6 costs a large penalty; as the bank
  fills with real features the loss grows instead of falling and the features collapse;
- a BatchNorm on the embedding before the L2 normalisation (``head_batchnorm``): the encoder's
  pooled ReLU features of a random init are nearly parallel (mean cosine ~0.8 within a batch),
  and without centring the run never leaves that collapse within the budget;
- a colour distortion on top of the family's views (``colour``, see ``simclr.ColourConfig``).
The scored features are the encoder's pooled features (``eval_features: encoder``), the same
frozen-feature protocol as the other methods; ``embedding`` scores the paper's 128-d ``f``.
Next to them the predictions carry the paper's own evaluation (Sec. 3.4, ``bank_knn_top1``): the
train images are not encoded again but represented by their bank entries ``v_i`` (a train row's
index is its bank slot), and a query by its L2-normalised embedding ``f``; the family's weighted
kNN (k 200, tau 0.07) then scores the queries against the bank. The bank is a buffer, so the best
checkpoint scored on the test split brings its own; an untrained model (``epochs: 0``) scores its
random initial bank, i.e. chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
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
    gather_no_grad,
    world_size,
)

VIEW = "crops"  # the representation family's view: the bank has one slot per train image of it


@dataclass
class NPIDConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embedding_dim: int = 128
    temperature: float = 0.2  # paper 0.07; see the module docstring
    nce_negatives: int = 4096  # m, the paper's value
    z_batches: int = 1  # batches whose estimates of Z are averaged before Z is fixed
    proximal: float = 10.0  # lambda of the proximal term
    bank_momentum: float = 0.0
    eval_features: Literal["encoder", "embedding"] = "encoder"
    head_batchnorm: bool = True  # BatchNorm1d on the embedding before the L2 normalisation
    colour: ColourConfig = field(default_factory=ColourConfig)

    def validate(self) -> None:
        self.encoder.validate()
        self.colour.validate()
        if self.embedding_dim < 1 or self.nce_negatives < 1 or self.z_batches < 1:
            raise ValueError("embedding_dim, nce_negatives and z_batches must be positive")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.proximal < 0:
            raise ValueError("proximal (lambda) must be >= 0")
        if not 0.0 <= self.bank_momentum < 1.0:
            raise ValueError("bank_momentum must be in [0, 1)")


class NPIDNet(nn.Module):
    def __init__(self, encoder: nn.Module, cfg: NPIDConfig, bank_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head: nn.Module = nn.Linear(encoder.out_dim, cfg.embedding_dim)
        if cfg.head_batchnorm:
            self.head = nn.Sequential(self.head, nn.BatchNorm1d(cfg.embedding_dim))
        self.cfg = cfg
        self.register_buffer("bank", F.normalize(torch.randn(bank_size, cfg.embedding_dim), dim=1))
        self.register_buffer("z", torch.zeros(()))  # the normaliser; set by the first batches
        self.register_buffer("z_batches_seen", torch.zeros((), dtype=torch.long))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.encoder(images))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The L2-normalised embedding ``f`` of the encoder's pooled features."""
        return F.normalize(self.head(pooled).float(), dim=1)

    def scored(self, pooled: torch.Tensor) -> torch.Tensor:
        """The features the family's protocols score (``eval_features``)."""
        return pooled if self.cfg.eval_features == "encoder" else self.project(pooled)

    def forward(self, images: torch.Tensor, index: torch.Tensor | None = None):
        """Scored features of ``images``; with ``index`` (their bank slots), the losses as a dict,
        and the Z estimate and bank update as side effects."""
        if index is None:
            return self.scored(self.encoder(images))
        cfg, n = self.cfg, self.bank.shape[0]
        f = self.embed(images)
        previous = self.bank[index]  # v^(t-1) of the batch (a copy: the update below is safe)
        noise = self.bank[torch.randint(n, (cfg.nce_negatives,), device=f.device)]
        with torch.autocast(f.device.type, enabled=False):  # similarities / tau need float32
            s_pos = (f * previous).sum(1) / cfg.temperature
            s_noise = f @ noise.T / cfg.temperature
        log_z = self.update_z(s_noise.detach(), n).log()
        # log P(i|f) - log(m P_n(i)) is the logit of h: log h = logsigmoid(a), log(1 - h) = logsigmoid(-a).
        offset = log_z + math.log(cfg.nce_negatives / n)
        nce = -(F.logsigmoid(s_pos - offset) + F.logsigmoid(offset - s_noise).sum(1)).mean()
        proximal = cfg.proximal * (f - previous).pow(2).sum(1).mean()
        self.update_bank(index, f.detach())
        return {"nce": nce, "proximal": proximal}

    def evaluation_features(
        self, images: torch.Tensor, is_query: torch.Tensor, index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The scored features of ``images`` and, under ``bank``, the paper's kNN features: a
        query's embedding ``f``, a train image's bank entry ``v_index`` (its slot in the bank)."""
        pooled = self.encoder(images)
        f = self.project(pooled)
        is_query = is_query.bool()
        slot = torch.where(is_query, 0, index)  # a query's index is in its own split, not the bank
        bank = torch.where(is_query[:, None], f, self.bank[slot].to(f.dtype))
        return {"features": self.scored(pooled), "bank": bank}

    @torch.no_grad()
    def update_z(self, s_noise: torch.Tensor, n: int) -> torch.Tensor:
        """Running mean of the per-batch estimates ``n * mean exp(s)`` while fewer than
        ``z_batches`` went in, then fixed. Branch-free (no host sync); the estimate is averaged
        over workers so every worker holds the same Z."""
        estimate = n * s_noise.exp().mean()
        if distributed():
            dist.all_reduce(estimate)
            estimate /= world_size()
        fresh = self.z_batches_seen < self.cfg.z_batches
        seen = self.z_batches_seen.to(estimate.dtype)
        self.z.copy_(torch.where(fresh, (self.z * seen + estimate) / (seen + 1), self.z))
        self.z_batches_seen.add_(fresh.long())
        return self.z

    @torch.no_grad()
    def update_bank(self, index: torch.Tensor, features: torch.Tensor) -> None:
        index, features = gather_no_grad(index), gather_no_grad(features)
        m = self.cfg.bank_momentum
        mixed = m * self.bank[index] + (1 - m) * features if m > 0 else features
        self.bank[index] = F.normalize(mixed, dim=1).to(self.bank.dtype)


@register_method
class NPID(EmbeddingMethod):
    name = "npid"
    task = "representation"
    paper = "1805.01978"
    Config = NPIDConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        try:
            bank_size = int(info.views[VIEW]["counts"]["train"]["images"])
        except (KeyError, TypeError):
            raise ValueError(f"npid: {info.root} has no count of {VIEW!r} train images for the memory bank") from None
        return NPIDNet(build_encoder(self.cfg.encoder, info.in_channels), self.cfg, bank_size)

    def training_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, index = colour_distort(batch[0], self.cfg.colour), batch[3]
        return model(images, index)

    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """``batch = (images, labels, is_query, index)``, the family's evaluation batch."""
        core = getattr(model, "module", model)  # the bank lives on the module a DDP wrapper holds
        return core.evaluation_features(batch[0], batch[2], batch[3])

    def search_space(self) -> dict:
        return {"temperature": {"type": "uniform", "low": 0.05, "high": 0.2}}
