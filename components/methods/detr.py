"""DETR: detection as direct set prediction with a transformer.

Carion, Massa, Synnaeve, Usunier, Kirillov, Zagoruyko, "End-to-End Object Detection with
Transformers", arXiv 2005.12872.

- A CNN backbone's last feature map, projected to ``hidden_dim``, plus a 2-D sine positional
  encoding (added to queries and keys of every attention layer), goes through a transformer
  encoder; the decoder turns ``num_queries`` learned object queries into as many predictions
  at once: a class over the categories plus "no object", and a box (normalised cx, cy, w, h)
  from a 3-layer MLP. Post-norm layers, as in the paper.
- Training matches predictions to ground truth one-to-one with the Hungarian algorithm on
  ``class_cost * -p(class) + bbox_cost * L1 + giou_cost * -GIoU``, then applies cross-entropy
  (the "no object" class weighted by ``eos_coef``) to every query and L1 + GIoU loss
  (Rezatofighi et al., arXiv 1902.09630) to the matched ones, at the output of every decoder
  layer (auxiliary losses). No anchors, no NMS.
- The box losses are divided by the number of ground-truth boxes averaged over all workers, and
  the cross-entropy by the class-weight total averaged likewise, so with data-parallel gradient
  averaging the loss equals the single-worker loss on the whole global batch.

Written here on ``torch.nn.MultiheadAttention`` and ``scipy.optimize.linear_sum_assignment``.

``variant: conditional`` selects Conditional DETR (Meng, Chen, Fan, Zeng, Li, Yuan, Sun, Wang,
"Conditional DETR for Fast Training Convergence", arXiv 2108.06152), written in
``components/methods/conditional_detr.py``: the same backbone, encoder and set matching, with
conditional cross-attention, boxes relative to a reference point per query and focal-loss
classification. ``variant: detr`` (the default) is the model above, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.detection_base import Detector, DetectorConfig
from components.models.fpn import BackboneConfig, build_plain_backbone
from components.tasks.base import all_reduce_mean


def _detr_backbone() -> BackboneConfig:
    # Three stride-2 stages after the stride-2 stem: stride 16, an 8x8 map for a 128-px input.
    return BackboneConfig(widths=[32, 64, 128], blocks=[1, 1, 1], levels=1)


@dataclass
class DETRConfig(DetectorConfig):
    # "conditional": Conditional DETR (arXiv 2108.06152, see the module docstring).
    variant: Literal["detr", "conditional"] = "detr"
    backbone: BackboneConfig = field(default_factory=_detr_backbone)
    score_thresh: float = 0.0  # every query is a detection; COCO AP ranks them by score
    # The paper (arXiv 2005.12872, Sec. 4): AdamW at 1e-4 for the transformer, 1e-5 for the backbone.
    backbone_lr_ratio: float = 0.1
    hidden_dim: int = 128
    nheads: int = 8
    enc_layers: int = 3
    dec_layers: int = 3
    dim_feedforward: int = 512
    dropout: float = 0.1
    num_queries: int = 20
    aux_loss: bool = True
    # Left unset, the class cost and weight are the variant's paper's: 1 for DETR, 2 for
    # Conditional DETR (its focal loss; arXiv 2108.06152). Both papers: L1 5, GIoU 2.
    class_cost: float | None = None
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    ce_weight: float | None = None  # the class loss's weight (cross-entropy, or focal loss)
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # DETR's "no object" weight; Conditional DETR has no such class

    def __post_init__(self) -> None:
        paper = 2.0 if self.variant == "conditional" else 1.0
        if self.class_cost is None:
            self.class_cost = paper
        if self.ce_weight is None:
            self.ce_weight = paper

    def validate(self) -> None:
        super().validate()
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError("hidden_dim must be even and divisible by nheads")
        if min(self.enc_layers, self.dec_layers, self.num_queries) < 1:
            raise ValueError("enc_layers, dec_layers and num_queries must be >= 1")
        if not 0.0 < self.eos_coef <= 1.0:
            raise ValueError("eos_coef must be in (0, 1]")


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (predictions) and columns (targets) of the minimum-cost one-to-one assignment."""
    return _assign(cost.detach().float().cpu().numpy())


def _assign(cost) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


class SetCriterion(nn.Module):
    """Hungarian matching and DETR's set loss (see module docstring)."""

    def __init__(self, num_classes: int, cfg: DETRConfig) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cfg = cfg
        weight = torch.ones(num_classes + 1)
        weight[-1] = cfg.eos_coef
        self.register_buffer("class_weight", weight, persistent=False)

    @torch.no_grad()
    def match(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]):
        """Per image, (query indices, target indices) of the optimal assignment."""
        costs: dict[int, torch.Tensor] = {}
        for i, target in enumerate(targets):
            if len(target["labels"]) == 0:
                continue
            costs[i] = (
                self.class_cost_matrix(logits[i], target["labels"])
                + self.cfg.bbox_cost * torch.cdist(boxes[i].float(), target["boxes"], p=1)
                - self.cfg.giou_cost * generalized_box_iou(_xyxy(boxes[i].float()), _xyxy(target["boxes"]))
            )
        # One device-to-host copy for the whole batch, not one per image: on a GPU each copy syncs.
        flat = torch.cat([c.reshape(-1) for c in costs.values()]).cpu() if costs else torch.zeros(0)
        host = dict(zip(costs, flat.split([c.numel() for c in costs.values()]), strict=True))
        empty = torch.zeros(0, dtype=torch.long)
        return [
            _assign(host[i].view(costs[i].shape).numpy()) if i in costs else (empty, empty) for i in range(len(targets))
        ]

    def class_cost_matrix(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(Q, T) matching cost of each query's class scores ``logits`` (Q, C+1) for the targets' ``labels``."""
        prob = logits.float().softmax(-1)
        return -self.cfg.class_cost * prob[:, labels]

    def class_loss(self, logits, batch_idx, query_idx, labels, num_boxes, weight_total) -> dict[str, torch.Tensor]:
        """Cross-entropy over every query, the matched ones (``batch_idx``, ``query_idx``) towards
        ``labels``, the rest towards "no object"."""
        n, q = logits.shape[:2]
        classes = torch.full((n, q), self.num_classes, dtype=torch.long, device=logits.device)
        classes[batch_idx, query_idx] = labels
        ce = F.cross_entropy(logits.float().transpose(1, 2), classes, weight=self.class_weight, reduction="sum")
        return {"ce": self.cfg.ce_weight * ce / weight_total}

    def layer_loss(self, logits, boxes, targets, num_boxes: torch.Tensor, weight_total: torch.Tensor):
        indices = self.match(logits, boxes, targets)
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        labels = torch.cat([t["labels"][tgt.to(device)] for t, (_, tgt) in zip(targets, indices, strict=True)])
        losses = self.class_loss(logits, batch_idx, query_idx, labels, num_boxes, weight_total)
        matched = boxes[batch_idx, query_idx].float()
        wanted = torch.cat([t["boxes"][tgt.to(device)] for t, (_, tgt) in zip(targets, indices, strict=True)])
        l1 = F.l1_loss(matched, wanted, reduction="sum")
        giou = generalized_box_iou_loss(_xyxy(matched), _xyxy(wanted), reduction="sum")
        losses["l1"] = self.cfg.l1_weight * l1 / num_boxes
        losses["giou"] = self.cfg.giou_weight * giou / num_boxes
        return losses

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        """``logits`` (L, N, Q, C+1) and ``boxes`` (L, N, Q, 4) for L decoder layers (last one
        last; (L, N, Q, C) logits, no "no object", in a subclass with a sigmoid class loss);
        ``targets`` boxes in normalised cx, cy, w, h."""
        device = logits.device
        count = sum(len(t["labels"]) for t in targets)
        slots = logits.shape[1] * logits.shape[2]
        matched = sum(min(len(t["labels"]), logits.shape[2]) for t in targets)
        num_boxes = all_reduce_mean(torch.tensor(float(count), device=device)).clamp(min=1.0)
        weight_total = all_reduce_mean(torch.tensor(matched + (slots - matched) * self.cfg.eos_coef, device=device))
        losses = self.layer_loss(logits[-1], boxes[-1], targets, num_boxes, weight_total)
        if self.cfg.aux_loss and logits.shape[0] > 1:
            aux = [
                self.layer_loss(logits[k], boxes[k], targets, num_boxes, weight_total)
                for k in range(logits.shape[0] - 1)
            ]
            losses["aux"] = sum(sum(part.values()) for part in aux)
        return losses


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    return box_convert(cxcywh, "cxcywh", "xyxy")


def sine_position_encoding(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2-D sine encoding, (N, dim, H, W): half the channels encode y, half x, with
    coordinates normalised to [0, 2 pi] over the unpadded area (``mask`` True on padding)."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    freq = temperature ** (2 * (torch.arange(half, device=mask.device) // 2) / half)
    px, py = x[..., None] / freq, y[..., None] / freq
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src, pos, padding):
        q = k = src + pos
        src = self.norm1(src + self.drop1(self.attn(q, k, src, key_padding_mask=padding, need_weights=False)[0]))
        return self.norm2(src + self.drop2(self.ff(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos, padding):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=padding, need_weights=False)
        tgt = self.norm2(tgt + self.drop2(attended[0]))
        return self.norm3(tgt + self.drop3(self.ff(tgt)))


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETRModel(nn.Module):
    """Images in, set losses (train) or detections (eval) out: the torchvision convention."""

    def __init__(self, cfg: DETRConfig, num_classes: int, in_channels: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.transform = cfg.input.transform(in_channels)
        self.backbone = build_plain_backbone(cfg.backbone, in_channels)
        self.input_proj = nn.Conv2d(self.backbone.out_channels, d, 1)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        args = (d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.enc_layers))
        self.build_decoder(cfg, num_classes)
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.init_heads()

    def build_decoder(self, cfg: DETRConfig, num_classes: int) -> None:
        """The decoder (its parameters get Xavier init with the encoder's), the heads, the loss."""
        d = cfg.hidden_dim
        args = (d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.criterion = SetCriterion(num_classes, cfg)

    def init_heads(self) -> None:
        """Initialisation after the Xavier one (DETR: none)."""

    def encode(self, x: torch.Tensor, image_sizes: list[tuple[int, int]]):
        """Encoder memory (N, HW, d), the sine positional encoding (N, HW, d) and the padding (N, HW)."""
        padding = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
        for i, (h, w) in enumerate(image_sizes):
            padding[i, :h, :w] = False
        features = self.backbone(x)
        padding = F.interpolate(padding[None].float(), size=features.shape[-2:])[0].bool()
        pos = sine_position_encoding(padding, self.cfg.hidden_dim).flatten(2).transpose(1, 2)
        memory = self.input_proj(features).flatten(2).transpose(1, 2)
        flat_padding = padding.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, pos, flat_padding)
        return memory, pos, flat_padding

    def decode(self, memory: torch.Tensor, pos: torch.Tensor, padding: torch.Tensor):
        """Class logits (L, N, Q, C+1) and boxes (L, N, Q, 4, normalised cx, cy, w, h) of every decoder layer."""
        query_pos = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        states = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos, padding)
            states.append(self.decoder_norm(tgt))
        hs = torch.stack(states)  # (L, N, Q, d)
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor) -> list[dict]:
        """Per image, the last layer's detections: a query's best class, ranked by its probability."""
        prob = logits.float().softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        pixel_boxes = _xyxy(boxes.float()) * sizes[:, None, :]
        detections = []
        for s, lab, b in zip(scores, labels, pixel_boxes, strict=True):
            keep = torch.nonzero(s >= self.cfg.score_thresh).flatten()
            keep = keep[s[keep].argsort(descending=True)][: self.cfg.detections_per_image]
            detections.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return detections

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, targets = self.transform(images, targets)
        x = batch.tensors
        logits, boxes = self.decode(*self.encode(x, batch.image_sizes))
        sizes = torch.tensor([[w, h, w, h] for h, w in batch.image_sizes], dtype=torch.float32, device=x.device)
        if self.training:
            normalised = [
                {"labels": t["labels"], "boxes": box_convert(t["boxes"], "xyxy", "cxcywh") / sizes[i]}
                for i, t in enumerate(targets)
            ]
            return self.criterion(logits, boxes, normalised)
        detections = self.detections(logits[-1], boxes[-1], sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


@register_method
class DETR(Detector):
    name = "detr"
    paper = "2005.12872"
    Config = DETRConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        if self.cfg.variant == "conditional":
            # Imported here: it builds on this module.
            from components.methods.conditional_detr import ConditionalDETRModel

            return ConditionalDETRModel(self.cfg, info.num_classes, info.in_channels)
        return DETRModel(self.cfg, info.num_classes, info.in_channels)
