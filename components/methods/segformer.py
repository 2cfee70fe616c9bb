"""SegFormer: a hierarchical Transformer encoder (Mix Transformer, MiT) and an all-MLP decoder.

Xie, Wang, Yu, Anandkumar, Alvarez, Luo, "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers", arXiv 2105.15203.

Encoder, four stages at strides 4, 8, 16 and 32 of the input:
- Overlapping patch merging: a convolution with kernel 7, stride 4, padding 3 into the first
  stage, then kernel 3, stride 2, padding 1 between stages, followed by LayerNorm. Neighbouring
  patches overlap, so local continuity survives the merge.
- Efficient self-attention: keys and values come from the sequence shrunk by the stage's
  reduction ratio R (a R x R convolution with stride R, then LayerNorm), cutting the cost from
  O(N^2) to O(N^2 / R^2); ratios 8, 4, 2, 1 in the paper.
- Mix-FFN: ``x + MLP(GELU(DWConv3x3(MLP(LN(x)))))``; the 3x3 depth-wise convolution leaks
  enough zero-padding position information that the encoder needs no positional encoding, so
  it runs at any resolution (no interpolated position embeddings).
Decoder (all-MLP): each stage's features are projected to one width by a linear layer,
upsampled to stride 4, concatenated, fused by a linear layer (with BatchNorm and ReLU) and
classified by a linear layer; the stride-4 logits are upsampled bilinearly to the input size.

The defaults are the paper's MiT-B0 (widths 32, 64, 160, 256; two blocks per stage; 1, 2, 5, 8
heads; decoder width 256). Written here from the paper; stochastic depth is ``drop_path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.data.canonical import DatasetInfo
from components.methods.base import register_method
from components.methods.segmentation_base import SemanticConfig, SemanticSegmenter


@dataclass
class SegFormerConfig(SemanticConfig):
    widths: list[int] = field(default_factory=lambda: [32, 64, 160, 256])  # MiT-B0
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    reduction_ratios: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    mlp_ratio: int = 4
    decoder_width: int = 256
    dropout: float = 0.0  # attention and MLP dropout
    drop_path: float = 0.1  # stochastic depth, rising linearly over the blocks to this rate
    decoder_dropout: float = 0.1
    # Images are resized by this factor before the encoder (the logits come back at the input's
    # size). The decoder predicts at stride 4, too coarse for digits 16-30 px tall at 64 px;
    # the detectors' inputs are enlarged the same way (input.min_size 128).
    input_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        for name in ("widths", "depths", "heads", "reduction_ratios"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"{name} needs four entries, one per encoder stage")
        for w, h in zip(self.widths, self.heads, strict=True):
            if h < 1 or w % h:
                raise ValueError(f"each stage's width must be a multiple of its heads, got width {w} with {h} heads")
        if any(r < 1 for r in self.reduction_ratios) or any(d < 1 for d in self.depths):
            raise ValueError("reduction_ratios and depths must be >= 1")
        if not 0.25 <= self.input_scale <= 8:
            raise ValueError("input_scale must be between 0.25 and 8")
        for name in ("dropout", "drop_path", "decoder_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")


class OverlapPatchMerging(nn.Module):
    """A strided convolution whose kernel is larger than its stride, then LayerNorm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a sequence shrunk R x R times."""

    def __init__(self, dim: int, heads: int, reduction: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.reduction = reduction
        if reduction > 1:
            self.sr = nn.Conv2d(dim, dim, reduction, stride=reduction)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.reduction > 1:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear, 3x3 depth-wise convolution, GELU, linear: the convolution supplies position."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(self.drop(F.gelu(x)))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int, mlp_ratio: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, heads, reduction, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, dim * mlp_ratio, dropout)
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole residual branch per sample during training."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        return x * x.new_empty(x.shape[0], 1, 1).bernoulli_(keep) / keep

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x), h, w))
        return x + self._drop(self.ffn(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """The MiT encoder: returns four feature maps, at strides 4, 8, 16 and 32."""

    def __init__(self, in_channels: int, cfg: SegFormerConfig) -> None:
        super().__init__()
        total = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        self.merges, self.stages, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin, k = in_channels, 0
        for s, (dim, depth, heads, ratio) in enumerate(
            zip(cfg.widths, cfg.depths, cfg.heads, cfg.reduction_ratios, strict=True)
        ):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            self.merges.append(OverlapPatchMerging(cin, dim, kernel, stride))
            self.stages.append(
                nn.ModuleList(
                    MiTBlock(dim, heads, ratio, cfg.mlp_ratio, cfg.dropout, rates[k + i]) for i in range(depth)
                )
            )
            self.norms.append(nn.LayerNorm(dim))
            cin, k = dim, k + depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for merge, blocks, norm in zip(self.merges, self.stages, self.norms, strict=True):
            x, h, w = merge(x)
            for block in blocks:
                x = block(x, h, w)
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            features.append(x)
        return features


class AllMLPDecoder(nn.Module):
    """Project each scale to ``width``, upsample to stride 4, concatenate, fuse, classify."""

    def __init__(self, in_widths: list[int], width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_widths)  # a per-pixel linear layer
        self.fuse = nn.Sequential(
            nn.Conv2d(width * len(in_widths), width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.drop = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        up = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            for p, f in zip(self.project, features, strict=True)
        ]
        return self.classify(self.drop(self.fuse(torch.cat(up[::-1], dim=1))))


class SegFormerModel(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, cfg: SegFormerConfig, normalize: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.encoder = MixTransformer(in_channels, cfg)
        self.decoder = AllMLPDecoder(cfg.widths, cfg.decoder_width, num_classes, cfg.decoder_dropout)
        self.input_scale = cfg.input_scale
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.normalize(x)
        if self.input_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        logits = self.decoder(self.encoder(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@register_method
class SegFormer(SemanticSegmenter):
    name = "segformer"
    paper = "2105.15203"
    Config = SegFormerConfig

    def build(self, info: DatasetInfo) -> nn.Module:
        return SegFormerModel(info.in_channels, info.num_classes + 1, self.cfg, self.normalize(info.in_channels))
