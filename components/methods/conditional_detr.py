"""Conditional DETR: DETR whose decoder cross-attention is guided by a conditional spatial query.

Meng, Chen, Fan, Zeng, Li, Yuan, Sun, Wang, "Conditional DETR for Fast Training Convergence",
arXiv 2108.06152. The ``conditional`` variant of the ``detr`` method (``components/methods/detr.py``):
the backbone, sine positional encoding, encoder, Hungarian matching, box losses, auxiliary losses
and their normalisation by the global box count are DETR's; what differs:

- Each object query ``o_q`` (the learned query embedding) predicts a reference point, the
  normalised (x, y) ``s = sigmoid(FFN(o_q))``.
- Decoder cross-attention splits query and key into a content and a spatial part and
  *concatenates* them, per head: query ``[c_q, p_q]``, key ``[c_k, p_k]``, so the attention logit
  is ``c_q . c_k + p_q . p_k`` (DETR adds them, which mixes in ``c_q . p_k + p_q . c_k``). ``c_q``
  is the decoder embedding ``f`` after self-attention, ``c_k`` the encoder memory, ``p_k`` its sine
  positional encoding, and ``p_q = lambda_q * PE(s)``: the sine encoding of the reference point,
  with the keys' frequencies, scaled element-wise by ``lambda_q = FFN(f)`` of the layer's input
  embedding (``lambda_q = 1`` in the first layer, whose input is all zeros). Each part has its own
  linear projection; every head takes its slice of the content and of the spatial part, and the
  logits are scaled by 1/sqrt(2 d / heads), the width of a head's concatenated vector.
- Boxes are predicted relative to the reference point, at every decoder layer:
  ``box = sigmoid(FFN(f) + [logit(s), 0, 0])`` for (cx, cy, w, h).
- Classification is per class with a sigmoid and focal loss (alpha 0.25, gamma 2; Lin et al.,
  arXiv 1708.02002), normalised by the number of boxes; the matching's class cost is the focal
  one, ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at the target class. The
  paper's weights: class 2, L1 5, GIoU 2 in the cost and in the loss. No "no object" class.
- Inference ranks all query x class scores and keeps the top ``detections_per_image`` (the paper:
  100), so one query may yield several classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from components.methods.detr import MLP, DETRConfig, DETRModel, SetCriterion, _xyxy

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CLASS_PRIOR = 0.01  # the classifier's initial probability per class (RetinaNet's prior)
LOGIT_EPS = 1e-5  # the reference point is clamped to [eps, 1 - eps] before its logit


def sine_point_encoding(points: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """PE(s): (..., dim) sine encoding of normalised points (..., 2) in (x, y) order, channel for
    channel the encoding ``sine_position_encoding`` gives a feature-map position at the same
    normalised coordinates (y half first, then x; coordinates scaled to [0, 2 pi])."""
    half = dim // 2
    freq = temperature ** (2 * (torch.arange(half, device=points.device) // 2) / half)
    scaled = points.float()[..., None] * (2 * math.pi) / freq  # (..., 2, half)
    enc = torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((enc[..., 1, :], enc[..., 0, :]), dim=-1)


class ConditionalCrossAttention(nn.Module):
    """Multi-head attention on concatenated [content, spatial] queries and keys (see module docstring)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.content_query = nn.Linear(d, d)
        self.spatial_query = nn.Linear(d, d)
        self.content_key = nn.Linear(d, d)
        self.spatial_key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        return x.view(n, length, self.heads, d // self.heads).transpose(1, 2)  # (N, heads, L, d / heads)

    def logits(self, tgt, spatial_query, memory, pos) -> torch.Tensor:
        """(N, heads, Q, HW) pre-softmax weights: per head, (c_q . c_k + p_q . p_k) / sqrt(2 d / heads)."""
        q = torch.cat((self._split(self.content_query(tgt)), self._split(self.spatial_query(spatial_query))), -1)
        k = torch.cat((self._split(self.content_key(memory)), self._split(self.spatial_key(pos))), -1)
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])

    def forward(self, tgt, spatial_query, memory, pos, padding: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(tgt, spatial_query, memory, pos)
        if padding is not None:
            logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
        out = self.dropout(logits.softmax(-1)) @ self._split(self.value(memory))  # (N, heads, Q, d / heads)
        n, heads, q, width = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, q, heads * width))


class ConditionalDecoderLayer(nn.Module):
    """DETR's post-norm decoder layer with conditional cross-attention."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = ConditionalCrossAttention(d, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos, spatial_query, padding):
        q = k = tgt + query_pos  # self-attention as in DETR: the object query is its positional part
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(tgt, spatial_query, memory, pos, padding)))
        return self.norm3(tgt + self.drop3(self.ff(tgt)))


class ConditionalDecoder(nn.Module):
    """The decoder layers, the reference-point FFN, the lambda_q FFN and the output norm."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConditionalDecoderLayer(d, heads, ff, dropout) for _ in range(layers))
        self.reference_head = MLP(d, d, 2, 2)  # s = sigmoid(FFN(o_q))
        self.query_scale = MLP(d, d, d, 2)  # lambda_q = FFN(f)
        self.norm = nn.LayerNorm(d)

    def reference_points(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Normalised (x, y) reference point of each object query, in float32 (its logit needs it)."""
        return self.reference_head(query_pos).float().sigmoid()

    def spatial_query(self, index: int, tgt: torch.Tensor, encoding: torch.Tensor) -> torch.Tensor:
        """p_q of layer ``index`` from its input embedding ``tgt``: PE(s) in the first layer."""
        return encoding if index == 0 else self.query_scale(tgt) * encoding

    def forward(self, memory, pos, query_pos, padding) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's normalised output (L, N, Q, d) and the reference points (N, Q, 2)."""
        reference = self.reference_points(query_pos)
        encoding = sine_point_encoding(reference, memory.shape[-1]).to(memory.dtype)
        tgt = torch.zeros_like(query_pos)
        states = []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, memory, pos, query_pos, self.spatial_query(i, tgt, encoding), padding)
            states.append(self.norm(tgt))
        return torch.stack(states), reference


class FocalSetCriterion(SetCriterion):
    """DETR's set loss with a sigmoid focal class term, in the cost and in the loss."""

    def class_cost_matrix(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = logits.float()[:, labels]
        p = x.sigmoid()
        pos = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * -F.logsigmoid(x)  # -log p
        neg = (1 - FOCAL_ALPHA) * p**FOCAL_GAMMA * -F.logsigmoid(-x)  # -log(1 - p)
        return self.cfg.class_cost * (pos - neg)

    def class_loss(self, logits, batch_idx, query_idx, labels, num_boxes, weight_total) -> dict[str, torch.Tensor]:
        target = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        target[batch_idx, query_idx, labels] = 1.0
        focal = sigmoid_focal_loss(logits.float(), target, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="sum")
        return {"focal": self.cfg.ce_weight * focal / num_boxes}


class ConditionalDETRModel(DETRModel):
    """DETR's model with the conditional decoder, reference-relative boxes and sigmoid classes."""

    def build_decoder(self, cfg: DETRConfig, num_classes: int) -> None:
        d = cfg.hidden_dim
        self.decoder = ConditionalDecoder(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.dec_layers)
        self.class_embed = nn.Linear(d, num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.criterion = FocalSetCriterion(num_classes, cfg)

    def init_heads(self) -> None:
        # Every class starts at probability CLASS_PRIOR, so the many negatives do not swamp the
        # focal loss's first steps; every box starts at its reference point (zero offset).
        nn.init.constant_(self.class_embed.bias, -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def decode(self, memory: torch.Tensor, pos: torch.Tensor, padding: torch.Tensor):
        """Class logits (L, N, Q, C) and boxes (L, N, Q, 4) of every decoder layer."""
        query_pos = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)
        hs, reference = self.decoder(memory, pos, query_pos, padding)
        return self.class_embed(hs), self.boxes(hs, reference)

    def boxes(self, hs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """sigmoid(FFN(f) + [logit(s), 0, 0]): (L, N, Q, 4) normalised cx, cy, w, h."""
        anchor = torch.cat((torch.logit(reference, eps=LOGIT_EPS), torch.zeros_like(reference)), -1)
        return (self.bbox_embed(hs).float() + anchor).sigmoid()

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor) -> list[dict]:
        """Per image, the top ``detections_per_image`` of all query x class sigmoid scores."""
        prob = logits.float().sigmoid()
        n, q, c = prob.shape
        scores, flat = prob.flatten(1).topk(min(q * c, self.cfg.detections_per_image), dim=1)
        query, labels = flat // c, flat % c
        pixel_boxes = _xyxy(boxes.float()) * sizes[:, None, :]
        picked = torch.gather(pixel_boxes, 1, query[..., None].expand(-1, -1, 4))
        detections = []
        for s, lab, b in zip(scores, labels, picked, strict=True):
            keep = s >= self.cfg.score_thresh
            detections.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return detections
